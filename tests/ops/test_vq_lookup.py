"""vq_lookup (gather + normalize + post_quant_conv + pos) against vq_lookup_ref.

Float rule (STYLE practice 5): max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol + rtol *
max|ref32|, where ref32 is the reference on fp32 copies of the inputs (no final rounding) and
torch_lowp the natural torch composition at the weight's precision (vq_lookup_ref(upcast=False)).
"""
from __future__ import annotations

import pytest
import torch

from _kernel_marks import gpu_kernel, needs_cpu_kernel
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.vq_lookup import tolerance, vq_lookup, vq_lookup_ref

F32, BF16 = torch.float32, torch.bfloat16
needs_cpu_kernels = needs_cpu_kernel("vq_lookup")


def _make(B, T, K, D, C, cb_dtype=F32, w_dtype=F32, bias=True, pos=True, t_max=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (B, T), generator=g)
    codebook = torch.randn(K, D, generator=g).to(cb_dtype)
    weight = (torch.randn(C, D, generator=g) * 0.3).to(w_dtype)
    b = (torch.randn(C, generator=g) * 0.1).to(w_dtype) if bias else None
    p = (torch.randn(t_max or T, C, generator=g) * 0.02).to(w_dtype) if pos else None
    return codes, codebook, weight, b, p


def _f32(t):
    return None if t is None else t.float()


def _check(got, codes, codebook, weight, bias=None, pos_embed=None):
    ref32 = vq_lookup_ref(codes, codebook.float(), weight.float(), _f32(bias), _f32(pos_embed))
    lowp = vq_lookup_ref(codes, codebook, weight, bias, pos_embed, upcast=False)
    assert got.shape == ref32.shape and got.dtype == weight.dtype
    err = (got.float() - ref32).abs()
    lowp_err = (lowp.float() - ref32).abs().max().item() if ref32.numel() else 0.0
    atol, rtol = tolerance(weight.dtype)
    ref_max = ref32.abs().max().item() if ref32.numel() else 0.0
    bound = 2 * lowp_err + atol + rtol * ref_max
    max_err = err.max().item() if err.numel() else 0.0
    mean_err = err.mean().item() if err.numel() else 0.0
    assert max_err <= bound, (f"max|err| {max_err:.3e} (mean {mean_err:.3e}) > bound {bound:.3e} "
                              f"(torch_lowp max|err| {lowp_err:.3e}, atol {atol}, rtol {rtol})")


