"""The cost of batch invariance: the engine as it is vs its old shape-dependent paths, one process.

Batch invariance (an image is the same bits at any batch size) took two changes, and this times
both against what they replaced, on the same weights, labels and seeds:
  - prior: every linear runs decode_gemm at any row count; before, calls above a crossover
    (192 rows in bf16, 256 in fp32 and int8) ran F.linear (oneDNN / MKL, whose kernels and
    summation orders depend on M). Group steps of batch B with CFG have M = 16 B rows.
  - decoder: one image per pass; before, the whole batch in one pass.
"old" re-creates those paths in this process (a patched DecodeLinear.forward and a batched
decode), so the ratio is measured side by side. Per batch size: seconds per generation + decode
(median of --repeats after one warm-up), images/s, old/new, and whether the old path kept the
lone-call bits (it does not above the crossover, which is the bug this removed).

    python -m benchmarks.bench_batch_invariance                          # default model, fp32 and bf16
    python -m benchmarks.bench_batch_invariance --preset detailflow16 --batch 1 16 --dtype bf16
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from detailflow_engine import DetailFlowPipeline
from detailflow_engine.linear import DecodeLinear
from detailflow_engine.ops.vq_lookup import vq_lookup
from detailflow_engine.tokenizer import Tokenizer

OLD_MAX_ROWS = {torch.float32: 256, torch.bfloat16: 192, torch.int8: 256}


def _batched_decode(self, codes, num_tokens=None, img_size=None):
    """The old Tokenizer.decode: the whole batch in one decoder pass."""
    t = codes.shape[1] if num_tokens is None else num_tokens
    size = self.schedule.decode_size(t) if img_size is None else img_size
    dec = self.decoder
    z = vq_lookup(codes[:, :t], self.quantize.embedding.weight, self.post_quant_conv.weight,
                  self.post_quant_conv.bias, dec.latent_pos_embed[0])
    g = size // dec.patch_size
    grid = dec.visual_model.embeddings(dec.mask_token.expand(codes.shape[0], g * g, -1), g, g)
    x = dec.visual_model(torch.cat((grid, z), dim=1), None)
    return dec.to_pixel(x[:, :g * g]).float()


@contextlib.contextmanager
def old_paths():
    """The pre-invariance engine: F.linear above the old crossover, the decoder batched."""
    forward, decode = DecodeLinear.forward, Tokenizer.decode

    def switched(self, x):
        if x.numel() // self.in_features > OLD_MAX_ROWS.get(self.dtype, 0):
            return self._torch(x)
        return forward(self, x)

    DecodeLinear.forward, Tokenizer.decode = switched, torch.inference_mode()(_batched_decode)
    try:
        yield
    finally:
        DecodeLinear.forward, Tokenizer.decode = forward, decode


def load(args, dtype: str, weights: str) -> DetailFlowPipeline:
    if args.preset == "default":
        return DetailFlowPipeline.from_pretrained(device="cpu", dtype=dtype, weights=weights)
    from detailflow_engine.presets import preset_configs, randomize_
    from detailflow_engine.loading import prepare_prior
    from detailflow_engine.prior import Prior

    pcfg, tcfg = preset_configs(args.preset)
    prior = prepare_prior(randomize_(Prior(pcfg), 0), dtype, weights)
    tok = randomize_(Tokenizer(tcfg), 1).eval()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return DetailFlowPipeline(prior, tok.to(dtype=torch_dtype).requires_grad_(False))


def timed(pipe, labels, repeats):
    pipe.generate(labels, seed=0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = pipe.generate(labels, seed=0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", help="'default' (the embedded model) or detailflow16 (random)")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--weights", default="native", choices=["native", "int8"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 200])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"# {args.preset}, weights {args.weights}, cpu, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; median of {args.repeats} after a warm-up; generation + decode")
    print("| dtype | batch | invariant s | old s | invariant img/s | old img/s | old/invariant | old = lone calls |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype:
        pipe = load(args, dtype, args.weights)
        classes = pipe.prior.config.num_classes
        for b in args.batch:
            labels = [i % classes for i in range(b)]
            new_s, new = timed(pipe, labels, args.repeats)
            with old_paths():
                old_s, old = timed(pipe, labels, args.repeats)
            same = torch.equal(old.tokens, new.tokens) and torch.equal(old.pixels, new.pixels)
            print(f"| {dtype} | {b} | {new_s:.3f} | {old_s:.3f} | {b / new_s:.1f} | {b / old_s:.1f} | "
                  f"{old_s / new_s:.2f}x | {'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
