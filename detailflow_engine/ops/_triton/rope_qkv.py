"""rope_qkv Triton kernel: split the fused qkv projection, rotate q and k, lay out (B, H, n, d).

For row (b, t) of qkv (B, n, 3*H*d), viewed as (3, H, d) = q | k | v, and pair i of a head:

    out[2i]   = x[2i] * cos[t, i] - x[2i+1] * sin[t, i]
    out[2i+1] = x[2i+1] * cos[t, i] + x[2i] * sin[t, i]          (q and k; v is copied)

in fp32 with one rounding to qkv's dtype at the end, and written to q/k/v[b, h, t, :] of three
contiguous (B, H, n, d) tensors: exactly detailflow_ref.gpt.apply_rotary(...).transpose(1, 2)
as prior.Attention does. fp contraction is off at launch (enable_fp_fusion=False) so each
product and the difference round separately, as torch's separate mul/sub kernels do.

Layout: qkv rows (b, t) at b*stride_b + t*stride_t, unit stride inside a row; freqs (n, d/2, 2)
fp32 [cos, sin] with strides given. Grid (B*n, cdiv(H, BLOCK_H)): a program loads BLOCK_H
heads' q, k and v of one row as contiguous [BLOCK_H, BLOCK_D] tiles (coalesced, vectorized),
splits the interleaved pairs with reshape+split, rotates, joins them back and stores the
three tiles (each head's d values contiguous in the output).

Tested by tests/ops/test_rope_qkv.py (interpreter on CPU, compiled with -m gpu);
benchmarked by `python benchmarks/bench_rope_qkv.py --device cuda --quick`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from detailflow_engine.ops._triton._common import cast_rtne

_TILE = 1024  # elements of one [BLOCK_H, BLOCK_D] tile: 8 per thread over 4 warps
_MIN_PROGRAMS = 264  # 2 per H200 SM: below that, smaller tiles buy parallelism for free


@triton.jit
def _rope_qkv_kernel(qkv_ptr, f_ptr, q_ptr, k_ptr, v_ptr,
                     stride_b, stride_t, stride_fn, stride_fp, stride_fc,
                     n, H, d,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row = b * n + t
    b = row // n
    t = row % n
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < H) & (cols[None, :] < d)
    src = qkv_ptr + b * stride_b + t * stride_t + heads[:, None] * d + cols[None, :]
    # (B, H, n, d) contiguous: element (b, h, t, j) at ((b*H + h)*n + t)*d + j
    dst = ((b * H + heads[:, None]) * n + t) * d + cols[None, :]

    pairs = tl.arange(0, BLOCK_D // 2)
    pmask = pairs < d // 2
    cos = tl.load(f_ptr + t * stride_fn + pairs * stride_fp, mask=pmask, other=0.0)[None, :]
    sin = tl.load(f_ptr + t * stride_fn + pairs * stride_fp + stride_fc, mask=pmask, other=0.0)[None, :]

    HD = H * d
    xq = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    xq0, xq1 = tl.split(tl.reshape(xq, [BLOCK_H, BLOCK_D // 2, 2]))
    oq = tl.reshape(tl.join(xq0 * cos - xq1 * sin, xq1 * cos + xq0 * sin), [BLOCK_H, BLOCK_D])
    tl.store(q_ptr + dst, cast_rtne(oq, q_ptr.dtype.element_ty), mask=mask)

    xk = tl.load(src + HD, mask=mask, other=0.0).to(tl.float32)
    xk0, xk1 = tl.split(tl.reshape(xk, [BLOCK_H, BLOCK_D // 2, 2]))
    ok = tl.reshape(tl.join(xk0 * cos - xk1 * sin, xk1 * cos + xk0 * sin), [BLOCK_H, BLOCK_D])
    tl.store(k_ptr + dst, cast_rtne(ok, k_ptr.dtype.element_ty), mask=mask)

    xv = tl.load(src + 2 * HD, mask=mask, other=0.0)
    tl.store(v_ptr + dst, xv, mask=mask)


def launch_config(rows: int, n_head: int, head_dim: int) -> Tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps). BLOCK_D = next_pow2(d); BLOCK_H the most heads whose tile
    fits _TILE, halved while the grid has fewer than _MIN_PROGRAMS programs (small decode steps
    get more, smaller programs; the latency of one is the same). Worked example, GPT-L
    (H 16, d 64): rows 2 -> (1, 64, 1): 32 programs; rows 512 -> (16, 64, 4): 512 programs."""
    block_d = triton.next_power_of_2(max(head_dim, 2))
    block_h = max(1, min(triton.next_power_of_2(n_head), _TILE // block_d))
    while block_h > 1 and rows * triton.cdiv(n_head, block_h) < _MIN_PROGRAMS:
        block_h //= 2
    num_warps = max(1, min(4, block_h * block_d // 256))
    return block_h, block_d, num_warps


def rope_qkv_fwd(qkv: torch.Tensor, freqs: torch.Tensor, n_head: int, *, block_h: Optional[int] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch on qkv's device (current stream). qkv (B, n, 3*H*d), freqs (n, d/2, 2) fp32
    (validated by the wrapper, ops/rope_qkv.py). Returns q, k, v: new contiguous (B, H, n, d)
    tensors in qkv's dtype. `block_h` (a power of two) overrides the heuristic's heads per
    program: the tests use it to cover partial head tiles in few programs."""
    B, n, width = qkv.shape
    d = width // (3 * n_head)
    q, k, v = (torch.empty((B, n_head, n, d), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    if q.numel() == 0:
        return q, k, v
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    heads, block_d, num_warps = launch_config(B * n, n_head, d)
    if block_h is None:
        block_h = heads
    elif block_h < 1 or block_h & (block_h - 1):
        raise ValueError(f"block_h must be a power of two, got {block_h}")
    else:
        num_warps = max(1, min(4, block_h * block_d // 256))
    grid = (B * n, triton.cdiv(n_head, block_h))
    _rope_qkv_kernel[grid](
        qkv, freqs, q, k, v, qkv.stride(0), qkv.stride(1), freqs.stride(0), freqs.stride(1), freqs.stride(2),
        n, n_head, d, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps, enable_fp_fusion=False)
    return q, k, v
