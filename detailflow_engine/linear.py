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
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import PackedWeight, decode_gemm, pack_weight

__all__ = ["DecodeLinear", "replace_linears", "MAX_ROWS"]

# Largest row count that decode_gemm runs, per weight dtype: measured crossover with F.linear.
MAX_ROWS: Dict[torch.dtype, int] = {torch.float32: 256, torch.bfloat16: 192}


def _weight_key(w: torch.Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # inference tensors have no version counter
        version = None
    return (w.data_ptr(), w.dtype, w.device, version)


class DecodeLinear(nn.Module):
    """A bias-free nn.Linear whose few-row calls run `decode_gemm` on a packed weight copy."""

    def __init__(self, linear: nn.Linear, max_rows: Optional[int] = None):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("DecodeLinear replaces bias-free nn.Linear only (the prior has no biases)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: state dict unchanged
        self.max_rows = max_rows
        self._packed: Optional[PackedWeight] = None
        self._packed_key: Optional[tuple] = None
        self.repack()

    def repack(self) -> None:
        """(Re)build the packed copy from the current weight."""
        self._packed = pack_weight(self.weight.detach())
        self._packed_key = _weight_key(self.weight)

    def rows_limit(self) -> int:
        return self.max_rows if self.max_rows is not None else MAX_ROWS.get(self.weight.dtype, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // self.in_features if self.in_features else 0
        if (rows > self.rows_limit() or x.dtype != w.dtype or x.device.type != "cpu"
                or (w.requires_grad and torch.is_grad_enabled())):
            return F.linear(x, w)
        if _weight_key(w) != self._packed_key:
            self.repack()
        return decode_gemm(x, self._packed)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias=False, "
                f"max_rows={self.rows_limit()}")


def replace_linears(model: nn.Module, max_rows: Optional[int] = None) -> nn.Module:
    """Swap every bias-free float32/bfloat16 nn.Linear on the CPU in `model` for a DecodeLinear
    (in place; returns `model`). A no-op without the compiled CPU kernel, and for linears
    already swapped. `max_rows` None = the measured crossover for the weight's dtype."""
    if not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "decode_gemm")):
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Linear and child.bias is None and child.weight.device.type == "cpu"
                    and child.weight.dtype in MAX_ROWS):
                setattr(parent, name, DecodeLinear(child, max_rows))
    return model
