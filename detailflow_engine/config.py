"""Typed configs read from an official DetailFlow model folder.

A model folder holds ``config.json`` (the official ``ModelArgs.__dict__``) and
``config.yaml`` (the training arguments). We keep the raw dicts so a folder we
write reads back byte-for-byte the same way in the official loaders, and derive
typed, validated sizes from them. Sizes come from config.json (the official
loader re-derives the GPT sizes from the yaml name; config.json is the truth).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A model config is missing, unreadable or describes an unknown model."""


# SigLIP2-so400m-patch16 sizes: the towers of the released models are prefixes of it.
_SO400M = dict(hidden_size=1152, num_heads=16, intermediate_size=4304, max_layers=27)
_CUSTOM_TOWER = re.compile(r"^siglip2_custom_L(\d+)_D(\d+)_H(\d+)$")
_CUSTOM_GPT = re.compile(r"^GPT-custom-L(\d+)-D(\d+)-H(\d+)$")

# (n_layer, n_head, dim) of the official GPT_models table.
GPT_SIZES = {
    "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280),
    "GPT-XLPlus": (42, 22, 1408), "GPT-XXL": (48, 24, 1536), "GPT-XXLPlus": (48, 30, 1920),
    "GPT-XXXL": (48, 40, 2560), "GPT-1B": (22, 32, 2048), "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}

TOWER_LAYER_NORM_EPS = 1e-6
RAW_PATCH_SIZE = 16  # SigLIP2 patch16: the patch embedding in_features is 3*16*16 unless re-made
POSITION_TABLE_SIDE = 16  # 256-entry position table, viewed as 16x16 and resized per image


@dataclass(frozen=True)
class TowerConfig:
    """One SigLIP2-style ViT tower (encoder or decoder)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    patch_size: int  # the patch size actually used (config enc/dec_patch_size)
    layer_norm_eps: float = TOWER_LAYER_NORM_EPS
    position_table_side: int = POSITION_TABLE_SIDE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def resolve_tower(name: str, pretrained: bool, patch_size: int) -> TowerConfig:
    """Tower sizes by name, as the official model_builder builds them (DESIGN.md section 6)."""
    m = _CUSTOM_TOWER.match(name or "")
    if m:
        layers, width, heads = map(int, m.groups())
        if width % heads:
            raise ConfigError(f"tower {name!r}: width {width} is not divisible by {heads} heads")
        return TowerConfig(name, layers, width, heads, 4 * width, patch_size)
    if name == "siglip2_base":
        if pretrained:
            return TowerConfig(name, 12, _SO400M["hidden_size"], _SO400M["num_heads"],
                               _SO400M["intermediate_size"], patch_size)
        return TowerConfig(name, 12, 768, 12, 3072, patch_size)
    if name in ("siglip2_large", "siglip2"):
        layers = 16 if name == "siglip2_large" else _SO400M["max_layers"]
        return TowerConfig(name, layers, _SO400M["hidden_size"], _SO400M["num_heads"],
                           _SO400M["intermediate_size"], patch_size)
    raise ConfigError(
        f"unknown tower name {name!r}: expected siglip2_base, siglip2_large, siglip2 "
        f"or siglip2_custom_L<layers>_D<width>_H<heads>")


@dataclass(frozen=True)
class TokenizerConfig:
    """The VQ tokenizer: config.json (ModelArgs) + the schedule facts of config.yaml."""

    image_size: int
    max_image_size: int
    codebook_size: int
    codebook_embed_dim: int
    codebook_l2_norm: bool
    num_latent_tokens: int
    encoder: TowerConfig
    decoder: TowerConfig
    causal_encoder: bool
    causal_decoder: bool
    group_size: int
    causal_num: int  # resolved: config null -> group_size
    correction_training: bool
    global_token_loss_weight: float
    repa: bool
    degradation_power: float
    raw_json: dict = field(default_factory=dict, compare=False, repr=False)
    raw_yaml: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def enc_patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def dec_patch_size(self) -> int:
        return self.decoder.patch_size

    @property
    def has_training_towers(self) -> bool:
        """Whether the official model builds repa_model/global_token_proj (training only)."""
        return self.repa or self.global_token_loss_weight != 0

    @classmethod
    def from_dicts(cls, cfg: dict, ycfg: Optional[dict] = None, where: str = "config") -> "TokenizerConfig":
        ycfg = dict(ycfg or {})
        need = ["image_size", "codebook_size", "codebook_embed_dim", "num_latent_tokens",
                "encoder_model", "decoder_model", "enc_patch_size", "dec_patch_size", "group_size"]
        _require(cfg, need, where)
        for key in ("enc_type", "dec_type"):
            if cfg.get(key, "siglip2") != "siglip2":
                raise ConfigError(f"{where}: {key}={cfg[key]!r} is not supported (only 'siglip2')")
        group = int(cfg["group_size"])
        causal_num = group if cfg.get("causal_num") is None else int(cfg["causal_num"])
        if group < 1 or causal_num % group:
            raise ConfigError(f"{where}: causal_num={causal_num} must be a multiple of group_size={group}")
        if ycfg.get("content_degradation", "resolution_power") != "resolution_power":
            raise ConfigError(f"{where}: content_degradation={ycfg['content_degradation']!r} is not supported")
        return cls(
            image_size=int(cfg["image_size"]),
            max_image_size=int(ycfg.get("max_image_size") or cfg.get("max_image_size") or cfg["image_size"]),
            codebook_size=int(cfg["codebook_size"]),
            codebook_embed_dim=int(cfg["codebook_embed_dim"]),
            codebook_l2_norm=bool(cfg.get("codebook_l2_norm", True)),
            num_latent_tokens=int(cfg["num_latent_tokens"]),
            encoder=resolve_tower(cfg["encoder_model"], bool(cfg.get("enc_pretrained", True)), int(cfg["enc_patch_size"])),
            decoder=resolve_tower(cfg["decoder_model"], bool(cfg.get("dec_pretrained", False)), int(cfg["dec_patch_size"])),
            causal_encoder=bool(cfg.get("causal_encoder", False)),
            causal_decoder=bool(cfg.get("causal_decoder", True)),
            group_size=group,
            causal_num=causal_num,
            correction_training=bool(cfg.get("correction_training", True)),
            global_token_loss_weight=float(cfg.get("global_token_loss_weight", 0.0)),
            repa=bool(cfg.get("repa", False)),
            degradation_power=float(ycfg.get("degradation_power", 1.5)),
            raw_json=dict(cfg), raw_yaml=ycfg,
        )


@dataclass(frozen=True)
class PriorConfig:
    """The class-conditional GPT prior (config.json ModelArgs; gpt_model name from config.yaml)."""

    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    multiple_of: int
    ffn_dim_multiplier: Optional[float]
    rope_base: float
    norm_eps: float
    num_classes: int
    vocab_size: int
    cls_token_num: int
    block_size: int
    group_size: int
    causal_num: int  # resolved: config null -> group_size
    class_dropout_prob: float
    gpt_model: str
    raw_json: dict = field(default_factory=dict, compare=False, repr=False)
    raw_yaml: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU hidden size: multiple_of-rounded int(2 * 4 * dim / 3) (2816 for dim 1024)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return _round_up(hidden, self.multiple_of)

    @property
    def num_special_tokens(self) -> int:
        return self.group_size - 1

    @classmethod
    def from_dicts(cls, cfg: dict, ycfg: Optional[dict] = None, where: str = "config") -> "PriorConfig":
        ycfg = dict(ycfg or {})
        _require(cfg, ["vocab_size", "block_size", "num_classes", "group_size"], where)
        if cfg.get("model_type", "c2i") != "c2i":
            raise ConfigError(f"{where}: model_type={cfg['model_type']!r} is not supported (only 'c2i')")
        name = ycfg.get("gpt_model") or ""
        sizes = _gpt_sizes(name)
        n_layer, n_head, dim = (int(cfg.get(k, s)) if cfg.get(k) is not None else s
                                for k, s in zip(("n_layer", "n_head", "dim"), sizes or (None,) * 3))
        if None in (n_layer, n_head, dim):
            raise ConfigError(f"{where}: config.json has no n_layer/n_head/dim and gpt_model "
                              f"{name!r} is not a known GPT size")
        if dim % n_head:
            raise ConfigError(f"{where}: dim={dim} is not divisible by n_head={n_head}")
        n_kv = cfg.get("n_kv_head")
        group = int(cfg["group_size"])
        causal_num = group if cfg.get("causal_num") is None else int(cfg["causal_num"])
        if group < 1 or causal_num % group:
            raise ConfigError(f"{where}: causal_num={causal_num} must be a multiple of group_size={group}")
        if int(cfg.get("cls_token_num", 1)) != 1:
            raise ConfigError(f"{where}: cls_token_num={cfg['cls_token_num']} is not supported (only 1)")
        return cls(
            dim=dim, n_layer=n_layer, n_head=n_head,
            n_kv_head=int(n_kv) if n_kv is not None else n_head,
            multiple_of=int(cfg.get("multiple_of", 256)),
            ffn_dim_multiplier=cfg.get("ffn_dim_multiplier"),
            rope_base=float(cfg.get("rope_base", 10000)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
            num_classes=int(cfg["num_classes"]),
            vocab_size=int(cfg["vocab_size"]),
            cls_token_num=1,
            block_size=int(cfg["block_size"]),
            group_size=group,
            causal_num=causal_num,
            class_dropout_prob=float(cfg.get("class_dropout_prob", 0.1)),
            gpt_model=name or f"GPT-custom-L{n_layer}-D{dim}-H{n_head}",
            raw_json=dict(cfg), raw_yaml=ycfg,
        )


def _gpt_sizes(name: str):
    if name in GPT_SIZES:
        return GPT_SIZES[name]
    m = _CUSTOM_GPT.match(name)
    if not m:
        return None
    layers, dim, heads = map(int, m.groups())  # GPT-custom-L{n_layer}-D{dim}-H{n_head}
    return layers, heads, dim  # the GPT_SIZES order: (n_layer, n_head, dim)


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def _require(cfg: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: missing keys {missing}")


def read_config_files(folder: Path) -> tuple[dict, dict]:
    """Read config.json and config.yaml of a model folder, with errors naming the path."""
    folder = Path(folder)
    out: list[Any] = []
    for name, parse in (("config.json", json.loads), ("config.yaml", yaml.safe_load)):
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"missing {name}: expected {path}")
        try:
            data = parse(path.read_text())
        except Exception as exc:  # noqa: BLE001 - re-raised with the path
            raise ConfigError(f"cannot parse {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a mapping")
        out.append(data)
    return out[0], out[1]
