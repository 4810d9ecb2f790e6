"""cache_attention vs the torch composition of a gpt-fast style decoder, at DetailFlow shapes.

GPU quick check (< 20 s on an H200):
    python benchmarks/bench_cache_attention.py --device cuda --quick

One line per config: our time, the composition's time (cache index_copy_ + SDPA over the
first L cache positions), the `_ref` time, the ratios, and the KV read bandwidth we reach:
    GB/s = 2 (K and V) * B * H * L * d * bytes_per_element / time
Defaults are the prior's decode steps (GPT-L: 16 heads, head dim 64, 128-position cache):
B in {2, 16, 64} (CFG doubles the images), n_q in {1, 8} (causal step / one group), L in {8, 64, 128}.

    python benchmarks/bench_cache_attention.py [--batch 2 16 64] [--n-q 1 8] [--length 8 64 128]
        [--dtype float32 bfloat16] [--target-s 0.3] [--check]

--device cuda times our CUDA kernel against the same composition on the GPU (CUDA events,
benchmarks/_timing.bench) at B in {2, 64, 512} (batch 1 / 32 / 256 with CFG), n_q in {1, 8},
L in {8, 128}, bf16, plus one fp32 line (B=64, n_q=8, L=128); each config is timed twice: eager
calls (includes the Python/launch overhead of each side) and CUDA-graph replays of one call
(the GPU time alone, which is how the engine runs a decode step).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.cache_attention import cache_attention, cache_attention_ref, tolerance

try:
    from benchmarks._timing import bench, graph_replay, read_bandwidth_gbs
except ImportError:  # python benchmarks/bench_cache_attention.py: sys.path has this folder, not the root
    from _timing import bench, graph_replay, read_bandwidth_gbs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def ours_and_sdpa(q, k_new, v_new, k_cache, v_cache, start_pos, out):
    """The two timed calls: our op, and the torch composition it replaces (cache write + SDPA)."""
    L = start_pos + q.shape[2]
    pos = torch.arange(start_pos, L, device=q.device)

    def ours():
        return cache_attention(q, k_new, v_new, k_cache, v_cache, start_pos, out=out)

    def composition():
        k_cache.index_copy_(2, pos, k_new)
        v_cache.index_copy_(2, pos, v_new)
        return F.scaled_dot_product_attention(q, k_cache[:, :, :L], v_cache[:, :, :L])

    return ours, composition


def warm_up_threads(seconds: float = 1.0) -> None:
    """Keep all threads busy for a while first: on a shared VM an idle vCPU can take a scheduler
    tick (4 ms) to wake, which makes the first ~0.5 s of any multi-threaded timing meaningless."""
    x = torch.randn(1 << 20)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        torch.exp(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="short timings (CUDA: < 20 s in all)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="default 2 16 64 (cuda: 2 64 512)")
    ap.add_argument("--n-q", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--length", type=int, nargs="+", default=None,
                    help="L = start_pos + n_q; default 8 64 128 (cuda: 8 128)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128, help="cache length L_max")
    ap.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                    help="default float32 bfloat16 (cuda: bfloat16 + one float32 line)")
    ap.add_argument("--target-s", type=float, default=0.3, help="timing budget per measurement")
    ap.add_argument("--check", action="store_true", help="also compare each config with the _ref")
    args = ap.parse_args()
    if args.device == "cuda":
        main_cuda(args)
        return
    args.batch = args.batch or [2, 16, 64]
    args.length = args.length or [8, 64, 128]
    args.dtype = args.dtype or ["float32", "bfloat16"]
    if args.quick:
        args.target_s = min(args.target_s, 0.05)

    H, d, L_max = args.heads, args.head_dim, args.max_length
    warm_up_threads()
    backend = _dispatch.pick("cache_attention", *([torch.empty(1, 1, 1, d)] * 6)).name
    print(f"# cache_attention: backend={backend}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"H={H}, d={d}, L_max={L_max}; machine streaming read {read_bandwidth_gbs():.1f} GB/s")
    print("# composition = k/v_cache.index_copy_(2, pos, k/v_new) + F.scaled_dot_product_attention(q, k[:, :, :L], "
          "v[:, :, :L]); KV GB/s = 2*B*H*L*d*bytes / our time")
    for name in args.dtype:
        dtype = DTYPES[name]
        for B in args.batch:
            for n_q in args.n_q:
                for L in args.length:
                    if L < n_q or L > L_max:
                        continue
                    start_pos = L - n_q
                    g = torch.Generator().manual_seed(0)
                    q, k_new, v_new = (torch.randn(B, H, n_q, d, generator=g).to(dtype) for _ in range(3))
                    k_cache, v_cache = (torch.randn(B, H, L_max, d, generator=g).to(dtype) for _ in range(2))
                    ours, composition = ours_and_sdpa(q, k_new, v_new, k_cache, v_cache, start_pos,
                                                      torch.empty_like(q))

                    def reference():
                        return cache_attention_ref(q, k_new, v_new, k_cache, v_cache, start_pos)

                    t_ours = bench(ours, target_s=args.target_s).median_s
                    t_comp = bench(composition, target_s=args.target_s).median_s
                    t_ref = bench(reference, target_s=args.target_s).median_s
                    gbs = 2 * B * H * L * d * q.element_size() / t_ours / 1e9
                    line = (f"{name:8s} B={B:3d} n_q={n_q} L={L:3d}  ours {t_ours * 1e6:8.1f} us  "
                            f"sdpa {t_comp * 1e6:8.1f} us (x{t_comp / t_ours:5.2f})  "
                            f"ref {t_ref * 1e6:8.1f} us (x{t_ref / t_ours:5.2f})  KV {gbs:6.1f} GB/s")
                    if args.check:
                        err = (ours().float() - reference().float()).abs().max().item()
                        line += f"  max|ours-ref| {err:.2e} ({'ok' if err <= tolerance(dtype)[0] else 'FAIL'})"
                    print(line, flush=True)


def main_cuda(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    dev = torch.device("cuda")
    H, d, L_max = args.heads, args.head_dim, args.max_length
    target = min(args.target_s, 0.03) if args.quick else args.target_s
    configs = [(name, B, n_q, L) for name in (args.dtype or ["bfloat16"]) for B in (args.batch or [2, 64, 512])
               for n_q in args.n_q for L in (args.length or [8, 128])]
    if args.dtype is None and args.batch is None and args.length is None:
        configs.append(("float32", 64, 8, 128))
    probe = torch.empty(1, 1, 1, d, device=dev)
    backend = _dispatch.pick("cache_attention", *([probe] * 6)).name
    print(f"# cache_attention --device cuda: backend={backend}, {torch.cuda.get_device_name(dev)} "
          f"({_dispatch.sm_count(dev)} SMs), "
          f"torch {torch.__version__}, H={H}, d={d}, L_max={L_max}; streaming read "
          f"{read_bandwidth_gbs('cuda'):.0f} GB/s")
    print("# sdpa = k/v_cache.index_copy_(2, pos, k/v_new) + F.scaled_dot_product_attention(q, k[:, :, :L], "
          "v[:, :, :L]); xR = sdpa time / ours; KV GB/s = 2*B*H*L*d*bytes / our graph time")
    for name, B, n_q, L in configs:
        if L < n_q or L > L_max:
            continue
        dtype = DTYPES[name]
        start_pos = L - n_q
        g = torch.Generator(device=dev).manual_seed(0)
        q, k_new, v_new = (torch.randn(B, H, n_q, d, generator=g, device=dev).to(dtype) for _ in range(3))
        k_cache, v_cache = (torch.randn(B, H, L_max, d, generator=g, device=dev).to(dtype) for _ in range(2))
        ours, composition = ours_and_sdpa(q, k_new, v_new, k_cache, v_cache, start_pos, torch.empty_like(q))

        t_ours = bench(ours, device="cuda", target_s=target).median_s
        t_comp = bench(composition, device="cuda", target_s=target).median_s
        g_ours = bench(graph_replay(ours, warmup=2), device="cuda", target_s=target).median_s
        g_comp = bench(graph_replay(composition, warmup=2), device="cuda", target_s=target).median_s
        gbs = 2 * B * H * L * d * q.element_size() / g_ours / 1e9
        line = (f"{name:8s} B={B:3d} n_q={n_q} L={L:3d}  eager: ours {t_ours * 1e6:7.1f} us  sdpa "
                f"{t_comp * 1e6:7.1f} us (x{t_comp / t_ours:5.2f})  graph: ours {g_ours * 1e6:7.1f} us  sdpa "
                f"{g_comp * 1e6:7.1f} us (x{g_comp / g_ours:5.2f})  KV {gbs:7.1f} GB/s")
        if args.check:
            k_ref, v_ref = k_cache.clone(), v_cache.clone()
            ref = cache_attention_ref(q, k_new, v_new, k_ref, v_ref, start_pos).float()
            err = (ours().float() - ref).abs().max().item()
            line += f"  max|ours-ref| {err:.2e} ({'ok' if err <= tolerance(dtype)[0] else 'FAIL'})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
