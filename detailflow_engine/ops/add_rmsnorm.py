"""add_rmsnorm: the residual add and the next RMSNorm of the prior's decode step, in one pass.

A prior layer is `h = x + attn(norm1(x)); out = h + ffn(norm2(h))`. Between torch's GEMMs sit
an add and an RMSNorm (~6 small kernels on the GPU: add, float, mul, mean, rsqrt, mul, cast,
mul). This op fuses them:

    h = x + delta                         (in x's dtype; h = x when delta is None)
    y = (hf * rsqrt(mean(hf^2) + eps)).type_as(h) * weight,   hf = h.float()

which is prior.RMSNorm's formula exactly (fp32 statistics, the normalized row rounded to x's
dtype before the weight multiply).

Backends (see `_dispatch`): Triton (CUDA tensors, triton importable: ops/_triton/add_rmsnorm.py);
on the CPU the plain torch composition (bit-identical to prior.RMSNorm after an add: the CPU
prior runs the same single forward path as the GPU); then the torch reference
`add_rmsnorm_ref`, which is also the test oracle.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from detailflow_engine.ops import _dispatch

__all__ = ["add_rmsnorm", "add_rmsnorm_ref", "tolerance", "TRITON_MAX_DIM"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_DIM = 8192  # = ops/_triton/add_rmsnorm.MAX_DIM (not imported: that imports triton)


def add_rmsnorm_ref(x: Tensor, delta: Optional[Tensor], weight: Tensor, eps: float = 1e-5
                    ) -> Tuple[Tensor, Tensor]:
    """Plain-torch reference (fallback and test oracle): prior.RMSNorm's formula on x + delta."""
    h = x if delta is None else x + delta
    hf = h.float()
    hf = hf * torch.rsqrt(torch.mean(hf * hf, dim=-1, keepdim=True) + eps)
    return h, hf.type_as(h) * weight


# (atol, rtol) of the STYLE practice-5 rule for y:
# max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol + rtol * max|ref32|.
# h is exact (one fp32 add, one rounding, as torch).
tolerance = _dispatch.tolerance_table("add_rmsnorm", {
    torch.float32: (1e-5, 1e-6), torch.bfloat16: (5e-2, 0.0), torch.float16: (1e-2, 0.0)})


def _validate(x, delta, weight, eps) -> float:
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"`x` must be (..., dim) with dim >= 1, got {_dispatch.describe(x)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"`x` must be float32, bfloat16 or float16 of shape (..., dim), got {_dispatch.describe(x)}")
    dim = x.shape[-1]
    if delta is not None:
        if not isinstance(delta, Tensor):
            raise TypeError(f"`delta` must be a torch.Tensor or None, got {type(delta).__name__}")
        if delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device:
            raise ValueError(f"`delta` must have the shape, dtype and device of `x` ({_dispatch.describe(x)}), "
                             f"got {_dispatch.describe(delta)}")
    if not isinstance(weight, Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}")
    if tuple(weight.shape) != (dim,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"`weight` must be ({dim},) with the dtype and device of `x` ({_dispatch.describe(x)}), "
                         f"got {_dispatch.describe(weight)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"`eps` must be a finite float >= 0, got {eps!r}")
    return float(eps)


def _run(x: Tensor, delta: Optional[Tensor], weight: Tensor, eps: float) -> Tuple[Optional[Tensor], Tensor]:
    """(h, y) from the picked backend; h is None when delta is None."""
    return _dispatch.pick("add_rmsnorm", x, delta, weight).fn(x, delta, weight, eps)


@torch.library.custom_op("detailflow::add_rmsnorm", mutates_args=())
def _add_rmsnorm_op(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    return _run(x, delta, weight, eps)


@_add_rmsnorm_op.register_fake
def _add_rmsnorm_fake(x, delta, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(x, memory_format=torch.contiguous_format)


# delta=None is its own op: a custom op may not return its input as h.
@torch.library.custom_op("detailflow::rmsnorm", mutates_args=())
def _rmsnorm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _run(x, None, weight, eps)[1]


@_rmsnorm_op.register_fake
def _rmsnorm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def add_rmsnorm(x: Tensor, delta: Optional[Tensor], weight: Tensor, eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Residual add then RMSNorm, one pass: returns (h, y).

    Args:
        x: (..., dim) float32, bfloat16 or float16, the residual stream (any strides).
        delta: same shape/dtype/device as x (the attention or FFN output), or None for a plain
            RMSNorm of x.
        weight: (dim,) RMSNorm weight, x's dtype and device.
        eps: RMSNorm epsilon (the prior's norm_eps, 1e-5).

    Returns:
        h = x + delta (a new contiguous tensor; `x` itself when delta is None) and
        y = rmsnorm(h) * weight, contiguous, both (..., dim) in x's dtype; numerics of
        prior.RMSNorm exactly up to the order of the fp32 sum.
    """
    eps = _validate(x, delta, weight, eps)
    if _dispatch.plain_eager(x, delta, weight):
        # The op's body without the custom op's Python layers (several us: as much as the
        # kernel at decode sizes).
        h, y = _run(x, delta, weight, eps)
        return (x if delta is None else h), y
    if delta is None:
        return x, torch.ops.detailflow.rmsnorm.default(x, weight, eps)
    h, y = torch.ops.detailflow.add_rmsnorm.default(x, delta, weight, eps)
    return h, y


def _torch_impl(x, delta, weight, eps):
    h, y = add_rmsnorm_ref(x, delta, weight, eps)
    # contiguous, fresh outputs whatever the input strides (the custom op may not alias inputs)
    return (None if delta is None else h.contiguous()), y.contiguous()


def _triton_applies(x, delta, weight) -> bool:
    return (x.is_cuda and x.dtype in _DTYPES and x.shape[-1] <= TRITON_MAX_DIM
            and _dispatch.triton_kernels("add_rmsnorm") is not None)


def _triton_impl(x, delta, weight, eps):
    with _dispatch.on_device(x.device):
        return _dispatch.triton_kernels("add_rmsnorm").add_rmsnorm_fwd(x, delta, weight, eps)


_dispatch.register("add_rmsnorm", "triton", _triton_impl, applies=_triton_applies)
_dispatch.register("add_rmsnorm", "cpu", _torch_impl, applies=lambda x, delta, weight: x.device.type == "cpu")
_dispatch.register("add_rmsnorm", "torch", _torch_impl)


def _selfcheck(backend, reference, device) -> None:
    """Residual add + RMSNorm of 5 rows of an odd width, with and without the residual."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 300, generator=g).to(device=device, dtype=dtype)
        delta = torch.randn(5, 300, generator=g).to(device=device, dtype=dtype)
        weight = torch.randn(300, generator=g).to(device=device, dtype=dtype)
        for d in (delta, None):
            if not backend.applies(x, d, weight):
                continue
            h, y = backend.fn(x, d, weight, 1e-5)
            want_h, want_y = reference(x, d, weight, 1e-5)
            atol, _ = tolerance(dtype)
            if d is not None:
                _dispatch.expect_close(f"add_rmsnorm {dtype} residual", h, want_h, atol, 1e-4)
            _dispatch.expect_close(f"add_rmsnorm {dtype}", y, want_y, atol, 1e-4 if dtype == torch.float32 else 2e-2)


_dispatch.register_selfcheck("add_rmsnorm", _selfcheck)
