"""Shared by the Triton kernel tests: pick the interpreter before triton is first imported.

The Triton kernels run under the interpreter on CPU tensors here, and compiled on CUDA in the
`gpu` tests. The interpreter must be chosen before triton is imported (triton jits its own library
functions at import), so importing this module sets TRITON_INTERPRET=1 when it still can; if
something imported triton earlier, `rerun_interpreter_tests` runs a test file's interpreter tests
in a subprocess instead.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if "triton" not in sys.modules and not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton.language as tl
except ImportError:
    tl = None
HAVE_TRITON = tl is not None
INTERPRET = HAVE_TRITON and type(tl.sum).__name__ == "InterpretedFunction"

if not HAVE_TRITON:
    _WHY_NO_INTERP = "triton is not installed (pip install triton)"
elif CUDA:
    _WHY_NO_INTERP = "a CUDA device is present: the compiled kernel is tested by the gpu tests"
else:
    _WHY_NO_INTERP = ("triton was imported (without TRITON_INTERPRET=1) before this module: "
                      "test_interpreter_in_subprocess runs these")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason=_WHY_NO_INTERP)
needs_cuda_triton = pytest.mark.skipif(
    not (CUDA and HAVE_TRITON and not INTERPRET),
    reason="needs a CUDA device and triton (compiled, TRITON_INTERPRET unset)")
# The interpreter tests need a fresh process only when triton was imported before TRITON_INTERPRET=1
# could be set here; the test files define their subprocess rerun only then (no skip otherwise).
# The float dtypes the Triton kernels take, and their test ids.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
NEEDS_SUBPROCESS = HAVE_TRITON and not INTERPRET and not CUDA


def rerun_interpreter_tests(test_file: str) -> None:
    """Run `test_file`'s interpreter tests in a fresh process with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-m", "not gpu", "-p", "no:cacheprovider",
                           "-k", "interpreter and not subprocess"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-6000:] + proc.stderr[-3000:]
