"""vq_lookup vs the torch composition F.linear(F.normalize(codebook[codes]), weight, bias) + pos[:T].

Defaults are the real DetailFlow decode shapes: codebook 8192 x 8, T = 128 tokens, decoder
width C = 768 (siglip2_base from scratch) and 1152 (so400m-initialized), batch 1..64.
One line per config: our time, the torch composition's time (same process; median, and min in
parentheses: on a shared machine the min is the uncontended speed), their ratio, and our
achieved bandwidth, bytes = B*T*C*out_elt (output) + T*C*w_elt (pos_embed) + B*T*(8 + D*e_elt)
(codes + gathered rows) + C*(D+1)*w_elt (weight, bias).

  python benchmarks/bench_vq_lookup.py [--batch 1 16 64] [--width 768 1152] [--dtype float32 bfloat16]

CUDA (csrc/cuda/vq_lookup.cu vs the same torch composition on the GPU, CUDA-event timing):
  python benchmarks/bench_vq_lookup.py --device cuda --quick    # < 20 s: C = 1024, B = 1, 256 bf16 + one fp32 line
  python benchmarks/bench_vq_lookup.py --device cuda            # B = 1..256, C = 768 / 1024 / 1152, bf16 + fp32 line
On CUDA each line gives our op as called (`op`: the wrapper's code range check reads the codes'
min/max back to the host, one synchronization, skipped inside CUDA graphs), our kernel alone
(`kernel`: the backend on a preallocated out, what a captured graph replays), the torch
composition, the ratio torch / kernel, and the kernel's GB/s (same bytes formula).
"""
from __future__ import annotations

import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.vq_lookup import tolerance, vq_lookup, vq_lookup_ref

try:
    from benchmarks._timing import DTYPES, bench, codebook_parser, cpu_backend, ms
except ImportError:  # python benchmarks/bench_vq_lookup.py: sys.path has this folder, not the root
    from _timing import DTYPES, bench, codebook_parser, cpu_backend, ms


def _nbytes(B, T, C, D, dtype) -> int:
    e_out = torch.empty((), dtype=dtype).element_size()
    return B * T * C * e_out + T * C * e_out + B * T * (8 + D * 4) + C * (D + 1) * e_out


def main_cuda(args) -> None:
    """CUDA kernel vs the torch composition on the GPU: bf16 configs, then one fp32 line."""
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dev = torch.device("cuda")
    out_dummy = torch.empty(1, 1, 1, dtype=torch.bfloat16, device=dev)
    probe = (torch.zeros(1, 1, dtype=torch.int64, device=dev), torch.ones(1, args.dim, device=dev),
             torch.ones(1, args.dim, dtype=torch.bfloat16, device=dev), None, None, out_dummy)
    backend = _dispatch.pick("vq_lookup", *probe).name
    print(f"vq_lookup: backend {backend}, {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
          f"codebook {args.codebook}x{args.dim} fp32, T={args.tokens}")
    batches, widths = (args.batch or ([1, 256] if args.quick else [1, 16, 64, 256]),
                       args.width or ([1024] if args.quick else [768, 1024, 1152]))
    configs = [(B, C, "bfloat16") for C in widths for B in batches]
    configs.append((max(batches), widths[-1], "float32"))
    if args.dtype:
        configs = [(B, C, d) for C in widths for B in batches for d in args.dtype]
    target = 0.1 if args.quick else args.target_s
    g = torch.Generator(device=dev).manual_seed(0)
    cb = torch.randn(args.codebook, args.dim, generator=g, device=dev)
    for B, C, dname in configs:
        dtype = DTYPES[dname]
        w = (torch.randn(C, args.dim, generator=g, device=dev) * 0.3).to(dtype)
        bias = (torch.randn(C, generator=g, device=dev) * 0.1).to(dtype)
        for T in args.tokens:
            pos = (torch.randn(1, T, C, generator=g, device=dev) * 0.02).to(dtype)
            codes = torch.randint(0, args.codebook, (B, T), generator=g, device=dev)
            out = torch.empty(B, T, C, dtype=dtype, device=dev)
            kernel = _dispatch.pick("vq_lookup", codes, cb, w, bias, pos[0], out).fn
            ours = vq_lookup(codes, cb, w, bias, pos)
            ref = vq_lookup_ref(codes, cb, w, bias, pos)
            atol, rtol = tolerance(dtype)
            err = (ours.float() - ref.float()).abs().max().item()
            ok = err <= atol + rtol * ref.float().abs().max().item()
            t_op = bench(lambda: vq_lookup(codes, cb, w, bias, pos), device="cuda", target_s=target)
            t_k = bench(lambda: kernel(codes, cb, w, bias, pos[0], out), device="cuda", target_s=target)
            t_torch = bench(lambda: vq_lookup_ref(codes, cb, w, bias, pos, upcast=False), device="cuda",
                            target_s=target)
            print(f"B={B:3d} T={T} C={C:4d} {dname:8s}  op {t_op.median_s * 1e6:8.1f} us  "
                  f"kernel {t_k.median_s * 1e6:8.1f} us  torch {t_torch.median_s * 1e6:8.1f} us  "
                  f"speedup {t_torch.median_s / t_k.median_s:5.2f}x  "
                  f"{_nbytes(B, T, C, args.dim, dtype) / t_k.median_s / 1e9:7.1f} GB/s  max|err| {err:.1e}"
                  f"{'' if ok else '  (OVER TOLERANCE)'}")


def main() -> None:
    p = codebook_parser(__doc__, dtype_help="default float32 bfloat16 (CUDA: bfloat16 + one float32 line)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 16 64 (CUDA: 1 16 64 256)")
    p.add_argument("--tokens", type=int, nargs="+", default=[128])
    p.add_argument("--width", type=int, nargs="+", default=None, help="default 768 1152 (CUDA: 768 1024 1152)")
    args = p.parse_args()
    if args.device == "cuda":
        main_cuda(args)
        return
    args.batch = args.batch or [1, 16, 64]
    args.width = args.width or [768, 1152]
    args.dtype = args.dtype or ["float32", "bfloat16"]
    print(cpu_backend(p, args, "vq_lookup") + f", codebook {args.codebook}x{args.dim} fp32")
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
                    nbytes = _nbytes(B, T, C, args.dim, dtype)
                    ok = err <= atol + rtol * ref.float().abs().max().item()
                    print(f"B={B:3d} T={T} C={C:4d} {dname:8s}  ours {ms(t_ours)}  torch {ms(t_torch)}  "
                          f"speedup {t_torch.median_s / t_ours.median_s:5.2f}x  "
                          f"{nbytes / t_ours.median_s / 1e9:6.1f} GB/s  max|err| {err:.1e}"
                          f"{'' if ok else '  (OVER TOLERANCE)'}")


if __name__ == "__main__":
    main()
