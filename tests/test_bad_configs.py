"""Bad model folders (issue #19 items 6 and 7): refused with a named error, fast, before building.

Each case edits a writable copy of the tiny-a fixture (official layout) and loads it through the
engine's loaders. Config errors name the file (config.json or config.yaml) and the field; weight
errors name the checkpoint file and the key. Absurd sizes must be refused in well under 2 s
without building a model or allocating (they used to allocate GBs or build for minutes), and a
refusal never changes the model folder.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest
import torch
import yaml

from detailflow_engine import convert, loading
from detailflow_engine.checkpoint import (CheckpointConfigError, CheckpointError, check_config_fits,
                                          load_checkpoint)
from detailflow_engine.config import ConfigError, PriorConfig, TokenizerConfig, read_config_files
from conftest import copy_model

LOADERS = {"prior": loading.load_prior, "tokenizer": loading.load_tokenizer}
FAST_S = 2.0
MAX_RSS_GROWTH_MB = 200  # a refused absurd config used to allocate 3-10 GB


@pytest.fixture
def models(tiny_a, tmp_path):
    return {kind: copy_model(tiny_a / kind, tmp_path / kind) for kind in LOADERS}


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model gets built: these refusals must come before any module exists."""
    def refuse(config):
        raise AssertionError("a model was built for a config that should have been refused")

    monkeypatch.setattr(loading, "Prior", refuse)
    monkeypatch.setattr(loading, "Tokenizer", refuse)


def _edit_config(folder: Path, name: str, **values) -> Path:
    path = folder / name
    if name == "config.json":  # json.dumps writes nan/inf as the NaN/Infinity literals json.loads accepts
        data = json.loads(path.read_text())
        data.update(values)
        path.write_text(json.dumps(data, indent=4))
    else:
        data = yaml.safe_load(path.read_text())
        data.update(values)
        path.write_text(yaml.safe_dump(data))
    return path


def _edit_weights(folder: Path, edit) -> Path:
    """Apply ``edit(state_dict)`` to every state dict ('model', 'ema') of the folder's .pt."""
    pt = folder / "checkpoints" / "16.pt"
    ckpt = torch.load(pt, weights_only=True)
    for which in ("model", "ema"):
        if which in ckpt:
            edit(ckpt[which])
    torch.save(ckpt, pt)
    return pt


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused(kind: str, folder: Path, error=CheckpointError, **kwargs) -> str:
    """Load ``folder``, expect ``error``; check it was fast and left the folder unchanged."""
    before = _files(folder)
    start = time.perf_counter()
    with pytest.raises(error) as exc:
        LOADERS[kind](folder, device="cpu", **kwargs)
    elapsed = time.perf_counter() - start
    assert elapsed < FAST_S, f"took {elapsed:.2f} s to refuse"
    assert _files(folder) == before, "a refused load changed the model folder"
    return str(exc.value)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --------------------------------------------------------------------------- item 6: absurd sizes

@pytest.mark.parametrize("kind,file,field,value", [
    ("prior", "config.json", "block_size", 10 ** 9),       # was: a 3.16 GB rotary table, then a RuntimeError
    ("prior", "config.json", "group_size", 10 ** 9),       # was: 8 GB
    ("prior", "config.json", "n_layer", 10 ** 5),          # was: 84 s and 3.6 GB
    ("prior", "config.json", "n_layer", 10 ** 7),          # was: still building after 90 s
    ("prior", "config.json", "dim", 10 ** 9),
    ("prior", "config.json", "vocab_size", 10 ** 9),
    ("prior", "config.json", "num_classes", 10 ** 9),
    ("tokenizer", "config.json", "encoder_model", "siglip2_custom_L100000_D64_H4"),  # was: still building
    ("tokenizer", "config.json", "decoder_model", "siglip2_custom_L100000_D64_H4"),
    ("tokenizer", "config.json", "decoder_model", "siglip2_custom_L2_D1000000000_H4"),
    ("tokenizer", "config.yaml", "max_image_size", 100000),  # was: loads, then generate tries 10 GB
    ("tokenizer", "config.json", "num_latent_tokens", 10 ** 9),
    ("tokenizer", "config.json", "codebook_size", 10 ** 9),
    ("tokenizer", "config.json", "image_size", 10 ** 6),
])
def test_absurd_sizes_are_refused_fast_without_building(models, no_build, kind, file, field, value):
    path = _edit_config(models[kind], file, **{field: value})
    rss = _peak_rss_mb()
    msg = _refused(kind, models[kind], ConfigError)
    assert _peak_rss_mb() - rss < MAX_RSS_GROWTH_MB
    assert str(path) in msg and field in msg, msg


