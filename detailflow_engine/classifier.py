"""A small CNN classifier for 32x32 Fashion-MNIST, the feature extractor of ``evaluate``.

Input: float (B, 3, 32, 32) in [-1, 1] (uint8 / 127.5 - 1, grey replicated to 3 channels, as
``detailflow_ref.datasets.load_fashion_mnist`` gives them). ``forward`` returns logits (B, 10);
``features`` the 128-d penultimate activations (input of the last linear layer, after ReLU)
used for the Frechet distance.

The shipped weights (``assets/fashion_classifier.safetensors``) are trained by
``python -m detailflow_engine.train_classifier``; ``assets/fashion_classifier.json`` records
the architecture, the test accuracy, the exact command, the seed and the training time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CLASSIFIER = ASSETS / "fashion_classifier.safetensors"
ARCHITECTURE = "fmnist-cnn-v1"
FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SIZE = 32


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class FashionCNN(nn.Module):
    """3 x (conv3x3 + BN + ReLU + maxpool) 32 -> 16 -> 8 -> 4, then 1024 -> 128 -> 10 (156 k params)."""

    architecture = ARCHITECTURE

    def __init__(self, widths=(16, 32, 64), feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES,
                 dropout: float = 0.3):
        super().__init__()
        c1, c2, c3 = widths
        self.body = nn.Sequential(_block(3, c1), _block(c1, c2), _block(c2, c3))
        self.fc = nn.Linear(c3 * (IMAGE_SIZE // 8) ** 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"classifier input must be float (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, 128) penultimate activations (after ReLU)."""
        self._check(x)
        h = self.body(x.to(self.fc.weight.dtype)).flatten(1)
        return torch.relu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, batch_size: int = 500):
        """(logits (B, 10), features (B, 128)) in float32, computed in batches (eval mode expected)."""
        logits, feats = [], []
        for i in range(0, x.shape[0], batch_size):
            f = self.features(x[i:i + batch_size])
            feats.append(f.float())
            logits.append(self.head(f).float())
        return torch.cat(logits), torch.cat(feats)


def classifier_metadata(path: Union[str, Path, None] = None) -> dict:
    """The JSON record next to the weights (``<stem>.json``), or {} when there is none."""
    path = Path(DEFAULT_CLASSIFIER if path is None else path)
    meta = path.with_suffix(".json")
    if not meta.is_file():
        return {}
    return json.loads(meta.read_text())


def load_classifier(path: Union[str, Path, None] = None, device=None) -> FashionCNN:
    """Load the classifier weights (safetensors, fp16 or fp32 on disk) into a float32 model in eval mode.

    ``path`` defaults to the shipped ``assets/fashion_classifier.safetensors``.
    Raises FileNotFoundError for a missing file, ValueError for a file that does not match.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(DEFAULT_CLASSIFIER if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path} "
                                f"(train them with python -m detailflow_engine.train_classifier --out {path})")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    model = FashionCNN()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: not a {ARCHITECTURE} classifier (missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: key {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    model = model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def save_classifier(model: FashionCNN, path: Union[str, Path], fp16: bool = False) -> Path:
    """Write the weights as safetensors (float32, or fp16 with ``fp16``; BN counters stay int64)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if fp16 and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"architecture": ARCHITECTURE})
    path.chmod(0o644)  # safetensors writes 0600; the file ships as package data
    return path


def accuracy(model: FashionCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    logits, _ = model.predict(images, batch_size)
    return float((logits.argmax(1).cpu() == labels.cpu()).float().mean())

