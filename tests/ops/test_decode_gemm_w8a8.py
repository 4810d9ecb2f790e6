"""decode_gemm_w8a8 (int8 weights, per-row int8 activations; VNNI and portable loops) against its
torch reference, bit for bit; its error against fp32 x @ W^T; w8a8 DecodeLinear."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.linear import DecodeLinear, replace_linears
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import PANEL, decode_gemm, quantize_int8
from detailflow_engine.ops.decode_gemm_w8a8 import (MAX_K, decode_gemm_w8a8, decode_gemm_w8a8_ref, force_portable,
                                                    pack_w8a8, pack_w8a8_codes, quantize_rows)
from tests.ops._kernel_marks import (check_exact_call, check_variant_names, needs_cpu_kernel, random_problem,
                                    variant_fixture)

F32, BF16 = torch.float32, torch.bfloat16
needs_kernel = needs_cpu_kernel("decode_gemm_w8a8")


variant = variant_fixture("decode_gemm_w8a8_force_portable", force_portable)


make = random_problem


def check(x, packed, out=None):
    """The kernel's bits == the reference's (integer sums are exact: no tolerance)."""
    return check_exact_call(decode_gemm_w8a8, x, packed, decode_gemm_w8a8_ref(x, packed.weight, packed.scales), out)


def test_quantize_rows_definition():
    """s = max|x| / 127, q = round-half-even(x / s) clamped; zero row: s 0, q 0; non-finite: NaN, 0."""
    x = torch.tensor([[127.0, -63.5, 0.5, 1.5, -2.5, 0.0],
                      [0.0] * 6,
                      [2.0, float("inf"), 1.0, 0.0, 0.0, 0.0],
                      [1.0, 2.0, float("nan"), 0.0, 0.0, 0.0]])
    q, s = quantize_rows(x)
    assert q.dtype == torch.int8 and s.dtype == F32
    assert q[0].tolist() == [127, -64, 0, 2, -2, 0] and s[0].item() == 1.0  # ties to even
    assert q[1].tolist() == [0] * 6 and s[1].item() == 0.0
    assert q[2:].abs().sum().item() == 0 and torch.isnan(s[2:]).all()
    q, s = quantize_rows(torch.tensor([[3.0, -1.0, 1.5]]))
    assert s.item() == pytest.approx(3.0 / 127) and q.tolist() == [[127, -42, 64]]


@needs_kernel
def test_packed_layout():
    """P[p, k4, j, t] = Q[16 p + j, 4 k4 + t] with zero padding; colsum = sum_k Q; only the panels,
    scales and column sums are held; `weight` unpacks Q exactly."""
    w = torch.randn(37, 70)
    q, s = quantize_int8(w)
    p = pack_w8a8(w, keep_source=False)
    assert p.is_w8a8 and not p.is_int8 and not p.is_int4 and p.source is None
    assert p.packed.shape == (3, 18, PANEL, 4) and p.packed.dtype == torch.int8
    padded = torch.zeros(48, 72, dtype=torch.int8)
    padded[:37, :70] = q
    assert torch.equal(p.packed, padded.view(3, 16, 18, 4).permute(0, 2, 1, 3))
    assert torch.equal(p.colsum, q.sum(1, dtype=torch.int32)) and p.colsum.dtype == torch.int32
    assert torch.equal(p.weight, q) and torch.equal(p.scales, s)
    assert torch.equal(p.dequantized(), q.float() * s[:, None])


SHAPES = [(1, 1, 1), (1, 37, 67), (2, 48, 64), (5, 33, 3), (16, 100, 130), (17, 40, 255), (128, 64, 96),
          (2, 1024, 1024), (16, 1024, 2816), (200, 17, 7)]


@needs_kernel
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_matches_reference_bit_for_bit(M, N, K, x_dtype, variant):
    x, w = make(M, N, K, x_dtype, seed=M + N + K)
    check(x, pack_w8a8(w))


@needs_kernel
def test_edge_cases(variant):
    """Zero rows, huge and tiny rows, a non-finite row (NaN outputs there only), strided and 3-D
    x, a strided out, a zero weight row, bf16 extremes."""
    x, w = make(9, 45, 131, seed=5)
    w[7] = 0.0
    x[1] = 0.0
    x[2] *= 1e30
    x[3] *= 1e-38  # subnormal scale territory
    x[4, 17] = float("inf")
    x[5, 3] = float("nan")
    x[6] = -x[6].abs()
    p = pack_w8a8(w)
    y = check(x, p)
    assert (y[1] == 0).all() and (y[[0, 2, 3, 6, 7, 8], 7] == 0).all() and torch.isnan(y[4:6]).all()
    assert torch.isfinite(y[[0, 2, 3, 6, 7, 8]]).all()
    check(x.to(BF16), p)
    wide = torch.randn(6, 300)
    check(wide[:, 7:138], p)  # row stride 300
    check(torch.randn(131, 6).t(), p)  # unit stride on the wrong axis
    check(torch.randn(2, 3, 131).to(BF16), p)
    check(torch.randn(4, 131), p, out=torch.full((45, 4), float("nan")).t())
    big = torch.full((2, 131), 3.0e38, dtype=BF16)
    big[1] = -big[1]
    check(big, p)


@needs_kernel
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_rows_do_not_depend_on_the_batch(x_dtype, variant):
    """A row's bits alone equal its bits among 7..1000 rows, and with 1 or 2 threads."""
    x, w = make(1000, 75, 130, x_dtype, seed=3)
    p = pack_w8a8(w)
    alone = torch.cat([decode_gemm_w8a8(x[i:i + 1], p) for i in range(0, 1000, 37)])
    for M in (7, 13, 16, 97, 193, 257, 1000):
        rows = list(range(0, M, 37))
        assert torch.equal(decode_gemm_w8a8(x[:M], p)[rows], alone[:len(rows)]), f"M={M} changes a row"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_gemm_w8a8(x[:257], p)
        torch.set_num_threads(2)
        two = decode_gemm_w8a8(x[:257], p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two), "the result depends on the thread count"


