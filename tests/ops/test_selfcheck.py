"""Self-check at first use (ops/_dispatch): a compiled backend proves itself once per device
against the torch reference; one that raises or returns wrong numbers is bypassed with one
warning, and a correct one keeps serving."""
from __future__ import annotations

import warnings

import pytest
import torch

from detailflow_engine.ops import _dispatch

OP = "selfcheck_demo"


def _reference(x, out):
    torch.mul(x, 2.0, out=out)


def _check(backend, reference, device):
    x = torch.arange(7, dtype=torch.float32, device=device)
    got, want = torch.empty_like(x), torch.empty_like(x)
    backend.fn(x, got)
    reference(x, want)
    _dispatch.expect_close(OP, got, want, 1e-6, 0.0)


@pytest.fixture
def demo_op(monkeypatch):
    """A throw-away op with a torch reference and a self-check; the table and cache restored after."""
    monkeypatch.setattr(_dispatch, "_TABLE", dict(_dispatch._TABLE))
    monkeypatch.setattr(_dispatch, "_SELFCHECKS", dict(_dispatch._SELFCHECKS))
    monkeypatch.setattr(_dispatch, "_CHECKED", {})
    monkeypatch.setattr(_dispatch, "_WARNED", set(_dispatch._WARNED) | {OP})
    monkeypatch.delenv(_dispatch.SELFCHECK_ENV, raising=False)
    monkeypatch.delenv(_dispatch.BACKEND_ENV, raising=False)
    _dispatch.register(OP, "torch", _reference)
    _dispatch.register_selfcheck(OP, _check)

    def install(fn):
        calls = []

        def counted(*a):
            calls.append(1)
            return fn(*a)

        _dispatch.register(OP, "cpu", counted)
        return calls

    return install


def _call(x):
    out = torch.empty_like(x)
    _dispatch.pick(OP, x, out).fn(x, out)
    return out


def test_wrong_backend_is_bypassed(demo_op):
    calls = demo_op(lambda x, out: torch.mul(x, 3.0, out=out))  # wrong numbers
    x = torch.ones(3)
    with pytest.warns(RuntimeWarning, match=r"self-check of selfcheck_demo on the cpu backend failed on cpu"):
        assert torch.equal(_call(x), 2 * x)
    assert len(calls) == 1  # the self-check only
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning, and the reference keeps serving
        assert torch.equal(_call(x), 2 * x) and len(calls) == 1


def test_raising_backend_is_bypassed(demo_op):
    def boom(x, out):
        raise RuntimeError("an illegal memory access was encountered")

    demo_op(boom)
    with pytest.warns(RuntimeWarning, match="RuntimeError: an illegal memory access"):
        assert torch.equal(_call(torch.ones(2)), torch.full((2,), 2.0))


def test_correct_backend_keeps_serving(demo_op):
    calls = demo_op(_reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            assert torch.equal(_call(torch.ones(4)), torch.full((4,), 2.0))
    assert len(calls) == 1 + 3  # checked once, then it serves every call


def test_selfcheck_off(demo_op, monkeypatch):
    monkeypatch.setenv(_dispatch.SELFCHECK_ENV, "0")
    calls = demo_op(lambda x, out: torch.mul(x, 3.0, out=out))
    assert torch.equal(_call(torch.ones(2)), torch.full((2,), 3.0)) and len(calls) == 1  # trusted unchecked


@pytest.mark.skipif(not _dispatch.has_cpu_kernels(), reason="the _C extension is not built")
def test_real_cpu_kernels_pass_their_selfchecks(monkeypatch):
    """Every compiled CPU kernel passes its own check (no warning), so the CPU keeps them all."""
    monkeypatch.setattr(_dispatch, "_CHECKED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = _dispatch.selfcheck("cpu")
    for op in ("decode_gemm", "cache_attention", "group_sample", "vq_lookup", "code_search", "decode_layer",
               "prior_step"):
        assert chosen[op] == "cpu", chosen


@pytest.mark.skipif(not _dispatch.has_cpu_kernels(), reason="the _C extension is not built")
def test_a_broken_real_kernel_is_bypassed(monkeypatch):
    """decode_gemm's CPU entry swapped for one that drops the last output column: the check catches
    it and the op's torch reference serves instead."""
    import detailflow_engine.ops.decode_gemm as dg

    monkeypatch.setattr(_dispatch, "_TABLE", dict(_dispatch._TABLE))
    monkeypatch.setattr(_dispatch, "_CHECKED", {})
    real = dg._cpu_impl

    def broken(x, packed, scales, out):
        real(x, packed, scales, out)
        out[..., -1] = 0

    _dispatch.register("decode_gemm", "cpu", broken, applies=dg._cpu_applies)
    x, w = torch.randn(3, 20), torch.randn(9, 20)
    with pytest.warns(RuntimeWarning, match="self-check of decode_gemm on the cpu backend failed"):
        y = dg.decode_gemm(x, dg.pack_weight(w))
    torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-5)
