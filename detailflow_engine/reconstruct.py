"""python -m detailflow_engine.reconstruct: encode images, decode them at several token budgets.

    python -m detailflow_engine.reconstruct cat.png dog.jpg --tokens 8,16,32,64,128 --out recon
    python -m detailflow_engine.reconstruct photo.png --tokenizer ByteVisionLab/DetailFlow-16 --out recon

Each image is center-cropped to a square, resized (bicubic) to the tokenizer's full-token input
size, encoded once to all its tokens, and decoded from the first t tokens for every budget t
(default: every scheduled step). Prefix t decodes at its schedule size; the strip
``{stem}_strip.png`` shows the budgets left to right, each NEAREST-upsampled to the largest
budget's size (the coarse pixels stay visible). Bad input (an unreadable image, a budget that is
not a scheduled prefix, an unusable --out or model) is one ``error: ...`` line and exit 2, with
nothing written.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from detailflow_engine import outputs
from detailflow_engine.generate import (EXIT_USAGE, UsageError, _one_line, _Parser, check_out_writable,
                                        resolve_model_arg)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m detailflow_engine.reconstruct",
                description="Encode images with a DetailFlow tokenizer and decode them coarse to fine.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--tokens", nargs="+", metavar="T", default=None,
                   help="token budgets, comma- or space-separated; each must be a scheduled prefix "
                        "(default: every scheduled step)")
    p.add_argument("--tokenizer", "--ckpt", dest="tokenizer", metavar="PATH|REPO",
                   help="tokenizer: model folder, .pt, .safetensors or Hugging Face repo id "
                        "(default: the embedded default model's tokenizer)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="default: fp32")
    p.add_argument("--batch-size", type=int, default=16, help="images per encode/decode pass (default: 16)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the strips")
    p.add_argument("--overwrite", action="store_true", help="replace strips already in --out")
    return p


def parse_budgets(tokens: Optional[List[str]], scheduled: List[int]) -> List[int]:
    """['8,16', '32'] -> [8, 16, 32] (sorted, unique); each must be a scheduled prefix length."""
    if tokens is None:
        return list(scheduled)
    items = [t for tok in tokens for t in re.split(r"[,\s]+", tok.strip()) if t]
    if not items:
        raise UsageError("--tokens is empty: give token budgets such as 8,16,32")
    budgets = []
    for t in items:
        try:
            budgets.append(int(t))
        except ValueError:
            raise UsageError(f"--tokens: {t!r} is not an integer") from None
    for t in budgets:
        if t not in scheduled:
            raise UsageError(f"--tokens: {t} is not a scheduled prefix of this tokenizer; valid: {scheduled}")
    return sorted(set(budgets))


MAX_IMAGE_PIXELS = 64_000_000  # an 8000 x 8000 photo; a larger header is a decompression bomb here


def read_image(path: Path) -> np.ndarray:
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UsageError(f"image {path} does not exist")
    if not path.is_file():  # a FIFO or device would block open() or stream forever
        raise UsageError(f"image {path} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # from the header: nothing decoded yet
                if w * h > MAX_IMAGE_PIXELS:
                    raise UsageError(f"image {path} is {w} x {h} = {w * h:,} pixels, more than the "
                                     f"{MAX_IMAGE_PIXELS:,} this tool decodes (a decompression bomb?)")
                return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UsageError(f"cannot read image {path}: {_one_line(e)}") from None


def to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Center crop to a square, resize (bicubic) to size x size -> (size, size, 3) uint8."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(np.ascontiguousarray(img[top:top + s, left:left + s]))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im)


def reconstruct(tokenizer, images: List[np.ndarray], budgets: List[int], batch_size: int = 16) -> List[List[np.ndarray]]:
    """uint8 images -> for each image, its decodes (s_t, s_t, 3) uint8 at each budget t."""
    import torch

    from detailflow_engine.pipeline import to_uint8

    size = tokenizer.schedule.encode_size(tokenizer.num_tokens)
    device = tokenizer.quant_conv.weight.device
    out = []
    for b in range(0, len(images), batch_size):
        batch = np.stack([to_square(im, size) for im in images[b:b + batch_size]])
        pixels = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        codes = tokenizer.encode(pixels)
        decodes = [to_uint8(tokenizer.decode(codes, num_tokens=t)).cpu().numpy() for t in budgets]
        out += [[d[k] for d in decodes] for k in range(batch.shape[0])]
    return out


def strip_name(path: Path) -> str:
    return f"{path.stem}_strip.png"


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _main(argv) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    check_out_writable(out)
    paths = [Path(p) for p in args.images]
    names = [strip_name(p) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"several images would write {dup[0]} (same file stem): rename or reconstruct them "
                         f"in separate runs")
    if not args.overwrite:
        present = [n for n in names if (out / n).exists()]
        if present:
            raise UsageError(f"--out {out} already holds {present[0]}: use --overwrite or a new --out")
    images = [read_image(p) for p in paths]  # every image is readable before anything is loaded or written

    from detailflow_engine.loading import load_tokenizer, resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {args.device}: {_one_line(e)}") from None
    if args.tokenizer is None:
        from detailflow_engine.assets import default_model_paths

        try:
            tok_path = default_model_paths()[1]
        except FileNotFoundError as e:
            raise UsageError(_one_line(e)) from None
    else:
        tok_path = resolve_model_arg("--tokenizer", args.tokenizer)
    try:
        tokenizer = load_tokenizer(tok_path, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors
        raise UsageError(f"cannot load the tokenizer {tok_path}: {_one_line(e)}") from None
    except Exception as e:  # anything else from a foreign file: still one line, no traceback
        raise UsageError(f"cannot load the tokenizer {tok_path}: {type(e).__name__}: {_one_line(e)}") from None
    budgets = parse_budgets(args.tokens, tokenizer.schedule.scheduled_tokens)

    try:
        decoded = reconstruct(tokenizer, images, budgets, args.batch_size)
    except NotImplementedError as e:
        raise UsageError(f"the tokenizer cannot run with --device {args.device} --dtype {args.dtype}: "
                         f"{_one_line(e)}") from None
    height = max(d.shape[0] for d in decoded[0])  # the largest budget's decode size
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {_one_line(e)}") from None
    try:
        for name, decodes in zip(names, decoded):
            outputs.save_png(out / name, outputs.progressive_strip(decodes, height))
    except OSError as e:  # disk full: every strip written so far is whole (atomic writes)
        raise UsageError(f"cannot write {e.filename or out}: {e.strerror or _one_line(e)}") from None
    outputs.fsync_dir(out)
    sizes = ", ".join(f"{t}->{d.shape[0]}px" for t, d in zip(budgets, decoded[0]))
    print(f"wrote {len(names)} strips to {out} (tokens -> decode size: {sizes}; strip height {height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
