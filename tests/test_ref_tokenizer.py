"""Reference tokenizer (python/detailflow_ref) vs the official golden outputs of tiny-a."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detailflow_engine.config import TokenizerConfig, read_config_files
from detailflow_engine.checkpoint import TOKENIZER_TRAINING_PREFIXES as TRAINING_ONLY_PREFIXES
from detailflow_engine.outputs import to_uint8
from detailflow_engine.siglip2 import blocked_attention_mask
from detailflow_ref.tokenizer import VQModel, resize_images

# fp32 tolerances from tiny-a/README.json "suggested_test_tolerance": pixels and latents 5e-5
# (fp32 vs fp64 reruns of the official code differ by <= 2.1e-6); codes exact (min distance gap 2.6e-3).
ATOL = 5e-5


@pytest.fixture(scope="module")
def tiny_config(tiny_a) -> TokenizerConfig:
    return TokenizerConfig.from_dicts(*read_config_files(tiny_a / "tokenizer"), where="tiny-a/tokenizer")


@pytest.fixture(scope="module")
def tiny_sd(tiny_a) -> dict:
    return torch.load(tiny_a / "tokenizer" / "checkpoints" / "16.pt", weights_only=True, map_location="cpu")["model"]


@pytest.fixture(scope="module")
def vq(tiny_config, tiny_sd) -> VQModel:
    model = VQModel(tiny_config).eval()
    model.load_state_dict({k: v for k, v in tiny_sd.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}, strict=True)
    return model


def _t(golden, key) -> torch.Tensor:
    return torch.from_numpy(golden[key])


def _close(got: torch.Tensor, golden, key: str, atol: float = ATOL) -> None:
    want = _t(golden, key)
    assert got.shape == want.shape, f"{key}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= atol, f"{key}: max abs err {err:.3e} > {atol:.0e}"


def test_training_variant_loads_full_checkpoint(tiny_config, tiny_sd):
    model = VQModel(tiny_config, training_modules=True)
    model.load_state_dict(tiny_sd, strict=True)
    dropped = sorted(set(tiny_sd) - set(VQModel(tiny_config).state_dict()))
    assert dropped == ["encoder.refined_tokens", "quantize.codebook_used", "refine_conv.bias", "refine_conv.weight"]


@torch.no_grad()
def test_encode(vq, golden):
    out = vq.encode_all(_t(golden, "enc_images"))
    _close(out.latents, golden, "enc_latent_tokens")
    _close(out.prequant, golden, "enc_prequant")
    _close(out.quant, golden, "enc_quant")
    assert out.codes.dtype == torch.int64
    assert torch.equal(out.codes, _t(golden, "enc_codes"))
    codes, quant = vq.encode(_t(golden, "enc_images"))
    assert torch.equal(codes, out.codes) and torch.equal(quant, out.quant)


@torch.no_grad()
def test_encode_lowres(vq, golden):
    low = resize_images(_t(golden, "enc_images"), 48)
    _close(low, golden, "enc_lowres_images", atol=1e-6)
    t = vq.schedule.best_tokens(48)
    assert t == 8
    codes, quant = vq.encode(_t(golden, "enc_lowres_images"), num_tokens=t)
    assert torch.equal(codes, _t(golden, "enc_lowres_codes"))
    _close(quant, golden, "enc_lowres_quant")


@torch.no_grad()
def test_decode_every_scheduled_prefix(vq, golden):
    codes = _t(golden, "dec_codes")
    _close(vq.lookup(codes), golden, "dec_quant", atol=1e-7)
    for t in vq.schedule.scheduled_tokens:
        key = f"dec_t{t:03d}"
        pixels = vq.decode_code(codes, t)  # size from the schedule
        _close(pixels, golden, key)
        if key + "_up" in golden:
            _close(resize_images(pixels, vq.config.image_size), golden, key + "_up")


@torch.no_grad()
def test_decode_generated_tokens_to_uint8(vq, golden):
    pixels = vq.decode_code(_t(golden, "gen_tokens"), img_size=64)
    _close(pixels, golden, "gen_images")
    img = to_uint8(pixels)
    assert img.dtype == torch.uint8 and img.shape == golden["gen_images_uint8"].shape
    diff = (img.int() - _t(golden, "gen_images_uint8").int()).abs().max().item()
    assert diff <= 1, f"gen_images_uint8: max abs diff {diff}"


def test_attention_masks(golden, tiny_config):
    g, c = tiny_config.group_size, tiny_config.causal_num
    cases = {
        "tok_enc_mask_blocked": (16, 16, True, True),
        "tok_enc_mask_blocked_lowres": (9, 8, True, True),
        "tok_dec_mask_blocked": (16, 16, False, tiny_config.causal_decoder),
        "tok_dec_mask_blocked_if_causal": (16, 16, False, True),
    }
    for key, (n, m, encoder, causal) in cases.items():
        got = blocked_attention_mask(n, m, encoder=encoder, causal=causal, group_size=g, causal_num=c).numpy()
        assert np.array_equal(got, golden[key]), f"{key}: {np.sum(got != golden[key])} entries differ"


def _expected_keys(meta16):
    rows = json.loads((meta16 / "state_dict_keys.json").read_text())["tokenizer_state_dict"]
    return {key: (tuple(shape), dtype) for key, shape, dtype in rows}


def _keys(model):
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def test_detailflow16_state_dict_keys(meta16):
    config = TokenizerConfig.from_dicts(*read_config_files(meta16 / "tokenizer"), where="detailflow16/tokenizer")
    with torch.device("meta"):
        full = VQModel(config, training_modules=True)
        infer = VQModel(config)
    want = _expected_keys(meta16)
    got = _keys(full)
    assert set(got) == set(want), (f"missing {sorted(set(want) - set(got))[:5]}, "
                                   f"extra {sorted(set(got) - set(want))[:5]}")
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not bad, f"shape/dtype mismatches: {bad[:5]}"
    want_infer = {k: v for k, v in want.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    assert _keys(infer) == want_infer
    # every training-only prefix is used by the release layout
    assert all(any(k.startswith(p) for k in want) for p in TRAINING_ONLY_PREFIXES if p != "projection.")
