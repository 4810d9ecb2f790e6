"""Decode-step linears: nn.Linear swapped for pre-packed `decode_gemm`, in one place.

gpt-fast's quantize.py shape: `replace_linears(model)` swaps every bias-free nn.Linear of a model
for a `DecodeLinear`, whose calls run `decode_gemm` whatever their row count: the kernel sums each
output in one fixed k order, so a row's result never depends on how many rows ride with it
(batch invariance: an image is the same bits at batch 1 and batch 200). An earlier version
switched to F.linear above a measured crossover (192 rows in bf16), and torch's GEMMs pick their
kernel by M, so images changed with the batch size. Cost of staying on our kernel at large M:
benchmarks/README.md ("Batch invariance").

Weights held once: a DecodeLinear keeps ONLY the kernel's packed layout (PackedWeight without
its source). Its state-dict entries (`weight`, and `scales` for int8/int4, the official names and
values) are rebuilt from the panels on demand: `state_dict()`, `.weight` and `.scales` return new
tensors, `load_state_dict` repacks, `.to()` unpacks, converts and repacks. So edits go through
`load_state_dict`: an in-place edit of the tensor `.weight` returned changes nothing.

int8 weight-only mode (weights="int8"): the float weight is quantized once
(ops.decode_gemm.quantize_int8, per-row symmetric scales): state dict `weight` = int8 Q (N, K),
`scales` = fp32 (N,), gpt-fast style; the scales stay float32 whatever `.to(dtype)` is applied.
int4 weight-only mode (weights="int4"): group-wise symmetric int4 (ops.decode_gemm.quantize_int4,
group size `INT4_GROUP` unless given): `weight` = uint8 (N, ceil(K / 2)), two 4-bit codes a
byte, `scales` = fp32 (N, ceil(K / G)).
w8a8 mode (weights="w8a8"): int8's weights and state dict, packed for VNNI, and the activations
quantized to int8 per row at every call (ops.decode_gemm_w8a8): an integer dot product at twice
the bf16 rate on the compute-bound group steps, at its own accuracy cost (benchmarks/README.md).
w4a8 mode (weights="w4a8"): int4's weights and state dict, packed for VNNI, and the activations
quantized as w8a8's (ops.decode_gemm_w4a8): half w8a8's bytes at its multiply rate.

The torch path (F.linear on the unpacked weight, or on Q converted to x's dtype times the scales
for int8) runs only where no compiled kernel serves the call: no extension, another device,
fp16 on the CPU. It is not batch-invariant.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.device_dtype import WEIGHT_MODES
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import (INT4_GROUP, PackedWeight, _int4_nibbles, decode_gemm,
                                               dequantize_int4, nibbles_int4, pack_int4_nibbles, pack_weight,
                                               quantize_int4, quantize_int8)
from detailflow_engine.ops.decode_gemm_w4a8 import decode_gemm_w4a8, decode_gemm_w4a8_ref, pack_w4a8_codes
from detailflow_engine.ops.decode_gemm_w8a8 import decode_gemm_w8a8, decode_gemm_w8a8_ref, pack_w8a8_codes

__all__ = ["DecodeLinear", "replace_linears", "packs_natively", "KERNEL_DTYPES", "WEIGHT_MODES"]

# Float weight dtypes that the compiled decode_gemm takes, per device type.
KERNEL_DTYPES: Dict[str, Tuple[torch.dtype, ...]] = {"cpu": (torch.float32, torch.bfloat16),
                                                      "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def _kernel_for(device: torch.device) -> bool:
    """Whether a compiled decode_gemm kernel exists for tensors on `device`."""
    ext = _dispatch.extension()
    if device.type == "cpu":
        return _dispatch.has_cpu_kernels() and hasattr(ext, "decode_gemm")
    if device.type == "cuda":
        return _dispatch.has_cuda_kernels() and hasattr(ext, "decode_gemm_cuda")
    return False


def packs_natively(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a float weight of `dtype` on `device` gets a native DecodeLinear (a compiled
    decode_gemm takes it); otherwise replace_linears leaves the nn.Linear alone."""
    return _kernel_for(device) and dtype in KERNEL_DTYPES.get(device.type, ())


