"""checkpoint -> config -> model: build an inference model and load its weights safely.

Models are built on the meta device (no random init of hundreds of MB), given real
storage on the target device, and filled by a strict, shape-checked state-dict copy, so the
result never aliases the checkpoint file. Before that, ``load_checkpoint`` has bounded every
config value and compared the config's sizes with the state dict's shapes, so an absurd config
is refused before anything is built; after the copy, NaN/inf weights are refused by name.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from detailflow_engine.checkpoint import (CheckpointError, check_state_dict, first_non_finite,
                                          load_checkpoint)
from detailflow_engine.linear import WEIGHT_MODES, replace_linears
from detailflow_engine.prior import Prior
from detailflow_engine.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'auto'/None -> cuda when available else cpu; 'cuda' without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
    return device


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_weights(weights: Optional[str]) -> str:
    """'native' (None too) or 'int8'; anything else is a ValueError naming the allowed values."""
    if weights is None:
        return "native"
    if not isinstance(weights, str) or weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {list(WEIGHT_MODES)}, got {weights!r}")
    return weights


def _build(model_cls, loaded, device) -> torch.nn.Module:
    """The model with the checkpoint's values (as stored, usually fp32) on `device`; NaN/inf refused."""
    with torch.device("meta"):
        model = model_cls(loaded.config)
    check_state_dict(model.state_dict(), loaded.state_dict, where=str(loaded.weights_path))
    model = model.to_empty(device=device)
    model.load_state_dict(loaded.state_dict, strict=True)
    bad = first_non_finite(model.state_dict())
    if bad:
        key, what, count = bad
        raise CheckpointError(f"{_where(loaded)}: {key} holds {what} values"
                              + (f" ({count} tensors do)" if count > 1 else "")
                              + "; the checkpoint is corrupt or its training diverged")
    return model


def _where(loaded) -> str:
    return f"{loaded.weights_path}: {loaded.which!r} weights"


def _cast(model: torch.nn.Module, dtype: torch.dtype, where: str) -> torch.nn.Module:
    model = model.to(dtype=dtype)
    if dtype == torch.float16:  # fp16 tops out at 65504: larger fp32/bf16 weights became inf
        bad = first_non_finite(model.state_dict())
        if bad:
            raise CheckpointError(f"{where}: {bad[0]} overflows float16 (a value beyond +-65504); "
                                  f"load it as fp32 or bf16")
    return model.eval().requires_grad_(False)


def prepare_prior(prior: Prior, dtype=None, weights: Optional[str] = "native", where: str = "prior") -> Prior:
    """A loaded prior (the checkpoint's values, fp32) -> the inference prior in `dtype`: the one
    place its linears become decode GEMMs (linear.py), whatever the weights mode.

    - weights="int8": every Linear of the transformer blocks (wqkv, wo, w1, w2, w3) is quantized
      from the checkpoint's values (fp32 math) before any dtype cast. Not quantized: the
      embeddings (a gather reads few rows; no bandwidth to save) and the output head (8192 x dim,
      under 3% of GPT-L's block weights but it writes the logits that sampling ranks directly).
    - then the cast to `dtype`;
    - then every float Linear left (all of them for "native", the output head for "int8") is
      packed in `dtype` where a compiled decode_gemm serves its device (state-dict names and
      values unchanged).
    """
    return _prepare_prior(prior, resolve_dtype(dtype), resolve_weights(weights), where)


def _prepare_prior(prior: Prior, dtype: torch.dtype, mode: str, where: str) -> Prior:
    if mode == "int8":
        replace_linears(prior.layers, weights="int8")
    prior = _cast(prior, dtype, where)
    replace_linears(prior)
    return prior


def load_prior(path, ema: Optional[bool] = True, device=None, dtype=None, weights: Optional[str] = "native") -> Prior:
    """Load the GPT prior from a model folder, a .pt or a .safetensors file.

    ``ema=True`` (default) uses the EMA weights when the checkpoint has them, else 'model';
    ``ema=False`` forces 'model'.

    ``dtype`` (fp32 default | bf16 | fp16) is the compute and storage dtype of activations,
    KV cache and the float weights. ``weights`` = "native" keeps the weights in ``dtype``;
    "int8" quantizes every Linear of the transformer blocks to int8 with per-output-channel
    fp32 scales at load (weight-only: activations stay in ``dtype``, products accumulate in
    fp32; the embeddings and the output head stay in ``dtype``). They compose: dtype=bf16,
    weights=int8 is int8 weights with bf16 activations. Their accuracy cost is measured by
    benchmarks/accuracy_decode_gemm.py (table in benchmarks/README.md).
    """
    mode, dtype, device = resolve_weights(weights), resolve_dtype(dtype), resolve_device(device)
    loaded = load_checkpoint(path, "prior", ema=None if ema else False)
    return _prepare_prior(_build(Prior, loaded, device), dtype, mode, _where(loaded))


def load_tokenizer(path, device=None, dtype=None) -> Tokenizer:
    """Load the VQ tokenizer ('model' weights; training-only tensors are skipped unread)."""
    loaded = load_checkpoint(path, "tokenizer")
    return _cast(_build(Tokenizer, loaded, resolve_device(device)), resolve_dtype(dtype), _where(loaded))
