"""Typed configs: sizes by name, and errors that name the problem."""
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
