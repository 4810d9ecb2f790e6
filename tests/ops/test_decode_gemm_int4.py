"""decode_gemm's int4 weight-only kernels (AVX-512 and portable) and the int8 bf16-dot path,
against their torch references; int4 DecodeLinear."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.linear import DecodeLinear, replace_linears
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import (PANEL, decode_gemm, dequantize_int4, force_portable, nibbles_int4,
                                               pack_int4, pack_int4_nibbles, pack_int8, quantize_int4)
from tests.ops._kernel_marks import check_variant_names, variant_fixture

F32, BF16 = torch.float32, torch.bfloat16
needs_cpu_kernels = pytest.mark.skipif(
    not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "decode_gemm_int4")),
    reason="the _C extension with the decode_gemm_int4 CPU kernel is not built")


variant = variant_fixture("decode_gemm_force_portable", force_portable)


def make(M, N, K, x_dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(x_dtype), torch.randn(N, K, generator=g)


def check_int4(x, packed, out=None):
    """Against fp32 x @ W_deq^T: the kernel's products are exact and sums fp32 in group blocks, so
    the error is fp32 rounding, <= ~(G + K / G) 2^-24 sum_k |x w| (8e-6 of it allowed), plus one
    bf16 rounding (2^-8 |y|) for bf16 x."""
    w = packed.dequantized()
    ref = F.linear(x.float(), w)
    y = decode_gemm(x, packed, out=out)
    if out is not None:
        assert y is out
    assert y.shape == (*x.shape[:-1], packed.N) and y.dtype == x.dtype
    mag = F.linear(x.float().abs(), w.abs())
    bound = 8e-6 * mag + 1e-6 + (2 ** -8 * ref.abs() if x.dtype == BF16 else 0)
    err = (y.float() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}, max err {err.max().item():.3g}"
    return y


def test_quantize_int4_definition():
    """scale = max|w_group| / 7, Q = round(w / scale) in [-7, 7]; the last group is short; a zero
    group gives scale 0 and Q 0; the nibble packing round-trips."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 100, generator=g)
    w[2, 64:] = 0.0
    q, s = quantize_int4(w, 64)
    assert q.dtype == torch.int8 and q.shape == (5, 100) and s.shape == (5, 2) and s.dtype == F32
    for gi, (a, b) in enumerate([(0, 64), (64, 100)]):
        amax = w[:, a:b].abs().amax(1)
        assert torch.equal(s[:, gi], amax / 7)
        safe = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
        assert torch.equal(q[:, a:b], torch.round(w[:, a:b] / safe[:, None]).clamp(-7, 7).to(torch.int8))
    assert s[2, 1] == 0 and not q[2, 64:].any()
    assert q.abs().max() == 7
    p = pack_int4(w, 64)
    assert p.is_int4 and not p.is_int8 and p.K == 100 and p.N == 5 and p.weight.shape == (5, 50)
    assert torch.equal(nibbles_int4(p.weight, 100), q)
    assert torch.equal(p.dequantized(), dequantize_int4(q, s, 64))
    # per element |W - s Q| <= s / 2
    assert bool(((w - p.dequantized()).abs() <= s.repeat_interleave(64, 1)[:, :100] / 2 + 1e-7).all())


@needs_cpu_kernels
def test_packed_layout():
    """packed[p, k2, j] = nibble(W[16 p + j, 2 k2]) | nibble(W[16 p + j, 2 k2 + 1]) << 4, group
    scales (Np, ng, 16), pad rows nibble 8 (Q = 0) and scale 0."""
    x, w = make(1, 19, 70)
    p = pack_int4(w, 32)
    q = nibbles_int4(p.weight, 70).to(torch.int16) + 8
    q = F.pad(q, (0, 0, 0, 32 - 19), value=8)
    want = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).view(2, 16, 35).transpose(1, 2)
    assert p.packed.shape == (2, 35, 16) and torch.equal(p.packed, want)
    assert p.group_scales.shape == (2, 3, 16)
    assert torch.equal(p.group_scales[1, :, 2], p.scales[18]) and torch.equal(p.group_scales[0, :, 5], p.scales[5])
    assert not p.group_scales[1, :, 3:].any()


