"""rope_qkv (split the fused qkv projection, rotary on q and k, (B, H, n, d) layout) vs rope_qkv_ref.

The Triton kernel runs here on CPU tensors under the Triton interpreter, and compiled on CUDA
in the `gpu` tests (_triton_mode.py says how the interpreter is chosen).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from _triton_mode import (CUDA, DTYPE_IDS, DTYPES, HAVE_TRITON, INTERPRET, needs_cuda_triton,  # noqa: F401
                          needs_interpreter, NEEDS_SUBPROCESS, rerun_interpreter_tests)

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.rope_qkv import rope_qkv, rope_qkv_ref, tolerance
from detailflow_engine.rotary import precompute_freqs_cis_2d

if INTERPRET:
    from detailflow_engine.ops._triton.rope_qkv import launch_config, rope_qkv_fwd

_ULP = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def make_inputs(B, n, H, d, dtype, *, start=1, device="cpu", seed=0, table="prior"):
    """qkv (B, n, 3*H*d) and freqs (n, d/2, 2): rows start:start+n of the prior's 2D table
    (block 128, group 8: GPT-L's; row 0 is the class position's zero row; needs 4 | d), or random cos/sin."""
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(B, n, 3 * H * d, generator=g)).to(dtype)
    if table == "prior" and d % 4 == 0:
        freqs = precompute_freqs_cis_2d(128, 8, d)[start:start + n]
        assert freqs.shape[0] == n, f"start {start} + n {n} is past the table's 129 rows"
    else:
        angles = 10 * torch.randn(n, d // 2, generator=g)
        freqs = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    return qkv.to(device), freqs.to(device)


def check(qkv, freqs, n_head, run=rope_qkv, exact=False):
    """Reference first, then the kernel; STYLE 5 rule vs fp32, and within 1 ulp of the reference
    (bit-identical with exact=True)."""
    ref = rope_qkv_ref(qkv, freqs, n_head)  # torch at the kernel's precision (= prior.Attention)
    ref32 = rope_qkv_ref(qkv.float(), freqs, n_head)
    got = run(qkv, freqs, n_head)
    B, n, width = qkv.shape
    shape = (B, n_head, n, width // (3 * n_head))
    atol, rtol = tolerance(qkv.dtype)
    for name, o, r, r32 in zip("qkv", got, ref, ref32):
        assert o.shape == shape and o.dtype == qkv.dtype and o.is_contiguous(), f"{name}: {_dispatch.describe(o)}"
        assert o.device == qkv.device
        o, r, r32 = o.float().cpu(), r.float().cpu(), r32.float().cpu()
        err = (o - r32).abs()
        lowp_err = (r - r32).abs().max().item()
        bound = 2 * lowp_err + atol + rtol * r32.abs().max().item()
        assert err.max().item() <= bound, (f"{name}: max|kernel-ref32|={err.max().item():.3g} "
                                           f"mean={err.mean().item():.3g} > bound {bound:.3g} "
                                           f"(max|torch_lowp-ref32|={lowp_err:.3g})")
        excess = ((o - r).abs() - _ULP[qkv.dtype] * r.abs()).max().item()
        assert excess <= 0, f"{name}: differs from the reference by more than 1 ulp (excess {excess:.3g})"
        if exact:
            assert torch.equal(o, r), f"{name}: not bit-identical to the reference ({(o != r).sum()} differ)"
    return got


# (B, n, H, d, start, block_h): one position, odd head counts and head dims (d = 40, 6, 72: BLOCK_D
# padding), the class position (start 0: zero rotary row), GPT-L causal and group steps. block_h
# None = the launcher's heuristic (one head a program at these row counts); explicit values put
# several heads in a program, with a partial last tile when it does not divide H (and keep the
# interpreter, which runs programs one by one, fast).
SHAPES = [
    pytest.param(1, 1, 1, 2, 1, None, id="smallest"),
    pytest.param(1, 1, 3, 40, 0, None, id="cls-row-H3-d40"),
    pytest.param(2, 8, 3, 40, 9, 4, id="group-H3-d40-tile4"),
    pytest.param(3, 5, 7, 6, 2, 4, id="H7-d6-tile4"),
    pytest.param(1, 3, 5, 72, 30, 8, id="H5-d72-tile8"),
    pytest.param(2, 1, 16, 64, 4, None, id="gptl-causal-step"),
    pytest.param(2, 8, 16, 64, 9, 16, id="gptl-group-step-tile16"),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,n,H,d,start,block_h", SHAPES)
def test_triton_interpreter_matches_reference(B, n, H, d, start, block_h, dtype):
    qkv, freqs = make_inputs(B, n, H, d, dtype, start=start)
    check(qkv, freqs, H, run=lambda *a: rope_qkv_fwd(*a, block_h=block_h), exact=True)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_interpreter_strided_inputs_random_table(dtype):
    """qkv as a slice of a wider projection (row strides != 3*H*d), a (n, B) transposed layout,
    a non-unit last stride (copied), and a non-contiguous freqs with arbitrary angles."""
    B, n, H, d = 2, 3, 3, 10
    wide, _ = make_inputs(B, n, 2 * H, d, dtype, seed=1)
    qkv, freqs = make_inputs(B, n, H, d, dtype, seed=2, table="random")
    freqs_wide = torch.cat([freqs, torch.full_like(freqs, float("nan"))], dim=1)[:, : d // 2]
    assert not freqs_wide.is_contiguous()
    run = lambda *a: rope_qkv_fwd(*a, block_h=4)  # noqa: E731
    check(wide[..., 7:7 + 3 * H * d], freqs_wide, H, run=run, exact=True)
    check(qkv.transpose(0, 1).contiguous().transpose(0, 1), freqs, H, run=run, exact=True)
    check(wide[..., ::2], freqs, H, run=run, exact=True)


@needs_interpreter
def test_launch_config_heuristic():
    """Decode rows get one head a program (parallelism), big batches whole tiles of heads."""
    assert launch_config(2, 16, 64) == (1, 64, 1)
    assert launch_config(16, 16, 64) == (1, 64, 1)
    assert launch_config(128, 16, 64) == (4, 64, 1)
    assert launch_config(512, 16, 64) == (16, 64, 4)
    assert launch_config(4096, 16, 64) == (16, 64, 4)
    assert launch_config(4096, 3, 40) == (4, 64, 1)


@needs_interpreter
def test_triton_interpreter_empty():
    q, k, v = rope_qkv_fwd(torch.empty(0, 4, 3 * 2 * 8), torch.zeros(4, 4, 2), 2)
    assert q.shape == k.shape == v.shape == (0, 2, 4, 8)


if NEEDS_SUBPROCESS:  # triton came in before the interpreter could be chosen: rerun them afresh
    def test_interpreter_in_subprocess():
        rerun_interpreter_tests(__file__)


# ---- the wrapper on CPU (torch backend), validation, torch.library


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_wrapper_on_cpu(dtype):
    qkv, freqs = make_inputs(2, 8, 4, 16, dtype, seed=3)
    check(qkv, freqs, 4, exact=True)


def test_ref_is_prior_attention_composition():
    """The oracle is what prior.Attention.forward does with the wqkv output."""
    from detailflow_engine.rotary import apply_rotary
    qkv, freqs = make_inputs(2, 8, 4, 16, torch.bfloat16, seed=4)
    q, k, v = qkv.view(2, 8, 3, 4, 16).unbind(2)
    expect = (apply_rotary(q, freqs).transpose(1, 2), apply_rotary(k, freqs).transpose(1, 2), v.transpose(1, 2))
    for got, want in zip(rope_qkv_ref(qkv, freqs, 4), expect):
        assert torch.equal(got, want)


def test_outputs_never_alias_qkv():
    """B = n = 1 makes v's transpose already contiguous: the op must still return a copy."""
    qkv, freqs = make_inputs(1, 1, 2, 8, torch.float32)
    q, k, v = rope_qkv(qkv, freqs, 2)
    assert v.data_ptr() != qkv[..., 2 * 16:].data_ptr()
    before = v.clone()
    qkv.zero_()
    assert torch.equal(v, before)


