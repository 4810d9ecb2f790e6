"""decode_gemm: y = x @ W^T for the few rows of a decode step, on weights packed once at load.

Weight formats: float32, bfloat16 (float16 on CUDA), and int8 weight-only quantization with
per-output-channel symmetric fp32 scales (gpt-fast style, `quantize_int8`):
scale[n] = max_k |W[n, k]| / 127, Q[n, k] = round(W[n, k] / scale[n]) clamped to [-127, 127],
so W ~ scale[:, None] * Q and y = (x @ Q^T) * scale, dequantized in registers by the kernels.
Per element |W - scale Q| <= scale / 2, hence |y_int8 - x @ W^T| <= scale[n] / 2 * sum_k |x[m, k]|
(`int8_error_bound`); for Gaussian weights the RMS error is ~0.5-0.9% of the RMS of y (K = 19..2816,
measured), under the 1.5% the tests assert.

int4 weight-only (`quantize_int4`, `pack_int4`): symmetric per output row and group of
`group_size` consecutive k (default INT4_GROUP, even; a short last group when it does not divide
K): scale[n, g] = max |W[n, group g]| / 7, Q = round(W / scale) clamped to [-7, 7], stored as
nibbles Q + 8, two k per byte (low nibble = even k). Symmetric (no zero point): one fp32 per
group, and the kernels turn a nibble into an exact bf16 with one table lookup. Layouts:

    int4      packed[p, k2, j]    = (Q[16 p + j, 2 k2] + 8) | (Q[16 p + j, 2 k2 + 1] + 8) << 4   uint8 (Np, ceil(K / 2), 16)
              group scales        S[p, g, j] = scale[16 p + j, g]                              fp32 (Np, ceil(K / G), 16)
    PackedWeight.weight = the (N, ceil(K / 2)) uint8 nibbles row-major, .scales = (N, ceil(K / G)),
    both kept or unpacked on demand.

A decode step of the prior multiplies 2 (batch 1 with CFG) or 16 (a group of 8 with CFG)
activation rows by each weight matrix, so its time is the time to read the weights once.
torch's matmul streams them at 9-28 GB/s there on our CPU; this kernel packs each weight
once (`pack_weight`) into panels of 16 output rows that a thread reads front to back, and
reaches the machine's read bandwidth (csrc/cpu/decode_gemm.cpp). Packed layout (N x K weight,
Np = ceil(N / 16) panels, zero padding):

    float32   packed[p, k, j]     = W[16 p + j, k]           shape (Np, K, 16)
    bfloat16  packed[p, k2, j, t] = W[16 p + j, 2 k2 + t]    shape (Np, ceil(K / 2), 16, 2)
    int8      packed[p, k, j]     = Q[16 p + j, k]           shape (Np, K, 16)   (+ scales (N,) fp32)

On CUDA nothing is packed: `packed` is the row-major (N, K) weight itself (a GPU streams rows
fine; csrc/cuda/decode_gemm.cu), with split-K over a scratch buffer when N alone would not fill
the SMs (the split count is chosen here, `_cuda_splits`).

Backends (see `_dispatch`): CUDA `_C`, CPU `_C`, then the torch reference `decode_gemm_ref`
(also the test oracle). The ops take only the packed layout; their torch entries unpack the
weight from it (`unpack_panels`), so nothing but the packed copy need be held.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detailflow_engine.ops import _dispatch

__all__ = ["PackedWeight", "pack_weight", "pack_int8", "quantize_int8", "quantize_int4", "pack_int4",
           "pack_int4_nibbles", "nibbles_int4", "unpack_panels", "unpack_group_scales", "dequantize_int4", "force_portable", "decode_gemm",
           "decode_gemm_ref", "int8_error_bound", "tolerance", "PANEL", "INT4_GROUP"]

PANEL = 16  # output rows per packed panel; must match csrc/include/decode_gemm.h kDecodePanel
INT4_GROUP = 64  # default int4 group size (k per scale): measured choice, benchmarks/README.md (issue 22)
_DTYPES = (torch.float32, torch.bfloat16)  # x and float W on the CPU
_CUDA_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_W_DTYPES = _DTYPES + (torch.float16, torch.int8)
# Must match csrc/include/decode_gemm_cuda.h (rows per block, K tile of the split).
_CUDA_ROWS_PER_BLOCK = 16
_CUDA_KTILE = 256


@dataclass(frozen=True)
class PackedWeight:
    """A (N, K) weight prepared for `decode_gemm`: the kernel's layout, and what it was made from.

    `packed` (+ `kernel_scales`) is all the kernels read. `source` is the (weight, scales) that
    `pack_*` was given, kept for the torch paths and tests by reference (no copy); with
    `keep_source=False` (what linear.DecodeLinear does) only the packed layout is held and
    `weight` / `scales` are rebuilt from it on demand (`unpack_*`), so a model holds its
    weights once."""

    packed: Tensor  # CPU: the panel layout in the module docstring; CUDA: the row-major weight
    N: int
    K: int
    kernel_scales: Optional[Tensor] = None  # int8: (N,) float32; int4 / w4a8: the (Np, ceil(K / G), 16) panel layout
    group_size: Optional[int] = None  # int4 / w4a8: k per group scale
    colsum: Optional[Tensor] = None  # w8a8 only: (N,) int32 sum_k Q[n, k] (ops.decode_gemm_w8a8)
    int8_activations: bool = False  # int4 codes in the w4a8 layout (ops.decode_gemm_w4a8): x is quantized too
    source: Optional[Tuple[Tensor, Optional[Tensor]]] = field(default=None, repr=False, compare=False)

    @property
    def is_int4(self) -> bool:
        """int4 weight-only (decode_gemm); see is_w4a8 for int4 weights with int8 activations."""
        return self.group_size is not None and not self.int8_activations

    @property
    def is_w4a8(self) -> bool:
        """int4 codes in the VNNI nibble layout, for decode_gemm_w4a8 (activations quantized too)."""
        return self.group_size is not None and self.int8_activations

    @property
    def is_int8(self) -> bool:
        """int8 weight-only (decode_gemm); see is_w8a8 for int8 weights with int8 activations."""
        return self.kernel_scales is not None and self.group_size is None and not self.is_w8a8

    @property
    def is_w8a8(self) -> bool:
        """int8 weights in the VNNI layout, for decode_gemm_w8a8 (activations quantized too)."""
        return self.colsum is not None

    @property
    def dtype(self) -> torch.dtype:
        """The stored format: float32 / bfloat16 (float16 on CUDA), int8 codes, uint8 int4 nibbles."""
        return self.packed.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def group_scales(self) -> Optional[Tensor]:
        return self.kernel_scales if self.group_size is not None else None

    @property
    def weight(self) -> Tensor:
        """The (N, K) float weight, the int8 codes Q (N, K), or the int4 nibbles (N, ceil(K / 2))
        row-major (int4 and w4a8): the source itself, or unpacked from the panels (a new tensor)."""
        if self.source is not None:
            return self.source[0]
        if self.is_w4a8:
            from detailflow_engine.ops.decode_gemm_w4a8 import unpack_w4a8

            return unpack_w4a8(self.packed, self.N, self.K)
        return unpack_panels(self.packed, self.N, -(-self.K // 2) if self.is_int4 else self.K)

    @property
    def scales(self) -> Optional[Tensor]:
        """int8 / w8a8: (N,) float32; int4 / w4a8: (N, ceil(K / G)) float32; float weights: None."""
        if self.source is not None or self.group_size is None:
            return self.source[1] if self.source is not None else self.kernel_scales
        return unpack_group_scales(self.kernel_scales, self.N)

    def without_source(self) -> "PackedWeight":
        """The same packed weight, holding only the kernel layout."""
        return replace(self, source=None)

    def dequantized(self) -> Tensor:
        """The weight as float32 (N, K): W itself, scales[:, None] * Q for int8 / w8a8, group-wise for int4 / w4a8."""
        if self.group_size is not None:
            return dequantize_int4(nibbles_int4(self.weight, self.K), self.scales, self.group_size)
        w = self.weight.float()
        return w * self.scales[:, None] if self.scales is not None else w


def unpack_panels(packed: Tensor, N: int, row_len: int) -> Tensor:
    """The row-major (N, row_len) matrix that `packed` holds: a CUDA weight is already row-major;
    CPU panels (Np, row_len, 16) (float32, int8, int4 nibbles), bf16 pairs (Np, row_len / 2, 16, 2)
    or w8a8 quads (Np, row_len / 4, 16, 4) are transposed back and their padding dropped."""
    if packed.dim() == 2:
        return packed
    np_ = packed.shape[0]
    if packed.dim() == 4:  # bf16 k pairs
        rows = packed.permute(0, 2, 1, 3).reshape(np_ * PANEL, -1)
    else:
        rows = packed.transpose(1, 2).reshape(np_ * PANEL, -1)
    return rows[:N, :row_len].contiguous()


def unpack_group_scales(group_scales: Tensor, N: int) -> Tensor:
    """int4 group scales in the kernel layout (Np, ng, 16) -> (N, ng)."""
    np_, ng, _ = group_scales.shape
    return group_scales.transpose(1, 2).reshape(np_ * PANEL, ng)[:N].contiguous()


# Kernel formats of a packed weight (= csrc/include/packed_weight.h PackedFormat).
PACKED_FORMATS = {"dense": 0, "int4": 1, "w8a8": 2, "w4a8": 3}


def kernel_descriptor(p: PackedWeight) -> Tuple[int, int, int, int, int, int, int, int, int]:
    """What a fused CPU kernel (ops.decode_layer) needs to stream `p`, as csrc/bindings.cpp
    PackedArg: (packed address, numel, dtype code, scales address or 0, N, K, format code,
    column sums address or 0, int4 / w4a8 group or 0). int4, w8a8 and w4a8 panels are bytes (the int8 code).
    The addresses are valid while `p` lives."""
    codes = _dispatch.DTYPE_CODES
    fmt = "int4" if p.is_int4 else "w8a8" if p.is_w8a8 else "w4a8" if p.is_w4a8 else "dense"
    dtype = codes[torch.int8] if fmt != "dense" else codes[p.packed.dtype]
    scales = p.kernel_scales.data_ptr() if p.kernel_scales is not None else 0
    return (p.packed.data_ptr(), p.packed.numel(), dtype, scales, p.N, p.K, PACKED_FORMATS[fmt],
            p.colsum.data_ptr() if p.colsum is not None else 0, p.group_size or 0)


def _shape(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _float_weight(weight) -> Tensor:
    """A (N, K) floating weight (N, K >= 1) as detached fp32, else TypeError / ValueError."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"`weight` must be a floating-point (N, K) tensor with N, K >= 1, got {_shape(weight)}")
    return weight.detach().float()


