"""Inference GPT prior with a static KV cache (gpt-fast shape).

Parameter names are the official ones (``tok_embeddings``, ``cls_embedding.embedding_table``,
``layers.N.attention.wqkv``/``wo``, ``feed_forward.w1/w2/w3``, ...), so a diff against
DetailFlow's ``gpt.py`` stays obvious and official state dicts load strictly.

Why a cache is exact: attention is group-causal, so the keys and values of finished
positions never change. One generation step feeds only its new positions (1 for the first
``causal_num`` steps, then exactly one group of ``g``) and attends to the cache with no
mask: within a step every query sees all earlier positions and its whole group.

Sequence positions (``c`` = causal_num, ``g`` = group_size) and what each position holds::

    q = 0              the class embedding (cond rows: label, null rows: num_classes)
    1 <= q <= c        tok[q - 1]
    c < q < c + g      special embedding q - c - 1
    q >= c + g         tok[q - g]

Logits at position q predict tok[q].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from detailflow_engine.config import PriorConfig
from detailflow_engine.ops.decode_layer import LayerStack, LayerWeights, decode_layers
from detailflow_engine.ops.group_sample import GroupSampler
from detailflow_engine.ops.prior_step import PriorStepWeights, StepEmbeddings, prior_step, step_embeddings_ref
from detailflow_engine.schedule import Step
from detailflow_engine.rotary import precompute_freqs_cis_2d


class RMSNorm(nn.Module):
    """The official RMSNorm. The decode step does not call it: `add_rmsnorm` fuses each norm with
    the residual add before it (same formula); this forward is the numerics it must match."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # fp32 statistics whatever the weight dtype, as the official RMSNorm
        xf = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class KVCache(nn.Module):
    """Fixed buffers (B, H, L_max, d) allocated once per batch size."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_head, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Attention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        if cfg.n_kv_head != cfg.n_head:
            raise NotImplementedError("grouped-query attention (n_kv_head != n_head) is not supported")
        self.n_head, self.head_dim, self.dim = cfg.n_head, cfg.head_dim, cfg.dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None


class FeedForward(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def decode_weights(self, next_norm: RMSNorm) -> LayerWeights:
        """What ops.decode_layer reads; `next_norm` follows this block (the next block's
        attention_norm, or the prior's final norm)."""
        attn, ffn = self.attention, self.feed_forward
        return LayerWeights(attn.wqkv, attn.wo, ffn.w1, ffn.w3, ffn.w2, self.ffn_norm.weight,
                            next_norm.weight, attn.n_head)


class LabelEmbedder(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + int(cfg.class_dropout_prob > 0), cfg.dim)


class SpecialTokenEmbedding(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.special_embeddings = nn.Embedding(cfg.num_special_tokens, cfg.dim)


def _drop_layer_stack(prior: "Prior", incompatible_keys) -> None:
    """load_state_dict post hook: the reloaded linears hold new packed weights."""
    prior._stack = None


class Prior(nn.Module):
    """The DetailFlow c2i prior for inference, with official parameter names."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.spe_tok_embeddings = SpecialTokenEmbedding(config)
        # fp32 rotary table (1 + block_size, d/2, 2); not in the state dict, never cast.
        self.freqs_cis = precompute_freqs_cis_2d(config.block_size, config.group_size, config.head_dim,
                                                 config.rope_base, config.cls_token_num)
        self.cache_batch = 0
        # Bumped whenever setup_caches allocates new cache buffers: whoever holds something tied
        # to the old buffers' addresses (cuda_graphs.StepGraphs) sees that it went stale.
        self.cache_epoch = 0
        self._stack: Optional[LayerStack] = None  # what forward_step's layers read (see layer_stack)
        self._step: Optional[PriorStepWeights] = None  # what step_logits reads (see step_weights)
        self._stack_epoch = -1
        self._stack_key: tuple = ()  # _weights_key() when the stack was built
        self.register_load_state_dict_post_hook(_drop_layer_stack)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def dtype(self) -> torch.dtype:
        """The activation, KV-cache and float-weight dtype (the final norm's; a linear's weight may
        be int8 codes or packed, so it is not asked)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def setup_caches(self, batch: int) -> None:
        """Allocate the KV cache for `batch` rows (CFG doubles the rows) once; reused while it fits."""
        if self.cache_batch == batch:
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, self.config.n_kv_head, self.config.block_size,
                                               self.config.head_dim, self.dtype, self.device)
        self.freqs_cis = self.freqs_cis.to(self.device)
        self.cache_batch = batch
        self.cache_epoch += 1

    def step_tables(self) -> StepEmbeddings:
        """The input embedding tables and the positions' layout, as ops.prior_step reads them."""
        c = self.config
        return StepEmbeddings(self.cls_embedding.embedding_table.weight, self.tok_embeddings.weight,
                              self.spe_tok_embeddings.special_embeddings.weight, c.causal_num, c.group_size)

    def step_embeddings(self, labels: torch.Tensor, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Input embeddings of sequence positions [start, stop) -> (B, stop - start, dim).

        labels: (B,) class ids (null rows carry num_classes); tokens: (B, T) tokens so far.
        """
        return step_embeddings_ref(self.step_tables(), labels, tokens, start, stop)

    def step_logits(self, labels: torch.Tensor, tokens: torch.Tensor, step: Step,
                    sampler: Optional[GroupSampler] = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """Logits (B, n, V) fp32 of one decode step: embed its positions, run them through the
        cache, the head (ops.prior_step: one extension call on the CPU kernel). With a sampler:
        also the step's tokens drawn at cfg_scale and written into `tokens` (in the same call)."""
        return prior_step(self.step_weights(step.start), labels, tokens, step.start, step.stop, sampler, cfg_scale)

    def step_weights(self, start: int) -> PriorStepWeights:
        """What ops.prior_step reads: the layer stack (layer_stack(start)) with the embeddings,
        the head and the rotary table; rebuilt whenever the stack is."""
        stack = self.layer_stack(start)
        if self._step is None or self._step.stack is not stack:
            self._step = PriorStepWeights(self.step_tables(), stack, self.output, self.freqs_cis, self.config.norm_eps)
        return self._step

    def _apply(self, fn, recurse=True):
        self._stack = None  # it points into the tensors that .to() / .cuda() replace
        return super()._apply(fn, recurse)

    def layer_stack(self, start: int) -> LayerStack:
        """Every layer's weights and KV cache as ops.decode_layers reads them. Checked at each
        generation's first step (start 0) and rebuilt when any module, packed weight, parameter
        storage or cache it reads was replaced (`_weights_key`), after setup_caches reallocates and
        after the prior's load_state_dict or .to(); reused by the generation's later steps
        otherwise, so a module swapped or reloaded on its own must wait for the next generation
        (its cached keys and values would not match the new weights anyway)."""
        stale = self._stack is None or self._stack_epoch != self.cache_epoch
        if start == 0 and not stale:
            key = self._weights_key()
            stale = key != self._stack_key
        if stale:
            if self.layers[0].attention.kv_cache is None:
                raise RuntimeError("the prior has no KV cache: call setup_caches(batch) before forward_step")
            nexts = [layer.attention_norm for layer in self.layers[1:]] + [self.norm]
            caches = [layer.attention.kv_cache for layer in self.layers]
            self._stack = LayerStack([layer.decode_weights(nxt) for layer, nxt in zip(self.layers, nexts)],
                                     [c.k_cache for c in caches], [c.v_cache for c in caches],
                                     first_norm=self.layers[0].attention_norm.weight)
            self._stack_epoch = self.cache_epoch
            self._stack_key = self._weights_key()
        return self._stack

    def _weights_key(self) -> tuple:
        """What a step's kernels hold the addresses of: the linears and their packed weights, the
        norm, embedding and cache storages, the rotary table. ids are safe to compare: the stack
        keeps every object of the key it was built with alive. Read through the modules' own
        dicts (nn.Module.__getattr__ costs ~1 us a lookup, and this runs every generation)."""
        key = []

        def linear(mod):
            return id(mod), id(mod.__dict__.get("_packed"))

        def weight(norm):
            return norm._parameters["weight"].data_ptr()

        for layer in self._modules["layers"]:
            parts = layer._modules
            attn, ffn = parts["attention"]._modules, parts["feed_forward"]._modules
            cache = parts["attention"].kv_cache
            for lin in (attn["wqkv"], attn["wo"], ffn["w1"], ffn["w3"], ffn["w2"]):
                key += linear(lin)
            key += (weight(parts["attention_norm"]), weight(parts["ffn_norm"]), id(cache),
                    id(cache._buffers["k_cache"]) if cache is not None else 0)
        m = self._modules
        key += (weight(m["norm"]), *linear(m["output"]), weight(m["tok_embeddings"]),
                weight(m["cls_embedding"]._modules["embedding_table"]),
                weight(m["spe_tok_embeddings"]._modules["special_embeddings"]), self.freqs_cis.data_ptr())
        return tuple(key)

    def forward_step(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Run new positions [start, start + n) through the model; x: (B, n, dim) -> logits (B, n, V) fp32."""
        n = x.shape[1]
        freqs = self.freqs_cis[start:start + n]
        # Carry (residual h, its norm y) between layers: each layer runs its attention and FFN,
        # each residual add fused with the norm that follows it (ffn_norm, the next layer's
        # attention_norm, the final norm). decode_layers runs the first attention_norm (y None:
        # the stack's first_norm of x) and all layers as one op call.
        _, y = decode_layers(x, None, self.layer_stack(start), freqs, start, self.config.norm_eps)
        logits = self.output(y)
        return logits if logits.dtype == torch.float32 else logits.float()  # fp32 logits: no op
