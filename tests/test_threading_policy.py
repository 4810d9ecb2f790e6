"""The engine's OpenMP wait policy is set before torch loads libgomp, and never over the user's."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, sys\n"
         "{first}\n"
         "import detailflow_engine\n"
         "from detailflow_engine import threading_policy\n"
         "print(threading_policy.state(), os.environ.get('GOMP_SPINCOUNT'))\n")


def _probe(first: str = "", **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    clean.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env=clean, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_engine_first_sets_a_short_spin():
    from detailflow_engine.threading_policy import SPIN_COUNT

    assert _probe() == f"engine {SPIN_COUNT}"


def test_user_setting_wins():
    assert _probe(GOMP_SPINCOUNT="123") == "user 123"
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "user None"


def test_torch_first_is_left_alone():
    """libgomp already read its environment: changing it now would only mislead."""
    assert _probe("import torch") == "torch-first None"
