"""decode_gemm vs F.linear at the prior's decode shapes: GB/s of weights streamed.

Shapes default to GPT-L's matrices (N x K: wqkv 3072x1024, wo 1024x1024, w1/w3 2816x1024,
w2 1024x2816, output 8192x1024), rows M to 2 (batch 1 with CFG, single-token steps) and 16 (a
group of 8 with CFG). Each timed call multiplies M rows by every one of enough weight copies
to exceed the caches (>= 256 MB; the prior streams 24 layers), so the weights come from DRAM
as in a decode step. GB/s = N * K * bytes per weight / time per matrix. Ours and torch
(F.linear on the same dtype) run side by side in one process, and the fraction is of a plain
read of a 512 MB tensor measured in the same run (benchmarks/_timing.read_bandwidth_gbs).

    python benchmarks/bench_decode_gemm.py                  # the table
    python benchmarks/bench_decode_gemm.py --crossover      # ours vs F.linear over M (DecodeLinear's MAX_ROWS)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import bench, read_bandwidth_gbs  # noqa: E402
from detailflow_engine.ops import _dispatch  # noqa: E402
from detailflow_engine.ops.decode_gemm import decode_gemm, pack_weight  # noqa: E402

GPT_L = {"wqkv": (3072, 1024), "wo": (1024, 1024), "w1/w3": (2816, 1024), "w2": (1024, 2816),
         "output": (8192, 1024)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def variant(dtype: torch.dtype) -> str:
    """Which inner loop the CPU kernel runs for x and W of this dtype (a 1x1 call)."""
    ext = _dispatch.extension()
    if not (_dispatch.has_cpu_kernels() and hasattr(ext, "decode_gemm")):
        return "torch fallback (no _C)"
    x, y, p = torch.ones(1, 1, dtype=dtype), torch.empty(1, 1, dtype=dtype), pack_weight(torch.ones(1, 1, dtype=dtype))
    code = _dispatch.DTYPE_CODES[dtype]
    return ext.decode_gemm(x.data_ptr(), 1, 1, 1, code, p.packed.data_ptr(), p.packed.numel(), code, 1,
                           y.data_ptr(), 1, 1)


def weight_set(N: int, K: int, dtype: torch.dtype, min_bytes: int):
    per = N * K * torch.finfo(dtype).bits // 8
    copies = max(2, -(-min_bytes // per))
    ws = [(torch.randn(N, K) * K ** -0.5).to(dtype) for _ in range(copies)]
    return ws, [pack_weight(w) for w in ws], per


def time_pair(M, N, K, dtype, min_bytes, target_s):
    """(ours s, torch s) per matrix, M rows, weights streamed from DRAM."""
    ws, packed, per = weight_set(N, K, dtype, min_bytes)
    x = torch.randn(M, K).to(dtype)
    out = torch.empty(M, N, dtype=dtype)
    ours = bench(lambda: [decode_gemm(x, p, out=out) for p in packed], target_s=target_s)
    ref = bench(lambda: [F.linear(x, w) for w in ws], target_s=target_s)
    n = len(ws)
    return ours.median_s / n, ref.median_s / n, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16], help="activation rows M")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--shapes", nargs="+", default=list(GPT_L), choices=list(GPT_L))
    ap.add_argument("--min-mb", type=int, default=256, help="weight copies per timed call, in MB (> caches)")
    ap.add_argument("--target-s", type=float, default=0.3, help="timing target per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (ours follows it)")
    ap.add_argument("--crossover", action="store_true",
                    help="sum over the shapes for M in 16..256: where F.linear starts to win")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = read_bandwidth_gbs()
    print(f"# threads={torch.get_num_threads()} read_bw={bw:.1f} GB/s (plain 512 MB read, same run); "
          f"weights >= {args.min_mb} MB per timed call")
    min_bytes = args.min_mb << 20
    if args.crossover:
        print("| dtype | M | ours ms (5 matrices) | torch ms | torch/ours |")
        print("|---|---|---|---|---|")
        for name in args.dtypes:
            dtype = DTYPES[name]
            for M in (16, 32, 48, 64, 96, 128, 192, 256):
                ours = ref = 0.0
                for s in args.shapes:
                    o, r, _ = time_pair(M, *GPT_L[s], dtype, min_bytes // 2, args.target_s / 2)
                    ours, ref = ours + o, ref + r
                print(f"| {name} | {M} | {ours * 1e3:.2f} | {ref * 1e3:.2f} | {ref / ours:.2f}x |", flush=True)
        return
    print("| dtype | M | matrix N x K | ours us | ours GB/s | of read bw | torch us | torch GB/s | speed-up | inner loop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = DTYPES[name]
        loop = variant(dtype)
        for M in args.rows:
            for s in args.shapes:
                N, K = GPT_L[s]
                o, r, per = time_pair(M, N, K, dtype, min_bytes, args.target_s)
                print(f"| {name} | {M} | {s} {N}x{K} | {o * 1e6:.0f} | {per / o / 1e9:.1f} | "
                      f"{per / o / 1e9 / bw * 100:.0f}% | {r * 1e6:.0f} | {per / r / 1e9:.1f} | {r / o:.2f}x | {loop} |",
                      flush=True)
    print(f"# read_bw at the end: {read_bandwidth_gbs():.1f} GB/s")


if __name__ == "__main__":
    main()
