"""vq_lookup: codes -> decoder input tokens (gather + L2-normalize + post_quant_conv + position).

The tokenizer's decode front end (DESIGN.md section 6): the official code takes the rows of the
L2-normalized codebook for the codes (`get_codebook_entry`), applies `post_quant_conv` (Linear
D -> C with bias) and the decoder then adds `latent_pos_embed[:, :t]`. This op does all of it in
one pass over the output: out[b, t] = weight @ normalize(codebook[codes[b, t]]) + bias + pos[t].
The codebook is passed RAW; normalizing the gathered rows is part of the op.

Backends (see `_dispatch`): CUDA `_C` (csrc/cuda/vq_lookup.cu; fp32, bf16 and fp16), CPU `_C`
(csrc/cpu/vq_lookup.cpp; fp32 and bf16), then the torch reference `vq_lookup_ref`, which is also
the test oracle. Codes are range-checked here, except while a CUDA graph is being captured (the
check reads device memory back); the CUDA kernel never reads a bad code's row and writes NaN for
it instead.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.interop import dlpack_interop

__all__ = ["vq_lookup", "vq_lookup_ref", "tolerance"]

_DTYPES = (torch.float32, torch.bfloat16)  # CPU (kernel and accepted inputs)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_MAX_D = 12288  # csrc/include/vq_lookup_cuda.h kVqLookupMaxD
_EPS = 1e-12  # F.normalize's default, as in the official VectorQuantizer


def _pos2d(pos_embed: Optional[Tensor]) -> Optional[Tensor]:
    """(1, T_max, C) (the official latent_pos_embed parameter) -> (T_max, C); 2-D passes through."""
    if pos_embed is not None and pos_embed.dim() == 3:
        return pos_embed[0]
    return pos_embed


def vq_lookup_ref(codes: Tensor, codebook: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  pos_embed: Optional[Tensor] = None, *, out: Optional[Tensor] = None,
                  upcast: bool = True) -> Tensor:
    """Plain-torch reference (fallback and test oracle).

    upcast=True: everything in fp32, rounded once to weight.dtype (what the kernel computes).
    upcast=False: the natural torch composition at the weight's precision,
    F.linear(F.normalize(codebook[codes]), weight, bias) + pos_embed[:T] (the "torch_lowp" of
    STYLE practice 5, and the benchmark's baseline).
    """
    T = codes.shape[-1]
    pos = _pos2d(pos_embed)
    if upcast:
        x = F.normalize(codebook[codes].float(), p=2.0, dim=-1, eps=_EPS)
        y = F.linear(x, weight.float(), None if bias is None else bias.float())
        if pos is not None:
            y = y + pos[:T].float()
        y = y.to(weight.dtype)
    else:
        x = F.normalize(codebook[codes], p=2.0, dim=-1, eps=_EPS).to(weight.dtype)
        y = F.linear(x, weight, bias)
        if pos is not None:
            y = y + pos[:T]
    return _dispatch.into(out, y)


# (atol, rtol) of the STYLE practice-5 rule for this op, by output (weight) dtype:
# max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol + rtol * max|ref32|.
tolerance = _dispatch.tolerance_table("vq_lookup", {
    torch.float32: (1e-5, 1e-6), torch.bfloat16: (5e-2, 0.0), torch.float16: (1e-2, 0.0)})


def _allowed(t: Tensor) -> Tuple[Tuple[torch.dtype, ...], str]:
    """Float dtypes accepted for a tensor on t's device, and their names for messages."""
    return _dispatch.dtypes_for(t, _DTYPES, _CUDA_DTYPES)


def _validate(codes, codebook, weight, bias, pos_embed, out) -> None:
    named = [("codes", codes), ("codebook", codebook), ("weight", weight)]
    named += [(n, t) for n, t in (("bias", bias), ("pos_embed", pos_embed), ("out", out)) if t is not None]
    for name, t in named:
        if not isinstance(t, Tensor):
            optional = " or None" if name in ("bias", "pos_embed", "out") else ""
            raise TypeError(f"`{name}` must be a torch.Tensor{optional}, got {type(t).__name__}")
    if codes.dtype != torch.int64 or codes.dim() != 2:
        raise ValueError(f"`codes` must be int64 of shape (B, T), got {_dispatch.describe(codes)}")
    dtypes, words = _allowed(codebook)
    if codebook.dtype not in dtypes or codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"`codebook` must be {words} of shape (K, D), K, D >= 1, got {_dispatch.describe(codebook)}")
    K, D = codebook.shape
    dtypes, words = _allowed(weight)
    if weight.dtype not in dtypes or weight.dim() != 2 or weight.shape[1] != D or weight.shape[0] < 1:
        raise ValueError(f"`weight` must be {words} of shape (C, D) with D = {D} "
                         f"(from `codebook`), got {_dispatch.describe(weight)}")
    C = weight.shape[0]
    B, T = codes.shape
    if bias is not None and (bias.dtype != weight.dtype or tuple(bias.shape) != (C,)):
        raise ValueError(f"`bias` must be {weight.dtype} of shape (C,) = ({C},) (dtype and C from "
                         f"`weight`), or None, got {_dispatch.describe(bias)}")
    if pos_embed is not None:
        ok = pos_embed.dim() == 2 or (pos_embed.dim() == 3 and pos_embed.shape[0] == 1)
        if not ok or pos_embed.shape[-1] != C or pos_embed.shape[-2] < T or pos_embed.dtype != weight.dtype:
            raise ValueError(f"`pos_embed` must be {weight.dtype} of shape (T_max, C) or (1, T_max, C) "
                             f"with T_max >= T = {T} and C = {C}, or None, got {_dispatch.describe(pos_embed)}")
    if out is not None and (tuple(out.shape) != (B, T, C) or out.dtype != weight.dtype):
        raise ValueError(f"`out` must be {weight.dtype} of shape (B, T, C) = {(B, T, C)}, got {_dispatch.describe(out)}")
    for name, t in named[1:]:
        if t.device != codes.device:
            raise ValueError(f"`{name}` must be on the device of `codes` ({codes.device}), got {_dispatch.describe(t)}")
    # The range check reads device values back: not while torch.compile traces or a CUDA graph is
    # captured (the CUDA kernel then writes NaN rows for bad codes instead of reading them).
    capturing = codes.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if codes.numel() > 0 and not torch.compiler.is_compiling() and not capturing:
        lo, hi = torch.aminmax(codes)
        if int(lo) < 0 or int(hi) >= K:
            b, t = ((codes < 0) | (codes >= K)).nonzero()[0].tolist()
            raise ValueError(f"`codes` values must be in [0, K) = [0, {K}), got {int(codes[b, t])} at ({b}, {t})")


