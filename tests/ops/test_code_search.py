"""code_search (nearest normalized codeword) against code_search_ref.

Indices must match exactly, with ties explicit (STYLE practice 5): an index differing from the
reference's is accepted only when the two indices' reference distances (code_distances_ref)
are equal within tolerance(dtype). Exact ties (duplicated codewords) must give the lowest index.
"""
from __future__ import annotations

import pytest
import torch

from _kernel_marks import gpu_kernel, needs_cpu_kernel
from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.code_search import code_distances_ref, code_search, code_search_ref, tolerance

F32, BF16 = torch.float32, torch.bfloat16
needs_cpu_kernels = needs_cpu_kernel("code_search")


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
        code_search(latents.tolist(), codebook)  # NumPy arrays are accepted (DLPack)
    with pytest.raises(TypeError, match="`codebook_normalized` must be a bool"):
        code_search(latents, codebook, codebook_normalized=1)


# ---------------------------------------------------------------------------------------------
# CUDA kernel (csrc/cuda/code_search.cu): run by `pytest -m gpu` on a machine with a GPU.

F16 = torch.float16
_gpu = gpu_kernel("code_search_cuda")


def _cuda(*tensors):
    return tuple(t.cuda() for t in tensors)


def _check_cuda(got, latents, codebook, codebook_normalized=False):
    """The file's tie rule, with the reference (and its distances) computed on CPU copies."""
    assert got.is_cuda
    _check(got.cpu(), latents.cpu(), codebook.cpu(), codebook_normalized)


@_gpu
@pytest.mark.parametrize("z_dtype,cb_dtype", [(F32, F32), (BF16, F32), (F32, BF16), (BF16, BF16),
                                              (F16, F16), (F16, F32)])
@pytest.mark.parametrize("N,K,D", [
    (1, 1, 8),          # smallest; one tile, direct write
    (7, 19, 8),         # odd sizes; padding codewords in the only tile
    (19, 769, 8),       # 4 tiles -> 4 splits (atomicMin path), last tile padded
    (33, 111, 7),       # odd D: generic-D kernel, 4 tiles of 32
    (111, 33, 16),      # generic D, 2 splits
    (5, 300, 64),       # the largest D on CUDA
    (256, 8192, 8),     # DetailFlow-16: 2 images x 128 latents, 32 splits
    (8269, 1000, 8),    # N >= 8192: 4 rows a thread, 17 row blocks, last row block partial
])
def test_cuda_matches_reference(N, K, D, z_dtype, cb_dtype):
    latents, codebook = _cuda(*_make(N, K, D, z_dtype, cb_dtype))
    _check_cuda(code_search(latents, codebook), latents, codebook)


@_gpu
@pytest.mark.slow
def test_cuda_largest_batch():
    latents, codebook = _cuda(*_make(256 * 128, 8192, 8, BF16, F32, seed=3))  # 256 images
    got = code_search(latents.reshape(256, 128, 8), codebook)
    assert got.shape == (256, 128)
    _check_cuda(got.reshape(-1), latents, codebook)


