"""checkpoint -> config -> model: build an inference model and load its weights safely.

Models are built on the meta device (no random init of hundreds of MB), given real
storage on the target device, and filled by a strict, shape-checked state-dict copy, so the
result never aliases the checkpoint file. Before that, ``load_checkpoint`` has bounded every
config value and compared the config's sizes with the state dict's shapes, so an absurd config
is refused before anything is built; after the copy, NaN/inf weights are refused by name.
"""
from __future__ import annotations

from typing import Optional

import torch

from detailflow_engine.checkpoint import (CheckpointError, check_state_dict, first_non_finite,
                                          load_checkpoint)
from detailflow_engine.device_dtype import DTYPES, resolve_device, resolve_dtype  # noqa: F401 - re-exported
from detailflow_engine.linear import WEIGHT_MODES, replace_linears
from detailflow_engine.prior import Prior
from detailflow_engine.tokenizer import Tokenizer

def resolve_weights(weights: Optional[str]) -> str:
    """'native' (None too) or 'int8'; anything else is a ValueError naming the allowed values."""
    if weights is None:
        return "native"
    if not isinstance(weights, str) or weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {list(WEIGHT_MODES)}, got {weights!r}")
    return weights


def _build(model_cls, loaded, device, dtype, prepare=None) -> torch.nn.Module:
    with torch.device("meta"):
        model = model_cls(loaded.config)
    check_state_dict(model.state_dict(), loaded.state_dict, where=str(loaded.weights_path))
    model = model.to_empty(device=device)
    model.load_state_dict(loaded.state_dict, strict=True)
    where = f"{loaded.weights_path}: {loaded.which!r} weights"
    bad = first_non_finite(model.state_dict())
    if bad:
        key, what, count = bad
        raise CheckpointError(f"{where}: {key} holds {what} values"
                              + (f" ({count} tensors do)" if count > 1 else "")
                              + "; the checkpoint is corrupt or its training diverged")
    if prepare is not None:
        prepare(model)  # on the weights as loaded, before the dtype cast
    model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def _quantize_blocks(prior: Prior) -> None:
    """int8 weight-only: every Linear of the transformer blocks (wqkv, wo, w1, w2, w3), quantized
    from the checkpoint's values (fp32 math) before any dtype cast. Not quantized: the
    embeddings (a gather reads few rows; no bandwidth to save) and the output head (8192 x dim,
    under 3% of GPT-L's block weights but it writes the logits that sampling ranks directly;
    it stays in `dtype` and still runs the native decode GEMM)."""
    replace_linears(prior.layers, weights="int8")


def load_prior(path, ema: Optional[bool] = True, device=None, dtype=None, weights: Optional[str] = "native") -> Prior:
    """Load the GPT prior from a model folder, a .pt or a .safetensors file.

    ``ema=True`` (default) uses the EMA weights when the checkpoint has them, else 'model';
    ``ema=False`` forces 'model'.

    ``dtype`` (fp32 default | bf16, the spellings of ``device_dtype``) is the compute and storage dtype of activations,
    KV cache and the float weights. ``weights`` = "native" keeps the weights in ``dtype``;
    "int8" quantizes every Linear of the transformer blocks to int8 with per-output-channel
    fp32 scales at load (weight-only: activations stay in ``dtype``, products accumulate in
    fp32; the embeddings and the output head stay in ``dtype``). They compose: dtype=bf16,
    weights=int8 is int8 weights with bf16 activations. Accuracy cost, measured by
    benchmarks/accuracy_decode_gemm.py against the fp32 engine (CFG 1.5, greedy; teacher-forced
    max logit error as a fraction of max |logit|, teacher-forced argmax agreement, free-running
    token agreement): tiny-a fixture: bf16 1.1% / 100% / 100%, int8 1.2% / 100% / 100%,
    bf16 + int8 1.7% / 98.4% / 89%; DetailFlow-16-size random weights (near-uniform logits, a
    stress case): bf16 2.2% / 95.7%, int8 3.8% / 92.6%, bf16 + int8 4.4% / 92.2%.
    """
    mode, device, dtype = resolve_weights(weights), resolve_device(device), resolve_dtype(dtype)  # before reading
    loaded = load_checkpoint(path, "prior", ema=None if ema else False)
    return _build(Prior, loaded, device, dtype, prepare=_quantize_blocks if mode == "int8" else None)


def load_tokenizer(path, device=None, dtype=None) -> Tokenizer:
    """Load the VQ tokenizer ('model' weights; training-only tensors are skipped unread)."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)  # before reading the checkpoint
    loaded = load_checkpoint(path, "tokenizer")
    return _build(Tokenizer, loaded, device, dtype)
