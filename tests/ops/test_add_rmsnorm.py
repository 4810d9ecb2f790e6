"""add_rmsnorm (residual add + RMSNorm, one pass) vs add_rmsnorm_ref.

The Triton kernel runs here on CPU tensors under the Triton interpreter, and compiled on CUDA
in the `gpu` tests (_triton_mode.py says how the interpreter is chosen).
"""
from __future__ import annotations

import numpy as np
import warnings

import pytest
import torch
from _triton_mode import (CUDA, DTYPE_IDS, DTYPES, HAVE_TRITON, INTERPRET, needs_cuda_triton,  # noqa: F401
                          needs_interpreter, NEEDS_SUBPROCESS, rerun_interpreter_tests)

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref, tolerance
from detailflow_engine.prior import RMSNorm

if INTERPRET:
    from detailflow_engine.ops._triton.add_rmsnorm import add_rmsnorm_fwd

# One output rounding apart: kernel and reference run the same fp32 formula and differ only in
# the order of the fp32 sum, which can move the normalized value across one rounding boundary
# before the weight multiply (1 ulp), then the product rounds again: <= 2 ulp of |y|.
_ULP2 = {torch.float32: 4e-6, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}


def make_inputs(shape, dtype, device="cpu", seed=0, with_delta=True):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    delta = torch.randn(shape, generator=g).to(dtype) if with_delta else None
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x.to(device), None if delta is None else delta.to(device), weight.to(device)


def check(x, delta, weight, eps=1e-5, run=add_rmsnorm):
    """Reference first, then the kernel; h exact, y by the STYLE 5 rule and within 2 ulp."""
    h_ref, y_ref = add_rmsnorm_ref(x, delta, weight, eps)  # torch at the kernel's precision (= prior)
    _, y32 = add_rmsnorm_ref(x.float(), None if delta is None else delta.float(), weight.float(), eps)
    h, y = run(x, delta, weight, eps)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    if delta is None:
        assert h is None or h is x
    else:
        assert h.shape == x.shape and h.dtype == x.dtype and h.is_contiguous()
        assert torch.equal(h, h_ref), f"h differs from x + delta: max {(h.float() - h_ref.float()).abs().max():.3g}"
    y_ref, y32, y = y_ref.float().cpu(), y32.cpu(), y.float().cpu()
    err = (y - y32).abs()
    lowp_err = (y_ref - y32).abs().max().item()
    atol, rtol = tolerance(x.dtype)
    bound = 2 * lowp_err + atol + rtol * y32.abs().max().item()
    assert err.max().item() <= bound, (f"max|kernel-ref32|={err.max().item():.3g} mean={err.mean().item():.3g} "
                                       f"> bound {bound:.3g} (max|torch_lowp-ref32|={lowp_err:.3g})")
    excess = ((y - y_ref).abs() - (_ULP2[x.dtype] * y_ref.abs() + 1e-6)).max().item()
    assert excess <= 0, f"y differs from the reference by more than 2 ulp (excess {excess:.3g})"
    if x.dtype != torch.float32:
        # The 2-ulp bound cannot see a missing rounding of the normalized row before the weight
        # multiply (about a quarter of bf16/fp16 outputs then differ by 1 ulp); with it, only rare
        # sum-order boundary cases may differ (none seen in the interpreter).
        differ = (y != y_ref).sum().item()
        assert differ <= max(2, y.numel() // 100), (f"{differ} of {y.numel()} outputs are not bit-identical "
                                                    f"to prior.RMSNorm's numerics")
    return h, y


# (shape): rows x dim; dims not powers of two, one row, one column, 3-D (B, n, dim), GPT-L, 2048
SHAPES = [
    pytest.param((1, 1), id="1x1"),
    pytest.param((1, 7), id="1x7"),
    pytest.param((3, 33), id="3x33"),
    pytest.param((5, 769), id="5x769"),
    pytest.param((2, 1024), id="gptl-causal-step"),
    pytest.param((2, 8, 1024), id="gptl-group-step-3d"),
    pytest.param((3, 2048), id="3x2048"),
]


