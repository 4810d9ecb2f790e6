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

from detailflow_engine.profiling import analysis
from detailflow_engine.profiling.instrument import (RUN_PREFIX, STAGES, Counters, Ranges, StageTimer,
                                                    instrument_engine, instrument_reference, profile_ranges,
                                                    sampling_range, stage_range, timing)

EXIT_USAGE = 2
# About how much RAM a random-weights preset's profile needs at its peak, GB: (engine only, with
# --compare-reference). Measured (peak RSS, /usr/bin/time -v) on the 2-core CPU box, fp32, batch 1: 4.9 / 7.9.
PRESET_PEAK_GB = {"detailflow16": (5, 8)}


def _preset_peak_text(preset: str, with_reference: bool) -> str:
    alone, with_ref = PRESET_PEAK_GB[preset]
    return (f"peaks at about {with_ref} GB of RAM with --compare-reference (about {alone} GB without)"
            if with_reference else f"peaks at about {alone} GB of RAM (about {with_ref} GB with --compare-reference)")
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


def peak_rss_bytes() -> Optional[int]:
    """This process's peak resident memory so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


class UsageError(Exception):
    """Bad input: one ``error: ...`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m detailflow_engine.profile",
                description="Per-stage and per-op profile of DetailFlow generation, engine beside the reference.")
    m = p.add_argument_group("model (--ckpt and --tokenizer, or --random-weights, or neither: the embedded model)")
    m.add_argument("--ckpt", metavar="PATH", help="prior: model folder, .pt or .safetensors")
    m.add_argument("--tokenizer", metavar="PATH", help="tokenizer: model folder, .pt or .safetensors")
    m.add_argument("--random-weights", metavar="PRESET",
                   help="random weights in memory at a released size (detailflow16)")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="default: fp32")
    m.add_argument("--weights", default="native", choices=["native", "int8"],
                   help="prior weight format (default: native = --dtype)")
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


def check_args(args) -> None:
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
    if not 0 <= args.cfg_scale < float("inf"):  # NaN fails too
        raise UsageError(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    if not 0 <= args.temperature < float("inf"):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
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


# ------------------------------------------------------------------ models


def build_models(args, device, dtype, need_reference: bool):
    """(pipeline, reference prior or None, reference tokenizer or None), all on the same weights."""
    from detailflow_engine.loading import prepare_prior
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
        from detailflow_engine.loading import load_prior, load_tokenizer

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


def run_engine(pipe, labels, args, counters: Counters):
    device = pipe.device
    kw = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=0)

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
            with torch.profiler.record_function(RUN_PREFIX + "engine"):
                tokens, images = once()
                _sync(device)
        counters.active = False
    return prof, wall, timer, tokens, images


def run_reference(ref_prior, ref_tok, labels, args, device):
    from detailflow_ref.generate import generate as ref_generate
    from detailflow_ref.generate import official_sampler

    labels_t = torch.tensor(labels, dtype=torch.int64, device=device)
    sampler = sampling_range(official_sampler(args.temperature, args.top_k, args.top_p), device)

    def once(num_tokens=None):
        with torch.inference_mode():
            tokens = ref_generate(ref_prior, labels_t, cfg_scale=args.cfg_scale, sampler=sampler,
                                  num_tokens=num_tokens)
            pixels = ref_tok.decode_code(tokens)
        return tokens, _post_process(pixels, device)

    with instrument_reference(ref_prior, ref_tok, device):
        for _ in range(args.warmup):  # the reference is slow: warm up on the causal prefix only
            once(ref_prior.causal_num)
        wall, timer = _timed(once, device, args.reference_repeats)
        with quiet_profiler_stderr(), \
                torch.profiler.profile(activities=_activities(device), record_shapes=True) as prof:
            with torch.profiler.record_function(RUN_PREFIX + "reference"):
                tokens, images = once()
                _sync(device)
    return prof, wall, timer, tokens, images


# ------------------------------------------------------------------ report


def build_report(args, device, dtype, pipe, eng, ref, floors, stage_floor, tokens_equal, weight_bytes,
                 decoder_flops) -> dict:
    total_floor = sum(stage_floor.values())

    def side(prefix: str, run, stage: Optional[str]) -> dict:
        """Columns of one run: unprofiled (timed) ms and share, profiled ms and share, calls."""
        if stage is None:  # unattributed
            ms, pms = run.timed_unattributed_s * 1e3, run.unattributed_us / 1e3
        elif stage == "total":
            ms, pms = run.wall_s * 1e3, run.total_us / 1e3
        else:
            ms, pms = run.timed_stages_s[stage] * 1e3, run.stages_us[stage] / 1e3
        row = {f"{prefix}_ms": ms, f"{prefix}_share": ms / (run.wall_s * 1e3),
               f"{prefix}_profiled_ms": pms, f"{prefix}_profiled_share": pms / (run.total_us / 1e3)}
        if stage not in (None, "total"):
            row[f"{prefix}_calls"] = run.stage_calls[stage]
        return row

    def vs(ms: float, floor_s: float):
        return ms / 1e3 / floor_s if floor_s > 0 else None

    def low(x) -> bool:  # a stage faster than its floor: the floor, not the stage, is off
        return x is not None and x < 1.0

    stages = []
    for s in STAGES + (None, "total"):
        name = {None: "unattributed", "total": "total"}.get(s, s)
        floor_s = total_floor if s == "total" else stage_floor.get(s, 0.0)
        row = dict(stage=name, **side("engine", eng, s))
        if s is not None:
            row.update(floor_ms=floor_s * 1e3, engine_vs_floor=vs(row["engine_ms"], floor_s))
            row["floor_measured_low"] = low(row["engine_vs_floor"])
        if ref is not None:
            row.update(side("reference", ref, s))
            row["ratio"] = row["reference_ms"] / row["engine_ms"] if row["engine_ms"] > 0 and s is not None else None
            if s is not None:
                row["reference_vs_floor"] = vs(row["reference_ms"], floor_s)
                row["floor_measured_low"] = row["floor_measured_low"] or low(row["reference_vs_floor"])
        stages.append(row)
    cfg = pipe.prior.config
    report = dict(
        config=dict(model=args.random_weights and f"random {args.random_weights}" or args.ckpt or "embedded default",
                    device=str(device), dtype=str(dtype).replace("torch.", ""), weights=args.weights,
                    batch_size=args.batch_size, cfg_scale=args.cfg_scale, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, threads=torch.get_num_threads(), torch=torch.__version__,
                    repeats=args.repeats, reference_repeats=args.reference_repeats if ref is not None else None,
                    prior=dict(dim=cfg.dim, n_layer=cfg.n_layer, vocab=cfg.vocab_size, tokens=cfg.block_size,
                               group_size=cfg.group_size, causal_num=cfg.causal_num),
                    image_size=pipe.tokenizer.image_size),
        wall_s=dict(engine=eng.wall_s, reference=ref.wall_s if ref else None),
        profiled_s=dict(engine=eng.total_us / 1e6, reference=ref.total_us / 1e6 if ref else None),
        floors=dict(floors, weights_streamed_per_step_bytes=weight_bytes, decoder_flops=decoder_flops,
                    total_ms=total_floor * 1e3),
        stages=stages,
        memory=dict(peak_rss_bytes=peak_rss_bytes(),
                    preset_peak=(_preset_peak_text(args.random_weights, ref is not None)
                                 if args.random_weights in PRESET_PEAK_GB else None)),
        ops=dict(engine=eng.ops, reference=ref.ops if ref else None),
        gpu_kernels=dict(engine=eng.gpu_kernels, reference=ref.gpu_kernels if ref else None),
        tokens_identical=tokens_equal,
    )
    return report


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_pct(v) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _fmt_vs_floor(v) -> str:
    """engine/floor: below 1x the floor itself was measured low, and the cell says so."""
    return _fmt_x(v) + (" (floor measured low)" if v is not None and v < 1.0 else "")


def format_text(rep: dict, max_ops: int) -> str:
    c, fl = rep["config"], rep["floors"]
    has_ref = rep["ops"]["reference"] is not None
    lines = [f"# DetailFlow profile: {c['model']} ({c['prior']['n_layer']}x{c['prior']['dim']} prior, "
             f"{c['prior']['tokens']} tokens, {c['image_size']} px), batch {c['batch_size']}, cfg {c['cfg_scale']}, "
             f"top_k {c['top_k']}, {c['dtype']} ({c['weights']} weights), {c['device']}, {c['threads']} threads, "
             f"torch {c['torch']}",
             f"# stages: unprofiled runs (the median-wall one of {c['repeats']}"
             + (f" / {c['reference_repeats']}" if has_ref else "")
             + "; perf_counter at stage boundaries, exclusive); ops: one more run under torch.profiler "
             f"(its overhead included). wall: engine {rep['wall_s']['engine'] * 1e3:.1f} ms"
             + (f", reference {rep['wall_s']['reference'] * 1e3:.1f} ms "
                f"({rep['wall_s']['reference'] / rep['wall_s']['engine']:.2f}x)" if has_ref else "")
             + f"; under the profiler: engine {rep['profiled_s']['engine'] * 1e3:.1f} ms"
             + (f", reference {rep['profiled_s']['reference'] * 1e3:.1f} ms" if has_ref else ""),
             f"# floors (measured now, best of {fl.get('read_repeats', '?')} reads and "
             f"{fl.get('gemm_repeats', '?')} GEMMs, before and after the runs): read {fl['read_gbs']:.1f} GB/s, "
             f"GEMM {fl['gemm_gflops']:.0f} GFLOP/s "
             f"({fl['gemm_dtype']}, n={fl['gemm_n']}); prior weights streamed/step "
             f"{fl['weights_streamed_per_step_bytes'] / 1e6:.1f} MB; decoder {fl['decoder_flops'] / 1e9:.2f} GFLOP",
             _memory_line(rep.get("memory") or {}),
             ""]
    if has_ref:
        lines += ["| stage | engine ms | share | reference ms | share | ref/engine | floor ms | engine/floor "
                  "| ref/floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| stage | engine ms | share | floor ms | engine/floor |", "|---|---|---|---|---|"]
    for r in rep["stages"]:
        if has_ref:
            lines.append(f"| {r['stage']} | {_fmt_ms(r['engine_ms'])} | {_fmt_pct(r['engine_share'])} | "
                         f"{_fmt_ms(r.get('reference_ms'))} | {_fmt_pct(r.get('reference_share'))} | "
                         f"{_fmt_x(r.get('ratio'))} | {_fmt_ms(r.get('floor_ms'))} | "
                         f"{_fmt_vs_floor(r.get('engine_vs_floor'))} | {_fmt_vs_floor(r.get('reference_vs_floor'))} |")
        else:
            lines.append(f"| {r['stage']} | {_fmt_ms(r['engine_ms'])} | {_fmt_pct(r['engine_share'])} | "
                         f"{_fmt_ms(r.get('floor_ms'))} | {_fmt_vs_floor(r.get('engine_vs_floor'))} |")
    low = [r["stage"] for r in rep["stages"] if r.get("floor_measured_low")]
    if low:
        lines.append(f"\nfloor measured low for {', '.join(low)}: the stage ran faster than its floor, so the floor "
                     f"is an underestimate here (a neighbour slowed the floor measurement, or the stage's shapes "
                     f"beat the n={fl['gemm_n']} probe GEMM); read such a stage as at its floor, not below it")
    if has_ref:
        t = rep["tokens_identical"]
        lines.append(f"\ntokens identical (engine vs reference): {'yes' if t['identical'] else 'NO'} "
                     f"({t['equal_fraction'] * 100:.1f}% of {t['count']} tokens equal)")
    for run in ("engine", "reference"):
        ops = rep["ops"][run]
        if ops is None:
            continue
        lines += ["", f"## ops: {run}", "| op | kind | calls | ms | share | GB/s | GFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        total = sum(o["ms"] for o in ops) or 1.0
        shown = [o for o in ops if o["category"] != "other"]
        others = [o for o in ops if o["category"] == "other"]
        shown_other, rest = others[:max(0, max_ops - len(shown))], others[max(0, max_ops - len(shown)):]
        rows = [o for o in ops if o in shown or o in shown_other]
        for o in rows:
            gbs = "-" if o["gbs"] is None else f"{o['gbs']:.1f}"
            gflops = "-" if o["gflops"] is None else f"{o['gflops']:.1f}"
            lines.append(f"| {o['name']} | {o['category']} | {o['calls']} | {o['ms']:.2f} | "
                         f"{o['ms'] / total * 100:.1f}% | {gbs} | {gflops} |")
        if rest:
            ms = sum(o["ms"] for o in rest)
            lines.append(f"| other aten ops ({len(rest)} kinds) | other | {sum(o['calls'] for o in rest)} | {ms:.2f} | "
                         f"{ms / total * 100:.1f}% | - | - |")
        kernels = rep["gpu_kernels"][run]
        if kernels:  # CUDA: device time by kernel (CPU rows above are launch-side times)
            lines += ["", f"## GPU kernels: {run}", "| kernel | calls | device ms |", "|---|---|---|"]
            lines += [f"| {k['name'][:80]} | {k['calls']} | {k['ms']:.3f} |" for k in kernels]
    return "\n".join(lines)


def _memory_line(mem: dict) -> str:
    peak = mem.get("peak_rss_bytes")
    line = "# memory: peak RSS of this process " + ("unknown" if peak is None else f"{peak / 1e9:.1f} GB")
    if mem.get("preset_peak"):
        line += f"; this random-weights profile {mem['preset_peak']}"
    return line


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_args(args)
        from detailflow_engine.loading import resolve_device, resolve_dtype

        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
        if args.random_weights in PRESET_PEAK_GB:
            print(f"note: --random-weights {args.random_weights} builds full-size models in memory; the profile "
                  f"{_preset_peak_text(args.random_weights, args.compare_reference)}", file=sys.stderr)
        pipe, ref_prior, ref_tok = build_models(args, device, dtype, args.compare_reference)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, ValueError, KeyError) as exc:  # unreadable or mismatched checkpoints
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    cfg = pipe.prior.config
    labels = [(7 * i + 3) % cfg.num_classes for i in range(args.batch_size)]
    counters = Counters()
    floors_before = analysis.measure_floors(device, dtype)
    eprof, ewall, etimer, etokens, eimages = run_engine(pipe, labels, args, counters)
    traces = [("engine", _exported(eprof))]
    eng = analysis.analyze(traces[0][1], "engine", ewall, etimer, counters)
    ref = None
    tokens_equal = None
    if ref_prior is not None:
        rprof, rwall, rtimer, rtokens, _ = run_reference(ref_prior, ref_tok, labels, args, device)
        traces.append(("reference", _exported(rprof)))
        ref = analysis.analyze(traces[1][1], "reference", rwall, rtimer)
        eq = (rtokens.cpu() == etokens.cpu())
        tokens_equal = dict(identical=bool(eq.all()), equal_fraction=float(eq.float().mean()), count=eq.numel())

    floors = analysis.best_floors(floors_before, analysis.measure_floors(device, dtype))
    weight_bytes = analysis.streamed_weight_bytes(pipe.prior)
    dflops = analysis.decoder_flops(pipe.tokenizer, etokens)
    rows = args.batch_size * (2 if args.cfg_scale > 1.0 else 1)
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