@pytest.mark.parametrize("cb_dtype,w_dtype", [(F32, F32), (F32, BF16), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("B,T,K,D,C", [
    (1, 1, 1, 8, 1),          # smallest
    (3, 7, 19, 8, 33),        # odd sizes, D = 8 fast path (4-row blocks and 1-row tails)
    (2, 19, 111, 7, 769),     # odd D: generic path
    (5, 11, 33, 1, 19),       # D = 1
    (2, 128, 8192, 8, 768),   # DetailFlow-16 decoder (siglip2_base from scratch)
    (1, 128, 8192, 8, 1152),  # so400m-initialized decoder width
])
def test_matches_reference(B, T, K, D, C, cb_dtype, w_dtype):
    args = _make(B, T, K, D, C, cb_dtype, w_dtype)
    _check(vq_lookup(*args), *args)


@pytest.mark.parametrize("bias,pos", [(False, False), (True, False), (False, True)])
def test_optional_bias_and_pos(bias, pos):
    args = _make(2, 9, 40, 8, 65, bias=bias, pos=pos)
    _check(vq_lookup(*args), *args)


def test_real_batch_and_long_prefix():
    args = _make(64, 128, 8192, 8, 768)  # batch 64 decode
    _check(vq_lookup(*args), *args)
    args = _make(3, 256, 8192, 8, 768, w_dtype=BF16)  # 256 tokens
    _check(vq_lookup(*args), *args)


def test_pos_embed_parameter_layout_and_prefix():
    """latent_pos_embed is (1, N, C); a prefix t < N uses its first t rows."""
    codes, codebook, weight, bias, _ = _make(2, 37, 64, 8, 48)
    pos3 = torch.randn(1, 128, 48) * 0.02
    got = vq_lookup(codes, codebook, weight, bias, pos3)
    _check(got, codes, codebook, weight, bias, pos3[0])
    torch.testing.assert_close(got, vq_lookup(codes, codebook, weight, bias, pos3[0, :37]), rtol=0, atol=0)


def test_raw_codebook_rows_are_normalized():
    codes, codebook, weight, bias, pos = _make(2, 16, 32, 8, 24)
    codebook[3] = 0.0  # zero row: normalize gives 0 (1e-12 clamp), output = bias + pos
    codes[0, 0] = 3
    got = vq_lookup(codes, codebook * 7.5, weight, bias, pos)
    _check(got, codes, codebook * 7.5, weight, bias, pos)
    torch.testing.assert_close(got, vq_lookup(codes, codebook, weight, bias, pos), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0, 0], bias + pos[0], rtol=0, atol=1e-7)


def test_non_contiguous_inputs_and_out():
    codes, codebook, weight, bias, pos = _make(3, 21, 50, 8, 40)
    g = torch.Generator().manual_seed(1)
    codes_w = torch.randint(0, 50, (3, 42), generator=g)
    codes_w[:, ::2] = codes
    cb_w = torch.randn(50, 16, generator=g)
    cb_w[:, :8] = codebook
    w_w = torch.randn(40, 24, generator=g)
    w_w[:, 3:11] = weight
    pos_w = torch.randn(30, 80, generator=g)
    pos_w[:21, 40:] = pos
    out_w = torch.zeros(3, 21, 100)
    args = (codes_w[:, ::2], cb_w[:, :8], w_w[:, 3:11], bias, pos_w[:, 40:])
    assert not any(t.is_contiguous() for t in args if t is not bias)
    res = vq_lookup(*args, out=out_w[:, :, 10:50])
    assert res.data_ptr() == out_w[:, :, 10:50].data_ptr()
    _check(out_w[:, :, 10:50], codes, codebook, weight, bias, pos)
    assert (out_w[:, :, :10] == 0).all() and (out_w[:, :, 50:] == 0).all()
    _check(vq_lookup(*args), codes, codebook, weight, bias, pos)


@pytest.mark.parametrize("w_dtype", [F32, BF16])
def test_out_given_and_not_given(w_dtype):
    args = _make(2, 13, 30, 8, 20, w_dtype=w_dtype)
    out = torch.full((2, 13, 20), float("nan"), dtype=w_dtype)
    res = vq_lookup(*args, out=out)
    assert res is out
    torch.testing.assert_close(out, vq_lookup(*args), rtol=0, atol=0)


def test_empty_batch():
    codes, codebook, weight, bias, pos = _make(1, 4, 10, 8, 6)
    got = vq_lookup(codes[:0], codebook, weight, bias, pos)
    assert got.shape == (0, 4, 6)


def test_opcheck():
    codes, codebook, weight, bias, pos = _make(2, 5, 12, 8, 7)
    out = torch.empty(2, 5, 7)
    torch.library.opcheck(torch.ops.detailflow.vq_lookup.default, (codes, codebook, weight, bias, pos, out))


def test_forced_torch_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "torch")
    args = _make(2, 9, 30, 8, 16)
    assert _dispatch.pick("vq_lookup", *args, torch.empty(2, 9, 16)).name == "torch"
    _check(vq_lookup(*args), *args)


@needs_cpu_kernels
@pytest.mark.parametrize("w_dtype", [F32, BF16])
def test_forced_cpu_backend(monkeypatch, w_dtype):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    args = _make(2, 9, 30, 8, 16, w_dtype=w_dtype)
    assert _dispatch.pick("vq_lookup", *args, torch.empty(2, 9, 16, dtype=w_dtype)).name == "cpu"
    _check(vq_lookup(*args), *args)


@needs_cpu_kernels
def test_kernel_rejects_out_of_range_code(monkeypatch):
    """The C++ entry point re-checks the code range (the op called without the wrapper)."""
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    codes, codebook, weight, bias, pos = _make(2, 6, 12, 8, 7)
    codes[1, 4] = 12
    out = torch.zeros(2, 6, 7)
    with pytest.raises(ValueError, match=r"codes must be in \[0, 12\), got 12 at \(1, 4\)"):
        torch.ops.detailflow.vq_lookup.default(codes, codebook, weight, bias, pos, out)
    assert (out == 0).all()


