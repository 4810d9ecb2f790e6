"""decode_layer (CPU): the fused layer vs the per-op composition, per layer and end to end.

    python benchmarks/bench_decode_layer.py                 # per layer, both model sizes
    python benchmarks/bench_decode_layer.py --model         # + the embedded model end to end
    python benchmarks/bench_decode_layer.py --model --skip-layers --repeats 7
    python benchmarks/bench_decode_layer.py --detailflow16 --skip-layers   # must not get slower

Per layer: one line per (size, rows, dtype, weights): the fused call and the composition
(`decode_layer_ref`, the prior's per-op path: the same decode_gemm / cache_attention kernels
with Python between them) on the same inputs, a step at position 25 of the cache, and the
ratio. Rows = B * n: 2 = batch 1 with CFG and one position, 8 / 16 = one group of 4 / 8 with CFG.

--model: the embedded default model (`DetailFlowPipeline.from_pretrained()`), batch 1, CFG
1.45, greedy, generation + decode, in one process, the sides interleaved `--repeats` times
(median): the engine as it runs (ops.prior_step: embeddings, all layers, head and draw in one
extension call a step), the engine with prior_step on its composition (decode_layers: all
layers in one call, the rest in Python: the path before prior_step), the fused kernel once a
layer through decode_layer (the path before decode_layers), the per-op composition in its
place (table entries swapped, all other ops unchanged), the plain-torch KV-cache peer
(detailflow_ref.kv_generate) and the official-semantics reference (detailflow_ref.generate),
both on the same weights in the engine's dtype, and the ratios.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import detailflow_engine  # noqa: E402,F401 - first: its OpenMP wait policy must precede torch's libgomp
import torch  # noqa: E402

from benchmarks._timing import bench, run_model_bench  # noqa: E402
from detailflow_engine.linear import DecodeLinear  # noqa: E402
from detailflow_engine.ops import _dispatch, decode_layer as dl, prior_step as ps  # noqa: E402

# (name, dim, n_head, ffn hidden, group size)
SIZES = (("default", 256, 8, 768, 4), ("detailflow16", 1024, 16, 2816, 8))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@contextlib.contextmanager
def cpu_entry(fn):
    """decode_layer's CPU entry swapped for `fn` for the duration, and prior_step on its
    composition (whose decode_layers call takes that entry; prior_step's own kernel would bypass it)."""
    _dispatch.register("decode_layer", "cpu", fn, applies=dl._cpu_applies)
    _dispatch.register("prior_step", "cpu", ps.prior_step_ref, applies=ps._cpu_applies)
    try:
        yield
    finally:
        _dispatch.register("decode_layer", "cpu", dl._cpu_impl, applies=dl._cpu_applies)
        _dispatch.register("prior_step", "cpu", ps._cpu_impl, applies=ps._cpu_applies)


def stack_path():
    """decode_layers (all layers, one extension call) with the embeddings, head and sampler around
    it in Python: the prior's path before prior_step."""
    return cpu_entry(dl._cpu_impl)


def per_op_path():
    """The composition in the CPU entry's place (what the prior ran before the op)."""
    return cpu_entry(dl.decode_layer_ref)


def _one_call_a_layer(h, y, w, k_cache, v_cache, freqs, start, eps):
    if not isinstance(w, dl.LayerStack):
        return dl._cpu_impl(h, y, w, k_cache, v_cache, freqs, start, eps)
    return dl.layer_by_layer(dl.decode_layer, h, y, w, freqs, start, eps)  # each via the wrapper


def layer_by_layer_path():
    """The fused kernel called once a layer through decode_layer (the prior's path before decode_layers)."""
    return cpu_entry(_one_call_a_layer)


def layer_inputs(dim, H, F, rows, dtype, weights, L=64, start=25, seed=0):
    g = torch.Generator().manual_seed(seed)

    def linear(k_in, k_out):
        lin = torch.nn.Linear(k_in, k_out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(k_out, k_in, generator=g) / math.sqrt(k_in))
        return DecodeLinear(lin if weights == "int8" else lin.to(dtype), weights).requires_grad_(False)

    B, n = (2, rows // 2)
    d = dim // H
    w = dl.LayerWeights(linear(dim, 3 * dim), linear(dim, dim), linear(dim, F), linear(dim, F), linear(F, dim),
                        torch.ones(dim, dtype=dtype), torch.ones(dim, dtype=dtype), H)
    h, y = (torch.randn(B, n, dim, generator=g).to(dtype) for _ in range(2))
    kc, vc = (torch.randn(B, H, L, d, generator=g).to(dtype) for _ in range(2))
    freqs = torch.randn(n, d // 2, 2, generator=g)
    return h, y, w, kc, vc, freqs, start


def bench_layers(target_s: float) -> None:
    print("| size | rows | dtype | weights | fused us | per-op us | per-op/fused |")
    print("|---|---|---|---|---|---|---|")
    for name, dim, H, F, group in SIZES:
        for rows in (2, 2 * group):
            for dname, dtype in DTYPES.items():
                for weights in ("native", "int8"):
                    args = layer_inputs(dim, H, F, rows, dtype, weights)
                    with torch.inference_mode():
                        fused = bench(lambda: dl.decode_layer(*args), target_s=target_s).median_s
                        with per_op_path():
                            comp = bench(lambda: dl.decode_layer(*args), target_s=target_s).median_s
                    print(f"| {name} | {rows} | {dname} | {weights} | {fused * 1e6:.1f} | {comp * 1e6:.1f} "
                          f"| {comp / fused:.2f}x |", flush=True)


def bench_model(repeats: int, cfg_scale: float) -> None:
    from detailflow_engine.pipeline import DetailFlowPipeline
    from detailflow_ref.generate import generate as ref_generate
    from detailflow_ref.gpt import Transformer
    from detailflow_ref.kv_generate import KVCachePeer, kv_cache_generate
    from detailflow_ref.tokenizer import VQModel

    pipe = DetailFlowPipeline.from_pretrained()
    ref_prior = Transformer(pipe.prior.config)
    ref_prior.load_state_dict(pipe.prior.state_dict())
    ref_prior = ref_prior.eval().requires_grad_(False)
    ref_tok = VQModel(pipe.tokenizer.config)
    ref_tok.load_state_dict(pipe.tokenizer.state_dict(), strict=False)
    ref_tok = ref_tok.eval().requires_grad_(False)
    labels = [3]
    lab = torch.tensor(labels)
    peer = KVCachePeer(ref_prior, 2)

    def engine():
        return pipe.generate(labels, cfg_scale=cfg_scale, top_k=1).tokens

    def engine_stack():
        with stack_path():
            return engine()

    def engine_per_op():
        with per_op_path():
            return engine()

    def engine_layer_by_layer():
        with layer_by_layer_path():
            return engine()

    def peer_run():
        with torch.inference_mode():
            toks = kv_cache_generate(ref_prior, lab, cfg_scale=cfg_scale, top_k=1, peer=peer)
            ref_tok.decode_code(toks)
        return toks

    def official():
        with torch.inference_mode():
            toks = ref_generate(ref_prior, lab, cfg_scale=cfg_scale, top_k=1)
            ref_tok.decode_code(toks)
        return toks

    sides = {"engine (prior_step: one call a step)": engine, "engine (decode_layers: one call for the layers)":
             engine_stack, "engine (one fused call a layer)": engine_layer_by_layer,
             "engine (per-op)": engine_per_op, "plain-torch KV cache": peer_run, "official semantics": official}
    interleaved(sides, repeats, f"embedded default model, batch 1, CFG {cfg_scale}, greedy, generation + decode, fp32")


def bench_detailflow16(repeats: int, cfg_scale: float) -> None:
    """DetailFlow-16 size (random weights), batch 1, prior tokens only: fused vs per-op."""
    from detailflow_engine.loading import prepare_prior
    from detailflow_engine.pipeline import DetailFlowPipeline
    from detailflow_engine.presets import preset_configs, randomize_
    from detailflow_engine.prior import Prior
    from detailflow_engine.tokenizer import Tokenizer

    pcfg, tcfg = preset_configs("detailflow16")
    pipe = DetailFlowPipeline(prepare_prior(randomize_(Prior(pcfg), 0), torch.float32), Tokenizer(tcfg).eval())

    def fused():
        return pipe.generate_tokens([3], cfg_scale=cfg_scale, top_k=1)[0]

    def stack():
        with stack_path():
            return fused()

    def per_op():
        with per_op_path():
            return fused()

    def layer_by_layer():
        with layer_by_layer_path():
            return fused()

    sides = {"engine (prior_step: one call a step)": fused, "engine (decode_layers: one call for the layers)": stack,
             "engine (one fused call a layer)": layer_by_layer, "engine (per-op)": per_op}
    interleaved(sides, repeats, f"DetailFlow-16 size (random weights), batch 1, CFG {cfg_scale}, greedy, "
                                f"prior tokens only, fp32")


def interleaved(sides: dict, repeats: int, what: str) -> None:
    """Warm each side up, run them in turn `repeats` times, print the medians as a table."""
    times = {k: [] for k in sides}
    tokens = {k: fn() for k, fn in sides.items()}  # warm-up
    for _ in range(repeats):
        for k, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    first = next(iter(sides))
    base, want = statistics.median(times[first]), tokens[first]
    print(f"# {what}, {torch.get_num_threads()} threads, median of {repeats} interleaved runs")
    print(f"| side | ms | side / {first} | tokens equal to its |")
    print("|---|---|---|---|")
    for k in sides:
        t = statistics.median(times[k])
        same = (tokens[k].cpu() == want.cpu()).float().mean().item() * 100
        print(f"| {k} | {t * 1e3:.1f} | {t / base:.2f}x | {same:.1f}% |", flush=True)


def main() -> None:
    built = hasattr(_dispatch.extension(), "decode_layer")
    run_model_bench(__doc__, "layer", f"decode_layer CPU kernel: {'yes' if built else 'NO (composition only)'}",
                    bench_layers, bench_model, bench_detailflow16)


if __name__ == "__main__":
    main()
