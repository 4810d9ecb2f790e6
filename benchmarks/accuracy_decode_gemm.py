"""Accuracy cost of the engine's weight modes: bf16, int8, int4, w8a8 and w4a8 against fp32.

For each mode (dtype bf16 + native weights, dtype fp32 + int8 weights, dtype bf16 + int8
weights) against the fp32 engine, on

  * the golden fixture tiny-a (tests/fixtures/tiny-a, or $DETAILFLOW_FIXTURES), loaded with
    `load_prior(path, dtype=..., weights=...)`, its golden labels, CFG 1.5;
  * DetailFlow-16-size random weights (presets.py: GPT-L, 24 x 1024, vocab 8192), quantized in
    memory the way load_prior does it (the same `_quantize_blocks`), batch `--batch`, CFG 1.5;

it reports
  * teacher-forced: every step fed the fp32 engine's greedy tokens (identical inputs), the max
    |logit - logit_fp32| over all positions (and relative to max |logit_fp32|), and the greedy
    agreement: the fraction of positions whose CFG-mixed argmax equals fp32's;
  * free-running: greedy generation (top_k = 1) of each mode, the fraction of tokens equal to the
    fp32 engine's, and the first position where they differ (a single flip changes the prefix
    of all later steps, so this is the stricter number).

Random weights give near-uniform logits (many near-ties), so their greedy agreement is a
pessimistic stress number, not a model-quality number.

    OMP_NUM_THREADS=2 python benchmarks/accuracy_decode_gemm.py            # both
    python benchmarks/accuracy_decode_gemm.py --skip-random                # fixtures only
    python benchmarks/accuracy_decode_gemm.py --skip-random --default-model --batch 10   # + the embedded model
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detailflow_engine.loading import load_prior  # noqa: E402
from detailflow_engine.pipeline import DetailFlowPipeline
from detailflow_engine.schedule import cfg_scale_for_step  # noqa: E402
from detailflow_engine.presets import preset_configs, randomize_  # noqa: E402
from detailflow_engine.prior import Prior  # noqa: E402

MODES = [("bf16", "native"), ("fp32", "int8"), ("bf16", "int8"), ("fp32", "int4"), ("bf16", "int4"),
         ("fp32", "w8a8"), ("bf16", "w8a8"), ("fp32", "w4a8"), ("bf16", "w4a8")]
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.inference_mode()
def teacher_forced_logits(prior: Prior, labels: torch.Tensor, tokens: torch.Tensor, cfg_scale: float):
    """CFG-mixed fp32 logits (B, T, V) of every position, with `tokens` (B, T) as the prefix."""
    B, T = tokens.shape
    rows = torch.cat([labels, torch.full_like(labels, prior.null_class)])
    toks = torch.cat([tokens, tokens])
    prior.setup_caches(rows.shape[0])
    plan = prior.config.generation_plan(T)
    out = []
    for step in plan:
        x = prior.step_embeddings(rows, toks, step.start, step.stop)
        lg = prior.forward_step(x, step.start).float()
        s = cfg_scale_for_step(cfg_scale, step.group_index, T // prior.config.group_size, False)
        c, u = lg[:B], lg[B:]
        out.append(u + s * (c - u))
    return torch.cat(out, dim=1)


def compare(name: str, models: dict, labels, cfg_scale: float) -> list:
    base = DetailFlowPipeline(models[("fp32", "native")], None)
    tokens32, _ = base.generate_tokens(labels.tolist(), cfg_scale=cfg_scale, top_k=1)
    ref = teacher_forced_logits(base.prior, labels, tokens32, cfg_scale)
    scale = ref.abs().max().item()
    lines = []
    for mode in MODES:
        prior = models[mode]
        lg = teacher_forced_logits(prior, labels, tokens32, cfg_scale)
        err = (lg - ref).abs().max().item()
        agree_tf = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        toks, _ = DetailFlowPipeline(prior, None).generate_tokens(labels.tolist(), cfg_scale=cfg_scale, top_k=1)
        same = toks == tokens32
        agree_fr = same.float().mean().item()
        diff_pos = (~same).any(0).nonzero()
        first = int(diff_pos[0]) if diff_pos.numel() else None
        lines.append(f"| {name} | {mode[0]} | {mode[1]} | {err:.3g} | {err / scale:.2%} | {agree_tf:.1%} | "
                     f"{agree_fr:.1%} | {first if first is not None else 'none'} |")
        print(lines[-1], flush=True)
    return lines


def fixtures_dir() -> Path:
    repo = Path(__file__).resolve().parents[1]
    return Path(os.environ.get("DETAILFLOW_FIXTURES") or repo / "tests" / "fixtures") / "tiny-a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-random", action="store_true", help="fixtures only")
    ap.add_argument("--skip-fixtures", action="store_true")
    ap.add_argument("--default-model", action="store_true",
                    help="also the embedded default model (DetailFlowPipeline.from_pretrained() with no args)")
    ap.add_argument("--batch", type=int, default=2, help="images for the random-weight model")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"# threads={torch.get_num_threads()}; CFG {args.cfg}; greedy (top_k=1)")
    print("| model | dtype | weights | max abs logit err (teacher-forced) | of max logit | greedy argmax "
          "agreement (teacher-forced) | token agreement (free-running) | first differing token |")
    print("|---|---|---|---|---|---|---|---|")
    if not args.skip_fixtures:
        tiny = fixtures_dir()
        if not tiny.is_dir():
            print(f"# fixtures not found at {tiny}; skipped")
        else:
            with np.load(tiny / "golden.npz") as npz:
                labels = torch.from_numpy(npz["gen_labels"])
            models = {(d, w): load_prior(tiny / "prior", device="cpu", dtype=d, weights=w)
                      for d, w in [("fp32", "native")] + MODES}
            compare("tiny-a", models, labels, args.cfg)
    if args.default_model:
        from detailflow_engine.assets import default_model_paths

        prior_path = default_model_paths()[0]
        models = {(d, w): load_prior(prior_path, device="cpu", dtype=d, weights=w) for d, w in [("fp32", "native")] + MODES}
        labels = torch.arange(args.batch) % models[("fp32", "native")].config.num_classes
        compare("default model", models, labels, args.cfg)
    if not args.skip_random:
        from detailflow_engine.loading import prepare_prior

        pcfg, _ = preset_configs("detailflow16")
        base = prepare_prior(randomize_(Prior(pcfg), seed=args.seed), torch.float32)
        state = base.state_dict()
        models = {("fp32", "native"): base}
        for d, w in MODES:
            m = Prior(pcfg)
            m.load_state_dict(state)
            models[(d, w)] = prepare_prior(m, DT[d], w)
        g = torch.Generator().manual_seed(args.seed)
        labels = torch.randint(0, pcfg.num_classes, (args.batch,), generator=g)
        compare("DetailFlow-16 random", models, labels, args.cfg)


if __name__ == "__main__":
    main()
