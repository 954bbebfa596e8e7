"""Importance measures other than the Fisher, on the same storage and penalty.

* ``l2``: uniform importance (all ones): plain L2 to the previous weights, the contrast drawn in the EWC paper.
* ``mas``: Aljundi et al. 2018, E_x |∂ ||z(x)||² / ∂θ| per sample (computed in :mod:`lightning_ewc.fisher`).
* ``si``: Zenke et al. 2017, the path integral below, accumulated while the task trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lightning_ewc.consolidation import at_least_float32, require_keys

IMPORTANCES = ("fisher", "l2", "mas", "si")


def uniform_importance(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: torch.ones_like(p, dtype=torch.float32).detach() for name, p in params.items()}


class PathIntegral:
    """Synaptic Intelligence's per-parameter contribution to the decrease of the loss (Zenke et al. 2017).

    Over the optimizer steps of a task, ω_i = Σ_steps −g_i Δθ_i, with g the gradient the optimizer used (after
    unscaling and clipping) and Δθ the step's update. At the end of the task

        Ω_i = max(0, ω_i / ((θ_i^end − θ_i^start)² + ξ))

    with the damping ξ. Negative ω (a parameter that moved against its gradient, e.g. through momentum) is clamped
    to zero importance, since a negative spring would push weights away from the anchor.

    Each step is measured by the optimizer's own step hooks (:meth:`watch`): the weights before it, and after it the
    update and the gradient it used. So a step that is never taken (fp16 loss scaling skips steps whose gradients
    overflow) adds nothing, and manual optimization is measured wherever ``zero_grad`` comes, with accumulation too.

    Memory: three parameter-sized tensors while a task trains (start, ω, the weights before the current step), all
    float32 but the last, which keeps the parameters' own dtype (a copy, so exact).
    """

    def __init__(self, damping: float = 0.1) -> None:
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(
                f"SI's damping ξ must be a finite number > 0 (it keeps Ω finite for parameters that did not move); "
                f"got {damping!r}"
            )
        self.damping = float(damping)
        self.start: dict[str, Tensor] = {}
        self.omega: dict[str, Tensor] = {}
        self._before_step: dict[int, dict[str, Tensor]] = {}  # id(optimizer) -> weights before its current step
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self.start)

    def begin_task(self, params: dict[str, Tensor]) -> None:
        self.start = {name: p.detach().float().clone() for name, p in params.items()}
        self.omega = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self._before_step = {}

    # -- the optimizer's step hooks ------------------------------------------------------------------------------------
    def watch(self, optimizers: Iterable[torch.optim.Optimizer], params: Callable[[], dict[str, Tensor]]) -> None:
        """Brackets every step of ``optimizers`` (until :meth:`unwatch`); ``params()`` gives the parameters to track."""
        self.unwatch()
        for optimizer in optimizers:
            self._handles.append(optimizer.register_step_pre_hook(lambda opt, *_: self.before_step(opt, params())))
            self._handles.append(optimizer.register_step_post_hook(lambda opt, *_: self.after_step(opt, params())))

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._before_step = [], {}

    def before_step(self, optimizer: torch.optim.Optimizer, params: dict[str, Tensor]) -> None:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        names = [n for n, p in params.items() if n in self.omega and id(p) in owned]
        copies = torch._foreach_mul([params[n].detach() for n in names], 1.0) if names else []
        self._before_step[id(optimizer)] = dict(zip(names, copies))

    def after_step(self, optimizer: torch.optim.Optimizer, params: dict[str, Tensor]) -> None:
        before = self._before_step.pop(id(optimizer), {})
        # .grad is what this step used: the optimizer reads it and nothing zeroes it between the step and this hook
        names = [n for n in before if params[n].grad is not None]
        if not names:
            return
        after = at_least_float32([params[n].detach() for n in names])
        moved = torch._foreach_sub(after, at_least_float32([before[n] for n in names]))
        torch._foreach_mul_(moved, at_least_float32([params[n].grad for n in names]))
        torch._foreach_sub_([self.omega[n] for n in names], moved)

    # -- the task's importance -----------------------------------------------------------------------------------------
    def importance(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for name, p in params.items():
            if name not in self.omega:
                out[name] = torch.zeros_like(p, dtype=torch.float32)
                continue
            travelled = (p.detach().float() - self.start[name]).square()
            out[name] = (self.omega[name] / (travelled + self.damping)).clamp_min(0)
        return out

    def end_task(self) -> None:
        self.start, self.omega, self._before_step = {}, {}, {}

    def state_dict(self) -> dict:
        return {"damping": self.damping, "start": dict(self.start), "omega": dict(self.omega)}

    def load_state_dict(self, state: dict) -> None:
        require_keys(state, ("damping", "start", "omega"), "SI's path integral")
        unpaired = sorted(set(state["start"]) ^ set(state["omega"]))
        if unpaired:
            raise ValueError(f"SI's path integral in the checkpoint is incomplete: {unpaired} lack a start or an ω")
        self.damping = float(state["damping"])
        self.start = {name: t.float() for name, t in state["start"].items()}
        self.omega = {name: t.float() for name, t in state["omega"].items()}
        self._before_step = {}

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.start, self.omega) for t in d.values())
