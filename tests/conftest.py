"""Shared test fixtures: where the golden fixtures live, and small helpers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The golden fixtures live in the repository (tests/fixtures/<name>, each with its README.json);
# $DETAILFLOW_FIXTURES points the tests at another copy.
FIXTURES = Path(os.environ.get("DETAILFLOW_FIXTURES") or REPO / "tests" / "fixtures")


def _fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "README.json").is_file():  # part of the repository: missing is an error, not a skip
        where = "$DETAILFLOW_FIXTURES" if os.environ.get("DETAILFLOW_FIXTURES") else "the repository"
        pytest.fail(f"golden fixture {name!r} not found at {path} (from {where}; the repository's copy is "
                    f"tests/fixtures/{name})", pytrace=False)
    return path


@pytest.fixture(scope="session")
def tiny_a() -> Path:
    """The tiny-a fixture folder (official-format checkpoints + golden.npz)."""
    return _fixture_dir("tiny-a")


@pytest.fixture(scope="session")
def golden(tiny_a):
    """Golden arrays produced by the official implementation (see tiny-a/README.json)."""
    readme = json.loads((tiny_a / "README.json").read_text())
    if readme.get("fixture") != "tiny-a" or not readme.get("reference_commit", "").startswith("c5f06cd"):
        pytest.fail(f"unexpected fixture header in {tiny_a / 'README.json'}: "
                    f"{readme.get('fixture')!r} @ {readme.get('reference_commit')!r}")
    with np.load(tiny_a / "golden.npz") as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="session")
def meta16() -> Path:
    """Configs, key lists and schedule of the released DetailFlow-16 models."""
    return _fixture_dir("detailflow16-meta")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one torch thread beats two on a shared 2-core machine (modules opt in)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- helpers for several test files

def copy_model(src: Path, dst: Path) -> Path:
    """Writable copy of a fixture model folder (the fixtures themselves are read-only)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return dst


def in_thread(fn, limit_s: float = 30.0):
    """fn() in a daemon thread -> (result or exception, seconds); a hang fails the test, never the run."""
    import threading
    import time

    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["value"] = e

    t0 = time.perf_counter()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"still waiting after {limit_s} s: a deadlock"
    return box["value"], time.perf_counter() - t0


def tiny_a_pipeline(tiny_a: Path, device: str, **kwargs):
    """The tiny-a fixture model as a DetailFlowPipeline on `device`."""
    from detailflow_engine import DetailFlowPipeline

    return DetailFlowPipeline.from_pretrained(tiny_a / "prior", tiny_a / "tokenizer", device=device, **kwargs)


def max_abs_err(a, b) -> float:
    """max |a - b| in float64; tensors (any device) or array-likes."""
    a = a.detach().cpu().double().numpy() if hasattr(a, "detach") else np.asarray(a, dtype=np.float64)
    return float(np.abs(a - np.asarray(b, dtype=np.float64)).max())
