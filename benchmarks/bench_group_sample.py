"""Benchmark group_sample (fused CFG + temperature + top-k/top-p + seeded draw) against the
official torch composition, measured in the same process.

Official composition (autoregressive/models/generate.py `sample`, batched over all B*n_q rows,
which is faster than the official per-position loop): logits = u + s * (c - u);
logits / max(temperature, 1e-5); top_k_top_p_filtering; softmax; torch.multinomial
(detailflow_ref.sampling, which copies the logits instead of editing them in place).
GB/s = logits bytes read (R * n_q * V * itemsize) / median time.

    python benchmarks/bench_group_sample.py                     # DetailFlow-16 sizes, fp32
    python benchmarks/bench_group_sample.py --dtype bfloat16 --batch 8
    python benchmarks/bench_group_sample.py --device cuda --quick   # CUDA kernel, < 20 s

--device cuda: our CUDA kernel vs the same torch composition on CUDA (CFG mix, temperature,
top-k/top-p filter, softmax, torch.multinomial) at B*n_q rows 2 (B 2, n_q 1), 16 (B 2, n_q 8)
and 2048 (B 256, n_q 8), V = 8192, bf16 logits plus one fp32 line per size; CUDA-event timing.
"""
from __future__ import annotations

import argparse

import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.group_sample import group_sample, group_sample_ref
from detailflow_ref.sampling import sample as official_sample

try:
    from benchmarks._timing import bench
except ImportError:  # python benchmarks/bench_group_sample.py: sys.path has this folder, not the root
    from _timing import bench

SETTINGS = {  # name -> (cfg_scale, temperature, top_k, top_p)
    "plain": (1.45, 1.0, 0, 1.0),
    "top_k50": (1.45, 1.0, 50, 1.0),
    "top_p0.9": (1.45, 1.0, 0, 0.9),
}


def official(logits: torch.Tensor, B: int, cfg_scale, temperature, top_k, top_p) -> torch.Tensor:
    cond, uncond = logits[:B].float(), logits[B:].float()
    mixed = uncond + (cond - uncond) * cfg_scale
    idx, _ = official_sample(mixed.reshape(-1, mixed.shape[-1]), temperature=temperature,
                             top_k=top_k, top_p=top_p)
    return idx.view(B, -1)


CUDA_SHAPES = [(2, 1), (2, 8), (256, 8)]  # (B, n_q): B*n_q = 2, 16, 2048 rows, CFG (R = 2B)


def main_cuda(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    dev = torch.device("cuda")
    probe = (torch.zeros(2, 1, 4, device=dev), torch.zeros(1, dtype=torch.int64, device=dev),
             torch.zeros(1, dtype=torch.int64, device=dev))
    backend = _dispatch.pick("group_sample", *probe).name
    print(f"group_sample CUDA: backend={backend}, V={args.vocab}, CFG, {torch.cuda.get_device_name(dev)}, "
          f"torch {torch.__version__}")
    settings = ["top_k50"] if args.quick else args.settings
    target_s = 0.1 if args.quick else args.target_s
    for B, n_q in CUDA_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator(device=dev).manual_seed(B * 100 + n_q)
            logits = (torch.randn(2 * B, n_q, args.vocab, device=dev, generator=g) * 3).to(dtype)
            seeds = torch.arange(B, dtype=torch.int64, device=dev) * 7919 - 3
            positions = torch.arange(8, 8 + n_q, dtype=torch.int64, device=dev)
            nbytes = logits.numel() * logits.element_size()
            for name in settings if dtype == torch.bfloat16 else settings[:1]:
                s, t, k, p = SETTINGS[name]
                ours = bench(lambda: group_sample(logits, seeds, positions, cfg_scale=s, temperature=t,
                                                  top_k=k, top_p=p), device="cuda", target_s=target_s)
                base = bench(lambda: official(logits, B, s, t, k, p), device="cuda", target_s=target_s)
                print(f"rows={B * n_q:5d} (B={B:3d} n_q={n_q}) {str(dtype).replace('torch.', ''):8s} {name:9s} "
                      f"ours {ours.median_s * 1e6:8.1f} us ({nbytes / ours.median_s / 1e9:7.1f} GB/s)  "
                      f"torch {base.median_s * 1e6:8.1f} us ({nbytes / base.median_s / 1e9:7.1f} GB/s)  "
                      f"speedup {base.median_s / ours.median_s:6.1f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="images B (R = 2B rows, CFG)")
    ap.add_argument("--n-q", type=int, nargs="+", default=[1, 8], help="positions per step (1, then g = 8)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--with-ref", action="store_true", help="also time group_sample_ref")
    ap.add_argument("--target-s", type=float, default=0.5, help="timing budget per measurement")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="cuda: top_k50 only, short timings (< 20 s)")
    args = ap.parse_args()
    if args.device == "cuda":
        main_cuda(args)
        return

    dtype = getattr(torch, args.dtype)
    backend = _dispatch.pick("group_sample", torch.zeros(2, 1, 4), torch.zeros(1, dtype=torch.int64),
                             torch.zeros(1, dtype=torch.int64)).name
    print(f"group_sample: backend={backend}, V={args.vocab}, {args.dtype} logits, CFG, "
          f"threads={_dispatch.num_threads()}, torch {torch.__version__}")
    for B in args.batch:
        for n_q in args.n_q:
            R = 2 * B
            logits = (torch.randn(R, n_q, args.vocab) * 3).to(dtype)
            seeds = torch.arange(B, dtype=torch.int64) * 7919 - 3
            positions = torch.arange(8, 8 + n_q, dtype=torch.int64)
            nbytes = logits.numel() * logits.element_size()
            for name in args.settings:
                s, t, k, p = SETTINGS[name]
                ours = bench(lambda: group_sample(logits, seeds, positions, cfg_scale=s, temperature=t,
                                                  top_k=k, top_p=p), target_s=args.target_s)
                base = bench(lambda: official(logits, B, s, t, k, p), target_s=args.target_s)
                line = (f"B={B:3d} n_q={n_q} {name:9s} ours {ours.median_s * 1e3:8.3f} ms "
                        f"({nbytes / ours.median_s / 1e9:6.2f} GB/s)  official {base.median_s * 1e3:8.3f} ms "
                        f"({nbytes / base.median_s / 1e9:6.2f} GB/s)  speedup {base.median_s / ours.median_s:6.1f}x")
                if args.with_ref:
                    ref = bench(lambda: group_sample_ref(logits, seeds, positions, cfg_scale=s, temperature=t,
                                                         top_k=k, top_p=p), target_s=args.target_s)
                    line += f"  ref {ref.median_s * 1e3:8.3f} ms"
                print(line, flush=True)


if __name__ == "__main__":
    main()
