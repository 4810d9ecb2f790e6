"""Reference trainer step time: fp32 vs ``--cpu-bf16`` (bf16 autocast + math attention), one process.

The embedded default model's shapes, batch 128: the tokenizer (32x32, patch 4, 32 tokens,
siglip2_custom_L4_D128_H4 towers) on a full-resolution step with a self-correction perturbation
(the costliest kind: two encodes, decoder on the doubled batch), and the prior
(GPT-custom-L6-D256-H8, 32 tokens, group 4) on random codes. Both settings build
the same initial weights and alternate step by step, so machine load hits both alike; the median
over --steps timed steps (after one warm-up each) is reported.

    python benchmarks/bench_train_step.py               # 2 threads, median of 5
    python benchmarks/bench_train_step.py --threads 1 --steps 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from detailflow_ref import train_prior as tp
from detailflow_ref import train_tokenizer as tt

TOKENIZER = ["--device", "cpu", "--mixed-precision", "none", "--image-size", "32", "--encoder-patch-size", "4",
             "--decoder-patch-size", "4", "--num-latent-tokens", "32", "--group-size", "4", "--codebook-size", "1024",
             "--encoder-model", "siglip2_custom_L4_D128_H4", "--decoder-model", "siglip2_custom_L4_D128_H4",
             "--global-batch-size", "128", "--data", "synthetic:8", "--no-progress"]


def tokenizer_steppers(folder: Path):
    images = torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plan = tt.StepPlan(32, 32, 32, 32, False, 8)
    out = {}
    for name, extra in (("fp32", []), ("cpu-bf16", ["--cpu-bf16"])):
        trainer = tt.TokenizerTrainer(tt.parse_args(["--results-dir", str(folder / name), *TOKENIZER, *extra]))
        out[name] = lambda trainer=trainer: trainer.train_step(images, plan)
    return out


def prior_steppers(folder: Path):
    gen = torch.Generator().manual_seed(0)
    n, T, g = 256, 32, 4
    data = {"meta": {"num_classes": 10}, "labels": torch.randint(0, 10, (n,), generator=gen).numpy(),
            "config": {"codebook_size": 1024, "group_size": g, "causal_num": g, "ar_token_num": T},
            "codes": torch.randint(0, 1024, (n, 1, T, 3), generator=gen).numpy()}
    out = {}
    for name, extra in (("fp32", []), ("cpu-bf16", ["--cpu-bf16"])):
        args = tp.parse_args(["--results-dir", str(folder / f"prior-{name}"), "--code-path", "unused",
                              "--gpt-model", "GPT-custom-L6-D256-H8", "--device", "cpu", "--mixed-precision", "none",
                              "--global-batch-size", "128", "--no-progress", *extra])
        trainer = tp.PriorTrainer(args, codes=data)
        z_in, z_tgt = tp.generate_z_input_target(trainer.codes[:128], g, 0.3)
        labels = trainer.labels[:128]
        out[name] = lambda trainer=trainer: trainer.train_step(z_in, z_tgt, labels)
    return out


def measure(steppers: dict, steps: int) -> dict:
    times = {k: [] for k in steppers}
    for k, fn in steppers.items():
        fn()  # warm-up
    for _ in range(steps):
        for k, fn in steppers.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default="/tmp/bench_train_step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"# trainer step, batch 128, {args.threads} threads, median of {args.steps}, torch {torch.__version__}")
    print("| model | fp32 s/step | --cpu-bf16 s/step | speed-up |")
    print("|---|---|---|---|")
    for name, make in (("tokenizer (L4 D128 x2, self-correction step)", tokenizer_steppers),
                       ("prior (GPT-custom-L6-D256-H8)", prior_steppers)):
        t = measure(make(folder), args.steps)
        print(f"| {name} | {t['fp32']:.2f} | {t['cpu-bf16']:.2f} | {t['fp32'] / t['cpu-bf16']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
