"""Named profiler ranges for the stages of a generation, put in from the outside.

Nothing here edits the engine or the reference models: while a profile runs, `instrument_engine`
and `instrument_reference` wrap methods on the model *instances* (and a few call-site globals of
our modules, e.g. ``pipeline.GroupSampler.__call__``) in torch.profiler ranges (`_dispatch.profiler_range`) and
put everything back on exit. Stage ranges may nest (the decoder range holds the VQ-lookup one);
the analysis charges each stage its exclusive time.

It also counts the bytes and FLOPs our kernels move (weights streamed by decode_gemm, the KV cache
read by cache_attention, logits read by group_sample, everything a prior_step reads, ...), so the per-op table can print GB/s.
"""
from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops._dispatch import profiler_range

# Stage display names, in table order; the range of stage s is STAGE_PREFIX + s.
STAGES = ("prior: class step", "prior: single steps", "prior: group steps", "sampling", "VQ lookup",
          "decoder", "post-processing")
STAGE_PREFIX = "stage::"
RUN_PREFIX = "run::"
NORM_RANGE = "norm::RMSNorm"


def stage_range(stage: str) -> str:
    return STAGE_PREFIX + stage


def prior_stage(start: int, causal_num: int) -> str:
    """The stage of a prior step producing tokens from `start`: class (0), single (< c), group."""
    if start == 0:
        return STAGES[0]
    return STAGES[1] if start < causal_num else STAGES[2]


class StageTimer:
    """Exclusive wall time per range name from perf_counter at range boundaries: the stage table of an
    unprofiled run, so profiler overhead (which grows with the number of small ops) does not skew it."""

    def __init__(self):
        self.times: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)
        self._stack: List[List[float]] = []  # [start, time of nested ranges]

    def enter(self) -> None:
        self._stack.append([time.perf_counter(), 0.0])

    def charge(self, name: str, seconds: float) -> None:
        """A range of `name` that lasted `seconds` inside the innermost open one, timed by a kernel
        (work of another stage done inside one extension call: prior_step's draw)."""
        self.times[name] += seconds
        self.calls[name] += 1
        if self._stack:
            self._stack[-1][1] += seconds

    def exit(self, name: str) -> None:
        start, nested = self._stack.pop()
        dur = time.perf_counter() - start
        self.times[name] += dur - nested
        self.calls[name] += 1
        if self._stack:
            self._stack[-1][1] += dur


_TIMER: List[Optional[StageTimer]] = [None]


@contextlib.contextmanager
def timing(timer: StageTimer) -> Iterator[StageTimer]:
    """Stage ranges also feed `timer` for the duration."""
    _TIMER[0] = timer
    try:
        yield timer
    finally:
        _TIMER[0] = None


