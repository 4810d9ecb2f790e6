"""rope_qkv: split the prior's fused qkv projection, rotate q and k, lay out (B, H, n, d).

prior.Attention turns the wqkv Linear output (B, n, 3*H*d) into attention inputs with a view,
an unbind, two apply_rotary calls (float, reshape, 4 muls, 2 subs/adds, stack, cast) and
transposes: a dozen small launches a layer on the GPU. This op does it in one pass:

    q, k, v = qkv.view(B, n, 3, H, d).unbind(2)
    q = apply_rotary(q, freqs).transpose(1, 2)   # (B, H, n, d), rotated in fp32, rounded once
    k = apply_rotary(k, freqs).transpose(1, 2)
    v = v.transpose(1, 2)

with apply_rotary = detailflow_engine.rotary.apply_rotary (interleaved pairs (x[2i], x[2i+1]),
freqs (n, d/2, 2) of [cos, sin]); all three outputs contiguous.

Backends (see `_dispatch`): Triton (CUDA tensors, triton importable: ops/_triton/rope_qkv.py);
on the CPU the plain torch composition (at decode sizes it is a few small memory-bound tensors
a layer, nothing a separate kernel would win back); then the torch reference `rope_qkv_ref`,
which is also the test oracle.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.rotary import apply_rotary

__all__ = ["rope_qkv", "rope_qkv_ref", "tolerance"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rope_qkv_ref(qkv: Tensor, freqs: Tensor, n_head: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Plain-torch reference (fallback and test oracle): prior.Attention's own composition."""
    B, n, width = qkv.shape
    q, k, v = qkv.reshape(B, n, 3, n_head, width // (3 * n_head)).unbind(2)
    freqs = freqs.contiguous()  # apply_rotary views it
    return (apply_rotary(q, freqs).transpose(1, 2), apply_rotary(k, freqs).transpose(1, 2),
            v.transpose(1, 2))


# (atol, rtol) of the STYLE practice-5 rule:
# max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol + rtol * max|ref32|.
# (The kernel does the reference's fp32 operations in the same order with one final rounding,
# so it matches `rope_qkv_ref` bit for bit; the tests check that too.)
tolerance = _dispatch.tolerance_table("rope_qkv", {
    torch.float32: (1e-5, 1e-6), torch.bfloat16: (5e-2, 0.0), torch.float16: (1e-2, 0.0)})


def _validate(qkv, freqs, n_head) -> Tuple[int, int]:
    """-> (n_head, head_dim)."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"`qkv` must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3 or qkv.dtype not in _DTYPES:
        raise ValueError(f"`qkv` must be float32, bfloat16 or float16 of shape (B, n, 3*H*d), "
                         f"got {_dispatch.describe(qkv)}")
    n_head = _dispatch.as_index("n_head", n_head)
    if n_head < 1:
        raise ValueError(f"`n_head` must be >= 1, got {n_head}")
    B, n, width = qkv.shape
    if width == 0 or width % (3 * n_head) or (width // (3 * n_head)) % 2:
        raise ValueError(f"`qkv`'s last dim must be 3 * n_head * head_dim with an even head_dim >= 2 "
                         f"(n_head={n_head}), got {_dispatch.describe(qkv)}")
    d = width // (3 * n_head)
    if not isinstance(freqs, Tensor):
        raise TypeError(f"`freqs` must be a torch.Tensor, got {type(freqs).__name__}")
    if tuple(freqs.shape) != (n, d // 2, 2) or freqs.dtype != torch.float32:
        raise ValueError(f"`freqs` must be float32 of shape (n, head_dim/2, 2) = {(n, d // 2, 2)} "
                         f"(rows start:start+n of the prior's freqs_cis), got {_dispatch.describe(freqs)}")
    if freqs.device != qkv.device:
        raise ValueError(f"`freqs` must be on the device of `qkv` ({qkv.device}), got {_dispatch.describe(freqs)}")
    return n_head, d


def _run(qkv: Tensor, freqs: Tensor, n_head: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _dispatch.pick("rope_qkv", qkv, freqs).fn(qkv, freqs, n_head)


@torch.library.custom_op("detailflow::rope_qkv", mutates_args=())
def _rope_qkv_op(qkv: Tensor, freqs: Tensor, n_head: int) -> Tuple[Tensor, Tensor, Tensor]:
    return _run(qkv, freqs, n_head)


@_rope_qkv_op.register_fake
def _rope_qkv_fake(qkv, freqs, n_head):
    B, n, width = qkv.shape
    shape = (B, n_head, n, width // (3 * n_head))
    return tuple(qkv.new_empty(shape) for _ in range(3))


def rope_qkv(qkv: Tensor, freqs: Tensor, n_head: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Rotary q and k, and v, from the fused qkv projection, each (B, H, n, d) contiguous.

    Args:
        qkv: (B, n, 3*H*d) float32, bfloat16 or float16: the wqkv Linear output of the step's
            n positions, [q | k | v] each laid out (H, d). Any strides (a unit last stride
            avoids a copy on the Triton path).
        freqs: (n, d/2, 2) float32 [cos, sin] rows of the step's positions
            (prior.freqs_cis[start:start + n]), same device.
        n_head: H.

    Returns:
        q, k, v: new contiguous (B, H, n, d) tensors in qkv's dtype; q and k rotated in fp32
        as detailflow_engine.rotary.apply_rotary (bit-identical to `rope_qkv_ref`).
    """
    n_head, _ = _validate(qkv, freqs, n_head)
    if _dispatch.plain_eager(qkv, freqs):
        return _run(qkv, freqs, n_head)
    q, k, v = torch.ops.detailflow.rope_qkv.default(qkv, freqs, n_head)
    return q, k, v


def _torch_impl(qkv, freqs, n_head):
    q, k, v = rope_qkv_ref(qkv, freqs, n_head)
    # fresh contiguous outputs: v is a view of qkv (contiguous already when B = n = 1)
    return q.contiguous(), k.contiguous(), v.clone(memory_format=torch.contiguous_format)


def _triton_applies(qkv, freqs) -> bool:
    return qkv.is_cuda and qkv.dtype in _DTYPES and _dispatch.triton_kernels("rope_qkv") is not None


def _triton_impl(qkv, freqs, n_head):
    with _dispatch.on_device(qkv.device):
        return _dispatch.triton_kernels("rope_qkv").rope_qkv_fwd(qkv, freqs, n_head)


_dispatch.register("rope_qkv", "triton", _triton_impl, applies=_triton_applies)
_dispatch.register("rope_qkv", "cpu", _torch_impl, applies=lambda qkv, freqs: qkv.device.type == "cpu")
_dispatch.register("rope_qkv", "torch", _torch_impl)


def _selfcheck(backend, reference, device) -> None:
    """Rotary + head split of a fused QKV projection: 2 rows x 3 positions, 4 heads of 64."""
    g = torch.Generator().manual_seed(0)
    freqs = torch.randn(3, 32, 2, generator=g).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(2, 3, 3 * 256, generator=g).to(device=device, dtype=dtype)
        if not backend.applies(qkv, freqs):
            continue
        got, want = backend.fn(qkv, freqs, 4), reference(qkv, freqs, 4)
        atol, _ = tolerance(dtype)
        for name, a, b in zip("qkv", got, want):
            _dispatch.expect_close(f"rope_qkv {dtype} {name}", a, b, atol, 1e-4 if dtype == torch.float32 else 2e-2)


_dispatch.register_selfcheck("rope_qkv", _selfcheck)
