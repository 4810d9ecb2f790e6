"""Extract prior training codes from a trained tokenizer (official ``extract_codes_c2i.py`` semantics).

    python -m detailflow_ref.extract_codes --vq-path out/tokenizer --data fashion-mnist --out out/codes.npz

For every image and its horizontal flip, with T = the schedule's token count for the image
size, the tokenizer (eval mode) gives three code sequences of length T:

* ``clean``:  the plain encoding;
* ``input``:  clean before i, a random code among the ``--top-k`` nearest codewords on [i, e),
  then the codes re-encoded from that perturbed prefix (refine_conv + refined_tokens) from e on;
* ``target``: clean before e, the same re-encoded codes from e on;

where i is drawn per image (shared by the image and its flip) as the official
``get_noise_token_idx(T)``: uniform in [0, T - g), floored to a group start when >= causal_num,
and e = i + 1 before causal_num, i + g after. So input[:i] == clean[:i], target[:e] == clean[:e]
and input[e:] == target[e:]. Without correction training only ``clean`` is stored.

Output: one ``.npz`` (our own format, ``format = detailflow-codes``, version 1):

    codes        int16/int32 (N, A, T, K)  A = 2 (image, flip) or 1 (--no-flip);
                                           K = 3 (clean, input, target) or 1 (clean only)
    labels       int64 (N,)
    noise_idx    int16 (N,)                perturbation start i (-1: none)
    config_json  str (0-d)                 the tokenizer's config.json + ar_image_size, ar_token_num
                                           (what the official extraction writes beside its codes)
    meta_json    str (0-d)                 format, version, tokenizer path, data, split, sizes,
                                           num_classes, top_k, seed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from detailflow_engine.checkpoint import load_checkpoint

from . import train_common as tc
from .datasets import load_dataset_tensors
from .self_correction import noise_token_index, self_correction_encode
from .tokenizer import VQModel

FORMAT = "detailflow-codes"
VERSION = 1


def load_training_tokenizer(path, ema: bool = False, device="cpu") -> VQModel:
    """A tokenizer with its self-correction modules (refine_conv, refined_tokens) from a .pt / folder."""
    loaded = load_checkpoint(path, "tokenizer", ema=ema, skip_prefixes=())
    model = VQModel(loaded.config, training_modules=True)
    expected = set(model.state_dict())
    missing = sorted(expected - set(loaded.state_dict))
    if missing:
        optional = [k for k in missing if k.startswith("quantize.codebook_used")]
        if len(optional) != len(missing):
            raise ValueError(f"{loaded.weights_path}: lacks the self-correction weights {missing[:5]} "
                             f"(extract from a training .pt checkpoint, not a converted inference file)")
    model.load_state_dict(loaded.state_dict, strict=not missing)
    return model.to(device).eval()


@torch.no_grad()
def extract(model: VQModel, images_u8: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
            flip: bool = True, top_k: int = 50, device="cpu", mixed_precision: str = "none",
            progress: bool = False, cpu_bf16: bool = False):
    """Codes for uint8 images (N, 3, S, S): returns (codes (N, A, T, K) int64, noise_idx (N,) int64)."""
    device = torch.device(device)
    sched = model.schedule
    T = sched.best_tokens(images_u8.shape[-1])
    g, c = sched.group_size, sched.causal_num
    correction = bool(model.config.correction_training)
    n = images_u8.shape[0]
    out_codes, out_noise = [], []
    bar = tc.progress(n, 0, progress, "extract")
    for lo in range(0, n, batch_size):
        x = images_u8[lo:lo + batch_size].to(device).float() / 127.5 - 1.0
        b = x.shape[0]
        views = torch.cat([x, x.flip(-1)]) if flip else x
        a = 2 if flip else 1
        if correction:
            idx = [noise_token_index(T, g, c) for _ in range(b)]
            noise = torch.tensor([-1 if v is None else v for v in idx], dtype=torch.long, device=device)
            noise_views = noise.repeat(a)
        else:
            noise = torch.full((b,), -1, dtype=torch.long, device=device)
        with tc.autocast(device, mixed_precision, cpu_bf16):
            if correction:
                enc = self_correction_encode(model, views, T, noise_views, top_k)
                codes = torch.stack([enc.codes, enc.input_codes, enc.target_codes], dim=-1)
            else:
                enc = self_correction_encode(model, views, T, None)
                codes = enc.codes[..., None]
        codes = codes.view(a, b, T, -1).transpose(0, 1)  # (b, A, T, K): [image, flip]
        out_codes.append(codes.cpu())
        out_noise.append(noise.cpu())
        bar.update(b)
    bar.close()
    return torch.cat(out_codes), torch.cat(out_noise)


def save_codes(path, codes: torch.Tensor, labels: torch.Tensor, noise_idx: torch.Tensor, config: dict,
               meta: dict, overwrite: bool = False) -> Path:
    """Write the .npz atomically; an existing file is refused unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.int16 if int(meta["codebook_size"]) <= np.iinfo(np.int16).max else np.int32
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes.numpy().astype(dtype), labels=labels.numpy().astype(np.int64),
                     noise_idx=noise_idx.numpy().astype(np.int16), config_json=np.array(json.dumps(config)),
                     meta_json=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_codes(path) -> dict:
    """Read a codes file: {'codes', 'labels', 'noise_idx' (numpy), 'config', 'meta' (dicts)}."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"]))
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} file (meta {meta})")
        return {"codes": z["codes"], "labels": z["labels"], "noise_idx": z["noise_idx"],
                "config": json.loads(str(z["config_json"])), "meta": meta}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m detailflow_ref.extract_codes", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vq-path", required=True, help="tokenizer model folder or checkpoints/<N>.pt")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist', 'synthetic[:N]' or an image folder")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="train", choices=["train", "test"], help="Fashion-MNIST split")
    p.add_argument("--num-classes", type=int, default=None, help="default: max label + 1")
    p.add_argument("--ema", action="store_true", help="use the tokenizer's 'ema' weights")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="also encode the flip")
    p.add_argument("--top-k", type=int, default=50, help="near-neighbour candidates for the perturbation")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (x2 with the flip)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--mixed-precision", default="bf16", choices=["none", "bf16"], help="autocast dtype on CUDA (CPU runs fp32)")
    p.add_argument("--cpu-bf16", action="store_true", help=tc.CPU_BF16_HELP)
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = tc.resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    tc.seed_everything(args.global_seed)
    model = load_training_tokenizer(args.vq_path, ema=args.ema, device=device)
    size = model.config.image_size
    imgs, labels = load_dataset_tensors(args.data, size, args.data_root, split=args.split)
    if args.limit:
        imgs, labels = imgs[:args.limit], labels[:args.limit]
    codes, noise = extract(model, imgs, labels, args.batch_size, args.flip, args.top_k, device,
                           args.mixed_precision, args.progress, args.cpu_bf16)
    T = codes.shape[2]
    config = dict(model.config.raw_json, ar_image_size=size, ar_token_num=T)
    meta = {"format": FORMAT, "version": VERSION, "tokenizer_path": str(Path(args.vq_path).resolve()),
            "tokenizer_ema": args.ema, "data": args.data, "split": args.split, "image_size": size,
            "num_tokens": T, "group_size": model.config.group_size, "causal_num": model.config.causal_num,
            "codebook_size": model.config.codebook_size,
            "num_classes": args.num_classes or int(labels.max()) + 1, "flip": args.flip,
            "correction": codes.shape[-1] == 3, "top_k": args.top_k, "seed": args.global_seed}
    save_codes(out, codes, labels, noise, config, meta, overwrite=args.overwrite)
    print(f"wrote {out}: codes {tuple(codes.shape)}, {len(labels)} labels", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
