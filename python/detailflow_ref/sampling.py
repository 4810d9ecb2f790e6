"""Reference logit filtering and sampling with the official semantics.

Same rules as the official ``top_k_top_p_filtering`` / ``sample``
(ByteFlow-AI/DetailFlow ``autoregressive/models/generate.py``, from HF transformers
v3.2), except that the caller's logits are never edited in place.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                          filter_value: float = -float("inf"), min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Return a filtered copy of ``logits`` (..., V).

    top-k: drop every logit strictly below the k-th largest (ties with it are kept).
    top-p: sort descending, drop tokens whose cumulative softmax probability exceeds
    ``top_p`` shifted right by one (so the token that crosses the threshold stays,
    and the top token always stays). Top-k is applied first, top-p on its result.
    """
    logits = logits.clone()
    if top_k > 0:
        k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        kth = torch.topk(logits, k, dim=-1)[0][..., -1:]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        if min_tokens_to_keep > 1:
            remove[..., :min_tokens_to_keep] = False
        remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
        remove = remove.scatter(-1, sorted_idx, remove)
        logits = logits.masked_fill(remove, filter_value)
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """softmax(filter(logits / max(temperature, 1e-5))) over the last dim."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    return F.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           sample_logits: bool = True, generator: Optional[torch.Generator] = None):
    """Official ``sample``: one token per row. Returns (idx (rows, 1) int64, probs (rows, V)).

    ``logits`` is (rows, V), or (rows, L, V) of which the last position is used as
    the official code does. With ``sample_logits`` a ``torch.multinomial`` draw on the
    probabilities (one call for all rows; ``generator`` or the global RNG), else argmax.
    top_k = 1 therefore picks the argmax either way (barring exact ties).
    """
    if logits.dim() == 3:
        logits = logits[:, -1, :]
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    if sample_logits:
        idx = torch.multinomial(probs, num_samples=1, generator=generator)
    else:
        idx = torch.topk(probs, k=1, dim=-1)[1]
    return idx, probs
