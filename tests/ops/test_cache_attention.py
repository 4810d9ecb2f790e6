"""cache_attention (append K/V to a static cache, attend the step's queries) vs cache_attention_ref."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.cache_attention import cache_attention, cache_attention_ref, tolerance

DTYPES = [torch.float32, torch.bfloat16]
needs_cpu_kernels = pytest.mark.skipif(
    not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "cache_attention")),
    reason="the _C extension with the cache_attention CPU kernel is not built")


def make_inputs(B, H, n_q, d, L_max, dtype, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k_new, v_new = (torch.randn(B, H, n_q, d, generator=g, device=device).to(dtype) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, H, L_max, d, generator=g, device=device).to(dtype) for _ in range(2))
    return q, k_new, v_new, k_cache, v_cache


def check(q, k_new, v_new, k_cache, v_cache, start_pos, *, scale=None, out=None, op=cache_attention):
    """Run the reference on clones of the caches first, then the op; compare outputs (STYLE 5 rule)
    and caches (exact)."""
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = cache_attention_ref(q, k_new, v_new, k_ref, v_ref, start_pos, scale=scale)
    result = op(q, k_new, v_new, k_cache, v_cache, start_pos, scale=scale, out=out)
    if out is not None:
        assert result is out
    assert result.shape == q.shape and result.dtype == q.dtype
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), "cache contents differ from the reference"
    L = start_pos + q.shape[2]
    # torch at the kernel's own precision: the natural composition on the (already written) cache
    lowp = F.scaled_dot_product_attention(q, k_ref[:, :, :L], v_ref[:, :, :L], scale=scale)
    ref32 = ref.float()
    err = (result.float() - ref32).abs()
    lowp_err = (lowp.float() - ref32).abs().max().item()
    atol, rtol = tolerance(q.dtype)
    bound = 2 * lowp_err + atol + rtol * ref32.abs().max().item()
    assert err.max().item() <= bound, (f"max|kernel-ref32|={err.max().item():.3g} mean={err.mean().item():.3g} "
                                       f"> bound {bound:.3g} (max|torch_lowp-ref32|={lowp_err:.3g})")
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}.get(q.dtype)
    if ulp is not None:
        # Kernel and reference do fp32 math on the same low-precision inputs, so they may differ only
        # in the final rounding (1 ulp <= ulp * |x|); tighter than the rule above, which a dropped key
        # passes.
        excess = (err - (ulp * ref32.abs() + 1e-6)).max().item()
        assert excess <= 0, f"{q.dtype} output differs from the reference by more than 1 ulp (excess {excess:.3g})"
    return result


# (B, H, n_q, d, start_pos, L_max)
SHAPES = [
    pytest.param(1, 1, 1, 8, 0, 4, id="smallest"),
    pytest.param(3, 5, 7, 33, 19, 30, id="odd-d33"),
    pytest.param(2, 3, 7, 40, 11, 19, id="odd-d40"),
    pytest.param(2, 2, 8, 72, 100, 111, id="odd-d72"),
    pytest.param(1, 1, 8, 64, 5, 20, id="rows-split-across-threads"),
    pytest.param(2, 3, 19, 40, 50, 769, id="n_q19-two-tiles"),
    pytest.param(1, 2, 3, 64, 150, 160, id="three-key-blocks"),
    pytest.param(2, 16, 1, 64, 0, 128, id="real-first-step"),
    pytest.param(2, 16, 1, 64, 7, 128, id="real-causal-step"),
    pytest.param(2, 16, 8, 64, 8, 128, id="real-first-group"),
    pytest.param(2, 16, 8, 64, 120, 128, id="real-last-group"),
    pytest.param(16, 16, 8, 64, 56, 128, id="real-B16-group"),
    pytest.param(16, 16, 1, 64, 7, 128, id="real-B16-causal"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,n_q,d,start_pos,L_max", SHAPES)
def test_matches_reference(B, H, n_q, d, start_pos, L_max, dtype):
    check(*make_inputs(B, H, n_q, d, L_max, dtype), start_pos)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_qkv_views_and_out(dtype):
    """q/k/v as slices of a fused (B, n_q, 3, H, d) projection after transpose, and out= given."""
    B, H, n_q, d, L_max, start_pos = 2, 4, 8, 64, 40, 24
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, n_q, 3, H, d, generator=g).to(dtype)
    q, k_new, v_new = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    _, _, _, k_cache, v_cache = make_inputs(B, H, n_q, d, L_max, dtype, seed=2)
    out = torch.full((B, H, n_q, d), float("nan"), dtype=dtype)
    check(q, k_new, v_new, k_cache, v_cache, start_pos, out=out)


def check_non_unit_last_stride(device):
    """A q with a strided last dim (slice of a wider tensor) and a transposed out still work."""
    B, H, n_q, d, L_max, start_pos = 2, 3, 4, 33, 12, 5
    q_wide, k_new, v_new, k_cache, v_cache = make_inputs(B, H, n_q, 2 * d, L_max, torch.float32, device=device)
    q = q_wide[..., ::2]
    k_new, v_new = k_new[..., :d], v_new[..., 1:d + 1]
    k_cache, v_cache = k_cache[..., :d].contiguous(), v_cache[..., :d].contiguous()
    out = torch.empty(B, H, d, n_q, device=device).transpose(-1, -2)
    check(q, k_new, v_new, k_cache, v_cache, start_pos, out=out)


def test_non_unit_last_stride_inputs_and_out():
    check_non_unit_last_stride("cpu")


def test_scale_and_untouched_cache_rows():
    q, k_new, v_new, k_cache, v_cache = make_inputs(2, 2, 8, 64, 32, torch.float32)
    before = k_cache.clone()
    check(q, k_new, v_new, k_cache, v_cache, 8, scale=0.3)
    assert torch.equal(k_cache[:, :, :8], before[:, :, :8]) and torch.equal(k_cache[:, :, 16:], before[:, :, 16:])


def check_decode_schedule(make, B, H, d, L_max, steps, dtype) -> int:
    """Runs the steps (n_q each) of a decode plan through the op and the reference on one cache
    each: every output within tolerance, the caches equal at the end -> the final position."""
    _, _, _, k_cache, v_cache = make(B, H, 1, d, L_max, dtype, seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    pos = 0
    for i, n_q in enumerate(steps):
        q, k_new, v_new, _, _ = make(B, H, n_q, d, 1, dtype, seed=10 + i)
        ref = cache_attention_ref(q, k_new, v_new, k_ref, v_ref, pos)
        got = cache_attention(q, k_new, v_new, k_cache, v_cache, pos)
        err = (got.float() - ref.float()).abs().max().item()
        assert err <= tolerance(dtype)[0], f"step {i} (n_q={n_q}, start_pos={pos}): max err {err:.3g}"
        pos += n_q
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    return pos


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_decode_schedule_matches_reference(dtype):
    """The prior's step plan: class position, causal single steps, then whole groups of 8."""
    check_decode_schedule(make_inputs, 2, 2, 64, 40, [1] * 8 + [8] * 4, dtype)