def _run(codes, codebook, weight, bias, pos_embed, out) -> None:
    _dispatch.pick("vq_lookup", codes, codebook, weight, bias, pos_embed, out).fn(
        codes, codebook, weight, bias, pos_embed, out)


@torch.library.custom_op("detailflow::vq_lookup", mutates_args=("out",))
def _vq_lookup_op(codes: Tensor, codebook: Tensor, weight: Tensor, bias: Optional[Tensor],
                  pos_embed: Optional[Tensor], out: Tensor) -> None:
    _run(codes, codebook, weight, bias, pos_embed, out)


@_vq_lookup_op.register_fake
def _vq_lookup_fake(codes, codebook, weight, bias, pos_embed, out) -> None:
    return None  # the result is written into `out`


@dlpack_interop
def vq_lookup(codes: Tensor, codebook: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
              pos_embed: Optional[Tensor] = None, *, out: Optional[Tensor] = None) -> Tensor:
    """Decoder input tokens for codes: weight @ normalize(codebook[codes]) + bias + pos_embed[t].

    Args:
        codes: (B, T) int64, values in [0, K) (checked: a bad value raises ValueError naming it;
            not checked while a CUDA graph is being captured, where a bad code gives a NaN row).
        codebook: (K, D) float32 or bfloat16 (or float16 on CUDA), RAW (each gathered row is divided by
            max(||row||, 1e-12) inside the op, as F.normalize does).
        weight: (C, D) float32 or bfloat16 (or float16 on CUDA) (post_quant_conv.weight); sets
            the output dtype. All tensors on one device.
        bias: (C,) in weight's dtype (post_quant_conv.bias), or None.
        pos_embed: (T_max, C) or (1, T_max, C) in weight's dtype with T_max >= T
            (the decoder's latent_pos_embed); position t adds pos_embed[t]. Or None.
        out: optional (B, T, C) tensor of weight's dtype to write into (any strides).

    Returns:
        (B, T, C) in weight's dtype, accumulated in fp32 and rounded once. `out` if given.
    """
    _validate(codes, codebook, weight, bias, pos_embed, out)
    B, T = codes.shape
    if out is None:
        out = torch.empty((B, T, weight.shape[0]), dtype=weight.dtype, device=codes.device)
    args = (codes, codebook, weight, bias, _pos2d(pos_embed), out)
    if _dispatch.plain_eager(*args):
        _run(*args)
    else:
        torch.ops.detailflow.vq_lookup.default(*args)
    return out


