"""decode_layer: one transformer layer of the prior for one decode step, in one call.

The prior's decode step carries (h, y) = (residual stream, its attention_norm) through its
layers. Per layer the per-op path is

    q, k, v = rope_qkv(wqkv(y), freqs, n_head)
    out = cache_attention(q, k, v, k_cache, v_cache, start)        # appends k, v at [start, start + n)
    h, y = add_rmsnorm(h, wo(out as (B, n, dim)), ffn_norm, eps)
    h, y = add_rmsnorm(h, w2(silu(w1(y)) * w3(y)), next_norm, eps)  # next: the next layer's
                                                                    # attention_norm, or the final norm

which is `decode_layer_ref`, the torch entry of the table and the test oracle (it calls the
per-op wrappers, so on CUDA it runs their CUDA/Triton kernels). On the embedded default model
each of those ops is a few microseconds of work and the Python between them cost as much again.

Backends (see `_dispatch`): CPU `_C` (csrc/cpu/decode_layer.cpp: the whole layer in one
extension call, reusing the decode_gemm and cache_attention kernels as C++ functions) where
every linear is a DecodeLinear with a packed weight for y (any weights mode: float32, bfloat16,
int8, int4, w8a8, w4a8; ops.decode_gemm.kernel_descriptor), y is
float32 or bfloat16 and nobody traces the call; on CUDA the composition (the per-op wrappers
pick the CUDA kernels); then the torch entry, the composition again (with
DETAILFLOW_BACKEND=torch its ops take their torch references).

`decode_layers` runs a `LayerStack` (every layer of the prior with its caches; what
forward_step calls) through the same table: one pick a step, and on the CPU kernel one
extension call for all layers (bindings.cpp's DecodeLayerStack, holding every layer's
addresses from the stack's first call, so a step marshals only its activations); every other
entry, and the CPU entry where a linear has no packed weight for y (its torch path), takes the
layers one by one as decode_layer would. The stack's bits are those of one decode_layer call a
layer.

Numerics of the CPU kernel: the GEMMs and the attention are the per-op path's own kernels
(same bits); rotary, residual adds and RMSNorms round as the torch ops do (the RMSNorm's sum
in torch's order); only the SiLU's exp is another fp32 implementation (an ulp apart at most),
so the layer is within the ops' tolerances of the per-op path, and bit-identical to it when
the FFN's SiLU does not come into play (tests/ops/test_decode_layer.py checks both).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from detailflow_engine.ops import _dispatch
from detailflow_engine.ops.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref
from detailflow_engine.ops.add_rmsnorm import tolerance as add_rmsnorm_tolerance
from detailflow_engine.ops.cache_attention import cache_attention, cache_attention_ref
from detailflow_engine.ops.decode_gemm import decode_gemm_ref, kernel_descriptor
from detailflow_engine.ops.decode_gemm_w4a8 import decode_gemm_w4a8_ref
from detailflow_engine.ops.decode_gemm_w8a8 import decode_gemm_w8a8_ref
from detailflow_engine.ops.rope_qkv import rope_qkv, rope_qkv_ref

__all__ = ["LayerWeights", "LayerStack", "decode_layer", "decode_layers", "decode_layer_ref", "tolerance"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # any backend (float16: CUDA)
_CPU_DTYPES = (torch.float32, torch.bfloat16)
# packed weights the CPU kernel streams: float32, bf16, int8 (weight-only and w8a8), int4 nibbles (int4, w4a8)
_PACKED_DTYPES = (torch.float32, torch.bfloat16, torch.int8, torch.uint8)
_HAS_KERNEL = _dispatch.has_cpu_kernels() and hasattr(_dispatch.extension(), "decode_layer")


@dataclass(frozen=True)
class LayerWeights:
    """One prior layer's parameters as decode_layer reads them.

    The linears are callables (..., K) -> (..., N) (bias-free nn.Linear or linear.DecodeLinear);
    the CPU kernel needs DecodeLinears (their `packed_for`). Norm weights are (dim,) in the
    activation dtype; next_norm is the next layer's attention_norm (the final norm after the last).
    """

    wqkv: Callable[[Tensor], Tensor]  # dim -> 3 dim, [q | k | v] each (H, d)
    wo: Callable[[Tensor], Tensor]    # dim -> dim
    w1: Callable[[Tensor], Tensor]    # dim -> F
    w3: Callable[[Tensor], Tensor]    # dim -> F
    w2: Callable[[Tensor], Tensor]    # F -> dim
    ffn_norm: Tensor
    next_norm: Tensor
    n_head: int

    def linears(self):
        return self.wqkv, self.wo, self.w1, self.w3, self.w2



@dataclass(frozen=True)
class ActivationSpec:
    """The shape, dtype and device activations must have (what the checks compare and describe)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class LayerStack:
    """Every layer of a prior with its KV cache, in order, as `decode_layers` reads them.

    Checked once here (each layer as decode_layer checks it, all against layer 0's caches and
    ffn_norm). On the CPU kernel the stack also holds the extension's DecodeLayerStack: every
    layer's packed-weight, norm and cache addresses, built on its first call for a dtype and kept
    with the tensors it points into, so a step marshals only its activations. It does not notice
    later changes: build a new stack when the weights are reloaded or moved or the caches are
    reallocated (the prior builds one at each generation's first step and after setup_caches).
    """

    def __init__(self, layers: Sequence[LayerWeights], k_caches: Sequence[Tensor], v_caches: Sequence[Tensor],
                 first_norm: Optional[Tensor] = None):
        self.layers, self.k_caches, self.v_caches = tuple(layers), tuple(k_caches), tuple(v_caches)
        if not self.layers or not len(self.layers) == len(self.k_caches) == len(self.v_caches):
            raise ValueError(f"`layers`, `k_caches` and `v_caches` must be non-empty and of one length, got "
                             f"{len(self.layers)}, {len(self.k_caches)} and {len(self.v_caches)}")
        first, k0 = self.layers[0], self.k_caches[0]
        if not isinstance(first, LayerWeights) or not isinstance(first.ffn_norm, Tensor) or first.ffn_norm.dim() != 1:
            raise TypeError("`layers[0]` must be a LayerWeights with a (dim,) tensor ffn_norm")
        if not isinstance(k0, Tensor) or k0.dim() != 4:
            got = _dispatch.describe(k0) if isinstance(k0, Tensor) else type(k0).__name__
            raise ValueError(f"`k_caches[0]` must be (B, n_head, L_max, head_dim), got {got}")
        norm = first.ffn_norm
        # what a step's h and y must be like (n aside); a description, not a tensor: no allocation
        # (a stack may be built while a CUDA graph is captured)
        self.like = ActivationSpec((k0.shape[0], 1, norm.shape[0]), norm.dtype, norm.device)
        for i, (w, kc, vc) in enumerate(zip(self.layers, self.k_caches, self.v_caches)):
            self.d, self.L_max = _check_layer(w, kc, vc, self.like, "layer 0's caches and ffn_norm", f"layers[{i}].")
            if kc.shape != k0.shape:
                raise ValueError(f"`k_caches[{i}]` must have the shape of `k_caches[0]` ({_dispatch.describe(k0)}), "
                                 f"got {_dispatch.describe(kc)}")
        if first_norm is not None and (not isinstance(first_norm, Tensor) or first_norm.shape != norm.shape
                                       or first_norm.dtype != norm.dtype or first_norm.device != norm.device):
            got = _dispatch.describe(first_norm) if isinstance(first_norm, Tensor) else type(first_norm).__name__
            raise ValueError(f"`first_norm` must be None or have the shape, dtype and device of layer 0's ffn_norm "
                             f"({_dispatch.describe(norm)}), got {got}")
        # detached: the storage it points at now stays alive even if a Parameter's .data is swapped
        # later (the extension holds raw addresses)
        self.first_norm = None if first_norm is None else first_norm.detach().contiguous()
        self.n_head = first.n_head
        self.caches = self.k_caches + self.v_caches
        # what decode_layer's CPU entry asks of every call, answered once
        self.decode_linears = all(_decode_linears(w) for w in self.layers)
        self.plain_caches = all(type(t) is Tensor and not t.requires_grad for t in self.caches)
        self._kernels: Dict[torch.dtype, tuple] = {}  # y dtype -> (DecodeLayerStack or None, what it points into)

    def __len__(self) -> int:
        return len(self.layers)

    def __getstate__(self):  # copies and pickles rebind their own addresses on first use
        return {**self.__dict__, "_kernels": {}}

    def kernel_for(self, y: Tensor):
        """The extension's DecodeLayerStack for activations like y (h, when y is to be computed), or
        None when a linear has no packed weight for y (its torch path): then each layer goes its
        own way."""
        held = self._kernels.get(y.dtype)
        if held is None:
            packs = [_packed_all(y, w) for w in self.layers]
            if any(p is None for p in packs):
                held = (None, ())
            else:
                # detached norms: as first_norm, kept alive with the addresses
                norms = [(w.ffn_norm.detach().contiguous(), w.next_norm.detach().contiguous()) for w in self.layers]
                layers = [([kernel_descriptor(p) for p in ps], ffn.data_ptr(), nxt.data_ptr(), kc.data_ptr(),
                           vc.data_ptr())
                          for ps, (ffn, nxt), kc, vc in zip(packs, norms, self.k_caches, self.v_caches)]
                kernel = _dispatch.extension().DecodeLayerStack(
                    _dispatch.DTYPE_CODES[y.dtype], self.like.shape[0], self.n_head, self.d, self.L_max, layers,
                    self.first_norm.data_ptr() if self.first_norm is not None else 0)
                held = (kernel, (packs, norms, self.caches))
            self._kernels[y.dtype] = held
        return held[0]


