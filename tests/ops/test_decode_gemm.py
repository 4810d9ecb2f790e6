"""decode_gemm (y = x @ W^T on a pre-packed W, few rows) vs decode_gemm_ref; DecodeLinear swap."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.linear import DecodeLinear, replace_linears
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import (PANEL, decode_gemm, decode_gemm_ref, int8_error_bound, pack_int8,
                                               pack_weight, quantize_int8, tolerance)

F32, BF16, F16, I8 = torch.float32, torch.bfloat16, torch.float16, torch.int8
needs_cpu_kernels = pytest.mark.skipif(
    not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "decode_gemm")),
    reason="the _C extension with the decode_gemm CPU kernel is not built")


def make(M, N, K, x_dtype=F32, w_dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(x_dtype), torch.randn(N, K, generator=g).to(w_dtype)


def check(x, w, *, out=None, packed=None):
    """STYLE 5 rule against the fp32 reference; bf16 outputs also within 1 ulp of it.
    int8 packed weights: the reference is x @ (scales * Q)^T, the dequantized weight."""
    packed = packed or pack_weight(w)
    scales = packed.scales
    w = packed.weight
    ref32 = decode_gemm_ref(x.float(), w, scales)  # reference first, fp32 output (not rounded to x's dtype)
    result = decode_gemm(x, packed, out=out)
    if out is not None:
        assert result is out
    assert result.shape == (*x.shape[:-1], w.shape[0]) and result.dtype == x.dtype
    # torch at the kernel's own precision: F.linear in the common dtype (mixed dtypes: fp32 math
    # rounded to x's dtype, i.e. decode_gemm_ref)
    lowp = F.linear(x, w) if x.dtype == w.dtype else decode_gemm_ref(x, w, scales)
    err = (result.float() - ref32).abs()
    lowp_err = (lowp.float() - ref32).abs().max().item() if ref32.numel() else 0.0
    atol, rtol = tolerance(x.dtype)
    scale = ref32.abs().max().item() if ref32.numel() else 0.0
    bound = 2 * lowp_err + atol + rtol * scale
    if err.numel():
        assert err.max().item() <= bound, (f"max|kernel-ref32|={err.max().item():.3g} mean={err.mean().item():.3g} "
                                           f"> bound {bound:.3g} (max|torch_lowp-ref32|={lowp_err:.3g})")
    if x.dtype == BF16 and err.numel():
        # an fp32 sum of the same exact products, rounded once to bf16: within 1/2 ulp of ref32
        # (<= 2^-8 |y|) plus the accumulation-order difference (~1e-6 of max|y|); 1 ulp allowed
        excess = (err - (2 ** -7 * ref32.abs() + 1e-5 * scale)).max().item()
        assert excess <= 0, f"bf16 output differs from the reference by more than 1 ulp (excess {excess:.3g})"
    return result


# (M, N, K): M tiles hold <= 12 rows, panels 16 rows, bf16 packs k in pairs.
SHAPES = [
    pytest.param(1, 1, 1, id="smallest"),
    pytest.param(1, 7, 19, id="M1-odd"),
    pytest.param(2, 19, 33, id="M2-odd"),
    pytest.param(3, 33, 7, id="M3-K7"),
    pytest.param(5, 111, 769, id="M5-N111-K769"),
    pytest.param(13, 17, 111, id="M13-two-tiles"),
    pytest.param(16, 48, 64, id="M16-two-tiles"),
    pytest.param(33, 19, 33, id="M33-three-tiles"),
    pytest.param(64, 769, 19, id="M64-six-tiles"),
    pytest.param(256, 33, 65, id="M256-chunks"),  # several ~96-row chunks of 11-row tiles
    pytest.param(1000, 40, 130, id="M1000-chunks"),  # large batch: chunked, last tile short
    pytest.param(2, 3072, 1024, id="real-wqkv-M2"),
    pytest.param(16, 1024, 2816, id="real-w2-M16"),
    pytest.param(16, 8192, 1024, id="real-output-M16"),
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matches_reference(M, N, K, dtype):
    check(*make(M, N, K, dtype, dtype))


@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, BF16), (BF16, F32)], ids=["x32-wbf16", "xbf16-w32"])
@pytest.mark.parametrize("M,N,K", [(1, 7, 19), (2, 33, 111), (16, 40, 769)])
def test_mixed_dtypes(M, N, K, x_dtype, w_dtype):
    check(*make(M, N, K, x_dtype, w_dtype))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_packed_layout_is_exact(dtype):
    """The documented layout, values bit-exact, zero padding (N 19 -> 32 rows, bf16 K 7 -> 8)."""
    N, K = 19, 7
    w = torch.randn(N, K).to(dtype)
    p = pack_weight(w)
    np_, kp = -(-N // PANEL), K + (K % 2 if dtype == BF16 else 0)
    padded = torch.zeros(np_ * PANEL, kp, dtype=dtype)
    padded[:N, :K] = w
    if dtype == F32:  # packed[p, k, j] = W[16 p + j, k]
        assert p.packed.shape == (np_, K, PANEL)
        unpacked = p.packed.transpose(1, 2).reshape(np_ * PANEL, K)
    else:  # packed[p, k2, j, t] = W[16 p + j, 2 k2 + t]
        assert p.packed.shape == (np_, kp // 2, PANEL, 2)
        unpacked = p.packed.permute(0, 2, 1, 3).reshape(np_ * PANEL, kp)
    assert p.packed.is_contiguous() and torch.equal(unpacked, padded)
    assert (p.N, p.K, p.dtype) == (N, K, dtype) and p.weight.data_ptr() == w.data_ptr()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_strided_x_leading_dims_and_out(dtype):
    """x as a slice of a wider tensor (row stride > K, and a non-unit last stride), (B, n, K)
    inputs, out= given contiguous and transposed."""
    N, K = 40, 33
    _, w = make(1, N, K, dtype, dtype)
    packed = pack_weight(w)
    wide = torch.randn(6, 2 * K + 3).to(dtype)
    check(wide[:, 3:K + 3], w, packed=packed)  # row stride 2K + 3
    check(wide[:, ::2][:, :K], w, packed=packed)  # last stride 2
    check(torch.randn(2, 8, K).to(dtype), w, packed=packed)
    out = torch.full((5, N), float("nan"), dtype=dtype)
    check(torch.randn(5, K).to(dtype), w, packed=packed, out=out)
    out_t = torch.full((N, 5), float("nan"), dtype=dtype).t()
    check(torch.randn(5, K).to(dtype), w, packed=packed, out=out_t)
    x_row_broadcast = torch.randn(1, K).to(dtype).expand(4, K)  # row stride 0
    check(x_row_broadcast, w, packed=packed)


def test_zero_rows_and_inference_mode():
    x, w = make(0, 9, 5)
    assert decode_gemm(x, pack_weight(w)).shape == (0, 9)
    with torch.inference_mode():
        check(*make(3, 20, 17, BF16, BF16))


def test_opcheck():
    x, w = make(3, 20, 17)
    p = pack_weight(w)
    torch.library.opcheck(torch.ops.detailflow.decode_gemm.default, (x, p.packed, None, torch.empty(3, 20)))
    q = pack_int8(w)
    torch.library.opcheck(torch.ops.detailflow.decode_gemm.default, (x, q.packed, q.scales, torch.empty(3, 20)))


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_forced_backend(backend, monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, backend)
    check(*make(16, 40, 66, BF16, BF16))


# (x dtype, weight format): every inner loop of the CPU kernel (fp32, bf16 dot / widen, int8).
INVARIANCE_MODES = [(F32, F32), (BF16, BF16), (F32, BF16), (F32, I8), (BF16, I8)]


@needs_cpu_kernels
@pytest.mark.parametrize("x_dtype,w_fmt", INVARIANCE_MODES, ids=["fp32", "bf16", "fp32-x-bf16-w", "int8", "bf16-x-int8"])
def test_rows_do_not_depend_on_the_batch(x_dtype, w_fmt):
    """Batch invariance: a row's output is the same bits alone, among 7, 193 or 1000 rows (the
    tile, chunk and old F.linear-crossover boundaries), and with 1 or 2 threads."""
    x, w = make(1000, 75, 131, x_dtype, F32 if w_fmt == I8 else w_fmt, seed=3)
    packed = pack_int8(w) if w_fmt == I8 else pack_weight(w)
    alone = torch.cat([decode_gemm(x[i:i + 1], packed) for i in range(0, 1000, 37)])
    for M in (7, 13, 97, 193, 257, 1000):
        y = decode_gemm(x[:M], packed)
        rows = list(range(0, M, 37))
        assert torch.equal(y[rows], alone[:len(rows)]), f"rows of an M={M} call differ from the same rows alone"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = decode_gemm(x[:257], packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, decode_gemm(x[:257], packed)), "the result depends on the thread count"


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_decode_linear_swap(dtype):
    """replace_linears keeps the state dict; any row count runs the kernel (a row's result is
    the same alone or among 300), and a weight loaded through load_state_dict is repacked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(33, 40, bias=False), nn.Linear(40, 7, bias=True)).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replace_linears(model)
    assert type(model[0]) is DecodeLinear and type(model[1]) is nn.Linear  # biased ones stay
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        x = torch.randn(2, 4, 33).to(dtype)  # 8 rows: the kernel
        check(x, model[0].weight.detach(), packed=model[0]._packed)
        y = model[0](x)
        assert (y.float() - F.linear(x, model[0].weight).float()).abs().max() <= 2 ** -6 * y.float().abs().max()
        x_big = torch.randn(300, 33).to(dtype)  # past the old F.linear crossover: still ours
        y_big = model[0](x_big)
        check(x_big, model[0].weight.detach(), packed=model[0]._packed)
        assert all(torch.equal(model[0](x_big[i:i + 1])[0], y_big[i]) for i in (0, 7, 150, 299))
        doubled = {k: v * 2 for k, v in before.items()}
        model.load_state_dict(doubled)  # the packed layout must follow
        assert torch.equal(model[0].weight, doubled["0.weight"])
        torch.testing.assert_close(model[0](x), F.linear(x, doubled["0.weight"]), atol=1e-4, rtol=2e-2)
        model[0].weight.mul_(3)  # .weight is unpacked on demand: editing that copy changes nothing
        assert torch.equal(model[0].weight, doubled["0.weight"])
        model.load_state_dict(before)
        torch.testing.assert_close(model[0](x), y, atol=0, rtol=0)


