"""code_search: nearest L2-normalized codeword for each L2-normalized latent (VQ encode).

The official VectorQuantizer (DESIGN.md section 6) normalizes the latents z = quant_conv(h) and
the codebook, forms d = |z|^2 + |e|^2 - 2 z.e for every (latent, codeword) pair and takes
torch.argmin (lowest index on ties). This op returns the same indices without materializing the
N x K distance matrix: the CPU kernel blocks over K and keeps a running minimum per row.

Backends (see `_dispatch`): CUDA `_C` (csrc/cuda/code_search.cu: codebook tiles in shared memory,
split over K with a packed (distance, index) atomicMin; same formula and rounding steps as the
CPU kernel; fp32, bf16 and fp16; D <= 64), CPU `_C` (csrc/cpu/code_search.cpp; fp32 and bf16),
then the torch reference `code_search_ref` (the official composition), which is also the test
oracle.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.interop import dlpack_interop

__all__ = ["code_search", "code_search_ref", "code_distances_ref", "tolerance"]

_DTYPES = (torch.float32, torch.bfloat16)  # CPU (kernel and accepted inputs)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CUDA_MAX_D = 64  # csrc/include/code_search_cuda.h kCodeSearchMaxD
_EPS = 1e-12  # F.normalize's default, as in the official VectorQuantizer


def code_distances_ref(latents: Tensor, codebook: Tensor, *, codebook_normalized: bool = False) -> Tensor:
    """The official distances in fp32: (..., K) = |z|^2 + |e|^2 - 2 z @ e.T, z and e L2-normalized
    (e as given when codebook_normalized). The test oracle's tie rule compares these."""
    z = F.normalize(latents.float().reshape(-1, latents.shape[-1]), p=2.0, dim=-1, eps=_EPS)
    e = codebook.float() if codebook_normalized else F.normalize(codebook.float(), p=2.0, dim=-1, eps=_EPS)
    d = torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * (z @ e.t())
    return d.reshape(*latents.shape[:-1], codebook.shape[0])


def code_search_ref(latents: Tensor, codebook: Tensor, *, codebook_normalized: bool = False) -> Tensor:
    """Plain-torch reference (fallback and test oracle): argmin of `code_distances_ref`."""
    return torch.argmin(code_distances_ref(latents, codebook, codebook_normalized=codebook_normalized), dim=-1)


# (atol, rtol) for this index-valued op: an index is correct when it equals the reference's
# or when the two indices' reference distances (`code_distances_ref`, fp32 for every input
# dtype) differ by at most atol + rtol * |d_ref|.
tolerance = _dispatch.tolerance_table("code_search", {d: (1e-6, 0.0) for d in _CUDA_DTYPES})


def _allowed(t: Tensor) -> Tuple[Tuple[torch.dtype, ...], str]:
    """Float dtypes accepted for a tensor on t's device, and their names for messages."""
    return _dispatch.dtypes_for(t, _DTYPES, _CUDA_DTYPES)


def _validate(latents, codebook, codebook_normalized) -> None:
    for name, t in (("latents", latents), ("codebook", codebook)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    dtypes, words = _allowed(codebook)
    if codebook.dtype not in dtypes or codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"`codebook` must be {words} of shape (K, D), K, D >= 1, got {_dispatch.describe(codebook)}")
    D = codebook.shape[1]
    dtypes, words = _allowed(latents)
    if latents.dtype not in dtypes or latents.dim() not in (2, 3) or latents.shape[-1] != D:
        raise ValueError(f"`latents` must be {words} of shape (N, D) or (B, T, D) with "
                         f"D = {D} (from `codebook`), got {_dispatch.describe(latents)}")
    if latents.device != codebook.device:
        raise ValueError(f"`codebook` must be on the device of `latents` ({latents.device}), got {_dispatch.describe(codebook)}")
    if not isinstance(codebook_normalized, bool):
        raise TypeError(f"`codebook_normalized` must be a bool, got {type(codebook_normalized).__name__}")


def _run(latents: Tensor, codebook: Tensor, codebook_normalized: bool) -> Tensor:
    out = torch.empty((latents.shape[0],), dtype=torch.int64, device=latents.device)
    if out.numel() > 0:
        _dispatch.pick("code_search", latents, codebook, out).fn(latents, codebook, codebook_normalized, out)
    return out


@torch.library.custom_op("detailflow::code_search", mutates_args=())
def _code_search_op(latents: Tensor, codebook: Tensor, codebook_normalized: bool) -> Tensor:
    return _run(latents, codebook, codebook_normalized)


