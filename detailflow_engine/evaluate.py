"""Evaluate a class-conditional DetailFlow model on Fashion-MNIST; prints one JSON object.

    python -m detailflow_engine.evaluate [--ckpt PRIOR --tokenizer TOK] [--num-per-class 100] [--seed 0]

Three measurements:

* **classifier accuracy** of the generated images (N per class, labels in class order, image i
  drawn with seed + i, so results do not depend on --batch-size): does class c look like class c?
  Per class and overall, next to the classifier's own accuracy on the real test set (the ceiling).
* **Frechet distance** between the classifier's 128-d penultimate features of the generated
  images and of the real Fashion-MNIST test images, with a real-vs-real reference (two disjoint,
  class-balanced test subsets as large as the generated set where the test set allows) and the
  generated set against a test subset of the same size (the like-for-like comparison, since
  the estimate is biased upwards for small sets). This is NOT Inception FID.
* **reconstruction PSNR** of the tokenizer at every scheduled token prefix (the coarse-to-fine
  curve): the first --psnr-images test images are encoded once, each prefix t is decoded at its
  schedule size, upsampled bicubically (align_corners=False) to the tokenizer's image size,
  rounded to uint8 as generated images are (clamp(127.5 x + 128, 0, 255) truncated) and compared
  with the input; the PSNR (peak 255) is computed per image and averaged. The classifier's
  accuracy on the all-token reconstructions says how much of the class the tokenizer keeps
  (an upper bound of sorts for the generated images), and the Frechet distance of those
  reconstructions to the remaining test images (beside the originals' distance to the same
  images) is the tokenizer's floor for the generated images' distance.

Models whose image size is not 32 work too: generated images are resized to 32x32 for the
classifier (area when shrinking, bicubic when enlarging) and test images are resized to the
tokenizer's size for the PSNR curve (same rule, rounded to uint8; that resized image is the
reference). Bad input prints one ``error: ...`` line on stderr and exits with status 2. While it
works, stderr shows one progress bar per phase (classify the test set, generate, classify the
generated images, reconstruct, classify the reconstructions; ``--no-progress`` turns them off).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from detailflow_engine import cli
from detailflow_engine.cli import Parser, UsageError, settings_from_args
from detailflow_engine.device_dtype import DEVICES, DTYPES, WEIGHT_MODES, WEIGHTS_HELP

CLASSIFIER_SIZE = 32


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m detailflow_engine.evaluate",
               description="Classifier accuracy, classifier-feature Frechet distance and the tokenizer's "
                           "coarse-to-fine reconstruction PSNR of a Fashion-MNIST DetailFlow model (JSON on stdout).")
    p.add_argument("--ckpt", default=None, help="prior (folder, .pt or .safetensors); default: the embedded model")
    p.add_argument("--tokenizer", default=None, help="tokenizer (folder, .pt or .safetensors); give with --ckpt")
    p.add_argument("--num-per-class", type=int, default=100, help="generated images per class (default 100)")
    p.add_argument("--seed", type=int, default=0, help="image i (class order) is drawn with seed + i (default 0)")
    p.add_argument("--cfg-scale", type=float, default=1.45, help="classifier-free guidance scale (> 1 enables CFG)")
    p.add_argument("--gradual-cfg", action="store_true", help="decay the CFG scale over the group steps (official)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--batch-size", type=int, default=50, help="images per generation / tokenizer batch")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (cuda if available; default), cpu, cuda")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model dtype (default fp32)")
    p.add_argument("--weights", default="native", choices=WEIGHT_MODES, help=WEIGHTS_HELP)
    p.add_argument("--classifier", default=None,
                   help="classifier .safetensors (default: the shipped assets/fashion_classifier.safetensors)")
    p.add_argument("--psnr-images", type=int, default=1000,
                   help="test images for the reconstruction curve (default 1000; 0 skips it)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: $DETAILFLOW_FASHION_MNIST "
                                                     "or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr (one per phase)")
    return p


# ---------------------------------------------------------------------- Frechet distance

def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of features (N, D), N >= 2 (unbiased covariance)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2, got {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigh; tiny negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((sqrt(S1) S2 sqrt(S1))^(1/2)), with both square roots
    taken by ``eigh`` of symmetric matrices (no scipy; stable for singular covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical statistics


def frechet_distance_features(f1, f2) -> float:
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


# ---------------------------------------------------------------------- images

def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """float (B, 3, H, W) in about [-1, 1] -> uint8 (B, 3, H, W), the official rounding (clamp, truncate)."""
    return torch.clamp(127.5 * pixels.float() + 128.0, 0, 255).to(torch.uint8)


def u8_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square float batch to ``size``: area when shrinking, bicubic (align_corners=False) when enlarging."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def resize_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) resized with ``resize`` and rounded back to uint8."""
    if images.shape[-1] == size:
        return images
    x = resize(images.float(), size)
    return x.round().clamp(0, 255).to(torch.uint8)


