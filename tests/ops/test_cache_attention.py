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


def make_inputs(B, H, n_q, d, L_max, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k_new, v_new = (torch.randn(B, H, n_q, d, generator=g).to(dtype) for _ in range(3))
    k_cache, v_cache = (torch.randn(B, H, L_max, d, generator=g).to(dtype) for _ in range(2))
    return q, k_new, v_new, k_cache, v_cache


def check(q, k_new, v_new, k_cache, v_cache, start_pos, *, scale=None, out=None):
    """Run the reference on clones of the caches first, then the op; compare outputs (STYLE 5 rule)
    and caches (exact)."""
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = cache_attention_ref(q, k_new, v_new, k_ref, v_ref, start_pos, scale=scale)
    result = cache_attention(q, k_new, v_new, k_cache, v_cache, start_pos, scale=scale, out=out)
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
    if q.dtype == torch.bfloat16:
        # Kernel and reference do fp32 math on the same bf16 inputs, so they may differ only in the
        # final rounding (1 ulp <= 2^-7 |x|); tighter than the rule above, which a dropped key passes.
        excess = (err - (2 ** -7 * ref32.abs() + 1e-6)).max().item()
        assert excess <= 0, f"bf16 output differs from the reference by more than 1 ulp (excess {excess:.3g})"
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


def test_non_unit_last_stride_inputs_and_out():
    """A q with a strided last dim (slice of a wider tensor) and a transposed out still work."""
    B, H, n_q, d, L_max, start_pos = 2, 3, 4, 33, 12, 5
    q_wide, k_new, v_new, k_cache, v_cache = make_inputs(B, H, n_q, 2 * d, L_max, torch.float32)
    q = q_wide[..., ::2]
    k_new, v_new = k_new[..., :d], v_new[..., 1:d + 1]
    k_cache, v_cache = k_cache[..., :d].contiguous(), v_cache[..., :d].contiguous()
    out = torch.empty(B, H, d, n_q).transpose(-1, -2)
    check(q, k_new, v_new, k_cache, v_cache, start_pos, out=out)


def test_scale_and_untouched_cache_rows():
    q, k_new, v_new, k_cache, v_cache = make_inputs(2, 2, 8, 64, 32, torch.float32)
    before = k_cache.clone()
    check(q, k_new, v_new, k_cache, v_cache, 8, scale=0.3)
    assert torch.equal(k_cache[:, :, :8], before[:, :, :8]) and torch.equal(k_cache[:, :, 16:], before[:, :, 16:])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_decode_schedule_matches_reference(dtype):
    """The prior's step plan: class position, causal single steps, then whole groups of 8."""
    B, H, d, L_max = 2, 2, 64, 40
    steps = [1] * 8 + [8] * 4
    _, _, _, k_cache, v_cache = make_inputs(B, H, 1, d, L_max, dtype, seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    pos = 0
    for i, n_q in enumerate(steps):
        q, k_new, v_new, _, _ = make_inputs(B, H, n_q, d, 1, dtype, seed=10 + i)
        ref = cache_attention_ref(q, k_new, v_new, k_ref, v_ref, pos)
        got = cache_attention(q, k_new, v_new, k_cache, v_cache, pos)
        err = (got.float() - ref.float()).abs().max().item()
        assert err <= tolerance(dtype)[0], f"step {i} (n_q={n_q}, start_pos={pos}): max err {err:.3g}"
        pos += n_q
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


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