def test_max_image_size_from_config_json_names_that_file(models, no_build):
    """config.yaml's max_image_size wins; when it is null config.json's is used, and named."""
    _edit_config(models["tokenizer"], "config.yaml", max_image_size=None)
    path = _edit_config(models["tokenizer"], "config.json", max_image_size=100000)
    msg = _refused("tokenizer", models["tokenizer"], ConfigError)
    assert msg.startswith(f"{path}: max_image_size must be an int in 1..4096, got 100000"), msg


def test_a_patch_grid_beyond_the_bound_is_refused(models, no_build):
    path = _edit_config(models["tokenizer"], "config.yaml", max_image_size=4096)  # 256x256 patches of 16
    msg = _refused("tokenizer", models["tokenizer"], ConfigError)
    assert str(path) in msg and "max_image_size=4096" in msg and "256x256 patch grid" in msg, msg


@pytest.mark.parametrize("kind,field,value,key", [
    ("prior", "n_layer", 1000, "'layers.'"),                 # within bounds, but the file has 2 layers
    ("prior", "dim", 1024, "tok_embeddings.weight"),
    ("prior", "vocab_size", 8192, "tok_embeddings.weight"),
    ("prior", "num_classes", 1000, "cls_embedding.embedding_table.weight"),
    ("prior", "class_dropout_prob", 0.0, "cls_embedding.embedding_table.weight"),  # no null-class row
    ("prior", "group_size", 8, "spe_tok_embeddings.special_embeddings.weight"),
    ("prior", "multiple_of", 512, "layers.0.feed_forward.w1.weight"),
    ("tokenizer", "encoder_model", "siglip2_custom_L1000_D64_H4", "'encoder.visual_model.encoder.layers.'"),
    ("tokenizer", "decoder_model", "siglip2_custom_L2_D128_H4", "decoder.latent_pos_embed"),
    ("tokenizer", "num_latent_tokens", 4096, "encoder.latent_tokens"),
    ("tokenizer", "codebook_size", 8192, "quantize.embedding.weight"),
    ("tokenizer", "codebook_embed_dim", 16, "quantize.embedding.weight"),
    ("tokenizer", "enc_patch_size", 8, "encoder.visual_model.embeddings.patch_embedding.weight"),
    ("tokenizer", "dec_patch_size", 32, "decoder.to_pixel.model.weight"),
])
def test_sizes_that_do_not_fit_the_weights_are_refused_before_building(models, no_build, kind, field, value, key):
    path = _edit_config(models[kind], "config.json", **{field: value})
    msg = _refused(kind, models[kind], CheckpointConfigError)
    assert str(path) in msg and field in msg and key in msg, msg
    assert str(models[kind] / "checkpoints" / "16.pt") in msg, msg


def test_layer_numbering_with_a_gap_is_refused(models, no_build):
    def renumber(sd):
        for name in [k for k in sd if k.startswith("layers.1.")]:
            sd["layers.5." + name[len("layers.1."):]] = sd.pop(name)

    _edit_weights(models["prior"], renumber)
    msg = _refused("prior", models["prior"], CheckpointConfigError)
    assert "n_layer=2" in msg and "2 layers numbered 0, 5" in msg, msg


def test_a_tokenizer_checkpoint_is_not_taken_for_a_prior(models, no_build):
    (models["prior"] / "checkpoints" / "16.pt").write_bytes(
        (models["tokenizer"] / "checkpoints" / "16.pt").read_bytes())
    msg = _refused("prior", models["prior"], CheckpointConfigError)
    assert "n_layer=2" in msg and "0 layers" in msg, msg


def test_the_released_layouts_fit_their_configs(meta16):
    """The size checks accept the released DetailFlow-16 configs with their recorded key shapes."""
    keys = json.loads((meta16 / "state_dict_keys.json").read_text())
    for kind, cls in (("tokenizer", TokenizerConfig), ("prior", PriorConfig)):
        config = cls.from_dicts(*read_config_files(meta16 / kind))
        state = {k: torch.empty(shape, device="meta") for k, shape, _ in keys[f"{kind}_state_dict"]}
        check_config_fits(config, state, config_path=meta16 / kind / "config.json", weights_path="release")


