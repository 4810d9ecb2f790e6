"""Decode-step linears: nn.Linear swapped for pre-packed `decode_gemm`, in one place.

gpt-fast's quantize.py shape: `DecodeLinear` holds the same weight Parameter (state-dict keys and
values unchanged) plus a packed copy for the decode GEMM, and `replace_linears(model)` swaps every
bias-free nn.Linear of a model for one. Every call runs `decode_gemm`, whatever its row count:
the kernel sums each output in one fixed k order, so a row's result never depends on how many
rows ride with it (batch invariance: an image is the same bits at batch 1 and batch 200). An
earlier version switched to F.linear above a measured crossover (192 rows in bf16), and torch's
GEMMs pick their kernel by M, so images changed with the batch size. Cost of staying on our
kernel at large M: benchmarks/README.md ("Batch invariance").

The packed copy costs one more copy of each swapped weight in memory (the original stays for
the state dict and the torch fallback). It is rebuilt lazily when the weight's storage, dtype or
version changes (load_state_dict, .to(), in-place edits), so packing can never go stale.

int8 weight-only mode (`DecodeLinear(linear, weights="int8")`, `replace_linears(...,
weights="int8")`): the float weight is quantized once (ops.decode_gemm.quantize_int8, per-row
symmetric scales) and REPLACED by buffers `weight` (int8 Q, (N, K)) and `scales` (fp32, (N,)),
gpt-fast style, so the state dict holds Q and the scales and the float weight is freed. The
scales stay float32 whatever `.to(dtype)` is applied.

int4 weight-only mode (weights="int4"): group-wise symmetric int4 (ops.decode_gemm.quantize_int4,
group size `INT4_GROUP` unless given): buffers `weight` (uint8 (N, ceil(K / 2)), two 4-bit codes
a byte) and `scales` (fp32 (N, ceil(K / G))) replace the float weight.

The torch path (F.linear, on Q converted to x's dtype times the scales for int8) runs only where
no compiled kernel serves the call: no extension, another device, fp16 on the CPU, or autograd.
It is not batch-invariant.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import (INT4_GROUP, PackedWeight, _int4_nibbles, decode_gemm,
                                               dequantize_int4, nibbles_int4, pack_int4_nibbles, pack_weight,
                                               quantize_int4, quantize_int8)

__all__ = ["DecodeLinear", "replace_linears", "KERNEL_DTYPES", "WEIGHT_MODES"]

# Float weight dtypes that the compiled decode_gemm takes, per device type.
KERNEL_DTYPES: Dict[str, Tuple[torch.dtype, ...]] = {"cpu": (torch.float32, torch.bfloat16),
                                                      "cuda": (torch.float32, torch.bfloat16, torch.float16)}
WEIGHT_MODES = ("native", "int8", "int4")


def _weight_key(w: torch.Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    return (w.data_ptr(), w.dtype, w.device, version)


def _kernel_for(device: torch.device) -> bool:
    """Whether a compiled decode_gemm kernel exists for tensors on `device`."""
    ext = _dispatch.extension()
    if device.type == "cpu":
        return _dispatch.has_cpu_kernels() and hasattr(ext, "decode_gemm")
    if device.type == "cuda":
        return _dispatch.has_cuda_kernels() and hasattr(ext, "decode_gemm_cuda")
    return False


class DecodeLinear(nn.Module):
    """A bias-free nn.Linear whose calls run `decode_gemm` on a packed weight copy.

    weights="native" keeps the Linear's weight Parameter; weights="int8" replaces it with int8
    buffers `weight` and `scales` (see the module docstring).
    """

    def __init__(self, linear: nn.Linear, weights: str = "native", group_size: int = INT4_GROUP):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("DecodeLinear replaces bias-free nn.Linear only (the prior has no biases)")
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weights = weights
        self.group_size = group_size if weights == "int4" else None
        if weights == "int4":
            q, scales = quantize_int4(linear.weight, group_size)
            self.register_buffer("weight", _int4_nibbles(q))
            self.register_buffer("scales", scales)
        elif weights == "int8":
            q, scales = quantize_int8(linear.weight)
            self.register_buffer("weight", q)
            self.register_buffer("scales", scales)
        else:
            self.weight = linear.weight  # the same Parameter: state dict unchanged
            self.scales = None
        self._packed: Optional[PackedWeight] = None
        self._packed_key: Optional[tuple] = None
        self.repack()

    def _apply(self, fn, recurse=True):
        # .to(dtype) casts floating buffers: the int8 scales must keep their float32 values.
        scales = self.scales
        super()._apply(fn, recurse)
        if scales is not None:
            self.scales = fn(scales).float() if scales.is_meta else scales.to(device=self.weight.device)
        return self

    def repack(self) -> None:
        """(Re)build the packed copy from the current weight."""
        if self.weight.device.type in ("cpu", "cuda") and self.group_size is not None:
            self._packed = pack_int4_nibbles(self.weight.detach(), self.scales, self.in_features, self.group_size)
        elif self.weight.device.type in ("cpu", "cuda"):
            self._packed = pack_weight(self.weight.detach(), self.scales)
        else:
            self._packed = None  # e.g. meta: the torch path only
        self._packed_key = _weight_key(self.weight) + ((_weight_key(self.scales),) if self.scales is not None else ())

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            w = dequantize_int4(nibbles_int4(self.weight, self.in_features), self.scales, self.group_size)
            return F.linear(x.float(), w).to(x.dtype)
        if self.scales is None:
            return F.linear(x, self.weight)
        # Q is exact in any float dtype (|Q| <= 127); the scales multiply the result in fp32.
        return (F.linear(x, self.weight.to(x.dtype)).float() * self.scales).to(x.dtype)

    def packed_for(self, x: torch.Tensor) -> Optional[PackedWeight]:
        """The up-to-date packed weight that `forward(x)` multiplies by, or None where forward
        takes the torch path (fused kernels such as ops.decode_layer read it too)."""
        w = self.weight
        same_dtype = x.dtype == w.dtype if self.scales is None else x.is_floating_point()
        if (not same_dtype or x.device != w.device
                or not _kernel_for(x.device) or (x.device.type == "cpu" and x.dtype == torch.float16)
                or (w.requires_grad and torch.is_grad_enabled())):
            return None
        key = _weight_key(w) + ((_weight_key(self.scales),) if self.scales is not None else ())
        if key != self._packed_key or self._packed is None:
            self.repack()
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_for(x)
        return self._torch(x) if packed is None else decode_gemm(x, packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias=False, "
                f"weights={self.weights}" + (f", group_size={self.group_size}" if self.group_size else ""))


def replace_linears(model: nn.Module, weights: str = "native",
                    skip: Optional[Callable[[str], bool]] = None) -> nn.Module:
    """Swap every bias-free float nn.Linear in `model` for a DecodeLinear (in place; returns
    `model`); linears already swapped are left alone. `skip(qualified_name)` True keeps that
    linear as it is.

    weights="native": only linears on a device with a compiled decode_gemm kernel (CPU, or CUDA
    with the CUDA build) are swapped; a no-op otherwise. weights="int8": every such linear is
    quantized, on any device (without a kernel its calls run the torch path on Q and scales);
    weights="int4" likewise, group-wise int4 (group INT4_GROUP).
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    for pname, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            qual = f"{pname}.{name}" if pname else name
            if type(child) is not nn.Linear or child.bias is not None or not child.weight.is_floating_point():
                continue
            if skip is not None and skip(qual):
                continue
            dev = child.weight.device
            if weights == "native" and not (_kernel_for(dev) and child.weight.dtype in
                                            KERNEL_DTYPES.get(dev.type, ())):
                continue
            setattr(parent, name, DecodeLinear(child, weights))
    return model
