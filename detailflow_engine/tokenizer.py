"""Inference tokenizer: the shared SigLIP2 towers with our fused VQ kernels on the hot path.

The towers and the quantizer are the bottom layer's modules (``siglip2``, ``quantizer``: one
copy of the architecture under its official names); what the engine changes is the quantizer
boundary:

* encode: encoder latents -> ``quant_conv`` -> ``code_search`` (nearest normalized
  codeword without materializing the distance matrix);
* decode: ``vq_lookup`` (gather + L2-normalize + ``post_quant_conv`` + ``latent_pos_embed``
  in one pass) -> decoder tower -> ``to_pixel``.

Training-only parts (``refined_tokens``, ``refine_conv``, REPA, usage buffer) are never built.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from detailflow_engine.config import TokenizerConfig
from detailflow_engine.ops.code_search import code_search
from detailflow_engine.ops.vq_lookup import vq_lookup
from detailflow_engine.quantizer import VectorQuantizer
from detailflow_engine.schedule import Schedule
from detailflow_engine.siglip2 import build_tokenizer_towers


# What only encoding needs: a decode-only tokenizer (encoder=False) neither builds nor reads them.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


class Tokenizer(nn.Module):
    """DetailFlow VQ tokenizer for inference (official parameter names, inference keys only).

    ``encoder=False`` leaves out the encoder tower and quant_conv (a generate-only service never
    encodes): their keys are not in the state dict and ``encode`` raises.
    """

    def __init__(self, config: TokenizerConfig, encoder: bool = True):
        super().__init__()
        self.config, self.schedule = config, Schedule.from_config(config)
        for name, module in build_tokenizer_towers(config).items():
            if encoder or not (name + ".").startswith(ENCODER_PREFIXES):
                self.add_module(name, module)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm)

    @property
    def has_encoder(self) -> bool:
        return "encoder" in self._modules

    @property
    def num_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def image_size(self) -> int:
        return self.schedule.decode_size(self.num_tokens)

    # ------------------------------------------------------------------ encode

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, num_tokens: Optional[int] = None) -> torch.Tensor:
        """pixels (B, 3, H, W) float in [-1, 1] -> codes (B, t) int64.

        H = W must be a multiple of the encoder patch size; t defaults to all tokens
        (use ``self.schedule.best_tokens(H)`` for a lower-resolution image).
        """
        if not self.has_encoder:
            raise RuntimeError("this tokenizer was loaded without its encoder (encoder=False): load it with "
                               "encoder=True to encode images")
        self._check_pixels(pixels)
        t = self.num_tokens if num_tokens is None else self._check_prefix(num_tokens)
        latents = self.encoder(pixels.to(self.quant_conv.weight.dtype), t)[1]
        prequant = self.quant_conv(latents)
        return code_search(prequant, self.quantize.embedding.weight)

    # ------------------------------------------------------------------ decode

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, num_tokens: Optional[int] = None,
               img_size: Optional[int] = None) -> torch.Tensor:
        """codes (B, T') int64 -> pixels (B, 3, S, S) float in about [-1, 1] (unclamped).

        Decodes the first ``num_tokens`` codes (default: all given) at the schedule's size for
        that prefix (``img_size`` overrides it).
        """
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be an int64 tensor of shape (B, T), got "
                             f"{getattr(codes, 'dtype', type(codes))} {tuple(getattr(codes, 'shape', ()))}")
        if codes.shape[0] == 0:
            raise ValueError("codes is an empty batch")
        t = codes.shape[1] if num_tokens is None else self._check_prefix(num_tokens)
        if not 1 <= t <= min(codes.shape[1], self.num_tokens):
            raise ValueError(f"num_tokens={t} must be in 1..{min(codes.shape[1], self.num_tokens)} "
                             f"(codes hold {codes.shape[1]} tokens)")
        size = self.schedule.decode_size(t) if img_size is None else int(img_size)
        # vq_lookup is row-wise (each output row from its own code), so it runs once for the batch;
        # the decoder tower then runs one image per pass (batch invariance: see decode_positioned).
        z = vq_lookup(codes[:, :t], self.quantize.embedding.weight, self.post_quant_conv.weight,
                      self.post_quant_conv.bias, self.decoder.latent_pos_embed[0])  # (B, t, width), positions added
        return self.decoder.decode_positioned(z, size).float()

    # ------------------------------------------------------------------ checks

    def _check_prefix(self, t) -> int:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= self.num_tokens:
            raise ValueError(f"num_tokens must be an int in 1..{self.num_tokens}, got {t!r}")
        return t

    def _check_pixels(self, pixels) -> None:
        p = self.config.enc_patch_size
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise ValueError(f"pixels must be a float tensor (B, 3, H, W) in [-1, 1], got "
                             f"{getattr(pixels, 'dtype', type(pixels))}")
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
            raise ValueError(f"pixels must have shape (B, 3, H, W) with B >= 1, got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h != w or h % p:
            raise ValueError(f"pixels must be square with a side that is a multiple of {p}, got {h}x{w}")
        lo, hi = float(pixels.min()), float(pixels.max())
        if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"pixels must lie in [-1, 1] (uint8 images: x / 127.5 - 1), got range [{lo:.3g}, {hi:.3g}]")
        if pixels.device != self.post_quant_conv.weight.device:
            raise ValueError(f"pixels are on {pixels.device} but the tokenizer is on {self.post_quant_conv.weight.device}")