# --------------------------------------------------------------------------- item 7: invalid values

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kind,file,field,value,expected", [
    # zero / negative sizes (were ZeroDivisionError) and Infinity (was OverflowError)
    ("prior", "config.json", "n_head", 0, "an int in 1.."),
    ("prior", "config.json", "n_head", -4, "an int in 1.."),
    ("prior", "config.json", "multiple_of", 0, "an int in 1.."),
    ("prior", "config.json", "block_size", INF, "got inf"),
    ("prior", "config.json", "n_layer", NAN, "got nan"),
    ("prior", "config.json", "num_classes", 0, "an int in 1.."),
    ("prior", "config.json", "vocab_size", -1, "an int in 1.."),
    ("prior", "config.json", "causal_num", 0, "an int in 1..16 (block_size)"),
    ("prior", "config.json", "causal_num", 6, "causal_num=6 must be a multiple of group_size=4"),
    ("prior", "config.json", "block_size", 18, "block_size=18 must be a multiple of group_size=4"),
    ("prior", "config.json", "n_kv_head", 0, "an int in 1..4 (n_head)"),
    ("prior", "config.json", "n_kv_head", 3, "n_head=4 must be a multiple of n_kv_head=3"),
    ("prior", "config.json", "cls_token_num", 0, "an int in 1.."),
    ("prior", "config.json", "n_head", 32, "dim/n_head = 64/32 = 2 must be a multiple of 4 (2D rotary)"),
    ("prior", "config.json", "n_head", 5, "dim=64 is not divisible by n_head=5"),
    # accepted silently before
    ("prior", "config.json", "dim", 64.9, "an int in 1..65536, got 64.9"),
    ("prior", "config.json", "dim", "64", "got '64'"),
    ("prior", "config.json", "dim", 64.0, "got 64.0"),  # ints are JSON ints, documented in config._Fields
    ("prior", "config.json", "dim", True, "got True"),
    ("prior", "config.json", "norm_eps", NAN, "a finite number > 0 and <= 1, got nan"),
    ("prior", "config.json", "norm_eps", 0.0, "a finite number > 0"),
    ("prior", "config.json", "norm_eps", -1e-5, "a finite number > 0"),
    ("prior", "config.json", "rope_base", 0, "a finite number > 0, got 0"),
    ("prior", "config.json", "rope_base", -10000, "a finite number > 0"),
    ("prior", "config.json", "rope_base", INF, "got inf"),
    ("prior", "config.json", "ffn_dim_multiplier", 0.0, "a finite number > 0"),
    ("prior", "config.json", "ffn_dim_multiplier", NAN, "got nan"),
    ("prior", "config.json", "class_dropout_prob", 1.5, "a finite number >= 0 and <= 1"),
    ("prior", "config.json", "model_type", 7, "a string"),
    ("prior", "config.yaml", "gpt_model", 7, "a string"),
    ("tokenizer", "config.json", "codebook_size", 0, "an int in 1.."),
    ("tokenizer", "config.json", "codebook_embed_dim", 0, "an int in 1.."),
    ("tokenizer", "config.json", "enc_patch_size", 0, "an int in 1..64"),
    ("tokenizer", "config.json", "dec_patch_size", -16, "an int in 1..64"),
    ("tokenizer", "config.json", "enc_patch_size", 32, "enc_patch_size=32 must be <= dec_patch_size=16"),
    ("tokenizer", "config.json", "image_size", 0, "an int in 1..4096, got 0"),
    ("tokenizer", "config.json", "image_size", -64, "an int in 1..4096, got -64"),
    ("tokenizer", "config.json", "image_size", "64", "got '64'"),
    ("tokenizer", "config.json", "num_latent_tokens", 0, "an int in 1.."),
    ("tokenizer", "config.json", "num_latent_tokens", 18, "num_latent_tokens=18 must be a multiple of group_size=4"),
    ("tokenizer", "config.json", "group_size", 0, "an int in 1..16 (num_latent_tokens)"),
    ("tokenizer", "config.json", "encoder_model", "siglip2_custom_L2_D64_H0", "heads must be in 1..64, got 0"),
    ("tokenizer", "config.json", "encoder_model", "siglip2_custom_L0_D64_H4", "layers must be in 1..1024, got 0"),
    ("tokenizer", "config.json", "decoder_model", "siglip2_custom_L2_D0_H4", "width must be in 1..65536, got 0"),
    ("tokenizer", "config.json", "decoder_model", "siglip2_custom_L2_D64_H5", "not divisible by 5 heads"),
    ("tokenizer", "config.json", "encoder_model", 5, "a string"),
    ("tokenizer", "config.json", "codebook_l2_norm", "false", "true or false, got 'false'"),
    ("tokenizer", "config.json", "causal_encoder", 1, "true or false"),
    ("tokenizer", "config.json", "global_token_loss_weight", NAN, "got nan"),
    ("tokenizer", "config.yaml", "max_image_size", 0, "an int in 1..4096, got 0"),
    ("tokenizer", "config.yaml", "max_image_size", 64.5, "got 64.5"),
    ("tokenizer", "config.yaml", "min_image_size", -1, "an int in 1..4096"),
    ("tokenizer", "config.yaml", "degradation_power", NAN, "a finite number > 0 and <= 16, got nan"),
    ("tokenizer", "config.yaml", "degradation_power", 0, "a finite number > 0"),
    ("tokenizer", "config.yaml", "degradation_power", INF, "got inf"),
    ("tokenizer", "config.yaml", "degradation_power", "1.5", "got '1.5'"),
])
def test_invalid_values_are_refused_naming_file_and_field(models, no_build, kind, file, field, value, expected):
    path = _edit_config(models[kind], file, **{field: value})
    msg = _refused(kind, models[kind], ConfigError)
    assert msg.startswith(f"{path}: "), msg
    assert field in msg and expected in msg, msg
    assert "\n" not in msg


