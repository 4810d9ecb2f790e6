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
    (dict(cfg_scale=float("inf")), r"cfg_scale must be a finite number"),
    (dict(temperature=float("nan")), r"temperature must be a finite number"),
    (dict(top_p="0.9"), r"top_p must be a number"),
    (dict(gradual_cfg="no"), r"gradual_cfg must be a bool, got 'no'"),
    (dict(gradual_cfg=1), r"gradual_cfg must be a bool"),
    # the list of raw errors a new user met, each now named
    (dict(seed="a"), r"seed must be an int or a sequence of ints .* got 'a'"),
    (dict(cfg_scale=-1), r"cfg_scale must be a finite number >= 0, got -1"),
    (dict(top_k=2.0), r"top_k must be an int >= 0"),
    (dict(top_k=2 ** 63), r"top_k must be an int >= 0"),
    (dict(top_p=0), r"top_p must be a number in \(0, 1\], got 0"),
    (dict(num_tokens="8"), r"num_tokens must be None or an int >= 1, got '8'"),
    (dict(num_tokens=0), r"num_tokens must be None or an int >= 1, got 0"),
    (dict(num_tokens=5), r"num_tokens=5 is not a step boundary"),
    (dict(class_labels=[]), r"class_labels is empty"),
    (dict(class_labels=[10]), r"class label 10 is outside \[0, 10\)"),
])
def test_bad_values_are_named(pipe, kwargs, match):
    args = dict(class_labels=[1], seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe.generate(**args)
    with pytest.raises(ValueError, match=match):  # generate_tokens checks the same way
        pipe.generate_tokens(**args)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(seed=1.5), "seed"), (dict(seed=2 ** 64 - 5), "seed"), (dict(cfg_scale=None), "cfg_scale"),
    (dict(class_labels=["3"]), "class_labels"), (dict(top_p=2), "top_p"), (dict(num_tokens=-1), "num_tokens"),
])
def test_errors_carry_the_argument_name(pipe, kwargs, argument):
    """SettingsError.argument is what the serving app and the CLIs name (a field, a flag)."""
    from detailflow_engine.sampling_settings import SettingsError

    args = dict(class_labels=[1], seed=0)
    args.update(kwargs)
    with pytest.raises(SettingsError) as e:
        pipe.generate(**args)
    assert e.value.argument == argument


def test_settings_are_normalized_and_hashable():
    from detailflow_engine.sampling_settings import SamplingSettings

    a = SamplingSettings(cfg_scale=np.float32(2), top_k=np.int64(5), gradual_cfg=np.bool_(True), num_tokens=8)
    b = SamplingSettings(2.0, 1, 5, 1, True, 8)
    assert a == b and hash(a) == hash(b) and type(a.cfg_scale) is float and type(a.top_k) is int
    assert type(a.gradual_cfg) is bool and type(b.temperature) is float and b.use_cfg
    assert not SamplingSettings(cfg_scale=1).use_cfg
    with pytest.raises(AttributeError):
        a.cfg_scale = 3.0  # frozen: a batcher key cannot change under it
    assert a.kwargs() == dict(cfg_scale=2.0, temperature=1.0, top_k=5, top_p=1.0, gradual_cfg=True, num_tokens=8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(device="tpu"), r"device must be one of \['auto', 'cpu', 'cuda'\] or 'cuda:N', got 'tpu'"),
    (dict(device="meta"), r"device must be one of .* got 'meta'"),
    (dict(device="cuda:x"), r"device must be one of .* got 'cuda:x'"),
    (dict(device=5), r"device must be one of .* got 5"),
    (dict(dtype="fp16"), r"dtype must be one of \['fp32', 'bf16'\], got 'fp16'"),
    (dict(dtype="float32"), r"dtype must be one of \['fp32', 'bf16'\], got 'float32'"),
    (dict(dtype=torch.float16), r"dtype must be one of \['fp32', 'bf16'\] .* got torch.float16"),
    (dict(weights="int3"), r"weights must be one of \['native', 'int8', 'int4', 'w8a8', 'w4a8'\], got 'int3'"),
])
def test_bad_device_dtype_weights_are_named_before_loading(kwargs, match, monkeypatch):
    """Refused before any model path is resolved (a Hub download) or loaded."""
    import detailflow_engine.hub as hub

    monkeypatch.setattr(hub, "resolve_model_path", lambda p: pytest.fail("resolved a path before the checks"))
    with pytest.raises(ValueError, match=match):
        DetailFlowPipeline.from_pretrained("owner/prior", "owner/tokenizer", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_named():
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        DetailFlowPipeline.from_pretrained(device="cuda")


def test_device_and_dtype_spellings_are_one_set():
    """Every CLI's --device/--dtype choices are the API's spellings (device_dtype), and fp16 is a
    storage format of convert only; the API also takes torch dtypes and cuda:N."""
    from detailflow_engine import evaluate, generate, profile, reconstruct, serve
    from detailflow_engine.convert import build_parser as convert_parser
    from detailflow_engine.device_dtype import DEVICES, DTYPES, STORAGE_DTYPES, resolve_device, resolve_dtype

    for tool in (generate, reconstruct, profile, evaluate, serve):
        actions = {a.dest: a for a in tool.build_parser()._actions}
        assert tuple(actions["device"].choices) == DEVICES, tool.__name__
        assert list(actions["dtype"].choices) == list(DTYPES), tool.__name__
    convert_dtype = next(a for a in convert_parser()._actions if a.dest == "dtype")
    assert sorted(convert_dtype.choices) == sorted(STORAGE_DTYPES) and set(DTYPES) < set(STORAGE_DTYPES)
    assert [resolve_dtype(n) for n in DTYPES] == [torch.float32, torch.bfloat16] == list(DTYPES.values())
    assert resolve_dtype(None) == resolve_dtype(torch.float32) == torch.float32
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


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


def test_settings_and_spellings_are_bottom_layer():
    """sampling_settings and device_dtype stand on torch alone: no engine runtime, no reference."""
    import json
    import subprocess
    import sys

    code = ("import sys, json, detailflow_engine; before = set(sys.modules); "
            "import detailflow_engine.sampling_settings, detailflow_engine.device_dtype; "
            "print(json.dumps(sorted(m for m in set(sys.modules) - before if m.startswith('detailflow'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == ["detailflow_engine.device_dtype", "detailflow_engine.sampling_settings"]
