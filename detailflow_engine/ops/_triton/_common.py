"""Small @triton.jit helpers shared by the kernels of this package."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 -> `dtype`, rounding to nearest-even exactly as torch's .to() does.

    For bf16 the rounding is done on the bits (add 0x7FFF plus the lowest kept bit, clear the
    low half; NaN passed through) before the cast, so the cast itself is exact. On the GPU
    that equals cvt.rn.bf16.f32; it is here because the interpreter (TRITON_INTERPRET=1, our
    CPU tests) truncates fp32 -> bf16 instead of rounding. Two integer ops a value: free in a
    memory-bound kernel. fp16 and fp32 casts round correctly on both and go straight through.
    """
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
    return x.to(dtype)
