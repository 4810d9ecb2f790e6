"""Typed configs read from an official DetailFlow model folder.

A model folder holds ``config.json`` (the official ``ModelArgs.__dict__``) and
``config.yaml`` (the training arguments). We keep the raw dicts so a folder we
write reads back byte-for-byte the same way in the official loaders, and derive
typed, validated sizes from them. Sizes come from config.json (the official
loader re-derives the GPT sizes from the yaml name; config.json is the truth).

Every field we read is typed and bounded (``_Fields``, the ``MAX_*`` bounds): a bad value raises
:class:`ConfigError` naming the file, the field and what was expected, before anything is built.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml


class ConfigError(ValueError):
    """A model config is missing, unreadable, holds an invalid value or describes an unknown model."""


# SigLIP2-so400m-patch16 sizes: the towers of the released models are prefixes of it.
_SO400M = dict(hidden_size=1152, num_heads=16, intermediate_size=4304, max_layers=27)
# At most 9 digits per size: a longer number is no tower/GPT size (and int() of thousands of
# digits is slow or refused); such a name is reported as unknown.
_CUSTOM_TOWER = re.compile(r"^siglip2_custom_L(\d{1,9})_D(\d{1,9})_H(\d{1,9})$")
_CUSTOM_GPT = re.compile(r"^GPT-custom-L(\d{1,9})-D(\d{1,9})-H(\d{1,9})$")

# Upper bounds of the sizes a config may set: ample headroom over the released models (GPT-L:
# 24 layers, dim 1024, 128 tokens, vocab 8192; SigLIP2 towers: <= 27 layers, width 1152; 256 px
# at patch 16 = a 16x16 grid) and small enough that an absurd config is refused here, before
# anything is built or allocated (block_size 1e9 used to fill a 3 GB rotary table, n_layer 1e5
# to build for 84 s, max_image_size 1e5 to decode a 6250x6250 patch grid). Sizes that shape a
# weight are also checked against the state dict before building (checkpoint.check_config_fits).
MAX_LAYERS = 1024          # prior n_layer, tower layers
MAX_WIDTH = 65536          # prior dim, tower width, codebook_embed_dim
MAX_TOKENS = 4096          # block_size, num_latent_tokens: 32x the release's 128
MAX_VOCAB = 2 ** 20        # vocab_size, codebook_size, num_classes
MAX_IMAGE_SIZE = 4096      # image_size, max_image_size, min_image_size (pixels per side)
MAX_PATCH_SIZE = 64        # enc/dec_patch_size
MAX_PATCH_GRID = 64        # patches per side at image_size / max_image_size: 4x the release's 16
MAX_FFN_MULTIPLIER = 64.0  # ffn_dim_multiplier
MAX_DEGRADATION_POWER = 16.0  # the schedule's (T-1) ** power stays a finite float

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
        for what, value, hi in (("layers", layers, MAX_LAYERS), ("width", width, MAX_WIDTH),
                                ("heads", heads, max(width, 1))):
            if not 1 <= value <= hi:
                raise ConfigError(f"tower {name!r}: {what} must be in 1..{hi}, got {value}")
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
class _ReadFrom:
    """The config.json and config.yaml mappings a config was validated from (written back as
    they were by checkpoint saves; not compared, not shown)."""

    raw_json: dict = field(default_factory=dict, compare=False, repr=False, kw_only=True)
    raw_yaml: dict = field(default_factory=dict, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class TokenizerConfig(_ReadFrom):
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
    def from_dicts(cls, cfg: dict, ycfg: Optional[dict] = None, where: str = "config.json",
                   yaml_where: Optional[str] = None) -> "TokenizerConfig":
        """Validated config from config.json's and config.yaml's mappings.

        ``where`` / ``yaml_where`` name the two files in errors (``yaml_where`` defaults to
        ``where`` with config.json replaced by config.yaml). Every invalid value raises
        :class:`ConfigError` naming the file, the field and what was expected.
        """
        ycfg = dict(ycfg or {})
        js, ys = _Fields(cfg, where), _Fields(ycfg, yaml_where or _yaml_where(where))
        need = ["image_size", "codebook_size", "codebook_embed_dim", "num_latent_tokens",
                "encoder_model", "decoder_model", "enc_patch_size", "dec_patch_size", "group_size"]
        _require(cfg, need, where)
        for key in ("enc_type", "dec_type"):
            if js.get_str(key, "siglip2") != "siglip2":
                raise ConfigError(f"{where}: {key}={cfg[key]!r} is not supported (only 'siglip2')")
        if ys.get_str("content_degradation", "resolution_power") != "resolution_power":
            raise ConfigError(f"{ys.where}: content_degradation={ycfg['content_degradation']!r} is not supported")
        tokens = js.get_int("num_latent_tokens", 1, MAX_TOKENS)
        group, causal_num = _groups(js, "num_latent_tokens", tokens)
        enc_patch = js.get_int("enc_patch_size", 1, MAX_PATCH_SIZE)
        dec_patch = js.get_int("dec_patch_size", 1, MAX_PATCH_SIZE)
        if enc_patch > dec_patch:  # the schedule rounds encoder sizes up to the decoder's patch
            raise ConfigError(f"{where}: enc_patch_size={enc_patch} must be <= dec_patch_size={dec_patch}")
        image_size = js.get_int("image_size", 1, MAX_IMAGE_SIZE)
        max_image_size, max_where = _max_image_size(js, ys, image_size)
        ys.get_int("min_image_size", 1, MAX_IMAGE_SIZE, nullable=True)  # training only: checked, unused
        _check_patch_grid(js.where, "image_size", image_size, enc_patch)
        _check_patch_grid(max_where, "max_image_size", max_image_size, enc_patch)  # enc_patch <= dec_patch
        return cls(
            image_size=image_size,
            max_image_size=max_image_size,
            codebook_size=js.get_int("codebook_size", 1, MAX_VOCAB),
            codebook_embed_dim=js.get_int("codebook_embed_dim", 1, MAX_WIDTH),
            codebook_l2_norm=js.get_bool("codebook_l2_norm", True),
            num_latent_tokens=tokens,
            encoder=_tower(js, "encoder_model", js.get_bool("enc_pretrained", True), enc_patch),
            decoder=_tower(js, "decoder_model", js.get_bool("dec_pretrained", False), dec_patch),
            causal_encoder=js.get_bool("causal_encoder", False),
            causal_decoder=js.get_bool("causal_decoder", True),
            group_size=group,
            causal_num=causal_num,
            correction_training=js.get_bool("correction_training", True),
            global_token_loss_weight=js.get_number("global_token_loss_weight", 0.0, math.inf, default=0.0),
            repa=js.get_bool("repa", False),
            degradation_power=ys.get_number("degradation_power", 0.0, MAX_DEGRADATION_POWER,
                                            default=1.5, lo_open=True),
            raw_json=dict(cfg), raw_yaml=ycfg,
        )


@dataclass(frozen=True)
class PriorConfig(_ReadFrom):
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

    def generation_plan(self, num_tokens: Optional[int] = None) -> list:
        """This prior's steps (schedule.generation_plan), optionally stopped at ``num_tokens``."""
        from .schedule import generation_plan  # schedule refers back to config's types

        return generation_plan(self.block_size, self.group_size, self.causal_num, num_tokens)

    @classmethod
    def from_dicts(cls, cfg: dict, ycfg: Optional[dict] = None, where: str = "config.json",
                   yaml_where: Optional[str] = None) -> "PriorConfig":
        """Validated config from config.json's and config.yaml's mappings (errors as for
        :meth:`TokenizerConfig.from_dicts`)."""
        ycfg = dict(ycfg or {})
        js, ys = _Fields(cfg, where), _Fields(ycfg, yaml_where or _yaml_where(where))
        _require(cfg, ["vocab_size", "block_size", "num_classes", "group_size"], where)
        if js.get_str("model_type", "c2i") != "c2i":
            raise ConfigError(f"{where}: model_type={cfg['model_type']!r} is not supported (only 'c2i')")
        name = ys.get_str("gpt_model", "", nullable=True)
        n_layer, n_head, dim = _gpt_shape(js, ys, name)
        if dim % n_head:
            raise ConfigError(f"{where}: dim={dim} is not divisible by n_head={n_head}")
        if (dim // n_head) % 4:  # the 2D rotary turns head_dim/4 pairs by row and head_dim/4 by column
            raise ConfigError(f"{where}: head size dim/n_head = {dim}/{n_head} = {dim // n_head} "
                              f"must be a multiple of 4 (2D rotary)")
        n_kv = js.get_int("n_kv_head", 1, n_head, default=n_head, nullable=True, hi_is="n_head")
        if n_head % n_kv:
            raise ConfigError(f"{where}: n_head={n_head} must be a multiple of n_kv_head={n_kv}")
        block = js.get_int("block_size", 1, MAX_TOKENS)
        group, causal_num = _groups(js, "block_size", block)
        if js.get_int("cls_token_num", 1, MAX_TOKENS, default=1) != 1:
            raise ConfigError(f"{where}: cls_token_num={cfg['cls_token_num']} is not supported (only 1)")
        return cls(
            dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv,
            multiple_of=js.get_int("multiple_of", 1, MAX_WIDTH, default=256),
            ffn_dim_multiplier=js.get_number("ffn_dim_multiplier", 0.0, MAX_FFN_MULTIPLIER,
                                             nullable=True, lo_open=True),
            rope_base=js.get_number("rope_base", 0.0, math.inf, default=10000.0, lo_open=True),
            norm_eps=js.get_number("norm_eps", 0.0, 1.0, default=1e-5, lo_open=True),
            num_classes=js.get_int("num_classes", 1, MAX_VOCAB),
            vocab_size=js.get_int("vocab_size", 1, MAX_VOCAB),
            cls_token_num=1,
            block_size=block,
            group_size=group,
            causal_num=causal_num,
            class_dropout_prob=js.get_number("class_dropout_prob", 0.0, 1.0, default=0.1),
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


_UNSET = object()


class _Fields:
    """Typed reads of one config file's mapping; every error names the file and the field.

    Ints must be ints: JSON ``64``, not ``64.0``, ``64.9``, ``"64"`` or ``true``. The official
    writers dump int fields as ints, so anything else was edited by hand or by another tool,
    and rounding it would be a guess. Numbers must be finite (``json.loads`` accepts ``NaN``
    and ``Infinity``, YAML ``.nan`` and ``.inf``); ints are accepted where a float is expected.
    Flags must be ``true``/``false`` (a string ``"false"`` would be truthy).
    """

    def __init__(self, data: Mapping, where: str):
        self.data, self.where = data, where

    def error(self, key: str, expected: str, value) -> ConfigError:
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else f"an int of {len(str(abs(value)))} digits"
        return ConfigError(f"{self.where}: {key} must be {expected}, got {shown[:80]}")

    def given(self, key: str, nullable: bool = False) -> bool:
        """Whether the file sets ``key`` (``null`` counts as unset where null means the default)."""
        return key in self.data and not (nullable and self.data[key] is None)

    def get_int(self, key: str, lo: int, hi: int, default: Any = None, nullable: bool = False,
                hi_is: str = ""):
        """An int in lo..hi; ``hi_is`` names the field that sets ``hi`` (for the message)."""
        if not self.given(key, nullable):
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
            raise self.error(key, f"an int in {lo}..{hi}" + (f" ({hi_is})" if hi_is else ""), value)
        return int(value)

    def get_number(self, key: str, lo: float, hi: float, default: Any = None, nullable: bool = False,
                   lo_open: bool = False):
        if not self.given(key, nullable):
            return default
        value = self.data[key]
        number = _finite_float(value)
        above = number is not None and (number > lo if lo_open else number >= lo)
        if not (above and number <= hi):
            low = f"> {lo:g}" if lo_open else f">= {lo:g}"
            raise self.error(key, f"a finite number {low}" + (f" and <= {hi:g}" if hi != math.inf else ""), value)
        return number

    def get_bool(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, "true or false", value)
        return value

    def get_str(self, key: str, default: Any = None, nullable: bool = False):
        if not self.given(key, nullable):
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, "a string", value)
        return value


def _finite_float(value) -> Optional[float]:
    """``value`` as a finite float, or None (not a number, a bool, NaN, +-inf, an int too big)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _yaml_where(where: str) -> str:
    """The config.yaml beside the config.json that ``where`` names (or inside the folder it names)."""
    if where.endswith("config.json"):
        return where[: -len("config.json")] + "config.yaml"
    return f"{where}/config.yaml"


def _gpt_shape(js: _Fields, ys: _Fields, name: str) -> tuple[int, int, int]:
    """(n_layer, n_head, dim): config.json's values, else those of the gpt_model name in config.yaml."""
    sizes = _gpt_sizes(name)
    from_name = _Fields(dict(zip(("n_layer", "n_head", "dim"), sizes or ())), f"{ys.where}: gpt_model {name!r}")
    out = []
    for key, hi in (("n_layer", MAX_LAYERS), ("n_head", MAX_WIDTH), ("dim", MAX_WIDTH)):
        fields = js if js.given(key, nullable=True) else from_name
        if not fields.given(key):
            raise ConfigError(f"{js.where}: config.json has no n_layer/n_head/dim and gpt_model "
                              f"{name!r} is not a known GPT size")
        out.append(fields.get_int(key, 1, hi))
    return out[0], out[1], out[2]


def _groups(js: _Fields, tokens_key: str, tokens: int) -> tuple[int, int]:
    """(group_size, causal_num; null -> group_size) of `tokens` tokens: the causal prefix and the
    groups must tile the tokens (the generation plan and the schedule need it)."""
    group = js.get_int("group_size", 1, tokens, hi_is=tokens_key)
    causal_num = js.get_int("causal_num", 1, tokens, default=group, nullable=True, hi_is=tokens_key)
    if causal_num % group:
        raise ConfigError(f"{js.where}: causal_num={causal_num} must be a multiple of group_size={group}")
    if tokens % group:
        raise ConfigError(f"{js.where}: {tokens_key}={tokens} must be a multiple of group_size={group}")
    return group, causal_num


def _max_image_size(js: _Fields, ys: _Fields, image_size: int) -> tuple[int, str]:
    """The schedule's S: config.yaml's max_image_size, else config.json's, else image_size; and its file."""
    for fields in (ys, js):
        if fields.given("max_image_size", nullable=True):
            return fields.get_int("max_image_size", 1, MAX_IMAGE_SIZE), fields.where
    return image_size, js.where


def _check_patch_grid(where: str, key: str, size: int, patch: int) -> None:
    """Images of ``size`` pixels are ceil(size/patch)^2 tokens in the towers (decoder attention is over all)."""
    side = -(-size // patch)
    if side > MAX_PATCH_GRID:
        raise ConfigError(f"{where}: {key}={size} at patch size {patch} is a {side}x{side} patch grid; "
                          f"at most {MAX_PATCH_GRID}x{MAX_PATCH_GRID} is supported")


def _tower(js: _Fields, key: str, pretrained: bool, patch_size: int) -> TowerConfig:
    name = js.get_str(key)
    try:
        return resolve_tower(name, pretrained, patch_size)
    except ConfigError as exc:
        raise ConfigError(f"{js.where}: {key}: {exc}") from None


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
