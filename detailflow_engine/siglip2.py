"""SigLIP2-style ViT towers of the DetailFlow tokenizer, in plain PyTorch.

Shared on purpose by the engine ``Tokenizer`` and the reference ``VQModel``: the architecture
exists once, under its official names.

Parameter names reproduce the official modules (HF ``Siglip2VisionModel.vision_model``
wrapped by DetailFlow's ``CustomSiglip``), so official state dicts load with
``strict=True``:

    visual_model.embeddings.patch_embedding.{weight,bias}   Linear(3*p*p, D)   (encoder only)
    visual_model.embeddings.position_embedding.weight       (side*side, D), side = 16
    visual_model.encoder.layers.N.{self_attn.{k,v,q,out}_proj, layer_norm1, mlp.{fc1,fc2}, layer_norm2}
    visual_model.post_layernorm
    latent_tokens / refined_tokens (encoder), mask_token / to_pixel.model (decoder), latent_pos_embed (both)

Layers are pre-LN: x + attn(ln1(x)), then x + mlp(ln2(x)); GELU(tanh); attention is
SDPA with scale head_dim**-0.5 and an additive float mask (0 or dtype-min).
Images are flattened into patches in (row-in-patch, col-in-patch, channel) order.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.config import TokenizerConfig, TowerConfig


# --------------------------------------------------------------------------- patches


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), each patch flattened (row, col, channel), channel fastest."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), -1)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(B, g*g, p*p*C) -> (B, C, g*p, g*p): the inverse of :func:`patchify` for a square grid."""
    b, n, _ = patches.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = patches.reshape(b, g, g, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch_size, g * patch_size)


def resize_position_table(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(side*side, D) position table -> (grid_h*grid_w, D): bilinear, antialias, align_corners False."""
    side = math.isqrt(table.shape[0])
    dim = table.shape[1]
    # fp32: CPU has no bf16/fp16 antialiased interpolation (and fp32 is what fp32 weights get anyway)
    grid = table.float().reshape(side, side, dim).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False, antialias=True)
    return grid.reshape(dim, grid_h * grid_w).transpose(0, 1).to(table.dtype)


# --------------------------------------------------------------------------- masks


def blocked_attention_mask(num_patches: int, num_latents: int, *, encoder: bool, causal: bool,
                           group_size: int = 1, causal_num: Optional[int] = None,
                           device=None) -> torch.Tensor:
    """Boolean (L, L) mask over [patches | latents], True = BLOCKED (official create_attn_mask_for_x_z).

    Non-causal towers attend everywhere (all False). Causal towers:
      encoder: patches see only patches, latents see all patches;
      decoder: patches see everything, latents see no patch;
    and among latents, latent i < causal_num sees latents j <= i; a later latent sees
    its own group of ``group_size`` (groups counted from latent 0) and everything before.
    """
    n, m = num_patches, num_latents
    blocked = torch.zeros(n + m, n + m, dtype=torch.bool, device=device)
    if not causal:
        return blocked
    causal_num = group_size if causal_num is None else causal_num
    if causal_num % group_size:
        raise ValueError(f"causal_num {causal_num} is not a multiple of group_size {group_size}")
    if encoder:
        blocked[:n, n:] = True  # patches do not see latents
    else:
        blocked[n:, :n] = True  # latents do not see patches
    i = torch.arange(m, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    blocked[n:, n:] = torch.where(i < causal_num, j > i, j // group_size > i // group_size)
    return blocked


def additive_attention_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool BLOCKED mask -> additive float mask: 0 where allowed, finfo(dtype).min where blocked."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill(
        blocked, torch.finfo(dtype).min)


# --------------------------------------------------------------------------- transformer


class Siglip2Attention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.scale = self.head_dim ** -0.5
        # Registration order = the official state-dict order.
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape  # (B, L, D)
        q, k, v = (proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, hd)
        out = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                             attn_mask=mask, dropout_p=0.0, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Siglip2MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Siglip2EncoderLayer(nn.Module):
    def __init__(self, tower: TowerConfig):
        super().__init__()
        self.self_attn = Siglip2Attention(tower.hidden_size, tower.num_heads)
        self.layer_norm1 = nn.LayerNorm(tower.hidden_size, eps=tower.layer_norm_eps)
        self.mlp = Siglip2MLP(tower.hidden_size, tower.intermediate_size)
        self.layer_norm2 = nn.LayerNorm(tower.hidden_size, eps=tower.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Siglip2Encoder(nn.Module):
    def __init__(self, tower: TowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(Siglip2EncoderLayer(tower) for _ in range(tower.num_layers))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class Siglip2Embeddings(nn.Module):
    """Patch embedding (absent in the decoder: the official sets it to Identity) + the position table."""

    def __init__(self, tower: TowerConfig, with_patch_embedding: bool = True, channels: int = 3):
        super().__init__()
        self.patch_size = tower.patch_size
        if with_patch_embedding:
            self.patch_embedding = nn.Linear(channels * tower.patch_size ** 2, tower.hidden_size)
        else:
            self.patch_embedding = nn.Identity()
        self.position_embedding = nn.Embedding(tower.position_table_side ** 2, tower.hidden_size)

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The position table resized to the patch grid: (grid_h*grid_w, D)."""
        return resize_position_table(self.position_embedding.weight, grid_h, grid_w)

    def forward(self, patches: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, grid_h*grid_w, in) -> (B, grid_h*grid_w, D)."""
        x = self.patch_embedding(patches.to(self.position_embedding.weight.dtype))
        return x + self.positions(grid_h, grid_w)


class Siglip2VisionTransformer(nn.Module):
    """The HF ``vision_model``: embeddings, encoder (layers), post_layernorm (no head)."""

    def __init__(self, tower: TowerConfig, with_patch_embedding: bool = True):
        super().__init__()
        self.config = tower
        self.embeddings = Siglip2Embeddings(tower, with_patch_embedding)
        self.encoder = Siglip2Encoder(tower)
        self.post_layernorm = nn.LayerNorm(tower.hidden_size, eps=tower.layer_norm_eps)
        _init_tower(self)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Embedded tokens (B, L, D) -> post_layernorm(layers(x))."""
        return self.post_layernorm(self.encoder(x, mask))


@torch.no_grad()
def _init_tower(model: Siglip2VisionTransformer) -> None:
    """HF Siglip-style init (for towers trained from scratch; checkpoints overwrite it)."""
    width = model.config.hidden_size
    nn.init.normal_(model.embeddings.position_embedding.weight, std=1 / math.sqrt(width))
    for layer in model.encoder.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                     layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                     layer.self_attn.out_proj):
            nn.init.zeros_(proj.bias)
        nn.init.normal_(layer.mlp.fc1.bias, std=1e-6)
        nn.init.normal_(layer.mlp.fc2.bias, std=1e-6)


