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

import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.code_search import (
    code_distances_ref, code_search, code_search_ref, tolerance)

try:
    from benchmarks._timing import DTYPES, bench, codebook_parser, cpu_backend, ms
except ImportError:  # python benchmarks/bench_code_search.py: sys.path has this folder, not the root
    from _timing import DTYPES, bench, codebook_parser, cpu_backend, ms


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
    p = codebook_parser(__doc__, dtype_help="latents and codebook dtype (math is fp32 either way); "
                                            "default float32 (CUDA: bfloat16 + one float32 line)")
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="default 128 1024 8192 (CUDA: 128 1024 8192 32768)")
    args = p.parse_args()
    if args.device == "cuda":
        main_cuda(args)
        return
    args.rows = args.rows or [128, 1024, 8192]
    args.dtype = args.dtype or ["float32"]
    print(cpu_backend(p, args, "code_search") + f", codebook {args.codebook}x{args.dim}")
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
            print(f"N={N:5d} K={args.codebook} D={args.dim} {dname:8s}  ours {ms(t_ours)}  "
                  f"torch {ms(t_torch)}  speedup {t_torch.median_s / t_ours.median_s:6.2f}x  "
                  f"{flops / t_ours.median_s / 1e9:6.1f} GFLOP/s  {check}")


if __name__ == "__main__":
    main()