class DecodeLinear(nn.Module):
    """A bias-free nn.Linear whose calls run `decode_gemm`; it holds only the packed weight.

    weights="native" packs the Linear's weight in its dtype; "int8" / "int4" / "w8a8" / "w4a8" quantize it
    (see the module docstring). The Linear itself is not kept.
    """

    def __init__(self, linear: nn.Linear, weights: str = "native", group_size: int = INT4_GROUP):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("DecodeLinear replaces bias-free nn.Linear only (the prior has no biases)")
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weights = weights
        self.group_size = group_size if weights in ("int4", "w4a8") else None
        w = linear.weight.detach()
        if self.group_size is not None:
            q, scales = quantize_int4(w, group_size)
            self._pack(_int4_nibbles(q), scales)
        elif weights in ("int8", "w8a8"):
            self._pack(*quantize_int8(w))
        else:
            self._pack(w, None)

    def _pack(self, weight: torch.Tensor, scales: Optional[torch.Tensor]) -> None:
        """Hold (weight, scales) in the state dict's format as the packed layout only."""
        if self.weights == "w4a8":
            self._packed = pack_w4a8_codes(weight, scales, self.in_features, self.group_size, keep_source=False)
        elif self.group_size is not None:
            self._packed = pack_int4_nibbles(weight, scales, self.in_features, self.group_size, keep_source=False)
        elif self.weights == "w8a8":
            self._packed = pack_w8a8_codes(weight, scales, keep_source=False)
        elif scales is None and weight.dtype not in KERNEL_DTYPES.get(weight.device.type, (torch.float32,
                                                                                             torch.bfloat16)):
            # a format no kernel packs (float16 on the CPU): held row-major for the torch path
            self._packed = PackedWeight(weight.contiguous(), self.out_features, self.in_features)
        else:
            self._packed = pack_weight(weight, scales, keep_source=False)

    @property
    def weight(self) -> torch.Tensor:
        """The state dict's `weight` (float, int8 Q or int4 nibbles), unpacked: a new tensor."""
        return self._packed.weight

    @property
    def scales(self) -> Optional[torch.Tensor]:
        """int8 / w8a8 (N,) / int4 / w4a8 (N, ceil(K / G)) float32 scales (int8: the kernel's own), None for native."""
        return self._packed.scales if self.weights != "native" else None

    @property
    def dtype(self) -> torch.dtype:
        """The stored weight format (float dtype, int8, or uint8 nibbles), without unpacking."""
        return self._packed.dtype

    @property
    def device(self) -> torch.device:
        return self._packed.device

    @property
    def held_bytes(self) -> int:
        """Bytes this linear holds, all of them read by each call: panels, scales, column sums."""
        p = self._packed
        return sum(t.numel() * t.element_size() for t in (p.packed, p.kernel_scales, p.colsum) if t is not None)

    def _names(self) -> Tuple[str, ...]:
        return ("weight",) if self.weights == "native" else ("weight", "scales")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.weights != "native":
            destination[prefix + "scales"] = self.scales

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = self._names()
        got = {n: state_dict[prefix + n] for n in names if prefix + n in state_dict}
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                                   and k[len(prefix):] not in names)
            missing_keys.extend(prefix + n for n in names if n not in got)
        if len(got) != len(names):
            return
        old_w, old_s = self.weight, self.scales
        w, s = got["weight"], got.get("scales")
        if not isinstance(w, torch.Tensor) or w.shape != old_w.shape or (s is not None and s.shape != old_s.shape):
            error_msgs.append(f"size mismatch for {prefix}weight: copying {tuple(getattr(w, 'shape', ()))} "
                              f"into {tuple(old_w.shape)} ({self.weights} weights)")
            return
        if self.weights != "native" and (w.dtype != old_w.dtype or s.dtype != torch.float32):
            error_msgs.append(f"{prefix}weight: {self.weights} weights need {old_w.dtype} codes and float32 "
                              f"scales, got {w.dtype} and {s.dtype}")
            return
        with torch.no_grad():
            w = w.detach().to(device=old_w.device, dtype=old_w.dtype)
            self._pack(w, s.detach().to(old_s.device) if s is not None else None)

    def _apply(self, fn, recurse=True):
        # Unpack, convert as a Linear's tensors would be, repack (the bf16 panels differ from
        # fp32's); the int8/int4 scales keep float32 and follow the weight's device.
        w, s = fn(self.weight), self.scales
        self._pack(w, s.to(device=w.device) if s is not None else None)
        return super()._apply(fn, recurse)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights == "w8a8":  # the op's own semantics (its torch entry), float16 included
            return decode_gemm_w8a8_ref(x, self.weight, self.scales)
        if self.weights == "w4a8":
            return decode_gemm_w4a8_ref(x, self.weight, self.scales, self.group_size)
        if self.group_size is not None:
            w = dequantize_int4(nibbles_int4(self.weight, self.in_features), self.scales, self.group_size)
            return F.linear(x.float(), w).to(x.dtype)
        if self.scales is None:
            return F.linear(x, self.weight)
        # Q is exact in any float dtype (|Q| <= 127); the scales multiply the result in fp32.
        return (F.linear(x, self.weight.to(x.dtype)).float() * self.scales).to(x.dtype)

    def packed_for(self, x: torch.Tensor) -> Optional[PackedWeight]:
        """The packed weight that `forward(x)` multiplies by, or None where forward takes the
        torch path (fused kernels such as ops.decode_layer read it too). The object changes only
        when the module is reloaded or moved."""
        p = self._packed
        same_dtype = x.dtype == p.packed.dtype if self.weights == "native" else x.is_floating_point()
        if (not same_dtype or x.device != p.packed.device or not _kernel_for(x.device)
                or (x.device.type == "cpu" and x.dtype == torch.float16)):
            return None
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_for(x)
        if packed is None:
            return self._torch(x)
        if packed.is_w8a8:
            return decode_gemm_w8a8(x, packed)
        return decode_gemm_w4a8(x, packed) if packed.is_w4a8 else decode_gemm(x, packed)

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
    weights="int4" likewise, group-wise int4 (group INT4_GROUP); weights="w8a8" / "w4a8" int8 /
    int4 weights with int8 activations.
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
            if weights == "native" and not packs_natively(child.weight.device, child.weight.dtype):
                continue
            setattr(parent, name, DecodeLinear(child, weights))
    return model
