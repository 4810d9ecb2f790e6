"""decode_gemm vs F.linear at the prior's decode shapes: GB/s of weights streamed.

Shapes default to GPT-L's matrices (N x K: wqkv 3072x1024, wo 1024x1024, w1/w3 2816x1024,
w2 1024x2816, output 8192x1024), rows M to 2 (batch 1 with CFG, single-token steps) and 16 (a
group of 8 with CFG). Each timed call multiplies M rows by every one of enough weight copies
to exceed the caches (>= 256 MB; the prior streams 24 layers), so the weights come from DRAM
as in a decode step. GB/s = N * K * bytes per weight / time per matrix. Ours and torch
(F.linear on the same dtype) run side by side in one process, and the fraction is of a plain
read of a 512 MB tensor measured in the same run (benchmarks/_timing.read_bandwidth_gbs).

    python benchmarks/bench_decode_gemm.py                  # the table (fp32, bf16, int8 weights)
    python benchmarks/bench_decode_gemm.py --crossover      # ours vs F.linear over M (DecodeLinear's MAX_ROWS)
    python benchmarks/bench_decode_gemm.py --device cuda --quick   # GPU vs cuBLAS, < 20 s
    python benchmarks/bench_decode_gemm.py --low-precision  # issue 22: bf16 vs int8 vs int4 (bf16 x)

--low-precision: one DetailFlow-16 (GPT-L) block's five matrices (wqkv, wo, w1, w3, w2) per
timed item, bf16 x, M in {2, 16, 128}, weights bf16 / int8 (per-row scales) / int4 (group 64
and 128) / w8a8 (int8 weights and per-row int8 activations, VNNI: ops.decode_gemm_w8a8) / w4a8
(int4 group-64 weights and per-row int8 activations, VNNI: ops.decode_gemm_w4a8); GB/s counts each
format's own bytes (int4, w4a8: half a byte a weight + 4 bytes a group; w8a8: + 4 bytes a row of
column sums),
"vs bf16" is the bf16 time over this format's at the same M, and the floor is the time to read
the format's bytes at the plain read bandwidth measured in the same run (before and after).

int8 (weight-only, per-row scales): x fp32 on the CPU, bf16 on CUDA; GB/s counts the int8
bytes; the torch peer is gpt-fast's WeightOnlyInt8Linear, F.linear(x, Q.to(x.dtype)) * scales.

--device cuda: our CUDA kernel vs torch.nn.functional.linear (cuBLAS) at GPT-L's shapes (plus
w1|w3 fused 5632 x 1024 and a 16384 x 1024 head), M in {2, 16, 64}, bf16 and int8 plus one fp32
line. Both sides are captured in a CUDA graph (a loop over enough weight copies to exceed the
L2) and timed by replaying it, so the numbers are GPU time, not Python launch overhead; the
fraction is of a plain read (x.sum()) measured in the same run.
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
from detailflow_engine.ops.decode_gemm import decode_gemm, pack_int4, pack_int8, pack_weight  # noqa: E402
from detailflow_engine.ops.decode_gemm_w4a8 import decode_gemm_w4a8, pack_w4a8  # noqa: E402
from detailflow_engine.ops.decode_gemm_w8a8 import decode_gemm_w8a8, pack_w8a8  # noqa: E402

GPT_L = {"wqkv": (3072, 1024), "wo": (1024, 1024), "w1/w3": (2816, 1024), "w2": (1024, 2816),
         "output": (8192, 1024)}
CUDA_SHAPES = {"wqkv": (3072, 1024), "wo": (1024, 1024), "w1|w3": (5632, 1024), "w2": (1024, 2816),
               "output": (8192, 1024), "head16k": (16384, 1024)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
WBYTES = {"fp32": 4, "bf16": 2, "int8": 1}


def variant(dtype: torch.dtype) -> str:
    """Which inner loop the CPU kernel runs for x and W of this dtype (a 1x1 call)."""
    ext = _dispatch.extension()
    if not (_dispatch.has_cpu_kernels() and hasattr(ext, "decode_gemm")):
        return "torch fallback (no _C)"
    int8 = dtype == torch.int8
    xd = torch.float32 if int8 else dtype
    x, y = torch.ones(1, 1, dtype=xd), torch.empty(1, 1, dtype=xd)
    p = pack_int8(torch.ones(1, 1)) if int8 else pack_weight(torch.ones(1, 1, dtype=dtype))
    codes = _dispatch.DTYPE_CODES
    return ext.decode_gemm(x.data_ptr(), 1, 1, 1, codes[xd], p.packed.data_ptr(), p.packed.numel(), codes[dtype],
                           p.scales.data_ptr() if int8 else 0, 1, y.data_ptr(), 1, 1)


def weight_set(N: int, K: int, fmt: str, min_bytes: int, device: str = "cpu"):
    """Enough (N, K) weights of format fmt to exceed min_bytes: (torch weights, packed, bytes each).
    int8: the torch side gets (Q, scales) pairs."""
    per = N * K * WBYTES[fmt]
    copies = max(2, -(-min_bytes // per))
    ws, packed = [], []
    for _ in range(copies):
        w = torch.randn(N, K, device=device) * K ** -0.5
        if fmt == "int8":
            p = pack_int8(w)
            ws.append((p.weight, p.scales))
        else:
            w = w.to(DTYPES[fmt])
            p = pack_weight(w)
            ws.append(w)
        packed.append(p)
    return ws, packed, per


def torch_peer(x, w):
    """F.linear on the weight; int8: gpt-fast's F.linear(x, Q.to(x.dtype)) * scales."""
    if isinstance(w, tuple):
        q, s = w
        return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
    return F.linear(x, w)


