"""The coarse-to-fine schedule: token prefix length -> resolution, and the generation step plan.

Pure integer/float math (no torch). The formulas reproduce the official
``modelling/detail_token.py`` (``token_res_map_func`` and ``ResolutionDegradation``)
bit for bit:

* ``res(t) = clamp(int(S - (S-1)/(T-1)**p * (T-t)**p), 1, S)``, evaluated in
  Python floats in exactly that order and truncated by ``int`` (not rounded).
* ``decode_size(t) = max(P, ceil(res(t)/P) * P)`` (the official smart resize of a
  square side to a multiple of the patch size, never below one patch; the
  max-pixels branch of that resize can never fire because ``res <= S``).
* ``best_tokens(r)``: among the scheduled t whose decode size is ``r``, the one
  whose ``res(t)`` is closest to ``r``; ties go to the LARGER t (the official
  loop updates on ``<=``). For DetailFlow-16 this is the last t of each size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .config import TokenizerConfig


def token_res(max_image_size: int, num_tokens: int, t: int, power: float = 1.5) -> int:
    """Target resolution carried by the first ``t`` of ``num_tokens`` tokens (official token_res_map_func)."""
    if not 1 <= t <= num_tokens:
        raise ValueError(f"t must be in 1..{num_tokens}, got {t}")
    if num_tokens == 1:
        return max_image_size
    b = (max_image_size - 1) / math.pow(num_tokens - 1, power)
    s = int(max_image_size - b * math.pow(num_tokens - t, power))
    return max(1, min(s, max_image_size))


def patch_size_round(side: int, patch_size: int) -> int:
    """A square side rounded up to a multiple of ``patch_size``, at least one patch."""
    if side < patch_size:
        return patch_size
    return math.ceil(side / patch_size) * patch_size


def scheduled_token_counts(num_tokens: int, group_size: int, causal_num: int) -> list[int]:
    """1..causal_num, then the multiples of group_size up to num_tokens (official token_list)."""
    _check_groups(num_tokens, group_size, causal_num)
    return list(range(1, causal_num + 1)) + list(range(causal_num + group_size, num_tokens + 1, group_size))


@dataclass(frozen=True)
class Step:
    """One generation step: it produces tokens [start, stop) (predicted from sequence positions
    [start, stop) with a KV cache; the official full-prefix forward feeds tokens[:start])."""

    index: int
    start: int
    stop: int
    group_index: Optional[int]  # i of a group step (i = start // g), None for the class / single steps

    @property
    def prefix_len(self) -> int:
        """Tokens the official (no-cache) forward feeds the model at this step."""
        return self.start


def generation_plan(block_size: int, group_size: int, causal_num: int,
                    num_tokens: Optional[int] = None) -> list[Step]:
    """The steps of generation: one token at a time up to ``causal_num``, then one whole group per
    step, ``[0,1), [1,2), ..., [c-1,c), [c,c+g), ..., [T-g,T)``: 1 + (c-1) + (T-c)/g steps (23 for
    T=128, g=c=8).

    ``num_tokens`` stops the plan early at a step boundary (a shorter, coarser image).
    """
    spans = [(t - 1, t) if t <= causal_num else (t - group_size, t)
             for t in scheduled_token_counts(block_size, group_size, causal_num)]
    if num_tokens is not None:
        if num_tokens not in [b for _, b in spans]:
            raise ValueError(f"num_tokens={num_tokens} is not a step boundary of the generation plan; "
                             f"valid: {[b for _, b in spans]}")
        spans = [(a, b) for a, b in spans if b <= num_tokens]
    return [Step(k, a, b, a // group_size if a >= causal_num else None) for k, (a, b) in enumerate(spans)]


def cfg_scale_for_step(cfg_scale: float, group_index: Optional[int], num_groups: int,
                       gradual_cfg: bool = False) -> float:
    """Guidance scale of a step: group step i of G scales s by (G - i + 1) / (G + 1) when gradual;
    class and single steps (group_index None) keep s.

    Evaluated exactly as the official expression ``cfg_scale * (G - i + 1) / (G + 1)``.
    """
    if not gradual_cfg or group_index is None:
        return cfg_scale
    return cfg_scale * (num_groups - group_index + 1) / (num_groups + 1)


def _check_groups(num_tokens: int, group_size: int, causal_num: int) -> None:
    if group_size < 1 or num_tokens % group_size or causal_num % group_size or not 0 < causal_num <= num_tokens:
        raise ValueError(f"need num_tokens ({num_tokens}) and causal_num ({causal_num}) to be multiples of "
                         f"group_size ({group_size}) with 0 < causal_num <= num_tokens")


@dataclass(frozen=True)
class Schedule:
    """Resolution schedule of a tokenizer with ``num_tokens`` latent tokens at ``max_image_size`` pixels."""

    max_image_size: int
    num_tokens: int
    group_size: int
    causal_num: int
    power: float = 1.5
    enc_patch_size: int = 16
    dec_patch_size: int = 16
    _best: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_groups(self.num_tokens, self.group_size, self.causal_num)
        if self.enc_patch_size > self.dec_patch_size:
            raise ValueError(f"enc_patch_size {self.enc_patch_size} > dec_patch_size {self.dec_patch_size}")
        best: dict[int, int] = {}
        diff: dict[int, int] = {}
        for t in self.scheduled_tokens:
            res = self.res(t)
            size = patch_size_round(res, self.dec_patch_size)
            if abs(res - size) <= diff.get(size, self.max_image_size):  # '<=': later t wins ties
                best[size] = t
                diff[size] = abs(res - size)
        object.__setattr__(self, "_best", best)

    @classmethod
    def from_config(cls, config: "TokenizerConfig") -> "Schedule":
        return cls(config.max_image_size, config.num_latent_tokens, config.group_size, config.causal_num,
                   config.degradation_power, config.enc_patch_size, config.dec_patch_size)

    @property
    def scheduled_tokens(self) -> list[int]:
        """Prefix lengths the tokenizer was trained on (and the prior's step ends)."""
        return scheduled_token_counts(self.num_tokens, self.group_size, self.causal_num)

    def res(self, t: int) -> int:
        """Target resolution of the first t tokens (any t in 1..T)."""
        return token_res(self.max_image_size, self.num_tokens, t, self.power)

    def decode_size(self, t: int) -> int:
        """Decoder output side for the first t tokens (official token2dec_out_res, min one patch)."""
        return max(patch_size_round(self.res(t), self.dec_patch_size), self.dec_patch_size)

    def encode_size(self, t: int) -> int:
        """Encoder input side for the first t tokens (official token2enc_res)."""
        return patch_size_round(self.res(t), self.enc_patch_size)

    @property
    def best_resolutions(self) -> list[int]:
        """Decode sizes an image may be encoded at (official best_res), ascending."""
        return list(self._best)

    def best_tokens(self, resolution: int) -> int:
        """Token count to encode/decode an image of this side with (official decres2besttoken)."""
        try:
            return self._best[resolution]
        except KeyError:
            raise ValueError(f"resolution {resolution} is not one of the schedule's sizes "
                             f"{self.best_resolutions}") from None

    def generation_plan(self) -> list[Step]:
        return generation_plan(self.num_tokens, self.group_size, self.causal_num)
