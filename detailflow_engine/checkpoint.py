"""Safe loading of official DetailFlow checkpoints, and conversion to safetensors folders.

On disk (DESIGN.md section 6) a model is a folder::

    <model>/config.json          official ModelArgs.__dict__
    <model>/config.yaml          training arguments
    <model>/checkpoints/<N>.pt   {'model', 'ema'?, 'optimizer', 'steps', 'args', ...}

and a folder written by :func:`save_safetensors_folder` is::

    <out>/config.json  <out>/config.yaml   (byte-for-byte copies)
    <out>/model.safetensors                (one state dict, training-only tensors dropped)

Where things are looked up
  * ``path`` is a folder: its ``config.json``/``config.yaml``; the weights are the
    ``checkpoints/*.pt`` with the largest integer stem (``16.pt``, ``0016000.pt``) or the single
    ``*.safetensors`` in the folder or in ``checkpoints/``. A folder holding both ``.pt`` and
    ``.safetensors`` weights is ambiguous and refused (pass the file).
  * ``path`` is a ``.pt`` / ``.safetensors`` file: configs two levels up (the official layout,
    ``<model>/checkpoints/<N>.pt``), else beside the file. Errors name every place looked at.

Which weights (``ema``)
  * ``None`` (default): the prior uses ``'ema'`` when present, else ``'model'``; the tokenizer
    uses ``'model'`` (the official evaluation loads the VQ without EMA).
  * ``True``/``False``: exactly ``'ema'``/``'model'``; if absent, :class:`CheckpointError` names
    the path and the keys present. A safetensors folder holds one state dict and records which
    in its metadata (``detailflow.which``, ``'model'`` when not recorded); an explicit request
    for the other one is refused.

Safety
  ``torch.load(..., weights_only=True)`` with exactly ``argparse.Namespace`` added to the
  allowed globals (the ``args`` entry of training checkpoints). Any other global (a function
  such as ``os.system``, a custom class) is refused by torch's restricted unpickler before it is
  called, and reported with its name. Note that globals a process adds itself with
  ``torch.serialization.add_safe_globals`` are honoured by torch too.

Memory
  Zip-format ``.pt`` files are loaded with ``mmap=True``: tensors are views of the mapped file,
  so dropping training-only tensors, the optimizer state and the unused 'model'/'ema' twin never
  reads their bytes. The kept tensors stay mmap-backed (pages are read on first touch); a model's
  ``load_state_dict`` copies them (with ``assign=True`` they stay file-backed, so do not modify
  or delete the file while the model lives). Legacy (pre-zip) ``.pt`` files cannot be mapped and
  are read whole. Safetensors files are opened with ``safe_open`` and only kept keys are read
  (those tensors are ordinary in-memory tensors).

Checks (all before a model is built)
  The config's values are typed and bounded (config.py); the weights must be float32, float16,
  bfloat16 or float64 (:data:`WEIGHT_DTYPES`; training-only keys are exempt); and the sizes the config
  sets (layer counts, widths, vocab/codebook, classes, groups, tokens, patch sizes) must match
  the state dict's shapes (:func:`check_config_fits`), so an absurd config is refused in
  milliseconds. ``loading`` refuses NaN/inf weights after the copy (:func:`first_non_finite`).

Errors
  Every problem raises :class:`CheckpointError` (a ``ValueError``) naming the path and/or key.
  Config problems raise :class:`CheckpointConfigError`, which is both a ``CheckpointError`` and
  a :class:`detailflow_engine.config.ConfigError`, so either ``except`` clause catches them.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from detailflow_engine.config import (ConfigError, PriorConfig, TokenizerConfig,
                                      read_config_files)

__all__ = [
    "CheckpointError", "CheckpointConfigError", "ConfigError", "LoadedCheckpoint",
    "TOKENIZER_TRAINING_PREFIXES", "PRIOR_TRAINING_PREFIXES", "KINDS",
    "load_checkpoint", "check_state_dict", "check_weight_dtypes", "check_config_fits",
    "first_non_finite", "release_pages", "save_safetensors_folder", "find_weights", "WEIGHT_DTYPES",
]

KINDS = ("tokenizer", "prior")

# Tensors the official VQModel only needs for training (REPA alignment tower, global-token
# loss, correction-training refinement, codebook usage statistics). Matched as key prefixes.
TOKENIZER_TRAINING_PREFIXES: tuple[str, ...] = (
    "repa_model.", "global_token_proj.", "projection.", "refine_conv.",
    "encoder.refined_tokens", "quantize.codebook_used",
)
PRIOR_TRAINING_PREFIXES: tuple[str, ...] = ()

SAFETENSORS_NAME = "model.safetensors"
_META_WHICH = "detailflow.which"
_META_KIND = "detailflow.kind"
_MAX_NAMES = 5  # names reported per category in check_state_dict
# The dtypes weights may have on disk: official training writes fp32, our converter fp16/bf16,
# a float64 export casts down exactly enough; the engine casts them to the requested dtype. int8
# is made at load (never stored), so an int, bool, complex or float8 tensor would be cast
# silently into nonsense: refused.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CheckpointError(ValueError):
    """A checkpoint (or its model folder) is missing, unsafe, corrupt or does not fit the model."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """A model folder's config.json/config.yaml is missing, unreadable or describes an unknown model."""


