"""Our ops on any DLPack array: CuPy on the GPU (and NumPy on the CPU) in, the same library out.

`dlpack_interop(fn)` wraps an op's public function: every argument that is not a torch.Tensor but
has `__dlpack__` becomes a zero-copy torch view (torch.from_dlpack, which also orders the
producer's stream before torch's current one), the op runs as usual, and tensor results are
handed back zero-copy in the caller's library (`cupy.from_dlpack` / `numpy.from_dlpack`). An
`out=` array passed in is returned itself, so writes land in the caller's buffer. Torch callers
pay one isinstance check per argument.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional

import torch

__all__ = ["dlpack_interop", "to_torch"]


def to_torch(x: Any) -> Any:
    """A torch view of a DLPack array; tensors and everything else pass through."""
    if isinstance(x, torch.Tensor) or not hasattr(x, "__dlpack__"):
        return x
    try:
        return torch.from_dlpack(x)
    except (RuntimeError, TypeError, BufferError, AttributeError) as exc:
        raise TypeError(f"cannot view a {type(x).__module__}.{type(x).__name__} as a torch tensor through "
                        f"DLPack ({exc}); pass a torch.Tensor, a CuPy or a NumPy array") from exc


def _library_of(x: Any):
    return importlib.import_module(type(x).__module__.split(".")[0])


def _back(result: Any, library, originals: dict) -> Any:
    if isinstance(result, torch.Tensor):
        original = originals.get(result.data_ptr(), None)
        if original is not None and tuple(original.shape) == tuple(result.shape):
            return original
        return library.from_dlpack(result.detach())
    if isinstance(result, tuple):
        return tuple(_back(r, library, originals) for r in result)
    if isinstance(result, list):
        return [_back(r, library, originals) for r in result]
    return result


def dlpack_interop(fn: Callable) -> Callable:
    """Let `fn` take DLPack arrays (CuPy, NumPy) and return results in the caller's library."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        library: Optional[Any] = None
        originals = {}

        def convert(x):
            nonlocal library
            if isinstance(x, torch.Tensor) or not hasattr(x, "__dlpack__"):
                return x
            t = to_torch(x)
            if library is None:
                library = _library_of(x)
            if t.numel():
                originals[t.data_ptr()] = x
            return t

        args = tuple(convert(a) for a in args)
        kwargs = {k: convert(v) for k, v in kwargs.items()}
        result = fn(*args, **kwargs)
        return result if library is None else _back(result, library, originals)

    return wrapper
