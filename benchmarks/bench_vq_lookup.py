"""vq_lookup vs the torch composition F.linear(F.normalize(codebook[codes]), weight, bias) + pos[:T].

Defaults are the real DetailFlow decode shapes: codebook 8192 x 8, T = 128 tokens, decoder
width C = 768 (siglip2_base from scratch) and 1152 (so400m-initialized), batch 1..64.
One line per config: our time, the torch composition's time (same process; median, and min in
parentheses: on a shared machine the min is the uncontended speed), their ratio, and our
achieved bandwidth, bytes = B*T*C*out_elt (output) + T*C*w_elt (pos_embed) + B*T*(8 + D*e_elt)
(codes + gathered rows) + C*(D+1)*w_elt (weight, bias).

  python benchmarks/bench_vq_lookup.py [--batch 1 16 64] [--width 768 1152] [--dtype float32 bfloat16]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench  # noqa: E402

from detailflow_engine.ops import _dispatch  # noqa: E402
from detailflow_engine.ops.vq_lookup import tolerance, vq_lookup, vq_lookup_ref  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _ms(t) -> str:
    return f"{t.median_s * 1e3:8.3f} ms (min {t.min_s * 1e3:.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--tokens", type=int, nargs="+", default=[128])
    p.add_argument("--width", type=int, nargs="+", default=[768, 1152])
    p.add_argument("--codebook", type=int, default=8192)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--target-s", type=float, default=0.5, help="timing budget per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backend = "cpu" if _dispatch.has_cpu_kernels() else "torch (no _C: fallback)"
    print(f"vq_lookup: backend {backend}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"codebook {args.codebook}x{args.dim} fp32")
    g = torch.Generator().manual_seed(0)
    for dname in args.dtype:
        dtype = DTYPES[dname]
        for C in args.width:
            cb = torch.randn(args.codebook, args.dim, generator=g)
            w = (torch.randn(C, args.dim, generator=g) * 0.3).to(dtype)
            bias = (torch.randn(C, generator=g) * 0.1).to(dtype)
            for T in args.tokens:
                pos = (torch.randn(1, T, C, generator=g) * 0.02).to(dtype)
                for B in args.batch:
                    codes = torch.randint(0, args.codebook, (B, T), generator=g)
                    ours = vq_lookup(codes, cb, w, bias, pos)
                    ref = vq_lookup_ref(codes, cb, w, bias, pos)
                    atol, rtol = tolerance(dtype)
                    err = (ours.float() - ref.float()).abs().max().item()
                    t_ours = bench(lambda: vq_lookup(codes, cb, w, bias, pos), target_s=args.target_s)
                    t_torch = bench(lambda: vq_lookup_ref(codes, cb, w, bias, pos, upcast=False),
                                    target_s=args.target_s)
                    e_out = torch.empty((), dtype=dtype).element_size()
                    nbytes = (B * T * C * e_out + T * C * e_out + B * T * (8 + args.dim * 4)
                              + C * (args.dim + 1) * e_out)
                    ok = err <= atol + rtol * ref.float().abs().max().item()
                    print(f"B={B:3d} T={T} C={C:4d} {dname:8s}  ours {_ms(t_ours)}  torch {_ms(t_torch)}  "
                          f"speedup {t_torch.median_s / t_ours.median_s:5.2f}x  "
                          f"{nbytes / t_ours.median_s / 1e9:6.1f} GB/s  max|err| {err:.1e}"
                          f"{'' if ok else '  (OVER TOLERANCE)'}")


if __name__ == "__main__":
    main()
