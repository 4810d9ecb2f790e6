"""prior_step (CPU): a decode step in one extension call vs its composition, per step and end to end.

    python benchmarks/bench_prior_step.py                    # per step, embedded default model
    python benchmarks/bench_prior_step.py --model --repeats 9
    python benchmarks/bench_prior_step.py --detailflow16     # DetailFlow-16 size: must not get slower

Per step: one line per (dtype, step kind): the kernel (embeddings + every layer + head, one
call) and the composition (`prior_step_ref`: torch's embedding, decode_layers -- itself one
extension call for all layers -- and the head's decode_gemm, with Python between) on the same
prior and inputs, batch 1 with CFG (2 rows), and the ratio.

--model: the embedded default model, batch 1, CFG 1.45, greedy, generate_tokens (prior only:
the op's whole effect) with the kernel and with the composition in its CPU entry's place (the
one table entry swapped), interleaved `--repeats` times (median). --detailflow16: the same at
DetailFlow-16 size with random weights, fp32.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import detailflow_engine  # noqa: E402,F401 - first: its OpenMP wait policy must precede torch's libgomp
import torch  # noqa: E402

from benchmarks._timing import bench, run_model_bench  # noqa: E402
from benchmarks.bench_decode_layer import interleaved  # noqa: E402
from detailflow_engine.ops import _dispatch, prior_step as ps  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def composition():
    """prior_step's CPU entry replaced by the composition for the duration."""
    _dispatch.register("prior_step", "cpu", ps.prior_step_ref, applies=ps._cpu_applies)
    try:
        yield
    finally:
        _dispatch.register("prior_step", "cpu", ps._cpu_impl, applies=ps._cpu_applies)


def _steps(prior):
    """(kind, step) of the plan: the class step, a single step, the last group step."""
    plan = prior.config.generation_plan()
    c = prior.config.causal_num
    return (("class", plan[0]), ("single", plan[1]), ("group", plan[c if c < len(plan) else -1]))


def bench_steps(target_s: float) -> None:
    from detailflow_engine.assets import default_model_paths
    from detailflow_engine.loading import load_prior

    print("| model | dtype | step | positions | kernel us | composition us | composition/kernel |")
    print("|---|---|---|---|---|---|---|")
    for dname, dtype in DTYPES.items():
        prior = load_prior(default_model_paths()[0], dtype=dtype)
        prior.setup_caches(2)
        T = prior.config.block_size
        labels = torch.tensor([3, prior.null_class])
        tokens = torch.randint(0, prior.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
        for kind, step in _steps(prior):
            with torch.inference_mode():
                w = prior.step_weights(step.start)
                run = lambda: ps.prior_step(w, labels, tokens, step.start, step.stop)  # noqa: E731
                kernel = bench(run, target_s=target_s).median_s
                with composition():
                    comp = bench(run, target_s=target_s).median_s
            print(f"| default | {dname} | {kind} | {step.stop - step.start} | {kernel * 1e6:.1f} | "
                  f"{comp * 1e6:.1f} | {comp / kernel:.2f}x |", flush=True)


def _generate_sides(pipe, cfg_scale: float) -> dict:
    def kernel():
        return pipe.generate_tokens([3], cfg_scale=cfg_scale, top_k=1)[0]

    def comp():
        with composition():
            return kernel()

    return {"engine (prior_step kernel)": kernel, "engine (composition)": comp}


def bench_model(repeats: int, cfg_scale: float) -> None:
    from detailflow_engine.pipeline import DetailFlowPipeline

    pipe = DetailFlowPipeline.from_pretrained()
    interleaved(_generate_sides(pipe, cfg_scale), repeats,
                f"embedded default model, batch 1, CFG {cfg_scale}, greedy, prior tokens only, fp32")


def bench_detailflow16(repeats: int, cfg_scale: float) -> None:
    from detailflow_engine.loading import prepare_prior
    from detailflow_engine.pipeline import DetailFlowPipeline
    from detailflow_engine.presets import preset_configs, randomize_
    from detailflow_engine.prior import Prior

    pcfg, _ = preset_configs("detailflow16")
    pipe = DetailFlowPipeline(prepare_prior(randomize_(Prior(pcfg), 0), torch.float32), None)
    interleaved(_generate_sides(pipe, cfg_scale), repeats,
                f"DetailFlow-16 size (random weights), batch 1, CFG {cfg_scale}, greedy, prior tokens only, fp32")


def main() -> None:
    run_model_bench(__doc__, "step", f"prior_step CPU kernel: {'yes' if ps._HAS_KERNEL else 'NO (composition only)'}",
                    bench_steps, bench_model, bench_detailflow16)


if __name__ == "__main__":
    main()