def test_inference_mode():
    with torch.inference_mode():
        check(*make_inputs(2, 4, 8, 64, 32, torch.bfloat16), 8)


def test_nan_query_gives_nan_row():
    q, k_new, v_new, k_cache, v_cache = make_inputs(1, 2, 2, 64, 8, torch.float32)
    q[0, 1, 0, 3] = float("nan")
    out = cache_attention(q, k_new, v_new, k_cache, v_cache, 3)
    assert torch.isnan(out[0, 1, 0]).all() and not torch.isnan(out[0, 1, 1]).any() and not torch.isnan(out[0, 0]).any()


def test_opcheck():
    q, k_new, v_new, k_cache, v_cache = make_inputs(2, 3, 4, 16, 10, torch.float32)
    out = torch.empty_like(q)
    torch.library.opcheck(torch.ops.detailflow.cache_attention.default,
                          (q, k_new, v_new, k_cache, v_cache, out, 3, 0.25))


def test_torch_compile_sees_the_op():
    q, k_new, v_new, k_cache, v_cache = make_inputs(2, 3, 8, 64, 24, torch.float32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = cache_attention_ref(q, k_new, v_new, k_ref, v_ref, 8)
    compiled = torch.compile(lambda *a: cache_attention(*a, 8), backend="eager", fullgraph=True)
    got = compiled(q, k_new, v_new, k_cache, v_cache)
    assert (got - ref).abs().max().item() <= tolerance(torch.float32)[0]
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernels)])
def test_forced_backend(backend, monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, backend)
    check(*make_inputs(2, 4, 8, 64, 24, torch.bfloat16), 16)


def _bad(**overrides):
    args = dict(zip(("q", "k_new", "v_new", "k_cache", "v_cache"), make_inputs(2, 3, 4, 16, 10, torch.float32)))
    args["start_pos"] = 2
    args.update(overrides)
    kw = {k: args.pop(k) for k in ("scale", "out") if k in args}
    return lambda: cache_attention(*args.values(), **kw)


