"""The device and dtype spellings that the API and every CLI take, defined once.

Model dtypes are ``fp32`` and ``bf16`` (or the torch dtypes themselves in the API): the compiled
kernels take both on every device (``linear.KERNEL_DTYPES``: fp16 is CUDA-only), so fp16 is not a
model dtype. It remains a *storage* format of ``convert --dtype`` (half the file; the loader casts
to the model dtype). Devices are ``auto`` (cuda when available, else cpu), ``cpu`` and ``cuda``;
the API also takes ``cuda:N`` and ``torch.device`` objects of those types.

Bottom layer: imports torch only.
"""
from __future__ import annotations

from typing import Union

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # model (compute and storage) dtypes
STORAGE_DTYPES = {**DTYPES, "fp16": torch.float16}  # convert --dtype: how a file stores the weights
DEVICES = ("auto", "cpu", "cuda")  # the CLIs' --device choices (the API adds cuda:N)
# The prior's weights modes (linear.DecodeLinear): "native" = in the model dtype; int8/int4 weight-only;
# w8a8 / w4a8 = int8 / int4 weights and per-row int8 activations (ops.decode_gemm_w8a8 / _w4a8).
WEIGHT_MODES = ("native", "int8", "int4", "w8a8", "w4a8")
WEIGHTS_HELP = ("prior weights: native (in --dtype), int8 or int4 weight-only, or w8a8 / w4a8 (int8 / int4 "
                "weights, int8 activations; default: native)")


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """'auto'/None -> cuda when available else cpu; 'cpu', 'cuda', 'cuda:N' or a torch.device of those
    types; 'cuda' without a GPU is an error. Anything else is a ValueError naming the choices."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be one of {list(DEVICES)}, 'cuda:N' or a torch.device, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's own message lists every device type it knows
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {list(DEVICES)} or 'cuda:N', got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but no CUDA GPU is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """None -> float32; 'fp32' / 'bf16' or torch.float32 / torch.bfloat16; anything else is a ValueError."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)} (torch.float32 or torch.bfloat16), got {dtype}")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]