class Ranges:
    """A context manager factory: a named range, synchronizing the device at both ends on CUDA so
    that asynchronous kernels are charged to the stage that launched them."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.open: List[str] = []  # names of the ranges entered and not yet left, innermost last

    @property
    def innermost(self) -> Optional[str]:
        return self.open[-1] if self.open else None

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        timer = _TIMER[0]
        if timer is not None:
            timer.enter()
        self.open.append(name)
        try:
            with profiler_range(name):
                yield
                if self.cuda:
                    torch.cuda.synchronize()
        finally:
            self.open.pop()
            if timer is not None:
                timer.exit(name)


class Counters:
    """Bytes and FLOPs per op name, filled by the counting wrappers while `active`."""

    def __init__(self):
        self.active = False
        self.bytes: Dict[str, float] = defaultdict(float)
        self.flops: Dict[str, float] = defaultdict(float)
        self.charges: List[Tuple[str, str, str, str, float]] = []

    def reset(self, active: bool) -> None:
        self.active = active
        self.bytes.clear()
        self.flops.clear()
        self.charges.clear()

    def charge(self, outer_stage: str, stage: str, outer_op: str, op: str, seconds: float) -> None:
        """`seconds` of `stage` / `op` spent inside a range of `outer_stage` / `outer_op`, timed by
        the kernel itself (the profiler cannot see into one extension call); the analysis moves them."""
        if self.active:
            self.charges.append((outer_stage, stage, outer_op, op, seconds))

    def add(self, op: str, nbytes: float, flops: float = 0.0) -> None:
        if self.active:
            self.bytes[op] += nbytes
            self.flops[op] += flops


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# What each of our ops must move at least (for GB/s), from the call's arguments.
def _decode_gemm_cost(x, packed, *a, **k) -> Tuple[float, float]:
    m = x.numel() // packed.K
    weight = _nbytes(packed.packed) + _nbytes(packed.kernel_scales)  # int8/int4: codes + scales
    return weight + _nbytes(x) + m * packed.N * x.element_size(), 2.0 * m * packed.N * packed.K


def _cache_attention_cost(q, k_new, v_new, k_cache, v_cache, start_pos, *a, **k) -> Tuple[float, float]:
    b, h, n, d = q.shape
    ctx = int(start_pos) + n
    kv = 2 * b * h * ctx * d * k_cache.element_size()  # the keys and values attended to
    return kv + 4 * _nbytes(q), 4.0 * b * h * n * ctx * d


def _group_sample_cost(logits, *a, **k) -> Tuple[float, float]:
    return _nbytes(logits), 0.0


def _vq_lookup_cost(codes, codebook, weight, bias=None, pos_embed=None, *a, **k) -> Tuple[float, float]:
    b, t = codes.shape
    c, d = weight.shape
    rows = b * t * d * codebook.element_size()
    return rows + _nbytes(weight) + 2 * b * t * c * weight.element_size(), 2.0 * b * t * c * d


def _code_search_cost(latents, codebook, *a, **k) -> Tuple[float, float]:
    n = latents.numel() // codebook.shape[1]
    return _nbytes(codebook) + _nbytes(latents), 2.0 * n * codebook.numel()


def _linear_bytes(lin) -> int:
    held = getattr(lin, "held_bytes", None)  # a DecodeLinear: its packed layout
    return held if held is not None else _nbytes(lin.weight)


_WEIGHT_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # PriorStepWeights -> (bytes, params)


def _weights_cost(w) -> Tuple[int, int]:
    """(bytes, multiply-adds a row) of a PriorStepWeights' linears, once per object: the profile
    counts every step, and summing 30 linears a step would be the profiler's cost, charged to Python."""
    cost = _WEIGHT_COSTS.get(w)
    if cost is None:
        linears = [lin for layer in w.stack.layers for lin in layer.linears()] + [w.head]
        cost = _WEIGHT_COSTS[w] = (sum(_linear_bytes(lin) for lin in linears),
                                   sum(lin.in_features * lin.out_features for lin in linears))
    return cost


def _prior_step_cost(w, labels, tokens, start, stop, *a, **k) -> Tuple[float, float]:
    """Every layer's and the head's weights, the keys and values attended to, the logits written."""
    stack, n = w.stack, int(stop) - int(start)
    B, _, dim = stack.like.shape
    weights, params = _weights_cost(w)
    vocab = w.embeddings.tok_table.shape[0]
    kv = 2 * B * int(stop) * dim * stack.k_caches[0].element_size() * len(stack)
    flops = 2.0 * B * n * params + 4.0 * B * n * int(stop) * dim * len(stack)
    return weights + kv + 4 * B * n * vocab, flops


OP_COSTS: Dict[str, Callable[..., Tuple[float, float]]] = {
    "decode_gemm": _decode_gemm_cost, "cache_attention": _cache_attention_cost,
    "group_sample": _group_sample_cost, "vq_lookup": _vq_lookup_cost, "code_search": _code_search_cost}


