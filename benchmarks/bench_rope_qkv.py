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

import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.rope_qkv import rope_qkv, rope_qkv_ref, tolerance
from detailflow_engine.rotary import precompute_freqs_cis_2d

try:
    from benchmarks._timing import eager_and_graph, practice5_bound, rows_configs, rows_parser
except ImportError:  # python benchmarks/bench_rope_qkv.py: sys.path has this folder, not the root
    from _timing import eager_and_graph, practice5_bound, rows_configs, rows_parser


def main() -> None:
    ap = rows_parser(__doc__, rows_help="R = B * n (n = 1 for R = 2, else 8: one group)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    args = ap.parse_args()
    configs = list(rows_configs(args))
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
    for name, dtype, R in configs:
        n = 1 if R < 8 or R % 8 else 8
        B, start = R // n, (1 if n == 1 else 9)
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(B, n, 3 * H * d, generator=g).to(dtype).to(dev)
        freqs = table[start:start + n]

        def ours():
            return rope_qkv(qkv, freqs, H)

        def composition():
            return rope_qkv_ref(qkv, freqs, H)

        nbytes = 2 * R * 3 * H * d * qkv.element_size() + freqs.numel() * 4
        line = f"{name:8s} R={R:5d} (B={B}, n={n})  " + eager_and_graph(
            ours, composition, device=args.device, target_s=target, nbytes=nbytes)
        if args.check:  # the tests' STYLE 5 rule: vs the fp32 reference, 2x torch's own error + atol
            worst, ok = 0.0, True
            for o, lowp, r32 in zip(ours(), composition(), rope_qkv_ref(qkv.float(), freqs, H)):
                err, bound = practice5_bound(o, lowp, r32, *tolerance(dtype))
                worst, ok = max(worst, err), ok and err <= bound
            line += f"  max|ours-ref32| {worst:.2e} ({'ok' if ok else 'FAIL'})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