# --------------------------------------------------------------------------- item 7: weights

BAD_DTYPES = [torch.bool, torch.int8, torch.int32, torch.int64, torch.uint8, torch.complex64,
              torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_non_float_weights_are_refused_by_key_and_dtype(models, no_build, dtype):
    key = "layers.0.attention.wo.weight"
    pt = _edit_weights(models["prior"], lambda sd: sd.__setitem__(key, sd[key].to(dtype)))
    msg = _refused("prior", models["prior"])
    assert str(pt) in msg and key in msg and str(dtype) in msg, msg


def test_non_float_weights_in_safetensors_are_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "tok-st"
    assert convert.main([str(models["tokenizer"]), str(out), "--kind", "tokenizer"]) == 0
    state = load_file(str(out / "model.safetensors"))
    state["quantize.embedding.weight"] = state["quantize.embedding.weight"].to(torch.int64)
    save_file(state, str(out / "model.safetensors"))
    msg = _refused("tokenizer", out)
    assert "quantize.embedding.weight" in msg and "torch.int64" in msg and "model.safetensors" in msg, msg


def test_training_only_tensors_are_exempt_from_the_dtype_check(models):
    """quantize.codebook_used is a usage counter, kept only with skip_prefixes=() (extract_codes)."""
    key = "quantize.codebook_used"
    _edit_weights(models["tokenizer"], lambda sd: sd.__setitem__(key, sd[key].to(torch.int64)))
    assert load_checkpoint(models["tokenizer"], "tokenizer", skip_prefixes=()).state_dict[key].dtype == torch.int64
    loading.load_tokenizer(models["tokenizer"])  # skipped, so never read


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_converted_folders_still_load(models, tmp_path, dtype):
    """Every storage dtype of convert loads in every model dtype (fp16 is a storage format only)."""
    for kind in LOADERS:
        out = tmp_path / f"{kind}-{dtype}"
        assert convert.main([str(models[kind]), str(out), "--kind", kind, "--dtype", dtype]) == 0
        LOADERS[kind](out, device="cpu")
        for model_dtype in loading.DTYPES:
            LOADERS[kind](out, device="cpu", dtype=model_dtype)


@pytest.mark.parametrize("kind,key,value", [
    ("prior", "layers.1.feed_forward.w2.weight", float("nan")),
    ("prior", "tok_embeddings.weight", float("inf")),
    ("tokenizer", "decoder.to_pixel.model.weight", float("-inf")),
    ("tokenizer", "quantize.embedding.weight", float("nan")),
])
def test_non_finite_weights_are_refused_by_key(models, kind, key, value):
    def poison(sd):
        sd[key] = sd[key].clone()
        sd[key].view(-1)[sd[key].numel() // 2] = value

    pt = _edit_weights(models[kind], poison)
    msg = _refused(kind, models[kind])
    assert str(pt) in msg and key in msg and ("NaN" if value != value else "inf") in msg, msg


def test_the_first_non_finite_key_is_named(models):
    first, later = "layers.0.attention.wqkv.weight", "output.weight"

    def poison(sd):
        for key in (later, first):
            sd[key] = sd[key].clone()
            sd[key][0, 0] = float("nan")

    _edit_weights(models["prior"], poison)
    msg = _refused("prior", models["prior"])
    assert f"{first} holds NaN values (2 tensors do)" in msg and later not in msg, msg


@pytest.mark.parametrize("dtype", ["fp16", "float16", torch.float16, "float32", torch.float64])
def test_model_dtypes_are_fp32_and_bf16_only(models, dtype):
    """fp16 is not a model dtype (the CPU kernels take fp32 and bf16: linear.KERNEL_DTYPES), nor are
    the long spellings; each is refused by name before the checkpoint is read."""
    for kind in LOADERS:
        msg = _refused(kind, models[kind], error=ValueError, dtype=dtype)
        assert "dtype must be one of ['fp32', 'bf16']" in msg, msg
