"""decode_gemm_w8a8: y = x @ W^T with int8 weights AND int8 activations quantized per row in the op.

Why: at M = 16 (a group of 8 with CFG) a decode step is compute-bound, and the CPU's bf16 dot
product (vdpbf16ps, 32 multiply-adds an instruction) caps every weight-only format at bf16's
speed. VNNI's vpdpbusd does 64 u8 x s8 multiply-adds an instruction and reads 1 byte a weight.
The activations must be int8 for it, so this is its own weights mode ("w8a8"), with its own
accuracy rows (benchmarks/README.md), not a faster "int8".

Formula (one definition; the kernel csrc/cpu/decode_gemm_w8a8.cpp and `decode_gemm_w8a8_ref`
compute exactly this, bit for bit):

    W  ~ s_w[n] Q[n, k]                      Q, s_w = quantize_int8(W) (the int8 mode's codes)
    s_x[m]    = max_k |x[m, k]| / 127        fp32, per row of x, at every call
    q[m, k]   = round_half_even(clamp(x[m, k] / s_x[m], -127, 127))   (s_x = 0 -> divide by 1)
    acc[m, n] = sum_k q[m, k] Q[n, k]        int32, exact (K <= 65536)
    y[m, n]   = (float(acc) * s_x[m]) * s_w[n]   rounded once to x's dtype

A row with a non-finite value gets s_x = NaN and NaN outputs. The integer sum is exact, so no
k order, tiling, thread split or batch changes a bit: a row's result depends on that row only
(batch-invariant by construction).

Layout (`pack_w8a8`): P[p, k4, j, t] = Q[16 p + j, 4 k4 + t], int8 (Np, ceil(K / 4), 16, 4),
zero padding: one 64-byte vector holds 4 consecutive k of 16 output rows, vpdpbusd's operand.
colsum[n] = sum_k Q[n, k] (int32) undoes the +128 that makes the activations unsigned.

Backends: CPU `_C` (AVX-512 VNNI, with a portable integer loop giving the same bits); no CUDA
kernel: on other devices the torch entry (the reference) serves.

Test:  python -m pytest tests/ops/test_decode_gemm_w8a8.py -q
Bench: python benchmarks/bench_decode_gemm.py --low-precision   (the w8a8 rows)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import (PANEL, PackedWeight, _fix_strides, _shape, check_rows, matmul_rows,
                                               quantize_int8, unpack_panels)

__all__ = ["pack_w8a8", "pack_w8a8_codes", "quantize_rows", "decode_gemm_w8a8", "decode_gemm_w8a8_ref",
           "force_portable", "MAX_K"]

MAX_K = 65536  # = csrc/include/decode_gemm_w8a8.h kW8A8MaxK: the int32 sums cannot overflow below it
_DTYPES = (torch.float32, torch.bfloat16)


def pack_w8a8_codes(q: Tensor, scales: Tensor, *, keep_source: bool = True) -> PackedWeight:
    """A w8a8 PackedWeight from int8 codes Q (N, K) in [-127, 127] and fp32 scales (N,) (the int8
    state-dict tensors, see quantize_int8): the VNNI panels and column sums are made here; the
    originals are kept (not copied) unless `keep_source=False`."""
    if (not isinstance(q, Tensor) or q.dtype != torch.int8 or q.dim() != 2 or q.shape[0] == 0
            or q.shape[1] == 0 or q.shape[1] > MAX_K):
        raise ValueError(f"`q` must be int8 of shape (N, K) with N >= 1 and 1 <= K <= {MAX_K}, got "
                         f"{_shape(q) if isinstance(q, Tensor) else type(q).__name__}")
    N, K = q.shape
    if (not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (N,)
            or scales.device != q.device):
        raise ValueError(f"`scales` must be float32 of shape ({N},) on {q.device}, got "
                         f"{_shape(scales) if isinstance(scales, Tensor) else type(scales).__name__}")
    q, scales = q.detach(), scales.detach().contiguous()
    if bool((q == -128).any()):
        raise ValueError("`q` holds -128: w8a8 codes are symmetric, in [-127, 127] (see quantize_int8)")
    np_, k4 = -(-N // PANEL), -(-K // 4)
    with torch.no_grad():
        padded = q.new_zeros(np_ * PANEL, 4 * k4)
        padded[:N, :K] = q
        packed = padded.view(np_, PANEL, k4, 4).permute(0, 2, 1, 3).contiguous()
        colsum = q.sum(dim=1, dtype=torch.int32)
    return PackedWeight(packed, N, K, scales, colsum=colsum.contiguous(),
                        source=(q, scales) if keep_source else None)


def pack_w8a8(weight: Tensor, *, keep_source: bool = True) -> PackedWeight:
    """`quantize_int8` then `pack_w8a8_codes`: a w8a8 PackedWeight of a (N, K) float weight."""
    q, scales = quantize_int8(weight)
    return pack_w8a8_codes(q, scales, keep_source=keep_source)


def quantize_rows(x: Tensor) -> Tuple[Tensor, Tensor]:
    """The activation quantization of the module docstring: x (M, K) float -> (q (M, K) int8,
    s_x (M,) fp32), fp32 math; non-finite rows get q = 0 and s_x = NaN."""
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=-1)
    s = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((xf / safe[..., None]).clamp(-127.0, 127.0))
    q = torch.where(finite[..., None], q, torch.zeros_like(q)).to(torch.int8)
    return q, torch.where(finite, s, torch.full_like(s, float("nan")))


def decode_gemm_w8a8_ref(x: Tensor, q_w: Tensor, scales: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
    """Plain-torch reference and test oracle: x (..., K) float, Q (N, K) int8, s_w (N,) fp32 ->
    (..., N) in x's dtype, exactly the kernel's bits (the integer product runs in float64, exact
    for |acc| < 2^53, then int32)."""
    x2 = x.reshape(-1, x.shape[-1])
    qx, sx = quantize_rows(x2)
    acc = (qx.double() @ q_w.to(x2.device).double().t()).to(torch.int32)
    y = (acc.float() * sx[:, None]) * scales.to(x2.device).float()[None, :]
    result = y.to(x.dtype).view(*x.shape[:-1], q_w.shape[0])
    if out is None:
        return result
    out.copy_(result)
    return out


def _validate(x, packed, out) -> None:
    if not isinstance(packed, PackedWeight) or not packed.is_w8a8:
        raise TypeError(f"`packed` must be a w8a8 PackedWeight (from pack_w8a8), got "
                        f"{type(packed).__name__}{'' if not isinstance(packed, PackedWeight) else ' of another format'}")
    check_rows(x, packed, out, "float32 or bfloat16", _DTYPES)


def _run(x, packed, scales, colsum, out) -> None:
    _dispatch.pick("decode_gemm_w8a8", x, packed, scales, colsum, out).fn(x, packed, scales, colsum, out)


# The op takes the packed layout only; its torch entry unpacks Q (N from `out`, K from `x`).
@torch.library.custom_op("detailflow::decode_gemm_w8a8", mutates_args=("out",))
def _decode_gemm_w8a8_op(x: Tensor, packed: Tensor, scales: Tensor, colsum: Tensor, out: Tensor) -> None:
    _run(x, packed, scales, colsum, out)


@_decode_gemm_w8a8_op.register_fake
def _decode_gemm_w8a8_fake(x, packed, scales, colsum, out) -> None:
    return None


def decode_gemm_w8a8(x: Tensor, packed: PackedWeight, *, out: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T with W int8 (`pack_w8a8`) and x quantized to int8 per row (module docstring).

    Args:
        x: (..., K) float32 or bfloat16, any strides; its rows (leading dims together) are M.
        packed: `pack_w8a8(W)` on x's device.
        out: optional (..., N) tensor of x's dtype to write into.

    Returns:
        (..., N) in x's dtype; `out` if given.
    """
    _validate(x, packed, out)

    def run(x2, y2):
        args = (x2, packed.packed, packed.kernel_scales, packed.colsum, y2)
        if _dispatch.plain_eager(*args):  # the op's body minus the custom op's Python layers
            _run(*args)
            torch.autograd.graph.increment_version(y2)
        else:
            torch.ops.detailflow.decode_gemm_w8a8.default(*args)

    return matmul_rows(x, packed, out, run)


