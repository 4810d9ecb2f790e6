"""An LPIPS-style feature network for Fashion-MNIST tokenizers (the ``--perceptual-net`` hook).

LPIPS compares images through the conv features of an ImageNet classifier; nothing can be
downloaded here, so the Fashion-MNIST analogue is the conv trunk of a small CNN trained by
``python -m detailflow_engine.train_classifier`` on the *train* split. The feature maps after
each conv block's ReLU (32x32, 16x16, 8x8) are returned; ``PerceptualLoss`` channel-normalizes
and compares them.

Use a separately trained network, not the evaluation classifier shipped in
``detailflow_engine/assets``: a tokenizer trained through the very network that later scores it
would inflate its own metrics. ``feature_net`` refuses those weights.

    python -m detailflow_engine.train_classifier --out percep/fmnist_seed1.safetensors --seed 1
    DETAILFLOW_PERCEPTUAL_WEIGHTS=percep/fmnist_seed1.safetensors \\
      python -m detailflow_ref.train_tokenizer ... --perceptual-net detailflow_ref.fmnist_perceptual:feature_net
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_ENV = "DETAILFLOW_PERCEPTUAL_WEIGHTS"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FashionFeatures(nn.Module):
    """The conv blocks of a FashionCNN: (B, 3, S, S) in [-1, 1] -> three ReLU feature maps.

    Inputs of another size (degraded low-resolution targets) are resized to 32x32 first.
    """

    def __init__(self, cnn: nn.Module, image_size: int):
        super().__init__()
        self.blocks = cnn.body
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.image_size)
        feats = []
        h = x
        for block in self.blocks:        # conv, BN, ReLU, maxpool
            conv, bn, relu, pool = block
            h = relu(bn(conv(h)))
            feats.append(h)
            h = pool(h)
        return feats


def feature_net(path: Union[str, Path, None] = None) -> FashionFeatures:
    """The frozen feature network from ``path`` (default: $DETAILFLOW_PERCEPTUAL_WEIGHTS)."""
    from detailflow_engine.classifier import DEFAULT_CLASSIFIER, IMAGE_SIZE, load_classifier

    path = path if path is not None else os.environ.get(WEIGHTS_ENV)
    if not path:
        raise ValueError(f"fmnist_perceptual.feature_net needs the weights of a FashionCNN: set ${WEIGHTS_ENV} "
                         f"(train one with python -m detailflow_engine.train_classifier --seed 1 --out FILE)")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual network weights not found: {path}")
    if DEFAULT_CLASSIFIER.is_file() and _sha256(path) == _sha256(DEFAULT_CLASSIFIER):
        raise ValueError(f"{path} is the evaluation classifier; train a separate network for the perceptual "
                         f"loss (a tokenizer must not be trained through the network that scores it)")
    cnn = load_classifier(path, device="cpu")
    net = FashionFeatures(cnn, IMAGE_SIZE).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net

