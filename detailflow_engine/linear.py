"""Decode-step linears: nn.Linear swapped for pre-packed `decode_gemm`, in one place.

gpt-fast's quantize.py shape: `DecodeLinear` holds the same weight Parameter (state-dict keys and
values unchanged) plus a packed copy for the decode GEMM, and `replace_linears(model)` swaps every
bias-free nn.Linear of a model for one. A call with at most `max_rows` rows (all leading dims
together) runs `decode_gemm`; more rows run F.linear (torch's matmul, oneDNN/MKL), which wins
once the product is compute-bound. Crossover, measured with
`python benchmarks/bench_decode_gemm.py --crossover` (sum over the 5 GPT-L matrices, 2 Zen 5
threads, torch 2.13, quiet machine): F.linear time / ours, bf16: 2.00x at M = 16, 1.32x at 64,
1.03x at 128, 1.07x at 192, 0.95x at 256 -> 192; fp32 (MKL's sgemm is slow on this CPU):
3.79x at 16, 2.27x at 128, 2.07x at 256 -> 256, the largest M measured. The prior's group
steps have M = 16 B with CFG, so both cover batch 8 and fp32 covers batch 16.

The packed copy costs one more copy of each swapped weight in memory (the original stays for
the state dict and the F.linear path). It is rebuilt lazily when the weight's storage, dtype or
version changes (load_state_dict, .to(), in-place edits), so packing can never go stale.

int8 weight-only mode (`DecodeLinear(linear, weights="int8")`, `replace_linears(...,
weights="int8")`): the float weight is quantized once (ops.decode_gemm.quantize_int8, per-row
symmetric scales) and REPLACED by buffers `weight` (int8 Q, (N, K)) and `scales` (fp32, (N,)),
gpt-fast style, so the state dict holds Q and the scales and the float weight is freed. The
scales stay float32 whatever `.to(dtype)` is applied. Few rows run the int8 decode GEMM; more
rows run F.linear on Q converted to x's dtype, times the scales.

On CUDA (with the compiled CUDA kernel) the same swap uses the CUDA decode GEMM (row-major W, no
packed copy) up to `CUDA_MAX_ROWS`, reasoned (not yet measured; `bench_decode_gemm.py --device
cuda` measures it): our kernel does its M FMAs per weight on CUDA cores while cuBLAS uses tensor
cores, so with ~60 TFLOP/s of fp32 FMA against ~4.8 TB/s of HBM the kernel stays memory-bound up
to M ~ 12 for 2-byte weights: bf16/fp16 16 rows (a group of 8 with CFG); fp32 (cuBLAS without
TF32 also runs FMAs) 64; int8 64, since torch's path must first dequantize W (5 bytes of traffic
per weight against 1).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import PackedWeight, decode_gemm, pack_weight, quantize_int8

__all__ = ["DecodeLinear", "replace_linears", "MAX_ROWS", "CUDA_MAX_ROWS", "WEIGHT_MODES"]

# Largest row count that decode_gemm runs on the CPU, per weight dtype: measured crossover with
# F.linear for fp32/bf16. int8: reasoned, not measured: our int8 loop does the same FMAs per
# weight as the fp32 one (the crossover of which is >= 256), and torch's int8 path adds a
# conversion of the whole weight per call.
MAX_ROWS: Dict[torch.dtype, int] = {torch.float32: 256, torch.bfloat16: 192, torch.int8: 256}
# The same on CUDA (reasoned; see the module docstring).
CUDA_MAX_ROWS: Dict[torch.dtype, int] = {torch.float32: 64, torch.bfloat16: 16, torch.float16: 16,
                                         torch.int8: 64}
WEIGHT_MODES = ("native", "int8")


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
    """A bias-free nn.Linear whose few-row calls run `decode_gemm` on a packed weight copy.

    weights="native" keeps the Linear's weight Parameter; weights="int8" replaces it with int8
    buffers `weight` and `scales` (see the module docstring).
    """

    def __init__(self, linear: nn.Linear, max_rows: Optional[int] = None, weights: str = "native"):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("DecodeLinear replaces bias-free nn.Linear only (the prior has no biases)")
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weights = weights
        if weights == "int8":
            q, scales = quantize_int8(linear.weight)
            self.register_buffer("weight", q)
            self.register_buffer("scales", scales)
        else:
            self.weight = linear.weight  # the same Parameter: state dict unchanged
            self.scales = None
        self.max_rows = max_rows
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
        if self.weight.device.type in ("cpu", "cuda"):
            self._packed = pack_weight(self.weight.detach(), self.scales)
        else:
            self._packed = None  # e.g. meta: the torch path only
        self._packed_key = _weight_key(self.weight) + ((_weight_key(self.scales),) if self.scales is not None else ())

    def rows_limit(self, device: Optional[torch.device] = None) -> int:
        if self.max_rows is not None:
            return self.max_rows
        table = CUDA_MAX_ROWS if (device or self.weight.device).type == "cuda" else MAX_ROWS
        return table.get(self.weight.dtype, 0)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return F.linear(x, self.weight)
        # Q is exact in any float dtype (|Q| <= 127); the scales multiply the result in fp32.
        return (F.linear(x, self.weight.to(x.dtype)).float() * self.scales).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // self.in_features if self.in_features else 0
        same_dtype = x.dtype == w.dtype if self.scales is None else x.is_floating_point()
        if (rows > self.rows_limit(x.device) or not same_dtype or x.device != w.device
                or not _kernel_for(x.device) or (x.device.type == "cpu" and x.dtype == torch.float16)
                or (w.requires_grad and torch.is_grad_enabled())):
            return self._torch(x)
        key = _weight_key(w) + ((_weight_key(self.scales),) if self.scales is not None else ())
        if key != self._packed_key or self._packed is None:
            self.repack()
        return decode_gemm(x, self._packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias=False, "
                f"weights={self.weights}, max_rows={self.rows_limit()}")


def replace_linears(model: nn.Module, max_rows: Optional[int] = None, weights: str = "native",
                    skip: Optional[Callable[[str], bool]] = None) -> nn.Module:
    """Swap every bias-free float nn.Linear in `model` for a DecodeLinear (in place; returns
    `model`); linears already swapped are left alone. `max_rows` None = the crossover for the
    weight's dtype and device. `skip(qualified_name)` True keeps that linear as it is.

    weights="native": only linears on a device with a compiled decode_gemm kernel (CPU, or CUDA
    with the CUDA build) are swapped; a no-op otherwise. weights="int8": every such linear is
    quantized, on any device (without a kernel its calls run the torch path on Q and scales).
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
                                            (CUDA_MAX_ROWS if dev.type == "cuda" else MAX_ROWS)):
                continue
            setattr(parent, name, DecodeLinear(child, max_rows, weights))
    return model
