"""Self-correction encoding of the DetailFlow tokenizer (official encode_image with noise).

The clean encode, and for a perturbation start `noise_idx` the corrected one: the codes from the
start on are replaced by random near neighbours, the encoder runs again with those as its
latent inputs, and its new codes become the targets after the perturbed span. Used by the
tokenizer trainer (correction training) and by `extract_codes` (the prior's training codes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from detailflow_engine.siglip2 import patchify

from .tokenizer import VQModel


def noise_token_index(t: int, group_size: int, causal_num: int) -> Optional[int]:
    """Official get_noise_token_idx(t, p=1): where the perturbation starts (None when t == 1)."""
    if t == 1:
        return None
    if t <= causal_num:
        hi = t
    else:
        if t % group_size or t < group_size + causal_num:
            raise ValueError(f"t={t} is not a scheduled group boundary")
        hi = t - group_size
    idx = int(torch.randint(0, hi, (1,)).item())
    return idx if idx < causal_num else idx // group_size * group_size


def noise_span(noise_idx: int, group_size: int, causal_num: int) -> int:
    """Tokens perturbed from noise_idx: one before causal_num, one group after."""
    return 1 if noise_idx < causal_num else group_size



@dataclass
class CorrectionEncoding:
    """Clean and self-corrected encodings of a batch (all (B, T[, D]); fp32 latents)."""

    zn: torch.Tensor                 # normalized clean latents
    zq: torch.Tensor                 # clean codewords
    distances: torch.Tensor          # (B*T, K) clean distances
    codes: torch.Tensor              # clean codes
    quant: torch.Tensor              # straight-through clean quant
    noise_idx: Optional[torch.Tensor] = None   # (B,) -1 = no perturbation
    noise_end: Optional[torch.Tensor] = None   # (B,)
    zn2: Optional[torch.Tensor] = None         # normalized latents of the re-encode
    zq2: Optional[torch.Tensor] = None
    distances2: Optional[torch.Tensor] = None
    codes_new: Optional[torch.Tensor] = None   # codes of the re-encode (meaningful from noise_end on)
    quant_noisy: Optional[torch.Tensor] = None # [perturbed prefix (detached) | re-encoded straight-through]
    input_codes: Optional[torch.Tensor] = None
    target_codes: Optional[torch.Tensor] = None


def _normalized_distances(vq: VQModel, prequant: torch.Tensor):
    """fp32 normalized latents (B, T, D) and squared distances (B*T, K) to the codebook."""
    with torch.autocast(device_type=prequant.device.type, enabled=False):
        zn = vq.quantize.normalize(prequant.float())
        d = vq.quantize.distances(zn.reshape(-1, zn.shape[-1]))
    return zn, d


def _encode_with_latent_inputs(encoder, images: torch.Tensor, latent_inputs: torch.Tensor) -> torch.Tensor:
    """The encoder with explicit latent inputs (B, t, D) in place of latent_tokens -> latent states."""
    p = encoder.patch_size
    x = encoder.visual_model.embeddings(patchify(images, p), images.shape[-2] // p, images.shape[-1] // p)
    return encoder._run(x, latent_inputs)[1]


def self_correction_encode(vq: VQModel, images: torch.Tensor, num_tokens: int,
                           noise_idx: Union[None, int, torch.Tensor], top_k: int = 50) -> CorrectionEncoding:
    """Official encode_image: the clean encode and, where ``noise_idx`` >= 0, the corrected one.

    ``noise_idx``: None (clean only), an int (same for the whole batch, as in training) or a
    (B,) tensor (per image; -1 = none). Random near-neighbour codes use the global torch RNG.
    Returns codes with the official relation: input = clean before i, perturbed on [i, e),
    re-encoded from e; target = clean before e, re-encoded from e.
    """
    b, T = images.shape[0], num_tokens
    codebook = vq.quantize.codebook()
    zn, d = _normalized_distances(vq, vq.quant_conv(vq.encoder(images, T)[1]))
    if noise_idx is None:
        codes = torch.argmin(d, dim=1).view(b, T)
        zq = codebook[codes].float()
        return CorrectionEncoding(zn, zq, d, codes, zn + (zq - zn).detach())

    k = min(int(top_k), codebook.shape[0])
    topk = torch.topk(d, k=k, dim=1, largest=False).indices              # (B*T, k), nearest first
    codes = topk[:, 0].view(b, T)
    pick = torch.randint(0, k, (b * T,), device=d.device)
    noise_codes = topk.gather(1, pick[:, None]).view(b, T)
    zq = codebook[codes].float()
    quant = zn + (zq - zn).detach()

    g, c = vq.config.group_size, vq.config.causal_num
    if isinstance(noise_idx, torch.Tensor):
        i = noise_idx.to(images.device).long().reshape(b, 1)
    else:  # a fill on the device: no blocking host-to-device copy inside the training step
        i = torch.full((b, 1), int(noise_idx), dtype=torch.long, device=images.device)
    e = torch.where(i < 0, i, i + torch.where(i < c, 1, g))
    pos = torch.arange(T, device=images.device)[None]                   # (1, T)
    before_i, before_e = pos < i, pos < e
    quant_noise = torch.where(before_i[..., None], quant, codebook[noise_codes].float()).detach()
    refined = vq.encoder.refined_tokens[:, :T]
    latent_in = torch.where(before_e[..., None], vq.refine_conv(quant_noise).to(refined.dtype), refined)
    zn2, d2 = _normalized_distances(vq, vq.quant_conv(_encode_with_latent_inputs(vq.encoder, images, latent_in)))
    codes_new = torch.argmin(d2, dim=1).view(b, T)
    zq2 = codebook[codes_new].float()
    quant2 = zn2 + (zq2 - zn2).detach()
    noisy = (i >= 0)
    quant_noisy = torch.where(before_e[..., None], quant_noise, quant2)
    quant_noisy = torch.where(noisy[..., None], quant_noisy, quant)
    input_codes = torch.where(before_i, codes, torch.where(before_e, noise_codes, codes_new))
    target_codes = torch.where(before_e, codes, codes_new)
    input_codes = torch.where(noisy, input_codes, codes)
    target_codes = torch.where(noisy, target_codes, codes)
    return CorrectionEncoding(zn, zq, d, codes, quant, i.view(b), e.view(b), zn2, zq2, d2, codes_new,
                              quant_noisy, input_codes, target_codes)
