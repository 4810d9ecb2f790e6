"""Shared by the compiled-kernel tests: skip marks for the `_C` entry points a test needs."""
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
