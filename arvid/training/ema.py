"""Exponential moving average of a module's weights, kept in float32.

The shadow is float32 even when the model trains in bf16: with a decay of 0.9999 the update
``(1 - decay) * param`` is below bf16's resolution and would be rounded away.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


class EMA:
    """Float32 shadow weights: ``shadow = decay * shadow + (1 - decay) * param`` after each step.

    Floating-point parameters and buffers that require no grad (e.g. BatchNorm running stats,
    integer counters) are copied rather than averaged, so the EMA model is usable as is.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32).clone() for name, p in module.named_parameters() if p.requires_grad
        }
        self.copied: dict[str, torch.Tensor] = {
            name: t.detach().clone() for name, t in module.state_dict().items() if name not in self.shadow
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the current weights of ``module`` (the one given at construction) into the shadow."""
        params = dict(module.named_parameters())
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [params[n].detach().to(torch.float32) for n in names]
        if shadow:
            # shadow <- decay * shadow + (1 - decay) * current, in one fused call per device
            torch._foreach_lerp_(shadow, current, 1.0 - self.decay)
        state = module.state_dict()
        for name, t in self.copied.items():
            t.copy_(state[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Averaged parameters (float32) and copied buffers, under the module's state-dict names."""
        return {**self.shadow, **self.copied}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "<ema state>") -> None:
        """Restore from :meth:`state_dict`; keys and shapes must match exactly."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or shape:
            raise ValueError(
                f"EMA state in {source!r} does not fit the model: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}, shape mismatch {shape[:8]}"
            )
        with torch.no_grad():
            for k, t in own.items():
                t.copy_(state[k])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the EMA weights into ``module`` (cast to each parameter's dtype)."""
        own = module.state_dict()
        for k, t in self.state_dict().items():
            own[k].copy_(t)

    def averaged_model(self, module: nn.Module) -> nn.Module:
        """A deep copy of ``module`` holding the EMA weights, in eval mode; ``module`` is untouched."""
        out = copy.deepcopy(module)
        self.copy_to(out)
        return out.eval()
