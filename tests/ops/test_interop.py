"""DLPack interop: our ops take NumPy (CPU) and CuPy (GPU) arrays and answer in the same library."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from detailflow_engine.ops.cache_attention import cache_attention
from detailflow_engine.ops.code_search import code_search
from detailflow_engine.ops.group_sample import group_sample
from detailflow_engine.ops.interop import dlpack_interop, to_torch
from detailflow_engine.ops.vq_lookup import vq_lookup


def _vq_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (2, 5), generator=g)
    codebook = torch.randn(64, 8, generator=g)
    weight, bias, pos = torch.randn(16, 8, generator=g), torch.randn(16, generator=g), torch.randn(5, 16, generator=g)
    return [t.to(device) for t in (codes, codebook, weight, bias, pos)]


def test_numpy_in_numpy_out_equals_torch():
    codes, codebook, weight, bias, pos = _vq_inputs()
    want = vq_lookup(codes, codebook, weight, bias, pos)
    got = vq_lookup(*(t.numpy() for t in (codes, codebook, weight, bias, pos)))
    assert isinstance(got, np.ndarray) and got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got, want.numpy())

    lat = torch.randn(7, 8)
    idx = code_search(lat.numpy(), codebook.numpy())
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, code_search(lat, codebook).numpy())

    logits = torch.randn(4, 3, 50)
    seeds, positions = torch.tensor([1, 2]), torch.tensor([5, 6, 7])
    want_tok = group_sample(logits, seeds, positions, cfg_scale=1.5, top_k=10)
    got_tok = group_sample(logits.numpy(), seeds.numpy(), positions.numpy(), cfg_scale=1.5, top_k=10)
    np.testing.assert_array_equal(got_tok, want_tok.numpy())


def test_out_array_is_written_and_returned_itself():
    codes, codebook, weight, bias, pos = _vq_inputs()
    out = np.zeros((2, 5, 16), dtype=np.float32)
    res = vq_lookup(codes.numpy(), codebook.numpy(), weight.numpy(), bias.numpy(), pos.numpy(), out=out)
    assert res is out
    np.testing.assert_array_equal(out, vq_lookup(codes, codebook, weight, bias, pos).numpy())


def test_caches_given_as_numpy_are_updated_in_place():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1, 8, generator=g) for _ in range(3))
    kc, vc = np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 2, 4, 8), np.float32)
    out = cache_attention(q.numpy(), k.numpy(), v.numpy(), kc, vc, 2)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(kc[:, :, 2:3], k.numpy())
    np.testing.assert_array_equal(vc[:, :, 2:3], v.numpy())


def test_torch_callers_are_untouched_and_bad_objects_named():
    f = dlpack_interop(lambda x, y=None: (x, y))
    t = torch.ones(2)
    a, b = f(t, y=3)
    assert a is t and b == 3

    class NotAnArray:
        def __dlpack__(self, stream=None):
            raise BufferError("no")

    with pytest.raises(TypeError, match="NotAnArray"):
        to_torch(NotAnArray())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("cupy") is None,
                    reason="needs a CUDA GPU and CuPy")
def test_cupy_in_cupy_out_on_the_gpu():
    import cupy as cp

    codes, codebook, weight, bias, pos = _vq_inputs("cuda")
    want = vq_lookup(codes, codebook, weight, bias, pos)
    got = vq_lookup(*(cp.from_dlpack(t) for t in (codes, codebook, weight, bias, pos)))
    assert isinstance(got, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(got), want.cpu().numpy())
    logits = cp.random.standard_normal((4, 8, 100), dtype=cp.float32)
    tok = group_sample(logits, cp.asarray([1, 2], dtype=cp.int64), cp.arange(8, dtype=cp.int64), cfg_scale=2.0)
    assert isinstance(tok, cp.ndarray) and tok.shape == (2, 8)
    ref = group_sample(torch.from_dlpack(logits), torch.tensor([1, 2], device="cuda"),
                       torch.arange(8, device="cuda"), cfg_scale=2.0)
    np.testing.assert_array_equal(cp.asnumpy(tok), ref.cpu().numpy())