def test_dispatch_table():
    assert _dispatch.table()["rope_qkv"] == ["triton", "cpu", "torch"]
    qkv, freqs = make_inputs(1, 1, 2, 8, torch.float32)
    # triton: CUDA tensors only; CPU tensors take the plain composition, with no fallback warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.pick("rope_qkv", qkv, freqs).name == "cpu"


@pytest.mark.parametrize("args, match", [
    (("qkv", torch.zeros(1, 2, 2), 1), "`qkv` must be a torch.Tensor"),
    ((torch.zeros(2, 24), torch.zeros(1, 2, 2), 1), r"`qkv` must be float32, bfloat16 or float16 of shape \(B, n"),
    ((torch.zeros(1, 1, 24, dtype=torch.int64), torch.zeros(1, 2, 2), 1), "`qkv` must be float32"),
    ((torch.zeros(1, 1, 24), torch.zeros(1, 2, 2), 1.0), "`n_head` must be an int"),
    ((torch.zeros(1, 1, 24), torch.zeros(1, 2, 2), True), "`n_head` must be an int"),
    ((torch.zeros(1, 1, 24), torch.zeros(1, 2, 2), 0), "`n_head` must be >= 1"),
    ((torch.zeros(1, 1, 24), torch.zeros(1, 2, 2), 5), "3 \\* n_head \\* head_dim"),
    ((torch.zeros(1, 1, 18), torch.zeros(1, 2, 2), 2), "even head_dim"),
    ((torch.zeros(1, 2, 24), torch.zeros(1, 2, 2), 2),
     r"`freqs` must be float32 of shape \(n, head_dim/2, 2\) = \(2, 2, 2\)"),
    ((torch.zeros(1, 1, 24), torch.zeros(1, 2, 2, dtype=torch.float64), 2), "`freqs` must be float32"),
    ((torch.zeros(1, 1, 24), "f", 2), "`freqs` must be a torch.Tensor"),
])
def test_validation_errors(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        rope_qkv(*args)


def test_opcheck():
    qkv, freqs = make_inputs(2, 3, 2, 8, torch.float32)
    torch.library.opcheck(torch.ops.detailflow.rope_qkv.default, (qkv, freqs, 2))


def test_torch_compile_sees_the_op():
    qkv, freqs = make_inputs(2, 8, 4, 16, torch.float32, seed=5)
    compiled = torch.compile(lambda a, f: rope_qkv(a, f, 4), backend="eager", fullgraph=True)
    for got, want in zip(compiled(qkv, freqs), rope_qkv_ref(qkv, freqs, 4)):
        assert torch.equal(got, want)


# ---- compiled Triton kernel on CUDA (benchmarks/gpu_check.sh runs `pytest -m gpu`)

# Few distinct (dtype, BLOCK_H, BLOCK_D, alignment) variants: each is one Triton compile on a fresh machine.
GPU_SHAPES = [(1, 1, 1, 2, 1), (2, 8, 3, 40, 9), (3, 5, 7, 6, 0), (2, 1, 16, 64, 4), (2, 8, 16, 64, 9),
              (64, 8, 16, 64, 113), (512, 8, 16, 64, 17)]


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,n,H,d,start", GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_matches_reference(B, n, H, d, start, dtype, monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    qkv, freqs = make_inputs(B, n, H, d, dtype, start=start, device="cuda")
    assert _dispatch.pick("rope_qkv", qkv, freqs).name == "triton"
    check(qkv, freqs, H)


@pytest.mark.gpu
@needs_cuda_triton
def test_gpu_strided_and_cpu_agreement():
    B, n, H, d = 4, 8, 16, 64
    wide, _ = make_inputs(B, n, 2 * H, d, torch.bfloat16, device="cuda", seed=6)
    _, freqs = make_inputs(B, n, H, d, torch.bfloat16, device="cuda", seed=7, table="random")
    qkv = wide[..., 64:64 + 3 * H * d]
    got = check(qkv, freqs, H)
    for o, r in zip(got, rope_qkv_ref(qkv.cpu(), freqs.cpu(), H)):
        assert ((o.float().cpu() - r.float()).abs() <= _ULP[torch.bfloat16] * r.float().abs()).all()


@pytest.mark.gpu
@needs_cuda_triton
def test_gpu_cuda_graph_replay_equals_eager():
    qkv, freqs = make_inputs(16, 8, 16, 64, torch.bfloat16, start=9, device="cuda", seed=8)
    eager = rope_qkv(qkv, freqs, 16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles the kernel) outside the capture
        rope_qkv(qkv, freqs, 16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rope_qkv(qkv, freqs, 16)
    qkv2, freqs2 = make_inputs(16, 8, 16, 64, torch.bfloat16, start=17, device="cuda", seed=9)
    qkv.copy_(qkv2)
    freqs.copy_(freqs2)
    graph.replay()
    torch.cuda.synchronize()
    for c, e, new in zip(captured, eager, rope_qkv(qkv, freqs, 16)):
        assert torch.equal(c, new) and not torch.equal(c, e)
