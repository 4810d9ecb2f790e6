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
from detailflow_engine.ops.group_sample import (group_sample, group_sample_probs_ref, group_sample_ref,
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


@needs_cpu
def test_nonfinite_rows_match_ref():
    V = 64
    x = _logits(2, 4, V, seed=8)
    x[0, 0] = float("-inf")                              # no finite logit: uniform over all
    x[0, 1, 5] = x[0, 1, 9] = float("inf")               # +inf max: only the infinite tokens
    x[1, 2] = float("nan")                               # unconditional row all NaN -> -inf
    x[0, 3, ::2] = float("nan")
    seeds, pos = _seeds(1), torch.arange(4)
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
    ((_L.numpy(), _S, _P), {}, TypeError, "`logits`"),
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