def _bad(**overrides):
    x, w = make(2, 5, 7)
    args = dict(x=x, packed=pack_weight(w))
    args.update(overrides)
    out = args.pop("out", None)
    return lambda: decode_gemm(args["x"], args["packed"], out=out)


@pytest.mark.parametrize("call,exc,match", [
    (_bad(packed=torch.randn(5, 7)), TypeError, "`packed` must be a PackedWeight"),
    (_bad(x=[1.0] * 7), TypeError, "`x` must be a torch.Tensor"),
    (_bad(x=torch.randn(2, 8)), ValueError, r"`x` must be float32 or bfloat16 \(float16 too on CUDA\) of shape \(..., K\) with K = 7, got \(2, 8\)"),
    (_bad(x=torch.randn(2, 7, dtype=torch.float16)), ValueError, "`x` must be float32 or bfloat16"),
    (_bad(x=torch.randn(2, 7, device="meta")), ValueError, "`x` must be on the device of `packed`"),
    (_bad(out=torch.empty(2, 4)), ValueError, r"`out` must be float32 of shape \(2, 5\)"),
    (_bad(out=torch.empty(2, 5, dtype=torch.bfloat16)), ValueError, "`out` must be float32"),
    (lambda: pack_weight(torch.randn(5)), ValueError, r"`weight` must be float32 or bfloat16 .* of shape \(N, K\)"),
    (lambda: pack_weight(torch.randn(5, 0)), ValueError, "with N, K >= 1"),
    (lambda: pack_weight(torch.randn(5, 7, dtype=torch.float16)), ValueError, "`weight` must be float32 or bfloat16"),
    (lambda: pack_weight(None), TypeError, "`weight` must be a torch.Tensor"),
    (lambda: pack_weight(torch.ones(5, 7, dtype=I8)), ValueError, "`scales` must be given exactly for an int8"),
    (lambda: pack_weight(torch.randn(5, 7), torch.ones(5)), ValueError, "`scales` is only for int8 weights"),
    (lambda: pack_weight(torch.ones(5, 7, dtype=I8), torch.ones(4)), ValueError, r"`scales` must be float32 of shape \(5,\)"),
    (lambda: pack_weight(torch.ones(5, 7, dtype=I8), torch.ones(5, dtype=BF16)), ValueError, "`scales` must be float32"),
    (lambda: quantize_int8(torch.tensor([[1.0, float("inf")]])), ValueError, "non-finite"),
    (lambda: quantize_int8(torch.ones(3, 4, dtype=I8)), ValueError, "must be a floating-point"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------------- int8 weight-only

INT8_SHAPES = [
    pytest.param(1, 1, 1, id="smallest"),
    pytest.param(1, 7, 19, id="M1-odd"),
    pytest.param(2, 19, 33, id="M2-odd"),
    pytest.param(5, 111, 769, id="M5-N111-K769"),
    pytest.param(13, 17, 111, id="M13-two-tiles"),
    pytest.param(33, 19, 33, id="M33-three-tiles"),
    pytest.param(64, 769, 19, id="M64-six-tiles"),
    pytest.param(2, 3072, 1024, id="real-wqkv-M2"),
    pytest.param(16, 1024, 2816, id="real-w2-M16"),
]


def test_quantize_int8_definition():
    """scale = max|w_row| / 127, Q = round(w / scale) in [-127, 127]; a zero row gives 0 / 0."""
    w = torch.randn(9, 37)
    w[3] = 0.0
    w[5, 7] = -50.0  # the row's max magnitude is negative: Q = -127 there
    q, s = quantize_int8(w)
    assert q.dtype == I8 and s.dtype == F32 and q.shape == w.shape and s.shape == (9,)
    torch.testing.assert_close(s, w.abs().amax(1) / 127, rtol=0, atol=0)
    assert s[3] == 0 and torch.all(q[3] == 0) and q[5, 7] == -127
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    nz = s > 0
    torch.testing.assert_close(q[nz].float(), torch.round(w[nz] / s[nz, None]).clamp(-127, 127), rtol=0, atol=0)
    # the per-element rounding error is at most half a step
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    q16, s16 = quantize_int8(w.to(BF16))  # any float dtype in, fp32 math
    assert q16.dtype == I8 and s16.dtype == F32


@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["x32", "xbf16"])
@pytest.mark.parametrize("M,N,K", INT8_SHAPES)
def test_int8_matches_dequantized_reference(M, N, K, x_dtype):
    """The kernel against x @ (scales * Q)^T in fp32: the fp32 tolerance rule (tight)."""
    x, w = make(M, N, K, x_dtype, F32)
    check(x, w, packed=pack_int8(w))


@pytest.mark.parametrize("M,N,K", [(2, 19, 33), (16, 40, 769), (16, 1024, 2816), (64, 769, 19)])
def test_int8_error_vs_unquantized(M, N, K):
    """Documented bound against the unquantized fp32 product: per element
    |y_int8 - x @ W^T| <= scale[n] / 2 * sum_k |x[m, k]| (+ fp32 rounding), and in RMS the error
    is below 1.5% of the RMS of y for Gaussian weights (measured 0.5-0.9%)."""
    x, w = make(M, N, K, F32, F32, seed=1)
    p = pack_int8(w)
    y = decode_gemm(x, p)
    full = x @ w.T
    err = (y - full).abs()
    slack = 1e-5 + 1e-6 * full.abs().max()
    assert (err <= int8_error_bound(x, p) + slack).all()
    assert (err.norm() / full.norm()).item() < 0.015


@pytest.mark.parametrize("M,N,K", [(3, 19, 7), (2, 40, 66)])
def test_int8_packed_layout_and_strides(M, N, K):
    """int8 panels = the fp32 layout with 1-byte elements; strided x and a transposed out."""
    w = torch.randn(N, K)
    p = pack_int8(w)
    np_ = -(-N // PANEL)
    padded = torch.zeros(np_ * PANEL, K, dtype=I8)
    padded[:N] = p.weight
    assert p.packed.shape == (np_, K, PANEL) and p.packed.dtype == I8
    assert torch.equal(p.packed.transpose(1, 2).reshape(np_ * PANEL, K), padded)
    wide = torch.randn(M + 2, 2 * K + 3)
    check(wide[:, 3:K + 3], w, packed=p)
    out_t = torch.full((N, M), float("nan")).t()
    check(torch.randn(M, K), w, packed=p, out=out_t)
    check(torch.randn(2, 4, K).to(BF16), w, packed=p)


@needs_cpu_kernels
@pytest.mark.parametrize("weights", ["native", "int8", "int4", "w8a8", "w4a8"])
def test_decode_linear_holds_only_the_packed_layout(weights):
    """Weights held once: a DecodeLinear has no parameter or buffer beside its packed panels
    (and the kernel's scales), its state dict is unpacked from them exactly, and .to(bf16)
    repacks into the bf16 layout (the same values as packing a bf16 weight)."""
    torch.manual_seed(0)
    lin = nn.Linear(70, 37, bias=False)
    w = lin.weight.detach().clone()
    d = DecodeLinear(lin, weights)
    assert list(d.parameters()) == [] and list(d.buffers()) == []
    p = d.packed_for(torch.randn(1, 70))
    assert p is not None and p.source is None
    held = p.packed.numel() * p.packed.element_size() + (
        p.kernel_scales.numel() * 4 if p.kernel_scales is not None else 0) + (
        p.colsum.numel() * 4 if p.colsum is not None else 0)
    if weights == "native":
        assert held == 48 * 70 * 4 and torch.equal(d.weight, w)  # 3 panels of 16 rows, fp32
    elif weights == "int8":
        assert held == 48 * 70 + 37 * 4 and torch.equal(d.weight, quantize_int8(w)[0])
    elif weights == "w8a8":  # k padded to 72, scales and column sums
        assert held == 48 * 72 + 2 * 37 * 4 and torch.equal(d.weight, quantize_int8(w)[0])
    state = d.state_dict()
    assert set(state) == ({"weight"} if weights == "native" else {"weight", "scales"})
    fresh = DecodeLinear(nn.Linear(70, 37, bias=False), weights)
    fresh.load_state_dict(state)
    x = torch.randn(3, 70)
    assert torch.equal(fresh(x), d(x))
    d.to(BF16)
    xb = x.to(BF16)
    if weights == "native":
        assert d.dtype == BF16 and torch.equal(d.weight, w.to(BF16))
        assert torch.equal(d(xb), decode_gemm(xb, pack_weight(w.to(BF16))))
    else:
        assert d.scales.dtype == F32 and torch.equal(d(xb), fresh(xb))
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({k: v[:5] for k, v in state.items()})


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_decode_linear_int8(dtype):
    """int8 DecodeLinear: Q + scales buffers in the state dict (scales stay fp32 across .to),
    few and many rows on the int8 kernel, equal to the dequantized product within the
    tolerance rule."""
    torch.manual_seed(0)
    lin = nn.Linear(66, 40, bias=False)
    w32 = lin.weight.detach().clone()
    model = nn.Sequential(lin)
    replace_linears(model, weights="int8")
    d = model[0]
    assert type(d) is DecodeLinear and d.weight.dtype == I8 and d.scales.dtype == F32
    assert set(model.state_dict()) == {"0.weight", "0.scales"}
    scales = d.scales.clone()
    model.to(dtype)
    assert d.scales.dtype == F32 and torch.equal(d.scales, scales) and d.weight.dtype == I8
    q, s = quantize_int8(w32)
    assert torch.equal(d.weight, q) and torch.equal(d.scales, s)
    with torch.no_grad():
        for rows in (8, 300):
            x = torch.randn(rows, 66).to(dtype)
            y = d(x)
            ref = decode_gemm_ref(x.float(), q, s)
            tol = 2 ** -7 * ref.abs() + 1e-5 if dtype == BF16 else 1e-5 + 1e-6 * ref.abs().max()
            assert y.dtype == dtype and ((y.float() - ref).abs() <= tol).all()
    with pytest.raises(ValueError, match=r"weights must be one of \('native', 'int8', 'int4', 'w8a8', 'w4a8'\)"):
        DecodeLinear(nn.Linear(3, 4, bias=False), weights="int3")


# ---------------------------------------------------------------------------- CUDA

def _has_cuda_kernel() -> bool:
    return (torch.cuda.is_available() and _dispatch.has_cuda_kernels()
            and hasattr(_dispatch.extension(), "decode_gemm_cuda"))


needs_cuda_kernel = pytest.mark.skipif(not _has_cuda_kernel(), reason="needs a GPU and the decode_gemm_cuda kernel")
CUDA_SHAPES = [
    pytest.param(1, 1, 1, id="smallest"),
    pytest.param(1, 7, 19, id="M1-odd"),
    pytest.param(2, 19, 33, id="M2-odd"),
    pytest.param(3, 33, 8, id="M3-K8"),
    pytest.param(5, 111, 769, id="M5-N111-K769"),
    pytest.param(16, 48, 64, id="M16-K64"),
    pytest.param(17, 19, 520, id="M17-two-row-tiles"),
    pytest.param(64, 769, 19, id="M64-four-row-tiles"),
    pytest.param(9, 16, 4099, id="split-K-odd"),
    pytest.param(2, 3072, 1024, id="real-wqkv-M2"),
    pytest.param(16, 1024, 2816, id="real-w2-M16", marks=pytest.mark.slow),
    pytest.param(2, 8192, 1024, id="real-output-M2", marks=pytest.mark.slow),
]


def _cuda_make(M, N, K, dtype, fmt, seed=0):
    x, w = make(M, N, K, F32, F32, seed)
    x, w = x.cuda().to(dtype), w.cuda()
    return x, w.to(dtype), (pack_int8(w) if fmt == "int8" else pack_weight(w.to(dtype)))


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("fmt", ["native", "int8"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("M,N,K", CUDA_SHAPES)
def test_cuda_matches_reference(M, N, K, dtype, fmt):
    x, w, p = _cuda_make(M, N, K, dtype, fmt)
    assert _dispatch.pick("decode_gemm", x, p.packed, p.kernel_scales, x.new_empty(M, N)).name == "cuda"
    check(x, w, packed=p)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_misaligned_strided_deterministic_and_cpu_agreement(monkeypatch):
    """A weight at a 2-byte offset (scalar path), strided x / transposed out, split-K
    determinism (two runs bit-equal), CPU vs CUDA on the same int8 Q and scales, forced backend."""
    N, K = 40, 1024
    base = torch.randn(N * K + 1, device="cuda").to(BF16)
    w = base[1:].view(N, K)  # contiguous, data_ptr % 16 == 2
    p = pack_weight(w)
    assert p.packed.data_ptr() % 16 != 0
    check(torch.randn(3, K, device="cuda").to(BF16), w, packed=p)
    wide = torch.randn(6, 2 * K + 3, device="cuda").to(BF16)
    check(wide[:, 3:K + 3], w, packed=p)
    out_t = torch.full((N, 5), float("nan"), device="cuda", dtype=BF16).t()
    check(torch.randn(5, K, device="cuda").to(BF16), w, packed=p, out=out_t)
    x = torch.randn(16, K, device="cuda").to(BF16)
    assert torch.equal(decode_gemm(x, p), decode_gemm(x, p))
    w32 = torch.randn(N, K)
    pc, pg = pack_int8(w32), pack_int8(w32.cuda())
    assert torch.equal(pc.weight, pg.weight.cpu()) and torch.equal(pc.scales, pg.scales.cpu())
    xc = torch.randn(7, K)
    torch.testing.assert_close(decode_gemm(xc.cuda(), pg).cpu(), decode_gemm(xc, pc), atol=1e-4, rtol=1e-5)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    check(x, w, packed=p)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("fmt", ["native", "int8"])
def test_cuda_graph_capture(fmt):
    """Captured on a side stream and replayed: equal to eager (split-K scratch included)."""
    x, w, p = _cuda_make(16, 1024, 2816, BF16, fmt)
    eager = decode_gemm(x, p)
    out = torch.empty_like(eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            decode_gemm(x, p, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    out.zero_()
    with torch.cuda.graph(g):
        decode_gemm(x, p, out=out)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("weights", ["native", "int8"])
def test_cuda_decode_linear(weights):
    """replace_linears on CUDA: few rows run the CUDA kernel, many rows the torch path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 3072, bias=False)).cuda().to(BF16)
    w = model[0].weight.detach().clone()
    replace_linears(model, weights=weights)
    d = model[0]
    assert type(d) is DecodeLinear
    q, s = (quantize_int8(w) if weights == "int8" else (w, None))
    with torch.no_grad():
        for rows in (2, 16, 200):
            x = torch.randn(rows, 1024, device="cuda").to(BF16)
            ref = decode_gemm_ref(x.float(), q, s)
            y = d(x).float()
            assert ((y - ref).abs() <= 2 ** -7 * ref.abs() + 5e-2).all(), rows
