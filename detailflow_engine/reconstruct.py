"""python -m detailflow_engine.reconstruct: encode images, decode them at several token budgets.

    python -m detailflow_engine.reconstruct cat.png dog.jpg --tokens 8,16,32,64,128 --out recon
    python -m detailflow_engine.reconstruct photo.png --tokenizer ByteVisionLab/DetailFlow-16 --out recon

Each image is fitted to the tokenizer's full-token input size as its training data was
(``--fit``): ``pad`` centres it on a black square (Fashion-MNIST's 28x28 -> 32x32; a larger image
is first shrunk to fit), ``center-crop`` takes the central square and resizes it (the ADM/ImageNet
rule of the image-folder trainer), ``resize`` stretches the whole image. The default comes from
the tokenizer's config.yaml (``data``/``dataset``): Fashion-MNIST pads, anything else is
center-cropped. One warning line says when images are far from the training data (colour on a
greyscale model, or a size more than 2x off). Each is encoded once to all its tokens, and decoded
from the first t tokens for every budget t (default: every scheduled step). Prefix t decodes at its schedule size; the strip
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

from detailflow_engine import cli, outputs
from detailflow_engine.cli import (Parser, UsageError, check_device, check_out_writable, int_items, one_line,
                                   resolve_model_arg)
from detailflow_engine.device_dtype import DEVICES, DTYPES


FIT_MODES = ("pad", "center-crop", "resize")
# Datasets of fixed-size greyscale images that the trainers pad to the model size (name -> raw side).
_PADDED_GREY = {"fashion-mnist": 28, "fashion_mnist": 28, "fmnist": 28, "mnist": 28}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m detailflow_engine.reconstruct",
               description="Encode images with a DetailFlow tokenizer and decode them coarse to fine.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--tokens", nargs="+", metavar="T", default=None,
                   help="token budgets, comma- or space-separated; each must be a scheduled prefix "
                        "(default: every scheduled step)")
    p.add_argument("--tokenizer", "--ckpt", dest="tokenizer", metavar="PATH|REPO",
                   help="tokenizer: model folder, .pt, .safetensors or Hugging Face repo id "
                        "(default: the embedded default model's tokenizer)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="default: auto")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="default: fp32")
    p.add_argument("--batch-size", type=int, default=16, help="images per encode/decode pass (default: 16)")
    p.add_argument("--fit", choices=FIT_MODES, default=None,
                   help="how an image becomes the tokenizer's input square: pad (centre on black, as "
                        "Fashion-MNIST 28 -> 32), center-crop (central square, resized), resize (stretch); "
                        "default: what the tokenizer's training data had (its config.yaml)")
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
    budgets = int_items("--tokens", items)
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
        raise UsageError(f"cannot read image {path}: {one_line(e)}") from None


def training_data(config) -> dict:
    """What the tokenizer's config.yaml says about its training images:
    {name, fit (the --fit default), grey (greyscale images), size (their side before fitting, or
    None for an image folder: photos of any size, center-cropped and resized)}."""
    y = getattr(config, "raw_yaml", None) or {}
    name = str(y.get("data") or y.get("dataset") or "").strip()
    if name.lower() in _PADDED_GREY:
        return dict(name=name, fit="pad", grey=True, size=_PADDED_GREY[name.lower()])
    return dict(name=name or "unknown", fit="center-crop", grey=False, size=None)


def fit_image(img: np.ndarray, size: int, fit: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by ``fit`` (see the module docstring)."""
    from PIL import Image

    from detailflow_engine.images import center_crop_resize

    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {FIT_MODES}, got {fit!r}")
    h, w = img.shape[:2]
    if fit == "center-crop":
        return np.asarray(center_crop_resize(Image.fromarray(np.ascontiguousarray(img)), size))
    if fit == "resize":
        if (h, w) == (size, size):
            return img
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), Image.BICUBIC))
    if max(h, w) > size:  # pad: shrink to fit first, aspect kept
        scale = size / max(h, w)
        w, h = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.BICUBIC))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top:top + h, left:left + w] = img
    return out