SHAPES = [(1, 1, 2), (1, 7, 19), (2, 19, 33), (7, 33, 64), (16, 40, 130), (33, 17, 96), (128, 50, 200),
          (200, 16, 64), (2, 1024, 1024), (16, 1024, 2816)]


@needs_cpu_kernels
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in SHAPES])
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matches_reference(M, N, K, x_dtype, group, variant):
    if variant == "portable" and M * N * K > 3e6:
        pytest.skip("portable loops are slow at real shapes; the odd shapes cover them")
    x, w = make(M, N, K, x_dtype, seed=M + N + K)
    check_int4(x, pack_int4(w, group))


@needs_cpu_kernels
def test_int4_edge_cases(variant):
    """Zero weights, all-equal weights, extreme magnitudes, non-contiguous x with leading dims, out=."""
    x, _ = make(6, 1, 96)
    for w in (torch.zeros(21, 96), torch.full((21, 96), 0.37), torch.randn(21, 96) * 1e30,
              torch.randn(21, 96) * 1e-30):
        check_int4(x, pack_int4(w, 32))
    assert not decode_gemm(x, pack_int4(torch.zeros(21, 96), 32)).any()
    big, w = make(40, 23, 96, BF16)
    xs = big.view(4, 10, 96)[:, ::3]  # (4, 4, 96), strided rows
    out = torch.empty(4, 4, 23, dtype=BF16)
    y = check_int4(xs, pack_int4(w, 32), out=out)
    assert torch.equal(y.reshape(-1, 23), decode_gemm(xs.reshape(-1, 96).contiguous(), pack_int4(w, 32)))
    xt = torch.randn(96, 5).t()  # unit stride on the wrong axis
    check_int4(xt, pack_int4(w, 32))


@needs_cpu_kernels
@pytest.mark.parametrize("x_dtype,fmt", [(F32, "int4"), (BF16, "int4"), (BF16, "int8")],
                         ids=["fp32-int4", "bf16-int4", "bf16-int8"])
def test_rows_do_not_depend_on_the_batch(x_dtype, fmt, variant):
    """A row's bits alone equal its bits among 7..1000 rows, and with 1 or 2 threads."""
    x, w = make(1000, 75, 130, x_dtype, seed=3)
    packed = pack_int4(w, 64) if fmt == "int4" else pack_int8(w)
    alone = torch.cat([decode_gemm(x[i:i + 1], packed) for i in range(0, 1000, 37)])
    for M in (7, 13, 97, 193, 257, 1000):
        rows = list(range(0, M, 37))
        assert torch.equal(decode_gemm(x[:M], packed)[rows], alone[:len(rows)]), f"M={M} changes a row"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = decode_gemm(x[:257], packed)
        torch.set_num_threads(2)
        two = decode_gemm(x[:257], packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two), "the result depends on the thread count"


@needs_cpu_kernels
def test_variants_are_named():
    """The best loops on an avx512_bf16 CPU are the new dot loops; forcing portable switches all."""
    ext = _dispatch.extension()
    x = torch.randn(2, 64, dtype=BF16)
    y = torch.empty(2, 16, dtype=BF16)
    p = pack_int4(torch.randn(16, 64), 32)
    call = lambda: ext.decode_gemm_int4(x.data_ptr(), 2, 64, 64, _dispatch.DTYPE_CODES[BF16], p.packed.data_ptr(),
                                        p.packed.numel(), p.group_scales.data_ptr(), 32, 16, y.data_ptr(), 16, 1)
    check_variant_names(call, force_portable, "avx512-int4-bf16-dot", ("avx512_bf16", "avx512bw"))


