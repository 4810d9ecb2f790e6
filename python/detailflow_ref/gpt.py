"""Reference DetailFlow prior: a LlamaGen-style class-conditional GPT in plain PyTorch.

Parameter names and shapes follow the official implementation
(ByteFlow-AI/DetailFlow ``autoregressive/models/gpt.py``) so that its state dicts load
with ``strict=True``. This module is the numerical oracle the engine is tested
against; it favours being obviously right over being fast (no KV cache here).

Sequence layout (``c`` = causal_num, ``g`` = group_size)::

    position   0      1 .. c          c+1 .. c+g-1          c+g ..
    content    [cls]  tok[0:c]        g-1 special tokens    tok[c:]

A prefix of ``n`` tokens gives ``1 + n`` positions while ``n < c`` and
``1 + n + (g - 1)`` once ``n >= c``. Output position ``i`` predicts token ``i``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from detailflow_engine.config import PriorConfig
from detailflow_engine.rotary import apply_rotary, precompute_freqs_cis_2d


# --------------------------------------------------------------------------- masks


def group_causal_mask(block_size: int, group_size: int, causal_num: int,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """(block_size, block_size) bool, True = may attend.

    Row ``i < causal_num`` is strictly causal (``j <= i``); any later row sees every
    position of its own group and of earlier groups (``j // g <= i // g``). Indices
    are sequence positions (the class token is position 0).
    """
    i = torch.arange(block_size, device=device or "cpu")[:, None]
    j = torch.arange(block_size, device=device or "cpu")[None, :]
    return torch.where(i < causal_num, j <= i, (j // group_size) <= (i // group_size))


# --------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    def __init__(self, cfg: PriorConfig, resid_dropout: float = 0.0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dim = cfg.dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary(q.view(b, n, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary(k.view(b, n, self.n_kv_head, self.head_dim), freqs_cis)
        v = v.view(b, n, self.n_kv_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: PriorConfig, resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.attention = Attention(cfg, resid_dropout)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden, ffn_dropout)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs_cis, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding; row ``num_classes`` is the null class (present when class dropout > 0)."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:  # label dropout for CFG training
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


class SpecialTokenEmbedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(num, dim)

    def forward(self) -> torch.Tensor:
        return self.special_embeddings.weight


class Transformer(nn.Module):
    """The DetailFlow c2i prior with the official parameter names (strict state-dict load).

    Dropouts (token / residual / FFN, and class-label dropout) act only in training
    mode, with the probabilities of config.json. Drop-path (training only) is not
    implemented: drop_path_rate is 0 in the released configs.
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        raw = config.raw_json
        # Registration order = the official state-dict key order.
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(float(raw.get("token_dropout_p", 0.0)))
        self.layers = nn.ModuleList(
            TransformerBlock(config, float(raw.get("resid_dropout_p", 0.0)), float(raw.get("ffn_dropout_p", 0.0)))
            for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.spe_tok_embeddings = SpecialTokenEmbedding(config.num_special_tokens, config.dim)
        # Plain attributes (not buffers): they are not in the official state dict and must
        # stay fp32 whatever dtype the weights are cast to.
        self.freqs_cis = precompute_freqs_cis_2d(config.block_size, config.group_size, config.head_dim,
                                                 config.rope_base, config.cls_token_num)
        self.group_causal_mask = group_causal_mask(config.block_size, config.group_size, config.causal_num)

    # -- sizes
    def seq_len(self, num_tokens: int) -> int:
        """Sequence positions for a prefix of ``num_tokens`` tokens (class position included)."""
        extra = self.config.num_special_tokens if num_tokens >= self.config.causal_num else 0
        return 1 + num_tokens + extra

    # -- forward
    def embed(self, cond_idx: torch.Tensor, tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """[cls] + tok[:c] + specials + tok[c:] (specials only once the prefix reaches c)."""
        parts = [self.cls_embedding(cond_idx)]
        if tokens is not None and tokens.shape[1] > 0:
            tok = self.tok_embeddings(tokens)
            c = self.config.causal_num
            if tok.shape[1] >= c:
                spe = self.spe_tok_embeddings().unsqueeze(0).expand(tok.shape[0], -1, -1)
                parts += [tok[:, :c], spe.to(tok.dtype), tok[:, c:]]
            else:
                parts.append(tok)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward_prefix(self, cond_idx: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Official full-prefix forward: logits (B, seq_len(n), V) fp32 over every position.

        ``tokens`` (B, n) are the tokens known so far (None or n = 0: class token only).
        This is what the official ``generate_group_par`` computes at each step.
        """
        if tokens is not None and tokens.shape[0] != cond_idx.shape[0]:
            raise ValueError(f"tokens batch {tokens.shape[0]} != labels batch {cond_idx.shape[0]}")
        h = self.tok_dropout(self.embed(cond_idx, tokens))
        n = h.shape[1]
        if n > self.freqs_cis.shape[0]:
            raise ValueError(f"sequence of {n} positions exceeds block_size {self.config.block_size}")
        freqs = self.freqs_cis[:n].to(h.device)
        mask = self.group_causal_mask[:n, :n].to(h.device)
        for layer in self.layers:
            h = layer(h, freqs, mask)
        return self.output(self.norm(h)).float()

    def forward(self, idx: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: idx = codes[:, :-g] -> logits (B, block_size, V); logits[:, i] predicts codes[:, i]."""
        return self.forward_prefix(cond_idx, idx)


# --------------------------------------------------------------------------- loading


def load_prior_checkpoint(path, which: str = "ema", map_location="cpu") -> Transformer:
    """Reference prior from a model folder / .pt / .safetensors via the engine's safe loader.

    ``which`` = 'ema' (default; falls back to 'model' when the checkpoint has no EMA) or 'model'.
    """
    from detailflow_engine.checkpoint import check_state_dict, load_checkpoint

    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    loaded = load_checkpoint(path, "prior", ema=None if which == "ema" else False)
    model = Transformer(loaded.config)
    check_state_dict(model.state_dict(), loaded.state_dict, where=str(loaded.weights_path))
    model.load_state_dict(loaded.state_dict, strict=True)
    return model.to(map_location).eval()
