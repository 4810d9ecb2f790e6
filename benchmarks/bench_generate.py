"""End to end: engine (KV cache + our kernels) vs the reference generation (official semantics).

Same random weights at DetailFlow-16 size (GPT-L prior, SigLIP2-base decoder at 256 px), same
labels, CFG 1.45, greedy (top_k=1) so both make the same tokens; generation + decode per image,
timed in one process. Prints a table row per batch size: seconds per image, the ratio, peak RSS,
and the engine's fraction of the weight-bandwidth floor measured in the same run.

    python benchmarks/bench_generate.py --batch 1 8
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import read_bandwidth_gbs  # noqa: E402
from detailflow_engine.pipeline import DetailFlowPipeline  # noqa: E402
from detailflow_engine.presets import preset_configs, randomize_  # noqa: E402
from detailflow_engine.prior import Prior, step_plan  # noqa: E402
from detailflow_engine.tokenizer import Tokenizer  # noqa: E402
from detailflow_ref.generate import generate as ref_generate  # noqa: E402
from detailflow_ref.gpt import Transformer  # noqa: E402
from detailflow_ref.tokenizer import VQModel  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def build(preset: str, dtype: torch.dtype, seed: int):
    pcfg, tcfg = preset_configs(preset)
    ref_prior = randomize_(Transformer(pcfg), seed).eval()
    ref_tok = randomize_(VQModel(tcfg), seed + 1).eval()
    prior = Prior(pcfg)
    prior.load_state_dict(ref_prior.state_dict())
    tok = Tokenizer(tcfg)
    tok.load_state_dict(ref_tok.state_dict())
    pipe = DetailFlowPipeline(prior.to(dtype).eval(), tok.to(dtype).eval())
    return ref_prior, ref_tok, pipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="detailflow16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--cfg-scale", type=float, default=1.45)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="engine repeats (median); the reference runs once")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    ref_prior, ref_tok, pipe = build(args.preset, dtype, 0)
    pcfg = pipe.prior.config
    weight_bytes = sum(p.numel() * p.element_size() for n, p in pipe.prior.named_parameters()
                       if "embed" not in n)  # streamed per step (embeddings are gathered, not streamed)
    steps = len(step_plan(pcfg))
    bw = read_bandwidth_gbs()
    print(f"# preset={args.preset} dtype={args.dtype} threads={torch.get_num_threads()} steps={steps} "
          f"prior weights streamed/step={weight_bytes / 1e6:.0f} MB read_bw={bw:.1f} GB/s")
    print("| batch | engine s/img | reference s/img | ratio | tokens equal | floor s/img | engine/floor | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batch:
        labels = [(7 * i + 3) % pcfg.num_classes for i in range(b)]
        pipe.generate(labels[:1], cfg_scale=args.cfg_scale, top_k=1, num_tokens=pcfg.causal_num)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = pipe.generate(labels, cfg_scale=args.cfg_scale, top_k=1)
            times.append(time.perf_counter() - t0)
        eng = sorted(times)[len(times) // 2] / b
        ref_s, equal = float("nan"), "-"
        if not args.skip_reference:
            with torch.inference_mode():
                t0 = time.perf_counter()
                tokens = ref_generate(ref_prior, torch.tensor(labels), cfg_scale=args.cfg_scale, top_k=1)
                ref_tok.decode_code(tokens)
                ref_s = (time.perf_counter() - t0) / b
            equal = f"{(tokens == out.tokens).float().mean().item() * 100:.1f}%"
        floor = steps * weight_bytes / (bw * 1e9) / b
        print(f"| {b} | {eng:.3f} | {ref_s:.3f} | {ref_s / eng:.2f}x | {equal} | {floor:.3f} | "
              f"{floor / eng * 100:.0f}% | {peak_rss_gb():.1f} |", flush=True)


if __name__ == "__main__":
    main()