def _p():
    return pack_int4(torch.randn(5, 64), 32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: quantize_int4(torch.randn(4, 64), 33), ValueError, "`group_size` must be an even int"),
    (lambda: quantize_int4(torch.randn(4, 64), 0), ValueError, "`group_size` must be an even int"),
    (lambda: quantize_int4(torch.tensor([[1.0, float("nan")]]), 2), ValueError, "non-finite"),
    (lambda: quantize_int4(torch.ones(3, 4, dtype=torch.int8)), ValueError, "must be a floating-point"),
    (lambda: quantize_int4("w"), TypeError, "`weight` must be a torch.Tensor"),
    (lambda: pack_int4_nibbles(torch.zeros(5, 31, dtype=torch.uint8), torch.ones(5, 2), 64, 32), ValueError,
     r"`nibbles` must be uint8 of shape \(N, ceil\(K / 2\)\)"),
    (lambda: pack_int4_nibbles(torch.zeros(5, 32), torch.ones(5, 2), 64, 32), ValueError, "`nibbles` must be uint8"),
    (lambda: pack_int4_nibbles(torch.zeros(5, 32, dtype=torch.uint8), torch.ones(5, 3), 64, 32), ValueError,
     r"`scales` must be float32 of shape \(5, 2\)"),
    (lambda: pack_int4_nibbles(torch.zeros(5, 32, dtype=torch.uint8), torch.ones(5, 2, dtype=BF16), 64, 32),
     ValueError, "`scales` must be float32"),
    (lambda: decode_gemm(torch.randn(2, 63), _p()), ValueError, "`x` must be float32 or bfloat16 .* K = 64"),
    (lambda: decode_gemm(torch.randn(2, 64, dtype=torch.float16), _p()), ValueError, "`x` must be float32 or bfloat16"),
    (lambda: decode_gemm(torch.randn(2, 64, device="meta"), _p()), ValueError, "`x` must be on the device"),
    (lambda: decode_gemm(torch.randn(2, 64), _p(), out=torch.empty(2, 4)), ValueError, r"`out` must be float32 of shape \(2, 5\)"),
    (lambda: decode_gemm(torch.randn(2, 64), _p(), out=torch.empty(2, 5, dtype=BF16)), ValueError, "`out` must be float32"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_decode_linear_int4(dtype):
    """DecodeLinear(weights="int4") keeps nibbles + scales as buffers, survives .to(dtype) and a
    state-dict round trip, and computes x @ W_deq^T; replace_linears swaps with int4 too."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    d = DecodeLinear(lin, weights="int4", group_size=32).to(dtype)
    assert d.weight.dtype == torch.uint8 and d.weight.shape == (40, 48) and d.scales.dtype == F32
    assert "group_size=32" in repr(d)
    x = torch.randn(3, 96).to(dtype)
    check_int4(x, pack_int4(lin.weight.detach(), 32))
    with torch.no_grad():
        assert torch.equal(d(x), decode_gemm(x, pack_int4(lin.weight.detach(), 32)))
        ref = F.linear(x.float(), pack_int4(lin.weight.detach(), 32).dequantized())
        d2 = DecodeLinear(nn.Linear(96, 40, bias=False), weights="int4", group_size=32)
        d2.load_state_dict(d.state_dict())
        assert torch.equal(d2(x), d(x))
        assert (d._torch(x).float() - ref).abs().max() <= 1e-4 + 2 ** -8 * ref.abs().max()
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False))
    replace_linears(model, weights="int4")
    assert all(isinstance(m, DecodeLinear) and m.weights == "int4" for m in (model[0], model[2]))
    with pytest.raises(ValueError, match="weights must be one of"):
        DecodeLinear(nn.Linear(4, 4, bias=False), weights="int3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("x_dtype", [F32, BF16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,N,K", [(1, 7, 19), (2, 1024, 1024), (16, 1024, 2816), (33, 40, 130), (200, 17, 96)])
def test_cuda_int4_matches_reference(M, N, K, x_dtype):
    if not hasattr(_dispatch.extension(), "decode_gemm_int4_cuda"):
        pytest.skip("no decode_gemm_int4_cuda kernel in this build")
    x, w = make(M, N, K, x_dtype)
    p_cpu = pack_int4(w, 64)
    p = pack_int4(w.cuda(), 64)
    ref = F.linear(x.float(), p_cpu.dequantized())
    y = decode_gemm(x.cuda(), p).cpu()
    mag = F.linear(x.float().abs(), p_cpu.dequantized().abs())
    lowp = {F32: 0.0, BF16: 2 ** -8, torch.float16: 2 ** -11}[x_dtype]
    bound = 8e-6 * mag + 1e-6 + lowp * ref.abs()
    assert bool(((y.float() - ref).abs() <= bound).all())
    rows = list(range(0, M, 5))
    alone = torch.cat([decode_gemm(x[i:i + 1].cuda(), p).cpu() for i in rows])
    assert torch.equal(y[rows], alone), "CUDA int4 rows depend on the batch"
