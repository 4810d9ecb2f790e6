"""add_rmsnorm Triton kernel: residual add + RMSNorm of each row in one pass.

    h = x + delta                                   (rounded to x's dtype, as torch's add)
    y = (hf * rsqrt(mean(hf^2) + eps)).to(dtype) * weight,   hf = float32(h)

the exact formula of prior.RMSNorm (official RMSNorm): fp32 statistics, the normalized row is
rounded to x's dtype BEFORE the weight multiply, and that multiply (of two dtype values, exact
in fp32 for bf16/fp16) is rounded once more. `delta` is optional (HAS_DELTA=False: plain
RMSNorm of x, h is not written).

Layout: x, delta, h, y are (R, dim) with unit stride along dim and row strides given; weight
(dim,) contiguous. One program per row, the whole row in registers (BLOCK = next_pow2(dim)
<= MAX_DIM); rows are independent, so R programs fill the GPU from R ~ 132 up, and at decode
sizes (R = 2..16) the kernel is launch-bound anyway: the point is 1 launch instead of ~6.

Tested by tests/ops/test_add_rmsnorm.py (interpreter on CPU, compiled with -m gpu);
benchmarked by `python benchmarks/bench_add_rmsnorm.py --device cuda --quick`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from detailflow_engine.ops._triton._common import cast_rtne

MAX_DIM = 8192  # one row in registers: 8192 fp32 over 8 warps = 32 values a thread


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, h_ptr, y_ptr,
                        stride_x, stride_d, stride_h, stride_y,
                        dim, inv_dim, eps,
                        HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2^31 for huge R
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    xf = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        df = tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        h = cast_rtne(xf + df, h_ptr.dtype.element_ty)  # torch's x + delta: fp32 add, one rounding
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        hf = h.to(tl.float32)  # the norm sees the rounded residual, as the prior's next RMSNorm does
    else:
        hf = xf
    # torch.mean = sum * (1/N) (ATen MeanOps); masked lanes are 0 and add nothing.
    ms = tl.sum(hf * hf, axis=0) * inv_dim
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps))  # IEEE sqrt and divide, not the approx ones
    normed = cast_rtne(hf * rstd, y_ptr.dtype.element_ty).to(tl.float32)  # .type_as(x) before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, cast_rtne(normed * w, y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., dim) -> (R, dim) with unit column stride (a view when the layout allows)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def launch_config(dim: int) -> Tuple[int, int]:
    """(BLOCK, num_warps): the row padded to a power of two, ~8 values a thread (one 16-byte
    bf16 vector), 1..8 warps. dim 1024 -> (1024, 4); 2048 -> (2048, 8); 40 -> (64, 1)."""
    block = triton.next_power_of_2(max(dim, 1))
    return block, max(1, min(8, block // 256))


def add_rmsnorm_fwd(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, eps: float
                    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Launch on x's device (current stream). Returns (h or None when delta is None, y), both
    new contiguous tensors of x's shape and dtype. Arguments are validated by the wrapper
    (ops/add_rmsnorm.py); here only the layout is prepared."""
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise ValueError(f"add_rmsnorm Triton kernel supports dim <= {MAX_DIM}, got {dim}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = None if delta is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return h, y
    x2 = _rows(x)
    d2 = x2 if delta is None else _rows(delta)
    y2 = y.view(-1, dim)
    h2 = y2 if h is None else h.view(-1, dim)  # dummies are never touched when HAS_DELTA=False
    w = weight.contiguous()
    block, num_warps = launch_config(dim)
    _add_rmsnorm_kernel[(x2.shape[0],)](
        x2, d2, w, h2, y2, x2.stride(0), d2.stride(0), h2.stride(0), y2.stride(0),
        dim, 1.0 / dim, float(eps), HAS_DELTA=delta is not None, BLOCK=block, num_warps=num_warps,
        enable_fp_fusion=False)  # explicit: triton 3.9 warns when it is left to the default
    return h, y
