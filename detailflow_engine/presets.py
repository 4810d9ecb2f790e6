"""Model presets at the released sizes, for benchmarks and profiles with random weights.

The released DetailFlow-16 configs (tests/fixtures/detailflow16-meta) as dicts, so anyone can
run the real shapes without the release: GPT-L prior (24 x 1024, 16 heads, vocab 8192,
128 tokens, group 8) and a SigLIP2-base tokenizer at 256 px.
"""
from __future__ import annotations

import torch

from detailflow_engine.config import PriorConfig, TokenizerConfig

DETAILFLOW16_PRIOR = dict(
    dim=1024, n_layer=24, n_head=16, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None,
    rope_base=10000, norm_eps=1e-5, num_classes=1000, class_dropout_prob=0.1, model_type="c2i",
    vocab_size=8192, cls_token_num=1, block_size=128, group_size=8, causal_num=None)
DETAILFLOW16_TOKENIZER = dict(
    image_size=256, max_image_size=256, codebook_size=8192, codebook_embed_dim=8, codebook_l2_norm=True,
    enc_type="siglip2", dec_type="siglip2", encoder_model="siglip2_base", decoder_model="siglip2_base",
    num_latent_tokens=128, enc_pretrained=True, dec_pretrained=False, enc_patch_size=16, dec_patch_size=16,
    causal_encoder=True, causal_decoder=False, group_size=8, causal_num=None, correction_training=True,
    global_token_loss_weight=0.0, repa=False)
PRESETS = {"detailflow16": (DETAILFLOW16_PRIOR, {"gpt_model": "GPT-L"}, DETAILFLOW16_TOKENIZER,
                            {"degradation_power": 1.5, "max_image_size": 256})}


def preset_configs(name: str = "detailflow16") -> tuple[PriorConfig, TokenizerConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    pj, py, tj, ty = PRESETS[name]
    return (PriorConfig.from_dicts(pj, py, where=f"preset {name}"),
            TokenizerConfig.from_dicts(tj, ty, where=f"preset {name}"))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with seeded, scale-aware random values (fan-in scaled for matrices)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "table" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            elif name.endswith("norm.weight") or name.endswith("layer_norm1.weight") \
                    or name.endswith("layer_norm2.weight") or name.endswith("post_layernorm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 if p.dim() < 2 else torch.randn(p.shape, generator=gen))
    return model
