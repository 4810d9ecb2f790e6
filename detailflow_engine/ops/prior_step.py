"""prior_step: one decode step of the prior in one call -- input embeddings, every layer, the head.

A step of the prior is

    x = step_embeddings_ref(emb, labels, tokens, start, stop)              # (B, n, dim)
    _, y = decode_layers(x, None, stack, freqs_cis[start:stop], start, eps)  # all layers, final norm
    logits = head(y).float()                                                # (B, n, V) fp32
    [tokens[:, start:stop] = sampler(logits, start, stop, cfg_scale)]       # optional: the draw

which is `prior_step_ref`, the torch entry and the test oracle (its ops dispatch as usual, so on
CUDA it runs their kernels). Sequence positions and what each embeds (c = causal_num,
g = group_size; prior.py's table):

    q = 0              the class embedding (cond rows: label, null rows: num_classes)
    1 <= q <= c        tok[q - 1]
    c < q < c + g      special embedding q - c - 1
    q >= c + g         tok[q - g]

Backends (see `_dispatch`): CPU `_C` (csrc/cpu/prior_step.cpp: the gather, the stack's layers,
the head and the draw in one extension call; the extension's PriorStep holds every weight, table
and cache address, so a step passes its labels, tokens and logits only) where the stack's CPU
kernel serves it (ops.decode_layer: every linear a DecodeLinear with a packed weight) and the
head is a DecodeLinear with a packed weight too; CUDA and torch: the composition. On the
embedded default model the composition's Python (token slicing, torch's embedding with its
reshape copy, the head wrapper, the cast, the sampler's checks, the token write) took as long
as the layers' arithmetic at batch 1; the kernel's bits are the composition's (copies, the same
layer, GEMM and sampling kernels, an exact widening). `StepRunner` runs a generation's steps
with the checks and the pick done once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.decode_gemm import kernel_descriptor
from detailflow_engine.ops.decode_layer import LayerStack, _torch_sum_lanes, decode_layers
from detailflow_engine.ops.group_sample import GroupSampler

__all__ = ["StepEmbeddings", "PriorStepWeights", "StepRunner", "prior_step", "prior_step_ref", "step_embeddings_ref",
           "write_step_tokens"]

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_HAS_KERNEL = _dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "PriorStep")


@dataclass(frozen=True)
class StepEmbeddings:
    """The prior's input embedding tables, each (rows, dim), and the positions' layout."""

    cls_table: Tensor  # (num_classes [+ 1 null class], dim)
    tok_table: Tensor  # (vocab_size, dim)
    spe_table: Tensor  # (num_special_tokens, dim), >= group_size - 1 rows
    causal_num: int
    group_size: int


def step_embeddings_ref(emb: StepEmbeddings, labels: Tensor, tokens: Tensor, start: int, stop: int) -> Tensor:
    """Input embeddings of sequence positions [start, stop) -> (B, stop - start, dim).

    labels: (B,) class ids (null rows carry num_classes); tokens: (B, T) tokens so far.
    """
    c, g = emb.causal_num, emb.group_size
    parts = []
    q = start
    while q < stop:
        if q == 0:
            parts.append(F.embedding(labels, emb.cls_table)[:, None])
            q += 1
        elif q <= c:
            end = min(stop, c + 1)
            parts.append(F.embedding(tokens[:, q - 1:end - 1], emb.tok_table))
            q = end
        elif q < c + g:
            end = min(stop, c + g)
            parts.append(emb.spe_table[q - c - 1:end - c - 1][None].expand(labels.shape[0], -1, -1))
            q = end
        else:
            parts.append(F.embedding(tokens[:, q - g:stop - g], emb.tok_table))
            q = stop
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _last_token_column(emb: StepEmbeddings, stop: int) -> int:
    """The highest token column positions [0, stop) read (-1 if none): the tokens' width needed."""
    q = stop - 1
    if q >= emb.causal_num + emb.group_size:
        return q - emb.group_size
    return min(q, emb.causal_num) - 1


