"""checkpoint -> config -> model: build an inference model and load its weights safely.

Models are built on the meta device (no random init of hundreds of MB), given real
storage on the target device, and filled by a strict, shape-checked state-dict copy, so the
result never aliases the checkpoint file.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from detailflow_engine.checkpoint import check_state_dict, load_checkpoint
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


def _build(model_cls, loaded, device, dtype) -> torch.nn.Module:
    with torch.device("meta"):
        model = model_cls(loaded.config)
    check_state_dict(model.state_dict(), loaded.state_dict, where=str(loaded.weights_path))
    model = model.to_empty(device=device)
    model.load_state_dict(loaded.state_dict, strict=True)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def load_prior(path, ema: Optional[bool] = True, device=None, dtype=None) -> Prior:
    """Load the GPT prior from a model folder, a .pt or a .safetensors file.

    ``ema=True`` (default) uses the EMA weights when the checkpoint has them, else 'model';
    ``ema=False`` forces 'model'.
    """
    loaded = load_checkpoint(path, "prior", ema=None if ema else False)
    return _build(Prior, loaded, resolve_device(device), resolve_dtype(dtype))


def load_tokenizer(path, device=None, dtype=None) -> Tokenizer:
    """Load the VQ tokenizer ('model' weights; training-only tensors are skipped unread)."""
    loaded = load_checkpoint(path, "tokenizer")
    return _build(Tokenizer, loaded, resolve_device(device), resolve_dtype(dtype))
