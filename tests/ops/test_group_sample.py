"""group_sample: CPU kernel vs group_sample_ref (token for token), RNG known answers, batch
independence, support, a chi-square fit of the draws, the greedy paths and bad input.

Tokens must match exactly: kernel and reference draw from the same integer masses with exact
integer prefix sums, so there are no CDF-boundary cases to excuse; each comparison still
counts the draws whose u lies within 1e-6 of a CDF boundary and prints it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.group_sample import (GroupSampler, group_sample, group_sample_probs_ref, group_sample_ref,
                                                philox4x32_10, sample_u24, tolerance)

needs_cpu = pytest.mark.skipif(not (_dispatch.has_cpu_kernels()
                                    and hasattr(_dispatch.extension(), "group_sample")),
                               reason="detailflow_engine._C with group_sample is not built")


def _logits(R, n_q, V, *, seed=0, scale=3.0, dtype=torch.float32, ties=False, specials=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, n_q, V, generator=g) * scale
    if ties:  # many exact ties, also at the top-k threshold and the top-p cut
        x = torch.round(x * 2) / 2
    if specials and V > 4:
        x[0, 0, 1] = float("nan")
        x[-1, -1, 2] = float("-inf")
    return x.to(dtype)


def _seeds(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-2 ** 62, 2 ** 62, (B,), generator=g) * 2  # covers negative seeds
    s[0] = -1  # all 64 key bits set
    return s


def _near_boundary(logits, seeds, positions, kw) -> int:
    """Draws whose u is within 1e-6 of a CDF boundary of the drawn distribution."""
    B = seeds.shape[0]
    probs = group_sample_probs_ref(logits, B, **{k: v for k, v in kw.items() if k != "return_logprobs"})
    u = sample_u24(seeds, positions).double() / 2 ** 24
    cdf = probs.cumsum(-1)
    return int(((cdf - u[..., None]).abs() < 1e-6).any(-1).sum())


def _check(logits, seeds, positions, count_near=False, **kw):
    """Kernel vs reference: tokens equal (no boundary exemption), logprobs within tolerance.
    Returns (tokens, logprobs, number of draws within 1e-6 of a CDF boundary or None)."""
    tok_ref, lp_ref = group_sample_ref(logits, seeds, positions, return_logprobs=True, **kw)
    tok, lp = group_sample(logits, seeds, positions, return_logprobs=True, **kw)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert tok.shape == lp.shape == (seeds.shape[0], logits.shape[1])
    bad = int((tok != tok_ref).sum())
    near = _near_boundary(logits, seeds, positions, kw) if (bad or count_near) else None
    assert bad == 0, (f"{bad}/{tok.numel()} tokens differ from group_sample_ref ({near} draws within 1e-6 "
                      f"of a CDF boundary; exact integer masses allow none); {kw}")
    atol, rtol = tolerance(logits.dtype)
    err = (lp - lp_ref).abs()
    assert torch.allclose(lp, lp_ref, atol=atol, rtol=rtol), \
        f"logprobs: max err {err.max():.3g}, mean {err.mean():.3g}; {kw}"
    return tok, lp, near


# --- the counter-based RNG -------------------------------------------------------------------

def test_philox_known_answers():
    # Random123 kat_vectors: philox4x32 10 (counter, key -> output)
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        got = philox4x32_10([np.array([c], dtype=np.uint64) for c in ctr],
                            [np.array([k], dtype=np.uint64) for k in key])
        assert [int(w[0]) for w in got] == list(want)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_uniform_logits_reveal_the_draw(backend, monkeypatch):
    """Equal logits over V = 4096: the token is u24 >> 12, so the C++ Philox, key split and
    counter layout are checked bit for bit against the numpy definition."""
    if backend == "cpu" and not (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "group_sample")):
        pytest.skip("detailflow_engine._C with group_sample is not built")
    monkeypatch.setenv("DETAILFLOW_BACKEND", backend)
    seeds = torch.tensor([0, 1, -1, 2 ** 63 - 1, -2 ** 63, 0x123456789ABCDEF], dtype=torch.int64)
    positions = torch.tensor([0, 1, 7, 127, 2 ** 32 - 1], dtype=torch.int64)
    logits = torch.zeros(len(seeds), len(positions), 4096)
    tok = group_sample(logits, seeds, positions)
    s = seeds.numpy().view(np.uint64)
    want = [[int(philox4x32_10(([p], [0], [0], [0]), ([int(x) & 0xFFFFFFFF], [int(x) >> 32]))[0][0]) >> 20
             for p in positions.tolist()] for x in s]
    assert tok.tolist() == want


# --- kernel == reference -----------------------------------------------------------------------

REAL = dict(B=8, n_q=8, V=8192)  # DetailFlow-16: 2B rows with CFG, group of 8, vocab 8192


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("top_k", [0, 50, 8192])
def test_real_sizes_match_ref(top_k, top_p, dtype):
    B, n_q, V = REAL["B"], REAL["n_q"], REAL["V"]
    logits = _logits(2 * B, n_q, V, seed=top_k + int(top_p * 10), dtype=dtype)
    *_, near = _check(logits, _seeds(B), torch.arange(8, 8 + n_q), count_near=True, cfg_scale=1.45,
                      temperature=1.0, top_k=top_k, top_p=top_p)
    assert near is not None  # counted (usually 0); such draws must match too, and did


@needs_cpu
@pytest.mark.parametrize("B,n_q,V,cfg,kw", [
    (1, 1, 1, True, dict()),                                           # smallest
    (1, 1, 7, False, dict(temperature=0.7)),
    (3, 1, 19, True, dict(cfg_scale=4.0, top_k=5)),
    (2, 8, 33, True, dict(top_p=0.5, temperature=1.3)),
    (3, 7, 111, False, dict(top_k=17, top_p=0.8)),
    (2, 3, 769, True, dict(top_k=200, temperature=0.5)),              # nth_element, sparse
    (1, 8, 769, True, dict(top_k=700, top_p=0.95)),                   # nth_element, dense mask
    (2, 8, 256, True, dict(cfg_scale=0.0, top_p=0.3)),
    (2, 8, 256, True, dict(cfg_scale=1.0, top_k=129, top_p=0.99)),
])
@pytest.mark.parametrize("ties", [False, True])
def test_odd_sizes_match_ref(B, n_q, V, cfg, kw, ties):
    R = 2 * B if cfg else B
    logits = _logits(R, n_q, V, seed=V + n_q, ties=ties, specials=True)
    _check(logits, _seeds(B, seed=V), torch.randint(0, 128, (n_q,), generator=torch.Generator().manual_seed(V)),
           **kw)


@needs_cpu
def test_noncontiguous_and_fp16_match_ref():
    B, n_q, V = 3, 8, 300
    wide = _logits(2 * B, 2 * n_q, V + 5, seed=5)
    sliced = wide[:, ::2, 2:V + 2]                      # strided rows, offset columns
    assert not sliced.is_contiguous()
    seeds, pos = _seeds(B), torch.arange(n_q)
    tok, *_ = _check(sliced, seeds, pos, cfg_scale=2.0, top_k=40, top_p=0.9)
    assert torch.equal(tok, group_sample(sliced.contiguous(), seeds, pos, cfg_scale=2.0, top_k=40, top_p=0.9))
    _check(_logits(2 * B, n_q, V, seed=6, dtype=torch.float16), seeds, pos, cfg_scale=1.5, top_p=0.9)
    # broadcast positions (stride 0): one row drawn at many positions
    one = _logits(2, 1, V, seed=7).expand(2, 64, V)
    _check(one, _seeds(1), torch.arange(64), cfg_scale=1.5, top_k=20)


def _nonfinite_rows():
    """(logits (2, 4, 64) with -inf, +inf and NaN rows and entries, seeds, positions)."""
    x = _logits(2, 4, 64, seed=8)
    x[0, 0] = float("-inf")                              # no finite logit: uniform over all
    x[0, 1, 5] = x[0, 1, 9] = float("inf")               # +inf max: only the infinite tokens
    x[1, 2] = float("nan")                               # unconditional row all NaN -> -inf
    x[0, 3, ::2] = float("nan")
    return x, _seeds(1), torch.arange(4)


@needs_cpu
def test_nonfinite_rows_match_ref():
    x, seeds, pos = _nonfinite_rows()
    tok, *_ = _check(x, seeds, pos, cfg_scale=1.0)
    assert tok[0, 1] in (5, 9) and tok[0, 3] % 2 == 1
    _check(x[:1], seeds, pos, top_k=3, top_p=0.5)


# --- properties --------------------------------------------------------------------------------

@needs_cpu
def test_batch_composition_does_not_change_tokens():
    V, n_q, s = 512, 8, 1.45
    mine = _logits(2, n_q, V, seed=9)                    # (cond, uncond) rows of one image
    seed, pos = torch.tensor([-7], dtype=torch.int64), torch.arange(40, 48)
    for impl in (group_sample, group_sample_ref):
        alone = impl(mine, seed, pos, cfg_scale=s, top_k=50, top_p=0.9)
        for slot, B in ((0, 8), (5, 8), (2, 3)):
            other = _logits(2 * B, n_q, V, seed=10 + slot)
            other[slot], other[B + slot] = mine[0], mine[1]
            seeds = _seeds(B, seed=11 + slot)
            seeds[slot] = seed[0]
            got = impl(other, seeds, pos, cfg_scale=s, top_k=50, top_p=0.9)
            assert torch.equal(got[slot], alone[0]), f"{impl.__name__}: slot {slot} of {B}"


@needs_cpu
@pytest.mark.parametrize("kw", [dict(top_k=7), dict(top_p=0.6), dict(top_k=30, top_p=0.7, temperature=0.8)])
def test_support(kw):
    B, n_q, V, s = 16, 8, 256, 2.0
    logits = _logits(2 * B, n_q, V, seed=12, scale=2.0)
    tok = group_sample(logits, _seeds(B), torch.arange(n_q), cfg_scale=s, **kw)
    mixed = logits[B:] + (logits[:B] - logits[B:]) * s
    if "top_k" in kw:  # among the k largest mixed logits (ties at the k-th value allowed)
        kth = torch.topk(mixed, kw["top_k"], dim=-1).values[..., -1]
        assert bool((mixed.gather(-1, tok[..., None])[..., 0] >= kth).all())
    probs = group_sample_probs_ref(logits, B, cfg_scale=s, **kw)  # the reference's filter
    assert bool((probs.gather(-1, tok[..., None]) > 0).all()), "a token outside the filtered set was drawn"


def _chi2_critical(df: int, z: float = 3.7190) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty (z = Phi^-1(1 - 1e-4) = 3.7190)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


@needs_cpu
@pytest.mark.parametrize("kw", [dict(), dict(top_k=10), dict(top_p=0.8), dict(temperature=0.7, top_k=12, top_p=0.9)])
def test_chi_square_fit(kw):
    """20000 draws of one fixed distribution at positions 0..N-1 (fixed seed: deterministic)."""
    N, V = 20000, 16
    base = torch.linspace(-2.0, 1.5, V)[torch.randperm(V, generator=torch.Generator().manual_seed(13))]
    logits = base.expand(1, N, V)
    seeds, pos = torch.tensor([2024], dtype=torch.int64), torch.arange(N)
    tok = group_sample(logits, seeds, pos, **kw)[0]
    assert torch.equal(tok, group_sample_ref(logits, seeds, pos, **kw)[0])
    p = group_sample_probs_ref(logits[:, :1], 1, **kw)[0, 0]
    counts = torch.bincount(tok, minlength=V).double()
    assert float(counts[p == 0].sum()) == 0, "drew a filtered-out token"
    live = p > 0
    expected = N * p[live]
    assert float(expected.min()) >= 5, "cells too small for the chi-square approximation"
    chi2 = float(((counts[live] - expected) ** 2 / expected).sum())
    df = int(live.sum()) - 1
    crit = _chi2_critical(df)
    assert chi2 < crit, f"chi2 = {chi2:.1f} >= {crit:.1f} (df {df}, p = 1e-4); counts {counts.tolist()}"


@needs_cpu
def test_filter_semantics_match_official():
    """The filtered distribution equals the official logits_to_probs (softmax of
    top_k_top_p_filtering of the CFG-mixed logits / temperature) up to the mass quantization
    (deterministic inputs; a row whose top-p cut sat within fp32 rounding of top_p could
    legitimately differ in its last token)."""
    from detailflow_ref.sampling import logits_to_probs

    B, n_q, V, s = 4, 8, 256, 1.45
    logits = _logits(2 * B, n_q, V, seed=14, scale=2.0)
    mixed = logits[B:] + (logits[:B] - logits[B:]) * s
    for kw in (dict(), dict(top_k=20), dict(top_p=0.9), dict(temperature=0.6, top_k=50, top_p=0.8)):
        ours = group_sample_probs_ref(logits, B, cfg_scale=s, **kw)
        official = logits_to_probs(mixed.reshape(-1, V), **kw).reshape(B, n_q, V).double()
        assert torch.equal(ours > 0, official > 1e-12), f"support differs: {kw}"
        err = float((ours - official).abs().max())
        assert err < 1e-6, f"max |p_ours - p_official| = {err:.3g}: {kw}"


@needs_cpu
@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(top_k=1), dict(temperature=0.0, top_k=5, top_p=0.5)])
def test_greedy(kw):
    B, n_q, V, s = 3, 8, 100, 1.45
    logits = _logits(2 * B, n_q, V, seed=15, ties=True, specials=True)
    logits[0, 1, 10] = logits[0, 1, 60] = 1e4           # tie at the max: lowest index wins
    tok, lp, _ = _check(logits, _seeds(B), torch.arange(n_q), cfg_scale=s, **kw)
    mixed = logits[B:] + (logits[:B] - logits[B:]) * s
    mixed = torch.where(torch.isnan(mixed), float("-inf"), mixed)
    assert torch.equal(tok, mixed.argmax(-1)) and tok[0, 1] == 10
    assert bool((lp == 0).all())


@needs_cpu
def test_logprobs_are_the_filtered_log_probabilities():
    B, n_q, V = 2, 8, 512
    logits = _logits(2 * B, n_q, V, seed=16)
    kw = dict(cfg_scale=1.45, temperature=0.9, top_k=100, top_p=0.9)
    tok, lp = group_sample(logits, _seeds(B), torch.arange(n_q), return_logprobs=True, **kw)
    probs = group_sample_probs_ref(logits, B, **kw)
    want = probs.gather(-1, tok[..., None])[..., 0].log().float()
    assert torch.allclose(lp, want, atol=1e-5), f"max err {(lp - want).abs().max():.3g}"


# --- plumbing ------------------------------------------------------------------------------------

@needs_cpu
def test_opcheck():
    logits = _logits(4, 3, 40, seed=17)
    torch.library.opcheck(torch.ops.detailflow.group_sample.default,
                          (logits, _seeds(2), torch.arange(3), 1.5, 0.9, 10, 0.8))


def test_forced_torch_backend(monkeypatch):
    logits, seeds, pos = _logits(4, 8, 64, seed=18), _seeds(2), torch.arange(8)
    want = group_sample_ref(logits, seeds, pos, cfg_scale=1.5, top_k=10)
    monkeypatch.setenv("DETAILFLOW_BACKEND", "torch")
    assert _dispatch.pick("group_sample", logits, seeds, pos).name == "torch"
    assert torch.equal(group_sample(logits, seeds, pos, cfg_scale=1.5, top_k=10), want)


@needs_cpu
def test_forced_cpu_backend(monkeypatch):
    logits, seeds, pos = _logits(4, 8, 64, seed=19, dtype=torch.bfloat16), _seeds(2), torch.arange(8)
    want = group_sample_ref(logits, seeds, pos, cfg_scale=1.5, top_p=0.7)
    monkeypatch.setenv("DETAILFLOW_BACKEND", "cpu")
    assert _dispatch.pick("group_sample", logits, seeds, pos).name == "cpu"
    assert torch.equal(group_sample(logits, seeds, pos, cfg_scale=1.5, top_p=0.7), want)


_L, _S, _P = torch.zeros(4, 2, 16), torch.zeros(2, dtype=torch.int64), torch.arange(2)


@pytest.mark.parametrize("args,kw,exc,needle", [
    ((_L.tolist(), _S, _P), {}, TypeError, "`logits`"),  # NumPy arrays are accepted (DLPack)
    ((_L[0], _S, _P), {}, ValueError, "`logits`"),
    ((_L.double(), _S, _P), {}, ValueError, "`logits`"),
    ((_L, _S.int(), _P), {}, ValueError, "`seeds`"),
    ((_L, torch.zeros(3, dtype=torch.int64), _P), {}, ValueError, "R = 4 rows but `seeds` has B = 3"),
    ((_L, _S, torch.arange(3)), {}, ValueError, "`positions`"),
    ((_L, _S, torch.tensor([0, -1])), {}, ValueError, "`positions`"),
    ((_L, _S, torch.tensor([0, 2 ** 32])), {}, ValueError, "`positions`"),
    ((_L, _S, _P), dict(top_k=-1), ValueError, "`top_k`"),
    ((_L, _S, _P), dict(top_k=2.5), TypeError, "`top_k`"),
    ((_L, _S, _P), dict(top_p=0.0), ValueError, "`top_p`"),
    ((_L, _S, _P), dict(top_p=1.5), ValueError, "`top_p`"),
    ((_L, _S, _P), dict(temperature=-1.0), ValueError, "`temperature`"),
    ((_L, _S, _P), dict(temperature=float("nan")), ValueError, "`temperature`"),
    ((_L, _S, _P), dict(cfg_scale=-0.5), ValueError, "`cfg_scale`"),
    ((_L, _S, _P), dict(cfg_scale=None), TypeError, "`cfg_scale`"),
])
def test_bad_input(args, kw, exc, needle):
    for impl in (group_sample, group_sample_ref):
        with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)")):
            impl(*args, **kw)


# --- the CUDA kernel's selection algorithm, emulated on the CPU ------------------------------
# csrc/cuda/group_sample.cu replaces the CPU kernel's buckets + sorts by radix selects on the
# 32-bit order keys and by segmented "crossing" scans. This numpy emulation follows the kernel
# step by step (the digit pick of warp 0, the warp segments of the scans, the fallbacks), so
# its agreement with the CPU kernel checks the algorithm without a GPU; the fp32 steps use the
# same single IEEE ops as both kernels.

_U32 = np.uint64(0xFFFFFFFF)


def _order_keys(y: np.ndarray) -> np.ndarray:
    """gs_order_key on a float32 array, as uint64 holding the uint32 keys."""
    u = np.where(y == 0, np.float32(0), y).astype(np.float32).view(np.uint32).astype(np.uint64)
    return np.where(u & np.uint64(0x80000000), ~u & _U32, u | np.uint64(0x80000000))


def _key_to_float(key: int) -> float:
    u = (key & 0x7FFFFFFF) if key & 0x80000000 else (~key & 0xFFFFFFFF)
    return float(np.array([u], dtype=np.uint32).view(np.float32)[0])


def _emu_pick_digit(hist: np.ndarray, need: int):
    h = [[int(hist[255 - 8 * lane - e]) for e in range(8)] for lane in range(32)]
    incl = np.cumsum([sum(x) for x in h], dtype=object)
    hits = [lane for lane in range(32) if incl[lane] >= need]
    L = hits[0] if hits else 31
    acc = int(incl[L]) - sum(h[L])
    for e in range(8):
        if e == 7 or acc + h[L][e] >= need:
            return 255 - 8 * L - e, acc
        acc += h[L][e]


def _emu_radix_select(keys: np.ndarray, w: np.ndarray, need: int):
    prefix, above = 0, 0
    for p in range(4):
        shift = 24 - 8 * p
        hi_mask = 0 if p == 0 else (0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF
        act = (w != 0) & ((keys & np.uint64(hi_mask)) == np.uint64(prefix))
        hist = np.zeros(256, dtype=np.uint64)
        np.add.at(hist, ((keys[act] >> np.uint64(shift)) & np.uint64(255)).astype(np.int64), w[act])
        digit, before = _emu_pick_digit(hist, need)
        prefix |= digit << shift
        need -= before
        above += before
    return prefix, above


def _emu_find_crossing(w: np.ndarray, target_of, fallback: int, threads: int):
    V, warps = len(w), threads // 32
    seg = ((V + warps - 1) // warps + 31) & ~31
    bounds = [(min(V, k * seg), min(V, min(V, k * seg) + seg)) for k in range(warps)]
    sums = [int(w[lo:hi].sum()) for lo, hi in bounds]
    incl = np.cumsum(sums, dtype=object)
    total = int(incl[-1])
    target = target_of(total)
    hits = [k for k in range(warps) if incl[k] > target]
    if not hits:
        return fallback, total
    cw = hits[0]
    carry = int(incl[cw]) - sums[cw]
    lo, hi = bounds[cw]
    for base in range(lo, hi, 32):
        inc = np.cumsum(w[base:min(base + 32, hi)].astype(object)) + carry
        over = np.nonzero(inc > target)[0]
        if len(over):
            return base + int(over[0]), total
        carry = int(inc[-1])
    return fallback, total


def _mulshift24_int(a24: int, total: int) -> int:
    return a24 * (total >> 24) + ((a24 * (total & 0xFFFFFF)) >> 24)


def _emulate_cuda(logits, seeds, positions, threads=None, **kw):
    """(tokens, logprobs) as csrc/cuda/group_sample.cu computes them, row by row."""
    from detailflow_engine.ops.group_sample import _settings
    R, n_q, V = logits.shape
    B = seeds.shape[0]
    st = _settings(R, B, V, kw.get("cfg_scale", 1.0), kw.get("temperature", 1.0), kw.get("top_k", 0),
                   kw.get("top_p", 1.0))
    threads = threads or (1024 if B * n_q <= 256 else 512)
    x_all = logits.float().numpy()
    u24 = sample_u24(seeds, positions).numpy()
    idx = np.arange(V, dtype=np.uint64)
    tokens = np.zeros((B, n_q), dtype=np.int64)
    lps = np.zeros((B, n_q), dtype=np.float32)
    with np.errstate(all="ignore"):  # inf - inf = NaN etc. are part of the contract
        for b in range(B):
            for j in range(n_q):
                _emulate_row(x_all, b, j, B, V, st, idx, int(u24[b, j]), threads, tokens, lps)
    return torch.from_numpy(tokens), torch.from_numpy(lps)


def _emulate_row(x_all, b, j, B, V, st, idx, u24, threads, tokens, lps):
    """One row of _emulate_cuda: writes tokens[b, j] and lps[b, j]."""
    from detailflow_engine.ops.group_sample import _exp_mass
    c = x_all[b, j]
    x = c
    if st.cfg:
        u = x_all[B + b, j]
        x = u + np.float32(st.cfg_scale) * (c - u)
    x = np.where(np.isnan(x), np.float32(-np.inf), x).astype(np.float32)
    if not st.greedy and st.temperature != 1.0:
        x = (x / np.float32(st.temperature)).astype(np.float32)
    best = int(((_order_keys(x) << np.uint64(32)) | (_U32 - idx)).max())
    argmax = 0xFFFFFFFF - (best & 0xFFFFFFFF)
    m_raw = _key_to_float(best >> 32)
    if st.greedy:
        tokens[b, j] = argmax
        return
    finite = math.isfinite(m_raw)
    y = x if finite else np.where(x == np.float32(m_raw), np.float32(0), np.float32(-np.inf))
    m = np.float32(m_raw if finite else 0.0)
    keys = _order_keys(y)
    kk = 0
    if st.top_k:
        kk, _ = _emu_radix_select(keys, np.ones(V, dtype=np.uint64), st.top_k)
    d = (y - m).astype(np.float32)
    dt = torch.from_numpy(d)
    q = torch.where(dt >= -28.0, _exp_mass(dt.clamp(min=-28.0)), 0.0).to(torch.int64).numpy()
    q = np.where(keys >= np.uint64(kk), q, 0).astype(np.uint64)
    kc, pc = 0, V
    if st.top_p24 < 1 << 24:
        pth = _mulshift24_int(st.top_p24, int(q.sum()))
        kc, above = _emu_radix_select(keys, q, pth + 1)
        pc, _ = _emu_find_crossing(np.where(keys == np.uint64(kc), q, np.uint64(0)),
                                   lambda tot: pth - above, V, threads)
    qf = np.where((keys > np.uint64(kc)) | ((keys == np.uint64(kc)) & (idx <= np.uint64(pc))), q, np.uint64(0))
    tok, total = _emu_find_crossing(qf, lambda tot: _mulshift24_int(u24, tot), argmax, threads)
    tokens[b, j] = tok
    lps[b, j] = np.float32(float(d[tok]) - math.log(total * 2.0 ** -40))


_EMU_CASES = [  # (B, n_q, V, cfg, ties, specials, kw)
    (2, 8, 8192, True, False, False, dict(cfg_scale=1.45)),
    (2, 8, 8192, True, False, True, dict(cfg_scale=1.45, top_k=50, top_p=0.9)),
    (2, 4, 8192, True, True, False, dict(cfg_scale=1.45, top_k=1000, top_p=0.999)),
    (2, 4, 8192, False, False, False, dict(temperature=0.7, top_k=8191)),
    (2, 4, 8192, True, True, True, dict(cfg_scale=2.0, temperature=1.3, top_k=2, top_p=0.5)),
    (1, 4, 8192, True, False, False, dict(cfg_scale=3.0, temperature=1e-4, top_p=0.9)),
    (3, 5, 1000, True, True, True, dict(cfg_scale=1.45, top_p=0.5)),
    (3, 5, 1000, False, True, False, dict(top_k=999, top_p=0.9)),
    (2, 3, 997, True, False, True, dict(temperature=0.0)),
    (2, 3, 33, True, True, True, dict(top_k=17, top_p=0.8)),
    (4, 2, 3, True, False, False, dict(top_k=2, top_p=0.5)),
    (4, 2, 2, False, True, False, dict(top_p=0.7)),
    (4, 2, 1, True, False, False, dict()),
]


@needs_cpu
@pytest.mark.parametrize("threads", [512, 1024])
@pytest.mark.parametrize("case", range(len(_EMU_CASES)))
def test_cuda_algorithm_emulation_matches_cpu_kernel(case, threads, monkeypatch):
    B, n_q, V, cfg, ties, specials, kw = _EMU_CASES[case]
    R = 2 * B if cfg else B
    logits = _logits(R, n_q, V, seed=100 + case, ties=ties, specials=specials)
    if ties:  # few distinct values: big tie groups at the top-k threshold and the top-p cut
        logits = torch.round(logits / 3)
    seeds = _seeds(B, seed=200 + case)
    pos = torch.randint(0, 2 ** 32, (n_q,), generator=torch.Generator().manual_seed(case))
    monkeypatch.setenv("DETAILFLOW_BACKEND", "cpu")
    tok, lp = group_sample(logits, seeds, pos, return_logprobs=True, **kw)
    etok, elp = _emulate_cuda(logits, seeds, pos, threads=threads, **kw)
    assert torch.equal(etok, tok), f"{int((etok != tok).sum())} tokens differ; {kw}"
    assert torch.allclose(elp, lp, atol=1e-6, rtol=0), f"max err {(elp - lp).abs().max():.3g}"


@needs_cpu
def test_cuda_algorithm_emulation_nonfinite_rows(monkeypatch):
    V = 64
    x = _logits(2, 4, V, seed=8)
    x[0, 0] = float("-inf")
    x[0, 1, 5] = x[0, 1, 9] = float("inf")
    x[1, 2] = float("nan")
    x[0, 3, ::2] = float("nan")
    seeds, pos = _seeds(1), torch.arange(4)
    monkeypatch.setenv("DETAILFLOW_BACKEND", "cpu")
    for kw in (dict(cfg_scale=1.0), dict(cfg_scale=1.0, top_k=3, top_p=0.5), dict(cfg_scale=2.0, temperature=0.0)):
        tok, lp = group_sample(x, seeds, pos, return_logprobs=True, **kw)
        etok, elp = _emulate_cuda(x, seeds, pos, **kw)
        assert torch.equal(etok, tok) and torch.equal(elp, lp), kw


def _boundary_logits(kind: str, R: int, n_q: int, V: int) -> torch.Tensor:
    """Logits whose counts / cumulative masses hit the selection thresholds exactly."""
    g = torch.Generator().manual_seed(V)
    if kind == "uniform":  # all masses 2^40: with top_p = 0.5 the mass before the cut == pth
        return torch.zeros(R, n_q, V)
    if kind == "half_mass":  # masses 2^40 (6 tokens at 0), 2^39 (12 at fp32(-ln 2)), 0 (rest):
        x = torch.full((R, n_q, V), -100.0)  # T = 12 * 2^40, so pth hits group boundaries exactly
        for r in range(R):
            for j in range(n_q):
                perm = torch.randperm(V, generator=g)
                x[r, j, perm[:6]] = 0.0
                x[r, j, perm[6:18]] = -math.log(2)
        return x
    x = torch.zeros(R, n_q, V)
    for r in range(R):
        for j in range(n_q):
            perm = torch.randperm(V, generator=g)
            if kind == "two_level":   # 100 tokens at 1.0: top_k = 100 is a group boundary
                x[r, j, perm[:100]] = 1.0
            else:                     # "ulp_levels": groups 1 ulp apart (keys differ in the last byte)
                levels = torch.tensor(np.nextafter(np.float32(1.0), np.float32(2.0), dtype=np.float32))
                x[r, j, perm[:64]] = levels
                x[r, j, perm[64:160]] = 1.0
    return x


@needs_cpu
@pytest.mark.parametrize("kind,kw", [
    ("uniform", dict(top_p=0.5)), ("uniform", dict(top_p=0.25, top_k=40)), ("uniform", dict(top_p=0.75)),
    ("two_level", dict(top_k=100)), ("two_level", dict(top_k=99, top_p=0.5)), ("two_level", dict(top_k=101)),
    ("half_mass", dict(top_p=0.5)), ("half_mass", dict(top_p=0.75)), ("half_mass", dict(top_p=0.25, top_k=10)),
    ("ulp_levels", dict(top_k=64)), ("ulp_levels", dict(top_k=160, top_p=0.4)), ("ulp_levels", dict(top_p=0.3)),
])
def test_cuda_algorithm_emulation_exact_boundaries(kind, kw, monkeypatch):
    B, n_q, V = 2, 4, 512
    logits = _boundary_logits(kind, B, n_q, V)
    seeds, pos = _seeds(B, seed=3), torch.arange(n_q)
    monkeypatch.setenv("DETAILFLOW_BACKEND", "cpu")
    tok, lp = group_sample(logits, seeds, pos, return_logprobs=True, **kw)
    assert torch.equal(tok, group_sample_ref(logits, seeds, pos, **kw))
    for threads in (512, 1024):
        etok, elp = _emulate_cuda(logits, seeds, pos, threads=threads, **kw)
        assert torch.equal(etok, tok) and torch.allclose(elp, lp, atol=1e-6, rtol=0), (kind, kw, threads)


# --- CUDA kernel (run with -m gpu on a CUDA machine) ------------------------------------------
# Contract: the same tokens as the CPU kernel bit for bit; logprobs bit for bit up to the last
# ulp (both take fp32(double(d) - log(double(T) 2^-40)); the device and host double `log` are
# each within 1 double ulp, so a fp32 rounding can differ in ~1 of 2^29 draws).

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _dispatch.has_cuda_kernels()
         and hasattr(_dispatch.extension(), "group_sample_cuda")),
    reason="needs a CUDA device and detailflow_engine._C built with group_sample_cuda")


def _f32_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in fp32 ulps (0 where equal, also +0 vs -0), same-sign values."""
    ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    return torch.where(a == b, 0, (ia - ib).abs())


