"""Learning-rate schedules as pure functions of the optimizer step.

A schedule returns a *factor* in ``[0, 1]`` that multiplies each group's base lr. Because the
factor depends on the step alone, a resumed run needs no scheduler state beyond the step.

``step`` is the index of the optimizer step about to be taken (0 for the first update).
With ``W = warmup_steps`` and ``T = max_steps``:

- warmup (every schedule): ``factor = (step + 1) / W`` for ``step < W``, so the first update
  already moves the weights and step ``W - 1`` reaches the full lr;
- ``constant``: 1 after warmup;
- ``cosine``: ``p = (step - W) / (T - W)``, ``factor = m + (1 - m) * 0.5 * (1 + cos(pi * p))``
  with ``m = min_lr_ratio``;
- ``wsd`` (warmup-stable-decay): 1 until the decay phase, which takes the last
  ``D = max(1, round(decay_fraction * T))`` steps; there ``p = (step - (T - D) + 1) / D`` and
  ``factor = 1 - (1 - m) * p``, so the last step trains at exactly ``m``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "wsd", "constant")


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup ``(step + 1) / warmup_steps`` before ``warmup_steps``, else 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


def constant_schedule(step: int, max_steps: int, warmup_steps: int = 0) -> float:
    """Warmup, then a factor of 1."""
    return warmup_factor(step, warmup_steps)


def cosine_schedule(step: int, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Warmup, then a half cosine from 1 down towards ``min_lr_ratio`` at ``max_steps``."""
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    span = max(1, max_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def wsd_decay_steps(max_steps: int, decay_fraction: float) -> int:
    """Length of the WSD decay phase: ``max(1, round(decay_fraction * max_steps))``."""
    return max(1, round(decay_fraction * max_steps))


def wsd_schedule(
    step: int, max_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2, min_lr_ratio: float = 0.0
) -> float:
    """Warmup, a stable phase at 1, then a linear decay to ``min_lr_ratio`` over the last steps.

    The stable phase lets one run be branched into decays at several lengths (the WSD idea);
    the decay reaches ``min_lr_ratio`` exactly on the last step ``max_steps - 1``.
    """
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps)
    decay = wsd_decay_steps(max_steps, decay_fraction)
    start = max_steps - decay
    if step < start:
        return 1.0
    p = min(1.0, (step - start + 1) / decay)
    return 1.0 - (1.0 - min_lr_ratio) * p


def make_schedule(
    name: str, max_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """The schedule ``name`` (``cosine``, ``wsd`` or ``constant``) as ``step -> factor``."""
    if name == "cosine":
        return lambda step: cosine_schedule(step, max_steps, warmup_steps, min_lr_ratio)
    if name == "wsd":
        return lambda step: wsd_schedule(step, max_steps, warmup_steps, decay_fraction, min_lr_ratio)
    if name == "constant":
        return lambda step: constant_schedule(step, max_steps, warmup_steps)
    raise ValueError(f"unknown lr schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
