"""cache_attention: append a decode step's K/V to a static cache, then attend its queries to it.

One step of the prior's attention with a static KV cache (DESIGN.md section 3): the step's
n_q positions (1 during the causal prefix, one whole group of g = 8 afterwards) are written
into the cache at `start_pos`, and each query attends to all L = start_pos + n_q cached
positions. No mask is needed: with group-causal attention the queries of a step see every
earlier position and every position of their own step.

Backends (see `_dispatch`): CUDA `_C` (csrc/cuda/cache_attention.cu; float32, bfloat16 and
float16, d <= 256), CPU `_C` (csrc/cpu/cache_attention.cpp; float32 and bfloat16), then the torch
reference `cache_attention_ref`, which is also the test oracle.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.interop import dlpack_interop

__all__ = ["cache_attention", "cache_attention_ref", "tolerance"]

_DTYPES = (torch.float32, torch.bfloat16)  # any device (the CPU kernel's dtypes)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # CUDA tensors
_CUDA_MAX_HEAD_DIM = 256


def cache_attention_ref(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                        start_pos: int, *, scale: Optional[float] = None,
                        out: Optional[Tensor] = None) -> Tensor:
    """Plain-torch reference (fallback and test oracle): the cache write, then fp32 attention."""
    n_q, d = q.shape[-2], q.shape[-1]
    end = start_pos + n_q
    k_cache[:, :, start_pos:end].copy_(k_new)
    v_cache[:, :, start_pos:end].copy_(v_new)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    scores = torch.matmul(q.float(), k_cache[:, :, :end].float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    return _dispatch.into(out, torch.matmul(probs, v_cache[:, :, :end].float()).to(q.dtype))


# (atol, rtol) of the STYLE practice-5 rule for this op:
# max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol + rtol * max|ref32|.
tolerance = _dispatch.tolerance_table("cache_attention", {
    torch.float32: (1e-5, 1e-6), torch.bfloat16: (5e-2, 0.0), torch.float16: (1e-2, 0.0)})


def _validate(q, k_new, v_new, k_cache, v_cache, start_pos, scale, out) -> Tuple[int, float]:
    named = (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache))
    for name, t in named + ((("out", out),) if out is not None else ()):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must be 4-D, got {_dispatch.describe(t)}")
    if q.dtype not in _DTYPES and not (q.device.type == "cuda" and q.dtype in _CUDA_DTYPES):
        allowed = "float32, bfloat16 or float16" if q.device.type == "cuda" else "float32 or bfloat16"
        raise ValueError(f"`q` must be {allowed} of shape (B, H, n_q, d), got {_dispatch.describe(q)}")
    B, H, n_q, d = q.shape
    for name, t in named[1:3] + ((("out", out),) if out is not None else ()):
        if tuple(t.shape) != (B, H, n_q, d):
            raise ValueError(f"`{name}` must have the shape of `q` {(B, H, n_q, d)}, got {_dispatch.describe(t)}")
    L_max = k_cache.shape[2]
    for name, t in named[3:]:
        if (t.shape[0], t.shape[1], t.shape[3]) != (B, H, d) or t.shape[2] != L_max:
            raise ValueError(f"`{name}` must be (B, H, L_max, d) = {(B, H, L_max, d)} "
                             f"(B, H, d from `q`, L_max from `k_cache`), got {_dispatch.describe(t)}")
        if not t.is_contiguous():
            raise ValueError(f"`{name}` must be contiguous, got strides {t.stride()} for {_dispatch.describe(t)}")
    for name, t in named[1:] + ((("out", out),) if out is not None else ()):
        if t.dtype != q.dtype:
            raise ValueError(f"`{name}` must have the dtype of `q` ({q.dtype}), got {_dispatch.describe(t)}")
        if t.device != q.device:
            raise ValueError(f"`{name}` must be on the device of `q` ({q.device}), got {_dispatch.describe(t)}")
    start_pos = _dispatch.as_index("start_pos", start_pos)
    if start_pos < 0:
        raise ValueError(f"`start_pos` must be >= 0, got {start_pos}")
    if start_pos + n_q > L_max:
        raise ValueError(f"`start_pos` + n_q must be <= L_max (the cache length), "
                         f"got start_pos={start_pos} + n_q={n_q} > L_max={L_max}")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise TypeError(f"`scale` must be a finite float or None, got {scale!r}")
    return start_pos, float(scale)


def _run(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale) -> None:
    _dispatch.pick("cache_attention", q, k_new, v_new, k_cache, v_cache, out).fn(
        q, k_new, v_new, k_cache, v_cache, out, start_pos, scale)


@torch.library.custom_op("detailflow::cache_attention", mutates_args=("k_cache", "v_cache", "out"))
def _cache_attention_op(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                        out: Tensor, start_pos: int, scale: float) -> None:
    _run(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale)


@_cache_attention_op.register_fake
def _cache_attention_fake(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale) -> None:
    return None  # all results are written in place (caches and out)


@dlpack_interop
def cache_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                    start_pos: int, *, scale: Optional[float] = None,
                    out: Optional[Tensor] = None) -> Tensor:
    """Write a step's keys/values into a static KV cache, then attend the step's queries to it.

    Args:
        q, k_new, v_new: (B, H, n_q, d) float32 or bfloat16 (or float16 on CUDA), rotary
            already applied. Any strides
            (e.g. slices of a fused qkv projection after transpose); a unit last stride avoids a copy.
        k_cache, v_cache: contiguous (B, H, L_max, d), same dtype/device as `q`. Mutated:
            positions [start_pos, start_pos + n_q) receive k_new / v_new.
        start_pos: int, first cache position of this step; start_pos + n_q <= L_max.
        scale: softmax scale, default 1 / sqrt(d).
        out: optional (B, H, n_q, d) tensor of q's dtype to write the result into.

    Returns:
        (B, H, n_q, d) tensor in q's dtype: softmax(q k^T * scale) v over the first
        L = start_pos + n_q cache positions (no mask), computed in fp32. `out` if given.
    """
    start_pos, scale = _validate(q, k_new, v_new, k_cache, v_cache, start_pos, scale, out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if _dispatch.plain_eager(q, k_new, v_new, k_cache, v_cache, out):
        # Same backend call as the op's body, minus the ~17 us the mutating custom_op spends in
        # its Python autograd/ADInplaceOrView layers (more than the whole step at B=2, L=8).
        _run(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale)
        torch.autograd.graph.increment_version((k_cache, v_cache, out))
    else:
        torch.ops.detailflow.cache_attention.default(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale)
    return out


def _unit_last_args(q, k_new, v_new, out):
    """The kernels' inputs with unit last strides, and where they write (`out` or a scratch)."""
    q, k_new, v_new = (_dispatch.unit_last(t) for t in (q, k_new, v_new))
    dst = out if _dispatch.has_unit_last(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    return q, k_new, v_new, dst


def _strides(t: Tensor) -> Tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], 1


