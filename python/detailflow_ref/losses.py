"""Tokenizer training losses: VQ codebook/commitment terms, perceptual hook, PatchGAN + hinge.

VQ terms (official ``modelling/quantizers/vq.py``), on L2-normalized latents ``z`` and
their codewords ``e``, over the tokens from ``noise_end`` on::

    vq_loss     = vq_loss_ratio * mean((e - sg(z))^2)      (moves the codebook)
    commit_loss = beta          * mean((sg(e) - z)^2)      (moves the encoder)
    entropy     = entropy_loss_ratio * (sample entropy - batch entropy) of softmax(-d / 0.01)

The perceptual loss is a hook: any callable ``net(images in [-1, 1]) -> Tensor or list of
Tensors``; the loss is the mean over its outputs of the mean squared difference of the
(channel-normalized, for 4-D maps) features of the reconstruction and the target. The
network is frozen. Nothing is downloaded: bring your own network (off by default).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- VQ


def vq_losses(z: torch.Tensor, zq: torch.Tensor, beta: float, vq_loss_ratio: float = 1.0,
              noise_end: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(vq_loss, commit_loss) of normalized latents z (B, T, D) and codewords zq, tokens [noise_end:]."""
    z, zq = z[:, noise_end:], zq[:, noise_end:]
    vq = torch.mean((zq - z.detach()) ** 2) * vq_loss_ratio
    commit = beta * torch.mean((zq.detach() - z) ** 2)
    return vq, commit


def entropy_loss(distances: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Official compute_entropy_loss on affinities -d: mean per-sample entropy - entropy of the mean."""
    logits = (-distances).reshape(-1, distances.shape[-1]) / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    avg = probs.mean(dim=0)
    avg_entropy = -torch.sum(avg * torch.log(avg + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


def reconstruction_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "l2":
        return F.mse_loss
    if kind == "l1":
        return F.l1_loss
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


# --------------------------------------------------------------------------- perceptual hook


def load_callable(spec: str):
    """'package.module:attr' -> the attribute (e.g. a factory returning a feature network)."""
    if ":" not in spec:
        raise ValueError(f"expected 'module:callable', got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_perceptual_net(spec: Optional[str]):
    """--perceptual-net 'module:callable': the callable is called with no arguments and must
    return the feature network (an nn.Module or any callable on image batches)."""
    if not spec:
        return None
    factory = load_callable(spec)
    return factory()


class PerceptualLoss(nn.Module):
    """Feature-matching loss through a frozen user network (see module docstring)."""

    def __init__(self, net: Union[nn.Module, Callable]):
        super().__init__()
        if isinstance(net, nn.Module):
            net = net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
            self.net = net
        else:
            self.net = None
            self._fn = net

    def features(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        out = self.net(x) if self.net is not None else self._fn(x)
        if isinstance(out, torch.Tensor):
            return [out]
        return list(out)

    def forward(self, target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ft = self.features(target)
        fr = self.features(recon)
        if len(ft) != len(fr) or not fr:
            raise ValueError("the perceptual network returned a different number of features for two calls")
        total = 0.0
        for a, b in zip(fr, ft):
            if a.dim() == 4:
                a = F.normalize(a.float(), dim=1)
                b = F.normalize(b.float(), dim=1)
            total = total + F.mse_loss(a.float(), b.float().detach())
        return total / len(fr)

    def train(self, mode: bool = True):  # the network stays in eval mode
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self


# --------------------------------------------------------------------------- PatchGAN


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (pix2pix layout: 4x4 convs, LeakyReLU 0.2) with GroupNorm.

    ``n_layers`` stride-2 convs, then one stride-1 conv and a 1-channel stride-1 conv:
    a 32x32 input with n_layers=2 gives a 6x6 logit map. GroupNorm (not BatchNorm) keeps
    the forward independent of the batch, which suits DDP and small batches.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for i in range(1, n_layers):
            nxt = ndf * min(2 ** i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), nn.GroupNorm(min(32, nxt // 4) or 1, nxt),
                       nn.LeakyReLU(0.2, True)]
            ch = nxt
        nxt = ndf * min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ch, nxt, 4, 1, 1, bias=False), nn.GroupNorm(min(32, nxt // 4) or 1, nxt),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(nxt, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -torch.mean(logits_fake)
