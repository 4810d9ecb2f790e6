"""How the engine's OpenMP threads wait: spin briefly, then sleep (set before torch loads OpenMP).

On a shared machine a busy neighbour often holds one of the cores. Every parallel region of a
decode step ends at a barrier; with GNU OpenMP's default wait (spin about 300,000 rounds, ~0.3 ms,
before sleeping), the thread that finished first keeps its core busy spinning while its sibling
waits for a core, so each region costs a scheduler slice. That made generation 4.3-4.5x slower
beside a one-thread spin loop, not the 2x that losing a core explains (benchmarks/bench_neighbour.py).
A short spin keeps back-to-back regions hot when the machine is quiet and frees the core within
microseconds when it is not.

libgomp reads its settings once, when it is loaded (by `import torch`), so this must run first:
`detailflow_engine/__init__.py` calls `apply()` before anything imports torch. It only sets what
the user has not set (OMP_WAIT_POLICY / GOMP_SPINCOUNT win), and does nothing once torch is
loaded; `threading_policy.state()` says which case a process is in.
"""
from __future__ import annotations

import os
import sys

# libgomp spin rounds before a waiting thread sleeps; measured in benchmarks/README.md ("Beside a
# busy neighbour").
SPIN_COUNT = "1000"  # ~20 us of pause loops on Zen 4/5; libgomp default 300000 (~5 ms)
_APPLIED = False


def apply() -> None:
    global _APPLIED
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    _APPLIED = True


def state() -> str:
    """'engine' (our short spin is in force), 'user' (the environment set one) or 'torch-first'
    (torch was imported before detailflow_engine: libgomp's defaults)."""
    if _APPLIED:
        return "engine"
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return "user"
    return "torch-first"