def _cpu_impl(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale) -> None:
    if q.numel() == 0:
        return
    q, k_new, v_new, dst = _unit_last_args(q, k_new, v_new, out)
    B, H, n_q, d = q.shape
    _dispatch.extension().cache_attention(
        q.data_ptr(), _strides(q), k_new.data_ptr(), _strides(k_new), v_new.data_ptr(), _strides(v_new),
        k_cache.data_ptr(), v_cache.data_ptr(), dst.data_ptr(), _strides(dst),
        B, H, n_q, d, k_cache.shape[2], start_pos, scale, _dispatch.DTYPE_CODES[q.dtype],
        _dispatch.num_threads())
    if dst is not out:
        out.copy_(dst)


def _cpu_applies(q, k_new, v_new, k_cache, v_cache, out) -> bool:
    return (_dispatch.has_cpu_kernels() and q.device.type == "cpu" and q.dtype in _DTYPES
            and hasattr(_dispatch.extension(), "cache_attention"))


def _torch_impl(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale) -> None:
    cache_attention_ref(q, k_new, v_new, k_cache, v_cache, start_pos, scale=scale, out=out)


_dispatch.register("cache_attention", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("cache_attention", "torch", _torch_impl)


# CUDA: flash-decoding. Each head's L keys are split into ceil(L / 64) ranges, one block each,
# and a second kernel combines the partials in split order. The split count depends on L only,
# never on the batch: a split changes the summation order, so a count chosen from B * H (to fill
# the SMs, as flash-decoding usually does) would give a row other bits at another batch size.
# DetailFlow-16 (L <= 129): 1 split for the first 64 keys, 2 up to 128, 3 for the last group.
# Below 64 keys per split the combine launch costs more than the shorter key loop saves.
# Untuned (no GPU when written): revisit _KEYS_PER_SPLIT with the H200 benchmark.
_KEYS_PER_SPLIT = 64
_MAX_SPLITS = 64


def _num_splits(L: int) -> int:
    return max(1, min(-(-L // _KEYS_PER_SPLIT), _MAX_SPLITS))


def _cuda_impl(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale, num_splits=None) -> None:
    """num_splits: None = the heuristic above; tests force 1 or more to cover both kernels."""
    if q.numel() == 0:
        return
    q, k_new, v_new, dst = _unit_last_args(q, k_new, v_new, out)
    B, H, n_q, d = q.shape
    L = start_pos + n_q
    dev = q.device
    if num_splits is None:
        num_splits = _num_splits(L)
    ext = _dispatch.extension()
    # the launched split count: same rounding as cache_attention_splits() in cache_attention_cuda.h
    ext_splits = max(1, min(int(num_splits), L))
    ext_splits = -(-L // -(-L // ext_splits))
    scratch = None
    if ext_splits > 1:
        # fp32 partial outputs + (max, sum) per (split, b, h, row); a torch allocation on this
        # stream, so it is graph-capturable (the graph's pool keeps it)
        scratch = torch.empty(ext_splits * B * H * n_q * (d + 2), dtype=torch.float32, device=dev)

    def launch():
        ext.cache_attention_cuda(
            q.data_ptr(), _strides(q), k_new.data_ptr(), _strides(k_new), v_new.data_ptr(), _strides(v_new),
            k_cache.data_ptr(), v_cache.data_ptr(), dst.data_ptr(), _strides(dst),
            B, H, n_q, d, k_cache.shape[2], start_pos, scale, _dispatch.DTYPE_CODES[q.dtype],
            ext_splits, scratch.data_ptr() if scratch is not None else 0,
            scratch.numel() if scratch is not None else 0, torch.cuda.current_stream(dev).cuda_stream)

    with _dispatch.on_device(dev):
        launch()
    if dst is not out:
        out.copy_(dst)


def _cuda_applies(q, k_new, v_new, k_cache, v_cache, out) -> bool:
    if not (_dispatch.has_cuda_kernels() and hasattr(_dispatch.extension(), "cache_attention_cuda")):
        return False
    tensors = (q, k_new, v_new, k_cache, v_cache, out)
    return (q.device.type == "cuda" and all(t.device == q.device for t in tensors)
            and q.dtype in _CUDA_DTYPES and all(t.dtype == q.dtype for t in tensors)
            and q.shape[-1] <= _CUDA_MAX_HEAD_DIM)


_dispatch.register("cache_attention", "cuda", _cuda_impl, applies=_cuda_applies)


def _selfcheck(backend, reference, device) -> None:
    """A group step (8 queries) deep into a 40-slot cache: head dim 64 in each dtype, an odd 40 in fp32."""
    g = torch.Generator().manual_seed(0)
    for dtype in _CUDA_DTYPES if device.type == "cuda" else _DTYPES:
        for d in (64, 40) if dtype == torch.float32 else (64,):
            q, k_new, v_new = (torch.randn(1, 2, 8, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
            cache = torch.randn(1, 2, 40, d, generator=g).to(device=device, dtype=dtype)
            out, want = torch.empty_like(q), torch.empty_like(q)
            kc, vc, kr, vr = cache.clone(), cache.clone(), cache.clone(), cache.clone()
            if not backend.applies(q, k_new, v_new, kc, vc, out):
                continue
            backend.fn(q, k_new, v_new, kc, vc, out, 29, 1.0 / math.sqrt(d))
            reference(q, k_new, v_new, kr, vr, want, 29, 1.0 / math.sqrt(d))
            if not (torch.equal(kc, kr) and torch.equal(vc, vr)):
                raise AssertionError(f"cache_attention {dtype} d={d}: the cache write differs")
            atol, _ = tolerance(dtype)
            _dispatch.expect_close(f"cache_attention {dtype} d={d}", out, want, atol, 1e-4)


_dispatch.register_selfcheck("cache_attention", _selfcheck)
