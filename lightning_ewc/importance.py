"""Importance measures other than the Fisher, on the same storage and penalty.

* ``l2``: uniform importance (all ones): plain L2 to the previous weights, the contrast drawn in the EWC paper.
* ``mas``: Aljundi et al. 2018, E_x |∂ ||z(x)||² / ∂θ| per sample (computed in :mod:`lightning_ewc.fisher`).
* ``si``: Zenke et al. 2017, the path integral below, accumulated while the task trains.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPORTANCES = ("fisher", "l2", "mas", "si")


def uniform_importance(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: torch.ones_like(p, dtype=p.dtype).detach() for name, p in params.items()}


class PathIntegral:
    """Synaptic Intelligence's per-parameter contribution to the decrease of the loss (Zenke et al. 2017).

    Over the optimizer steps of a task, ω_i = Σ_steps −g_i Δθ_i, with g the gradient the optimizer used (after
    unscaling and clipping) and Δθ the step's update. At the end of the task

        Ω_i = max(0, ω_i / ((θ_i^end − θ_i^start)² + ξ))

    with the damping ξ. Negative ω (a parameter that moved against its gradient, e.g. through momentum) is clamped
    to zero importance, since a negative spring would push weights away from the anchor.

    Memory: three parameter-sized tensors while a task trains (start, ω, the weights before the current step).
    """

    def __init__(self, damping: float = 0.1) -> None:
        if not damping > 0:
            raise ValueError(f"SI's damping ξ must be > 0 (it keeps Ω finite for parameters that did not move); got {damping}")
        self.damping = damping
        self.start: dict[str, Tensor] = {}
        self.omega: dict[str, Tensor] = {}
        self._before_step: dict[str, Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.start)

    def begin_task(self, params: dict[str, Tensor]) -> None:
        self.start = {name: p.detach().clone() for name, p in params.items()}
        self.omega = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self._before_step = {}

    def before_step(self, params: dict[str, Tensor]) -> None:
        names = [n for n in params if n in self.omega]
        copies = torch._foreach_mul([params[n].detach() for n in names], 1.0)
        self._before_step = dict(zip(names, copies))

    def after_step(self, params: dict[str, Tensor]) -> None:
        names = [n for n in self._before_step if params[n].grad is not None]
        if names:
            moved = torch._foreach_sub([params[n].detach() for n in names], [self._before_step[n] for n in names])
            torch._foreach_mul_(moved, [params[n].grad for n in names])
            torch._foreach_sub_([self.omega[n] for n in names], [m.float() for m in moved])
        self._before_step = {}

    def importance(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, p in params.items():
            if name not in self.omega:
                out[name] = torch.zeros_like(p, dtype=torch.float32)
                continue
            travelled = (p.detach().float() - self.start[name].float()).square()
            out[name] = (self.omega[name] / (travelled + self.damping)).clamp_min(0)
        return out

    def end_task(self) -> None:
        self.start, self.omega, self._before_step = {}, {}, {}

    def state_dict(self) -> dict:
        return {"damping": self.damping, "start": dict(self.start), "omega": dict(self.omega)}

    def load_state_dict(self, state: dict) -> None:
        self.damping = state["damping"]
        self.start, self.omega, self._before_step = dict(state["start"]), dict(state["omega"]), {}

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.start, self.omega) for t in d.values())
