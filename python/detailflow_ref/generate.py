"""Reference generation with the official ``generate_group_par`` semantics.

Every step recomputes the whole prefix (no KV cache): this is the baseline the engine
is measured and checked against. Steps (``c`` = causal_num, ``g`` = group_size,
``G`` = num_tokens // g):

* step 0: the class token alone -> token 0;
* steps 1 .. c-1: prefix of i tokens -> token i;
* group steps i = c//g .. G-1: prefix of i*g tokens (+ the g-1 special embeddings)
  -> the last g positions give tokens i*g .. i*g+g-1.

CFG (cfg_scale > 1): the batch is [cond rows | null-class rows (label = num_classes)]
and logits = u + s * (c - u). With ``gradual_cfg`` the group step i uses
s = cfg_scale * (G - i + 1) / (G + 1) (class and single steps keep cfg_scale).
Unlike the official code, cfg_scale <= 1 runs without null rows instead of failing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from detailflow_engine.schedule import cfg_scale_for_step, generation_plan

from .sampling import sample

# sampler(logits (B, n, V) after CFG mixing, token_positions (n,) int64) -> tokens (B, n) int64
Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, T) int64
    step_logits: List[torch.Tensor] = field(default_factory=list)  # raw model outputs (rows, L, V) per step
    cfg_logits: Optional[torch.Tensor] = None  # (B, T, V) mixed logits each token was sampled from


def official_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     generator: Optional[torch.Generator] = None) -> Sampler:
    """The official per-position sampling: for each new position in order, temperature,
    top-k/top-p filter, softmax and one ``torch.multinomial`` call over the batch rows."""

    def _sampler(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = logits / max(temperature, 1e-5)
        cols = [sample(logits[:, k], 1.0, top_k, top_p, generator=generator)[0]
                for k in range(logits.shape[1])]
        return torch.cat(cols, dim=1)

    return _sampler


@torch.no_grad()
def generate(model, labels: torch.Tensor, cfg_scale: float = 1.5, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, gradual_cfg: bool = False,
             generator: Optional[torch.Generator] = None, sampler: Optional[Sampler] = None,
             return_step_logits: bool = False, num_tokens: Optional[int] = None):
    """Generate (B, T) tokens for class ``labels`` (B,) with a reference prior.

    ``model`` is a :class:`detailflow_ref.gpt.Transformer` (call ``.eval()`` first).
    ``sampler`` replaces the official multinomial sampling (then temperature, top_k,
    top_p and generator are the sampler's business). Returns the tokens, or with
    ``return_step_logits`` a :class:`GenerationOutput` with every step's raw model
    output (2B or B rows, L, V) and the mixed (B, T, V) logits.
    """
    g, c = model.config.group_size, model.config.causal_num
    num_tokens = model.config.block_size if num_tokens is None else int(num_tokens)
    if num_tokens > model.config.block_size:
        raise ValueError(f"num_tokens={num_tokens} exceeds block_size={model.config.block_size}")
    steps = generation_plan(num_tokens, g, c)  # checks the group arithmetic
    num_groups = num_tokens // g
    labels = labels.reshape(-1).long()
    b = labels.shape[0]
    use_cfg = cfg_scale > 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.config.num_classes)]) if use_cfg else labels
    if sampler is None:
        sampler = official_sampler(temperature, top_k, top_p, generator)

    tokens = torch.zeros(b, num_tokens, dtype=torch.long, device=labels.device)
    step_logits: List[torch.Tensor] = []
    mixed_all = [] if return_step_logits else None
    for step in steps:
        prefix = tokens[:, :step.prefix_len]
        if use_cfg:
            prefix = torch.cat([prefix, prefix])
        logits = model.forward_prefix(cond, prefix if step.prefix_len else None)
        if return_step_logits:
            step_logits.append(logits)
        n_new = step.stop - step.start
        if use_cfg:
            s = cfg_scale_for_step(cfg_scale, step.group_index, num_groups, gradual_cfg)
            cond_l, uncond_l = logits.split(b, dim=0)
            logits = uncond_l + (cond_l - uncond_l) * s
        logits = logits[:, -n_new:]
        positions = torch.arange(step.start, step.stop, device=labels.device)
        tokens[:, step.start:step.stop] = sampler(logits, positions).to(torch.long)
        if mixed_all is not None:
            mixed_all.append(logits)
    if not return_step_logits:
        return tokens
    return GenerationOutput(tokens, step_logits, torch.cat(mixed_all, dim=1))
