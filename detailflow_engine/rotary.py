"""The prior's 2D rotary position embedding, shared by the engine and the reference.

One copy of the official ``precompute_freqs_cis_2d`` / ``apply_rotary_emb`` semantics: the
engine's prior and its ``rope_qkv`` torch backend, the reference GPT and the tests all use it.
"""
from __future__ import annotations

import torch


def precompute_freqs_cis_2d(block_size: int, group_size: int, head_dim: int,
                            base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """2D rotary table (cls_token_num + block_size, head_dim // 2, 2) of [cos, sin], fp32.

    Rows ``0 .. cls_token_num-1`` are zero (the class token's q and k become 0).
    Row ``k >= 1`` encodes grid cell ``k - 1`` of a (block_size // g) x g grid:
    grid row ``(k-1) // g`` drives the first head_dim // 4 rotation pairs, grid
    column ``(k-1) % g`` the last head_dim // 4, both with frequencies
    ``1 / base ** (2i / (head_dim // 2))``. The grid is over sequence positions,
    so it is offset by one against the token groups.
    """
    half = head_dim // 2
    quarter = half // 2
    cpu = torch.device("cpu")  # explicit: stays real even under a meta-device context
    inv = 1.0 / (base ** (torch.arange(0, half, 2, device=cpu)[:quarter].float() / half))
    rows = torch.outer(torch.arange(block_size // group_size, device=cpu).float(), inv)
    cols = torch.outer(torch.arange(group_size, device=cpu).float(), inv)
    angles = torch.cat([
        rows[:, None, :].expand(-1, group_size, -1),
        cols[None, :, :].expand(block_size // group_size, -1, -1),
    ], dim=-1).flatten(0, 1)  # (block_size, half)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.cat([torch.zeros(cls_token_num, half, 2, device=cpu), table])


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) in fp32.

    x: (B, L, H, head_dim); freqs_cis: (L, head_dim // 2, 2).
    """
    xp = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xp.size(1), 1, xp.size(3), 2)
    cos, sin = f[..., 0], f[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin,
                       xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)
