"""python -m detailflow_engine.profile: where the time of DetailFlow inference goes, engine beside reference.

    python -m detailflow_engine.profile                                  # the embedded default model
    python -m detailflow_engine.profile --compare-reference --trace trace.json
    python -m detailflow_engine.profile --random-weights detailflow16 --compare-reference --json
    python -m detailflow_engine.profile --ckpt PRIOR --tokenizer TOK --batch-size 8 --dtype bf16

After a warm-up, one generation + decode + uint8 conversion of the engine (and with
--compare-reference, of the reference generation with the official full-prefix semantics on the
same weights, labels and settings) runs under torch.profiler. Printed:

* stages, engine beside reference: prior class step / single steps / group steps, sampling, VQ
  lookup, decoder, post-processing; exclusive time, share, reference/engine ratio, the stage's floor
  on this machine and how far each side is from it;
* per-op rows: our kernels by name (`detailflow::<op>`), torch GEMMs, attention, norms, other
  aten ops, Python time between ops; calls, time, GB/s and GFLOP/s where the bytes/FLOPs are known;
* the floors, measured in the same process before and after the runs, each the best of several
  repeats: a large streaming read (GB/s) and a large GEMM (GFLOP/s); the prior's floor streams all
  its weights once per step. A stage that beats its floor (engine/floor < 1) is flagged: the floor
  was measured low (a busy neighbour during its measurement, or shapes faster than the probe GEMM);
* the process's peak memory (RSS). ``--random-weights detailflow16`` builds DetailFlow-16-size models
  in memory: the profile peaks at about 8 GB of RAM with --compare-reference (about 5 GB without).

The torch profiler's native lines on stderr (``USDT: ... SyncActivityProfilerHandler``) are
filtered out; anything else written to stderr meanwhile is passed on.

Stage ranges are added from the outside (methods of the model instances and call-site globals are
wrapped while profiling, see profiling/instrument.py); our kernels get their ranges in ops/_dispatch.py.
Times under the profiler include its overhead; the unprofiled wall time of the same run is printed too.
Bad arguments: one ``error: ...`` line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from typing import List, Optional

import torch

from detailflow_engine import cli
from detailflow_engine.cli import Parser, UsageError, settings_from_args
from detailflow_engine.device_dtype import DEVICES, DTYPES, WEIGHT_MODES, WEIGHTS_HELP
from detailflow_engine.profiling import analysis
from detailflow_engine.ops._dispatch import profiler_range
from detailflow_engine.profiling.instrument import (RUN_PREFIX, Counters, Ranges, StageTimer, instrument_engine,
                                                    instrument_reference, profile_ranges, sampling_range,
                                                    stage_range, timing)
from detailflow_engine.profiling.report import PRESET_PEAK_GB, build_report, format_text, preset_peak_text
from detailflow_engine.sampling_settings import SamplingSettings

# Native lines the torch profiler (kineto) writes straight to fd 2 when it starts and stops.
_PROFILER_NOISE = re.compile(r"^(USDT|STAGE):|SyncActivityProfilerHandler|ActivityProfilerController")


@contextlib.contextmanager
def quiet_profiler_stderr():
    """Run a block with fd 2 sent to a temporary file, then pass on every line but the profiler's
    own native chatter (kineto writes it to fd 2 directly, so Python cannot intercept it)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not _PROFILER_NOISE.search(ln)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()




def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m detailflow_engine.profile",
               description="Per-stage and per-op profile of DetailFlow generation, engine beside the reference.")
    m = p.add_argument_group("model (--ckpt and --tokenizer, or --random-weights, or neither: the embedded model)")
    m.add_argument("--ckpt", metavar="PATH", help="prior: model folder, .pt or .safetensors")
    m.add_argument("--tokenizer", metavar="PATH", help="tokenizer: model folder, .pt or .safetensors")
    m.add_argument("--random-weights", metavar="PRESET",
                   help="random weights in memory at a released size (detailflow16)")
    m.add_argument("--device", default="auto", choices=DEVICES, help="default: auto")
    m.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="default: fp32")
    m.add_argument("--weights", default="native", choices=WEIGHT_MODES, help=WEIGHTS_HELP)
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=1, help="images (default: 1)")
    r.add_argument("--cfg-scale", type=float, default=1.45, help="> 1 enables CFG (default: 1.45)")
    r.add_argument("--temperature", type=float, default=1.0, help="default: 1.0")
    r.add_argument("--top-k", type=int, default=1, help="default: 1 (greedy, so engine and reference "
                   "make the same tokens); 0 = off")
    r.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; default 1 = off")
    r.add_argument("--warmup", type=int, default=1, help="warm-up generations before profiling (default: 1)")
    r.add_argument("--repeats", type=int, default=3, help="unprofiled timed runs of the engine; the stage "
                   "table shows the one with the median wall time (default: 3)")
    r.add_argument("--reference-repeats", type=int, default=1, help="the same for the (slow) reference "
                   "(default: 1)")
    r.add_argument("--compare-reference", action="store_true",
                   help="also profile the reference generation (official semantics) on the same weights")
    o = p.add_argument_group("output")
    o.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace (engine and reference "
                   "as separate processes)")
    o.add_argument("--json", action="store_true", help="print the tables as JSON instead of text")
    o.add_argument("--ops", type=int, default=12, metavar="N", help="text output: op rows per run (default: 12)")
    return p


