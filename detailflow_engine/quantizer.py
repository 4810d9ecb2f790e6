"""The DetailFlow vector quantizer: nearest codeword of an L2-normalized codebook.

Keys: ``embedding.weight`` (K, D), stored as trained (not necessarily unit norm), and,
for training only, the ``codebook_used`` buffer (65536,) float32 of recent codes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CODEBOOK_USAGE_WINDOW = 65536  # length of the official codebook_used buffer


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, embed_dim: int, l2_norm: bool = True, track_usage: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if track_usage:
            self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_WINDOW))
        else:
            self.codebook_used = None

    def codebook(self) -> torch.Tensor:
        """(K, D) codewords as used for search and lookup (normalized rows when l2_norm)."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, p=2, dim=-1) if self.l2_norm else z

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared distances (N, K) between rows of (already normalized) z (N, D) and the codebook.

        Same arithmetic as the official: |z|^2 + |e|^2 - 2 z.e, so near-ties resolve alike.
        """
        e = self.codebook()
        return (torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", z, e.t()))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., D) -> (codes (...) int64, quant (..., D)).

        ``quant`` is the straight-through value z_n + (e[code] - z_n).detach() of the
        normalized input z_n, as the official returns it (equal to the codeword up to rounding).
        """
        zn = self.normalize(z.contiguous())
        flat = zn.reshape(-1, self.embed_dim)
        codes = torch.argmin(self.distances(flat), dim=1)
        zq = self.codebook()[codes].view(zn.shape)
        if self.codebook_used is not None and self.training:
            n = codes.shape[0]
            self.codebook_used[:-n].copy_(self.codebook_used[n:].clone())
            self.codebook_used[-n:].copy_(codes)
        return codes.view(zn.shape[:-1]), zn + (zq - zn).detach()

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) int -> codewords (..., D) (normalized rows when l2_norm)."""
        return self.codebook()[codes]