def fit_warning(images: List[np.ndarray], paths: List[Path], train: dict, size: int) -> Optional[str]:
    """One line when images are far from the training data, else None: colour images for a greyscale
    model; sides more than 2x off the training images' (for an image folder, whose photos are shrunk
    to the model size in training as here: only images under half the model size)."""
    problems = []
    for path, im in zip(paths, images):
        h, w = im.shape[:2]
        why = []
        if train["grey"] and not (np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 1], im[..., 2])):
            why.append("colour")
        ref = train["size"] or size
        if min(h, w) * 2 < ref or (train["size"] is not None and max(h, w) > 2 * ref):
            why.append(f"{w}x{h}")
        if why:
            problems.append(f"{path.name} ({', '.join(why)})")
    if not problems:
        return None
    if train["size"] is not None:
        data = (f"{train['name']}: {train['size']}x{train['size']} {'greyscale' if train['grey'] else 'colour'}, "
                f"padded to {size}")
    else:
        data = f"{train['name']}: colour photos center-cropped to {size}x{size}"
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return (f"warning: {len(problems)} of {len(images)} images are far from this tokenizer's training data "
            f"({data}): {', '.join(problems[:3])}{more}; expect worse reconstructions than on such data")


def reconstruct(tokenizer, images: List[np.ndarray], budgets: List[int], batch_size: int = 16,
                fit: Optional[str] = None) -> List[List[np.ndarray]]:
    """uint8 images -> for each image, its decodes (s_t, s_t, 3) uint8 at each budget t.
    ``fit``: see the module docstring (default: as the tokenizer's training data)."""
    import torch

    from detailflow_engine.outputs import to_uint8

    fit = fit or training_data(tokenizer.config)["fit"]
    size = tokenizer.schedule.encode_size(tokenizer.num_tokens)
    device = tokenizer.quant_conv.weight.device
    out = []
    for b in range(0, len(images), batch_size):
        batch = np.stack([fit_image(im, size, fit) for im in images[b:b + batch_size]])
        pixels = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        codes = tokenizer.encode(pixels)
        decodes = [to_uint8(tokenizer.decode(codes, num_tokens=t)).cpu().numpy() for t in budgets]
        out += [[d[k] for d in decodes] for k in range(batch.shape[0])]
    return out


def strip_name(path: Path) -> str:
    return f"{path.stem}_strip.png"


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
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

    from detailflow_engine.loading import load_tokenizer

    check_device(args.device)
    if args.tokenizer is None:
        from detailflow_engine.assets import default_model_paths

        try:
            tok_path = default_model_paths()[1]
        except FileNotFoundError as e:
            raise UsageError(one_line(e)) from None
    else:
        tok_path = resolve_model_arg("--tokenizer", args.tokenizer)
    try:
        tokenizer = load_tokenizer(tok_path, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors
        raise UsageError(f"cannot load the tokenizer {tok_path}: {one_line(e)}") from None
    except Exception as e:  # anything else from a foreign file: still one line, no traceback
        raise UsageError(f"cannot load the tokenizer {tok_path}: {type(e).__name__}: {one_line(e)}") from None
    budgets = parse_budgets(args.tokens, tokenizer.schedule.scheduled_tokens)
    train = training_data(tokenizer.config)
    fit = args.fit or train["fit"]
    warning = fit_warning(images, paths, train, tokenizer.schedule.encode_size(tokenizer.num_tokens))
    if warning:
        print(warning, file=sys.stderr)

    try:
        decoded = reconstruct(tokenizer, images, budgets, args.batch_size, fit)
    except NotImplementedError as e:
        raise UsageError(f"the tokenizer cannot run with --device {args.device} --dtype {args.dtype}: "
                         f"{one_line(e)}") from None
    height = max(d.shape[0] for d in decoded[0])  # the largest budget's decode size
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {one_line(e)}") from None
    try:
        for name, decodes in zip(names, decoded):
            outputs.save_png(out / name, outputs.progressive_strip(decodes, height))
    except OSError as e:  # disk full: every strip written so far is whole (atomic writes)
        raise UsageError(f"cannot write {e.filename or out}: {e.strerror or one_line(e)}") from None
    outputs.fsync_dir(out)
    sizes = ", ".join(f"{t}->{d.shape[0]}px" for t, d in zip(budgets, decoded[0]))
    how = "--fit" if args.fit else f"the default for its training data, {train['name']}"
    print(f"wrote {len(names)} strip{'' if len(names) == 1 else 's'} to {out} (fit: {fit}, {how}; "
          f"tokens -> decode size: {sizes}; strip height {height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
