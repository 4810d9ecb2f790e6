"""The DetailFlow VQ tokenizer (official ``modelling/tokenizer.py`` VQModel), in plain PyTorch.

Inference keys (the default build)::

    encoder.{latent_pos_embed, latent_tokens, visual_model.*}
    decoder.{latent_pos_embed, mask_token, visual_model.*, to_pixel.model.*}
    quant_conv.*  post_quant_conv.*  quantize.embedding.weight

``training_modules=True`` adds what the official VQModel also builds for the config
(everything under ``checkpoint.TOKENIZER_TRAINING_PREFIXES``), so a full official checkpoint loads strictly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.config import TokenizerConfig, resolve_tower
from detailflow_engine.quantizer import VectorQuantizer
from detailflow_engine.schedule import Schedule
from detailflow_engine.siglip2 import Siglip2VisionTower, build_tokenizer_towers

REPA_TOWER = "siglip2"          # the official build_repa_model: pretrained so400m, all 27 layers
GLOBAL_TOKEN_PROJ_DIM = 1024    # hidden size of the official global_token_proj MLP


def build_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The official build_mlp: Linear, SiLU, Linear, SiLU, Linear (keys 0.*, 2.*, 4.*)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


def resize_images(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Official resize_imgs: 'area' when shrinking, unchanged at equal size, bicubic (align_corners False) when enlarging."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    h = x.shape[-2]
    if h > size[0]:
        return F.interpolate(x, size=size, mode="area")
    if h == size[0]:
        if x.shape[-1] != size[1]:
            raise ValueError(f"cannot resize {tuple(x.shape[-2:])} to {size}: mixed up/down-scaling")
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


@dataclass
class Encoded:
    """Everything one encode produces, each (B, t, ...)."""

    latents: torch.Tensor   # (B, t, enc_width) encoder output at the latent positions
    prequant: torch.Tensor  # (B, t, D) quant_conv(latents), not normalized
    codes: torch.Tensor     # (B, t) int64
    quant: torch.Tensor     # (B, t, D) normalized codewords (straight-through)


class VQModel(nn.Module):
    def __init__(self, config: TokenizerConfig, training_modules: bool = False):
        super().__init__()
        self.config = config
        self.schedule = Schedule.from_config(config)
        raw = config.raw_json
        enc, dec = config.encoder, config.decoder
        for name, module in build_tokenizer_towers(config, with_refined_tokens=training_modules).items():
            self.add_module(name, module)
        if training_modules:
            if config.correction_training:
                self.refine_conv = nn.Linear(config.codebook_embed_dim, enc.hidden_size)
            if config.has_training_towers:
                repa_patch = int(raw.get("repa_patch_size", 16))
                if raw.get("repa_model", REPA_TOWER) != REPA_TOWER or repa_patch != dec.patch_size:
                    raise NotImplementedError(f"repa_model={raw.get('repa_model')!r} with patch {repa_patch} "
                                              f"(only 'siglip2' with the decoder patch size)")
                self.repa_model = Siglip2VisionTower(resolve_tower(REPA_TOWER, True, repa_patch))
                self.repa_model.requires_grad_(False)
                if config.repa:
                    self.projection = build_mlp(dec.hidden_size, int(raw.get("repa_proj_dim", 2048)),
                                                self.repa_model.embed_dim)
                if config.global_token_loss_weight != 0:
                    self.global_token_proj = build_mlp(config.codebook_embed_dim, GLOBAL_TOKEN_PROJ_DIM,
                                                       self.repa_model.embed_dim)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm,
                                        track_usage=training_modules and bool(raw.get("codebook_show_usage", True)))

    # ------------------------------------------------------------------ encode

    def encode_latents(self, images: torch.Tensor, num_tokens: Optional[int] = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] (H, W multiples of the encoder patch) -> (B, t, enc_width)."""
        return self.encoder(images, num_tokens)[1]

    def encode_all(self, images: torch.Tensor, num_tokens: Optional[int] = None) -> Encoded:
        latents = self.encode_latents(images, num_tokens)
        prequant = self.quant_conv(latents)
        codes, quant = self.quantize(prequant)
        return Encoded(latents, prequant, codes, quant)

    def encode(self, images: torch.Tensor, num_tokens: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (codes (B, t) int64, quant (B, t, D) normalized codewords)."""
        out = self.encode_all(images, num_tokens)
        return out.codes, out.quant

    # ------------------------------------------------------------------ decode

    def decode(self, quant: torch.Tensor, t: Optional[int] = None, img_size: Optional[int] = None) -> torch.Tensor:
        """quant (B, T, D) -> raw pixels (B, 3, S, S) from the first t tokens.

        ``img_size`` defaults to the schedule's decode size for t (t defaults to T).
        """
        t = quant.shape[1] if t is None else t
        if not 1 <= t <= quant.shape[1]:
            raise ValueError(f"t must be in 1..{quant.shape[1]}, got {t}")
        img_size = self.schedule.decode_size(t) if img_size is None else img_size
        return self.decoder(self.post_quant_conv(quant), t, img_size)

    def decode_code(self, codes: torch.Tensor, t: Optional[int] = None,
                    img_size: Optional[int] = None) -> torch.Tensor:
        """codes (B, T) int -> raw pixels (B, 3, S, S); see :meth:`decode`."""
        return self.decode(self.quantize.lookup(codes), t, img_size)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, T) -> normalized codewords (B, T, D)."""
        return self.quantize.lookup(codes)


def load_tokenizer_checkpoint(path, map_location="cpu") -> VQModel:
    """Reference tokenizer (inference variant) from a model folder / .pt / .safetensors via the engine's safe loader."""
    from detailflow_engine.checkpoint import check_state_dict, load_checkpoint

    loaded = load_checkpoint(path, "tokenizer")
    model = VQModel(loaded.config)
    check_state_dict(model.state_dict(), loaded.state_dict, where=str(loaded.weights_path))
    model.load_state_dict(loaded.state_dict, strict=True)
    return model.to(map_location).eval()
