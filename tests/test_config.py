"""Typed configs: sizes by name, and errors that name the problem."""
import re

import pytest

from detailflow_engine.config import ConfigError, PriorConfig, TokenizerConfig, resolve_tower


@pytest.mark.parametrize("name,sizes", [
    ("GPT-L", (24, 16, 1024)),
    ("GPT-custom-L6-D256-H8", (6, 8, 256)),
])
def test_prior_sizes_from_the_yaml_name_when_json_lacks_them(name, sizes):
    cfg = PriorConfig.from_dicts(dict(vocab_size=16, block_size=8, num_classes=3, group_size=4),
                                 {"gpt_model": name})
    assert (cfg.n_layer, cfg.n_head, cfg.dim) == sizes


def test_json_sizes_win_over_the_name():
    cfg = PriorConfig.from_dicts(dict(vocab_size=16, block_size=8, num_classes=3, group_size=4,
                                      n_layer=2, n_head=4, dim=64), {"gpt_model": "GPT-L"})
    assert (cfg.n_layer, cfg.n_head, cfg.dim, cfg.ffn_hidden) == (2, 4, 64, 256)


@pytest.mark.parametrize("name,pretrained,width,layers,mlp", [
    ("siglip2_base", True, 1152, 12, 4304),
    ("siglip2_base", False, 768, 12, 3072),
    ("siglip2_large", True, 1152, 16, 4304),
    ("siglip2", True, 1152, 27, 4304),
    ("siglip2_custom_L4_D128_H4", False, 128, 4, 512),
])
def test_tower_sizes_by_name(name, pretrained, width, layers, mlp):
    t = resolve_tower(name, pretrained, 16)
    assert (t.hidden_size, t.num_layers, t.intermediate_size) == (width, layers, mlp)


@pytest.mark.parametrize("cfg,match", [
    (dict(encoder_model="siglip2_huge"), "unknown tower name 'siglip2_huge'"),
    (dict(group_size=4, causal_num=6), "causal_num=6 must be a multiple of group_size=4"),
    (dict(enc_type="cnn"), "enc_type='cnn' is not supported"),
])
def test_tokenizer_config_errors(cfg, match):
    base = dict(image_size=64, codebook_size=16, codebook_embed_dim=8, num_latent_tokens=16,
                encoder_model="siglip2_custom_L2_D64_H4", decoder_model="siglip2_custom_L2_D64_H4",
                enc_patch_size=16, dec_patch_size=16, group_size=4)
    with pytest.raises(ConfigError, match=match):
        TokenizerConfig.from_dicts({**base, **cfg})


def test_prior_config_missing_keys_named():
    with pytest.raises(ConfigError, match="missing keys"):
        PriorConfig.from_dicts(dict(vocab_size=16))


def test_released_and_embedded_configs_validate(meta16):
    from detailflow_engine.assets import DEFAULT_PRIOR, DEFAULT_TOKENIZER
    from detailflow_engine.config import read_config_files

    for prior, tokenizer in ((meta16 / "prior", meta16 / "tokenizer"), (DEFAULT_PRIOR, DEFAULT_TOKENIZER)):
        PriorConfig.from_dicts(*read_config_files(prior))
        TokenizerConfig.from_dicts(*read_config_files(tokenizer))


_PRIOR = dict(vocab_size=16, block_size=8, num_classes=3, group_size=4, n_layer=2, n_head=4, dim=64)


@pytest.mark.parametrize("change,match", [
    (dict(n_head=0), r"^config\.json: n_head must be an int in 1\.\.65536, got 0$"),
    (dict(dim=64.0), r"^config\.json: dim must be an int in 1\.\.65536, got 64\.0$"),
    (dict(norm_eps=float("inf")), r"^config\.json: norm_eps must be a finite number > 0 and <= 1, got inf$"),
    (dict(block_size=10 ** 400), r"^config\.json: block_size must be an int in 1\.\.4096, got an int of 401 digits$"),
    (dict(rope_base=10 ** 400), r"^config\.json: rope_base must be a finite number > 0, got an int of 401 digits$"),
])
def test_prior_values_are_typed_and_bounded(change, match):
    with pytest.raises(ConfigError, match=match):
        PriorConfig.from_dicts({**_PRIOR, **change})


def test_sizes_from_the_gpt_model_name_are_bounded_and_name_the_yaml():
    sizes = {k: _PRIOR[k] for k in ("vocab_size", "block_size", "num_classes", "group_size")}
    with pytest.raises(ConfigError, match=r"^m/config\.yaml: gpt_model 'GPT-custom-L100000-D64-H4': "
                                          r"n_layer must be an int in 1\.\.1024, got 100000$"):
        PriorConfig.from_dicts(sizes, {"gpt_model": "GPT-custom-L100000-D64-H4"}, where="m/config.json")


@pytest.mark.parametrize("name,match", [
    ("siglip2_custom_L0_D64_H4", "layers must be in 1..1024, got 0"),
    ("siglip2_custom_L100000_D64_H4", "layers must be in 1..1024, got 100000"),
    ("siglip2_custom_L2_D64_H0", "heads must be in 1..64, got 0"),
    ("siglip2_custom_L2_D64_H128", "heads must be in 1..64, got 128"),
    ("siglip2_custom_L2_D64_H4000000000000", "unknown tower name"),  # over 9 digits: not a size
])
def test_custom_tower_sizes_are_bounded(name, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        resolve_tower(name, False, 16)