def _cuda_vs_cpu(logits, seeds, pos, *, gpu_logits=None, **kw):
    """CUDA kernel vs CPU kernel: tokens equal, logprobs within 1 ulp (and counted)."""
    tok_c, lp_c = group_sample(logits, seeds, pos, return_logprobs=True, **kw)
    x = gpu_logits if gpu_logits is not None else logits.cuda()
    assert _dispatch.pick("group_sample", x, seeds.cuda(), pos.cuda()).name == "cuda"
    tok_g, lp_g = group_sample(x, seeds.cuda(), pos.cuda(), return_logprobs=True, **kw)
    assert tok_g.device.type == "cuda" and tok_g.dtype == torch.int64 and lp_g.dtype == torch.float32
    tok_g, lp_g = tok_g.cpu(), lp_g.cpu()
    bad = int((tok_g != tok_c).sum())
    assert bad == 0, f"{bad}/{tok_c.numel()} CUDA tokens differ from the CPU kernel; {kw}"
    ulps = _f32_ulps(lp_g, lp_c)
    assert int(ulps.max()) <= 1, f"logprobs differ by {int(ulps.max())} ulps; {kw}"
    if int((ulps > 0).sum()):
        print(f"{int((ulps > 0).sum())} logprobs differ by 1 ulp (device vs host double log)")
    return tok_g, lp_g


