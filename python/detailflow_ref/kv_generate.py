"""Plain-torch KV-cache generation with the reference GPT's own modules (gpt-fast's shape).

The peer the engine is measured against in the benchmarks: the same model and step plan as the
engine (a static KV cache, one forward per step over the step's new positions only), written
the obvious way in plain torch: ``nn.Linear``, the reference's rotary, ``scaled_dot_product_attention``
over the cache, torch's own sampling. Nothing of ours runs on its path (no custom op, no kernel),
so engine / peer is what the kernels and the engine's loop win over a good plain implementation,
and reference / peer what the cache wins over the official full-prefix recompute.

Its tokens equal the reference generation's (``generate.generate``) under greedy sampling up to
float rounding (the cache sums attention over the same keys in another order).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from detailflow_engine.rotary import apply_rotary
from detailflow_engine.schedule import cfg_scale_for_step, generation_plan

from .generate import Sampler, official_sampler
from .gpt import Transformer


class KVCachePeer:
    """Static (rows, H, block_size, d) K and V buffers per layer of a reference Transformer."""

    def __init__(self, model: Transformer, rows: int):
        cfg = model.config
        if cfg.n_kv_head != cfg.n_head:
            raise NotImplementedError("grouped-query attention is not supported by the peer")
        w = model.output.weight
        self.model, self.rows = model, rows
        shape = (rows, cfg.n_head, model.freqs_cis.shape[0], cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.freqs = model.freqs_cis.to(w.device)

    def embed(self, cond: torch.Tensor, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Input embeddings of sequence positions [start, stop): the reference's own full-prefix
        embedding of the `start` tokens known so far, sliced (it holds exactly those positions)."""
        return self.model.embed(cond, tokens[:, :start] if start else None)[:, start:stop]

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """New positions [start, start + n) through the model against the cache -> logits (rows, n, V) fp32."""
        b, n, dim = x.shape
        freqs = self.freqs[start:start + n]
        for layer, k_cache, v_cache in zip(self.model.layers, self.k, self.v):
            att = layer.attention
            q, k, v = att.wqkv(layer.attention_norm(x)).view(b, n, 3, att.n_head, att.head_dim).unbind(2)
            k_cache[:, :, start:start + n] = apply_rotary(k, freqs).transpose(1, 2)
            v_cache[:, :, start:start + n] = v.transpose(1, 2)
            # group-causal: within a step every query sees all earlier positions and its whole group
            out = F.scaled_dot_product_attention(apply_rotary(q, freqs).transpose(1, 2),
                                                 k_cache[:, :, :start + n], v_cache[:, :, :start + n])
            h = x + att.wo(out.transpose(1, 2).reshape(b, n, dim))
            x = h + layer.feed_forward(layer.ffn_norm(h))
        return self.model.output(self.model.norm(x)).float()


@torch.inference_mode()
def kv_cache_generate(model: Transformer, labels: torch.Tensor, cfg_scale: float = 1.5,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, gradual_cfg: bool = False,
                      generator: Optional[torch.Generator] = None, sampler: Optional[Sampler] = None,
                      num_tokens: Optional[int] = None, peer: Optional[KVCachePeer] = None) -> torch.Tensor:
    """(B, T) tokens for class ``labels`` (B,), the arguments of :func:`generate.generate`.

    top_k=1 is greedy (argmax of the mixed logits, no sampler call). ``peer`` reuses the cache
    buffers of an earlier call with the same number of rows.
    """
    cfg = model.config
    steps = generation_plan(cfg.block_size, cfg.group_size, cfg.causal_num, num_tokens)
    labels = labels.reshape(-1).long()
    b, T = labels.shape[0], steps[-1].stop
    use_cfg = cfg_scale > 1.0
    cond = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if use_cfg else labels
    if peer is None or peer.model is not model or peer.rows != cond.shape[0]:
        peer = KVCachePeer(model, cond.shape[0])
    if sampler is None and top_k != 1:
        sampler = official_sampler(temperature, top_k, top_p, generator)
    tokens = torch.zeros(cond.shape[0], T, dtype=torch.long, device=labels.device)
    num_groups = T // cfg.group_size
    for step in steps:
        logits = peer.forward(peer.embed(cond, tokens, step.start, step.stop), step.start)
        if use_cfg:
            c, u = logits.split(b, dim=0)
            logits = u + (c - u) * cfg_scale_for_step(cfg_scale, step.group_index, num_groups, gradual_cfg)
        if sampler is None:
            new = logits.argmax(dim=-1)
        else:
            new = sampler(logits, torch.arange(step.start, step.stop, device=labels.device)).long()
        tokens[:b, step.start:step.stop] = new
        if use_cfg:
            tokens[b:, step.start:step.stop] = new
    return tokens[:b].clone()


__all__: List[str] = ["KVCachePeer", "kv_cache_generate"]
