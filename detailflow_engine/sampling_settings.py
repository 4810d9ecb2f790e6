"""What one generation call asks for, checked once: SamplingSettings, class labels and seeds.

Every entry point (``DetailFlowPipeline.generate``, the batcher, the serving app, and the
``generate`` / ``profile`` / ``evaluate`` CLIs) builds its settings here, so a bad value gets the
same :class:`SettingsError` naming the argument wherever it came in. The CLIs reword the name as
their flag (``cfg_scale`` -> ``--cfg-scale``, see ``cli.settings_from_args``).

Bottom layer: imports nothing from the engine runtime or the reference.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

INT64 = (-(2 ** 63), 2 ** 63 - 1)  # seeds key a Philox stream through an int64


class SettingsError(ValueError):
    """A bad generation argument; ``argument`` names it (``cfg_scale``, ``seed``, ``class_labels``)."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def is_int(v) -> bool:
    """A Python or NumPy integer (bools are not counted as ints)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _number(name: str, v) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise SettingsError(name, f"{name} must be a number, got {v!r}")
    return float(v)


def _finite_at_least_zero(name: str, v) -> float:
    x = _number(name, v)
    if not (math.isfinite(x) and x >= 0):
        raise SettingsError(name, f"{name} must be a finite number >= 0, got {v!r}")
    return x


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling settings of a generation, validated and normalized at construction.

    cfg_scale: guidance scale, finite >= 0 (> 1 enables CFG); temperature: finite >= 0 (0 = greedy);
    top_k: int >= 0 (0 = off); top_p: in (0, 1] (1 = off); gradual_cfg: decay the scale over the
    group steps (official); num_tokens: None (all) or an int >= 1 (whether it is a step boundary
    is the model's to say: ``PriorConfig.generation_plan``). Frozen and hashable: equal settings batch together.
    """

    cfg_scale: float = 1.45
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    gradual_cfg: bool = False
    num_tokens: Optional[int] = None

    def __post_init__(self):
        def set_(name, value):  # frozen: the normalized values go in through object.__setattr__
            object.__setattr__(self, name, value)

        set_("cfg_scale", _finite_at_least_zero("cfg_scale", self.cfg_scale))
        set_("temperature", _finite_at_least_zero("temperature", self.temperature))
        if not is_int(self.top_k) or not 0 <= self.top_k <= INT64[1]:
            raise SettingsError("top_k", f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        set_("top_k", int(self.top_k))
        top_p = _number("top_p", self.top_p)
        if not 0 < top_p <= 1:  # NaN fails too
            raise SettingsError("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        set_("top_p", top_p)
        if not isinstance(self.gradual_cfg, (bool, np.bool_)):
            raise SettingsError("gradual_cfg", f"gradual_cfg must be a bool, got {self.gradual_cfg!r}")
        set_("gradual_cfg", bool(self.gradual_cfg))
        if self.num_tokens is not None:
            if not is_int(self.num_tokens) or self.num_tokens < 1:
                raise SettingsError("num_tokens", f"num_tokens must be None or an int >= 1, got {self.num_tokens!r}")
            set_("num_tokens", int(self.num_tokens))

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0

    def kwargs(self) -> dict:
        """As keyword arguments of ``DetailFlowPipeline.generate``."""
        return asdict(self)

    def with_num_tokens(self, num_tokens: Optional[int]) -> "SamplingSettings":
        return replace(self, num_tokens=num_tokens)


SETTING_NAMES = tuple(f.name for f in fields(SamplingSettings))
DEFAULTS = SamplingSettings()


def label_list(class_labels) -> List:
    """class_labels as given (one int, a sequence, an array or tensor, any iterable, read once) -> a list."""
    if isinstance(class_labels, (torch.Tensor, np.ndarray)):
        if class_labels.ndim > 1:
            raise SettingsError("class_labels", f"class_labels must be 1-D, got shape {tuple(class_labels.shape)}")
        class_labels = class_labels.tolist()  # a 0-d one becomes a plain number
    if is_int(class_labels) or isinstance(class_labels, (float, bool, np.bool_)):
        return [class_labels]
    if isinstance(class_labels, (str, bytes)):
        raise SettingsError("class_labels", f"class_labels must be ints, got the string {class_labels!r}")
    try:
        return list(class_labels)
    except TypeError:
        raise SettingsError("class_labels", f"class_labels must be an int or a sequence of ints, got "
                                            f"{type(class_labels).__name__}") from None


def checked_labels(labels: Sequence, num_classes: int) -> List[int]:
    """A label list (``label_list``) -> ints in [0, num_classes); the type is checked before the range."""
    if not labels:
        raise SettingsError("class_labels", "class_labels is empty: give at least one class label")
    for lab in labels:
        if not is_int(lab):
            raise SettingsError("class_labels", f"class label {lab!r} is a {type(lab).__name__}: "
                                                f"class labels must be ints")
        if not 0 <= int(lab) < num_classes:
            raise SettingsError("class_labels", f"class label {lab!r} is outside [0, {num_classes}) for this model")
    return [int(x) for x in labels]


def seed_list(seed: Union[int, Sequence[int]], batch: int) -> List[int]:
    """An int seed s -> [s, s + 1, ...]; a sequence -> one int seed per image, each in int64."""
    if isinstance(seed, (torch.Tensor, np.ndarray)) and seed.ndim == 0:
        seed = seed.item()
    if is_int(seed):
        seeds = [int(seed) + i for i in range(batch)]
        if not (INT64[0] <= seeds[0] and seeds[-1] <= INT64[1]):
            raise SettingsError("seed", f"seed {int(seed)} (+ image index up to {batch - 1}) must fit in int64 "
                                        f"[{INT64[0]}, {INT64[1]}]")
        return seeds
    if isinstance(seed, (str, bytes, float, bool, np.bool_, np.floating)) or seed is None:
        raise SettingsError("seed", f"seed must be an int or a sequence of ints (one per image), got {seed!r}")
    if isinstance(seed, (torch.Tensor, np.ndarray)):
        seed = seed.tolist()
    try:
        given = list(seed)
    except TypeError:
        raise SettingsError("seed", f"seed must be an int or a sequence of ints (one per image), got "
                                    f"{type(seed).__name__}") from None
    for s in given:
        if not is_int(s):
            raise SettingsError("seed", f"seed must be an int or a sequence of ints, got {s!r} in {given!r}")
        if not INT64[0] <= int(s) <= INT64[1]:
            raise SettingsError("seed", f"seed {int(s)} does not fit in int64 [{INT64[0]}, {INT64[1]}]")
    if len(given) != batch:
        raise SettingsError("seed", f"seed is a list of {len(given)} seeds but there are {batch} class labels")
    return [int(s) for s in given]