class Siglip2VisionTower(nn.Module):
    """A plain SigLIP2 image tower (official CustomSiglip2VisionModel; the REPA target model).
    Built only so that full training checkpoints load strictly: nothing here runs it."""

    def __init__(self, tower: TowerConfig):
        super().__init__()
        self.patch_size = tower.patch_size
        self.embed_dim = tower.hidden_size
        self.visual_model = Siglip2VisionTransformer(tower)


# --------------------------------------------------------------------------- tokenizer towers


class _LatentTower(nn.Module):
    """Shared part of the encoder and decoder: [grid tokens | latents + latent_pos_embed] through the tower."""

    is_encoder: bool

    def __init__(self, tower: TowerConfig, num_latent_tokens: int, causal: bool, group_size: int,
                 causal_num: Optional[int]):
        super().__init__()
        self.tower = tower
        self.patch_size = tower.patch_size
        self.embed_dim = tower.hidden_size
        self.num_latent_tokens = num_latent_tokens
        self.causal = causal
        self.group_size = group_size
        self.causal_num = group_size if causal_num is None else causal_num
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, num_latent_tokens, tower.hidden_size))
        nn.init.trunc_normal_(self.latent_pos_embed, std=0.02)

    def attention_mask(self, num_patches: int, num_latents: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        """Additive (1, 1, L, L) mask for [num_patches | num_latents] tokens."""
        blocked = blocked_attention_mask(num_patches, num_latents, encoder=self.is_encoder, causal=self.causal,
                                         group_size=self.group_size, causal_num=self.causal_num, device=device)
        return additive_attention_mask(blocked, dtype)[None, None]

    def _run(self, grid_tokens: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = grid_tokens.shape[1]
        z = latents + self.latent_pos_embed[:, :latents.shape[1]]
        x = torch.cat((grid_tokens, z), dim=1)
        mask = self.attention_mask(n, z.shape[1], x.dtype, x.device)
        x = self.visual_model(x, mask)
        return x[:, :n], x[:, n:]


class SiglipEncoder(_LatentTower):
    """Image -> latent tokens. Keys: latent_pos_embed, latent_tokens, [refined_tokens], visual_model.*"""

    is_encoder = True

    def __init__(self, tower: TowerConfig, num_latent_tokens: int, causal: bool = True, group_size: int = 1,
                 causal_num: Optional[int] = None, with_refined_tokens: bool = False):
        super().__init__(tower, num_latent_tokens, causal, group_size, causal_num)
        self.latent_tokens = nn.Parameter(torch.zeros(1, num_latent_tokens, tower.hidden_size))
        nn.init.normal_(self.latent_tokens, std=0.02)
        if with_refined_tokens:  # self-correction training only
            self.refined_tokens = nn.Parameter(torch.zeros(1, num_latent_tokens, tower.hidden_size))
            nn.init.normal_(self.refined_tokens, std=0.02)
        else:
            self.refined_tokens = None
        self.visual_model = Siglip2VisionTransformer(tower, with_patch_embedding=True)

    def forward(self, images: torch.Tensor, num_tokens: Optional[int] = None,
                noise_token: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> (patch states (B, n, D), latent states (B, t, D)), after post_layernorm.

        ``noise_token`` (B, k, D) replaces the first k latent inputs and the rest come from
        ``refined_tokens`` (the official self-correction re-encode; training only).
        """
        t = self.num_latent_tokens if num_tokens is None else num_tokens
        if not 1 <= t <= self.num_latent_tokens:
            raise ValueError(f"num_tokens must be in 1..{self.num_latent_tokens}, got {t}")
        b = images.shape[0]
        gh, gw = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self.visual_model.embeddings(patchify(images, self.patch_size), gh, gw)
        if noise_token is None:
            z = self.latent_tokens[:, :t].expand(b, -1, -1)
        else:
            if self.refined_tokens is None:
                raise RuntimeError("noise_token needs refined_tokens (build with training modules)")
            z = torch.cat((noise_token, self.refined_tokens[:, noise_token.shape[1]:t].expand(b, -1, -1)), dim=1)
        return self._run(x, z)


class ToPixel(nn.Module):
    """Linear D -> 3*p*p per patch token, unpatchified to (B, 3, g*p, g*p). Key: model.{weight,bias}."""

    def __init__(self, width: int, patch_size: int, channels: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.channels = channels
        self.model = nn.Linear(width, channels * patch_size * patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.model(x), self.patch_size, self.channels)


class SiglipDecoder(_LatentTower):
    """Latent tokens -> pixels. Keys: latent_pos_embed, mask_token, visual_model.* (no patch_embedding), to_pixel.model.*"""

    is_encoder = False

    def __init__(self, tower: TowerConfig, num_latent_tokens: int, causal: bool = False, group_size: int = 1,
                 causal_num: Optional[int] = None):
        super().__init__(tower, num_latent_tokens, causal, group_size, causal_num)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, tower.hidden_size))
        nn.init.normal_(self.mask_token, std=0.02)
        self.visual_model = Siglip2VisionTransformer(tower, with_patch_embedding=False)
        self.to_pixel = ToPixel(tower.hidden_size, tower.patch_size)

    def forward(self, z: torch.Tensor, t: Optional[int] = None, img_size: int = 256) -> torch.Tensor:
        """z: (B, T, D) decoder-width latents (post_quant_conv applied) -> pixels (B, 3, img_size, img_size).

        Only the first t latents are used; the grid holds one mask token per output patch.
        """
        t = z.shape[1] if t is None else t
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {self.patch_size}")
        g = img_size // self.patch_size
        x = self.visual_model.embeddings(self.mask_token.expand(z.shape[0], g * g, -1), g, g)
        patches, _ = self._run(x, z[:, :t])
        return self.to_pixel(patches)

    def decode_positioned(self, z: torch.Tensor, img_size: int) -> torch.Tensor:
        """z: (B, t, D) latents with ``latent_pos_embed`` already added (the engine's vq_lookup
        adds it) -> pixels (B, 3, img_size, img_size), one image per tower pass.

        The grid (mask tokens + the resized position table) and the mask are built once and are
        the same for every image. One image per pass makes an image the same bits whatever batch
        it came in: torch's GEMMs and attention pick their kernels (and summation orders) by
        shape. A non-causal tower runs with no mask at all (what SDPA is given decides its kernel).
        """
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the decoder patch size {self.patch_size}")
        g = img_size // self.patch_size
        grid = self.visual_model.embeddings(self.mask_token.expand(1, g * g, -1), g, g)
        mask = self.attention_mask(g * g, z.shape[1], grid.dtype, grid.device) if self.causal else None
        out = []
        for i in range(z.shape[0]):
            x = self.visual_model(torch.cat((grid, z[i:i + 1]), dim=1), mask)
            out.append(self.to_pixel(x[:, :g * g]))
        return torch.cat(out)


def build_tokenizer_towers(config: TokenizerConfig, with_refined_tokens: bool = False) -> dict:
    """The tokenizer's encoder, decoder and the two latent projections, in official key order
    (``encoder``, ``decoder``, ``quant_conv``, ``post_quant_conv``); the quantizer comes after."""
    enc, dec = config.encoder, config.decoder
    return {
        "encoder": SiglipEncoder(enc, config.num_latent_tokens, causal=config.causal_encoder,
                                 group_size=config.group_size, causal_num=config.causal_num,
                                 with_refined_tokens=with_refined_tokens),
        "decoder": SiglipDecoder(dec, config.num_latent_tokens, causal=config.causal_decoder,
                                 group_size=config.group_size, causal_num=config.causal_num),
        "quant_conv": nn.Linear(enc.hidden_size, config.codebook_embed_dim),
        "post_quant_conv": nn.Linear(config.codebook_embed_dim, dec.hidden_size),
    }