@dataclass
class LoadedCheckpoint:
    """One state dict ready for a model's ``load_state_dict``, with its typed config.

    ``state_dict`` tensors may be mmap-backed views of ``weights_path`` (see module docstring).
    """

    kind: str                      # 'tokenizer' | 'prior'
    config: Union[TokenizerConfig, PriorConfig]
    state_dict: dict[str, torch.Tensor]
    folder: Path                   # the model folder (where config.json/config.yaml are)
    weights_path: Path             # the .pt or .safetensors file read
    which: str                     # 'model' | 'ema'
    skipped: list[str] = field(default_factory=list)  # training-only keys dropped, unread
    # True when the tensors are views of a private (copy-on-write) mapping of weights_path: the
    # pages a reader has consumed may then be handed back to the OS (release_pages) and would be
    # read again from the file if touched.
    mapped: bool = False


# --------------------------------------------------------------------------- locating files

def _step_of(path: Path) -> Optional[int]:
    return int(path.stem) if path.stem.isdigit() else None


def find_weights(folder: Path) -> Path:
    """The weights file of a model folder (see module docstring for the rules)."""
    folder = Path(folder)
    ckpt_dir = folder / "checkpoints"
    pts = sorted(p for p in ckpt_dir.glob("*.pt") if p.is_file()) if ckpt_dir.is_dir() else []
    sts = sorted(p for d in (folder, ckpt_dir) if d.is_dir()
                 for p in d.glob("*.safetensors") if p.is_file())
    if pts and sts:
        raise CheckpointError(
            f"{folder}: ambiguous weights, found both .pt ({_names(pts)}) and .safetensors "
            f"({_names(sts)}); pass the file to load")
    if sts:
        if len(sts) > 1:
            raise CheckpointError(f"{folder}: several .safetensors files ({_names(sts)}); pass the file to load")
        return sts[0]
    if pts:
        stepped = [p for p in pts if _step_of(p) is not None]
        if stepped:
            return max(stepped, key=lambda p: (_step_of(p), p.name))
        if len(pts) == 1:
            return pts[0]
        raise CheckpointError(
            f"{ckpt_dir}: several .pt files and none named by an integer step ({_names(pts)}); "
            f"pass the file to load")
    raise CheckpointError(
        f"{folder}: no weights found: expected {ckpt_dir}/<step>.pt or a single .safetensors "
        f"in {folder} or {ckpt_dir}")


def _names(paths: Sequence[Path], limit: int = _MAX_NAMES) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def _config_folder(weights: Path) -> Path:
    """Where a weights file's configs are: two levels up (official layout), else beside it."""
    candidates = [weights.parent.parent, weights.parent]
    for folder in candidates:
        if (folder / "config.json").is_file() and (folder / "config.yaml").is_file():
            return folder
    looked = " and ".join(str(c) for c in candidates)
    missing = [str(c / n) for c in candidates for n in ("config.json", "config.yaml")
               if not (c / n).is_file()]
    raise CheckpointConfigError(
        f"{weights}: no config.json + config.yaml found for this checkpoint; looked in {looked} "
        f"(missing: {', '.join(missing)})")