class PriorStepWeights:
    """What prior_step reads: the embedding tables, the LayerStack (with its first_norm), the
    output head (a callable (..., dim) -> (..., V); the CPU kernel needs a DecodeLinear), the
    fp32 rotary table (rows, head_dim / 2, 2) and the norms' epsilon.

    Checked once here. Built by the prior with its layer stack (Prior.step_weights; both kept
    across generations while nothing they read is replaced), it also holds the extension's
    PriorStep for the CPU kernel, bound to the addresses of the tensors it holds; like the
    stack, it does not notice later changes.
    """

    def __init__(self, embeddings: StepEmbeddings, stack: LayerStack, head: Callable[[Tensor], Tensor],
                 freqs_cis: Tensor, eps: float):
        if not isinstance(stack, LayerStack):
            raise TypeError(f"`stack` must be a LayerStack, got {type(stack).__name__}")
        if stack.first_norm is None:
            raise ValueError("`stack` must have a first_norm (layer 0's attention_norm): a step embeds, then norms")
        like = stack.like
        dim = like.shape[2]
        if not isinstance(embeddings, StepEmbeddings):
            raise TypeError(f"`embeddings` must be a StepEmbeddings, got {type(embeddings).__name__}")
        for name in ("cls_table", "tok_table", "spe_table"):
            t = getattr(embeddings, name)
            if (not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != dim or t.dtype != like.dtype
                    or t.device != like.device):
                got = _dispatch.describe(t) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"`embeddings.{name}` must be (rows, {dim}) {like.dtype} on {like.device} (the "
                                 f"stack's), got {got}")
        c, g = (_dispatch.as_index(f"embeddings.{n}", getattr(embeddings, n)) for n in ("causal_num", "group_size"))
        if c < 0 or g < 1 or embeddings.spe_table.shape[0] < g - 1:
            raise ValueError(f"`embeddings` needs causal_num >= 0, group_size >= 1 and >= group_size - 1 special "
                             f"rows, got {c}, {g} and {embeddings.spe_table.shape[0]}")
        if not callable(head):
            raise TypeError(f"`head` must be callable (a linear dim -> vocab), got {type(head).__name__}")
        d = stack.d
        if (not isinstance(freqs_cis, Tensor) or freqs_cis.dim() != 3 or tuple(freqs_cis.shape[1:]) != (d // 2, 2)
                or freqs_cis.dtype != torch.float32 or freqs_cis.device != like.device):
            got = _dispatch.describe(freqs_cis) if isinstance(freqs_cis, Tensor) else type(freqs_cis).__name__
            raise ValueError(f"`freqs_cis` must be float32 (rows, {d // 2}, 2) on {like.device}, got {got}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
            raise ValueError(f"`eps` must be a finite float >= 0, got {eps!r}")
        self.embeddings, self.stack, self.head = embeddings, stack, head
        self.freqs_cis, self.eps = freqs_cis, float(eps)
        self.dtype, self.device = like.dtype, like.device
        # parameters the kernel reads around autograd (the stack's norms likewise)
        self.needs_grad = any(t.requires_grad for t in (embeddings.cls_table, embeddings.tok_table,
                                                        embeddings.spe_table))
        self._kernel: Optional[object] = None  # the extension's PriorStep, False where it does not serve
        # seconds of the draw inside the CPU kernel's last sampling call (what `profile` charges
        # to its sampling stage); None until then
        self.last_sample_seconds: Optional[float] = None

    def __getstate__(self):  # copies and pickles bind their own addresses on first use
        return {**self.__dict__, "_kernel": None}

    def kernel(self):
        """The extension's PriorStep, or None where the CPU kernel does not serve these weights."""
        if self._kernel is None:
            self._kernel = self._build_kernel() or False
        return self._kernel or None

    def _build_kernel(self):
        stack, emb = self.stack, self.embeddings
        if not (_HAS_KERNEL and self.device.type == "cpu" and self.dtype in _CPU_DTYPES and stack.decode_linears
                and stack.plain_caches):
            return None
        layers = stack.kernel_for(stack.first_norm)  # first_norm: a tensor of the activations' dtype
        packed_for = getattr(self.head, "packed_for", None)
        head = packed_for(stack.first_norm) if packed_for is not None else None
        if (layers is None or head is None or not head.packed.is_contiguous()
                or (head.N, head.K) != (emb.tok_table.shape[0], stack.like.shape[2])):
            return None
        held = tuple(t.detach().contiguous() for t in (emb.cls_table, emb.tok_table, emb.spe_table, self.freqs_cis))
        cls, tok, spe, freqs = held
        kernel = _dispatch.extension().PriorStep(
            layers, cls.data_ptr(), cls.shape[0], tok.data_ptr(), tok.shape[0], spe.data_ptr(), spe.shape[0],
            emb.causal_num, emb.group_size, kernel_descriptor(head), freqs.data_ptr(), freqs.shape[0])
        self._held = (held, head)  # what the kernel points into stays alive with it
        return kernel


def write_step_tokens(tokens: Tensor, new: Tensor, start: int, stop: int) -> None:
    """tokens[:, start:stop] = each image's new tokens (B, n), in every row of that image
    (rows b, b + B, ...: CFG's null rows continue the same images)."""
    B = new.shape[0]
    for r in range(0, tokens.shape[0], B):
        tokens[r:r + B, start:stop] = new


def prior_step_ref(w: PriorStepWeights, labels: Tensor, tokens: Tensor, start: int, stop: int,
                   sampler: Optional[GroupSampler] = None, cfg_scale: float = 1.0) -> Tensor:
    """The composition (fallback and test oracle): embed, decode_layers, head, fp32; then, with a
    sampler, the step's tokens drawn and written (write_step_tokens)."""
    x = step_embeddings_ref(w.embeddings, labels, tokens, start, stop)
    _, y = decode_layers(x, None, w.stack, w.freqs_cis[start:stop], start, w.eps)
    logits = w.head(y)
    logits = logits if logits.dtype == torch.float32 else logits.float()
    if sampler is not None:
        write_step_tokens(tokens, sampler(logits, start, stop, cfg_scale), start, stop)
    return logits


def _validate(w, labels, tokens, start, stop, sampler) -> None:
    if not isinstance(w, PriorStepWeights):
        raise TypeError(f"`w` must be a PriorStepWeights, got {type(w).__name__}")
    B = w.stack.like.shape[0]
    if not isinstance(labels, Tensor) or labels.shape != (B,) or labels.dtype != torch.int64 or labels.device != w.device:
        got = _dispatch.describe(labels) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"`labels` must be int64 ({B},) on {w.device} (one class id a cache row), got {got}")
    if (not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[0] != B or tokens.dtype != torch.int64
            or tokens.device != w.device):
        got = _dispatch.describe(tokens) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"`tokens` must be int64 ({B}, T) on {w.device}, got {got}")
    start, stop = _dispatch.as_index("start", start), _dispatch.as_index("stop", stop)
    limit = min(w.stack.L_max, w.freqs_cis.shape[0])
    if not 0 <= start < stop <= limit:
        raise ValueError(f"positions [start, stop) must satisfy 0 <= start < stop <= {limit} (the cache and rotary "
                         f"table length), got [{start}, {stop})")
    need = _last_token_column(w.embeddings, stop) + 1
    if tokens.shape[1] < need:
        raise ValueError(f"positions [{start}, {stop}) read {need} token columns, `tokens` has {tokens.shape[1]}")
    if sampler is None:
        return
    if not isinstance(sampler, GroupSampler):
        raise TypeError(f"`sampler` must be None or a GroupSampler, got {type(sampler).__name__}")
    images = sampler.seeds.shape[0]
    if B not in (images, 2 * images) or sampler.seeds.device != w.device:
        raise ValueError(f"the sampler's {images} seeds on {sampler.seeds.device} do not fit {B} cache rows on "
                         f"{w.device} (one image a row, or two with CFG)")
    if stop > min(tokens.shape[1], sampler.positions.shape[0]):
        raise ValueError(f"the step writes token columns [{start}, {stop}) but `tokens` has {tokens.shape[1]} and "
                         f"the sampler {sampler.positions.shape[0]} positions")