_GPU_SETTINGS = [
    dict(cfg_scale=1.45),
    dict(cfg_scale=1.45, top_k=50, top_p=0.9),
    dict(cfg_scale=1.45, temperature=0.7, top_k=1000),
    dict(cfg_scale=4.0, temperature=1.3, top_p=0.5),
    dict(cfg_scale=1.45, temperature=1e-4, top_p=0.999),
    dict(cfg_scale=1.0, top_k=2),
    dict(cfg_scale=1.45, top_k=8191, top_p=0.999),
    dict(cfg_scale=0.0, temperature=0.9, top_k=50, top_p=0.5),
    dict(cfg_scale=1.45, temperature=0.0),
    dict(cfg_scale=1.45, top_k=1, top_p=0.9),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("data", ["random", "ties", "specials"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("si", range(len(_GPU_SETTINGS)))
def test_cuda_matches_cpu_real_sizes(si, dtype, data):
    """DetailFlow-16 decode shapes (B = 8 images with CFG, g = 8 positions, V = 8192)."""
    kw = _GPU_SETTINGS[si]
    B, n_q, V = 8, 8, 8192
    logits = _logits(2 * B, n_q, V, seed=300 + si, ties=data == "ties", specials=data == "specials")
    if data == "ties":
        logits = torch.round(logits / 3)        # few distinct values: ties at every threshold
    if data == "specials":
        logits[1, 2, ::3] = float("nan")
        logits[2, 3, 100] = logits[2, 3, 7] = float("inf")
        logits[B + 3, 4] = float("-inf")
    logits = logits.to(dtype)
    for rep in range(3):                      # many seeds and positions
        seeds = _seeds(B, seed=400 + 10 * si + rep)
        pos = torch.randint(0, 2 ** 32, (n_q,), generator=torch.Generator().manual_seed(rep))
        _cuda_vs_cpu(logits, seeds, pos, **kw)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kw", [dict(cfg_scale=1.45, top_k=50, top_p=0.9), dict(cfg_scale=1.45, temperature=0.8)])
def test_cuda_matches_cpu_many_rows(kw):
    """256 images x 8 positions: the 512-thread launch (more than 256 rows)."""
    B, n_q, V = 256, 8, 8192
    logits = _logits(2 * B, n_q, V, seed=31, dtype=torch.bfloat16)
    _cuda_vs_cpu(logits, _seeds(B, seed=32), torch.arange(100, 100 + n_q), **kw)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("V", [1, 2, 3, 31, 33, 1000, 1025, 9999, 12289, pytest.param(70001, marks=pytest.mark.slow)])
@pytest.mark.parametrize("B,n_q", [(1, 1), (3, 5), (40, 8)])
def test_cuda_odd_sizes(V, B, n_q):
    """V = 1..3, not multiples of 32 / the block; 12289 and up: y recomputed from global memory
    instead of cached in shared memory, 9999 too with the 1024-thread launch (<= 256 rows) but
    cached with the 512-thread one (40 x 8 = 320 rows)."""
    logits = _logits(2 * B, n_q, V, seed=V + B, ties=V % 2 == 0, specials=True)
    seeds, pos = _seeds(B, seed=V), torch.arange(n_q) * 3
    settings = [dict(cfg_scale=1.5), dict(cfg_scale=1.5, top_p=0.6, temperature=0.7), dict(cfg_scale=2.0, temperature=0.0)]
    if V > 2:
        settings.append(dict(cfg_scale=1.5, top_k=max(2, V // 3), top_p=0.9))
        settings.append(dict(cfg_scale=1.5, top_k=V - 1))
    for kw in settings:
        _cuda_vs_cpu(logits, seeds, pos, **kw)


@pytest.mark.gpu
@needs_cuda
def test_cuda_many_rows_uncached():
    """More than 256 rows (512 threads) with V past the shared-memory cache."""
    B, n_q, V = 40, 8, 12000
    logits = _logits(2 * B, n_q, V, seed=41)
    _cuda_vs_cpu(logits, _seeds(B), torch.arange(n_q), cfg_scale=1.45, top_k=300, top_p=0.8)


@pytest.mark.gpu
@needs_cuda
def test_cuda_nonfinite_rows():
    x, seeds, pos = _nonfinite_rows()
    for kw in (dict(cfg_scale=1.0), dict(cfg_scale=1.0, top_k=3, top_p=0.5), dict(cfg_scale=3.0, temperature=0.0)):
        tok, _ = _cuda_vs_cpu(x, seeds, pos, **kw)
    tok, _ = _cuda_vs_cpu(x[:1], seeds, pos, top_k=3, top_p=0.5)
    tok, _ = _cuda_vs_cpu(x, seeds, pos, cfg_scale=1.0)
    assert tok[0, 1] in (5, 9) and tok[0, 3] % 2 == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_greedy_first_max():
    B, n_q, V, s = 3, 8, 100, 1.45
    logits = _logits(2 * B, n_q, V, seed=15, ties=True, specials=True)
    logits[0, 1, 10] = logits[0, 1, 60] = 1e4           # tie at the max: lowest index wins
    for kw in (dict(temperature=0.0), dict(top_k=1, top_p=0.3)):
        tok, lp = _cuda_vs_cpu(logits, _seeds(B), torch.arange(n_q), cfg_scale=s, **kw)
        assert tok[0, 1] == 10 and bool((lp == 0).all())


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_strided_and_broadcast_match_ref():
    B, n_q, V = 3, 8, 300
    seeds, pos = _seeds(B), torch.arange(n_q)
    half = _logits(2 * B, n_q, V, seed=6, dtype=torch.float16)
    kw = dict(cfg_scale=1.5, top_k=40, top_p=0.9, return_logprobs=True)
    tok_r, lp_r = group_sample_ref(half, seeds, pos, **kw)
    tok_g, lp_g = group_sample(half.cuda(), seeds.cuda(), pos.cuda(), **kw)
    assert torch.equal(tok_g.cpu(), tok_r)
    assert torch.allclose(lp_g.cpu(), lp_r, atol=tolerance(torch.float16)[0], rtol=0)
    _cuda_vs_cpu(half, seeds, pos, cfg_scale=1.5, top_k=40, top_p=0.9)   # CPU upcasts fp16 exactly
    # strided rows and offset columns, sliced on the GPU (no copy)
    wide = _logits(2 * B, 2 * n_q, V + 5, seed=5)
    sliced = wide[:, ::2, 2:V + 2]
    gsliced = wide.cuda()[:, ::2, 2:V + 2]
    assert not gsliced.is_contiguous()
    _cuda_vs_cpu(sliced, seeds, pos, gpu_logits=gsliced, cfg_scale=2.0, top_k=40, top_p=0.9)
    # a unit-stride-less view (transposed vocabulary) is copied by the wrapper
    tv = _logits(2 * B, V, n_q, seed=9)
    _cuda_vs_cpu(tv.transpose(1, 2), seeds, pos, gpu_logits=tv.cuda().transpose(1, 2), cfg_scale=1.5, top_p=0.8)
    # broadcast positions (stride 0): one row drawn at many positions
    one = _logits(2, 1, V, seed=7)
    _cuda_vs_cpu(one.expand(2, 64, V), _seeds(1), torch.arange(64), gpu_logits=one.cuda().expand(2, 64, V),
                 cfg_scale=1.5, top_k=20)


@pytest.mark.gpu
@needs_cuda
def test_cuda_forced_backend_and_ref(monkeypatch):
    B, n_q, V = 2, 8, 512
    logits, seeds, pos = _logits(2 * B, n_q, V, seed=19).cuda(), _seeds(B).cuda(), torch.arange(n_q).cuda()
    # temperature 1: torch's CUDA division by a scalar multiplies by the reciprocal (not the
    # IEEE quotient of the contract), so the reference on CUDA tensors is exact only without it
    kw = dict(cfg_scale=1.5, top_k=30, top_p=0.7)
    monkeypatch.setenv("DETAILFLOW_BACKEND", "cuda")
    assert _dispatch.pick("group_sample", logits, seeds, pos).name == "cuda"
    tok, lp = group_sample(logits, seeds, pos, return_logprobs=True, **kw)
    tok_r, lp_r = group_sample_ref(logits, seeds, pos, return_logprobs=True, **kw)  # torch ops on CUDA
    assert torch.equal(tok, tok_r)
    assert torch.allclose(lp, lp_r, atol=tolerance(torch.float32)[0], rtol=0)
    with pytest.raises(RuntimeError, match="does not apply"):
        group_sample(logits.cpu(), seeds.cpu(), pos.cpu(), **kw)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replay_matches_eager():
    B, n_q, V = 8, 8, 8192
    kw = dict(cfg_scale=1.45, temperature=0.9, top_k=100, top_p=0.9, return_logprobs=True)
    logits = _logits(2 * B, n_q, V, seed=50, dtype=torch.bfloat16).cuda()
    seeds, pos = _seeds(B).cuda(), torch.arange(8, 8 + n_q).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):                                # warm-up outside the capture
            group_sample(logits, seeds, pos, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok_s, lp_s = group_sample(logits, seeds, pos, **kw)
    for step in range(3):                                 # new inputs in place, replay
        logits.copy_(_logits(2 * B, n_q, V, seed=51 + step, dtype=torch.bfloat16))
        seeds.copy_(_seeds(B, seed=60 + step))
        pos.add_(n_q)
        graph.replay()
        tok_e, lp_e = group_sample(logits, seeds, pos, **kw)
        torch.cuda.synchronize()
        assert torch.equal(tok_s, tok_e) and torch.equal(lp_s, lp_e), f"replay {step}"


@pytest.mark.gpu
@pytest.mark.slow  # 20000 rows per case: slow under compute-sanitizer
@needs_cuda
@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7), dict(top_k=10), dict(top_p=0.8),
                                dict(temperature=1.3, top_k=12, top_p=0.9)])
def test_cuda_distribution_matches_softmax(kw):
    """20000 draws (positions 0..N-1) of one fixed row vs the filtered softmax: chi-square,
    and the support. Unfiltered: the probabilities are the plain softmax(x / T) (2^-40 mass
    quantization and the fp32 exp aside), so compare with torch.softmax directly."""
    N, V = 20000, 16
    base = torch.linspace(-2.0, 1.5, V)[torch.randperm(V, generator=torch.Generator().manual_seed(13))]
    logits = base.expand(1, N, V)
    seeds, pos = torch.tensor([77], dtype=torch.int64), torch.arange(N)
    tok = group_sample(logits.cuda(), seeds.cuda(), pos.cuda(), **kw)[0].cpu()
    p = group_sample_probs_ref(logits[:, :1], 1, **kw)[0, 0]
    if "top_k" not in kw and "top_p" not in kw:
        soft = torch.softmax(base.double() / kw.get("temperature", 1.0), -1)
        assert float((p - soft).abs().max()) < 1e-6  # fp32 exp: ~1e-7 relative
    counts = torch.bincount(tok, minlength=V).double()
    assert float(counts[p == 0].sum()) == 0, "drew a filtered-out token"
    live = p > 0
    expected = N * p[live]
    chi2 = float(((counts[live] - expected) ** 2 / expected).sum())
    df = int(live.sum()) - 1
    assert chi2 < _chi2_critical(df), f"chi2 = {chi2:.1f} (df {df}); counts {counts.tolist()}"


# ---------------------------------------------------------------------------------------------
# GroupSampler: one generation's steps, checked once

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0), (1.3, 1, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_sampler_equals_group_sample(temperature, top_k, top_p, dtype):
    """Each step's tokens are group_sample's on the same logits, seeds and positions (CFG and not)."""
    g = torch.Generator().manual_seed(4)
    seeds = torch.tensor([7, -3, 2 ** 40], dtype=torch.int64)
    sampler = GroupSampler(seeds, 30, temperature=temperature, top_k=top_k, top_p=top_p)
    for start, stop, rows, cfg in ((0, 1, 6, 1.45), (1, 2, 6, 0.0), (5, 13, 6, 3.0), (22, 30, 3, 1.0)):
        logits = torch.randn(rows, stop - start, 97, generator=g).to(dtype)
        want = group_sample(logits, seeds, torch.arange(start, stop), cfg_scale=cfg, temperature=temperature,
                            top_k=top_k, top_p=top_p)
        assert torch.equal(sampler(logits, start, stop, cfg), want)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: GroupSampler(torch.tensor([1]), 0), ValueError, "num_positions"),
    (lambda: GroupSampler([1], 4), TypeError, "`seeds` must be a torch.Tensor"),
    (lambda: GroupSampler(torch.tensor([1.0]), 4), ValueError, "`seeds` must be int64"),
    (lambda: GroupSampler(torch.tensor([1]), 4, temperature=-1.0), ValueError, "temperature"),
    (lambda: GroupSampler(torch.tensor([1]), 4, top_k=True), TypeError, "top_k"),
    (lambda: GroupSampler(torch.tensor([1]), 4, top_p=0.0), ValueError, "top_p"),
])
def test_group_sampler_checks_its_settings(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("call,match", [
    (lambda s: s(torch.randn(2, 2, 9), 0, 1, 1.0), "`logits` must be .* shape \\(1 or 2, 1, V\\)"),
    (lambda s: s(torch.randn(3, 1, 9), 0, 1, 1.0), "shape \\(1 or 2, 1, V\\)"),
    (lambda s: s(torch.randn(2, 1, 9, dtype=torch.float64), 0, 1, 1.0), "float32, bfloat16 or float16"),
    (lambda s: s(torch.randn(2, 2, 9), 3, 5, 1.0), r"positions \[3, 5\) of 4"),
    (lambda s: s(torch.randn(2, 1, 9), 0, 1, -1.0), "`cfg_scale` must be >= 0"),
    (lambda s: s(torch.randn(2, 1, 9), 0, 1, float("nan")), "`cfg_scale` must be finite"),
    (lambda s: s("logits", 0, 1, 1.0), "got str"),
])
def test_group_sampler_checks_each_step(call, match):
    with pytest.raises(ValueError, match=match):
        call(GroupSampler(torch.tensor([1]), 4))