class Patcher:
    """setattr with undo: every patch is reverted (in reverse order) by `restore`."""

    def __init__(self):
        self._undo: List[Tuple[object, str, object, bool]] = []

    def wrap(self, obj, name: str, make: Callable[[Callable], Callable]) -> None:
        if not hasattr(obj, name):
            return
        had_own = name in getattr(obj, "__dict__", {})
        old = getattr(obj, name)
        self._undo.append((obj, name, old, had_own))
        setattr(obj, name, make(old))

    def restore(self) -> None:
        while self._undo:
            obj, name, old, had_own = self._undo.pop()
            if had_own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def _in_range(ranges: Ranges, name_of: Callable[..., str]) -> Callable[[Callable], Callable]:
    def make(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            name = name_of(*args, **kwargs)
            if ranges.innermost == name:  # inside its own stage already (step_logits -> forward_step):
                return fn(*args, **kwargs)  # one range, not a nested copy (the same exclusive times)
            with ranges(name):
                return fn(*args, **kwargs)
        return wrapped
    return make


def _counted(counters: Counters, op: str, stage: str = None, ranges: Ranges = None,
             cost: Optional[Callable[..., Tuple[float, float]]] = None) -> Callable[[Callable], Callable]:
    cost = cost or OP_COSTS[op]

    def make(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            if counters.active:
                counters.add("detailflow::" + op, *cost(*args, **kwargs))
            if stage is None:
                return fn(*args, **kwargs)
            with ranges(stage_range(stage)):
                return fn(*args, **kwargs)
        return wrapped
    return make


def _counted_step(counters: Counters, stage: str, w, labels, tokens, start: int, stop: int,
                  call: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One prior step, `call()`, counted (its bytes and FLOPs), and the draw its CPU kernel makes in
    the same call (timed inside the kernel: PriorStepWeights.last_sample_seconds) charged to the
    sampling stage and the group_sample op, as a separate sampler call would be."""
    _weights_cost(w)  # summed once a PriorStepWeights, in the warm-up runs: not inside the profiled one
    if counters.active:
        counters.add("detailflow::prior_step", *_prior_step_cost(w, labels, tokens, start, stop))
    w.last_sample_seconds = None
    logits = call()
    seconds = w.last_sample_seconds
    if seconds is not None:
        timer = _TIMER[0]
        if timer is not None:
            timer.charge(stage_range("sampling"), seconds)
        counters.charge(stage, "sampling", "detailflow::prior_step", "detailflow::group_sample", seconds)
        counters.add("detailflow::group_sample", *_group_sample_cost(logits))
    return logits


def _with_its_draw(counters: Counters, stage_of: Callable[[int], str]) -> Callable[[Callable], Callable]:
    """ops.prior_step as the prior calls it, through _counted_step."""
    def make(fn):
        @functools.wraps(fn)
        def wrapped(w, labels, tokens, start, stop, sampler=None, cfg_scale=1.0):
            return _counted_step(counters, stage_of(start), w, labels, tokens, start, stop,
                                 lambda: fn(w, labels, tokens, start, stop, sampler, cfg_scale))
        return wrapped
    return make


def _runner_steps(counters: Counters, ranges: Ranges, range_of: Callable[[int], str],
                  stage_of: Callable[[int], str]) -> Callable[[Callable], Callable]:
    """StepRunner.__call__ (the pipeline's steps) in its prior stage's range, through _counted_step."""
    def make(fn):
        @functools.wraps(fn)
        def wrapped(runner, start, stop, cfg_scale):
            with ranges(range_of(start)):
                return _counted_step(counters, stage_of(start), runner.weights_of(start), runner.labels,
                                     runner.tokens, start, stop, lambda: fn(runner, start, stop, cfg_scale))
        return wrapped
    return make


def _wrap_norms(p: Patcher, model: torch.nn.Module) -> None:
    """RMSNorm is a few elementwise aten ops: a range makes it one 'norm' row of the op table."""
    for mod in model.modules():
        if type(mod).__name__ == "RMSNorm":
            p.wrap(mod, "forward", lambda fn: _plain_range(NORM_RANGE, fn))


def _plain_range(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with profiler_range(name):
            return fn(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def profile_ranges() -> Iterator[None]:
    """Our kernels as `detailflow::<op>` ranges (ops/_dispatch.py) for the duration."""
    before = _dispatch.PROFILE_RANGES
    _dispatch.set_profile_ranges(True)
    try:
        yield
    finally:
        _dispatch.set_profile_ranges(before)


@contextlib.contextmanager
def instrument_engine(pipe, counters: Counters) -> Iterator[None]:
    """Stage ranges + op counters around a DetailFlowPipeline's prior, sampling and decode."""
    import detailflow_engine.linear as linear_mod
    import detailflow_engine.pipeline as pipeline_mod
    import detailflow_engine.prior as prior_mod
    import detailflow_engine.tokenizer as tokenizer_mod

    ranges = Ranges(pipe.device)
    prior, c = pipe.prior, pipe.prior.config.causal_num
    p = Patcher()
    try:
        # Whichever of these the pipeline calls (step_logits wraps the other two): same stage.
        def by_start(start: int) -> str:
            return stage_range(prior_stage(start, c))

        p.wrap(prior, "step_logits", _in_range(ranges, lambda labels, tokens, step, *a, **k: by_start(step.start)))
        p.wrap(prior, "step_embeddings", _in_range(ranges, lambda labels, tokens, start, stop: by_start(start)))
        p.wrap(prior, "forward_step", _in_range(ranges, lambda x, start, *a, **k: by_start(start)))
        _wrap_norms(p, prior)
        p.wrap(pipeline_mod.GroupSampler, "__call__", _counted(
            counters, "group_sample", "sampling", ranges, cost=lambda sampler, logits, *a: _group_sample_cost(logits)))
        p.wrap(linear_mod, "decode_gemm", _counted(counters, "decode_gemm"))
        p.wrap(prior_mod, "prior_step", _with_its_draw(counters, lambda start: prior_stage(start, c)))
        # the pipeline's steps: a StepRunner call each, in its stage's range, counted as prior_step
        p.wrap(pipeline_mod.StepRunner, "__call__", _runner_steps(counters, ranges, by_start,
                                                                  lambda start: prior_stage(start, c)))
        p.wrap(prior_mod, "cache_attention", _counted(counters, "cache_attention"))
        if pipe.tokenizer is not None:
            p.wrap(pipe.tokenizer, "decode", _in_range(ranges, lambda *a, **k: stage_range("decoder")))
            p.wrap(tokenizer_mod, "vq_lookup", _counted(counters, "vq_lookup", "VQ lookup", ranges))
        yield
    finally:
        p.restore()


@contextlib.contextmanager
def instrument_reference(ref_prior, ref_tok, device: torch.device) -> Iterator[None]:
    """Stage ranges around the reference models (instances only; the sampler is wrapped by the caller
    with `sampling_range`)."""
    ranges = Ranges(device)
    c = ref_prior.config.causal_num
    p = Patcher()

    def prior_name(cond_idx, tokens=None):
        n = 0 if tokens is None else tokens.shape[1]
        return stage_range(prior_stage(n, c))

    try:
        p.wrap(ref_prior, "forward_prefix", _in_range(ranges, prior_name))
        _wrap_norms(p, ref_prior)
        if ref_tok is not None:
            p.wrap(ref_tok, "decode_code", _in_range(ranges, lambda *a, **k: stage_range("decoder")))
            # the official lookup: codebook rows (normalized) + post_quant_conv (+ positions in the tower)
            p.wrap(ref_tok.quantize, "lookup", _in_range(ranges, lambda *a, **k: stage_range("VQ lookup")))
            p.wrap(ref_tok.post_quant_conv, "forward", _in_range(ranges, lambda *a, **k: stage_range("VQ lookup")))
        yield
    finally:
        p.restore()


def sampling_range(sampler: Callable, device: torch.device) -> Callable:
    """The reference generator's sampler hook, inside the sampling stage range."""
    return _in_range(Ranges(device), lambda *a, **k: stage_range("sampling"))(sampler)