def prior_step(w: PriorStepWeights, labels: Tensor, tokens: Tensor, start: int, stop: int,
               sampler: Optional[GroupSampler] = None, cfg_scale: float = 1.0) -> Tensor:
    """Logits (B, stop - start, V) float32 of one decode step of positions [start, stop).

    Args:
        w: the prior's PriorStepWeights (Prior.step_weights).
        labels: (B,) int64 class ids of the cache rows (CFG's null rows: the null class).
        tokens: (B, T) int64 tokens so far (any strides); the step reads the columns its
            positions embed (see the module docstring).
        start, stop: the step's positions; the caches receive their keys and values.
        sampler, cfg_scale: also draw the step's tokens, sampler(logits, start, stop, cfg_scale)
            (B or B / 2 images: CFG), and write them into tokens[:, start:stop], each image's
            into all its rows (write_step_tokens); the CPU kernel does it in the same call.

    Ids outside their table raise a ValueError naming the first one (the CPU kernel checks
    them before it reads; the composition's indexing raises IndexError).
    """
    _validate(w, labels, tokens, start, stop, sampler)
    return _dispatch.pick("prior_step", w, labels, tokens).fn(w, labels, tokens, start, stop, sampler, cfg_scale)


def _cpu_applies(w, labels, tokens) -> bool:
    return (labels.device.type == "cpu" and _dispatch.plain_eager(labels, tokens)
            and not (w.needs_grad and torch.is_grad_enabled()) and w.kernel() is not None)