@_code_search_op.register_fake
def _code_search_fake(latents, codebook, codebook_normalized) -> Tensor:
    return latents.new_empty((latents.shape[0],), dtype=torch.int64)


@dlpack_interop
def code_search(latents: Tensor, codebook: Tensor, *, codebook_normalized: bool = False) -> Tensor:
    """Index of the nearest L2-normalized codeword for each L2-normalized latent.

    Args:
        latents: (N, D) or (B, T, D) float32 or bfloat16, or float16 on CUDA (e.g. quant_conv's
            output); any strides.
        codebook: (K, D) float32 or bfloat16, or float16 on CUDA (the VQ embedding weight, e.g.
            8192 x 8), on the device of `latents`.
        codebook_normalized: the codebook rows already have unit L2 norm; skip normalizing them.

    Returns:
        int64 (N,) or (B, T): argmin_k |z|^2 + |e_k|^2 - 2 z.e_k with z = latent / max(|latent|,
        1e-12) and e_k likewise, computed in fp32; ties go to the lowest index (torch.argmin).
    """
    _validate(latents, codebook, codebook_normalized)
    flat = latents.reshape(-1, latents.shape[-1])
    if _dispatch.plain_eager(flat, codebook):
        idx = _run(flat, codebook, codebook_normalized)
    else:
        idx = torch.ops.detailflow.code_search.default(flat, codebook, codebook_normalized)
    return idx.reshape(latents.shape[:-1])


def _launch(kernel, latents, codebook, codebook_normalized, out, last_arg) -> None:
    """Both compiled backends take the same arguments; `last_arg` is the CPU kernel's thread
    count or the CUDA kernel's stream."""
    latents, codebook = _dispatch.unit_last(latents), _dispatch.unit_last(codebook)
    dt = _dispatch.DTYPE_CODES
    kernel(latents.data_ptr(), (latents.stride(0), 1), latents.shape[0], latents.shape[1], dt[latents.dtype],
           codebook.data_ptr(), (codebook.stride(0), 1), codebook.shape[0], dt[codebook.dtype],
           codebook_normalized, out.data_ptr(), last_arg)


def _cpu_impl(latents, codebook, codebook_normalized, out) -> None:
    _launch(_dispatch.extension().code_search, latents, codebook, codebook_normalized, out, _dispatch.num_threads())


def _cpu_applies(latents, codebook, out) -> bool:
    return (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "code_search")
            and latents.device.type == "cpu" and codebook.device.type == "cpu"
            and latents.dtype in _DTYPES and codebook.dtype in _DTYPES)


def _torch_impl(latents, codebook, codebook_normalized, out) -> None:
    out.copy_(code_search_ref(latents, codebook, codebook_normalized=codebook_normalized))


def _cuda_impl(latents, codebook, codebook_normalized, out) -> None:
    with _dispatch.on_device(out.device):
        _launch(_dispatch.extension().code_search_cuda, latents, codebook, codebook_normalized, out,
                torch.cuda.current_stream(out.device).cuda_stream)


def _cuda_applies(latents, codebook, out) -> bool:
    return (_dispatch.has_cuda_kernels() and hasattr(_dispatch.extension(), "code_search_cuda")
            and latents.device.type == "cuda"
            and codebook.device == latents.device and out.device == latents.device
            and latents.dtype in _CUDA_DTYPES and codebook.dtype in _CUDA_DTYPES
            and codebook.shape[1] <= _CUDA_MAX_D and codebook.shape[0] < 2**31)


_dispatch.register("code_search", "cuda", _cuda_impl, applies=_cuda_applies)
_dispatch.register("code_search", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("code_search", "torch", _torch_impl)


def _selfcheck(backend, reference, device) -> None:
    """Nearest normalized codeword for 37 latents over 300 codes: indices equal, or tied within eps."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(37, 8, generator=g).to(device)
    codebook = torch.randn(300, 8, generator=g).to(device)
    out = torch.empty(37, dtype=torch.int64, device=device)
    want = torch.empty_like(out)
    if not backend.applies(latents, codebook, out):
        return
    backend.fn(latents, codebook, False, out)
    reference(latents, codebook, False, want)
    if not torch.equal(out, want):
        e = torch.nn.functional.normalize(codebook, dim=1)
        z = torch.nn.functional.normalize(latents, dim=1)
        sim = (z * e[out]).sum(1), (z * e[want]).sum(1)
        if not bool(((sim[0] - sim[1]).abs() <= 1e-5).all()):
            raise AssertionError(f"code_search: indices {out.tolist()} != reference {want.tolist()}")


_dispatch.register_selfcheck("code_search", _selfcheck)
