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

import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref, tolerance

try:
    from benchmarks._timing import eager_and_graph, practice5_bound, rows_configs, rows_parser
except ImportError:  # python benchmarks/bench_add_rmsnorm.py: sys.path has this folder, not the root
    from _timing import eager_and_graph, practice5_bound, rows_configs, rows_parser


def main() -> None:
    ap = rows_parser(__doc__, rows_help="R = B * n")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--no-delta", action="store_true", help="plain RMSNorm (delta=None)")
    args = ap.parse_args()
    configs = list(rows_configs(args))
    cuda = args.device == "cuda"
    target = 0.05 if args.quick else args.target_s

    dev = torch.device(args.device)
    probe = torch.empty(1, args.dim, device=dev)
    backend = _dispatch.pick("add_rmsnorm", probe, probe, probe[0]).name
    print(f"# add_rmsnorm: backend={backend}, torch {torch.__version__}, device {args.device}"
          f"{' ' + torch.cuda.get_device_name() if cuda else ''}, dim={args.dim}, delta={not args.no_delta}")
    print("# composition = h = x + delta; prior.RMSNorm(h); graph = per call of 20 captured calls; "
          "GB/s = (2 or 4) * R * dim * elem / our time")
    for name, dtype, R in configs:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(R, args.dim, generator=g).to(dtype).to(dev)
        delta = None if args.no_delta else torch.randn(R, args.dim, generator=g).to(dtype).to(dev)
        weight = (1 + 0.1 * torch.randn(args.dim, generator=g)).to(dtype).to(dev)

        def ours():
            return add_rmsnorm(x, delta, weight, 1e-5)

        def composition():
            return add_rmsnorm_ref(x, delta, weight, 1e-5)

        nbytes = (2 if delta is None else 4) * R * args.dim * x.element_size() + args.dim * x.element_size()
        line = f"{name:8s} R={R:5d}  " + eager_and_graph(ours, composition, device=args.device,
                                                         target_s=target, nbytes=nbytes)
        if args.check:  # the tests' STYLE 5 rule: vs the fp32 reference, 2x torch's own error + atol
            _, y32 = add_rmsnorm_ref(x.float(), None if delta is None else delta.float(), weight.float(), 1e-5)
            err, bound = practice5_bound(ours()[1], composition()[1], y32, *tolerance(dtype))
            line += f"  max|ours-ref32| {err:.2e} ({'ok' if err <= bound else 'FAIL'} <= {bound:.2e})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