@pytest.mark.parametrize("M,N,K", [(16, 3072, 1024), (16, 1024, 2816), (2, 257, 33)])
def test_error_against_fp32(M, N, K):
    """|y - x W^T| <= s_x / 2 sum_k |W_deq| + s_w / 2 sum_k |x| (+ fp32 rounding) elementwise, and
    the RMS error of Gaussian data stays near 1.2% of RMS y (measured; int8 weight-only ~0.8%)."""
    x, w = make(M, N, K, seed=11)
    p = pack_w8a8(w)
    y = decode_gemm_w8a8_ref(x, p.weight, p.scales)
    exact = x.double() @ w.double().t()
    _, sx = quantize_rows(x)
    bound = (sx.double()[:, None] / 2 * p.dequantized().double().abs().sum(1)[None, :]
             + p.scales.double()[None, :] / 2 * x.double().abs().sum(1)[:, None])
    err = (y.double() - exact).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-6 * exact.abs()).all())
    rel = (err.pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()).item()
    assert rel < 0.02, f"RMS error {rel:.2%} of RMS y"


@needs_kernel
def test_variants_are_named():
    """The best loop on an avx512_vnni CPU is the VNNI one; forcing portable switches it."""
    ext = _dispatch.extension()
    x = torch.randn(2, 64, dtype=BF16)
    y = torch.empty(2, 16, dtype=BF16)
    p = pack_w8a8(torch.randn(16, 64))
    call = lambda: ext.decode_gemm_w8a8(x.data_ptr(), 2, 64, 64, _dispatch.DTYPE_CODES[BF16], p.packed.data_ptr(),
                                        p.packed.numel(), p.kernel_scales.data_ptr(), p.colsum.data_ptr(), 16,
                                        y.data_ptr(), 16, 1)
    check_variant_names(call, force_portable, "avx512-vnni", ("avx512_vnni", "avx512bw"))


