"""Every weights mode of the prior side by side in ONE process: token generation per image.

Same random weights at DetailFlow-16 size (GPT-L prior; `--preset`), same labels, CFG 1.45,
greedy, batch `--batch` (default 1), activations in `--dtype` (default bf16). One engine per
weights mode (native, int8, int4, w8a8, w4a8) made from the same checkpoint values by `prepare_prior`,
and the plain-torch KV-cache peer (detailflow_ref.kv_generate, the reference's modules in the
same dtype, nothing of ours on its path). The sides run round-robin, `--repeats` rounds, and
each reports its median, so a drift of the shared machine hits them alike. Per mode: ms/img,
vs the native engine, vs the peer, tokens equal to the native engine's, and the weight floor:
steps x the bytes of the mode's streamed prior weights / the read bandwidth measured in the same
run (before and after; the lower is used, which favours the floor); bytes as held
(profiling.analysis.streamed_weight_bytes: packed panels, scales, column sums).

    python benchmarks/bench_weight_modes.py                         # DetailFlow-16 size, bf16, batch 1
    python benchmarks/bench_weight_modes.py --dtype fp32 --modes native w8a8
    python benchmarks/bench_weight_modes.py --steps --skip-peer     # + one step of each kind per mode

--steps: where a mode's ratio comes from. After the table, one single step (the first after the
class step: M = 2 rows at batch 1 with CFG, bandwidth-bound) and one group step (the last of the
plan: M = 16, compute-bound) of each mode's prior, each a `prior_step` call (embeddings, layers,
head; no draw), round-robin over modes and kinds for `--repeats` x 5 rounds (medians), with the
step counts of the plan, so that steps x time shows each kind's share of a generation.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from detailflow_engine.device_dtype import WEIGHT_MODES
from detailflow_engine.loading import prepare_prior
from detailflow_engine.pipeline import DetailFlowPipeline
from detailflow_engine.ops import prior_step as ps
from detailflow_engine.presets import preset_configs, randomize_
from detailflow_engine.prior import Prior
from detailflow_engine.profiling.analysis import streamed_weight_bytes
from detailflow_ref.gpt import Transformer
from detailflow_ref.kv_generate import KVCachePeer, kv_cache_generate

try:
    from benchmarks._timing import read_bandwidth_gbs
except ImportError:  # python benchmarks/bench_weight_modes.py: sys.path has this folder, not the root
    from _timing import read_bandwidth_gbs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="detailflow16")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=list(WEIGHT_MODES), choices=list(WEIGHT_MODES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cfg-scale", type=float, default=1.45)
    ap.add_argument("--repeats", type=int, default=3, help="round-robin rounds (median per side)")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--steps", action="store_true", help="also time one single and one group step per mode")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    pcfg, _ = preset_configs(args.preset)
    ref = randomize_(Transformer(pcfg), 0).eval()
    prior = Prior(pcfg)
    prior.load_state_dict(ref.state_dict())
    pipes = {m: DetailFlowPipeline(prepare_prior(prior, dtype, m), None) for m in args.modes}
    del prior
    labels = [(7 * i + 3) % pcfg.num_classes for i in range(args.batch)]
    sides = {m: (lambda p=p: p.generate_tokens(labels, cfg_scale=args.cfg_scale, top_k=1)[0])
             for m, p in pipes.items()}
    if not args.skip_peer:
        peer = ref.to(dtype).requires_grad_(False)
        cache = KVCachePeer(peer, 2 * args.batch if args.cfg_scale > 1 else args.batch)
        lab = torch.tensor(labels)

        def run_peer():
            with torch.inference_mode():
                return kv_cache_generate(peer, lab, cfg_scale=args.cfg_scale, top_k=1, peer=cache)

        sides["peer"] = run_peer
    else:
        del ref
    bw0 = read_bandwidth_gbs()
    times = {s: [] for s in sides}
    tokens = {s: fn() for s, fn in sides.items()}  # warm-up
    for _ in range(args.repeats):
        for s, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[s].append(time.perf_counter() - t0)
    bw = min(bw0, read_bandwidth_gbs())
    med = {s: statistics.median(t) / args.batch for s, t in times.items()}
    steps = len(pcfg.generation_plan())
    base = med.get("native")
    print(f"# cpu x{torch.get_num_threads()} preset={args.preset} dtype={args.dtype} batch={args.batch} "
          f"CFG {args.cfg_scale} greedy tokens only; steps={steps}; read_bw={bw0:.1f} GB/s before, {bw:.1f} used "
          f"(min of before/after); {args.repeats} round-robin rounds, medians")
    print("| weights | ms/img | vs native engine | vs peer | tokens equal native | streamed MB/step "
          "| weight floor ms/img | engine/floor |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sides:
        if s == "peer":
            print(f"| plain-torch KV peer ({args.dtype}) | {med[s] * 1e3:.1f} | - | 1.00x | "
                  f"{(tokens[s] == tokens['native']).float().mean().item() * 100 if 'native' in tokens else float('nan'):.1f}% "
                  f"| - | - | - |")
            continue
        nbytes = streamed_weight_bytes(pipes[s].prior)
        floor = steps * nbytes / (bw * 1e9) / args.batch
        vs_native = f"{base / med[s]:.2f}x" if base else "-"
        vs_peer = f"{med['peer'] / med[s]:.2f}x" if "peer" in med else "-"
        equal = (tokens[s] == tokens["native"]).float().mean().item() * 100 if "native" in tokens else float("nan")
        print(f"| {s} | {med[s] * 1e3:.1f} | {vs_native} | {vs_peer} | {equal:.1f}% | {nbytes / 1e6:.0f} "
              f"| {floor * 1e3:.1f} | {med[s] / floor:.2f} |", flush=True)
    if args.steps:
        step_table({m: p.prior for m, p in pipes.items()}, len(labels), 5 * args.repeats)


def step_table(priors: dict, batch: int, rounds: int) -> None:
    """One single and one group step of each prior (--steps in the module docstring)."""
    pcfg = next(iter(priors.values())).config
    plan = pcfg.generation_plan()
    kinds = {"single": plan[1], "group": plan[-1]}
    counts = {"single": sum(1 for st in plan[1:] if st.stop - st.start == 1),
              "group": sum(1 for st in plan[1:] if st.stop - st.start > 1)}
    gen = torch.Generator().manual_seed(0)
    runs, times = {}, {}
    with torch.inference_mode():
        for m, prior in priors.items():
            prior.setup_caches(2 * batch)
            labels = torch.tensor([3] * batch + [prior.null_class] * batch)
            tokens = torch.randint(0, pcfg.vocab_size, (2 * batch, pcfg.block_size), generator=gen)
            for kind, st in kinds.items():
                w = prior.step_weights(st.start)
                runs[m, kind] = lambda w=w, st=st, labels=labels, tokens=tokens: ps.prior_step(
                    w, labels, tokens, st.start, st.stop)
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(rounds):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times.setdefault(key, []).append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = 2 * batch
    print(f"\n# one step of each kind, prior_step (no draw), {rounds} round-robin rounds, medians; the plan has "
          f"{counts['single']} single steps ({rows} rows) and {counts['group']} group steps "
          f"({rows * (kinds['group'].stop - kinds['group'].start)} rows) after the class step")
    print("| weights | single step ms | vs native | group step ms | vs native | singles + groups ms | vs native |")
    print("|---|---|---|---|---|---|---|")
    per = {m: {"single": med[m, "single"], "group": med[m, "group"],
               "total": counts["single"] * med[m, "single"] + counts["group"] * med[m, "group"]} for m in priors}
    base = per.get("native")

    def vs(m: str, kind: str) -> str:
        return f"{base[kind] / per[m][kind]:.2f}x" if base else "-"

    for m, t in per.items():
        print(f"| {m} | {t['single'] * 1e3:.2f} | {vs(m, 'single')} | {t['group'] * 1e3:.2f} | {vs(m, 'group')} | "
              f"{t['total'] * 1e3:.1f} | {vs(m, 'total')} |", flush=True)


if __name__ == "__main__":
    main()
