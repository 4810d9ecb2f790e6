"""Shared by the compiled-kernel tests: skip marks for the `_C` entry points a test needs, and checks."""
from __future__ import annotations

import pytest
import torch

from detailflow_engine.ops import _dispatch


def needs_cpu_kernel(entry: str):
    """Skips a test unless the extension was built with CPU kernels and has `_C.<entry>`."""
    return pytest.mark.skipif(not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), entry)),
                              reason=f"compiled extension (_C.{entry}) not available")


def gpu_kernel(entry: str):
    """A decorator: marks a test `gpu` and skips it unless a CUDA device and `_C.<entry>` exist."""
    present = (torch.cuda.is_available() and _dispatch.has_cuda_kernels()
               and hasattr(_dispatch.extension(), entry))
    skip = pytest.mark.skipif(not present, reason=f"CUDA device or _C.{entry} not available")
    return lambda fn: pytest.mark.gpu(skip(fn))


def variant_fixture(entry: str, force_portable):
    """A fixture running each test on this CPU's best loop ("best") and on the portable loop that
    `force_portable(True)` forces ("portable"; skipped without `_C.<entry>`), then restoring it."""
    @pytest.fixture(params=["best", "portable"])
    def variant(request):
        if request.param == "portable":
            if not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), entry)):
                pytest.skip(f"needs the _C extension (_C.{entry})")
            force_portable(True)
        yield request.param
        if request.param == "portable":
            force_portable(False)

    return variant


def check_variant_names(call, force_portable, best: str, flags_needed) -> None:
    """`call()` (a one-shot kernel entry returning its inner loop's name) says `best` on a CPU
    with every flag of `flags_needed` (/proc/cpuinfo), and "portable" once forced."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    if all(f" {flag}" in flags for flag in flags_needed):
        assert call() == best
    force_portable(True)
    try:
        assert call() == "portable"
    finally:
        force_portable(False)


def random_problem(M, N, K, x_dtype=torch.float32, seed=0):
    """x (M, K) in x_dtype and a float32 weight (N, K), Gaussian, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(x_dtype), torch.randn(N, K, generator=g)


def check_exact_call(op, x, packed, want, out=None):
    """y = op(x, packed, out=out) is `want` bit for bit (NaN where want is NaN), of x's dtype and
    shape (..., N), and is `out` when one is given; returns y. For the exact-integer decode GEMMs."""
    y = op(x, packed, out=out)
    if out is not None:
        assert y is out
    assert y.shape == (*x.shape[:-1], packed.N) and y.dtype == x.dtype
    assert torch.equal(y, want) or (torch.isnan(y) == torch.isnan(want)).all() and torch.equal(
        y.nan_to_num(), want.nan_to_num()), f"max diff {(y.float() - want.float()).abs().max().item():.3g}"
    return y
