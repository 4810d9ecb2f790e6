"""decode_gemm: y = x @ W^T for the few rows of a decode step, on weights packed once at load.

A decode step of the prior multiplies 2 (batch 1 with CFG) or 16 (a group of 8 with CFG)
activation rows by each weight matrix, so its time is the time to read the weights once.
torch's matmul streams them at 9-28 GB/s there on our CPU; this kernel packs each weight
once (`pack_weight`) into panels of 16 output rows that a thread reads front to back, and
reaches the machine's read bandwidth (csrc/cpu/decode_gemm.cpp). Packed layout (N x K weight,
Np = ceil(N / 16) panels, zero padding):

    float32   packed[p, k, j]     = W[16 p + j, k]           shape (Np, K, 16)
    bfloat16  packed[p, k2, j, t] = W[16 p + j, 2 k2 + t]    shape (Np, ceil(K / 2), 16, 2)

Backends (see `_dispatch`): CPU `_C`, then the torch reference `decode_gemm_ref` (also the
test oracle), which uses the original weight kept in the `PackedWeight`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detailflow_engine.ops import _dispatch

__all__ = ["PackedWeight", "pack_weight", "decode_gemm", "decode_gemm_ref", "tolerance", "PANEL"]

PANEL = 16  # output rows per packed panel; must match csrc/include/decode_gemm.h kDecodePanel
_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedWeight:
    """A (N, K) weight packed for `decode_gemm`, with the original kept for the torch paths."""

    packed: Tensor  # layout in the module docstring
    weight: Tensor  # the original (N, K), detached (shares storage with the parameter)

    @property
    def N(self) -> int:
        return self.weight.shape[0]

    @property
    def K(self) -> int:
        return self.weight.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device


def _shape(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def pack_weight(weight: Tensor) -> PackedWeight:
    """Pack a (N, K) float32 or bfloat16 weight (an nn.Linear's, y = x @ W^T) for `decode_gemm`.

    Values are copied bit-exactly (zero padding to whole panels; bf16 K padded to even).
    Costs one extra copy of the weight in memory; the original is kept (not copied).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.dtype not in _DTYPES or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"`weight` must be float32 or bfloat16 of shape (N, K) with N, K >= 1, "
                         f"got {_shape(weight)}")
    w = weight.detach()
    N, K = w.shape
    np_ = -(-N // PANEL)
    with torch.no_grad():
        if w.dtype == torch.float32:
            padded = w.new_zeros(np_ * PANEL, K)
            padded[:N] = w
            packed = padded.view(np_, PANEL, K).transpose(1, 2).contiguous()
        else:
            kp = K + K % 2
            padded = w.new_zeros(np_ * PANEL, kp)
            padded[:N, :K] = w
            packed = padded.view(np_, PANEL, kp // 2, 2).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(packed, w)


def decode_gemm_ref(x: Tensor, weight: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    """Plain-torch reference (fallback and test oracle): fp32 x @ W^T, cast to x's dtype."""
    result = F.linear(x.float(), weight.float()).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(atol, rtol) of the STYLE practice-5 rule for this op:
    max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol + rtol * max|ref32|.
    fp32: the kernel sums over k in another order than torch's sgemm (blocks of 64 k), so the
    two differ by about their own errors against fp64 (both ~3e-7 of max|y| at K = 2816,
    N(0, 1) data); rtol 1e-6 of the largest output leaves a 2.5x margin there."""
    if dtype == torch.float32:
        return 1e-5, 1e-6
    if dtype == torch.bfloat16:
        return 5e-2, 0.0
    raise ValueError(f"decode_gemm has no tolerance for {dtype}")


def _validate(x, packed, out) -> None:
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"`packed` must be a PackedWeight (from pack_weight), got {type(packed).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES or x.dim() == 0 or x.shape[-1] != packed.K:
        raise ValueError(f"`x` must be float32 or bfloat16 of shape (..., K) with K = {packed.K}, "
                         f"got {_shape(x)}")
    if x.device != packed.device:
        raise ValueError(f"`x` must be on the device of `packed` ({packed.device}), got {_shape(x)}")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"`out` must be a torch.Tensor, got {type(out).__name__}")
        want = (*x.shape[:-1], packed.N)
        if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"`out` must be {str(x.dtype).replace('torch.', '')} of shape {want} "
                             f"on {x.device}, got {_shape(out)}")


def _run(x2, packed, weight, y2) -> None:
    _dispatch.pick("decode_gemm", x2, packed, weight, y2).fn(x2, packed, weight, y2)


@torch.library.custom_op("detailflow::decode_gemm", mutates_args=("out",))
def _decode_gemm_op(x: Tensor, packed: Tensor, weight: Tensor, out: Tensor) -> None:
    _run(x, packed, weight, out)


@_decode_gemm_op.register_fake
def _decode_gemm_fake(x, packed, weight, out) -> None:
    return None  # the result is written into `out`


def decode_gemm(x: Tensor, packed: PackedWeight, *, out: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T (a bias-free nn.Linear) with fp32 accumulation, for few rows of x.

    Args:
        x: (..., K) float32 or bfloat16, any strides; its rows (all leading dims together) are
            the M of the GEMM, fast for M <= 64 (use F.linear beyond the measured crossover).
        packed: `pack_weight(W)` of a (N, K) float32 or bfloat16 weight on x's device. Any
            mix of x and W dtypes works; bf16 x with bf16 W uses the CPU's bf16 dot product.
        out: optional (..., N) tensor of x's dtype to write into.

    Returns:
        (..., N) tensor in x's dtype (bf16 rounded to nearest even); `out` if given.
    """
    _validate(x, packed, out)
    N = packed.N
    flat = x.dim() == 2  # (M, K): no reshapes (a decode step's ~10 us per call budget)
    x2 = x if flat else x.reshape(-1, packed.K)
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out
    direct = out.is_contiguous()
    y2 = (out if flat else out.view(-1, N)) if direct else torch.empty((x2.shape[0], N), dtype=x.dtype,
                                                                       device=x.device)
    if _dispatch.plain_eager(x2, packed.packed, packed.weight, y2):
        # The backend call of the op's body, minus the custom op's ~17 us Python layers (a
        # quarter of a whole 1024 x 1024 bf16 product at M = 2).
        _run(x2, packed.packed, packed.weight, y2)
        torch.autograd.graph.increment_version(y2)
    else:
        torch.ops.detailflow.decode_gemm.default(x2, packed.packed, packed.weight, y2)
    if not direct:
        out.copy_(y2.view(out.shape))
    return out


def _cpu_impl(x, packed, weight, out) -> None:
    M, K = x.shape
    xs = x.stride()
    if xs[1] != 1 or (M > 1 and xs[0] < K):
        x = x.contiguous()  # the kernel reads rows with a unit last stride, stride(0) >= K
        xs = (K, 1)
    N = out.shape[1]
    ys = out.stride()
    dst = out
    if ys[1] != 1 or (M > 1 and ys[0] < N):
        dst = torch.empty((M, N), dtype=out.dtype, device=out.device)
        ys = (N, 1)
    codes = _dispatch.DTYPE_CODES
    _dispatch.extension().decode_gemm(
        x.data_ptr(), M, K, xs[0] if M > 1 else K, codes[x.dtype], packed.data_ptr(), packed.numel(),
        codes[packed.dtype], N, dst.data_ptr(), ys[0] if M > 1 else N, _dispatch.num_threads())
    if dst is not out:
        out.copy_(dst)


def _cpu_applies(x, packed, weight, out) -> bool:
    return (_dispatch.has_cpu_kernels() and x.device.type == "cpu" and packed.device.type == "cpu"
            and x.dtype in _DTYPES and packed.dtype in _DTYPES and packed.is_contiguous()
            and hasattr(_dispatch.extension(), "decode_gemm"))


def _torch_impl(x, packed, weight, out) -> None:
    decode_gemm_ref(x, weight, out=out)


_dispatch.register("decode_gemm", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("decode_gemm", "torch", _torch_impl)