def psnr_u8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (peak 255) of two uint8 batches (B, 3, H, W); identical images give 100 dB (capped)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-300)),
                       torch.full_like(mse, 100.0)).clamp(max=100.0)


# ---------------------------------------------------------------------- the three measurements

# Progress bars on stderr, one per phase (the JSON on stdout stays clean); --no-progress turns them off.
PROGRESS = {"enabled": True}


def _bar(desc: str, total: int):
    """A tqdm bar on stderr for one phase, counting images; it stays on screen when done."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                disable=not PROGRESS["enabled"])


def _predict(clf, x: torch.Tensor, desc: str, batch_size: int = 500):
    """clf.predict in batches under a progress bar -> (logits, features)."""
    logits, feats = [], []
    with _bar(desc, x.shape[0]) as bar:
        for i in range(0, x.shape[0], batch_size):
            lo, fe = clf.predict(x[i:i + batch_size], batch_size=batch_size)
            logits.append(lo)
            feats.append(fe)
            bar.update(lo.shape[0])
    return torch.cat(logits), torch.cat(feats)


def generate_images(pipe, num_per_class: int, num_classes: int, seed: int, batch_size: int,
                    **sampling) -> Tuple[torch.Tensor, torch.Tensor]:
    """N images per class in class order (image i seeded seed + i) -> (uint8 (B, 3, S, S) cpu, labels (B,))."""
    labels = [c for c in range(num_classes) for _ in range(num_per_class)]
    out = []
    with _bar("generate", len(labels)) as bar:
        for i in range(0, len(labels), batch_size):
            lab = labels[i:i + batch_size]
            res = pipe.generate(lab, seed=[seed + j for j in range(i, i + len(lab))], **sampling)
            out.append(to_uint8(res.pixels).cpu())
            bar.update(len(lab))
    return torch.cat(out), torch.tensor(labels, dtype=torch.int64)


def reconstruction_curve(tokenizer, images_u8: torch.Tensor, batch_size: int) -> Tuple[List[dict], torch.Tensor]:
    """PSNR at each scheduled prefix for uint8 (N, 3, S, S) images (see the module docstring),
    and the uint8 reconstructions from all the tokens (the last prefix)."""
    size = tokenizer.image_size
    device = tokenizer.quant_conv.weight.device
    ref = resize_u8(images_u8, size)
    schedule = tokenizer.schedule
    ts = list(schedule.scheduled_tokens)
    sums = [0.0] * len(ts)
    full = []
    with _bar(f"reconstruct ({len(ts)} prefixes)", ref.shape[0]) as bar:
        for i in range(0, ref.shape[0], batch_size):
            batch = ref[i:i + batch_size]
            codes = tokenizer.encode(u8_to_float(batch).to(device))
            for k, t in enumerate(ts):
                dec = tokenizer.decode(codes, num_tokens=t).float().cpu()
                rec = to_uint8(resize(dec, size))  # prefixes decode at or below the image size: bicubic up
                sums[k] += float(psnr_u8(rec, batch).sum())
            full.append(rec)
            bar.update(batch.shape[0])
    n = ref.shape[0]
    curve = [{"tokens": t, "resolution": schedule.decode_size(t), "psnr": round(s / n, 4)} for t, s in zip(ts, sums)]
    return curve, torch.cat(full) if full else ref[:0]


def reconstruction_frechet(recon_feats: np.ndarray, test_feats: np.ndarray) -> Optional[dict]:
    """The tokenizer's floor for ``generated_vs_test``: features of the reconstructions of the
    first n test images against the other test images, beside the originals of those n images
    against the same others (same set sizes, so the small-set bias is shared). None when fewer
    than two test images are left over."""
    n = recon_feats.shape[0]
    rest = test_feats[n:]
    if rest.shape[0] < 2:
        return None
    return {"reconstructions_vs_rest_of_test": round(frechet_distance_features(recon_feats, rest), 4),
            "originals_vs_rest_of_test": round(frechet_distance_features(test_feats[:n], rest), 4)}


def class_balanced_split(labels: np.ndarray, per_class: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets with ``per_class`` items of every class each (seeded permutation)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a.append(idx[:per_class])
        b.append(idx[per_class:2 * per_class])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


# ---------------------------------------------------------------------- CLI

def _check_args(args) -> None:
    """The flags' own ranges (the sampling flags: SamplingSettings)."""
    if args.num_per_class < 1:
        raise UsageError(f"--num-per-class must be >= 1, got {args.num_per_class}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.psnr_images < 0:
        raise UsageError(f"--psnr-images must be >= 0 (0 skips the curve), got {args.psnr_images}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    settings_from_args(args)
    if (args.ckpt is None) != (args.tokenizer is None):
        raise UsageError("give both --ckpt and --tokenizer, or neither for the embedded default model")


def evaluate(args) -> dict:
    from detailflow_engine.classifier import DEFAULT_CLASSIFIER, NUM_CLASSES, classifier_metadata, load_classifier
    from detailflow_engine.loading import resolve_device, resolve_dtype
    from detailflow_engine.pipeline import DetailFlowPipeline
    from detailflow_ref.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    t_start = time.time()
    cli.check_device(args.device)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)

    test_x, test_y = load_fashion_mnist("test", args.data_root)
    if args.psnr_images > len(test_y):
        raise UsageError(f"--psnr-images must be <= {len(test_y)} (the test set size), got {args.psnr_images}")
    clf_path = Path(args.classifier) if args.classifier else DEFAULT_CLASSIFIER
    clf = load_classifier(clf_path, device=device)
    pipe = DetailFlowPipeline.from_pretrained(args.ckpt, args.tokenizer, device=device, dtype=dtype,
                                              weights=args.weights)
    num_classes = pipe.prior.config.num_classes
    if num_classes != NUM_CLASSES:
        raise UsageError(f"the model has {num_classes} classes but the Fashion-MNIST classifier knows "
                         f"{NUM_CLASSES}: this tool evaluates Fashion-MNIST models only")
    tokenizer = pipe.tokenizer
    image_size = tokenizer.image_size

    # real test images through the classifier: the accuracy ceiling and the reference features
    t0 = time.time()
    test_u8 = torch.from_numpy(test_x).permute(0, 3, 1, 2).contiguous()
    test_logits, test_feats = _predict(clf, u8_to_float(test_u8).to(device), "classify test set")
    test_acc = float((test_logits.argmax(1).cpu() == torch.from_numpy(test_y)).float().mean())
    test_feats = test_feats.cpu().numpy()

    # generated images
    t1 = time.time()
    sampling = settings_from_args(args).kwargs()
    gen_u8, gen_labels = generate_images(pipe, args.num_per_class, num_classes, args.seed, args.batch_size,
                                         **sampling)
    t2 = time.time()
    gen_in = resize(u8_to_float(gen_u8), CLASSIFIER_SIZE).clamp(-1, 1)
    gen_logits, gen_feats = _predict(clf, gen_in.to(device), "classify generated")
    pred = gen_logits.argmax(1).cpu()
    gen_feats = gen_feats.cpu().numpy()
    correct = (pred == gen_labels)
    per_class = [{"class": c, "name": FASHION_MNIST_CLASSES[c], "count": int((gen_labels == c).sum()),
                  "accuracy": round(float(correct[gen_labels == c].float().mean()), 4)}
                 for c in range(num_classes)]

    # Frechet distances of classifier features
    n_gen = gen_feats.shape[0]
    min_count = int(np.bincount(test_y, minlength=num_classes).min())
    half_per_class = min(args.num_per_class, min_count // 2)
    half_a, half_b = class_balanced_split(test_y, half_per_class, seed=0)
    gen_stats = feature_statistics(gen_feats)
    frechet = {
        "generated_vs_test": round(frechet_distance(*gen_stats, *feature_statistics(test_feats)), 4),
        "generated_vs_test_half": round(frechet_distance(*gen_stats, *feature_statistics(test_feats[half_b])), 4),
        "test_half_vs_test_half": round(frechet_distance_features(test_feats[half_a], test_feats[half_b]), 4),
        "num_generated": int(n_gen),
        "num_test": int(test_feats.shape[0]),
        "half_size": int(len(half_a)),
        "feature_dim": int(gen_feats.shape[1]),
        "features": "penultimate activations of the Fashion-MNIST classifier (not Inception: not comparable with FID)",
    }
    t3 = time.time()

    # reconstruction curve
    curve, recon_accuracy, recon_frechet = [], None, None
    if args.psnr_images:
        n_rec = args.psnr_images
        curve, recon_u8 = reconstruction_curve(tokenizer, test_u8[:n_rec], args.batch_size)
        # does the tokenizer keep the class? the classifier on the all-token reconstructions
        recon_in = resize(u8_to_float(recon_u8), CLASSIFIER_SIZE).clamp(-1, 1)
        recon_logits, recon_feats = _predict(clf, recon_in.to(device), "classify reconstructions")
        recon_pred = recon_logits.argmax(1).cpu()
        recon_accuracy = round(float((recon_pred == torch.from_numpy(test_y[:n_rec])).float().mean()), 4)
        recon_frechet = reconstruction_frechet(recon_feats.cpu().numpy(), test_feats)
    t4 = time.time()

    meta = classifier_metadata(clf_path)
    return {
        "model": {
            "prior": str(args.ckpt) if args.ckpt else "embedded default",
            "tokenizer": str(args.tokenizer) if args.tokenizer else "embedded default",
            "image_size": int(image_size),
            "num_tokens": int(tokenizer.num_tokens),
            "num_classes": int(num_classes),
        },
        "sampling": {"num_per_class": args.num_per_class, "seed": args.seed, "cfg_scale": args.cfg_scale,
                     "gradual_cfg": args.gradual_cfg, "temperature": args.temperature, "top_k": args.top_k,
                     "top_p": args.top_p, "batch_size": args.batch_size, "device": str(device),
                     "dtype": str(dtype).replace("torch.", ""), "weights": args.weights},
        "classifier": {
            "path": str(clf_path),
            "architecture": meta.get("architecture", clf.architecture),
            "test_accuracy": round(test_acc, 4),  # the ceiling, measured now on all test images
            "recorded_test_accuracy": meta.get("test_accuracy"),
            "num_test": int(len(test_y)),
        },
        "accuracy": {
            "overall": round(float(correct.float().mean()), 4),
            "per_class": per_class,
            "predicted_counts": [int(x) for x in torch.bincount(pred, minlength=num_classes)],
        },
        "frechet_distance": frechet,
        "reconstruction": {
            "num_images": int(min(args.psnr_images, len(test_y))),
            "image_size": int(image_size),
            "psnr_curve": curve,
            "classifier_accuracy": recon_accuracy,  # on the reconstructions from all the tokens
            "frechet_distance": recon_frechet,  # classifier features, as above; None when no test image is left
        },
        "timing_s": {"classify_test": round(t1 - t0, 2), "generate": round(t2 - t1, 2),
                     "classify_generated_and_frechet": round(t3 - t2, 2), "reconstruction": round(t4 - t3, 2),
                     "total": round(time.time() - t_start, 2)},
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    PROGRESS["enabled"] = not args.no_progress
    _check_args(args)
    try:
        result = evaluate(args)
        text = json.dumps(result, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
    except (ValueError, OSError) as exc:  # CheckpointError, ConfigError, missing files
        raise UsageError(str(exc)) from None
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