def check_args(args) -> SamplingSettings:
    """Every flag checked before anything is built -> the run's sampling settings."""
    if args.random_weights is not None and (args.ckpt or args.tokenizer):
        raise UsageError("--random-weights builds its own models: do not combine it with --ckpt/--tokenizer")
    if bool(args.ckpt) != bool(args.tokenizer):
        raise UsageError("give both --ckpt and --tokenizer, or neither (the embedded default model)")
    if args.random_weights is not None:
        from detailflow_engine.presets import PRESETS

        if args.random_weights not in PRESETS:
            raise UsageError(f"--random-weights {args.random_weights!r} is not a preset; known: {sorted(PRESETS)}")
    for flag, path in (("--ckpt", args.ckpt), ("--tokenizer", args.tokenizer)):
        if path and not os.path.exists(path):
            raise UsageError(f"{flag} {path}: no such file or folder")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    for flag, v in (("--repeats", args.repeats), ("--reference-repeats", args.reference_repeats)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    settings = settings_from_args(args)
    if args.ops < 1:
        raise UsageError(f"--ops must be >= 1, got {args.ops}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    if args.trace:
        parent = os.path.dirname(os.path.abspath(args.trace))
        if not os.path.isdir(parent):
            raise UsageError(f"--trace {args.trace}: folder {parent} does not exist")
        if os.path.isdir(args.trace):
            raise UsageError(f"--trace {args.trace} is a folder; give a file name")
        existed = os.path.exists(args.trace)
        try:  # a real open, as the write after the run will do (permission bits do not bind root)
            with open(args.trace, "a"):
                pass
        except OSError as e:
            raise UsageError(f"--trace {args.trace}: cannot write it ({e.strerror}); checked before the run") from None
        if not existed:
            os.unlink(args.trace)
    return settings


# ------------------------------------------------------------------ models


def build_models(args, device, dtype, need_reference: bool):
    """(pipeline, reference prior or None, reference tokenizer or None), all on the same weights."""
    from detailflow_engine.loading import load_prior, load_tokenizer, prepare_prior
    from detailflow_engine.pipeline import DetailFlowPipeline
    from detailflow_engine.tokenizer import Tokenizer
    from detailflow_ref.gpt import Transformer, load_prior_checkpoint
    from detailflow_ref.tokenizer import VQModel, load_tokenizer_checkpoint

    if args.random_weights is not None:
        from detailflow_engine.presets import preset_configs, randomize_
        from detailflow_engine.prior import Prior

        pcfg, tcfg = preset_configs(args.random_weights)
        ref_prior = randomize_(Transformer(pcfg), 0).eval()
        ref_tok = randomize_(VQModel(tcfg), 1).eval()
        prior = Prior(pcfg)
        prior.load_state_dict(ref_prior.state_dict())
        prior = prepare_prior(prior.to(device), dtype, args.weights)
        tok = Tokenizer(tcfg)
        tok.load_state_dict(ref_tok.state_dict())
        tok = tok.to(device=device, dtype=dtype).eval().requires_grad_(False)
    else:
        if args.ckpt:
            prior_path, tok_path = args.ckpt, args.tokenizer
        else:
            from detailflow_engine.assets import default_model_paths

            prior_path, tok_path = default_model_paths()
        prior = load_prior(prior_path, device=device, dtype=dtype, weights=args.weights)
        tok = load_tokenizer(tok_path, device=device, dtype=dtype)
        ref_prior = load_prior_checkpoint(prior_path) if need_reference else None
        ref_tok = load_tokenizer_checkpoint(tok_path) if need_reference else None
    pipe = DetailFlowPipeline(prior, tok)
    if not need_reference:
        return pipe, None, None
    # The reference runs in the engine's dtype (same weights, like for like).
    ref_prior = ref_prior.to(device=device, dtype=dtype).eval().requires_grad_(False)
    ref_tok = ref_tok.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return pipe, ref_prior, ref_tok


# ------------------------------------------------------------------ runs


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _activities(device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _exported(prof) -> dict:
    """The profile as its Chrome trace (what --trace writes and what the analysis reads)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        return analysis.load_trace(path)


def _timed(fn, device, repeats: int):
    """fn() `repeats` times without the profiler: the median-wall run's seconds and its stages'
    exclusive times (StageTimer); one run's stages always add up to its own wall time."""
    runs = []
    for _ in range(repeats):
        _sync(device)
        with timing(StageTimer()) as timer:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            runs.append((time.perf_counter() - t0, timer))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def _post_process(pixels: torch.Tensor, device):
    from detailflow_engine.outputs import to_uint8

    with Ranges(device)(stage_range("post-processing")):
        images = to_uint8(pixels).cpu().numpy()
    return images


def run_engine(pipe, labels, args, settings: SamplingSettings, counters: Counters):
    device = pipe.device
    kw = dict(settings.kwargs(), seed=0)

    def once():
        out = pipe.generate(labels, **kw)
        return out.tokens, _post_process(out.pixels, device)

    with profile_ranges(), instrument_engine(pipe, counters):
        for _ in range(args.warmup):
            once()
        counters.reset(active=False)
        wall, timer = _timed(once, device, args.repeats)
        counters.reset(active=True)
        with quiet_profiler_stderr(), \
                torch.profiler.profile(activities=_activities(device), record_shapes=True) as prof:
            with profiler_range(RUN_PREFIX + "engine"):
                tokens, images = once()
                _sync(device)
        counters.active = False
    return prof, wall, timer, tokens, images


def run_reference(ref_prior, ref_tok, labels, args, settings: SamplingSettings, device):
    from detailflow_ref.generate import generate as ref_generate
    from detailflow_ref.generate import official_sampler

    labels_t = torch.tensor(labels, dtype=torch.int64, device=device)
    sampler = sampling_range(official_sampler(settings.temperature, settings.top_k, settings.top_p), device)

    def once(num_tokens=None):
        with torch.inference_mode():
            tokens = ref_generate(ref_prior, labels_t, cfg_scale=settings.cfg_scale, sampler=sampler,
                                  num_tokens=num_tokens)
            pixels = ref_tok.decode_code(tokens)
        return tokens, _post_process(pixels, device)

    with instrument_reference(ref_prior, ref_tok, device):
        for _ in range(args.warmup):  # the reference is slow: warm up on the causal prefix only
            once(ref_prior.config.causal_num)
        wall, timer = _timed(once, device, args.reference_repeats)
        with quiet_profiler_stderr(), \
                torch.profiler.profile(activities=_activities(device), record_shapes=True) as prof:
            with profiler_range(RUN_PREFIX + "reference"):
                tokens, images = once()
                _sync(device)
    return prof, wall, timer, tokens, images




def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    settings = check_args(args)
    from detailflow_engine.device_dtype import resolve_device, resolve_dtype

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if args.random_weights in PRESET_PEAK_GB:
        print(f"note: --random-weights {args.random_weights} builds full-size models in memory; the profile "
              f"{preset_peak_text(args.random_weights, args.compare_reference)}", file=sys.stderr)
    try:
        pipe, ref_prior, ref_tok = build_models(args, device, dtype, args.compare_reference)
    except (FileNotFoundError, ValueError, KeyError) as exc:  # unreadable or mismatched checkpoints
        raise UsageError(str(exc)) from None

    cfg = pipe.prior.config
    labels = [(7 * i + 3) % cfg.num_classes for i in range(args.batch_size)]
    counters = Counters()
    floors_before = analysis.measure_floors(device, dtype)
    eprof, ewall, etimer, etokens, eimages = run_engine(pipe, labels, args, settings, counters)
    traces = [("engine", _exported(eprof))]
    eng = analysis.analyze(traces[0][1], "engine", ewall, etimer, counters)
    ref = None
    tokens_equal = None
    if ref_prior is not None:
        rprof, rwall, rtimer, rtokens, _ = run_reference(ref_prior, ref_tok, labels, args, settings, device)
        traces.append(("reference", _exported(rprof)))
        ref = analysis.analyze(traces[1][1], "reference", rwall, rtimer)
        eq = (rtokens.cpu() == etokens.cpu())
        tokens_equal = dict(identical=bool(eq.all()), equal_fraction=float(eq.float().mean()), count=eq.numel())

    floors = analysis.best_floors(floors_before, analysis.measure_floors(device, dtype))
    weight_bytes = analysis.streamed_weight_bytes(pipe.prior)
    dflops = analysis.decoder_flops(pipe.tokenizer, etokens)
    rows = args.batch_size * (2 if settings.use_cfg else 1)
    dec = pipe.tokenizer.decoder
    T, S = etokens.shape[1], eimages.shape[1]
    vq_bytes = args.batch_size * T * (pipe.tokenizer.config.codebook_embed_dim * 4 + 2 * dec.latent_pos_embed.shape[-1]
                                      * dec.latent_pos_embed.element_size())
    pixel_bytes = args.batch_size * 3 * S * S * (4 + 1)
    stage_floor = analysis.stage_floors(floors, plan=cfg.generation_plan(), causal_num=cfg.causal_num, rows=rows,
                                        vocab=cfg.vocab_size, weight_bytes=weight_bytes,
                                        weight_elems=analysis.linear_weight_elems(pipe.prior),
                                        decoder_flops=dflops, vq_bytes=vq_bytes, pixel_bytes=pixel_bytes)
    rep = build_report(args, device, dtype, pipe, eng, ref, floors, stage_floor, tokens_equal, weight_bytes, dflops)

    if args.trace:
        analysis.merge_traces(traces, args.trace)
        rep["trace"] = os.path.abspath(args.trace)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(format_text(rep, args.ops))
        if args.trace:
            print(f"\ntrace: {rep['trace']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