def _cpu_impl(w: PriorStepWeights, labels: Tensor, tokens: Tensor, start: int, stop: int,
              sampler: Optional[GroupSampler] = None, cfg_scale: float = 1.0) -> Tensor:
    labels = labels.contiguous()
    writes = sampler is not None and (tokens.stride(1) == 1 or tokens.shape[1] == 1)
    source = tokens if tokens.stride(1) == 1 or tokens.shape[1] == 1 else tokens.contiguous()
    B, n = labels.shape[0], stop - start
    logits = torch.empty((B, n, w.embeddings.tok_table.shape[0]), dtype=torch.float32)
    step = (labels.data_ptr(), source.data_ptr(), source.stride(0), source.shape[1], start, n)
    draw = None
    if writes:
        st = sampler.settings(B, logits.shape[2], cfg_scale)
        draw = (sampler.seeds.data_ptr(), sampler.positions.data_ptr() + 8 * start, sampler.seeds.shape[0],
                st.cfg_scale, st.temperature, st.top_k, st.top_p24, st.greedy)
    _call_kernel(w, step, logits, draw, tokens)
    if sampler is not None and not writes:  # tokens the kernel cannot write in place: the sampler, then the write
        write_step_tokens(tokens, sampler(logits, start, stop, cfg_scale), start, stop)
    return logits


def _call_kernel(w: PriorStepWeights, step: tuple, logits: Tensor, draw: Optional[tuple], tokens: Tensor) -> None:
    """The extension's PriorStep on `step` (labels, tokens, ldt, num_tokens, start, n addresses and
    sizes) into `logits`; with `draw` (seeds, positions of the step, images, the sampler's settings)
    also the tokens drawn and written. Bumps the versions of what it wrote."""
    kernel = w.kernel()
    try:
        if draw is None:
            kernel.run(*step, logits.data_ptr(), w.eps, _torch_sum_lanes(), _dispatch.num_threads())
        else:
            kernel.run_sampled(*step, logits.data_ptr(), w.eps, _torch_sum_lanes(), _dispatch.num_threads(), *draw)
    except ValueError as e:  # an id outside its table, found before anything was read or written
        raise ValueError(str(e).split(": ", 1)[-1]) from None
    torch.autograd.graph.increment_version(w.stack.caches)
    if draw is not None:
        torch.autograd.graph.increment_version(tokens)
        w.last_sample_seconds = kernel.last_sample_seconds


