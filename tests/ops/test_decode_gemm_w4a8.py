"""decode_gemm_w4a8 (int4 group-scaled weights, per-row int8 activations; VNNI and portable loops)
against its torch reference, bit for bit; its error against fp32 x @ W^T; w4a8 DecodeLinear."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.linear import DecodeLinear, replace_linears
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import (PANEL, _int4_nibbles, decode_gemm, dequantize_int4, pack_int4,
                                               quantize_int4)
from detailflow_engine.ops.decode_gemm_w4a8 import (MAX_GROUP, decode_gemm_w4a8, decode_gemm_w4a8_ref, force_portable,
                                                    pack_w4a8, pack_w4a8_codes, unpack_w4a8)
from detailflow_engine.ops.decode_gemm_w8a8 import quantize_rows
from tests.ops._kernel_marks import (check_exact_call, check_variant_names, needs_cpu_kernel, random_problem,
                                    variant_fixture)

F32, BF16 = torch.float32, torch.bfloat16
needs_kernel = needs_cpu_kernel("decode_gemm_w4a8")


variant = variant_fixture("decode_gemm_w4a8_force_portable", force_portable)


make = random_problem


def check(x, packed, out=None):
    """The kernel's bits == the reference's (exact integer sums, one fp32 order: no tolerance)."""
    return check_exact_call(decode_gemm_w4a8, x, packed, decode_gemm_w4a8_ref(x, packed.weight, packed.scales, packed.group_size), out)


def test_reference_is_the_formula():
    """The reference against the formula written out with plain loops over groups (float64
    integer sums, fp32 f = f + acc * s in group order, times s_x)."""
    x, w = make(3, 5, 20, seed=1)
    q, s = quantize_int4(w, 8)
    qx, sx = quantize_rows(x)
    want = torch.zeros(3, 5)
    for g in range(3):
        k = slice(8 * g, min(20, 8 * g + 8))
        acc = (qx[:, k].double() @ q[:, k].double().t()).float()
        want = want + acc * s[:, g]
    want = want * sx[:, None]
    assert torch.equal(decode_gemm_w4a8_ref(x, _int4_nibbles(q), s, 8), want)


@needs_kernel
def test_packed_layout():
    """P[p, k8, j, t] = (Q[16 p + j, 8 k8 + t] + 8) | (Q[16 p + j, 8 k8 + 4 + t] + 8) << 4, padding
    Q = 0; group scales in int4's panel layout; the int4 mode's state dict (nibbles, scales) is
    unpacked exactly from what is held."""
    w = torch.randn(37, 70)
    q, s = quantize_int4(w, 16)
    p = pack_w4a8(w, 16, keep_source=False)
    assert p.is_w4a8 and not p.is_int4 and not p.is_int8 and not p.is_w8a8 and p.source is None
    assert p.packed.shape == (3, 9, PANEL, 4) and p.packed.dtype == torch.uint8
    n = torch.full((48, 72), 8, dtype=torch.int16)
    n[:37, :70] = q.to(torch.int16) + 8
    v = n.view(3, 16, 9, 2, 4)
    want = (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).permute(0, 2, 1, 3).to(torch.uint8)
    assert torch.equal(p.packed, want)
    assert torch.equal(p.kernel_scales, pack_int4(w, 16).group_scales)
    assert torch.equal(p.weight, _int4_nibbles(q)) and torch.equal(p.scales, s)
    assert torch.equal(unpack_w4a8(p.packed, 37, 70), _int4_nibbles(q))
    assert torch.equal(p.dequantized(), dequantize_int4(q, s, 16))


SHAPES = [(1, 1, 1, 8), (1, 37, 67, 16), (2, 48, 64, 64), (3, 64, 128, 64), (5, 33, 3, 8), (6, 40, 200, 64),
          (7, 100, 130, 32), (16, 100, 136, 64), (17, 40, 255, 128), (128, 64, 96, 64), (2, 1024, 1024, 64),
          (16, 1024, 2816, 64), (200, 17, 7, 8)]


@needs_kernel
@pytest.mark.parametrize("M,N,K,G", SHAPES, ids=[f"M{m}-N{n}-K{k}-G{g}" for m, n, k, g in SHAPES])
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_matches_reference_bit_for_bit(M, N, K, G, x_dtype, variant):
    x, w = make(M, N, K, x_dtype, seed=M + N + K + G)
    check(x, pack_w4a8(w, G))


@needs_kernel
def test_edge_cases(variant):
    """Zero rows, huge and tiny rows, a non-finite row (NaN outputs there only), strided and 3-D
    x, a strided out, a zero weight row and an all-zero group, bf16 extremes, Q = -8 nibbles."""
    x, w = make(9, 45, 131, seed=5)
    w[7] = 0.0
    w[8, 64:128] = 0.0  # one zero group (scale 0)
    x[1] = 0.0
    x[2] *= 1e30
    x[3] *= 1e-38
    x[4, 17] = float("inf")
    x[5, 3] = float("nan")
    x[6] = -x[6].abs()
    p = pack_w4a8(w)
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
    nib = torch.zeros(16, 32, dtype=torch.uint8)  # every code Q = -8 (nibble 0): outside quantize_int4's range
    check(torch.randn(3, 64), pack_w4a8_codes(nib, torch.rand(16, 1), 64, 64))


@needs_kernel
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_rows_do_not_depend_on_the_batch(x_dtype, variant):
    """A row's bits alone equal its bits among 2..1000 rows (each tiling: one streaming tile of
    <= 6 rows, one tile of up to 12, several tiles), and with 1 or 2 threads."""
    x, w = make(1000, 75, 130, x_dtype, seed=3)
    p = pack_w4a8(w, 32)
    alone = torch.cat([decode_gemm_w4a8(x[i:i + 1], p) for i in range(0, 1000, 37)])
    for M in (2, 3, 6, 7, 13, 16, 97, 193, 257, 1000):
        rows = list(range(0, M, 37))
        assert torch.equal(decode_gemm_w4a8(x[:M], p)[rows], alone[:len(rows)]), f"M={M} changes a row"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_gemm_w4a8(x[:257], p)
        torch.set_num_threads(2)
        two = decode_gemm_w4a8(x[:257], p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two), "the result depends on the thread count"


@pytest.mark.parametrize("M,N,K", [(16, 3072, 1024), (16, 1024, 2816), (2, 257, 40)])
def test_error_against_fp32(M, N, K):
    """|y - x W_deq^T| <= s_x / 2 sum_k |W_deq| (+ fp32 rounding) elementwise (the activation
    rounding only; W_deq is int4's own weight), and the RMS error against the fp32 product of
    Gaussian data matches int4 weight-only's within a tenth (its int4 rounding dominates)."""
    x, w = make(M, N, K, seed=11)
    p = pack_w4a8(w)
    y = decode_gemm_w4a8_ref(x, p.weight, p.scales, p.group_size)
    w_deq = p.dequantized().double()
    deq = x.double() @ w_deq.t()
    _, sx = quantize_rows(x)
    bound = sx.double()[:, None] / 2 * w_deq.abs().sum(1)[None, :]
    err = (y.double() - deq).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-5 * deq.abs() + 1e-6).all())
    exact = x.double() @ w.double().t()
    rms = lambda t: t.pow(2).mean().sqrt().item()
    rel, rel_int4 = rms(y.double() - exact) / rms(exact), rms(deq - exact) / rms(exact)
    assert rel <= 1.1 * rel_int4 and rel < 0.12, f"RMS error {rel:.2%} (int4 weight-only {rel_int4:.2%})"


