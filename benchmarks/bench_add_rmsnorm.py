"""add_rmsnorm (Triton: residual add + RMSNorm in one pass) vs the prior's torch composition.

    python benchmarks/bench_add_rmsnorm.py --device cuda --quick        # < 20 s on an H200
    python benchmarks/bench_add_rmsnorm.py --device cuda [--rows 2 16 512 4096] [--dim 1024]
        [--dtype bfloat16 float32] [--no-delta] [--target-s 0.3] [--check]

One line per config: our time and the composition's (h = x + delta, then prior.RMSNorm's
formula: float, square, mean, add eps, rsqrt, mul, cast, mul by weight), both eager and as
CUDA-graph replays (20 calls a graph, per-call time: what a captured decode step pays), the
ratios, and our achieved bandwidth from
    bytes = (x, delta read + h, y written) R * dim * elem + dim * elem (weight)
Defaults are the prior's decode shapes (GPT-L width 1024; rows = B * n: 2 = batch 1 with CFG,
16 = one group of 8, 512 and 4096 = big batches). `--device cpu` only smoke-tests the script
(the op falls back to torch there: Triton needs CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench  # noqa: E402

from detailflow_engine.ops import _dispatch  # noqa: E402
from detailflow_engine.ops.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref, tolerance  # noqa: E402

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
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 16, 512, 4096], help="R = B * n")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    ap.add_argument("--no-delta", action="store_true", help="plain RMSNorm (delta=None)")
    ap.add_argument("--target-s", type=float, default=0.3, help="timing budget per measurement")
    ap.add_argument("--quick", action="store_true", help="short timings, fp32 only at 16 rows")
    ap.add_argument("--check", action="store_true", help="also compare each config with the _ref")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here (the Triton kernel needs one)")
    cuda = args.device == "cuda"
    target = 0.05 if args.quick else args.target_s

    dev = torch.device(args.device)
    probe = torch.empty(1, args.dim, device=dev)
    backend = _dispatch.pick("add_rmsnorm", probe, probe, probe[0]).name
    print(f"# add_rmsnorm: backend={backend}, torch {torch.__version__}, device {args.device}"
          f"{' ' + torch.cuda.get_device_name() if cuda else ''}, dim={args.dim}, delta={not args.no_delta}")
    print("# composition = h = x + delta; prior.RMSNorm(h); graph = per call of 20 captured calls; "
          "GB/s = (2 or 4) * R * dim * elem / our time")
    for name in args.dtype:
        dtype = DTYPES[name]
        for R in args.rows:
            if args.quick and dtype == torch.float32 and R != 16:
                continue
            g = torch.Generator().manual_seed(0)
            x = torch.randn(R, args.dim, generator=g).to(dtype).to(dev)
            delta = None if args.no_delta else torch.randn(R, args.dim, generator=g).to(dtype).to(dev)
            weight = (1 + 0.1 * torch.randn(args.dim, generator=g)).to(dtype).to(dev)

            def ours():
                return add_rmsnorm(x, delta, weight, 1e-5)

            def composition():
                return add_rmsnorm_ref(x, delta, weight, 1e-5)

            t_ours = bench(ours, device=args.device, target_s=target).median_s
            t_comp = bench(composition, device=args.device, target_s=target).median_s
            nbytes = (2 if delta is None else 4) * R * args.dim * x.element_size() + args.dim * x.element_size()
            line = (f"{name:8s} R={R:5d}  eager: ours {t_ours * 1e6:8.1f} us  torch {t_comp * 1e6:8.1f} us "
                    f"(x{t_comp / t_ours:5.2f})")
            if cuda:
                g_ours, g_comp = graph_time(ours, target), graph_time(composition, target)
                line += (f"  graph: ours {g_ours * 1e6:7.2f} us  torch {g_comp * 1e6:7.2f} us (x{g_comp / g_ours:5.2f})"
                         f"  {nbytes / g_ours / 1e9:7.1f} GB/s")
            else:
                line += f"  {nbytes / t_ours / 1e9:7.1f} GB/s"
            if args.check:  # the tests' STYLE 5 rule: vs the fp32 reference, 2x torch's own error + atol
                _, y = ours()
                _, y_lowp = composition()
                _, y32 = add_rmsnorm_ref(x.float(), None if delta is None else delta.float(), weight.float(), 1e-5)
                err = (y.float() - y32).abs().max().item()
                atol, rtol = tolerance(dtype)
                bound = 2 * (y_lowp.float() - y32).abs().max().item() + atol + rtol * y32.abs().max().item()
                line += f"  max|ours-ref32| {err:.2e} ({'ok' if err <= bound else 'FAIL'} <= {bound:.2e})"
            print(line, flush=True)


if __name__ == "__main__":
    main()
