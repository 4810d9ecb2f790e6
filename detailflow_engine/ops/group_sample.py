"""group_sample: fused parallel-group sampling (CFG + temperature + top-k/top-p + seeded draw).

Every generation step of the prior yields logits for n_q positions (1 for the first causal
steps, then g = 8 per group step) of each row. This op turns them into one token per
(image, position) with the official semantics of `autoregressive/models/generate.py`
(CFG `u + s * (c - u)`; `sample`: `/ max(temperature, 1e-5)`, `top_k_top_p_filtering`,
softmax, one draw), except that the global-RNG `torch.multinomial` is replaced by a
counter-based draw, so an image's tokens depend only on its seed and token positions: never on
the batch size, its place in the batch or the backend.

CFG rule: the number of logits rows R is compared with the number of seeds B.
R == 2B: rows [0, B) are conditional, rows [B, 2B) unconditional (null class), mixed with
cfg_scale (any s >= 0, also 1). R == B: no CFG, cfg_scale is ignored. Anything else raises.

Exact definition (shared by `group_sample_ref`, csrc/cpu/group_sample.cpp and
csrc/cuda/group_sample.cu; all fp32 steps are single IEEE ops in the order written, all sums are uint64 integers):
  x = u + fp32(s) * (c - u)  [CFG] else c;  NaN -> -inf
  greedy (temperature == 0 or top_k == 1): token = first argmax of x, logprob = 0, no RNG
  y = x / fp32(max(temperature, 1e-5))  (skipped when that is 1);  m = max y
  d = 0 where y == m else y - m
  top-k (0 or >= V: off): keep y >= k-th largest y (ties kept)
  q = trunc(exp40(d)) for kept tokens with d >= -28, else 0  (exp40 ~ 2^40 exp(d): `_exp_mass`,
      Cephes expf evaluated op by op; q is an integer in [0, 2^40], q(max) = 2^40)
  top-p (1.0: off): p24 = floor(top_p * 2^24 + 0.5); sort by (y desc, index asc); keep a token iff
      the q-mass strictly before it is <= floor(p24 * T / 2^24), T = sum of q after top-k
  u24 = Philox4x32-10(counter = (position, 0, 0, 0), key = (seed & 0xffffffff, seed >> 32 as
      uint32, the seed's two's-complement bits))[word 0] >> 8;  u = u24 * 2^-24
  token = smallest index i with sum_{k <= i} q_k > floor(u24 * T_f / 2^24)  (vocabulary order;
      = inverse CDF of the filtered softmax at u, with exact integer prefix sums)
  logprob = fp32(float64(d[token]) - log(float64(T_f) * 2^-40))
Tokens whose probability is below 2^-40 of the row maximum (28 nats) are never drawn; the
uniform variate has 2^-24 resolution. V must be < 2^23 (sums stay below 2^63).

Backends (see `_dispatch`): CUDA `_C` (csrc/cuda/group_sample.cu: one block per row, radix
select on order keys instead of a sort; same tokens as the CPU kernel bit for bit, logprobs up
to the last-ulp rounding of the device `log`), CPU `_C` (csrc/cpu/group_sample.cpp), then the
torch reference `group_sample_ref`, which is also the test oracle. On CUDA the `positions`
range check is skipped (it would synchronize; the kernel uses the low 32 bits, never out of
bounds).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.interop import dlpack_interop

__all__ = ["group_sample", "GroupSampler", "group_sample_ref", "group_sample_probs_ref", "philox4x32_10",
           "sample_u24", "tolerance", "MAX_VOCAB"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_VOCAB = (1 << 23) - 1          # csrc/include/group_sample.h kGsMaxVocab
_CUTOFF = -28.0                    # kGsCutoff
_MASS_BITS = 40                    # kGsMassBits
_TOP_P_ONE = 1 << 24               # kGsTopPOne
_MIN_TEMPERATURE = 1e-5            # official `max(temperature, 1e-5)`

# ---------------------------------------------------------------------------------------------
# Philox4x32-10 (Random123 / cuRAND constants), numpy uint64 arithmetic: 32x32 products fit.

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


def philox4x32_10(ctr, key):
    """Philox4x32-10 on arrays: ctr = 4 arrays of uint32 values, key = 2 arrays; returns 4
    numpy uint64 arrays holding the uint32 output words (Random123's philox4x32_R(10, ...))."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & _MASK32 for c in ctr)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & _MASK32 for k in key)
    for rnd in range(10):
        if rnd:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = ((p1 >> _S32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _S32) ^ c3 ^ k1, p0 & _MASK32)
    return c0, c1, c2, c3


def sample_u24(seeds: Tensor, positions: Tensor) -> Tensor:
    """(B, n_q) int64: the 24-bit uniform variate of each (image seed, token position)."""
    s = seeds.detach().cpu().numpy().astype(np.int64).view(np.uint64)[:, None]
    p = positions.detach().cpu().numpy().astype(np.int64).view(np.uint64)[None, :]
    zero = np.zeros((1, 1), dtype=np.uint64)
    word0 = philox4x32_10((p, zero, zero, zero), (s & _MASK32, s >> _S32))[0]
    return torch.from_numpy((word0 >> np.uint64(8)).astype(np.int64)).to(seeds.device)


# ---------------------------------------------------------------------------------------------
# The reference (fallback and test oracle).

# fp32 constants of gs_exp_mass, exactly (hex literals as in csrc/include/group_sample.h)
_LOG2E = float.fromhex("0x1.715476p+0")
_C1, _C2 = float.fromhex("0x1.63p-1"), float.fromhex("-0x1.bd0106p-13")
_POLY = [float.fromhex(h) for h in ("0x1.a0d2cep-13", "0x1.6e879cp-10", "0x1.11121p-7",
                                    "0x1.555382p-5", "0x1.555554p-3", "0x1.0p-1")]
_ROUND = 12582912.0  # 1.5 * 2^23: (t + R) - R rounds t to the nearest integer, ties to even


def _exp_mass(d: Tensor) -> Tensor:
    """2^40 * exp(d) for fp32 d in [-28, 0], op by op as gs_exp_mass (the mass is its truncation)."""
    n = (d * _LOG2E + _ROUND) - _ROUND
    r = d - n * _C1
    r = r - n * _C2
    z = r * r
    p = r * _POLY[0] + _POLY[1]
    for c in _POLY[2:]:
        p = p * r + c
    p = p * z + r
    p = p + 1.0
    scale = ((n.to(torch.int32) + (127 + _MASS_BITS)) << 23).view(torch.float32)
    return p * scale


def _mulshift24(a24: Tensor, total: Tensor) -> Tensor:
    """floor(a24 * total / 2^24) in int64 without overflow (a24 <= 2^24, total < 2^63)."""
    return a24 * (total >> 24) + ((a24 * (total & 0xFFFFFF)) >> 24)


class _Settings(NamedTuple):
    cfg: bool
    cfg_scale: float     # exactly representable in fp32
    temperature: float   # max(temperature, 1e-5) rounded to fp32; 1.0 when greedy
    top_k: int           # 0 (off) or 2 .. V-1
    top_p24: int         # 0 .. 2^24 (2^24: off)
    greedy: bool


def _f32(x: float) -> float:
    return float(np.float32(x))


def _settings(R: int, B: int, V: int, cfg_scale, temperature, top_k, top_p) -> _Settings:
    greedy = temperature == 0 or top_k == 1
    k = 0 if (top_k == 0 or top_k >= V or greedy) else int(top_k)
    p24 = _TOP_P_ONE if top_p >= 1.0 else min(_TOP_P_ONE, int(math.floor(top_p * _TOP_P_ONE + 0.5)))
    t = 1.0 if greedy else _f32(max(float(temperature), _MIN_TEMPERATURE))
    return _Settings(R == 2 * B, _f32(cfg_scale), t, k, p24, greedy)


def _mixed(logits: Tensor, B: int, st: _Settings) -> Tensor:
    """(B, n_q, V) fp32: CFG mix, NaN -> -inf (before temperature)."""
    x = logits.float()
    c = x[:B]
    if st.cfg:
        u = x[B:]
        c = u + (c - u) * st.cfg_scale
    return torch.where(torch.isnan(c), float("-inf"), c)


def _masses(logits: Tensor, B: int, st: _Settings) -> Tuple[Tensor, Tensor]:
    """Filtered integer masses q (B, n_q, V) int64 and d = y - max y (B, n_q, V) fp32."""
    y = _mixed(logits, B, st)
    if st.temperature != 1.0:
        y = y / st.temperature
    m = y.amax(dim=-1, keepdim=True)
    d = torch.where(y == m, 0.0, y - m)
    keep = d >= _CUTOFF
    if st.top_k:
        keep &= y >= torch.topk(y, st.top_k, dim=-1).values[..., -1:]
    q = torch.where(keep, _exp_mass(d.clamp(min=_CUTOFF)), 0.0).to(torch.int64)
    if st.top_p24 < _TOP_P_ONE:
        total = q.sum(dim=-1, keepdim=True)
        pth = _mulshift24(torch.full_like(total, st.top_p24), total)
        order = torch.sort(y, dim=-1, descending=True, stable=True).indices
        qs = q.gather(-1, order)
        before = qs.cumsum(dim=-1) - qs  # mass strictly before each sorted position
        keep_p = torch.zeros_like(keep).scatter(-1, order, before <= pth)
        q = torch.where(keep_p, q, 0)
    return q, d


def _ref_compute(logits: Tensor, seeds: Tensor, positions: Tensor, st: _Settings) -> Tuple[Tensor, Tensor]:
    B, n_q = seeds.shape[0], logits.shape[1]
    if st.greedy:
        tokens = _mixed(logits, B, st).argmax(dim=-1)  # first maximal index
        return tokens, torch.zeros((B, n_q), dtype=torch.float32, device=logits.device)
    q, d = _masses(logits, B, st)
    total = q.sum(dim=-1)
    target = _mulshift24(sample_u24(seeds, positions), total)
    tokens = (q.cumsum(dim=-1) <= target[..., None]).sum(dim=-1)
    d_tok = d.gather(-1, tokens[..., None])[..., 0].double()
    logprobs = (d_tok - torch.log(total.double() * 2.0 ** -_MASS_BITS)).float()
    return tokens, logprobs


def group_sample_ref(logits: Tensor, seeds: Tensor, positions: Tensor, *, cfg_scale: float = 1.0,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     return_logprobs: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Plain-torch reference of `group_sample` (same arguments and results); the test oracle."""
    _validate(logits, seeds, positions, cfg_scale, temperature, top_k, top_p)
    R, _, V = logits.shape
    st = _settings(R, seeds.shape[0], V, cfg_scale, temperature, top_k, top_p)
    tokens, logprobs = _ref_compute(logits, seeds, positions, st)
    return (tokens, logprobs) if return_logprobs else tokens


def group_sample_probs_ref(logits: Tensor, batch: int, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                           top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(batch, n_q, V) float64: the exact distribution each draw samples from (the filtered
    masses q / sum q; one-hot at the argmax on the greedy path). For support and statistics."""
    R, n_q, V = logits.shape
    st = _settings(R, batch, V, cfg_scale, temperature, top_k, top_p)
    if st.greedy:
        tok = _mixed(logits, batch, st).argmax(dim=-1, keepdim=True)
        return torch.zeros((batch, n_q, V), dtype=torch.float64, device=logits.device).scatter(-1, tok, 1.0)
    q, _ = _masses(logits, batch, st)
    return q.double() / q.sum(dim=-1, keepdim=True).double()


# (atol, rtol) for the logprobs against the reference, by logits dtype. Tokens are exact:
# both sides draw from the same integer masses (no boundary cases to excuse).
tolerance = _dispatch.tolerance_table("group_sample", {d: (1e-5, 0.0) for d in _DTYPES})


# ---------------------------------------------------------------------------------------------
# Validation

def _real(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {v}")
    return v


def _check_cfg_scale(cfg_scale) -> None:
    if _real("cfg_scale", cfg_scale) < 0:
        raise ValueError(f"`cfg_scale` must be >= 0, got {cfg_scale}")


def _validate(logits, seeds, positions, cfg_scale, temperature, top_k, top_p) -> None:
    for name, t in (("logits", logits), ("seeds", seeds), ("positions", positions)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if logits.dtype not in _DTYPES or logits.dim() != 3 or logits.numel() == 0:
        raise ValueError(f"`logits` must be float32, bfloat16 or float16 of shape (R, n_q, V) with "
                         f"R, n_q, V >= 1, got {_dispatch.describe(logits)}")
    R, n_q, V = logits.shape
    if V > MAX_VOCAB:
        raise ValueError(f"`logits` vocabulary V must be < 2^23 = {MAX_VOCAB + 1}, got V = {V}")
    if seeds.dtype != torch.int64 or seeds.dim() != 1 or seeds.shape[0] < 1:
        raise ValueError(f"`seeds` must be int64 of shape (B,) with B >= 1, got {_dispatch.describe(seeds)}")
    B = seeds.shape[0]
    if R != B and R != 2 * B:
        raise ValueError(f"`logits` has R = {R} rows but `seeds` has B = {B} images: R must be B "
                         f"(no CFG) or 2B (CFG: conditional rows [0, B), unconditional [B, 2B))")
    if positions.dtype != torch.int64 or tuple(positions.shape) != (n_q,):
        raise ValueError(f"`positions` must be int64 of shape (n_q,) = ({n_q},) (n_q from `logits`), "
                         f"got {_dispatch.describe(positions)}")
    for name, t in (("seeds", seeds), ("positions", positions)):
        if t.device != logits.device:
            raise ValueError(f"`{name}` must be on the device of `logits` ({logits.device}), got {_dispatch.describe(t)}")
    if positions.device.type == "cpu" and not torch.compiler.is_compiling():
        values = positions.numpy()  # a view: no torch op for a check that runs every decode step
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= 1 << 32:
            bad = lo if lo < 0 else hi
            raise ValueError(f"`positions` values must be token positions in [0, 2^32), got {bad}")
    _check_cfg_scale(cfg_scale)
    if _real("temperature", temperature) < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"`top_k` must be an int, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 = off), got {top_k}")
    p = _real("top_p", top_p)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"`top_p` must be in (0, 1] (1 = off), got {top_p}")


# ---------------------------------------------------------------------------------------------
# The op

def _run(logits: Tensor, seeds: Tensor, positions: Tensor, cfg_scale: float,
         temperature: float, top_k: int, top_p: float) -> Tuple[Tensor, Tensor]:
    R, _, V = logits.shape
    st = _settings(R, seeds.shape[0], V, cfg_scale, temperature, top_k, top_p)
    return _dispatch.pick("group_sample", logits, seeds, positions).fn(logits, seeds, positions, st)


@torch.library.custom_op("detailflow::group_sample", mutates_args=())
def _group_sample_op(logits: Tensor, seeds: Tensor, positions: Tensor, cfg_scale: float,
                     temperature: float, top_k: int, top_p: float) -> Tuple[Tensor, Tensor]:
    return _run(logits, seeds, positions, cfg_scale, temperature, top_k, top_p)


@_group_sample_op.register_fake
def _group_sample_fake(logits, seeds, positions, cfg_scale, temperature, top_k, top_p):
    shape = (seeds.shape[0], logits.shape[1])
    return (torch.empty(shape, dtype=torch.int64, device=logits.device),
            torch.empty(shape, dtype=torch.float32, device=logits.device))


@dlpack_interop
def group_sample(logits: Tensor, seeds: Tensor, positions: Tensor, *, cfg_scale: float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 return_logprobs: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Sample one token per (image, position) from CFG-mixed, filtered logits with per-image seeds.

    Args:
        logits: (R, n_q, V) float32, bfloat16 or float16 (any strides), V < 2^23. R == 2B: CFG,
            rows [0, B) conditional and [B, 2B) unconditional; R == B: no CFG.
        seeds: (B,) int64, one seed per image (any int64; its 64 bits are the Philox key).
        positions: (n_q,) int64, the token positions sampled in this step, in [0, 2^32).
        cfg_scale: s >= 0 of u + s * (c - u); ignored when R == B.
        temperature: >= 0; 0 means greedy (first argmax of the mixed logits).
        top_k: >= 0; 0 or >= V: off; 1: greedy. Ties at the k-th largest value are kept.
        top_p: in (0, 1]; 1: off. HF nucleus rule (the first token always stays).
        return_logprobs: also return the log of the chosen token's filtered, renormalized
            probability (after temperature); 0 on the greedy path.

    Returns:
        tokens (B, n_q) int64 [, logprobs (B, n_q) float32]. The exact arithmetic is in this
        module's docstring: a token depends only on its image's logits, seed and position.
    """
    _validate(logits, seeds, positions, cfg_scale, temperature, top_k, top_p)
    args = (logits, seeds, positions, float(cfg_scale), float(temperature), int(top_k), float(top_p))
    op = _run if _dispatch.plain_eager(logits, seeds, positions) \
        else torch.ops.detailflow.group_sample.default  # eager: skip the custom-op layers (~20 us)
    tokens, logprobs = op(*args)
    return (tokens, logprobs) if return_logprobs else tokens


class GroupSampler:
    """`group_sample` for the steps of one generation: the seeds and the settings that stay fixed
    are checked once (as group_sample checks them) and the positions are slices of one arange,
    so a step checks only its logits and its CFG scale: the same op and bits, 13-22 us less a step
    (a batch-1 step of the embedded model is ~1 ms).

        sampler = GroupSampler(seeds, T, temperature=..., top_k=..., top_p=...)
        tokens = sampler(logits, start, stop, cfg_scale)   # positions [start, stop) of T
    """

    def __init__(self, seeds: Tensor, num_positions: int, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0):
        if isinstance(num_positions, bool) or not isinstance(num_positions, int) or not 1 <= num_positions <= 1 << 32:
            raise ValueError(f"`num_positions` must be an int in [1, 2^32], got {num_positions!r}")
        if not isinstance(seeds, Tensor):
            raise TypeError(f"`seeds` must be a torch.Tensor, got {type(seeds).__name__}")
        positions = torch.arange(num_positions, device=seeds.device)
        probe = torch.empty((seeds.shape[0] if seeds.dim() == 1 else 1, 1, 1), device=seeds.device)
        _validate(probe, seeds, positions[:1], 1.0, temperature, top_k, top_p)  # all but logits and cfg
        self.seeds, self.positions = seeds.contiguous(), positions
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)

    def settings(self, R: int, V: int, cfg_scale: float) -> _Settings:
        """The kernel's settings for logits of R rows (B, or 2B: CFG) and V tokens at `cfg_scale`
        (checked as a call checks it): what a fused caller (ops.prior_step) hands the kernel."""
        _check_cfg_scale(cfg_scale)
        if not 1 <= V <= MAX_VOCAB:
            raise ValueError(f"V must be in [1, {MAX_VOCAB}], got {V}")
        return _settings(R, self.seeds.shape[0], V, cfg_scale, self.temperature, self.top_k, self.top_p)

    def __call__(self, logits: Tensor, start: int, stop: int, cfg_scale: float) -> Tensor:
        """Tokens (B, stop - start) int64 for the logits (R, stop - start, V) of positions [start, stop)."""
        B = self.seeds.shape[0]
        if (not isinstance(logits, Tensor) or logits.dtype not in _DTYPES or logits.dim() != 3
                or logits.shape[0] not in (B, 2 * B) or not 0 <= start < stop <= self.positions.shape[0]
                or logits.shape[1] != stop - start or not 1 <= logits.shape[2] <= MAX_VOCAB
                or logits.device != self.seeds.device):
            raise ValueError(f"`logits` must be float32, bfloat16 or float16 of shape ({B} or {2 * B}, "
                             f"{stop - start}, V) on {self.seeds.device} for positions [{start}, {stop}) of "
                             f"{self.positions.shape[0]}, got "
                             f"{_dispatch.describe(logits) if isinstance(logits, Tensor) else type(logits).__name__}")
        _check_cfg_scale(cfg_scale)
        positions = self.positions[start:stop]
        args = (logits, self.seeds, positions, float(cfg_scale), self.temperature, self.top_k, self.top_p)
        op = _run if _dispatch.plain_eager(logits, self.seeds, positions) else torch.ops.detailflow.group_sample.default
        return op(*args)[0]


def _cpu_impl(logits: Tensor, seeds: Tensor, positions: Tensor, st: _Settings) -> Tuple[Tensor, Tensor]:
    x = logits.float() if logits.dtype == torch.float16 else logits  # exact upcast
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    seeds, positions = seeds.contiguous(), positions.contiguous()
    R, n_q, V = x.shape
    B = seeds.shape[0]
    tokens = torch.empty((B, n_q), dtype=torch.int64, device=x.device)
    logprobs = torch.empty((B, n_q), dtype=torch.float32, device=x.device)
    _dispatch.extension().group_sample(
        x.data_ptr(), _dispatch.DTYPE_CODES[x.dtype], R, n_q, V, (x.stride(0), x.stride(1), 1),
        seeds.data_ptr(), positions.data_ptr(), B, st.cfg_scale, st.temperature, st.top_k,
        st.top_p24, st.greedy, tokens.data_ptr(), logprobs.data_ptr(), _dispatch.num_threads())
    return tokens, logprobs


def _cpu_applies(logits, seeds, positions) -> bool:
    return (_dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "group_sample")
            and all(t.device.type == "cpu" for t in (logits, seeds, positions))
            and logits.dtype in _DTYPES)


def _cuda_impl(logits: Tensor, seeds: Tensor, positions: Tensor, st: _Settings) -> Tuple[Tensor, Tensor]:
    x = logits
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    seeds, positions = seeds.contiguous(), positions.contiguous()
    R, n_q, V = x.shape
    B = seeds.shape[0]
    dev = x.device
    tokens = torch.empty((B, n_q), dtype=torch.int64, device=dev)
    logprobs = torch.empty((B, n_q), dtype=torch.float32, device=dev)
    args = (x.data_ptr(), _dispatch.DTYPE_CODES[x.dtype], R, n_q, V, (x.stride(0), x.stride(1), 1),
            seeds.data_ptr(), positions.data_ptr(), B, st.cfg_scale, st.temperature, st.top_k,
            st.top_p24, st.greedy, tokens.data_ptr(), logprobs.data_ptr())
    with _dispatch.on_device(dev):
        _dispatch.extension().group_sample_cuda(*args, torch.cuda.current_stream(dev).cuda_stream)
    return tokens, logprobs


def _cuda_applies(logits, seeds, positions) -> bool:
    return (_dispatch.has_cuda_kernels() and hasattr(_dispatch.extension(), "group_sample_cuda")
            and logits.device.type == "cuda"
            and all(t.device == logits.device for t in (seeds, positions))
            and logits.dtype in _DTYPES)


_dispatch.register("group_sample", "cuda", _cuda_impl, applies=_cuda_applies)
_dispatch.register("group_sample", "cpu", _cpu_impl, applies=_cpu_applies)
_dispatch.register("group_sample", "torch", _ref_compute)


def _selfcheck(backend, reference, device) -> None:
    """Exact tokens against the reference: CFG with top-k / top-p draws (the shared Philox stream)
    and greedy, 2 images x 3 positions over an odd vocabulary."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 3, 1001, generator=g)).to(device)
    seeds = torch.tensor([7, 2 ** 40 + 3], dtype=torch.int64, device=device)
    positions = torch.tensor([5, 6, 7], dtype=torch.int64, device=device)
    if not backend.applies(logits, seeds, positions):
        return
    for cfg_scale, temperature, top_k, top_p in ((1.5, 1.0, 50, 0.9), (1.5, 0.0, 0, 1.0)):
        st = _settings(4, 2, 1001, cfg_scale, temperature, top_k, top_p)
        tokens, logprobs = backend.fn(logits, seeds, positions, st)
        want, want_lp = reference(logits, seeds, positions, st)
        if not torch.equal(tokens.cpu(), want.cpu()):
            raise AssertionError(f"group_sample (cfg {cfg_scale}, T {temperature}, top_k {top_k}, top_p {top_p}): "
                                 f"tokens {tokens.tolist()} != reference {want.tolist()}")
        _dispatch.expect_close("group_sample logprobs", logprobs, want_lp, 1e-3, 1e-4)


_dispatch.register_selfcheck("group_sample", _selfcheck)
