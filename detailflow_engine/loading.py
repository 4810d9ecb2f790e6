"""checkpoint -> config -> model: build an inference model and load its weights safely.

Models are built on the meta device (no random init of hundreds of MB), given real
storage on the target device in the target dtype, and filled tensor by tensor from a strict,
shape-checked state dict, so the result never aliases the checkpoint file and no fp32 copy of
the model exists beside it (peak memory: benchmarks/bench_memory.py). Before that,
``load_checkpoint`` has bounded every config value and compared the config's sizes with the
state dict's shapes, so an absurd config is refused before anything is built; NaN/inf weights
are refused by name as they are copied.
"""
from __future__ import annotations

import ctypes
import functools
import math
import re
from typing import Callable, Optional

import torch

from detailflow_engine.checkpoint import (TOKENIZER_TRAINING_PREFIXES, CheckpointError, check_state_dict,
                                          load_checkpoint, release_pages)
from detailflow_engine.device_dtype import DTYPES, resolve_device, resolve_dtype  # noqa: F401 - re-exported
from detailflow_engine.linear import WEIGHT_MODES, DecodeLinear, packs_natively
from detailflow_engine.prior import Prior
from detailflow_engine.tokenizer import ENCODER_PREFIXES, Tokenizer

def resolve_weights(weights: Optional[str]) -> str:
    """'native' (None too), 'int8', 'int4', 'w8a8' or 'w4a8'; anything else is a ValueError naming the allowed values."""
    if weights is None:
        return "native"
    if not isinstance(weights, str) or weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {list(WEIGHT_MODES)}, got {weights!r}")
    return weights


# The prior's linears that weights="int8" quantizes: every Linear of the transformer blocks.
_INT8_LINEARS = re.compile(r"layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3))")


def _build(model, state: dict, device: torch.device, dtype: torch.dtype, where: str, *,
           mapped: bool = False,
           decode_mode: Callable[[str], Optional[str]] = lambda name: None) -> torch.nn.Module:
    """A meta-device model -> the inference model on `device` in `dtype`, filled from `state`.

    The model gets storage in `dtype` directly and is filled tensor by tensor, so no full-size
    fp32 copy ever exists beside it; with a `mapped` checkpoint each source tensor's file pages
    are handed back after its copy, so the checkpoint's pages never add up in resident memory.
    Bias-free linears for which `decode_mode(name)` gives a weights mode are never allocated as
    nn.Linear: each becomes a DecodeLinear of that mode made from its source values right there
    ("native": packed in `dtype`; "int8"/"int4"/"w8a8"/"w4a8": quantized in fp32 math), holding only the packed
    layout. Non-finite source values are refused by key, before anything is cast.
    """
    check_state_dict(model.state_dict(), state, where=where)
    swapped = {}  # weight key -> (parent module, child name, mode)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            qual = f"{name}.{child_name}" if name else child_name
            mode = decode_mode(qual) if isinstance(child, torch.nn.Linear) and child.bias is None else None
            if mode is not None:
                swapped[qual + ".weight"] = (module, child_name, mode)
                setattr(module, child_name, torch.nn.Identity())  # out of the tree until it is filled
    model = model.to(dtype=dtype).to_empty(device=device)  # meta cast: free; storage in dtype only
    targets = model.state_dict(keep_vars=True)
    bad = []  # (key, 'NaN' | 'inf') in checkpoint order
    with torch.no_grad():
        for name, src in state.items():
            what = _non_finite(src)
            if what or bad:  # once one is bad, only look for the rest (the error counts them)
                bad += [(name, what)] if what else []
            elif name in swapped:
                module, child_name, mode = swapped[name]
                linear = torch.nn.Linear(src.shape[1], src.shape[0], bias=False, device="meta")
                value = src.to(device=device, dtype=dtype if mode == "native" else None)
                linear.weight = torch.nn.Parameter(value, requires_grad=False)
                setattr(module, child_name, DecodeLinear(linear, weights=mode))
                del linear, value  # the packed layout is all that stays
                _trim_heap()
            else:
                targets[name].copy_(src)
            if mapped:
                release_pages(src)
    if bad:
        raise CheckpointError(f"{where}: {bad[0][0]} holds {bad[0][1]} values"
                              + (f" ({len(bad)} tensors do)" if len(bad) > 1 else "")
                              + "; the checkpoint is corrupt or its training diverged")
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim). Each swapped linear frees
    its dtype copy and the packing scratch; glibc keeps such mid-size blocks in its heap after
    its mmap threshold has grown, and they would add up to ~0.5 GB of resident garbage over a
    GPT-L load (measured with /proc/self/status RssAnon)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _non_finite(t: torch.Tensor) -> Optional[str]:
    """'NaN' or 'inf' when the float tensor `t` holds one (one aminmax pass), else None."""
    if not (t.is_floating_point() and t.numel()):
        return None
    lo, hi = (float(v) for v in torch.aminmax(t))
    if math.isfinite(lo) and math.isfinite(hi):
        return None
    return "NaN" if math.isnan(lo) or math.isnan(hi) else "inf"