def _cpu_applies(x, packed, scales, colsum, out) -> bool:
    return (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "decode_gemm_w8a8")
            and x.device.type == "cpu" and x.dtype in _DTYPES and packed.device.type == "cpu"
            and packed.dtype == torch.int8 and packed.is_contiguous() and scales.is_contiguous()
            and colsum.is_contiguous() and scales.device.type == "cpu" and colsum.device.type == "cpu")


def _cpu_impl(x, packed, scales, colsum, out) -> None:
    M, K = x.shape
    N = out.shape[1]
    x, ldx, dst, ldy = _fix_strides(x, out)
    _dispatch.extension().decode_gemm_w8a8(
        x.data_ptr(), M, K, ldx, _dispatch.DTYPE_CODES[x.dtype], packed.data_ptr(), packed.numel(),
        scales.data_ptr(), colsum.data_ptr(), N, dst.data_ptr(), ldy, _dispatch.num_threads())
    if dst is not out:
        out.copy_(dst)


def _torch_impl(x, packed, scales, colsum, out) -> None:
    decode_gemm_w8a8_ref(x, unpack_panels(packed, out.shape[1], x.shape[1]), scales, out=out)


_dispatch.register("decode_gemm_w8a8", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("decode_gemm_w8a8", "torch", _torch_impl)


def force_portable(on: bool) -> None:
    """Make the w8a8 CPU kernel use its portable loop (True) or VNNI where the CPU has it (False,
    the default), process-wide; for tests and benchmarks of the fallback."""
    ext = _dispatch.extension()
    if ext is None or not hasattr(ext, "decode_gemm_w8a8_force_portable"):
        raise RuntimeError("force_portable needs the _C extension with the decode_gemm_w8a8 CPU kernel")
    ext.decode_gemm_w8a8_force_portable(bool(on))


def _selfcheck(backend, reference, device) -> None:
    """Ragged shapes (a partial panel, K not a multiple of 4, a zero row): the same bits."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 67, generator=g), torch.randn(37, 67, generator=g)
    x[3] = 0
    p = pack_w8a8(w.to(device))
    for dtype in _DTYPES:
        xd = x.to(device=device, dtype=dtype)
        args = (xd, p.packed, p.kernel_scales, p.colsum)
        y, want = torch.empty(5, 37, dtype=dtype, device=device), torch.empty(5, 37, dtype=dtype, device=device)
        if not backend.applies(*args, y):
            continue
        backend.fn(*args, y)
        reference(*args, want)
        _dispatch.expect_close(f"decode_gemm_w8a8 x {dtype}", y, want, 0.0, 0.0)


_dispatch.register_selfcheck("decode_gemm_w8a8", _selfcheck)