_dispatch.register("prior_step", "cpu", _cpu_impl, applies=_cpu_applies)
# CUDA: the composition, whose ops pick their CUDA/Triton kernels (registered as the cuda entry
# so that a CUDA prior does not warn of a torch fallback).
_dispatch.register("prior_step", "cuda", prior_step_ref, applies=lambda w, labels, tokens: labels.is_cuda)
_dispatch.register("prior_step", "torch", prior_step_ref)


class StepRunner:
    """`prior_step` with a sampler for the steps of one generation, checked and dispatched once.

        run = StepRunner(prior.step_weights, labels, tokens, sampler)
        logits = run(start, stop, cfg_scale)  # tokens[:, start:stop] written, as prior_step writes them

    The weights (`weights_of(start)`, the prior's step_weights), labels, tokens and sampler are
    checked and the backend picked when the weights object is first seen (a prior rebuilds it
    after a reload or new caches: the runner follows); a step then checks only its positions.
    On the CPU kernel a step is the one extension call: its logits land in a buffer per step
    length that the next step of that length overwrites (consume them first, as a CUDA-graph
    replay's), and the sampler's settings are computed once per CFG scale. Same op and bits as
    prior_step; other backends (or a swapped table entry) run through their entry as it would.
    """

    def __init__(self, weights_of: Callable[[int], PriorStepWeights], labels: Tensor, tokens: Tensor,
                 sampler: GroupSampler):
        if not isinstance(sampler, GroupSampler):
            raise TypeError(f"`sampler` must be a GroupSampler, got {type(sampler).__name__}")
        self.weights_of, self.labels, self.tokens, self.sampler = weights_of, labels, tokens, sampler
        self.weights: Optional[PriorStepWeights] = None

    def _bind(self, w: PriorStepWeights) -> None:
        labels, tokens, sampler = self.labels, self.tokens, self.sampler
        stop = min(tokens.shape[1], sampler.positions.shape[0]) if isinstance(tokens, Tensor) else 1
        _validate(w, labels, tokens, 0, max(1, stop), sampler)  # everything but a step's positions
        self.backend = _dispatch.pick("prior_step", w, labels, tokens)
        self.limit = min(w.stack.L_max, w.freqs_cis.shape[0], tokens.shape[1], sampler.positions.shape[0])
        fast = (self.backend.fn is _cpu_impl and (tokens.stride(1) == 1 or tokens.shape[1] == 1)
                and labels.is_contiguous())
        self.kernel = w.kernel() if fast else None  # set: each step calls it directly (_call_kernel)
        self._buffers: dict = {}
        self._settings: dict = {}
        self._static = (labels.data_ptr(), tokens.data_ptr(), tokens.stride(0), tokens.shape[1])
        self._draw = (sampler.seeds.data_ptr(), sampler.positions.data_ptr(), sampler.seeds.shape[0])
        self.weights = w

    def __call__(self, start: int, stop: int, cfg_scale: float) -> Tensor:
        w = self.weights_of(start)
        if w is not self.weights:
            self._bind(w)
        if self.kernel is None:
            return self.backend.fn(w, self.labels, self.tokens, start, stop, self.sampler, cfg_scale)
        if not (type(start) is int and type(stop) is int and 0 <= start < stop <= self.limit):
            _validate(w, self.labels, self.tokens, start, stop, self.sampler)  # raises naming the problem
        n = stop - start
        logits = self._buffers.get(n)
        if logits is None:
            logits = self._buffers[n] = torch.empty((self.labels.shape[0], n, w.embeddings.tok_table.shape[0]),
                                                    dtype=torch.float32)
        st = self._settings.get(cfg_scale)
        if st is None:
            st = self._settings[cfg_scale] = self.sampler.settings(self.labels.shape[0], logits.shape[2], cfg_scale)
        seeds, positions, images = self._draw
        draw = (seeds, positions + 8 * start, images, st.cfg_scale, st.temperature, st.top_k, st.top_p24, st.greedy)
        step = self._static + (start, n)
        if _dispatch.PROFILE_RANGES:
            with _dispatch.profiler_range("detailflow::prior_step"):
                _call_kernel(w, step, logits, draw, self.tokens)
        else:
            _call_kernel(w, step, logits, draw, self.tokens)
        return logits