def _strides2(t: Optional[Tensor]) -> Tuple[int, int]:
    return (t.stride(0), 1) if t is not None else (0, 1)


def _launch(kernel, codes, codebook, weight, bias, pos_embed, out, last_arg) -> None:
    """Both compiled backends take the same arguments; `last_arg` is the CPU kernel's thread
    count or the CUDA kernel's stream."""
    unit_last = _dispatch.unit_last
    codes, codebook, weight = unit_last(codes), unit_last(codebook), unit_last(weight)
    bias = bias.contiguous() if bias is not None else None
    pos = unit_last(pos_embed) if pos_embed is not None else None
    dst = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    B, T = codes.shape
    K, D = codebook.shape
    dt = _dispatch.DTYPE_CODES
    kernel(codes.data_ptr(), _strides2(codes), B, T,
           codebook.data_ptr(), _strides2(codebook), K, D, dt[codebook.dtype],
           weight.data_ptr(), _strides2(weight), weight.shape[0],
           bias.data_ptr() if bias is not None else 0,
           pos.data_ptr() if pos is not None else 0, _strides2(pos), pos.shape[0] if pos is not None else 0,
           dst.data_ptr(), dt[weight.dtype], last_arg)
    if dst is not out:
        out.copy_(dst)


def _cpu_impl(codes, codebook, weight, bias, pos_embed, out) -> None:
    if out.numel() > 0:
        _launch(_dispatch.extension().vq_lookup, codes, codebook, weight, bias, pos_embed, out,
                _dispatch.num_threads())


def _cpu_applies(codes, codebook, weight, bias, pos_embed, out) -> bool:
    return (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "vq_lookup")
            and all(t.device.type == "cpu" for t in (codes, codebook, weight, out))
            and codebook.dtype in _DTYPES and weight.dtype in _DTYPES)


def _torch_impl(codes, codebook, weight, bias, pos_embed, out) -> None:
    vq_lookup_ref(codes, codebook, weight, bias, pos_embed, out=out)


def _cuda_impl(codes, codebook, weight, bias, pos_embed, out) -> None:
    if out.numel() > 0:
        with _dispatch.on_device(out.device):
            _launch(_dispatch.extension().vq_lookup_cuda, codes, codebook, weight, bias, pos_embed, out,
                    torch.cuda.current_stream(out.device).cuda_stream)


def _cuda_applies(codes, codebook, weight, bias, pos_embed, out) -> bool:
    tensors = [t for t in (codes, codebook, weight, bias, pos_embed, out) if t is not None]
    return (_dispatch.has_cuda_kernels() and hasattr(_dispatch.extension(), "vq_lookup_cuda")
            and codes.device.type == "cuda" and all(t.device == codes.device for t in tensors)
            and codebook.dtype in _CUDA_DTYPES and weight.dtype in _CUDA_DTYPES
            and codebook.shape[1] <= _CUDA_MAX_D)


_dispatch.register("vq_lookup", "cuda", _cuda_impl, applies=_cuda_applies)
_dispatch.register("vq_lookup", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("vq_lookup", "torch", _torch_impl)


def _selfcheck(backend, reference, device) -> None:
    """Gather + normalize + projection + bias + positions, an odd width, each float dtype."""
    g = torch.Generator().manual_seed(0)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    codes = torch.tensor([[0, 5, 99, 17], [3, 3, 1, 98]], dtype=torch.int64, device=device)
    for dtype in dtypes:
        codebook = torch.randn(100, 8, generator=g).to(device=device, dtype=dtype)
        weight = torch.randn(37, 8, generator=g).to(device=device, dtype=dtype)
        bias = torch.randn(37, generator=g).to(device=device, dtype=dtype)
        pos = torch.randn(4, 37, generator=g).to(device=device, dtype=dtype)
        out = torch.empty(2, 4, 37, dtype=dtype, device=device)
        want = torch.empty_like(out)
        if not backend.applies(codes, codebook, weight, bias, pos, out):
            continue
        backend.fn(codes, codebook, weight, bias, pos, out)
        reference(codes, codebook, weight, bias, pos, want)
        atol, _ = tolerance(dtype)
        _dispatch.expect_close(f"vq_lookup {dtype}", out, want, atol, 1e-4 if dtype == torch.float32 else 2e-2)


_dispatch.register_selfcheck("vq_lookup", _selfcheck)