def test_bad_inputs():
    codes, codebook, weight, bias, pos = _make(2, 6, 12, 8, 7)
    bad = codes.clone()
    bad[1, 2] = 12
    with pytest.raises(ValueError, match=r"`codes` values must be in \[0, K\) = \[0, 12\), got 12 at \(1, 2\)"):
        vq_lookup(bad, codebook, weight, bias, pos)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match="got -3 at"):
        vq_lookup(bad, codebook, weight, bias, pos)
    with pytest.raises(ValueError, match="`codes` must be int64 of shape"):
        vq_lookup(codes.int(), codebook, weight, bias, pos)
    with pytest.raises(ValueError, match=r"`codebook` must be float32 or bfloat16 of shape \(K, D\).*float16"):
        vq_lookup(codes, codebook.half(), weight, bias, pos)
    with pytest.raises(ValueError, match=r"`weight` must be .* D = 8"):
        vq_lookup(codes, codebook, weight[:, :4], bias, pos)
    with pytest.raises(ValueError, match="`bias` must be"):
        vq_lookup(codes, codebook, weight, bias[:3], pos)
    with pytest.raises(ValueError, match="`bias` must be"):
        vq_lookup(codes, codebook, weight, bias.bfloat16(), pos)
    with pytest.raises(ValueError, match="`pos_embed` must be .* T_max >= T = 6"):
        vq_lookup(codes, codebook, weight, bias, pos[:5])
    with pytest.raises(ValueError, match=r"`out` must be .* \(2, 6, 7\)"):
        vq_lookup(codes, codebook, weight, bias, pos, out=torch.empty(2, 6, 8))
    with pytest.raises(TypeError, match="`codebook` must be a torch.Tensor"):
        vq_lookup(codes, codebook.tolist(), weight)
    with pytest.raises(TypeError, match="`bias` must be a torch.Tensor or None"):
        vq_lookup(codes, codebook, weight, 1.0)


# ---------------------------------------------------------------------------------------------
# CUDA kernel (csrc/cuda/vq_lookup.cu): run by `pytest -m gpu` on a machine with a GPU.

F16 = torch.float16
_gpu = gpu_kernel("vq_lookup_cuda")


def _cuda(*tensors):
    return tuple(None if t is None else t.cuda() for t in tensors)


def _check_cuda(got, codes, codebook, weight, bias=None, pos_embed=None):
    """The file's tolerance rule for a CUDA result: ref32 on CPU fp32 copies (independent of
    cuBLAS settings), torch_lowp on the GPU at the inputs' own precision."""
    assert got.is_cuda and got.dtype == weight.dtype
    cpu = [None if t is None else t.cpu() for t in (codes, codebook, weight, bias, pos_embed)]
    ref32 = vq_lookup_ref(cpu[0], cpu[1].float(), cpu[2].float(), _f32(cpu[3]), _f32(cpu[4]))
    lowp = vq_lookup_ref(codes, codebook, weight, bias, pos_embed, upcast=False).cpu()
    g = got.cpu()
    assert g.shape == ref32.shape
    err = (g.float() - ref32).abs()
    lowp_err = (lowp.float() - ref32).abs().max().item() if ref32.numel() else 0.0
    atol, rtol = tolerance(weight.dtype)
    bound = 2 * lowp_err + atol + rtol * (ref32.abs().max().item() if ref32.numel() else 0.0)
    max_err = err.max().item() if err.numel() else 0.0
    assert max_err <= bound, (f"max|err| {max_err:.3e} (mean {err.mean().item():.3e}) > bound {bound:.3e} "
                              f"(torch_lowp max|err| {lowp_err:.3e}, atol {atol}, rtol {rtol})")


@_gpu
@pytest.mark.parametrize("cb_dtype,w_dtype", [(F32, F32), (F32, BF16), (BF16, BF16), (BF16, F32),
                                              (F16, F16), (F32, F16)])
@pytest.mark.parametrize("B,T,K,D,C", [
    (1, 1, 1, 8, 1),           # smallest (scalar-column variant)
    (3, 7, 19, 8, 33),         # odd C: scalar columns
    (4, 9, 50, 8, 36),         # C % 4 == 0: vector variant, 9 column groups
    (2, 19, 111, 7, 769),      # odd D: generic-D kernel
    (5, 11, 33, 1, 19),        # D = 1
    (3, 5, 40, 16, 64),        # D = 16, vector variant
    (2, 128, 8192, 8, 1024),   # DetailFlow-16 decode, decoder width 1024
    (1, 128, 8192, 8, 1152),   # so400m width: 2 column tiles of 144 groups
])
def test_cuda_matches_reference(B, T, K, D, C, cb_dtype, w_dtype):
    args = _cuda(*_make(B, T, K, D, C, cb_dtype, w_dtype))
    _check_cuda(vq_lookup(*args), *args)


