"""Train the Fashion-MNIST classifier used by ``python -m detailflow_engine.evaluate``.

    python -m detailflow_engine.train_classifier --out detailflow_engine/assets/fashion_classifier.safetensors

Deterministic (seeded shuffling, augmentation and init; one CPU thread by default): Adam with a
cosine learning-rate decay, light augmentation (random horizontal flip, random shift of up to
2 pixels), a few epochs on the 60k training images. Prints the test accuracy after every epoch
(no model selection on the test set: the last epoch is saved) and writes OUT (safetensors) plus
OUT with a .json suffix (architecture, test accuracy, command, seed, training time).
Bad input prints one ``error: ...`` line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from detailflow_engine import cli
from detailflow_engine.classifier import ARCHITECTURE, FEATURE_DIM, FashionCNN, accuracy, save_classifier


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog="python -m detailflow_engine.train_classifier",
                   description="Train the small Fashion-MNIST CNN used as the evaluation feature extractor.")
    p.add_argument("--out", required=True, help="output .safetensors file (metadata goes to the .json next to it)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = reproducible and polite)")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (0 = all)")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: $DETAILFLOW_FASHION_MNIST "
                                                     "or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size)")
    return p


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and random shift (background-padded) of a float batch (B, C, H, W)."""
    B, C, H, W = x.shape
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (max_shift,) * 4, value=-1.0)  # background of the [-1, 1] images
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=gen)
    rows = (dy[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(B)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def to_input(grey_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32) grey -> float (B, 3, 32, 32) in [-1, 1]."""
    return (grey_u8.float() / 127.5 - 1.0)[:, None].expand(-1, 3, -1, -1).contiguous()


def train(args) -> dict:
    from detailflow_ref.datasets import load_fashion_mnist

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist("train", args.data_root)
    test_x, test_y = load_fashion_mnist("test", args.data_root)
    if args.train_limit:
        train_x, train_y = train_x[:args.train_limit], train_y[:args.train_limit]
    # keep one grey channel as uint8 (61 MB) and build float batches on the fly
    train_g = torch.from_numpy(np.ascontiguousarray(train_x[..., 0]))
    train_l = torch.from_numpy(train_y)
    test_in = to_input(torch.from_numpy(np.ascontiguousarray(test_x[..., 0])))
    test_l = torch.from_numpy(test_y)

    model = FashionCNN()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    n = train_g.shape[0]
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    t0, c0 = time.time(), time.process_time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        loss_sum, seen = 0.0, 0
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            x = augment(to_input(train_g[idx]), gen)
            loss = F.cross_entropy(model(x), train_l[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * idx.numel()
            seen += idx.numel()
        model.eval()
        acc = accuracy(model, test_in, test_l)
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 4), "test_accuracy": round(acc, 4)})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f}, test accuracy {acc:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    wall, cpu = time.time() - t0, time.process_time() - c0

    out = save_classifier(model, args.out, fp16=args.fp16)
    # the accuracy of the weights as stored (fp16 rounding included), through the public loader
    from detailflow_engine.classifier import load_classifier

    stored_acc = accuracy(load_classifier(out), test_in, test_l)
    argv = [a for a in sys.argv[1:]] if args.argv is None else list(args.argv)
    meta = {
        "architecture": ARCHITECTURE,
        "feature_dim": FEATURE_DIM,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float16" if args.fp16 else "float32",
        "input": "float (B, 3, 32, 32) in [-1, 1]: uint8 / 127.5 - 1, Fashion-MNIST 28x28 padded by 2, grey x3",
        "test_accuracy": round(stored_acc, 4),
        "test_images": int(test_l.numel()),
        "train_images": int(n),
        "command": "python -m detailflow_engine.train_classifier " + " ".join(shlex.quote(a) for a in argv),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "optimizer": "Adam, cosine decay per step, label smoothing 0.05",
        "augmentation": "random horizontal flip, random shift up to 2 px",
        "threads": args.threads,
        "training_time_s": round(wall, 1),
        "training_cpu_time_s": round(cpu, 1),
        "torch": torch.__version__,
        "history": history,
    }
    Path(out).with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_limit < 0:
        parser.error(f"--train-limit must be >= 0, got {args.train_limit}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not str(args.out).endswith(".safetensors"):
        parser.error(f"--out must be a .safetensors file, got {args.out!r}")
    try:
        meta = train(args)
    except (OSError, ValueError) as exc:
        raise cli.UsageError(str(exc)) from None
    print(f"test accuracy {meta['test_accuracy']:.4f} ({meta['test_images']} test images); "
          f"trained in {meta['training_time_s']:.0f} s; wrote {args.out} and "
          f"{Path(args.out).with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