def _where(loaded) -> str:
    return f"{loaded.weights_path}: {loaded.which!r} weights"


def prepare_prior(prior: Prior, dtype=None, weights: Optional[str] = "native") -> Prior:
    """A prior holding checkpoint values (e.g. built by hand, fp32) -> a NEW inference prior in
    `dtype` on its device, made exactly as `load_prior` makes one (see `_inference_prior`)."""
    dtype, mode = resolve_dtype(dtype), resolve_weights(weights)
    state = prior.state_dict()
    with torch.device("meta"):
        fresh = Prior(prior.config)
    return _inference_prior(fresh, state, prior.device, dtype, mode, "prior")


def _inference_prior(meta_prior: Prior, state: dict, device, dtype, mode: str, where: str,
                     mapped: bool = False) -> Prior:
    """The one place the prior's linears become decode GEMMs (linear.py), whatever the mode:

    - weights="int8" (or "int4", group-wise, or "w8a8" / "w4a8", int8 activations too; the same linears):
      every Linear of the transformer blocks (wqkv, wo, w1, w2, w3) is quantized from the
      checkpoint's values (fp32 math), never cast first. Not quantized: the embeddings
      (a gather reads few rows; no bandwidth to save) and the output head (8192 x dim, under 3% of
      GPT-L's block weights but it writes the logits that sampling ranks directly).
    - every float Linear left (all of them for "native", the output head otherwise) is packed
      in `dtype` where a compiled decode_gemm serves its device (`packs_natively`; state-dict
      names and values unchanged), else stays an nn.Linear.

    Each DecodeLinear is made from its checkpoint tensor as it is read and holds only the
    packed layout, so the prior's weights exist once (benchmarks/bench_memory.py).
    """
    native = "native" if packs_natively(torch.device(device), dtype) else None

    def decode_mode(name: str) -> Optional[str]:
        return mode if mode != "native" and _INT8_LINEARS.fullmatch(name) else native

    return _build(meta_prior, state, device, dtype, where, mapped=mapped, decode_mode=decode_mode)


def load_prior(path, ema: Optional[bool] = True, device=None, dtype=None, weights: Optional[str] = "native") -> Prior:
    """Load the GPT prior from a model folder, a .pt or a .safetensors file.

    ``ema=True`` (default) uses the EMA weights when the checkpoint has them, else 'model';
    ``ema=False`` forces 'model'.

    ``dtype`` (fp32 default | bf16, the spellings of ``device_dtype``) is the compute and storage dtype of activations,
    KV cache and the float weights. ``weights`` = "native" keeps the weights in ``dtype``;
    "int8" quantizes every Linear of the transformer blocks to int8 with per-output-channel
    fp32 scales at load (weight-only: activations stay in ``dtype``, products accumulate in
    fp32; the embeddings and the output head stay in ``dtype``); "int4" likewise, group-wise
    int4; "w8a8" int8's weights with the activations into those linears quantized to int8 per
    row at every call (VNNI integer products); "w4a8" int4's weights with those activations. They compose: dtype=bf16, weights=int8 is int8
    weights with bf16 activations. Their accuracy cost is measured by
    benchmarks/accuracy_decode_gemm.py (table in benchmarks/README.md).
    """
    mode, dtype, device = resolve_weights(weights), resolve_dtype(dtype), resolve_device(device)
    loaded = load_checkpoint(path, "prior", ema=None if ema else False)
    with torch.device("meta"):
        prior = Prior(loaded.config)
    return _inference_prior(prior, loaded.state_dict, device, dtype, mode, _where(loaded), loaded.mapped)


def load_tokenizer(path, device=None, dtype=None, encoder: bool = True) -> Tokenizer:
    """Load the VQ tokenizer ('model' weights; training-only tensors are skipped unread).

    ``encoder=False`` builds and reads only what decoding needs (no encoder tower, no quant_conv:
    184M parameters fewer at DetailFlow-16 size); ``encode`` then says so.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    skip = TOKENIZER_TRAINING_PREFIXES + (() if encoder else ENCODER_PREFIXES)
    loaded = load_checkpoint(path, "tokenizer", skip_prefixes=skip)
    with torch.device("meta"):
        tokenizer = Tokenizer(loaded.config, encoder=encoder)
    return _build(tokenizer, loaded.state_dict, device, dtype, _where(loaded), mapped=loaded.mapped)