def _read_config(kind: str, folder: Path):
    try:
        cfg, ycfg = read_config_files(folder)
        cls = TokenizerConfig if kind == "tokenizer" else PriorConfig
        return cls.from_dicts(cfg, ycfg, where=str(folder / "config.json"),
                              yaml_where=str(folder / "config.yaml"))
    except CheckpointConfigError:
        raise
    except ConfigError as exc:
        msg = str(exc)
        if str(folder) not in msg:
            msg = f"{folder / 'config.json'}: {msg}"
        if "missing keys" in msg:
            msg += f" (is {folder} a {kind} model folder?)"
        raise CheckpointConfigError(msg) from exc
    except (TypeError, ValueError) as exc:  # a field of the wrong type, e.g. "image_size": "big"
        raise CheckpointConfigError(f"{folder / 'config.json'}: invalid {kind} config: {exc}") from exc


# --------------------------------------------------------------------------- reading weights

def _ansi_free(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _torch_load(path: Path):
    """torch.load with weights_only, argparse.Namespace as the only extra global, mmap if possible."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    if head.startswith(b"PK\x03\x04"):
        mmap = True
    elif head.startswith(b"\x80"):  # legacy (pre-1.6) torch.save format: a pickle stream
        mmap = False
    else:
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a legacy torch pickle; "
            f"starts with {head!r})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), mmap
    except pickle.UnpicklingError as exc:
        msg = _ansi_free(str(exc))
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m:
            raise CheckpointError(
                f"{path}: refused to load: the pickle needs global {m.group(1)}, which is not "
                f"allowed (only tensors, plain containers and argparse.Namespace are); "
                f"it was not executed") from None
        m = re.search(r"WeightsUnpickler error: ([^\n]*)", msg)
        detail = m.group(1) if m else msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load an unsafe or corrupt pickle: {detail}") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad records, ...: re-raised with the path
        lines = _ansi_free(str(exc)).strip().splitlines()
        first = lines[0].split(". ")[0] if lines else ""  # torch appends paragraphs of advice
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {first})") from None


def _pick(path: Path, obj, kind: str, ema: Optional[bool]) -> tuple[str, dict]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a DetailFlow checkpoint: it holds a {type(obj).__name__}, "
            f"expected a dict with a 'model' entry")
    keys = sorted(str(k) for k in obj)
    if ema is None:
        want = ["ema", "model"] if kind == "prior" else ["model"]
    else:
        want = ["ema" if ema else "model"]
    for which in want:
        if which in obj:
            break
    else:
        what = ("'ema'" if ema else "'model'") if ema is not None else " or ".join(repr(w) for w in want)
        raise CheckpointError(
            f"{path}: no {what} state dict in this checkpoint (keys present: {keys[:20]})")
    sd = obj[which]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: entry {which!r} holds a {type(sd).__name__}, expected a state dict")
    return which, sd


def _split(path: Path, which: str, names: Iterable[str], skip: tuple[str, ...]):
    kept, skipped = [], []
    for name in names:
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: {which!r} state dict has a non-string key {name!r}")
        (skipped if skip and name.startswith(skip) else kept).append(name)
    return kept, skipped


def _load_pt(path: Path, kind: str, ema: Optional[bool], skip: tuple[str, ...]):
    obj, mapped = _torch_load(path)
    which, sd = _pick(path, obj, kind, ema)
    kept, skipped = _split(path, which, sd.keys(), skip)
    state = {}
    for name in kept:
        value = sd[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: {which}[{name!r}] is a {type(value).__name__}, expected a tensor")
        state[name] = value
    del obj, sd  # drops the optimizer state, the other twin and skipped tensors, never read
    return which, state, skipped, mapped


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError("the safetensors package is needed: pip install safetensors") from exc
    return safe_open, save_file


def _load_safetensors(path: Path, kind: str, ema: Optional[bool], skip: tuple[str, ...]):
    safe_open, _ = _safetensors()
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            recorded_kind = meta.get(_META_KIND)
            if recorded_kind is not None and recorded_kind != kind:
                raise CheckpointError(f"{path} holds a {recorded_kind} state dict, not a {kind}")
            which = meta.get(_META_WHICH, "model")
            if ema is not None and which != ("ema" if ema else "model"):
                raise CheckpointError(
                    f"{path} holds only the {which!r} weights (metadata {_META_WHICH}); "
                    f"ema={ema} asks for {'ema' if ema else 'model'!r}")
            kept, skipped = _split(path, which, list(f.keys()), skip)
            state = {name: f.get_tensor(name) for name in kept}  # only kept keys are read (copies)
    except CheckpointError:
        raise
    except FileNotFoundError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError (bad header, truncated), OSError
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    return which, state, skipped, False


def load_checkpoint(path: Union[str, os.PathLike], kind: str, ema: Optional[bool] = None,
                    skip_prefixes: Optional[Sequence[str]] = None) -> LoadedCheckpoint:
    """Load one official (or converted) model's config and inference state dict.

    Args:
        path: a model folder, a ``.pt`` file or a ``.safetensors`` file (rules in the module
            docstring).
        kind: ``"tokenizer"`` or ``"prior"``; selects the config type and the defaults.
        ema: which weights of a ``.pt``: ``None`` = prior 'ema' if present else 'model',
            tokenizer 'model'; ``True``/``False`` = exactly 'ema'/'model'.
        skip_prefixes: key prefixes to drop without reading; ``None`` = the training-only
            tensors of ``kind`` (:data:`TOKENIZER_TRAINING_PREFIXES` / :data:`PRIOR_TRAINING_PREFIXES`).

    Returns:
        :class:`LoadedCheckpoint`. Raises :class:`CheckpointError` (config problems:
        :class:`CheckpointConfigError`) naming the path and/or key.
    """
    if kind not in KINDS:
        raise CheckpointError(f"kind must be 'tokenizer' or 'prior', got {kind!r}")
    if ema is not None and not isinstance(ema, bool):
        raise CheckpointError(f"ema must be None, True or False, got {ema!r}")
    if skip_prefixes is None:
        skip = TOKENIZER_TRAINING_PREFIXES if kind == "tokenizer" else PRIOR_TRAINING_PREFIXES
    elif isinstance(skip_prefixes, str):
        raise CheckpointError(f"skip_prefixes must be a sequence of strings, got the string {skip_prefixes!r}")
    else:
        skip = tuple(skip_prefixes)
    path = Path(path)
    if path.is_dir():
        folder = path
        config = _read_config(kind, folder)  # config errors first: they name the expected files
        weights = find_weights(folder)
    elif path.is_file():
        if path.suffix not in (".pt", ".pth", ".bin", ".safetensors"):
            raise CheckpointError(f"{path}: unknown checkpoint file type {path.suffix!r} "
                                  f"(expected .pt or .safetensors, or a model folder)")
        weights = path
        folder = _config_folder(weights)
        config = _read_config(kind, folder)
    else:
        raise CheckpointError(f"checkpoint not found: {path} (expected a model folder, a .pt or a .safetensors file)")

    loader = _load_safetensors if weights.suffix == ".safetensors" else _load_pt
    which, state, skipped, mapped = loader(weights, kind, ema, skip)
    if not state:
        raise CheckpointError(f"{weights}: the {which!r} state dict is empty"
                              + (f" after skipping {len(skipped)} training-only keys" if skipped else ""))
    training = TOKENIZER_TRAINING_PREFIXES if kind == "tokenizer" else PRIOR_TRAINING_PREFIXES
    check_weight_dtypes({k: v for k, v in state.items() if not (training and k.startswith(training))},
                        where=f"{weights}: {which!r} weights")
    check_config_fits(config, state, config_path=folder / "config.json", weights_path=weights, skipped=skip)
    return LoadedCheckpoint(kind=kind, config=config, state_dict=state, folder=folder,
                            weights_path=weights, which=which, skipped=skipped, mapped=mapped)


# --------------------------------------------------------------------------- checking

def _shape(value) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(int(d) for d in value)


def check_state_dict(expected: Mapping[str, Union[torch.Size, Sequence[int], torch.Tensor]],
                     state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Compare a state dict with a model's expected ``{key: shape}`` before ``load_state_dict``.

    ``expected`` values may be shapes or tensors (e.g. ``model.state_dict()`` of a meta-device
    model). Raises :class:`CheckpointError` starting with ``where`` and listing up to five names
    per category: missing keys, unexpected keys, shape mismatches (key, expected, found).
    """
    exp = {k: _shape(v) for k, v in expected.items()}
    got = {k: _shape(v) for k, v in state_dict.items()}
    missing = [k for k in exp if k not in got]
    unexpected = [k for k in got if k not in exp]
    mismatched = [k for k in exp if k in got and exp[k] != got[k]]
    if not (missing or unexpected or mismatched):
        return

    def listing(names, fmt=str):
        shown = "; ".join(fmt(n) for n in names[:_MAX_NAMES])
        more = f"; ... and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else ""
        return f"{shown}{more}"

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): " + listing(
            mismatched, lambda k: f"{k} expected {exp[k]} found {got[k]}"))
    raise CheckpointError(f"{where}: state dict does not match the model: " + " | ".join(parts))