def time_pair(M, N, K, fmt, min_bytes, target_s):
    """(ours s, torch s) per matrix, M rows, weights streamed from DRAM."""
    ws, packed, per = weight_set(N, K, fmt, min_bytes)
    xd = torch.float32 if fmt == "int8" else DTYPES[fmt]
    x = torch.randn(M, K).to(xd)
    out = torch.empty(M, N, dtype=xd)
    ours = bench(lambda: [decode_gemm(x, p, out=out) for p in packed], target_s=target_s)
    ref = bench(lambda: [torch_peer(x, w) for w in ws], target_s=target_s)
    n = len(ws)
    return ours.median_s / n, ref.median_s / n, per


def graph_time(fn, target_s: float) -> float:
    """GPU seconds of fn() (a loop of launches) captured once in a CUDA graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up: workspaces, lazy init
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay, device="cuda", target_s=target_s).median_s


BLOCK = ("wqkv", "wo", "w1/w3", "w1/w3", "w2")  # one transformer block's matrices


def low_precision_main(args) -> None:
    """bf16 vs int8 vs int4 weights with bf16 x over one block's matrices (module docstring)."""
    bw0 = read_bandwidth_gbs()
    print(f"# threads={torch.get_num_threads()} read_bw={bw0:.1f} GB/s (plain 512 MB read, same run); "
          f"weights >= {args.min_mb} MB per timed call; x bf16")
    print("| weights | M | block us | GB/s | floor us | kernel/floor | vs bf16 | inner loop |")
    print("|---|---|---|---|---|---|---|---|")
    fmts = {"bf16": lambda w: pack_weight(w.to(torch.bfloat16)), "int8": pack_int8,
            "int4-g64": lambda w: pack_int4(w, 64), "int4-g128": lambda w: pack_int4(w, 128),
            "w8a8": lambda w: pack_w8a8(w, keep_source=False), "w4a8": lambda w: pack_w4a8(w, 64, keep_source=False)}
    nbytes = lambda p: sum(t.numel() * t.element_size() for t in (p.packed, p.kernel_scales, p.colsum)
                           if t is not None)
    ext = _dispatch.extension()
    block_bytes = sum(N * K * 2 for N, K in (GPT_L[s] for s in BLOCK))
    copies = max(2, -(-(args.min_mb << 20) // block_bytes))
    for M in args.rows:
        x = torch.randn(M, 1024).to(torch.bfloat16)
        x2 = torch.randn(M, 2816).to(torch.bfloat16)
        base = None
        for name, make in fmts.items():
            sets = [[make(torch.randn(*GPT_L[s]) * GPT_L[s][1] ** -0.5) for s in BLOCK] for _ in range(copies)]
            outs = [torch.empty(M, p.N, dtype=torch.bfloat16) for p in sets[0]]
            per = sum(nbytes(p) for p in sets[0])
            gemm = {"w8a8": decode_gemm_w8a8, "w4a8": decode_gemm_w4a8}.get(name, decode_gemm)
            t = bench(lambda: [gemm(x2 if p.K == 2816 else x, p, out=o)
                               for ps in sets for p, o in zip(ps, outs)], target_s=args.target_s).median_s / copies
            base = t if base is None else base
            loop = ("int4" if name.startswith("int4") else name)
            p = sets[0][0]
            if p.is_w8a8:
                y = torch.empty(1, p.N, dtype=torch.bfloat16)
                loop = ext.decode_gemm_w8a8(x.data_ptr(), 1, p.K, p.K, 1, p.packed.data_ptr(), p.packed.numel(),
                                            p.kernel_scales.data_ptr(), p.colsum.data_ptr(), p.N, y.data_ptr(), p.N, 1)
            elif p.is_w4a8:
                y = torch.empty(1, p.N, dtype=torch.bfloat16)
                loop = ext.decode_gemm_w4a8(x.data_ptr(), 1, p.K, p.K, 1, p.packed.data_ptr(), p.packed.numel(),
                                            p.group_scales.data_ptr(), p.group_size, p.N, y.data_ptr(), p.N, 1)
            elif p.is_int4:
                y = torch.empty(1, p.N, dtype=torch.bfloat16)
                loop = ext.decode_gemm_int4(x.data_ptr(), 1, p.K, p.K, 1, p.packed.data_ptr(), p.packed.numel(),
                                            p.group_scales.data_ptr(), p.group_size, p.N, y.data_ptr(), p.N, 1)
            else:
                loop = variant_of(torch.bfloat16, p)
            floor = per / (bw0 * 1e9)
            print(f"| {name} | {M} | {t * 1e6:.0f} | {per / t / 1e9:.1f} | {floor * 1e6:.0f} | {t / floor:.2f} | "
                  f"{base / t:.2f}x | {loop} |", flush=True)
            del sets
    print(f"# read_bw at the end: {read_bandwidth_gbs():.1f} GB/s")


def variant_of(xd: torch.dtype, p) -> str:
    """The CPU inner loop for x of dtype xd on packed weight p (a 1-row call)."""
    ext = _dispatch.extension()
    x, y = torch.ones(1, p.K, dtype=xd), torch.empty(1, p.N, dtype=xd)
    codes = _dispatch.DTYPE_CODES
    return ext.decode_gemm(x.data_ptr(), 1, p.K, p.K, codes[xd], p.packed.data_ptr(), p.packed.numel(),
                           codes[p.packed.dtype], p.scales.data_ptr() if p.scales is not None else 0, p.N,
                           y.data_ptr(), p.N, 1)


def cuda_main(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available to torch here")
    torch.manual_seed(0)
    dev = "cuda"
    bw = read_bandwidth_gbs(device=dev, nbytes=2 << 30)
    min_bytes = (128 if args.quick else 512) << 20
    target = 0.03 if args.quick else 0.2
    ext = _dispatch.extension()
    ours_name = "ours" if (_dispatch.has_cuda_kernels() and hasattr(ext, "decode_gemm_cuda")) else "torch-fallback"
    print(f"# {torch.cuda.get_device_name()} read_bw={bw:.0f} GB/s (x.sum() of 2 GB, same run); "
          f"weights >= {min_bytes >> 20} MB per graph; ours = {ours_name}")
    print("| format | M | matrix N x K | ours us | ours GB/s | of read bw | cuBLAS us | cuBLAS GB/s | cuBLAS/ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    configs = [(f, M, s) for f in ("bf16", "int8") for M in (2, 16, 64) for s in CUDA_SHAPES]
    configs.append(("fp32", 2, "wqkv"))
    for fmt, M, name in configs:
        N, K = CUDA_SHAPES[name]
        ws, packed, per = weight_set(N, K, fmt, min_bytes, dev)
        xd = torch.float32 if fmt == "fp32" else torch.bfloat16
        x = torch.randn(M, K, device=dev).to(xd)
        out = torch.empty(M, N, device=dev, dtype=xd)
        n = len(ws)
        o = graph_time(lambda: [decode_gemm(x, p, out=out) for p in packed], target) / n
        r = graph_time(lambda: [torch_peer(x, w) for w in ws], target) / n
        print(f"| {fmt} | {M} | {name} {N}x{K} | {o * 1e6:.1f} | {per / o / 1e9:.0f} | {per / o / 1e9 / bw:.0%} | "
              f"{r * 1e6:.1f} | {per / r / 1e9:.0f} | {r / o:.2f}x |", flush=True)
        del ws, packed
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16], help="activation rows M")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], choices=list(DTYPES),
                    help="weight formats (int8: x fp32)")
    ap.add_argument("--shapes", nargs="+", default=list(GPT_L), choices=list(GPT_L))
    ap.add_argument("--min-mb", type=int, default=256, help="weight copies per timed call, in MB (> caches)")
    ap.add_argument("--target-s", type=float, default=0.3, help="timing target per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (ours follows it)")
    ap.add_argument("--crossover", action="store_true",
                    help="sum over the shapes for M in 16..256: where F.linear starts to win")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--low-precision", action="store_true",
                    help="issue 22: bf16 / int8 / int4 weights with bf16 x, one block, M = --rows (default 2 16 128)")
    ap.add_argument("--quick", action="store_true", help="--device cuda: smaller weight sets, short timings (< 20 s)")
    args = ap.parse_args()
    if args.device == "cuda":
        cuda_main(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.low_precision:
        if args.rows == [2, 16]:
            args.rows = [2, 16, 128]
        low_precision_main(args)
        return
    bw = read_bandwidth_gbs()
    print(f"# threads={torch.get_num_threads()} read_bw={bw:.1f} GB/s (plain 512 MB read, same run); "
          f"weights >= {args.min_mb} MB per timed call")
    min_bytes = args.min_mb << 20
    if args.crossover:
        print("| dtype | M | ours ms (5 matrices) | torch ms | torch/ours |")
        print("|---|---|---|---|---|")
        for name in args.dtypes:
            for M in (16, 32, 48, 64, 96, 128, 192, 256):
                ours = ref = 0.0
                for s in args.shapes:
                    o, r, _ = time_pair(M, *GPT_L[s], name, min_bytes // 2, args.target_s / 2)
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
                o, r, per = time_pair(M, N, K, name, min_bytes, args.target_s)
                print(f"| {name} | {M} | {s} {N}x{K} | {o * 1e6:.0f} | {per / o / 1e9:.1f} | "
                      f"{per / o / 1e9 / bw * 100:.0f}% | {r * 1e6:.0f} | {per / r / 1e9:.1f} | {r / o:.2f}x | {loop} |",
                      flush=True)
    print(f"# read_bw at the end: {read_bandwidth_gbs():.1f} GB/s")


if __name__ == "__main__":
    main()
