"""rope_qkv (Triton: split qkv + rotary on q, k + (B, H, n, d) layout) vs the prior's composition.

    python benchmarks/bench_rope_qkv.py --device cuda --quick        # < 20 s on an H200
    python benchmarks/bench_rope_qkv.py --device cuda [--rows 2 16 512 4096] [--heads 16]
        [--head-dim 64] [--dtype bfloat16 float32] [--target-s 0.3] [--check]

One line per config: our time and the composition's (prior.Attention: view + unbind, two
apply_rotary calls, transposes; its v stays a strided view, ours is written contiguous), both
eager and as CUDA-graph replays (20 calls a graph, per-call time: what a captured decode step
pays), the ratios, and our achieved bandwidth from
    bytes = 2 * R * 3 * H * d * elem (qkv read, q/k/v written) + n * d/2 * 2 * 4 (freqs)
Defaults are the prior's decode shapes (GPT-L: 16 heads of 64; rows R = B * n: 2 = batch 1 with
CFG and one position, 16 = one group of 8, 512 and 4096 = batch 32 / 256 with CFG, one group).
`--device cpu` only smoke-tests the script (the op falls back to torch there).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench  # noqa: E402

from detailflow_engine.ops import _dispatch  # noqa: E402
from detailflow_engine.ops.rope_qkv import rope_qkv, rope_qkv_ref, tolerance  # noqa: E402
from detailflow_engine.rotary import precompute_freqs_cis_2d  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRAPH_CALLS = 20


def graph_time(fn, target_s: float) -> float:
    """Per-call time of `fn` captured GRAPH_CALLS times in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the capture (Triton compiles on first call)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    return bench(graph.replay, device="cuda", target_s=target_s).median_s / GRAPH_CALLS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16, 512, 4096],
                    help="R = B * n (n = 1 for R = 2, else 8: one group)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ap.add_argument("--target-s", type=float, default=0.3, help="timing budget per measurement")
    ap.add_argument("--quick", action="store_true", help="short timings, fp32 only at 16 rows")
    ap.add_argument("--check", action="store_true", help="also compare each config with the _ref")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (the Triton kernel needs one)")
    cuda = args.device == "cuda"
    target = 0.05 if args.quick else args.target_s
    H, d = args.heads, args.head_dim
    dev = torch.device(args.device)
    table = precompute_freqs_cis_2d(128, 8, d).to(dev)  # the prior's (1 + 128, d/2, 2) table

    backend = _dispatch.pick("rope_qkv", torch.empty(1, 1, 3 * H * d, device=dev), table[:1]).name
    print(f"# rope_qkv: backend={backend}, torch {torch.__version__}, device {args.device}"
          f"{' ' + torch.cuda.get_device_name() if cuda else ''}, H={H}, d={d}")
    print("# composition = prior.Attention's view/unbind + apply_rotary(q), apply_rotary(k) + transposes; "
          "graph = per call of 20 captured calls; GB/s = 2 * R * 3*H*d * elem / our time")
    for name in args.dtype:
        dtype = DTYPES[name]
        for R in args.rows:
            if args.quick and dtype == torch.float32 and R != 16:
                continue
            n = 1 if R < 8 or R % 8 else 8
            B, start = R // n, (1 if n == 1 else 9)
            g = torch.Generator().manual_seed(0)
            qkv = torch.randn(B, n, 3 * H * d, generator=g).to(dtype).to(dev)
            freqs = table[start:start + n]

            def ours():
                return rope_qkv(qkv, freqs, H)

            def composition():
                return rope_qkv_ref(qkv, freqs, H)

            t_ours = bench(ours, device=args.device, target_s=target).median_s
            t_comp = bench(composition, device=args.device, target_s=target).median_s
            nbytes = 2 * R * 3 * H * d * qkv.element_size() + freqs.numel() * 4
            line = (f"{name:8s} R={R:5d} (B={B}, n={n})  eager: ours {t_ours * 1e6:8.1f} us  "
                    f"torch {t_comp * 1e6:8.1f} us (x{t_comp / t_ours:5.2f})")
            if cuda:
                g_ours, g_comp = graph_time(ours, target), graph_time(composition, target)
                line += (f"  graph: ours {g_ours * 1e6:7.2f} us  torch {g_comp * 1e6:7.2f} us (x{g_comp / g_ours:5.2f})"
                         f"  {nbytes / g_ours / 1e9:7.1f} GB/s")
            else:
                line += f"  {nbytes / t_ours / 1e9:7.1f} GB/s"
            if args.check:  # the tests' STYLE 5 rule: vs the fp32 reference, 2x torch's own error + atol
                atol, rtol = tolerance(dtype)
                worst, ok = 0.0, True
                for o, lowp, r32 in zip(ours(), composition(), rope_qkv_ref(qkv.float(), freqs, H)):
                    err = (o.float() - r32).abs().max().item()
                    bound = 2 * (lowp.float() - r32).abs().max().item() + atol + rtol * r32.abs().max().item()
                    worst, ok = max(worst, err), ok and err <= bound
                line += f"  max|ours-ref32| {worst:.2e} ({'ok' if ok else 'FAIL'})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