def check_weight_dtypes(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse tensors that are not float32/float16/bfloat16/float64 (:data:`WEIGHT_DTYPES`), naming the first."""
    bad = [k for k, t in state_dict.items() if t.dtype not in WEIGHT_DTYPES]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{where}: {bad[0]} has dtype {state_dict[bad[0]].dtype}{more}; weights must be float32, "
            f"float16 or bfloat16 (int8 weights are made at load, never stored)")


def release_pages(t: torch.Tensor) -> None:
    """Hand the pages under `t` back to the OS: ONLY for a tensor of a private file mapping
    (``LoadedCheckpoint.mapped``), whose pages are then re-read from the file if touched again.
    A loader that copies a mapped checkpoint tensor by tensor calls this after each copy, so the
    file's pages never add up in the process's resident memory (a container's limit counts them).
    On anonymous memory this would zero the data: never call it there. Best effort: a platform
    without madvise keeps the pages."""
    n = t.numel() * t.element_size()
    start = -(-t.data_ptr() // _PAGE) * _PAGE  # whole pages inside the tensor only
    stop = (t.data_ptr() + n) // _PAGE * _PAGE
    if stop > start and _madvise is not None:
        _madvise(start, stop - start, _MADV_DONTNEED)


def _libc_madvise():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4  # Linux
_madvise = _libc_madvise()


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> Optional[tuple[str, str, int]]:
    """(first key holding NaN/inf in mapping order, 'NaN' | 'inf', number of bad tensors), or None.

    One ``torch.aminmax`` pass per float tensor: NaN propagates into both, +-inf shows as one of
    them; the flags are gathered on the tensors' device and read once. Measured on this 2-core
    machine (shared, so it varies): the DetailFlow-16 prior's 1.3 GB of fp32 weights in 0.05-0.2 s,
    the tokenizer's 1.1 GB in 0.04-0.06 s, bf16 about the same; ``torch.isfinite(t).all()``
    took 0.6-3.8 s for the same tensors (it writes a bool per element first).
    """
    names, lows, highs = [], [], []
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t.detach())
            names.append(name)
            lows.append(lo.float())
            highs.append(hi.float())
    if not names:
        return None
    lows, highs = torch.stack(lows), torch.stack(highs)
    bad = ~(torch.isfinite(lows) & torch.isfinite(highs))
    count = int(bad.sum())
    if not count:
        return None
    i = int(bad.nonzero()[0, 0])
    return names[i], "NaN" if math.isnan(float(lows[i])) else "inf", count


# Keys that carry each size a config sets, compared before any module is built so that an
# absurd config costs milliseconds, not a build or an allocation: key -> (shape, the config
# fields behind it). check_state_dict still compares every key with the built meta model.
def _prior_size_keys(c: PriorConfig) -> dict:
    d = c.dim
    return {
        "tok_embeddings.weight": ((c.vocab_size, d), f"vocab_size={c.vocab_size}, dim={d}"),
        "output.weight": ((c.vocab_size, d), f"vocab_size={c.vocab_size}, dim={d}"),
        "cls_embedding.embedding_table.weight": (
            (c.num_classes + int(c.class_dropout_prob > 0), d),
            f"num_classes={c.num_classes} (+1 null class when class_dropout_prob > 0), dim={d}"),
        "spe_tok_embeddings.special_embeddings.weight": (
            (c.group_size - 1, d), f"group_size={c.group_size} (group_size - 1 rows), dim={d}"),
        "layers.0.attention.wqkv.weight": (
            ((c.n_head + 2 * c.n_kv_head) * c.head_dim, d), f"dim={d}, n_head={c.n_head}, n_kv_head={c.n_kv_head}"),
        "layers.0.feed_forward.w1.weight": (
            (c.ffn_hidden, d), f"dim={d}, multiple_of={c.multiple_of}, ffn_dim_multiplier={c.ffn_dim_multiplier}"),
    }


def _tokenizer_size_keys(c: TokenizerConfig) -> dict:
    e, d, n = c.encoder, c.decoder, c.num_latent_tokens
    enc, dec = f"encoder_model={e.name!r}", f"decoder_model={d.name!r}"
    return {
        "encoder.latent_tokens": ((1, n, e.hidden_size), f"num_latent_tokens={n}, {enc}"),
        "decoder.latent_pos_embed": ((1, n, d.hidden_size), f"num_latent_tokens={n}, {dec}"),
        "encoder.visual_model.embeddings.patch_embedding.weight": (
            (e.hidden_size, 3 * e.patch_size ** 2), f"{enc}, enc_patch_size={e.patch_size}"),
        "decoder.to_pixel.model.weight": (
            (3 * d.patch_size ** 2, d.hidden_size), f"dec_patch_size={d.patch_size}, {dec}"),
        "encoder.visual_model.encoder.layers.0.mlp.fc1.weight": ((e.intermediate_size, e.hidden_size), enc),
        "decoder.visual_model.encoder.layers.0.mlp.fc1.weight": ((d.intermediate_size, d.hidden_size), dec),
        "quantize.embedding.weight": (
            (c.codebook_size, c.codebook_embed_dim),
            f"codebook_size={c.codebook_size}, codebook_embed_dim={c.codebook_embed_dim}"),
    }


def _layer_counts(config) -> dict:
    """Layer-list prefix -> (layers the config asks for, the config field)."""
    if isinstance(config, PriorConfig):
        return {"layers.": (config.n_layer, f"n_layer={config.n_layer}")}
    e, d = config.encoder, config.decoder
    return {"encoder.visual_model.encoder.layers.": (e.num_layers, f"encoder_model={e.name!r}"),
            "decoder.visual_model.encoder.layers.": (d.num_layers, f"decoder_model={d.name!r}")}


def _layer_indices(names: Iterable[str], prefix: str) -> list[int]:
    found = set()
    for name in names:
        if name.startswith(prefix):
            index = name[len(prefix):].split(".", 1)[0]
            if index.isascii() and index.isdigit() and len(index) <= 9:
                found.add(int(index))
    return sorted(found)


def _describe_layers(indices: list[int]) -> str:
    if indices == list(range(len(indices))):
        return f"{len(indices)} layers" + (f" (0..{len(indices) - 1})" if indices else "")
    shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
    return f"{len(indices)} layers numbered {shown}"


def check_config_fits(config: Union[TokenizerConfig, PriorConfig], state_dict: Mapping[str, torch.Tensor],
                      config_path: Union[str, os.PathLike], weights_path: Union[str, os.PathLike],
                      skipped: tuple[str, ...] = ()) -> None:
    """Compare the sizes a config sets with the state dict's shapes, before anything is built.

    Checks the layer counts (``layers.N.`` indices must be exactly 0..n-1) and one key per size
    (widths, vocab/codebook, classes, groups, tokens, patch sizes); raises
    :class:`CheckpointConfigError` naming the config file, its fields and the key. Keys under
    the ``skipped`` prefixes (left unread on purpose, e.g. a decode-only tokenizer's encoder) are
    not asked for.
    """
    sizes = _prior_size_keys(config) if isinstance(config, PriorConfig) else _tokenizer_size_keys(config)
    for prefix, (count, field_) in _layer_counts(config).items():
        if skipped and prefix.startswith(skipped):
            continue
        indices = _layer_indices(state_dict, prefix)
        if indices != list(range(count)):
            raise CheckpointConfigError(
                f"{config_path}: {field_} does not match the weights in {weights_path}: they hold "
                f"{_describe_layers(indices)} under {prefix!r}, the config asks for {count}")
    for key, (shape, fields) in sizes.items():
        if skipped and key.startswith(skipped):
            continue
        if key not in state_dict:
            raise CheckpointConfigError(
                f"{config_path}: the weights in {weights_path} have no {key} (expected {shape} from "
                f"{fields}; is this a {'prior' if isinstance(config, PriorConfig) else 'tokenizer'} checkpoint?)")
        found = tuple(state_dict[key].shape)
        if found != shape:
            raise CheckpointConfigError(
                f"{config_path}: {fields} do not match the weights in {weights_path}: {key} is "
                f"{found}, the config gives {shape}")


# --------------------------------------------------------------------------- writing

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_place(tmp: Path, dst: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)  # fails if dst exists: no window in which data could be lost
    except FileExistsError:
        raise CheckpointError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)") from None
    except OSError:  # file system without hard links
        if dst.exists():
            raise CheckpointError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)") from None
        os.replace(tmp, dst)
        return
    os.unlink(tmp)


def save_safetensors_folder(loaded: LoadedCheckpoint, out_dir: Union[str, os.PathLike],
                            overwrite: bool = False, dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``out_dir/{config.json, config.yaml, model.safetensors}`` and return ``out_dir``.

    The configs are byte-for-byte copies of ``loaded.folder``'s; the safetensors file holds
    ``loaded.state_dict`` (contiguous) with metadata ``detailflow.kind``/``detailflow.which``.
    Existing files are refused unless ``overwrite``. Each file is written to a temporary name in
    ``out_dir`` and renamed into place, so a crash never leaves a half-written file under the
    final name.
    """
    _, save_file = _safetensors()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a folder")
    targets = {"config.json": loaded.folder / "config.json",
               "config.yaml": loaded.folder / "config.yaml",
               SAFETENSORS_NAME: None}
    if not overwrite:
        existing = [str(out / n) for n in targets if (out / n).exists()]
        if existing:
            raise CheckpointError(
                f"refusing to overwrite existing {', '.join(existing)} (pass overwrite=True / --overwrite)")
    for name, src in targets.items():
        if src is not None and not src.is_file():
            raise CheckpointConfigError(f"missing {name}: expected {src}")
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, t in loaded.state_dict.items():
        t = t.detach().to("cpu").contiguous()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storages and t.numel():  # safetensors refuses shared storage: copy
            t = t.clone()
        seen_storages.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    meta = {"format": "pt", _META_KIND: loaded.kind, _META_WHICH: loaded.which,
            "detailflow.source": loaded.weights_path.name}

    temps: list[Path] = []
    try:
        staged: list[tuple[Path, Path]] = []
        for name, src in targets.items():
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
            os.close(fd)
            tmp = Path(tmp_name)
            temps.append(tmp)
            if src is not None:
                shutil.copyfile(src, tmp)
            else:
                save_file(tensors, str(tmp), metadata=meta)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and save_file) make 0600 files: give open()'s usual mode
            staged.append((tmp, out / name))
        for tmp, dst in staged:
            _atomic_place(tmp, dst, overwrite)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' own error on a full disk
        raise CheckpointError(f"cannot write {out}: {type(exc).__name__}: {exc}") from exc
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()
    return out
