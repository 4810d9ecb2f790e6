"""The Python API takes labels, seeds and settings as a user would pass them, or names the problem."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detailflow_engine import DetailFlowPipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return DetailFlowPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def three(pipe):
    return pipe.generate([3], seed=5)


@pytest.mark.parametrize("labels", [np.int64(3), torch.tensor(3), torch.tensor([3]), np.array([3]),
                                    (x for x in [3]), range(3, 4)],
                         ids=["np.int64", "0-d tensor", "tensor", "array", "generator", "range"])
def test_label_forms(pipe, three, labels):
    out = pipe.generate(labels, seed=5)
    assert out.labels == [3] and torch.equal(out.tokens, three.tokens) and np.array_equal(out.uint8, three.uint8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_labels=["3"]), r"class label '3' is a str"),
    (dict(class_labels="3"), r"class_labels must be ints, got the string"),
    (dict(class_labels=[3.0]), r"class label 3.0 is a float"),
    (dict(class_labels=[True]), r"class label True is a bool"),
    (dict(class_labels=[[1, 2]]), r"class label \[1, 2\] is a list"),
    (dict(seed="12"), r"seed must be an int or a sequence of ints .* got '12'"),
    (dict(seed=1.5), r"seed must be an int .* got 1.5"),
    (dict(seed=[1.5]), r"got 1.5 in \[1.5\]"),
    (dict(seed=2 ** 64 - 5), r"must fit in int64"),
    (dict(seed=[2 ** 63]), r"does not fit in int64"),
    (dict(seed=None), r"seed must be an int"),
    (dict(cfg_scale=None), r"cfg_scale must be a number, got None"),
    (dict(cfg_scale=float("inf")), r"cfg_scale must be finite"),
    (dict(temperature=float("nan")), r"temperature must be finite"),
    (dict(top_p="0.9"), r"top_p must be a number"),
    (dict(gradual_cfg="no"), r"gradual_cfg must be a bool, got 'no'"),
    (dict(gradual_cfg=1), r"gradual_cfg must be a bool"),
])
def test_bad_values_are_named(pipe, kwargs, match):
    args = dict(class_labels=[1], seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe.generate(**args)


def test_large_batches_run_in_passes(pipe, monkeypatch):
    """A call larger than one pass's memory runs in passes, with the same images (batch invariance)."""
    labels, seeds = [1, 4, 7, 2, 9, 0, 5], list(range(100, 107))
    whole = pipe.generate(labels, seed=seeds)
    monkeypatch.setattr(DetailFlowPipeline, "images_per_pass", lambda self, use_cfg=True: 3)
    passes = pipe.generate(labels, seed=seeds)
    assert torch.equal(passes.tokens, whole.tokens) and torch.equal(passes.pixels, whole.pixels)
    with pytest.raises(ValueError, match=r"7 images do not fit in one pass here \(3 do"):
        pipe.generate(labels, seed=seeds, callback=lambda *a: None)


def test_oversized_result_is_refused_with_its_size(pipe):
    n = pipe.images_per_pass(False) * pipe._cache_bytes(False) // (3 * 32 * 32 * 4) + 1
    with pytest.raises(ValueError, match=rf"{n} images of 32 px need .* GB of float32 pixels"):
        pipe.generate(range(n), seed=0)  # refused before anything runs


def test_mistyped_local_path_is_not_a_repo_id(tmp_path, monkeypatch):
    """'runs/prior' looks like owner/name; with a local folder runs/ it is a mistyped path."""
    from detailflow_engine.hub import HubError, resolve_model_path

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the cache answers at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    (tmp_path / "runs").mkdir()
    with pytest.raises(HubError, match=r"runs/prior does not exist .* mistyped local path"):
        resolve_model_path("runs/prior")