@needs_interpreter
@pytest.mark.parametrize("with_delta", [True, False], ids=["add", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_interpreter_matches_reference(shape, dtype, with_delta):
    check(*make_inputs(shape, dtype, with_delta=with_delta), run=add_rmsnorm_fwd)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_interpreter_strided_rows(dtype):
    """x and delta as column slices of wider tensors (row strides != dim), eps 1e-6."""
    x_wide, d_wide, _ = make_inputs((4, 2 * 111), dtype, seed=1)
    _, _, weight = make_inputs((4, 111), dtype, seed=2)
    x, delta = x_wide[:, 5:116], d_wide[:, :111]
    assert not x.is_contiguous() and x.stride(-1) == 1
    check(x, delta, weight, 1e-6, run=add_rmsnorm_fwd)
    check(x_wide[:, ::2], None, weight, run=add_rmsnorm_fwd)  # a non-unit column stride is copied


@needs_interpreter
def test_triton_interpreter_bf16_ties_and_specials():
    """bf16 rounding: sums exactly halfway between bf16 values round to even (as torch); inf and
    NaN rows stay inf/NaN; a zero row with eps > 0 gives zeros."""
    x = torch.tensor([[1.0, 1.0, 256.0, -3.0], [0.0, 0.0, 0.0, 0.0], [1.0, float("nan"), 2.0, 3.0]],
                     dtype=torch.bfloat16)
    # 1 + 2^-8 is a tie (halfway to the next bf16 above 1) -> 1; 1 + 3*2^-8 -> 1 + 2^-6 (even)
    delta = torch.tensor([[2 ** -8, 3 * 2 ** -8, 1.0, float("inf")], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                         dtype=torch.bfloat16)
    weight = torch.ones(4, dtype=torch.bfloat16)
    h_ref, y_ref = add_rmsnorm_ref(x, delta, weight, 1e-5)
    with np.errstate(invalid="ignore", over="ignore"):  # the interpreter's numpy warns on inf * 0
        h, y = add_rmsnorm_fwd(x, delta, weight, 1e-5)
    assert torch.equal(h[:2], h_ref[:2]) and torch.isnan(h[2, 1])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(y[1], torch.zeros(4, dtype=torch.bfloat16))


@needs_interpreter
def test_triton_interpreter_empty():
    x = torch.empty(0, 16)
    h, y = add_rmsnorm_fwd(x, x, torch.ones(16), 1e-5)
    assert h.shape == y.shape == (0, 16)


if NEEDS_SUBPROCESS:  # triton came in before the interpreter could be chosen: rerun them afresh
    def test_interpreter_in_subprocess():
        rerun_interpreter_tests(__file__)


# ---- the wrapper on CPU (torch backend), validation, torch.library


def test_ref_is_prior_rmsnorm():
    """The oracle is prior.RMSNorm on x + delta, bit for bit, in every dtype."""
    for dtype in DTYPES:
        x, delta, weight = make_inputs((3, 40), dtype, seed=3)
        norm = RMSNorm(40, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
            h, y = add_rmsnorm_ref(x, delta, weight, 1e-5)
            assert torch.equal(h, x + delta) and torch.equal(y, norm(x + delta))
            assert torch.equal(add_rmsnorm_ref(x, None, weight, 1e-5)[1], norm(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_wrapper_on_cpu(dtype):
    x, delta, weight = make_inputs((2, 8, 64), dtype, seed=4)
    h, y = check(x, delta, weight)
    h0, y0 = add_rmsnorm(x, None, weight)
    assert h0 is x and torch.equal(y0, add_rmsnorm_ref(x, None, weight)[1])


def test_dispatch_table():
    assert _dispatch.table()["add_rmsnorm"] == ["triton", "cpu", "torch"]
    x, delta, weight = make_inputs((2, 16), torch.float32)
    # triton: CUDA tensors only; CPU tensors take the plain composition, with no fallback warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.pick("add_rmsnorm", x, delta, weight).name == "cpu"


@pytest.mark.parametrize("args, match", [
    (("x", None, "w"), "`x` must be a torch.Tensor"),
    ((torch.zeros(2, 4, dtype=torch.int32), None, torch.ones(4)), "`x` must be float32, bfloat16 or float16"),
    ((torch.zeros(2, 0), None, torch.ones(0)), "dim >= 1"),
    ((torch.zeros(2, 4), torch.zeros(2, 5), torch.ones(4)), "`delta` must have the shape"),
    ((torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bfloat16), torch.ones(4)), "`delta` must have the shape"),
    ((torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(5)), r"`weight` must be \(4,\)"),
    ((torch.zeros(2, 4, dtype=torch.bfloat16), None, torch.ones(4)), r"`weight` must be \(4,\) with the dtype"),
    ((torch.zeros(2, 4), None, torch.ones(4), float("nan")), "`eps` must be a finite float"),
    ((torch.zeros(2, 4), None, torch.ones(4), -1.0), "`eps` must be a finite float"),
])
def test_validation_errors(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        add_rmsnorm(*args)


def test_opcheck():
    x, delta, weight = make_inputs((3, 16), torch.float32)
    torch.library.opcheck(torch.ops.detailflow.add_rmsnorm.default, (x, delta, weight, 1e-5))
    torch.library.opcheck(torch.ops.detailflow.rmsnorm.default, (x, weight, 1e-5))


def test_torch_compile_sees_the_op():
    x, delta, weight = make_inputs((2, 8, 32), torch.float32)
    ref_h, ref_y = add_rmsnorm_ref(x, delta, weight)
    compiled = torch.compile(lambda a, b, w: add_rmsnorm(a, b, w)[1] + add_rmsnorm(a, None, w)[1],
                             backend="eager", fullgraph=True)
    got = compiled(x, delta, weight)
    assert (got - (ref_y + add_rmsnorm_ref(x, None, weight)[1])).abs().max().item() <= 1e-5


# ---- compiled Triton kernel on CUDA (benchmarks/gpu_check.sh runs `pytest -m gpu`)

# Few distinct (dtype, BLOCK, delta, alignment) variants: each is one Triton compile (~0.5 s) on a fresh machine.
GPU_SHAPES = [(1, 7), (19, 769), (2, 1024), (16, 1024), (2, 8, 1024), (4096, 1024), (3, 5000)]


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_reference(shape, dtype, monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    x, delta, weight = make_inputs(shape, dtype, device="cuda")
    assert _dispatch.pick("add_rmsnorm", x, delta, weight).name == "triton"
    check(x, delta, weight)
    check(x, None, weight)


@pytest.mark.gpu
@needs_cuda_triton
def test_gpu_strided_and_cpu_agreement():
    x_wide, d_wide, _ = make_inputs((6, 2 * 1024), torch.bfloat16, device="cuda", seed=5)
    _, _, weight = make_inputs((6, 1024), torch.bfloat16, device="cuda", seed=6)
    x, delta = x_wide[:, 3:1027], d_wide[:, 1024:]
    _, y = check(x, delta, weight)
    _, y_cpu = add_rmsnorm_ref(x.cpu(), delta.cpu(), weight.cpu())
    assert ((y.float().cpu() - y_cpu.float()).abs() <= _ULP2[torch.bfloat16] * y_cpu.float().abs() + 1e-6).all()


@pytest.mark.gpu
@needs_cuda_triton
def test_gpu_cuda_graph_replay_equals_eager():
    x, delta, weight = make_inputs((16, 1024), torch.bfloat16, device="cuda", seed=7)
    h_eager, y_eager = add_rmsnorm(x, delta, weight)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernel) outside the capture
        add_rmsnorm(x, delta, weight)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_g, y_g = add_rmsnorm(x, delta, weight)
    x2, delta2, _ = make_inputs((16, 1024), torch.bfloat16, device="cuda", seed=8)
    x.copy_(x2)
    delta.copy_(delta2)
    graph.replay()
    torch.cuda.synchronize()
    h_new, y_new = add_rmsnorm(x, delta, weight)
    assert torch.equal(h_g, h_new) and torch.equal(y_g, y_new) and not torch.equal(y_g, y_eager)