@needs_kernel
def test_variants_are_named():
    """The best loop on an avx512_vnni CPU is the VNNI one; forcing portable switches it."""
    ext = _dispatch.extension()
    x = torch.randn(2, 64, dtype=BF16)
    y = torch.empty(2, 16, dtype=BF16)
    p = pack_w4a8(torch.randn(16, 64))
    call = lambda: ext.decode_gemm_w4a8(x.data_ptr(), 2, 64, 64, _dispatch.DTYPE_CODES[BF16], p.packed.data_ptr(),
                                        p.packed.numel(), p.kernel_scales.data_ptr(), 64, 16, y.data_ptr(), 16, 1)
    check_variant_names(call, force_portable, "avx512-vnni", ("avx512_vnni", "avx512bw"))


@needs_kernel
def test_the_binding_checks_its_arguments():
    ext = _dispatch.extension()
    x = torch.randn(2, 64)
    y = torch.empty(2, 16)
    p = pack_w4a8(torch.randn(16, 64))
    args = lambda numel, group: (x.data_ptr(), 2, 64, 64, 0, p.packed.data_ptr(), numel, p.kernel_scales.data_ptr(),
                                 group, 16, y.data_ptr(), 16, 1)
    with pytest.raises(Exception, match="packed must hold 512 bytes"):
        ext.decode_gemm_w4a8(*args(500, 64))
    with pytest.raises(Exception, match="group must be a multiple of 8"):
        ext.decode_gemm_w4a8(*args(512, 12))
    with pytest.raises(Exception, match="group must be a multiple of 8"):
        ext.decode_gemm_w4a8(*args(512, 0))


