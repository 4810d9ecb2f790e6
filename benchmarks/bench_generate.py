"""End to end: engine (KV cache + our kernels) vs the reference generation (official semantics).

Same random weights at DetailFlow-16 size (GPT-L prior, SigLIP2-base decoder at 256 px), same
labels, CFG 1.45, greedy (top_k=1) so all make the same tokens; generation + decode per image
(`--tokens-only`: the prior's token generation alone), timed in one process. Three sides: the
engine, the reference (official full-prefix semantics, fp32 on the CPU) and the peer
(detailflow_ref.kv_generate: a plain-torch KV-cache implementation of the same model in the
engine's dtype, nothing of ours on its path). Prints a table row per batch size: time per image,
images/s, reference/engine and peer/engine, token agreement, and the engine's distance from two
floors measured in the same run:
  - weight floor: steps x prior weights streamed once per step / measured read bandwidth;
  - matmul floor: the FLOPs of the prior (all positions, CFG rows) and of the decoder's GEMMs /
    the measured dense matmul rate of this dtype.

    python benchmarks/bench_generate.py --batch 1 8                       # CPU, fp32
    python benchmarks/bench_generate.py --device cuda --dtype bf16 --batch 1 32 256
    python benchmarks/bench_generate.py --device cuda --dtype bf16 --reference compile --skip-engine
    python benchmarks/bench_generate.py --device cuda --dtype bf16 --no-cuda-graphs
    python benchmarks/bench_generate.py --dtype bf16 --weights int8 --tokens-only --batch 1 --skip-reference
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import time

import torch

from detailflow_engine.device_dtype import WEIGHT_MODES, WEIGHTS_HELP
from detailflow_engine.loading import prepare_prior
from detailflow_engine.pipeline import DetailFlowPipeline
from detailflow_engine.presets import preset_configs, randomize_
from detailflow_engine.prior import Prior
from detailflow_engine.profiling.analysis import linear_weight_elems, streamed_weight_bytes
from detailflow_engine.tokenizer import Tokenizer
from detailflow_ref.generate import generate as ref_generate
from detailflow_ref.kv_generate import KVCachePeer, kv_cache_generate
from detailflow_ref.gpt import Transformer
from detailflow_ref.tokenizer import VQModel

try:
    from benchmarks._timing import bench, read_bandwidth_gbs
except ImportError:  # python benchmarks/bench_generate.py: sys.path has this folder, not the root
    from _timing import bench, read_bandwidth_gbs


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def build(preset: str, dtype: torch.dtype, seed: int, device: torch.device, ref_dtype: torch.dtype,
          weights: str = "native", peer: bool = True):
    pcfg, tcfg = preset_configs(preset)
    ref_prior = randomize_(Transformer(pcfg), seed).eval()
    ref_tok = randomize_(VQModel(tcfg), seed + 1).eval()
    prior = Prior(pcfg)
    prior.load_state_dict(ref_prior.state_dict())
    tok = Tokenizer(tcfg)
    tok.load_state_dict(ref_tok.state_dict())
    pipe = DetailFlowPipeline(prepare_prior(prior.to(device), dtype, weights), tok.to(device=device, dtype=dtype).eval())
    # the peer: the reference's modules in the engine's dtype (its own copy when the dtypes differ)
    peer_prior = None
    if peer:
        peer_prior = (copy.deepcopy(ref_prior) if dtype != ref_dtype else ref_prior)
        peer_prior = peer_prior.to(device=device, dtype=dtype).requires_grad_(False)
    ref_prior = ref_prior.to(device=device, dtype=ref_dtype).requires_grad_(False)
    ref_tok = ref_tok.to(device=device, dtype=ref_dtype).requires_grad_(False)
    return ref_prior, ref_tok, pipe, peer_prior


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate of this device and dtype, measured now (random data)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = bench(lambda: a @ b, device=str(device), target_s=0.5 if device.type == "cuda" else 1.0)
    return 2 * n ** 3 / t.median_s / 1e12


def flops_per_image(pipe, cfg_scale: float) -> tuple:
    """(prior, prior + decoder) FLOPs: the prior 2 x streamed weights x positions (x2 rows with
    CFG) + attention; the decoder its linears."""
    pc = pipe.prior.config
    rows = 2 if cfg_scale > 1 else 1
    lin = linear_weight_elems(pipe.prior)
    positions = pc.block_size + 1
    attn = 4 * pc.n_layer * pc.dim * positions * positions / 2  # QK^T and PV over the causal half
    prior = rows * (2 * lin * positions + attn)
    dec = pipe.tokenizer.decoder
    dec_lin = sum(m.weight.numel() for m in dec.modules() if isinstance(m, torch.nn.Linear))
    size = pipe.tokenizer.schedule.decode_size(pc.block_size)
    n_tokens = (size // dec.patch_size) ** 2 + pc.block_size
    return prior, prior + 2 * dec_lin * n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="detailflow16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--reference-dtype", default=None, choices=["fp32", "bf16"],
                    help="default: fp32 on the CPU (the official dtype), the engine's dtype on CUDA")
    ap.add_argument("--cfg-scale", type=float, default=1.45)
    ap.add_argument("--reference", default="eager", choices=["eager", "compile", "none"])
    ap.add_argument("--skip-reference", action="store_true", help="same as --reference none")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-peer", action="store_true", help="no plain-torch KV-cache peer column")
    ap.add_argument("--weights", default="native", choices=WEIGHT_MODES, help=WEIGHTS_HELP)
    ap.add_argument("--tokens-only", action="store_true", help="time token generation only (no decode)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--repeats", type=int, default=None, help="engine repeats (median); default 2 on CPU, 5 on CUDA")
    ap.add_argument("--json", default=None, help="also append one JSON object per row to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    dtype = dtypes[args.dtype]
    ref_dtype = dtypes[args.reference_dtype] if args.reference_dtype else (dtype if device.type == "cuda" else torch.float32)
    reference = "none" if args.skip_reference else args.reference
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    torch.manual_seed(0)
    ref_prior, ref_tok, pipe, peer_prior = build(args.preset, dtype, 0, device, ref_dtype, args.weights,
                                                 peer=not args.skip_peer)
    pipe.cuda_graphs = not args.no_cuda_graphs
    if reference == "compile":
        ref_prior = torch.compile(ref_prior, dynamic=True)
    pcfg = pipe.prior.config
    weight_bytes = streamed_weight_bytes(pipe.prior)  # as held (packed); embeddings are gathered
    steps = len(pcfg.generation_plan())
    bw = read_bandwidth_gbs(str(device), nbytes=(2 << 30) if device.type == "cuda" else (512 << 20))
    tflops = matmul_tflops(device, dtype)
    flops_prior, flops = flops_per_image(pipe, args.cfg_scale)
    graphs = "graphs" if (device.type == "cuda" and pipe.cuda_graphs) else "no graphs"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    what = "tokens only" if args.tokens_only else "generation + decode"
    print(f"# {name} preset={args.preset} dtype={args.dtype} weights={args.weights} {what} "
          f"reference={reference}/{str(ref_dtype)[6:]} peer={'none' if peer_prior is None else args.dtype} "
          f"{graphs} steps={steps} prior weights streamed/step={weight_bytes / 1e6:.0f} MB "
          f"read_bw={bw:.1f} GB/s matmul={tflops:.1f} TFLOP/s flops/img={flops / 1e9:.1f} G")
    print("| batch | engine ms/img | engine img/s | reference ms/img | reference img/s | ratio | peer ms/img "
          "| peer/engine | tokens equal (ref, peer) | weight floor ms/img | floor/engine | matmul floor ms/img "
          "| matmul/engine | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b in args.batch:
        labels = [(7 * i + 3) % pcfg.num_classes for i in range(b)]
        lab = torch.tensor(labels, device=device)
        eng, out = float("nan"), None
        if not args.skip_engine:
            def run_engine():
                if args.tokens_only:
                    return pipe.generate_tokens(labels, cfg_scale=args.cfg_scale, top_k=1)[0]
                return pipe.generate(labels, cfg_scale=args.cfg_scale, top_k=1).tokens

            run_engine()  # warm-up (captures the graphs)
            eng, out = timed(run_engine, device, repeats)
            eng /= b
        peer_s, peer_equal = float("nan"), "-"
        if peer_prior is not None:
            cache = KVCachePeer(peer_prior, 2 * b if args.cfg_scale > 1 else b)

            def run_peer():
                with torch.inference_mode():
                    toks = kv_cache_generate(peer_prior, lab, cfg_scale=args.cfg_scale, top_k=1, peer=cache)
                    if not args.tokens_only:
                        ref_tok.decode_code(toks)
                return toks

            run_peer()  # warm-up
            peer_s, peer_tokens = timed(run_peer, device, repeats)
            peer_s /= b
            if out is not None:
                peer_equal = f"{(peer_tokens.cpu() == out.cpu()).float().mean().item() * 100:.1f}%"
        ref_s, equal = float("nan"), "-"
        if reference != "none":
            def run_ref():
                with torch.inference_mode():
                    toks = ref_generate(ref_prior, lab, cfg_scale=args.cfg_scale, top_k=1)
                    if not args.tokens_only:
                        ref_tok.decode_code(toks)
                return toks

            if device.type == "cuda" or reference == "compile":
                run_ref()  # warm-up (and compilation)
            ref_s, tokens = timed(run_ref, device, 1 if device.type == "cpu" else 3)
            ref_s /= b
            if out is not None:
                equal = f"{(tokens.cpu() == out.cpu()).float().mean().item() * 100:.1f}%"
        floor = steps * weight_bytes / (bw * 1e9) / b
        mm_floor = (flops_prior if args.tokens_only else flops) / (tflops * 1e12)
        row = dict(batch=b, engine_ms=eng * 1e3, engine_ips=1 / eng, reference_ms=ref_s * 1e3,
                   reference_ips=1 / ref_s, ratio=ref_s / eng, peer_ms=peer_s * 1e3, peer_ratio=peer_s / eng,
                   tokens_equal=equal, peer_tokens_equal=peer_equal, weight_floor_ms=floor * 1e3,
                   weight_frac=floor / eng, matmul_floor_ms=mm_floor * 1e3, matmul_frac=mm_floor / eng,
                   device=name, dtype=args.dtype, weights=args.weights, tokens_only=args.tokens_only,
                   reference=reference, graphs=graphs, read_bw_gbs=bw,
                   matmul_tflops=tflops)
        print(f"| {b} | {eng * 1e3:.3f} | {1 / eng:.1f} | {ref_s * 1e3:.3f} | {1 / ref_s:.1f} | {ref_s / eng:.2f}x "
              f"| {peer_s * 1e3:.3f} | {peer_s / eng:.2f}x | {equal}, {peer_equal} | {floor * 1e3:.3f} | {floor / eng * 100:.0f}% | {mm_floor * 1e3:.3f} "
              f"| {mm_floor / eng * 100:.0f}% | {peak_rss_gb():.1f} |", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
