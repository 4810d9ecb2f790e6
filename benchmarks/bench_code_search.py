"""code_search vs the official composition argmin(|z|^2 + |e|^2 - 2 z @ e.T) (z, e normalized).

Defaults are the real DetailFlow encode shapes: codebook 8192 x 8, N = 128 latents (one image),
1024 (8 images) and 8192 (64 images). One line per config: our time, the torch composition's
time (code_search_ref, measured in the same process; median, and min in parentheses: on a shared
machine the min is the uncontended speed), their ratio, and our achieved
GFLOP/s = 2*N*K*D / time (the dot products; the compare/select work is not counted).
The torch composition materializes the N x K distance matrix (256 MiB at N = 8192).

  python benchmarks/bench_code_search.py [--rows 128 1024 8192] [--codebook 8192] [--dtype float32]

CUDA (csrc/cuda/code_search.cu vs the same torch composition on the GPU, CUDA-event timing):
  python benchmarks/bench_code_search.py --device cuda --quick   # < 20 s: N = 128, 32768 bf16 + one fp32 line
  python benchmarks/bench_code_search.py --device cuda           # N = 128 .. 32768 (1 .. 256 images) bf16 + fp32
On CUDA each line adds GB/s = (N*D + K*D)*elt + 8*N bytes (inputs read once, indices written) / time,
next to GFLOP/s: the op is compute-bound, so GFLOP/s is the number that matters.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench  # noqa: E402

from detailflow_engine.ops import _dispatch  # noqa: E402
from detailflow_engine.ops.code_search import (  # noqa: E402
    code_distances_ref, code_search, code_search_ref, tolerance)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ms(t) -> str:
    return f"{t.median_s * 1e3:8.3f} ms (min {t.min_s * 1e3:.3f})"


def _check(latents, codebook, ours, ref, dtype) -> str:
    differ = ours != ref
    if not differ.any():
        return "indices equal"
    # allowed only for distance ties within tolerance
    d = code_distances_ref(latents[differ], codebook)
    rows = torch.arange(d.shape[0], device=d.device)
    gap = (d[rows, ours[differ]] - d[rows, ref[differ]]).abs().max().item()
    verdict = "" if gap <= tolerance(dtype)[0] else " (WRONG)"
    return f"{int(differ.sum())} tie(s), gap {gap:.1e}{verdict}"


def main_cuda(args) -> None:
    """CUDA kernel vs the torch composition on the GPU: bf16 configs, then one fp32 line."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dev = torch.device("cuda")
    probe = (torch.ones(1, args.dim, device=dev), torch.ones(1, args.dim, device=dev),
             torch.empty(1, dtype=torch.int64, device=dev))
    print(f"code_search: backend {_dispatch.pick('code_search', *probe).name}, "
          f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, codebook {args.codebook}x{args.dim}")
    rows = args.rows or ([128, 32768] if args.quick else [128, 1024, 8192, 32768])
    configs = [(N, "bfloat16") for N in rows] + [(max(rows), "float32")]
    if args.dtype:
        configs = [(N, d) for d in args.dtype for N in rows]
    target = 0.1 if args.quick else args.target_s
    g = torch.Generator(device=dev).manual_seed(0)
    for N, dname in configs:
        dtype = DTYPES[dname]
        codebook = torch.randn(args.codebook, args.dim, generator=g, device=dev).to(dtype)
        latents = torch.randn(N, args.dim, generator=g, device=dev).to(dtype)
        check = _check(latents, codebook, code_search(latents, codebook), code_search_ref(latents, codebook), dtype)
        t_ours = bench(lambda: code_search(latents, codebook), device="cuda", target_s=target)
        t_torch = bench(lambda: code_search_ref(latents, codebook), device="cuda", target_s=target)
        flops = 2 * N * args.codebook * args.dim
        nbytes = (N + args.codebook) * args.dim * latents.element_size() + 8 * N
        print(f"N={N:5d} K={args.codebook} D={args.dim} {dname:8s}  ours {t_ours.median_s * 1e6:8.1f} us  "
              f"torch {t_torch.median_s * 1e6:8.1f} us  speedup {t_torch.median_s / t_ours.median_s:6.2f}x  "
              f"{flops / t_ours.median_s / 1e9:8.1f} GFLOP/s  {nbytes / t_ours.median_s / 1e9:6.1f} GB/s  {check}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CUDA: few configs, short timing (< 20 s)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="default 128 1024 8192 (CUDA: 128 1024 8192 32768)")
    p.add_argument("--codebook", type=int, default=8192)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                   help="latents and codebook dtype (math is fp32 either way); default float32 "
                        "(CUDA: bfloat16 + one float32 line)")
    p.add_argument("--target-s", type=float, default=0.5, help="timing budget per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: torch's)")
    args = p.parse_args()
    if args.device == "cuda":
        main_cuda(args)
        return
    args.rows = args.rows or [128, 1024, 8192]
    args.dtype = args.dtype or ["float32"]
    if "float16" in args.dtype:
        p.error("--dtype float16 needs --device cuda (the CPU op takes float32 and bfloat16)")
    if args.threads:
        torch.set_num_threads(args.threads)

    backend = "cpu" if _dispatch.has_cpu_kernels() else "torch (no _C: fallback)"
    print(f"code_search: backend {backend}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"codebook {args.codebook}x{args.dim}")
    g = torch.Generator().manual_seed(0)
    for dname in args.dtype:
        dtype = DTYPES[dname]
        codebook = torch.randn(args.codebook, args.dim, generator=g).to(dtype)
        for N in args.rows:
            latents = torch.randn(N, args.dim, generator=g).to(dtype)
            check = _check(latents, codebook, code_search(latents, codebook), code_search_ref(latents, codebook), dtype)
            t_ours = bench(lambda: code_search(latents, codebook), target_s=args.target_s)
            t_torch = bench(lambda: code_search_ref(latents, codebook), target_s=args.target_s)
            flops = 2 * N * args.codebook * args.dim
            print(f"N={N:5d} K={args.codebook} D={args.dim} {dname:8s}  ours {_ms(t_ours)}  "
                  f"torch {_ms(t_torch)}  speedup {t_torch.median_s / t_ours.median_s:6.2f}x  "
                  f"{flops / t_ours.median_s / 1e9:6.1f} GFLOP/s  {check}")


if __name__ == "__main__":
    main()