@_gpu
@pytest.mark.parametrize("w_dtype", [BF16, F32])
def test_cuda_real_batch(w_dtype):
    args = _cuda(*_make(64, 128, 8192, 8, 1024, w_dtype=w_dtype, seed=2))  # batch 64 decode
    _check_cuda(vq_lookup(*args), *args)


@_gpu
@pytest.mark.slow
def test_cuda_largest_batch():
    args = _cuda(*_make(256, 128, 8192, 8, 1024, w_dtype=BF16, seed=4))  # 32768 rows, 64 a block
    _check_cuda(vq_lookup(*args), *args)


@_gpu
@pytest.mark.parametrize("bias,pos", [(False, False), (True, False), (False, True)])
def test_cuda_optional_bias_and_pos(bias, pos):
    args = _cuda(*_make(2, 9, 40, 8, 64, w_dtype=BF16, bias=bias, pos=pos))
    _check_cuda(vq_lookup(*args), *args)


@_gpu
def test_cuda_pos_embed_parameter_layout_and_prefix():
    codes, codebook, weight, bias, _ = _cuda(*_make(2, 37, 64, 8, 48))
    pos3 = torch.randn(1, 128, 48, device="cuda") * 0.02
    got = vq_lookup(codes, codebook, weight, bias, pos3)
    _check_cuda(got, codes, codebook, weight, bias, pos3[0])
    torch.testing.assert_close(got, vq_lookup(codes, codebook, weight, bias, pos3[0, :37]), rtol=0, atol=0)


@_gpu
def test_cuda_zero_row_and_raw_scale():
    codes, codebook, weight, bias, pos = _make(2, 16, 32, 8, 24)
    codebook[3] = 0.0  # normalizes to 0: output = bias + pos
    codes[0, 0] = 3
    codes, codebook, weight, bias, pos = _cuda(codes, codebook, weight, bias, pos)
    got = vq_lookup(codes, codebook * 7.5, weight, bias, pos)
    _check_cuda(got, codes, codebook * 7.5, weight, bias, pos)
    torch.testing.assert_close(got, vq_lookup(codes, codebook, weight, bias, pos), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0, 0], bias + pos[0], rtol=0, atol=1e-7)


@_gpu
@pytest.mark.parametrize("w_dtype", [F32, BF16, F16])
def test_cuda_non_contiguous_inputs_and_out(w_dtype):
    """Strided rows everywhere; pos_embed's row stride 81 and the out view's offset 10 also
    force the scalar-column variant (no aligned vector access), the dense calls the vector one."""
    codes, codebook, weight, bias, pos = _make(3, 21, 50, 8, 40, w_dtype=w_dtype)
    g = torch.Generator().manual_seed(1)
    codes_w = torch.randint(0, 50, (3, 42), generator=g)
    codes_w[:, ::2] = codes
    cb_w = torch.randn(50, 16, generator=g)
    cb_w[:, :8] = codebook
    w_w = torch.randn(40, 24, generator=g).to(w_dtype)
    w_w[:, 3:11] = weight
    pos_w = torch.randn(30, 81, generator=g).to(w_dtype)
    pos_w[:21, 41:] = pos
    codes_w, cb_w, w_w, pos_w, bias_c = _cuda(codes_w, cb_w, w_w, pos_w, bias)
    out_w = torch.zeros(3, 21, 100, dtype=w_dtype, device="cuda")
    args = (codes_w[:, ::2], cb_w[:, :8], w_w[:, 3:11], bias_c, pos_w[:, 41:])
    assert not any(t.is_contiguous() for t in args if t is not bias_c)
    res = vq_lookup(*args, out=out_w[:, :, 10:50])
    assert res.data_ptr() == out_w[:, :, 10:50].data_ptr()
    ref_args = _cuda(codes, codebook, weight, bias, pos)
    _check_cuda(out_w[:, :, 10:50], *ref_args)
    assert (out_w[:, :, :10] == 0).all() and (out_w[:, :, 50:] == 0).all()
    _check_cuda(vq_lookup(*args), *ref_args)
    _check_cuda(vq_lookup(*ref_args), *ref_args)