def layer_by_layer(layer_fn: Callable, h: Tensor, y: Optional[Tensor], stack: LayerStack, freqs: Tensor,
                   start: int, eps: float) -> Tuple[Tensor, Tensor]:
    """A stack run one layer at a time by `layer_fn` (a decode_layer backend's signature), after
    the stack's first_norm of h when y is None."""
    if y is None:
        h, y = add_rmsnorm(h, None, stack.first_norm, eps)
    for w, k_cache, v_cache in zip(stack.layers, stack.k_caches, stack.v_caches):
        h, y = layer_fn(h, y, w, k_cache, v_cache, freqs, start, eps)
    return h, y


def decode_layer_ref(h: Tensor, y: Tensor, w: LayerWeights, k_cache: Tensor, v_cache: Tensor,
                     freqs: Tensor, start: int, eps: float) -> Tuple[Tensor, Tensor]:
    """The per-op composition (fallback and test oracle): exactly the prior's path before this op.
    With a LayerStack as `w` (k_cache, v_cache None): each of its layers in turn (after its
    first_norm of h when y is None)."""
    if isinstance(w, LayerStack):
        return layer_by_layer(decode_layer_ref, h, y, w, freqs, start, eps)
    b, n, dim = y.shape
    q, k, v = rope_qkv(w.wqkv(y), freqs, w.n_head)  # (B, H, n, d) each, q and k rotated
    out = cache_attention(q, k, v, k_cache, v_cache, start)
    h, y = add_rmsnorm(h, w.wo(out.transpose(1, 2).reshape(b, n, dim)), w.ffn_norm, eps)
    return add_rmsnorm(h, w.w2(F.silu(w.w1(y)) * w.w3(y)), w.next_norm, eps)


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(atol, rtol) of the STYLE practice-5 rule for h and y:
    max|kernel - ref32| <= 2 * max|torch_lowp - ref32| + atol + rtol * max|ref32|.
    The layer ends in add_rmsnorm, whose numbers these are (the same as its other ops')."""
    return add_rmsnorm_tolerance(dtype)


def _check_activations(h, y) -> None:
    for name, t in (("h", h), ("y", y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if y.dim() != 3 or y.dtype not in _DTYPES or y.shape[-1] == 0:
        raise ValueError(f"`y` must be float32, bfloat16 or float16 of shape (B, n, dim), got {_dispatch.describe(y)}")
    if h.shape != y.shape or h.dtype != y.dtype or h.device != y.device:
        raise ValueError(f"`h` must have the shape, dtype and device of `y` ({_dispatch.describe(y)}), "
                         f"got {_dispatch.describe(h)}")


def _check_layer(w, k_cache, v_cache, like, like_name: str = "`y`", prefix: str = "") -> Tuple[int, int]:
    """w, k_cache, v_cache against `like` (B, n, dim; y or an ActivationSpec): its B, dim, dtype and
    device -> (d, L_max).
    `prefix` names the layer in a LayerStack's messages."""
    if not isinstance(w, LayerWeights):
        raise TypeError(f"`{prefix}w` must be a LayerWeights, got {type(w).__name__}")
    B, _, dim = like.shape
    H = _dispatch.as_index(f"{prefix}w.n_head", w.n_head)
    if H < 1 or dim % H or (dim // H) % 2:
        raise ValueError(f"{like_name}'s dim must be n_head * head_dim with an even head_dim (n_head={H}), "
                         f"got {_dispatch.describe(like)}")
    d = dim // H
    for name, t in (("w.ffn_norm", w.ffn_norm), ("w.next_norm", w.next_norm)):
        if not isinstance(t, Tensor) or tuple(t.shape) != (dim,) or t.dtype != like.dtype or t.device != like.device:
            got = _dispatch.describe(t) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"`{prefix}{name}` must be ({dim},) with the dtype and device of {like_name} "
                             f"({_dispatch.describe(like)}), got {got}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{prefix}{name}` must be a torch.Tensor, got {type(t).__name__}")
    L_max = k_cache.shape[2] if k_cache.dim() == 4 else -1
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (B, H, d) or t.shape[2] != L_max:
            raise ValueError(f"`{prefix}{name}` must be (B, n_head, L_max, head_dim) = {(B, H, 'L_max', d)} with "
                             f"the L_max of `{prefix}k_cache`, got {_dispatch.describe(t)}")
        if t.dtype != like.dtype or t.device != like.device or not t.is_contiguous():
            raise ValueError(f"`{prefix}{name}` must be contiguous with the dtype and device of {like_name} "
                             f"({_dispatch.describe(like)}), got {_dispatch.describe(t)}")
    return d, L_max


def _check_step(y, freqs, start, eps, d: int, L_max: int) -> Tuple[int, float]:
    """The step's rotary rows, first position and epsilon -> (start, eps)."""
    n = y.shape[1]
    if not isinstance(freqs, Tensor):
        raise TypeError(f"`freqs` must be a torch.Tensor, got {type(freqs).__name__}")
    if tuple(freqs.shape) != (n, d // 2, 2) or freqs.dtype != torch.float32 or freqs.device != y.device:
        raise ValueError(f"`freqs` must be float32 of shape (n, head_dim/2, 2) = {(n, d // 2, 2)} on {y.device} "
                         f"(rows start:start+n of the prior's freqs_cis), got {_dispatch.describe(freqs)}")
    start = _dispatch.as_index("start", start)
    if start < 0:
        raise ValueError(f"`start` must be >= 0, got {start}")
    if start + n > L_max:
        raise ValueError(f"`start` + n must be <= L_max (the cache length), got start={start} + n={n} "
                         f"> L_max={L_max}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"`eps` must be a finite float >= 0, got {eps!r}")
    return start, float(eps)


def _validate(h, y, w, k_cache, v_cache, freqs, start, eps) -> Tuple[int, float]:
    """-> (start, eps); raises naming the first bad argument."""
    _check_activations(h, y)
    d, L_max = _check_layer(w, k_cache, v_cache, y)
    return _check_step(y, freqs, start, eps, d, L_max)


def decode_layer(h: Tensor, y: Tensor, w: LayerWeights, k_cache: Tensor, v_cache: Tensor,
                 freqs: Tensor, start: int, eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """One prior layer on a decode step's n new positions: (h, y) in -> (h, y) out.

    Args:
        h: (B, n, dim) residual stream (float32 or bfloat16; float16 on CUDA), any strides.
        y: (B, n, dim) its attention_norm (what the previous layer, or the first norm, returned).
        w: the layer's LayerWeights.
        k_cache, v_cache: contiguous (B, n_head, L_max, head_dim) of y's dtype. Mutated:
            positions [start, start + n) receive the step's keys and values.
        freqs: (n, head_dim/2, 2) float32 rotary rows of the step (prior.freqs_cis[start:start + n]).
        start: first cache position of the step; start + n <= L_max.
        eps: RMSNorm epsilon.

    Returns:
        New (B, n, dim) tensors h (after the attention and FFN residuals) and y = the next
        norm of h, in y's dtype.
    """
    start, eps = _validate(h, y, w, k_cache, v_cache, freqs, start, eps)
    return _dispatch.pick("decode_layer", h, y, w, k_cache, v_cache, freqs).fn(
        h, y, w, k_cache, v_cache, freqs, start, eps)


def decode_layers(h: Tensor, y: Optional[Tensor], stack: LayerStack, freqs: Tensor, start: int,
                  eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Every layer of `stack` on a decode step: decode_layer on each in turn, as one op call.

    The prior's forward_step runs this: one pick from decode_layer's table for the whole step and,
    on the CPU kernel, one extension call for all layers (the per-layer Python, ~35 us a layer on
    the embedded model, was as long as the layer). Same arguments and results as decode_layer,
    the weights and caches taken from the stack (its caches are mutated as decode_layer's).
    y may be None for a stack with a first_norm: then y = add_rmsnorm(h, None, first_norm)
    (on the CPU kernel inside the same extension call).
    """
    if not isinstance(stack, LayerStack):
        raise TypeError(f"`stack` must be a LayerStack, got {type(stack).__name__}")
    if y is None and stack.first_norm is None:
        raise ValueError("`y` may be None only for a LayerStack with a first_norm")
    _check_activations(h, h if y is None else y)
    like = stack.like
    if h.shape[0] != like.shape[0] or h.shape[2] != like.shape[2] or h.dtype != like.dtype or h.device != like.device:
        raise ValueError(f"`y` must be (B, n, dim) with the B, dim, dtype and device of the stack's layers "
                         f"({_dispatch.describe(like)} with any n), got {_dispatch.describe(h if y is None else y)}")
    start, eps = _check_step(h, freqs, start, eps, stack.d, stack.L_max)
    return _dispatch.pick("decode_layer", h, y, stack, None, None, freqs).fn(h, y, stack, None, None, freqs, start, eps)


def _sum_in_order(v: Tensor, lanes: int) -> float:
    """Sum of a short fp32 row in the order csrc/cpu/decode_layer.cpp's torch_sum uses with
    `lanes` (its cascade does not start below 64 vectors): 4 vector accumulators side by side,
    leftover vectors into the first, the 4 combined, then the tail scalars and the lanes."""
    vecs = v.numel() // lanes
    acc = torch.zeros(4, lanes)
    for r in range(vecs // 4 * 4):
        acc[r % 4] += v[r * lanes:(r + 1) * lanes]
    for r in range(vecs // 4 * 4, vecs):
        acc[0] += v[r * lanes:(r + 1) * lanes]
    for k in range(1, 4):
        acc[0] += acc[k]
    total = torch.zeros((), dtype=torch.float32)
    for x in torch.cat([v[vecs * lanes:], acc[0]]):
        total += x
    return total.item()


@functools.lru_cache(maxsize=None)
def _torch_sum_lanes() -> int:
    """Lanes of torch's fp32 row sum, found by trying (8 on torch 2.13 even with an AVX-512
    capability): the RMSNorm's sum order the kernel reproduces. Neither order matching torch
    (another torch) leaves the norm within its tolerance, one rounding of the sum apart."""
    probe = torch.randn(203, generator=torch.Generator().manual_seed(0)) ** 2
    want = probe.sum().item()
    return next((lanes for lanes in (8, 16) if _sum_in_order(probe, lanes) == want), 8)


def _row_stride(t: Tensor) -> Optional[int]:
    """Element stride between the rows of t (B, n, dim) seen as (B * n, dim), or None."""
    B, n, dim = t.shape
    s0, s1, s2 = t.stride()
    if s2 != 1 and dim > 1:
        return None
    if n == 1:
        ld = s0
    elif B == 1 or s0 == n * s1:
        ld = s1
    else:
        return None
    return ld if ld >= dim or B * n == 1 else None


def _packed_all(y: Tensor, w: LayerWeights):
    """The five packed weights for y, or None when any linear would not run decode_gemm on them."""
    packs = []
    for lin in w.linears():
        packed_for = getattr(lin, "packed_for", None)
        p = packed_for(y) if packed_for is not None else None
        if p is None or p.packed.dtype not in _PACKED_DTYPES or not p.packed.is_contiguous():
            return None
        packs.append(p)
    return packs


def _decode_linears(w: LayerWeights) -> bool:
    """Every linear of the layer a DecodeLinear: what the CPU entry asks of a layer's linears
    before _packed_all asks each for its packed weight (a LayerStack asks both once)."""
    return all(hasattr(lin, "packed_for") for lin in w.linears())


def _cpu_applies(h, y, w, k_cache, v_cache, freqs) -> bool:
    """CPU tensors of a kernel dtype, untraced, and every linear a DecodeLinear. Whether each has
    a packed weight for y is settled in _cpu_impl (one lookup a linear and call, ~3 us each; a
    LayerStack does it once)."""
    if not (h.device.type == "cpu" and h.dtype in _CPU_DTYPES and _HAS_KERNEL):  # h: y may be None (a stack)
        return False
    if isinstance(w, LayerStack):
        return w.decode_linears and w.plain_caches and _dispatch.plain_eager(h, y, freqs)
    return _decode_linears(w) and _dispatch.plain_eager(h, y, k_cache, v_cache, freqs)


def _kernel_rows(h, y, freqs):
    """(h, ldh, y, ldy, freqs) as the extension takes them: row strides it can index, else copies
    (y None: ldy = dim)."""
    dim = h.shape[2]
    ldh, ldy = _row_stride(h), (dim if y is None else _row_stride(y))
    if ldh is None:
        h, ldh = h.contiguous(), dim
    if ldy is None:
        y, ldy = y.contiguous(), dim
    return h, ldh, y, ldy, freqs.contiguous()


def _cpu_impl(h, y, w, k_cache, v_cache, freqs, start, eps):
    if isinstance(w, LayerStack):
        return _cpu_stack(h, y, w, freqs, start, eps)
    packs = _packed_all(y, w)
    if packs is None:  # a linear takes its torch path (e.g. autograd on its weight): the composition
        return decode_layer_ref(h, y, w, k_cache, v_cache, freqs, start, eps)
    B, n, dim = y.shape
    h, ldh, y, ldy, freqs = _kernel_rows(h, y, freqs)
    ffn_norm, next_norm = w.ffn_norm.contiguous(), w.next_norm.contiguous()
    h_out = torch.empty((B, n, dim), dtype=y.dtype)
    y_out = torch.empty((B, n, dim), dtype=y.dtype)
    H = w.n_head
    _dispatch.extension().decode_layer(
        h.data_ptr(), ldh, y.data_ptr(), ldy, h_out.data_ptr(), y_out.data_ptr(), [kernel_descriptor(p) for p in packs],
        ffn_norm.data_ptr(), next_norm.data_ptr(), freqs.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        B, n, H, dim // H, k_cache.shape[2], start, eps, 1.0 / math.sqrt(dim // H), _torch_sum_lanes(),
        _dispatch.DTYPE_CODES[y.dtype], _dispatch.num_threads())
    torch.autograd.graph.increment_version((k_cache, v_cache))
    return h_out, y_out


def _cpu_stack(h, y, stack: LayerStack, freqs, start, eps):
    """A LayerStack on the CPU: one extension call for all layers (and the first norm when y is
    None), or each layer its own way."""
    kernel = stack.kernel_for(h)
    if kernel is None:
        return layer_by_layer(_cpu_impl, h, y, stack, freqs, start, eps)
    B, n, dim = h.shape
    h, ldh, y, ldy, freqs = _kernel_rows(h, y, freqs)
    h_out = torch.empty((B, n, dim), dtype=h.dtype)
    y_out = torch.empty((B, n, dim), dtype=h.dtype)
    kernel.run(h.data_ptr(), ldh, 0 if y is None else y.data_ptr(), ldy, h_out.data_ptr(), y_out.data_ptr(),
               freqs.data_ptr(), n, start, eps, _torch_sum_lanes(), _dispatch.num_threads())
    torch.autograd.graph.increment_version(stack.caches)
    return h_out, y_out


_dispatch.register("decode_layer", "cpu", _cpu_impl, applies=_cpu_applies)
# CUDA: the composition, whose ops pick their CUDA/Triton kernels (registered as the cuda entry
# so that a CUDA prior does not warn of a torch fallback).
_dispatch.register("decode_layer", "cuda", decode_layer_ref, applies=lambda h, y, *rest: h.is_cuda)
_dispatch.register("decode_layer", "torch", decode_layer_ref)


def _torch_only_composition(h, y, w, k_cache, v_cache, freqs, start, eps):
    """decode_layer_ref with each op's torch reference called directly: the self-check's oracle
    (the torch entry itself dispatches its ops, and a self-check must not pick other backends)."""
    def linear(lin, x):
        p = lin.packed_for(x)
        if p.is_w8a8:
            return decode_gemm_w8a8_ref(x, p.weight, p.scales)
        if p.is_w4a8:
            return decode_gemm_w4a8_ref(x, p.weight, p.scales, p.group_size)
        return decode_gemm_ref(x, p.dequantized()) if p.is_int4 else decode_gemm_ref(x, p.weight, p.scales)

    b, n, dim = y.shape
    q, k, v = rope_qkv_ref(linear(w.wqkv, y), freqs, w.n_head)
    out = cache_attention_ref(q, k, v, k_cache, v_cache, start)
    h, y = add_rmsnorm_ref(h, linear(w.wo, out.transpose(1, 2).reshape(b, n, dim)), w.ffn_norm, eps)
    return add_rmsnorm_ref(h, linear(w.w2, F.silu(linear(w.w1, y)) * linear(w.w3, y)), w.next_norm, eps)


def _selfcheck(backend, reference, device) -> None:
    """A group step (4 positions) of 2 rows mid-cache: 3 heads of 16, FFN 40, every packed format."""
    from detailflow_engine.linear import DecodeLinear  # engine layer above ops: imported on use only

    g = torch.Generator().manual_seed(0)
    B, n, H, d, F_, L = 2, 4, 3, 16, 40, 12
    dim = H * d
    for dtype, mode in ((torch.float32, "native"), (torch.bfloat16, "native"), (torch.float32, "int8"),
                        (torch.bfloat16, "int4"), (torch.bfloat16, "w8a8"), (torch.float32, "w4a8")):
        def linear(k_in, k_out):
            lin = torch.nn.Linear(k_in, k_out, bias=False)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(k_out, k_in, generator=g) / math.sqrt(k_in))
            lin = lin.to(device)
            if mode == "native":
                lin = lin.to(dtype)
            return DecodeLinear(lin.requires_grad_(False), mode)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

        w = LayerWeights(linear(dim, 3 * dim), linear(dim, dim), linear(dim, F_), linear(dim, F_),
                         linear(F_, dim), 1 + 0.1 * rand(dim), 1 + 0.1 * rand(dim), H)
        h, y = rand(B, n, dim), rand(B, n, dim)
        cache = rand(B, H, L, d)
        freqs = torch.randn(n, d // 2, 2, generator=g).to(device)
        kc, vc, kr, vr = cache.clone(), cache.clone(), cache.clone(), cache.clone()
        if not backend.applies(h, y, w, kc, vc, freqs):
            continue
        got = backend.fn(h, y, w, kc, vc, freqs, 5, 1e-5)
        want = _torch_only_composition(h, y, w, kr, vr, freqs, 5, 1e-5)
        # and as a LayerStack of two layers (one extension call on the CPU, in place after the first)
        # and as a LayerStack of two layers that computes its first norm (y None): one extension
        # call on the CPU, in place after the first layer
        first_norm = 1 + 0.1 * rand(dim)
        stack = LayerStack([w, w], [cache.clone(), cache.clone()], [cache.clone(), cache.clone()], first_norm)
        got_stack = backend.fn(h, None, stack, None, None, freqs, 5, 1e-5)
        k2, v2 = cache.clone(), cache.clone()
        layer1 = _torch_only_composition(*add_rmsnorm_ref(h, None, first_norm, 1e-5), w, cache.clone(), cache.clone(),
                                         freqs, 5, 1e-5)
        want_stack = _torch_only_composition(*layer1, w, k2, v2, freqs, 5, 1e-5)
        atol, _ = tolerance(dtype)
        for name, a, b in zip(("h", "y", "k_cache", "v_cache", "stack h", "stack y", "stack k_cache[1]",
                               "stack v_cache[1]"), got + (kc, vc) + got_stack + stack.caches[1::2],
                              want + (kr, vr) + want_stack + (k2, v2)):
            _dispatch.expect_close(f"decode_layer {dtype} {mode} {name}", a, b, atol,
                                   1e-4 if dtype == torch.float32 else 2e-2)


_dispatch.register_selfcheck("decode_layer", _selfcheck)
