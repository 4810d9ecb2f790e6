"""code_search (nearest normalized codeword) against code_search_ref.

Indices must match exactly, with ties explicit (STYLE practice 5): an index differing from the
reference's is accepted only when the two indices' reference distances (code_distances_ref)
are equal within tolerance(dtype). Exact ties (duplicated codewords) must give the lowest index.
"""
from __future__ import annotations

import pytest
import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.code_search import code_distances_ref, code_search, code_search_ref, tolerance

F32, BF16 = torch.float32, torch.bfloat16
needs_cpu_kernels = pytest.mark.skipif(
    not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "code_search")),
    reason="compiled extension (_C.code_search) not available")


def _make(N, K, D, z_dtype=F32, cb_dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g).to(z_dtype), torch.randn(K, D, generator=g).to(cb_dtype)


def _check(got, latents, codebook, codebook_normalized=False):
    ref = code_search_ref(latents, codebook, codebook_normalized=codebook_normalized)
    assert got.dtype == torch.int64 and got.shape == latents.shape[:-1], (got.dtype, got.shape)
    g, r = got.reshape(-1), ref.reshape(-1)
    if g.numel() == 0:
        return
    assert int(g.min()) >= 0 and int(g.max()) < codebook.shape[0]
    d = code_distances_ref(latents, codebook, codebook_normalized=codebook_normalized).reshape(g.numel(), -1)
    rows = torch.arange(g.numel())
    d_got, d_ref = d[rows, g], d[rows, r]
    atol, rtol = tolerance(latents.dtype)
    gap = (d_got - d_ref).abs()
    ok = (g == r) | (gap <= atol + rtol * d_ref.abs())
    assert bool(ok.all()), (f"{int((~ok).sum())} of {g.numel()} indices differ beyond the tie rule "
                            f"(max distance gap {gap[~ok].max().item():.3e}; {int((g != r).sum())} differ "
                            f"in all, max gap {gap.max().item():.3e}; atol {atol})")


@pytest.mark.parametrize("z_dtype,cb_dtype", [(F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16)])
@pytest.mark.parametrize("N,K,D", [
    (1, 1, 8),          # smallest
    (7, 19, 8),         # odd sizes; K not a multiple of the lane count (padding lanes)
    (33, 111, 7),       # odd D: generic path
    (19, 769, 8),
    (111, 33, 16),
    (256, 8192, 8),     # DetailFlow-16: 2 images x 128 latents, codebook 8192 x 8
])
def test_matches_reference(N, K, D, z_dtype, cb_dtype):
    latents, codebook = _make(N, K, D, z_dtype, cb_dtype)
    _check(code_search(latents, codebook), latents, codebook)


def test_batched_latents_real_size():
    latents, codebook = _make(2 * 128, 8192, 8, seed=3)
    z = latents.reshape(2, 128, 8)
    got = code_search(z, codebook)
    assert got.shape == (2, 128)
    _check(got, z, codebook)


def test_duplicated_codewords_take_lowest_index():
    """Exact ties: each direction appears 3 times (once scaled by 2: normalizing is exact), and
    half the latents are codewords themselves; the lowest index of the tied copies must win."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(50, 8, generator=g)
    codebook = torch.cat([base, 2 * base, base])  # k, k + 50, k + 100 are the same direction
    latents = torch.cat([torch.randn(40, 8, generator=g), base[torch.randperm(50, generator=g)[:40]] * 3])
    for cb_dtype in (F32, BF16):
        cb = codebook.to(cb_dtype)
        got = code_search(latents, cb)
        _check(got, latents, cb)
        assert int(got.max()) < 50, f"a duplicate beyond the first copy won: {got.tolist()}"
        assert torch.equal(got, code_search_ref(latents, cb))


def test_codebook_already_normalized():
    latents, codebook = _make(40, 300, 8, seed=7)
    unit = torch.nn.functional.normalize(codebook, dim=-1)
    got = code_search(latents, unit, codebook_normalized=True)
    _check(got, latents, unit, codebook_normalized=True)
    _check(code_search(latents, codebook, codebook_normalized=True), latents, codebook, codebook_normalized=True)
    _check(got, latents, codebook)  # same directions as normalizing inside


def test_zero_latent_row():
    latents, codebook = _make(6, 100, 8)
    latents[2] = 0.0  # normalizes to 0: every distance is |e|^2 = 1 within rounding
    _check(code_search(latents, codebook), latents, codebook)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(64, 16, generator=g)
    cb_wide = torch.randn(300, 12, generator=g)
    for latents in (wide[:, 4:12], wide[:, ::2], wide.reshape(4, 16, 16)[:, :, 8:].transpose(0, 1)):
        assert not latents.is_contiguous()
        got = code_search(latents, cb_wide[:, 2:10])
        _check(got, latents, cb_wide[:, 2:10])


def test_empty():
    latents, codebook = _make(1, 10, 8)
    assert code_search(latents[:0], codebook).shape == (0,)
    assert code_search(latents[:0].reshape(0, 4, 8), codebook).shape == (0, 4)


def test_opcheck():
    latents, codebook = _make(9, 40, 8)
    torch.library.opcheck(torch.ops.detailflow.code_search.default, (latents, codebook, False))


def test_forced_torch_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "torch")
    latents, codebook = _make(20, 64, 8)
    assert _dispatch.pick("code_search", latents, codebook, torch.empty(20, dtype=torch.int64)).name == "torch"
    _check(code_search(latents, codebook), latents, codebook)


@needs_cpu_kernels
def test_forced_cpu_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cpu")
    latents, codebook = _make(20, 64, 8, z_dtype=BF16)
    assert _dispatch.pick("code_search", latents, codebook, torch.empty(20, dtype=torch.int64)).name == "cpu"
    _check(code_search(latents, codebook), latents, codebook)


def test_bad_inputs():
    latents, codebook = _make(4, 10, 8)
    with pytest.raises(ValueError, match=r"`codebook` must be float32 or bfloat16 of shape \(K, D\).*float16"):
        code_search(latents, codebook.half())
    with pytest.raises(ValueError, match=r"`codebook` must be .*\(10, 8, 1\)"):
        code_search(latents, codebook[..., None])
    with pytest.raises(ValueError, match=r"`latents` must be .* D = 8 .*\(4, 7\)"):
        code_search(latents[:, :7], codebook)
    with pytest.raises(ValueError, match="`latents` must be float32 or bfloat16"):
        code_search(latents.long(), codebook)
    with pytest.raises(ValueError, match="`latents` must be"):
        code_search(latents.reshape(1, 1, 4, 8), codebook)
    with pytest.raises(TypeError, match="`latents` must be a torch.Tensor"):
        code_search(latents.numpy(), codebook)
    with pytest.raises(TypeError, match="`codebook_normalized` must be a bool"):
        code_search(latents, codebook, codebook_normalized=1)