def _p():
    return pack_w4a8(torch.randn(5, 64))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: pack_w4a8_codes(torch.zeros(5, 32), torch.ones(5, 1), 64), ValueError, "`nibbles` must be uint8"),
    (lambda: pack_w4a8_codes(torch.zeros(5, 31, dtype=torch.uint8), torch.ones(5, 1), 64), ValueError,
     r"ceil\(K / 2\)"),
    (lambda: pack_w4a8_codes(torch.zeros(5, 32, dtype=torch.uint8), torch.ones(5, 2), 64), ValueError,
     r"`scales` must be float32 of shape \(5, 1\)"),
    (lambda: pack_w4a8_codes(torch.zeros(5, 32, dtype=torch.uint8), torch.ones(5, 6), 64, 12), ValueError,
     "multiple of 8"),
    (lambda: pack_w4a8(torch.randn(5, 64), MAX_GROUP + 8), ValueError, "multiple of 8 in"),
    (lambda: pack_w4a8(torch.randn(5, 64), True), ValueError, "multiple of 8"),
    (lambda: pack_w4a8(torch.tensor([[1.0, float("nan")]]), 8), ValueError, "non-finite"),
    (lambda: pack_w4a8("w"), TypeError, "`weight` must be a torch.Tensor"),
    (lambda: decode_gemm_w4a8(torch.randn(2, 63), _p()), ValueError, "`x` must be float32 or bfloat16 .* K = 64"),
    (lambda: decode_gemm_w4a8(torch.randn(2, 64, dtype=torch.float16), _p()), ValueError, "float32 or bfloat16"),
    (lambda: decode_gemm_w4a8(torch.randn(2, 64, device="meta"), _p()), ValueError, "`x` must be on the device"),
    (lambda: decode_gemm_w4a8(torch.randn(2, 64), _p(), out=torch.empty(2, 4)), ValueError,
     r"`out` must be float32 of shape \(2, 5\)"),
    (lambda: decode_gemm_w4a8([1.0], _p()), TypeError, "`x` must be a torch.Tensor"),
    (lambda: decode_gemm_w4a8(torch.randn(2, 64), pack_int4(torch.randn(5, 64))), TypeError, "w4a8 PackedWeight"),
    (lambda: decode_gemm(torch.randn(2, 64), _p()), ValueError, "decode_gemm_w4a8"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_kernel
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_decode_linear_w4a8(dtype):
    """DecodeLinear(weights="w4a8"): int4's state dict (the same nibbles and scales), only the
    VNNI nibble panels held, the op's bits (its torch path too), a state-dict round trip with
    int4, .to(dtype), and replace_linears."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    d = DecodeLinear(lin, weights="w4a8").to(dtype)
    int4 = DecodeLinear(lin, weights="int4")
    assert list(d.parameters()) == [] and list(d.buffers()) == [] and d.group_size == int4.group_size
    state = d.state_dict()
    assert set(state) == {"weight", "scales"}
    assert torch.equal(state["weight"], int4.state_dict()["weight"]) and torch.equal(state["scales"], int4.scales)
    x = torch.randn(3, 96).to(dtype)
    p = d.packed_for(x)
    assert p is not None and p.is_w4a8 and p.source is None
    with torch.no_grad():
        y = d(x)
        assert torch.equal(y, decode_gemm_w4a8(x, pack_w4a8(lin.weight.detach(), d.group_size)))
        assert torch.equal(d._torch(x), y)
        d2 = DecodeLinear(nn.Linear(96, 40, bias=False), weights="w4a8")
        d2.load_state_dict(int4.state_dict())  # an int4 state dict loads as w4a8
        assert torch.equal(d2(x), y)
        ref = F.linear(x.float(), lin.weight)
        assert (y.float() - ref).pow(2).mean().sqrt() <= 0.15 * ref.pow(2).mean().sqrt()
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))
    replace_linears(model, weights="w4a8")
    assert all(isinstance(m, DecodeLinear) and m.weights == "w4a8" for m in (model[0], model[2]))