def _selfcheck(backend, reference, device) -> None:
    """Two steps (positions 0-2, then 3-7: class, tokens, special rows, tokens) of a two-layer
    prior with 2 rows, 3 heads of 16, FFN 40, 37 tokens, causal 2, groups of 4, in fp32 and bf16,
    against the composition of the ops' torch references."""
    import math

    from detailflow_engine.linear import DecodeLinear  # engine layer above ops: imported on use only
    from detailflow_engine.ops.add_rmsnorm import add_rmsnorm_ref
    from detailflow_engine.ops.decode_gemm import decode_gemm_ref
    from detailflow_engine.ops.decode_layer import LayerWeights, _torch_only_composition, tolerance

    g = torch.Generator().manual_seed(0)
    B, H, d, F_, L, V, c, grp = 2, 3, 16, 40, 12, 37, 2, 4
    dim = H * d
    for dtype in (torch.float32, torch.bfloat16):
        def rand(*shape, scale=1.0):
            return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

        def linear(k_in, k_out):
            lin = torch.nn.Linear(k_in, k_out, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(k_out, k_in, generator=g) / math.sqrt(k_in))
            return DecodeLinear(lin.to(device=device, dtype=dtype).requires_grad_(False))

        layers = [LayerWeights(linear(dim, 3 * dim), linear(dim, dim), linear(dim, F_), linear(dim, F_),
                               linear(F_, dim), 1 + rand(dim, scale=0.1), 1 + rand(dim, scale=0.1), H)
                  for _ in range(2)]
        first_norm = 1 + rand(dim, scale=0.1)
        emb = StepEmbeddings(rand(5, dim), rand(V, dim), rand(3, dim), c, grp)
        head = linear(dim, V)
        freqs = torch.randn(L + 1, d // 2, 2, generator=g).to(device)
        labels = torch.tensor([3, 4], device=device)
        tokens = torch.randint(0, V, (B, L), generator=g).to(device)

        def weights():
            caches = [rand(B, H, L, d) * 0 for _ in range(4)]
            return PriorStepWeights(emb, LayerStack(layers, caches[:2], caches[2:], first_norm), head, freqs, 1e-5)

        w, want_w = weights(), weights()
        if not backend.applies(w, labels, tokens):
            continue
        atol, _ = tolerance(dtype)
        for start, stop in ((0, 3), (3, 8)):
            got = backend.fn(w, labels, tokens, start, stop)
            h = step_embeddings_ref(emb, labels, tokens, start, stop)
            hy = add_rmsnorm_ref(h, None, first_norm, 1e-5)
            for lw, kc, vc in zip(layers, want_w.stack.k_caches, want_w.stack.v_caches):
                hy = _torch_only_composition(*hy, lw, kc, vc, freqs[start:stop], start, 1e-5)
            want = decode_gemm_ref(hy[1], head.packed_for(hy[1]).weight).float()
            _dispatch.expect_close(f"prior_step {dtype} logits of [{start}, {stop})", got, want, atol,
                                   1e-4 if dtype == torch.float32 else 2e-2)


_dispatch.register_selfcheck("prior_step", _selfcheck)