def quantize_int8(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 quantization of a (N, K) float weight (gpt-fast style).

    Returns (Q int8 (N, K), scales float32 (N,)) with scales = max_k |W[n, k]| / 127 and
    Q = round(W / scales) clamped to [-127, 127] (computed in fp32; an all-zero row gets
    scale 0 and Q = 0). Raises ValueError on non-finite weights.
    """
    w = _float_weight(weight)
    with torch.no_grad():
        amax = w.abs().amax(dim=1)
        if not bool(torch.isfinite(amax).all()):
            raise ValueError("`weight` has non-finite values: int8 quantization needs finite weights")
        scales = amax / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales.contiguous()


def pack_weight(weight: Tensor, scales: Optional[Tensor] = None, *, keep_source: bool = True) -> PackedWeight:
    """Prepare a (N, K) weight (an nn.Linear's, y = x @ W^T) for `decode_gemm`.

    `weight`: float32 or bfloat16 (also float16 on CUDA), or int8 codes with `scales` ((N,)
    float32 on the same device; see `quantize_int8`, or use `pack_int8`). On the CPU the values
    are copied bit-exactly into panels (zero padding to whole panels; bf16 K padded to even):
    one extra copy of the weight in memory, the original is kept (not copied) unless
    `keep_source=False`. On CUDA the weight itself is used (made contiguous if it is not).
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}")
    cuda = weight.device.type == "cuda"
    allowed = (torch.float32, torch.bfloat16, torch.float16) if cuda else _DTYPES
    int8 = weight.dtype == torch.int8
    if weight.dim() != 2 or not (weight.dtype in allowed or int8) or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"`weight` must be float32 or bfloat16 (float16 too on CUDA), or int8 with scales, "
                         f"of shape (N, K) with N, K >= 1, got {_shape(weight)}")
    if int8 != (scales is not None):
        raise ValueError("`scales` must be given exactly for an int8 weight (see quantize_int8)"
                         if int8 else f"`scales` is only for int8 weights, got a {_shape(weight)} weight")
    w = weight.detach()
    N, K = w.shape
    if int8:
        if (not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (N,)
                or scales.device != w.device):
            raise ValueError(f"`scales` must be float32 of shape ({N},) on {w.device}, got "
                             f"{_shape(scales) if isinstance(scales, Tensor) else type(scales).__name__}")
        scales = scales.detach().contiguous()
    source = (w, scales) if keep_source else None
    if cuda:
        return PackedWeight(w.contiguous(), N, K, scales, source=source)
    np_ = -(-N // PANEL)
    with torch.no_grad():
        if w.dtype != torch.bfloat16:  # float32 and int8: (Np, K, 16)
            padded = w.new_zeros(np_ * PANEL, K)
            padded[:N] = w
            packed = padded.view(np_, PANEL, K).transpose(1, 2).contiguous()
        else:
            kp = K + K % 2
            padded = w.new_zeros(np_ * PANEL, kp)
            padded[:N, :K] = w
            packed = padded.view(np_, PANEL, kp // 2, 2).permute(0, 2, 1, 3).contiguous()
    return PackedWeight(packed, N, K, scales, source=source)


def _check_group(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"`group_size` must be an even int >= 2, got {group_size!r}")
    return group_size


def quantize_int4(weight: Tensor, group_size: int = INT4_GROUP) -> Tuple[Tensor, Tensor]:
    """Group-wise symmetric int4 quantization of a (N, K) float weight.

    Returns (Q int8 (N, K) in [-7, 7], scales float32 (N, ceil(K / group_size))) with
    scales[n, g] = max |W[n, g G:(g + 1) G]| / 7 and Q = round(W / scale) clamped (fp32 math; an
    all-zero group gets scale 0 and Q = 0). The last group is short when G does not divide K.
    Raises ValueError on non-finite weights or a bad group size.
    """
    G = _check_group(group_size)
    w = _float_weight(weight)
    with torch.no_grad():
        N, K = w.shape
        ng = -(-K // G)
        padded = F.pad(w, (0, ng * G - K)).view(N, ng, G)
        amax = padded.abs().amax(dim=2)
        if not bool(torch.isfinite(amax).all()):
            raise ValueError("`weight` has non-finite values: int4 quantization needs finite weights")
        scales = amax / 7.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(padded / safe[:, :, None]).clamp_(-7, 7).to(torch.int8).view(N, ng * G)[:, :K]
    return q.contiguous(), scales.contiguous()


def _int4_nibbles(q: Tensor) -> Tensor:
    """Q int8 (N, K) in [-8, 7] -> uint8 (N, ceil(K / 2)): (Q[:, 2i] + 8) | (Q[:, 2i + 1] + 8) << 4."""
    u = F.pad(q.to(torch.int16) + 8, (0, q.shape[1] % 2), value=8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def nibbles_int4(nibbles: Tensor, K: int) -> Tensor:
    """The inverse of the nibble packing: uint8 (N, ceil(K / 2)) -> Q int8 (N, K)."""
    lo = (nibbles & 15).to(torch.int8) - 8
    hi = (nibbles >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).view(nibbles.shape[0], -1)[:, :K]


def dequantize_int4(q: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """scales (N, ceil(K / G)) and Q (N, K) -> the float32 weight (N, K), W = scale[n, k // G] Q[n, k]."""
    K = q.shape[1]
    return q.float() * scales.float().repeat_interleave(group_size, dim=1)[:, :K]


def check_int4_codes(nibbles, scales, K, group_size: int) -> Tuple[Tensor, Tensor]:
    """The int4 state-dict tensors checked: nibbles (N, ceil(K / 2)) uint8 with N >= 1, K >= 1, and
    scales (N, ceil(K / G)) fp32 on their device (ValueError naming the argument); returned
    detached and contiguous."""
    N = nibbles.shape[0] if isinstance(nibbles, Tensor) and nibbles.dim() == 2 else -1
    if (not isinstance(nibbles, Tensor) or nibbles.dtype != torch.uint8 or nibbles.dim() != 2 or N == 0
            or isinstance(K, bool) or not isinstance(K, int) or K < 1 or nibbles.shape[1] != -(-K // 2)):
        raise ValueError(f"`nibbles` must be uint8 of shape (N, ceil(K / 2)) with N >= 1 for K = {K}, got "
                         f"{_shape(nibbles) if isinstance(nibbles, Tensor) else type(nibbles).__name__}")
    ng = -(-K // group_size)
    if (not isinstance(scales, Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (N, ng)
            or scales.device != nibbles.device):
        raise ValueError(f"`scales` must be float32 of shape ({N}, {ng}) on {nibbles.device}, got "
                         f"{_shape(scales) if isinstance(scales, Tensor) else type(scales).__name__}")
    return nibbles.detach().contiguous(), scales.detach().contiguous()


def pack_int4_nibbles(nibbles: Tensor, scales: Tensor, K: int, group_size: int, *,
                      keep_source: bool = True) -> PackedWeight:
    """An int4 PackedWeight from nibbles (N, ceil(K / 2)) uint8 and scales (N, ceil(K / G)) fp32
    (a state dict's int4 tensors): the panel copies of both are made here; the originals are
    kept unless `keep_source=False`."""
    G = _check_group(group_size)
    nibbles, scales = check_int4_codes(nibbles, scales, K, G)
    N, ng = scales.shape
    if nibbles.device.type == "cuda":  # the kernel reads the row-major nibbles
        packed = nibbles
    else:
        np_ = -(-N // PANEL)
        with torch.no_grad():
            padded = nibbles.new_full((np_ * PANEL, nibbles.shape[1]), 0x88)  # pad rows: Q = 0
            padded[:N] = nibbles
            packed = padded.view(np_, PANEL, -1).transpose(1, 2).contiguous()
    np_ = -(-N // PANEL)
    gs = scales.new_zeros(np_ * PANEL, ng)
    gs[:N] = scales
    gs = gs.view(np_, PANEL, ng).transpose(1, 2).contiguous()
    return PackedWeight(packed, N, K, gs, G, source=(nibbles, scales) if keep_source else None)


def pack_int4(weight: Tensor, group_size: int = INT4_GROUP, *, keep_source: bool = True) -> PackedWeight:
    """`quantize_int4` then pack: an int4 weight-only PackedWeight of a float weight (the source
    kept is the nibbles and scales)."""
    q, scales = quantize_int4(weight, group_size)
    return pack_int4_nibbles(_int4_nibbles(q), scales, weight.shape[1], group_size, keep_source=keep_source)


def pack_int8(weight: Tensor, *, keep_source: bool = True) -> PackedWeight:
    """`quantize_int8` then `pack_weight`: an int8 weight-only PackedWeight of a float weight."""
    q, scales = quantize_int8(weight)
    return pack_weight(q, scales, keep_source=keep_source)


def int8_error_bound(x: Tensor, packed: PackedWeight) -> Tensor:
    """Per-element bound on |int8 result - x @ W^T| (W the unquantized weight), shape (M, N):
    |W - scale Q| <= scale / 2 elementwise, so the error is <= scale[n] / 2 * sum_k |x[m, k]|
    (fp32 rounding of the sums comes on top; it is ~1e-6 relative)."""
    if not packed.is_int8:
        raise ValueError("int8_error_bound needs an int8 PackedWeight")
    return x.float().abs().sum(-1, keepdim=True) * (packed.scales / 2)


def _int4_ref_weight(packed: Tensor, group_scales: Tensor, N: int, K: int, group_size: int) -> Tensor:
    """fp32 (N, K) weight of int4 nibbles and group scales in the kernel layouts."""
    nibbles = unpack_panels(packed, N, -(-K // 2))
    return dequantize_int4(nibbles_int4(nibbles, K), unpack_group_scales(group_scales, N), group_size)


def decode_gemm_ref(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None, *,
                    out: Optional[Tensor] = None) -> Tensor:
    """Plain-torch reference (fallback and test oracle): fp32 x @ W^T, cast to x's dtype.
    With `scales` (int8 W): W = scales[:, None] * Q, dequantized in fp32. int4: pass
    `packed.dequantized()` as `weight` (or see `_int4_torch_impl`)."""
    w = weight.float() if scales is None else weight.float() * scales.float()[:, None]
    result = F.linear(x.float(), w).to(x.dtype)
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
    if dtype == torch.float16:  # CUDA only: 3 more mantissa bits than bf16
        return 1e-2, 0.0
    raise ValueError(f"decode_gemm has no tolerance for {dtype}")


def _validate(x, packed, out) -> None:
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"`packed` must be a PackedWeight (from pack_weight), got {type(packed).__name__}")
    if packed.is_w8a8 or packed.is_w4a8:
        fmt = "w8a8" if packed.is_w8a8 else "w4a8"
        raise ValueError(f"`packed` is a {fmt} weight (pack_{fmt}): multiply it with ops.decode_gemm_{fmt}")
    check_rows(x, packed, out, "float32 or bfloat16 (float16 too on CUDA)",
               _CUDA_X_DTYPES if isinstance(x, Tensor) and x.device.type == "cuda" else _DTYPES)


def check_rows(x, packed: PackedWeight, out, what: str, dtypes) -> None:
    """x (..., K) of `dtypes` ("`x` must be <what> ...") on packed's device, and `out` (..., N)
    of x's dtype and device or None; TypeError / ValueError naming the argument otherwise."""
    if not isinstance(x, Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes or x.dim() == 0 or x.shape[-1] != packed.K:
        raise ValueError(f"`x` must be {what} of shape (..., K) with K = {packed.K}, got {_shape(x)}")
    if x.device != packed.device:
        raise ValueError(f"`x` must be on the device of `packed` ({packed.device}), got {_shape(x)}")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"`out` must be a torch.Tensor, got {type(out).__name__}")
        want = (*x.shape[:-1], packed.N)
        if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"`out` must be {str(x.dtype).replace('torch.', '')} of shape {want} "
                             f"on {x.device}, got {_shape(out)}")


def _run_int4(x2, packed, y2) -> None:
    args = (x2, packed.packed, packed.group_scales, y2)
    if _dispatch.plain_eager(*args):
        _run4(*args, packed.group_size)
        torch.autograd.graph.increment_version(y2)
    else:
        torch.ops.detailflow.decode_gemm_int4.default(*args[:3], packed.group_size, y2)


def _run4(x, packed, group_scales, y, group_size) -> None:
    _dispatch.pick("decode_gemm_int4", x, packed, group_scales, y, group_size).fn(
        x, packed, group_scales, y, group_size)


# The ops take the packed layout only: the torch entries unpack it (N from `out`, K from `x`),
# so a model need not keep its weights a second time for them.
@torch.library.custom_op("detailflow::decode_gemm_int4", mutates_args=("out",))
def _decode_gemm_int4_op(x: Tensor, packed: Tensor, group_scales: Tensor, group_size: int,
                         out: Tensor) -> None:
    _run4(x, packed, group_scales, out, group_size)


@_decode_gemm_int4_op.register_fake
def _decode_gemm_int4_fake(x, packed, group_scales, group_size, out) -> None:
    return None


def _run(x2, packed, scales, y2) -> None:
    _dispatch.pick("decode_gemm", x2, packed, scales, y2).fn(x2, packed, scales, y2)


@torch.library.custom_op("detailflow::decode_gemm", mutates_args=("out",))
def _decode_gemm_op(x: Tensor, packed: Tensor, scales: Optional[Tensor], out: Tensor) -> None:
    _run(x, packed, scales, out)


@_decode_gemm_op.register_fake
def _decode_gemm_fake(x, packed, scales, out) -> None:
    return None  # the result is written into `out`


def decode_gemm(x: Tensor, packed: PackedWeight, *, out: Optional[Tensor] = None) -> Tensor:
    """y = x @ W^T (a bias-free nn.Linear) with fp32 accumulation, for few rows of x.

    Args:
        x: (..., K) float32 or bfloat16, any strides; its rows (all leading dims together) are
            the M of the GEMM, fast for M <= 64 (use F.linear beyond the measured crossover).
        packed: `pack_weight(W)` of a (N, K) float32 or bfloat16 weight on x's device, or
            `pack_int8(W)` (int8 weight-only, per-row scales), or `pack_int4(W, group_size)`
            (int4 weight-only, group scales). On the CPU any mix of x and W dtypes works; bf16 x
            with bf16, int8 or int4 W uses the CPU's bf16 dot product (the int codes become
            exact bf16 in registers; x is not rounded), fp32 x exact fp32 multiplies. On CUDA the kernel
            takes W of x's dtype or int8 (other mixes run the torch reference); float16 x too.
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
    if packed.is_int4:
        _run_int4(x2, packed, y2)
    elif _dispatch.plain_eager(x2, packed.packed, packed.kernel_scales, y2):
        # The backend call of the op's body, minus the custom op's ~17 us Python layers (a
        # quarter of a whole 1024 x 1024 bf16 product at M = 2).
        _run(x2, packed.packed, packed.kernel_scales, y2)
        torch.autograd.graph.increment_version(y2)
    else:
        torch.ops.detailflow.decode_gemm.default(x2, packed.packed, packed.kernel_scales, y2)
    if not direct:
        out.copy_(y2.view(out.shape))
    return out


def matmul_rows(x: Tensor, packed: PackedWeight, out: Optional[Tensor], run: Callable[[Tensor, Tensor], None]) -> Tensor:
    """The body the activation-quantizing wrappers (decode_gemm_w8a8 / _w4a8) share: x (..., K) as
    (M, K) rows, `out` (..., N) made when None, `run(x2, y2)` writing the rows into y2 (a view of a
    contiguous `out`, else a buffer copied back). Arguments are checked by the caller."""
    N = packed.N
    x2 = x if x.dim() == 2 else x.reshape(-1, packed.K)
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out
    direct = out.is_contiguous()
    y2 = out.view(-1, N) if direct else torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    run(x2, y2)
    if not direct:
        out.copy_(y2.view(out.shape))
    return out


def grouped_cpu_impl(binding: str) -> Callable:
    """The CPU entry of an op over group-scaled nibble panels (decode_gemm_int4, decode_gemm_w4a8):
    both bindings take (x, M, K, ldx, dtype, packed, numel, group scales, group, N, y, ldy, threads)."""
    def impl(x, packed, group_scales, out, group_size) -> None:
        M, K = x.shape
        N = out.shape[1]
        x, ldx, dst, ldy = _fix_strides(x, out)
        getattr(_dispatch.extension(), binding)(
            x.data_ptr(), M, K, ldx, _dispatch.DTYPE_CODES[x.dtype], packed.data_ptr(), packed.numel(),
            group_scales.data_ptr(), group_size, N, dst.data_ptr(), ldy, _dispatch.num_threads())
        if dst is not out:
            out.copy_(dst)

    impl.__name__ = impl.__qualname__ = f"{binding}_cpu_impl"
    return impl


def _fix_strides(x, out):
    """x and a destination with a unit last stride and row stride >= the row length (what the
    kernels read/write); returns (x, ldx, dst, ldy)."""
    M, K = x.shape
    xs = x.stride()
    if xs[1] != 1 or (M > 1 and xs[0] < K):
        x = x.contiguous()
        xs = (K, 1)
    N = out.shape[1]
    ys = out.stride()
    dst = out
    if ys[1] != 1 or (M > 1 and ys[0] < N):
        dst = torch.empty((M, N), dtype=out.dtype, device=out.device)
        ys = (N, 1)
    return x, (xs[0] if M > 1 else K), dst, (ys[0] if M > 1 else N)


def _cpu_impl(x, packed, scales, out) -> None:
    M, K = x.shape
    N = out.shape[1]
    x, ldx, dst, ldy = _fix_strides(x, out)
    codes = _dispatch.DTYPE_CODES
    _dispatch.extension().decode_gemm(
        x.data_ptr(), M, K, ldx, codes[x.dtype], packed.data_ptr(), packed.numel(), codes[packed.dtype],
        scales.data_ptr() if scales is not None else 0, N, dst.data_ptr(), ldy, _dispatch.num_threads())
    if dst is not out:
        out.copy_(dst)


def _scales_ok(packed, scales, device) -> bool:
    """int8 W needs fp32 contiguous scales on the device (pack_weight checked the length); float W none."""
    if packed.dtype != torch.int8:
        return scales is None
    return (scales is not None and scales.dtype == torch.float32 and scales.is_contiguous()
            and scales.device == device)


def _cpu_applies(x, packed, scales, out) -> bool:
    return (_dispatch.has_cpu_kernels() and x.device.type == "cpu" and packed.device.type == "cpu"
            and x.dtype in _DTYPES and packed.dtype in _DTYPES + (torch.int8,) and packed.is_contiguous()
            and _scales_ok(packed, scales, x.device) and hasattr(_dispatch.extension(), "decode_gemm"))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cuda_splits(N: int, K: int, device: torch.device) -> int:
    """K splits so that N / 16 row blocks x splits cover ~2 blocks per SM; each split a whole
    number of 256-wide K tiles and none empty (= csrc decode_gemm_cuda_splits)."""
    blocks = -(-N // _CUDA_ROWS_PER_BLOCK)
    tiles = -(-K // _CUDA_KTILE)
    want = -(-2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) // blocks)
    splits = max(1, min(tiles, want))
    per = -(-tiles // splits)
    return -(-tiles // per)


def _cuda_impl(x, packed, scales, out) -> None:
    M, K = x.shape
    N = out.shape[1]
    dev = x.device
    x, ldx, dst, ldy = _fix_strides(x, out)
    splits = _cuda_splits(N, K, dev)
    # Scratch for the split-K partial sums, from torch's caching allocator (graph-capturable).
    scratch = torch.empty(splits * M * N, dtype=torch.float32, device=dev) if splits > 1 else None
    codes = _dispatch.DTYPE_CODES

    def call():
        _dispatch.extension().decode_gemm_cuda(
            x.data_ptr(), M, K, ldx, codes[x.dtype], packed.data_ptr(), codes[packed.dtype],
            scales.data_ptr() if scales is not None else 0, N, dst.data_ptr(), ldy,
            scratch.data_ptr() if scratch is not None else 0, scratch.numel() if scratch is not None else 0,
            splits, torch.cuda.current_stream(dev).cuda_stream)

    if dev.index is not None and dev.index != torch.cuda.current_device():
        with torch.cuda.device(dev):
            call()
    else:
        call()
    if dst is not out:
        out.copy_(dst)


def _cuda_applies(x, packed, scales, out) -> bool:
    if not (_dispatch.has_cuda_kernels() and hasattr(_dispatch.extension(), "decode_gemm_cuda")):
        return False
    dev = x.device
    return (dev.type == "cuda" and packed.device == dev and out.device == dev and x.dtype in _CUDA_X_DTYPES
            and packed.dim() == 2 and packed.is_contiguous()
            and (packed.dtype == x.dtype or packed.dtype == torch.int8) and _scales_ok(packed, scales, dev))


def _torch_impl(x, packed, scales, out) -> None:
    decode_gemm_ref(x, unpack_panels(packed, out.shape[1], x.shape[1]), scales, out=out)


def _int4_cpu_applies(x, packed, group_scales, out, group_size) -> bool:
    return (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "decode_gemm_int4")
            and x.device.type == "cpu" and x.dtype in _DTYPES and packed.device.type == "cpu"
            and packed.is_contiguous() and group_scales.is_contiguous() and group_scales.device.type == "cpu")


_int4_cpu_impl = grouped_cpu_impl("decode_gemm_int4")


def _int4_torch_impl(x, packed, group_scales, out, group_size) -> None:
    w = _int4_ref_weight(packed, group_scales, out.shape[1], x.shape[-1], group_size)
    out.copy_(F.linear(x.float(), w.to(x.device)).to(x.dtype))


def force_portable(on: bool) -> None:
    """Make the CPU kernels use their portable loops (True) or the best for this CPU (False,
    the default), process-wide; for tests and benchmarks of the fallback."""
    ext = _dispatch.extension()
    if ext is None or not hasattr(ext, "decode_gemm_force_portable"):
        raise RuntimeError("force_portable needs the _C extension with the decode_gemm CPU kernel")
    ext.decode_gemm_force_portable(bool(on))


def _int4_cuda_applies(x, packed, group_scales, out, group_size) -> bool:
    dev = x.device
    return (dev.type == "cuda" and _dispatch.has_cuda_kernels()
            and hasattr(_dispatch.extension(), "decode_gemm_int4_cuda") and x.dtype in _CUDA_X_DTYPES
            and packed.device == dev and group_scales.device == dev and out.device == dev
            and packed.is_contiguous() and group_scales.is_contiguous())


def _int4_cuda_impl(x, packed, group_scales, out, group_size) -> None:
    M, K = x.shape
    N = out.shape[1]
    x, ldx, dst, ldy = _fix_strides(x, out)
    with torch.cuda.device(x.device):
        _dispatch.extension().decode_gemm_int4_cuda(
            x.data_ptr(), M, K, ldx, _dispatch.DTYPE_CODES[x.dtype], packed.data_ptr(), group_scales.data_ptr(),
            group_size, N, dst.data_ptr(), ldy, torch.cuda.current_stream(x.device).cuda_stream)
    if dst is not out:
        out.copy_(dst)


_dispatch.register("decode_gemm_int4", "cuda", _int4_cuda_impl, applies=_int4_cuda_applies)
_dispatch.register("decode_gemm_int4", "cpu", _int4_cpu_impl, applies=_int4_cpu_applies)
_dispatch.register("decode_gemm_int4", "torch", _int4_torch_impl)
_dispatch.register("decode_gemm", "cuda", _cuda_impl, applies=_cuda_applies)
_dispatch.register("decode_gemm", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("decode_gemm", "torch", _torch_impl)


def _selfcheck(backend, reference, device) -> None:
    """Ragged shapes (a partial panel and row tile, odd K) in each weight format the backend takes."""
    g = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(5, 67, generator=g), torch.randn(37, 67, generator=g)
    cases = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.int8)]
    if device.type == "cuda":
        cases += [(torch.bfloat16, torch.int8), (torch.float16, torch.float16)]
    for x_dtype, w_dtype in cases:
        x = x32.to(device=device, dtype=x_dtype)
        try:
            p = pack_int8(w32.to(device)) if w_dtype == torch.int8 else pack_weight(w32.to(device=device, dtype=w_dtype))
        except ValueError:
            continue  # a format this device does not pack (fp16 on the CPU)
        args = (x, p.packed, p.kernel_scales)
        y, want = torch.empty(5, 37, dtype=x_dtype, device=device), torch.empty(5, 37, dtype=x_dtype, device=device)
        if not backend.applies(*args, y):
            continue
        backend.fn(*args, y)
        reference(*args, want)
        atol, rtol = tolerance(x_dtype)
        _dispatch.expect_close(f"decode_gemm x {x_dtype} W {w_dtype}", y, want, atol,
                               1e-4 if x_dtype == torch.float32 else 2e-2)


_dispatch.register_selfcheck("decode_gemm", _selfcheck)