@needs_kernel
def test_the_binding_checks_its_arguments():
    ext = _dispatch.extension()
    x = torch.randn(2, 64)
    y = torch.empty(2, 16)
    p = pack_w8a8(torch.randn(16, 64))
    args = lambda K, numel: (x.data_ptr(), 2, K, 64, 0, p.packed.data_ptr(), numel, p.kernel_scales.data_ptr(),
                             p.colsum.data_ptr(), 16, y.data_ptr(), 16, 1)
    with pytest.raises(Exception, match="packed must hold 1024 bytes"):
        ext.decode_gemm_w8a8(*args(64, 1000))
    with pytest.raises(Exception, match="K must be in"):
        ext.decode_gemm_w8a8(*args(MAX_K + 1, 1024))


def _p():
    return pack_w8a8(torch.randn(5, 64))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: pack_w8a8_codes(torch.zeros(5, 64), torch.ones(5)), ValueError, "`q` must be int8"),
    (lambda: pack_w8a8_codes(torch.zeros(5, MAX_K + 1, dtype=torch.int8), torch.ones(5)), ValueError, "K <= 65536"),
    (lambda: pack_w8a8_codes(torch.zeros(5, 64, dtype=torch.int8), torch.ones(4)), ValueError,
     r"`scales` must be float32 of shape \(5,\)"),
    (lambda: pack_w8a8_codes(torch.full((5, 64), -128, dtype=torch.int8), torch.ones(5)), ValueError, "-128"),
    (lambda: pack_w8a8(torch.tensor([[1.0, float("nan")]])), ValueError, "non-finite"),
    (lambda: pack_w8a8("w"), TypeError, "`weight` must be a torch.Tensor"),
    (lambda: decode_gemm_w8a8(torch.randn(2, 63), _p()), ValueError, "`x` must be float32 or bfloat16 .* K = 64"),
    (lambda: decode_gemm_w8a8(torch.randn(2, 64, dtype=torch.float16), _p()), ValueError, "float32 or bfloat16"),
    (lambda: decode_gemm_w8a8(torch.randn(2, 64, device="meta"), _p()), ValueError, "`x` must be on the device"),
    (lambda: decode_gemm_w8a8(torch.randn(2, 64), _p(), out=torch.empty(2, 4)), ValueError,
     r"`out` must be float32 of shape \(2, 5\)"),
    (lambda: decode_gemm_w8a8([1.0], _p()), TypeError, "`x` must be a torch.Tensor"),
    (lambda: decode_gemm_w8a8(torch.randn(2, 64), quantize_int8(torch.randn(5, 64))), TypeError,
     "w8a8 PackedWeight"),
    (lambda: decode_gemm(torch.randn(2, 64), _p()), ValueError, "decode_gemm_w8a8"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_kernel
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_decode_linear_w8a8(dtype):
    """DecodeLinear(weights="w8a8"): int8's state dict (the same Q and scales), only the VNNI
    panels held, the op's bits (its torch path too), a state-dict round trip, .to(dtype), and
    replace_linears."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    d = DecodeLinear(lin, weights="w8a8").to(dtype)
    int8 = DecodeLinear(lin, weights="int8")
    assert list(d.parameters()) == [] and list(d.buffers()) == []
    state = d.state_dict()
    assert set(state) == {"weight", "scales"}
    assert torch.equal(state["weight"], int8.state_dict()["weight"]) and torch.equal(state["scales"], int8.scales)
    x = torch.randn(3, 96).to(dtype)
    p = d.packed_for(x)
    assert p is not None and p.is_w8a8 and p.source is None
    with torch.no_grad():
        y = d(x)
        assert torch.equal(y, decode_gemm_w8a8(x, pack_w8a8(lin.weight.detach())))
        assert torch.equal(d._torch(x), y)
        d2 = DecodeLinear(nn.Linear(96, 40, bias=False), weights="w8a8")
        d2.load_state_dict(state)
        assert torch.equal(d2(x), y)
        ref = F.linear(x.float(), lin.weight)
        assert (y.float() - ref).pow(2).mean().sqrt() <= 0.03 * ref.pow(2).mean().sqrt()
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))
    replace_linears(model, weights="w8a8")
    assert all(isinstance(m, DecodeLinear) and m.weights == "w8a8" for m in (model[0], model[2]))