@pytest.mark.parametrize("call,exc,match", [
    (_bad(k_new=torch.randn(2, 3, 5, 16)), ValueError, "`k_new` must have the shape of `q`"),
    (_bad(v_cache=torch.randn(2, 3, 11, 16)), ValueError, "`v_cache` must be \\(B, H, L_max, d\\)"),
    (_bad(k_cache=torch.randn(2, 3, 16, 10).transpose(-1, -2)), ValueError, "`k_cache` must be contiguous"),
    (_bad(start_pos=-1), ValueError, "`start_pos` must be >= 0, got -1"),
    (_bad(start_pos=7), ValueError, "start_pos=7 \\+ n_q=4 > L_max=10"),
    (_bad(start_pos=2.0), TypeError, "`start_pos` must be an int, got float"),
    (_bad(q=torch.randn(2, 3, 4, 16, dtype=torch.float16)), ValueError, "`q` must be float32 or bfloat16"),
    (_bad(v_new=torch.randn(2, 3, 4, 16, dtype=torch.bfloat16)), ValueError, "`v_new` must have the dtype of `q`"),
    (_bad(k_cache=torch.randn(2, 3, 10, 16, device="meta")), ValueError, "`k_cache` must be on the device of `q`"),
    (_bad(q=torch.randn(2, 3, 16)), ValueError, "`q` must be 4-D"),
    (_bad(out=torch.empty(2, 3, 4, 16, dtype=torch.bfloat16)), ValueError, "`out` must have the dtype of `q`"),
    (_bad(scale=float("inf")), TypeError, "`scale` must be a finite float"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# CUDA kernel (csrc/cuda/cache_attention.cu): run by `pytest -m gpu` on the H200.
import detailflow_engine.ops.cache_attention as ca_mod  # noqa: E402

HAS_CUDA_KERNEL = (torch.cuda.is_available() and _dispatch.has_cuda_kernels()
                   and hasattr(_dispatch.extension(), "cache_attention_cuda"))
gpu = pytest.mark.skipif(not HAS_CUDA_KERNEL, reason="needs a CUDA device and _C built with cache_attention_cuda")
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_IDS = ["fp32", "bf16", "fp16"]


def make_cuda_inputs(B, H, n_q, d, L_max, dtype, seed=0):
    return make_inputs(B, H, n_q, d, L_max, dtype, seed, device="cuda")


def cuda_op(num_splits):
    """The CUDA backend with a forced key-split count (None = the wrapper's heuristic)."""
    def op(q, k_new, v_new, k_cache, v_cache, start_pos, *, scale=None, out=None):
        start_pos, scale = ca_mod._validate(q, k_new, v_new, k_cache, v_cache, start_pos, scale, out)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        assert ca_mod._cuda_applies(q, k_new, v_new, k_cache, v_cache, out)
        ca_mod._cuda_impl(q, k_new, v_new, k_cache, v_cache, out, start_pos, scale, num_splits=num_splits)
        return out
    return op


# (B, H, n_q, d, start_pos, L_max): the CPU grid plus fast-path d = 128, the generic path up to
# d = 256, tiny d, many 64-key chunks and the real 129-position cache
CUDA_SHAPES = SHAPES + [
    pytest.param(1, 1, 1, 1, 0, 1, id="d1-L1"),
    pytest.param(2, 16, 8, 128, 56, 129, id="d128-group"),
    pytest.param(2, 3, 1, 128, 77, 80, id="d128-causal"),
    pytest.param(3, 2, 8, 256, 40, 60, id="d256"),
    pytest.param(2, 3, 5, 200, 33, 50, id="odd-d200"),
    pytest.param(1, 2, 1, 96, 700, 1000, id="d96-long"),
    pytest.param(2, 16, 1, 64, 128, 129, id="real-last-position"),
    pytest.param(2, 16, 8, 64, 121, 129, id="real-last-group-129"),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=CUDA_IDS)
@pytest.mark.parametrize("B,H,n_q,d,start_pos,L_max", CUDA_SHAPES)
def test_cuda_matches_reference(B, H, n_q, d, start_pos, L_max, dtype):
    check(*make_cuda_inputs(B, H, n_q, d, L_max, dtype), start_pos, op=cuda_op(None))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("B,H,n_q,d,start_pos,L_max", CUDA_SHAPES)
def test_cuda_forced_splits(B, H, n_q, d, start_pos, L_max, num_splits):
    """One block per head (1), a few key splits + the combine kernel (3), more splits than 64-key
    chunks, down to one key per split (64)."""
    check(*make_cuda_inputs(B, H, n_q, d, L_max, torch.bfloat16, seed=4), start_pos, op=cuda_op(num_splits))


@gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("d", [64, 128, 200])
def test_cuda_long_cache(d, num_splits):
    """L = 3000: many online-softmax chunks per block, and splits that end mid-chunk."""
    check(*make_cuda_inputs(2, 4, 8, d, 3000, torch.bfloat16, seed=5), 2992, op=cuda_op(num_splits))


@gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("n_q,start_pos", [(1, 100), (8, 121)])
def test_cuda_real_large_batch(n_q, start_pos):
    """DetailFlow-16 at batch 256 with CFG: B = 512, one block per (b, h), no split."""
    check(*make_cuda_inputs(512, 16, n_q, 64, 129, torch.bfloat16, seed=6), start_pos)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=CUDA_IDS)
def test_cuda_fused_qkv_views_and_out(dtype, num_splits):
    """q/k/v as slices of a fused (B, n_q, 3, H, d) projection after transpose (still 16-byte
    aligned: the vector path), out= given."""
    B, H, n_q, d, L_max, start_pos = 2, 4, 8, 64, 40, 24
    g = torch.Generator(device="cuda").manual_seed(1)
    qkv = torch.randn(B, n_q, 3, H, d, generator=g, device="cuda").to(dtype)
    q, k_new, v_new = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    _, _, _, k_cache, v_cache = make_cuda_inputs(B, H, n_q, d, L_max, dtype, seed=2)
    out = torch.full((B, H, n_q, d), float("nan"), dtype=dtype, device="cuda")
    check(q, k_new, v_new, k_cache, v_cache, start_pos, out=out, op=cuda_op(num_splits))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_misaligned_views_take_generic_path(d, num_splits):
    """bf16 views that start 2 bytes into a row, or whose row stride is not a multiple of 8
    elements, cannot use 16-byte vectors: the kernel must fall back to the generic path."""
    B, H, n_q, L_max, start_pos = 2, 3, 8, 30, 9
    q_wide, k_wide, v_wide, k_cache, v_cache = make_cuda_inputs(B, H, n_q, d + 1, L_max, torch.bfloat16, seed=7)
    q, k_new, v_new = q_wide[..., 1:], k_wide[..., :d], v_wide[..., 1:]
    k_cache, v_cache = k_cache[..., :d].contiguous(), v_cache[..., :d].contiguous()
    assert q.data_ptr() % 16 != 0 and k_new.stride(2) % 8 != 0
    check(q, k_new, v_new, k_cache, v_cache, start_pos, op=cuda_op(num_splits))


@gpu
@pytest.mark.gpu
def test_cuda_non_unit_last_stride_inputs_and_out():
    check_non_unit_last_stride("cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cuda_k_new_already_in_cache(num_splits):
    """k_new/v_new may be views of the very cache rows they are written to (skipped copies)."""
    B, H, n_q, d, L_max, start_pos = 2, 4, 8, 64, 40, 16
    _, _, _, k_cache, v_cache = make_cuda_inputs(B, H, n_q, d, L_max, torch.bfloat16, seed=8)
    q = make_cuda_inputs(B, H, n_q, d, 1, torch.bfloat16, seed=9)[0]
    k_new, v_new = k_cache[:, :, start_pos:start_pos + n_q], v_cache[:, :, start_pos:start_pos + n_q]
    ref = cache_attention_ref(q, k_new.clone(), v_new.clone(), k_cache.clone(), v_cache.clone(), start_pos)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    got = cuda_op(num_splits)(q, k_new, v_new, k_cache, v_cache, start_pos)
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)
    err = (got.float() - ref.float()).abs()
    assert (err - (2 ** -7 * ref.float().abs() + 1e-6)).max().item() <= 0, f"max err {err.max().item():.3g}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=CUDA_IDS)
def test_cuda_decode_schedule_matches_reference(dtype):
    """DetailFlow-16's step plan on the 129-position cache: class token + 8 causal steps, then
    15 groups of 8, with the wrapper's split heuristic (batch 1 with CFG -> splits)."""
    assert check_decode_schedule(make_cuda_inputs, 2, 16, 64, 129, [1] * 9 + [8] * 15, dtype) == 129


@gpu
@pytest.mark.gpu
@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,n_q,start_pos", [(2, 8, 56), (2, 1, 7), (64, 8, 120)])
def test_cuda_matches_cpu_kernel(B, n_q, start_pos, dtype):
    """Same inputs through the CPU and the CUDA kernel: identical caches, outputs within the
    fp32 rounding noise (bf16: at most 1 ulp apart)."""
    cpu_inputs = make_inputs(B, 16, n_q, 64, 129, dtype, seed=11)
    gpu_inputs = [t.cuda() for t in cpu_inputs]
    out_cpu = cache_attention(*cpu_inputs, start_pos)
    out_gpu = cache_attention(*gpu_inputs, start_pos)
    assert torch.equal(cpu_inputs[3], gpu_inputs[3].cpu()) and torch.equal(cpu_inputs[4], gpu_inputs[4].cpu())
    a, b = out_cpu.float(), out_gpu.cpu().float()
    bound = 2e-5 + 1e-5 * a.abs() if dtype == torch.float32 else 2 ** -7 * a.abs() + 1e-6
    assert ((a - b).abs() <= bound).all(), f"max|cpu-cuda| {(a - b).abs().max().item():.3g}"


@gpu
@pytest.mark.gpu
def test_cuda_forced_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    inputs = make_cuda_inputs(2, 16, 8, 64, 129, torch.bfloat16, seed=12)
    assert _dispatch.pick("cache_attention", *inputs, inputs[0]).name == "cuda"
    check(*inputs, 64)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cuda_nan_query_gives_nan_row(num_splits):
    q, k_new, v_new, k_cache, v_cache = make_cuda_inputs(1, 2, 2, 64, 200, torch.float32)
    q[0, 1, 0, 3] = float("nan")
    out = cuda_op(num_splits)(q, k_new, v_new, k_cache, v_cache, 150)
    assert torch.isnan(out[0, 1, 0]).all() and not torch.isnan(out[0, 1, 1]).any() and not torch.isnan(out[0, 0]).any()


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_other_device():
    with torch.cuda.device(0):
        inputs = [t.to("cuda:1") for t in make_cuda_inputs(2, 4, 8, 64, 40, torch.bfloat16, seed=13)]
        check(*inputs, 16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B", [2, 64], ids=["B2-split", "B64-no-split"])
def test_cuda_graph_capture_replay(B):
    """One decode step captured in a CUDA graph (start_pos fixed at capture), replayed on fresh
    inputs: output and caches equal an eager call on the same inputs."""
    H, n_q, d, L_max, start_pos = 16, 8, 64, 129, 113
    dtype = torch.bfloat16
    static = make_cuda_inputs(B, H, n_q, d, L_max, dtype, seed=14)
    out = torch.empty(B, H, n_q, d, dtype=dtype, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as the torch docs do
        for _ in range(2):
            cache_attention(*static, start_pos, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache_attention(*static, start_pos, out=out)

    fresh = make_cuda_inputs(B, H, n_q, d, L_max, dtype, seed=15)
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    eager_caches = [t.clone() for t in fresh[3:]]
    eager = cache_attention(*fresh[:3], *eager_caches, start_pos)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert torch.equal(static[3], eager_caches[0]) and torch.equal(static[4], eager_caches[1])
    # and the graph still matches the reference on a second set of inputs
    again = make_cuda_inputs(B, H, n_q, d, L_max, dtype, seed=16)
    for dst, src in zip(static, again):
        dst.copy_(src)
    k_ref, v_ref = again[3].clone(), again[4].clone()
    ref = cache_attention_ref(*again[:3], k_ref, v_ref, start_pos)
    graph.replay()
    torch.cuda.synchronize()
    assert (out.float() - ref.float()).abs().max().item() <= tolerance(dtype)[0]
    assert torch.equal(static[3], k_ref) and torch.equal(static[4], v_ref)


def _rows_alone_vs_together(device, dtype, op=cache_attention):
    """Batch invariance: each (b, h) row of a B = 40 call equals the same row in a B = 1 call."""
    B, H, n_q, d, L_max, start_pos = 40, 4, 8, 64, 129, 113
    g = torch.Generator(device=device).manual_seed(9)
    q, k_new, v_new = (torch.randn(B, H, n_q, d, generator=g, device=device).to(dtype) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, H, L_max, d, generator=g, device=device).to(dtype) for _ in range(2))
    together = op(q, k_new, v_new, k_cache.clone(), v_cache.clone(), start_pos)
    for b in (0, 1, 17, 39):
        sl = slice(b, b + 1)
        alone = op(q[sl], k_new[sl], v_new[sl], k_cache[sl].clone(), v_cache[sl].clone(), start_pos)
        assert torch.equal(alone[0], together[b]), f"row {b} differs alone and in a batch of {B}"


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rows_do_not_depend_on_the_batch(dtype):
    _rows_alone_vs_together("cpu", dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=CUDA_IDS)
def test_cuda_rows_do_not_depend_on_the_batch(dtype):
    """The split count depends on L only (B = 1 would take more splits if it followed the SMs)."""
    _rows_alone_vs_together("cuda", dtype)