@_gpu
@pytest.mark.parametrize("n_lat", [80, 9000])  # 1 and 4 rows a thread
def test_cuda_duplicated_codewords_take_lowest_index(n_lat):
    """Exact ties within a tile (codewords 0 and 1), and across splits (K = 1024 is 4 tiles of
    256, one split each: k and k + 512 land in different blocks whose results meet in the
    packed-key atomicMin)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(512, 8, generator=g)
    base[1] = 4 * base[0]  # same direction (scaling by 4 normalizes exactly)
    codebook = torch.cat([base, 2 * base])
    pick = torch.randint(0, 512, (n_lat // 2,), generator=g)
    pick[:3] = torch.tensor([0, 1, 511])
    latents = torch.cat([base[pick] * 3, torch.randn(n_lat - n_lat // 2, 8, generator=g)])
    for cb_dtype in (F32, BF16):
        cb = codebook.to(cb_dtype)
        got = code_search(latents.cuda(), cb.cuda())
        _check_cuda(got, latents, cb)
        assert int(got.max()) < 512, "a duplicate beyond the first copy won"
        expect = torch.where(pick == 1, 0, pick)
        assert torch.equal(got[: n_lat // 2].cpu(), expect), "a tie did not go to the lowest index"


@_gpu
def test_cuda_codebook_already_normalized():
    latents, codebook = _cuda(*_make(40, 300, 8, seed=7))
    unit = torch.nn.functional.normalize(codebook, dim=-1)
    got = code_search(latents, unit, codebook_normalized=True)
    _check_cuda(got, latents, unit, codebook_normalized=True)
    _check_cuda(code_search(latents, codebook, codebook_normalized=True), latents, codebook,
                codebook_normalized=True)
    _check_cuda(got, latents, codebook)


@_gpu
def test_cuda_zero_and_nan_latent_rows():
    latents, codebook = _make(6, 300, 8)
    latents[2] = 0.0          # every distance is |e|^2 = 1 within rounding: the tie rule decides
    latents[4, 3] = float("nan")  # every distance NaN: index 0, as the CPU kernel and torch.argmin
    got = code_search(latents.cuda(), codebook.cuda())
    assert int(got[4]) == 0
    keep = torch.tensor([0, 1, 2, 3, 5])
    _check_cuda(got[keep], latents[keep], codebook)


@_gpu
def test_cuda_non_contiguous_inputs():
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(64, 16, generator=g).cuda()
    cb_wide = torch.randn(300, 12, generator=g).cuda()
    for latents in (wide[:, 4:12], wide[:, ::2], wide.reshape(4, 16, 16)[:, :, 8:].transpose(0, 1)):
        assert not latents.is_contiguous()
        _check_cuda(code_search(latents, cb_wide[:, 2:10]), latents, cb_wide[:, 2:10])


@_gpu
@pytest.mark.parametrize("z_dtype", [F32, BF16])
def test_cuda_agrees_with_cpu_kernel(z_dtype):
    """Same formula and rounding steps on both devices: equal indices up to near-ties (FMA
    contraction may differ between the compilers)."""
    latents, codebook = _make(1000, 8192, 8, z_dtype, seed=12)
    cpu = code_search(latents, codebook)
    gpu = code_search(latents.cuda(), codebook.cuda()).cpu()
    differ = cpu != gpu
    if differ.any():
        d = code_distances_ref(latents[differ], codebook)
        rows = torch.arange(d.shape[0])
        gap = (d[rows, cpu[differ]] - d[rows, gpu[differ]]).abs().max().item()
        assert gap <= tolerance(z_dtype)[0], f"{int(differ.sum())} indices differ, max gap {gap:.3e}"


@_gpu
def test_cuda_empty_and_forced_backend(monkeypatch):
    latents, codebook = _cuda(*_make(20, 64, 8, z_dtype=F16, cb_dtype=F16))
    assert code_search(latents[:0], codebook).shape == (0,)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    out = torch.empty(20, dtype=torch.int64, device="cuda")
    assert _dispatch.pick("code_search", latents, codebook, out).name == "cuda"
    _check_cuda(code_search(latents, codebook), latents, codebook)


@_gpu
def test_cuda_large_d_is_not_taken(monkeypatch):
    """D > 64 is outside the CUDA kernel: the torch reference runs it, forcing cuda says why."""
    latents, codebook = _cuda(*_make(10, 50, 65))
    _check_cuda(code_search(latents, codebook), latents, codebook)
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match="does not apply"):
        code_search(latents, codebook)


@_gpu
def test_cuda_bad_inputs():
    latents, codebook = _cuda(*_make(4, 10, 8))
    with pytest.raises(ValueError, match=r"`codebook` must be float32, bfloat16 or float16 .*float64"):
        code_search(latents, codebook.double())
    with pytest.raises(ValueError, match="`codebook` must be on the device of `latents`"):
        code_search(latents, codebook.cpu())


@_gpu
@pytest.mark.parametrize("N,K", [(40, 200), (256, 8192), (9000, 8192)])  # direct; split-K, 1 / 4 rows a thread
def test_cuda_graph_capture_and_replay(N, K):
    latents, codebook = _cuda(*_make(N, K, 8, seed=13))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            code_search(latents, codebook)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = code_search(latents, codebook)
    new = torch.randn_like(latents)
    latents.copy_(new)  # a replay must see the new latents in the static input
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, code_search(new, codebook))
