"""Shared test fixtures: where the golden fixtures live, and small helpers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/fixtures relative to the repository, overridable for other layouts.
FIXTURES = Path(os.environ.get("DETAILFLOW_FIXTURES", REPO.parent / "shared" / "fixtures"))


def _fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"golden fixtures not found at {path} (set DETAILFLOW_FIXTURES to their folder)")
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
