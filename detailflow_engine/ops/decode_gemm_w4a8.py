"""decode_gemm_w4a8: y = x @ W^T with int4 weights (group scales) AND int8 activations quantized per row in the op.

Why: int4 weight-only turns its nibbles into bf16 and multiplies with vdpbf16ps, 32 multiply-adds
an instruction, so at M = 16 (a group of 8 with CFG), where a decode step is compute-bound, it is
no faster than bf16. This op reads the same half byte a weight and multiplies with VNNI's
vpdpbusd (64 an instruction) as decode_gemm_w8a8 does. The activations must be int8 for it, so
this is its own weights mode ("w4a8"), with its own accuracy rows, not a faster "int4".

Formula (one definition; the kernel csrc/cpu/decode_gemm_w4a8.cpp and `decode_gemm_w4a8_ref`
compute exactly this, bit for bit):

    Q, s_w = quantize_int4(W, G)           the int4 mode's codes (in [-7, 7]) and group scales
    s_x, q = quantize_rows(x)              per row, as decode_gemm_w8a8
    acc[m, n, g] = sum_{k in group g} q[m, k] Q[n, k]      int32, exact
    f = 0;  f = f + float(acc[m, n, g]) * s_w[n, g]  for g = 0, 1, ...   fp32, no FMA, in order
    y[m, n] = f * s_x[m]                   rounded once to x's dtype

A row with a non-finite value gets s_x = NaN and NaN outputs. The integer sums are exact and the
fp32 sum runs in one fixed order, so no tiling, thread split or batch changes a bit: a row's
result depends on that row only (batch-invariant by construction).

Layout (`pack_w4a8_codes`): P[p, k8, j, t] = (Q[16 p + j, 8 k8 + t] + 8) | (Q[16 p + j, 8 k8 + 4 + t] + 8) << 4,
uint8 (Np, ceil(K / 8), 16, 4), padding Q = 0: one 64-byte vector holds 8 consecutive k of 16
output rows, its low and high nibbles two vpdpbusd operands. Group scales as decode_gemm_int4
(Np, ceil(K / G), 16); G a multiple of 8 (the int4 default, 64, is). The state dict is the int4
mode's (nibbles (N, ceil(K / 2)) and scales (N, ceil(K / G))), unpacked on demand.

Backends: CPU `_C` (AVX-512 VNNI, with a portable loop giving the same bits); no CUDA kernel: on
other devices the torch entry (the reference) serves.

Test:  python -m pytest tests/ops/test_decode_gemm_w4a8.py -q
Bench: python benchmarks/bench_decode_gemm.py --low-precision   (the w4a8 rows)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import (INT4_GROUP, PANEL, PackedWeight, _int4_nibbles, check_int4_codes, check_rows,
                                               grouped_cpu_impl, matmul_rows, nibbles_int4, quantize_int4,
                                               unpack_group_scales)
from detailflow_engine.ops.decode_gemm_w8a8 import quantize_rows

__all__ = ["pack_w4a8", "pack_w4a8_codes", "unpack_w4a8", "decode_gemm_w4a8", "decode_gemm_w4a8_ref",
           "force_portable", "MAX_GROUP"]

MAX_GROUP = 65536  # = csrc/include/decode_gemm_w4a8.h kW4A8MaxGroup
_DTYPES = (torch.float32, torch.bfloat16)


def _check_group(group_size) -> int:
    if (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 8 or group_size % 8
            or group_size > MAX_GROUP):
        raise ValueError(f"w4a8 `group_size` must be a multiple of 8 in [8, {MAX_GROUP}] (whole 8-k vectors), "
                         f"got {group_size!r}")
    return group_size


def pack_w4a8_codes(nibbles: Tensor, scales: Tensor, K: int, group_size: int = INT4_GROUP, *,
                    keep_source: bool = True) -> PackedWeight:
    """A w4a8 PackedWeight from the int4 state-dict tensors: nibbles (N, ceil(K / 2)) uint8 (low
    nibble = even k, Q + 8) and scales (N, ceil(K / G)) fp32. The VNNI nibble panels and the
    panel group scales are made here; the originals are kept (not copied) unless `keep_source=False`."""
    G = _check_group(group_size)
    nibbles, scales = check_int4_codes(nibbles, scales, K, G)
    N, ng = scales.shape
    np_, k8 = -(-N // PANEL), -(-K // 8)
    with torch.no_grad():
        n = nibbles_int4(nibbles, K).to(torch.uint8) + 8  # (N, K) in [0, 15]
        padded = n.new_full((np_ * PANEL, 8 * k8), 8)  # Q = 0
        padded[:N, :K] = n
        quads = padded.view(np_, PANEL, k8, 2, 4)
        packed = (quads[:, :, :, 0] | (quads[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()
        gs = scales.new_zeros(np_ * PANEL, ng)
        gs[:N] = scales
        gs = gs.view(np_, PANEL, ng).transpose(1, 2).contiguous()
    return PackedWeight(packed, N, K, gs, G, int8_activations=True,
                        source=(nibbles, scales) if keep_source else None)


def pack_w4a8(weight: Tensor, group_size: int = INT4_GROUP, *, keep_source: bool = True) -> PackedWeight:
    """`quantize_int4` then `pack_w4a8_codes`: a w4a8 PackedWeight of a (N, K) float weight."""
    q, scales = quantize_int4(weight, _check_group(group_size))
    return pack_w4a8_codes(_int4_nibbles(q), scales, weight.shape[1], group_size, keep_source=keep_source)


def unpack_w4a8(packed: Tensor, N: int, K: int) -> Tensor:
    """The inverse of the panel packing: (Np, ceil(K / 8), 16, 4) uint8 -> the int4 nibbles (N, ceil(K / 2))."""
    np_, k8 = packed.shape[0], packed.shape[1]
    rows = packed.permute(0, 2, 1, 3)  # (Np, 16, K8, 4)
    n = torch.stack((rows & 15, rows >> 4), dim=3).reshape(np_ * PANEL, 8 * k8)[:N, :K]
    return _int4_nibbles(n.to(torch.int8) - 8)


def decode_gemm_w4a8_ref(x: Tensor, nibbles: Tensor, scales: Tensor, group_size: int, *,
                         out: Optional[Tensor] = None) -> Tensor:
    """Plain-torch reference and test oracle: x (..., K) float, the int4 nibbles (N, ceil(K / 2))
    and scales (N, ceil(K / G)) -> (..., N) in x's dtype, exactly the kernel's bits (each group's
    integer product runs in float64, exact, then one rounding to fp32 as the kernel's conversion)."""
    K, G = x.shape[-1], group_size
    N, ng = scales.shape
    x2 = x.reshape(-1, K)
    qx, sx = quantize_rows(x2)
    dev = x2.device
    q_w = F.pad(nibbles_int4(nibbles.to(dev), K).double(), (0, ng * G - K)).view(N, ng, G)
    q_x = F.pad(qx.double(), (0, ng * G - K)).view(-1, ng, G)
    acc = torch.einsum("mgk,ngk->gmn", q_x, q_w).float()  # (ng, M, N) exact integer sums
    s = scales.to(dev).float()
    f = torch.zeros(x2.shape[0], N, dtype=torch.float32, device=dev)
    for g in range(ng):  # the kernel's order: f = f + acc * s, group by group
        f = f + acc[g] * s[:, g][None, :]
    result = (f * sx[:, None]).to(x.dtype).view(*x.shape[:-1], N)
    if out is None:
        return result
    out.copy_(result)
    return out


def _validate(x, packed, out) -> None:
    if not isinstance(packed, PackedWeight) or not packed.is_w4a8:
        raise TypeError(f"`packed` must be a w4a8 PackedWeight (from pack_w4a8), got "
                        f"{type(packed).__name__}{'' if not isinstance(packed, PackedWeight) else ' of another format'}")
    check_rows(x, packed, out, "float32 or bfloat16", _DTYPES)


def _run(x, packed, group_scales, out, group_size) -> None:
    _dispatch.pick("decode_gemm_w4a8", x, packed, group_scales, out, group_size).fn(
        x, packed, group_scales, out, group_size)


# The op takes the packed layout only; its torch entry unpacks it (N from `out`, K from `x`).
@torch.library.custom_op("detailflow::decode_gemm_w4a8", mutates_args=("out",))
def _decode_gemm_w4a8_op(x: Tensor, packed: Tensor, group_scales: Tensor, group_size: int, out: Tensor) -> None:
    _run(x, packed, group_scales, out, group_size)


@_decode_gemm_w4a8_op.register_fake
def _decode_gemm_w4a8_fake(x, packed, group_scales, group_size, out) -> None:
    return None


def decode_gemm_w4a8(x: Tensor, packed: PackedWeight, *, out: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T with W int4 (`pack_w4a8`) and x quantized to int8 per row (module docstring).

    Args:
        x: (..., K) float32 or bfloat16, any strides; its rows (leading dims together) are M.
        packed: `pack_w4a8(W)` on x's device.
        out: optional (..., N) tensor of x's dtype to write into.

    Returns:
        (..., N) in x's dtype; `out` if given.
    """
    _validate(x, packed, out)

    def run(x2, y2):
        args = (x2, packed.packed, packed.kernel_scales, y2)
        if _dispatch.plain_eager(*args):  # the op's body minus the custom op's Python layers
            _run(*args, packed.group_size)
            torch.autograd.graph.increment_version(y2)
        else:
            torch.ops.detailflow.decode_gemm_w4a8.default(*args[:3], packed.group_size, y2)

    return matmul_rows(x, packed, out, run)


def _cpu_applies(x, packed, group_scales, out, group_size) -> bool:
    return (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "decode_gemm_w4a8")
            and x.device.type == "cpu" and x.dtype in _DTYPES and packed.device.type == "cpu"
            and packed.dtype == torch.uint8 and packed.is_contiguous() and group_scales.is_contiguous()
            and group_scales.device.type == "cpu")


_cpu_impl = grouped_cpu_impl("decode_gemm_w4a8")


def _torch_impl(x, packed, group_scales, out, group_size) -> None:
    N, K = out.shape[1], x.shape[1]
    decode_gemm_w4a8_ref(x, unpack_w4a8(packed, N, K), unpack_group_scales(group_scales, N), group_size, out=out)


_dispatch.register("decode_gemm_w4a8", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("decode_gemm_w4a8", "torch", _torch_impl)


def force_portable(on: bool) -> None:
    """Make the w4a8 CPU kernel use its portable loop (True) or VNNI where the CPU has it (False,
    the default), process-wide; for tests and benchmarks of the fallback."""
    ext = _dispatch.extension()
    if ext is None or not hasattr(ext, "decode_gemm_w4a8_force_portable"):
        raise RuntimeError("force_portable needs the _C extension with the decode_gemm_w4a8 CPU kernel")
    ext.decode_gemm_w4a8_force_portable(bool(on))


def _selfcheck(backend, reference, device) -> None:
    """Ragged shapes (a partial panel, a short last group, K not a multiple of 8, a zero row): the same bits."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 75, generator=g), torch.randn(37, 75, generator=g)
    x[3] = 0
    p = pack_w4a8(w.to(device), 16)
    for dtype in _DTYPES:
        xd = x.to(device=device, dtype=dtype)
        args = (xd, p.packed, p.kernel_scales)
        y, want = torch.empty(5, 37, dtype=dtype, device=device), torch.empty(5, 37, dtype=dtype, device=device)
        if not backend.applies(*args, y, p.group_size):
            continue
        backend.fn(*args, y, p.group_size)
        reference(*args, want, p.group_size)
        _dispatch.expect_close(f"decode_gemm_w4a8 x {dtype}", y, want, 0.0, 0.0)


_dispatch.register_selfcheck("decode_gemm_w4a8", _selfcheck)