@_gpu
@pytest.mark.parametrize("w_dtype", [F32, BF16])
def test_cuda_agrees_with_cpu_kernel(w_dtype):
    """Same contract on both devices: fp32 accumulation, one rounding; results agree to the
    rounding of the (differently ordered) fp32 sums."""
    args = _make(3, 128, 8192, 8, 768, w_dtype=w_dtype, seed=6)
    cpu = vq_lookup(*args)
    gpu = vq_lookup(*_cuda(*args)).cpu()
    atol = 1e-5 if w_dtype == F32 else 2 ** -7 * cpu.float().abs().max().item()  # <= 1 bf16 ulp
    torch.testing.assert_close(gpu.float(), cpu.float(), rtol=0, atol=atol)


@_gpu
def test_cuda_out_given_and_empty():
    args = _cuda(*_make(2, 13, 30, 8, 20, w_dtype=BF16))
    out = torch.full((2, 13, 20), float("nan"), dtype=BF16, device="cuda")
    assert vq_lookup(*args, out=out) is out
    torch.testing.assert_close(out, vq_lookup(*args), rtol=0, atol=0)
    codes, codebook, weight, bias, pos = args
    assert vq_lookup(codes[:0], codebook, weight, bias, pos).shape == (0, 13, 20)


@_gpu
def test_cuda_forced_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    args = _cuda(*_make(2, 9, 30, 8, 16, w_dtype=F16))
    assert _dispatch.pick("vq_lookup", *args, torch.empty(2, 9, 16, dtype=F16, device="cuda")).name == "cuda"
    _check_cuda(vq_lookup(*args), *args)


@_gpu
def test_cuda_bad_inputs():
    codes, codebook, weight, bias, pos = _cuda(*_make(2, 6, 12, 8, 7))
    bad = codes.clone()
    bad[1, 2] = 12
    with pytest.raises(ValueError, match=r"`codes` values must be in \[0, K\) = \[0, 12\), got 12 at \(1, 2\)"):
        vq_lookup(bad, codebook, weight, bias, pos)
    with pytest.raises(ValueError, match=r"`codebook` must be float32, bfloat16 or float16 .*float64"):
        vq_lookup(codes, codebook.double(), weight, bias, pos)
    with pytest.raises(ValueError, match="`weight` must be on the device of `codes`"):
        vq_lookup(codes, codebook, weight.cpu(), bias, pos)


def _capture(fn):
    """fn() captured into a CUDA graph after warm-up on a side stream (the torch docs' recipe)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@_gpu
@pytest.mark.parametrize("C", [1024, 33])
def test_cuda_graph_capture_and_replay(C):
    codes, codebook, weight, bias, pos = _cuda(*_make(4, 128, 8192, 8, C, w_dtype=BF16, seed=8))
    graph, out = _capture(lambda: vq_lookup(codes, codebook, weight, bias, pos))
    new_codes = torch.randint(0, 8192, codes.shape, device="cuda")
    codes.copy_(new_codes)  # a replay must see the new codes in the static input
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, vq_lookup(new_codes, codebook, weight, bias, pos), rtol=0, atol=0)


@_gpu
def test_cuda_bad_code_inside_graph_is_never_read():
    """The range check is skipped during capture; a bad code then gives a NaN row, never an
    out-of-bounds read (compute-sanitizer memcheck runs this too), and other rows stay right."""
    codes, codebook, weight, bias, pos = _cuda(*_make(2, 16, 40, 8, 64, w_dtype=BF16, seed=9))
    graph, out = _capture(lambda: vq_lookup(codes, codebook, weight, bias, pos))
    good = codes.clone()
    codes[0, 3], codes[1, 15] = 40, -(1 << 40)
    graph.replay()
    torch.cuda.synchronize()
    bad = torch.zeros(2, 16, dtype=torch.bool, device="cuda")
    bad[0, 3] = bad[1, 15] = True
    assert out[bad].isnan().all()
    expect = vq_lookup(good, codebook, weight, bias, pos)
    torch.testing.assert_close(out[~bad], expect[~bad], rtol=0, atol=0)
