"""Consolidated EWC state: one quadratic per parameter, whatever the number of tasks.

``separate`` (Kirkpatrick et al. 2017) keeps a spring per earlier task: Σ_t F_t (θ − θ*_t)². A sum of quadratics
around different centres is one quadratic around their importance-weighted centre plus a constant:

    F_a (θ − a)² + F_b (θ − b)² = (F_a + F_b) (θ − c)² + F_a F_b / (F_a + F_b) · (a − b)²,
    c = a + F_b / (F_a + F_b) · (b − a)

so the state is two parameter-sized tensors (total importance, centre) and one scalar, updated incrementally like
Welford's running mean (no Σ F θ² that would cancel catastrophically). Where the total importance is zero the centre
is irrelevant; it is set to the latest anchor.

``online`` (Schwarz et al. 2018): F̃ ← γ F̃ + F_t, anchored at the latest θ*_t, no constant.

The penalty is (λ/2) (Σ_i F_i (θ_i − c_i)² + const), computed with one fused pass over all parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MODES = ("separate", "online")


def merge_separate(
    importance: Tensor, centre: Tensor, new_importance: Tensor, new_anchor: Tensor
) -> tuple[Tensor, Tensor, float]:
    """Adds the quadratic ``F_new (θ − θ_new)²`` to ``F (θ − c)²``; returns (F', c', constant added)."""
    f_old, c_old = importance.double(), centre.double()
    f_new, anchor = new_importance.double(), new_anchor.double()
    total = f_old + f_new
    delta = anchor - c_old
    positive = total > 0
    safe_total = torch.where(positive, total, torch.ones_like(total))
    weight_new = torch.where(positive, f_new / safe_total, torch.ones_like(total))
    merged_centre = c_old + weight_new * delta
    added = torch.where(positive, f_old * f_new / safe_total * delta.square(), torch.zeros_like(total)).sum()
    return total.to(importance.dtype), merged_centre.to(centre.dtype), float(added)


def merge_online(importance: Tensor, new_importance: Tensor, new_anchor: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """F̃' = γ F̃ + F_new, anchored at the newest weights."""
    return gamma * importance + new_importance, new_anchor.clone()


@dataclass
class ConsolidatedState:
    """Importance and centre per parameter name, the constant, and how many tasks were consolidated.

    Parameters first consolidated at task k (e.g. a new head) simply enter with no earlier springs.
    """

    mode: str = "separate"
    gamma: float = 1.0
    importance: dict[str, Tensor] = field(default_factory=dict)
    centre: dict[str, Tensor] = field(default_factory=dict)
    constant: float = 0.0
    num_tasks: int = 0

    def __post_init__(self) -> None:
        check_mode(self.mode, self.gamma)

    def consolidate(self, importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> None:
        """Adds one task: its importance and its weights at the end of the task (same keys)."""
        for name, f_new in importance.items():
            theta = anchor[name].detach()
            f_new = f_new.detach().to(device=theta.device, dtype=theta.dtype)
            if name in self.importance and self.importance[name].shape != theta.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(theta.shape)} but was consolidated with shape "
                    f"{tuple(self.importance[name].shape)}; EWC cannot anchor a resized parameter. Give new classes a "
                    f"new parameter (e.g. a new head module), or leave it out with exclude=[{name!r}]"
                )
            if name not in self.importance:
                self.importance[name], self.centre[name] = f_new.clone(), theta.clone()
                continue
            f_old = self.importance[name].to(theta.device)
            c_old = self.centre[name].to(theta.device)
            if self.mode == "separate":
                self.importance[name], self.centre[name], added = merge_separate(f_old, c_old, f_new, theta)
                self.constant += added
            else:
                self.importance[name], self.centre[name] = merge_online(f_old, f_new, theta, self.gamma)
        self.num_tasks += 1

    def to_(self, device: torch.device) -> None:
        for d in (self.importance, self.centre):
            for name in d:
                d[name] = d[name].to(device)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.importance, self.centre) for t in d.values())

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "gamma": self.gamma,
            "importance": dict(self.importance),
            "centre": dict(self.centre),
            "constant": self.constant,
            "num_tasks": self.num_tasks,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ConsolidatedState:
        return cls(
            mode=state["mode"],
            gamma=state["gamma"],
            importance=dict(state["importance"]),
            centre=dict(state["centre"]),
            constant=float(state["constant"]),
            num_tasks=int(state["num_tasks"]),
        )


def check_mode(mode: str, gamma: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'separate' (one spring per task) or 'online' (decayed sum)")
    if not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must be in (0, 1] (the decay of older tasks' importance in online mode); got {gamma}")


class _FusedQuadratic(torch.autograd.Function):
    """Σ_i F_i (θ_i − c_i)² over a list of tensors in a few fused ``torch._foreach_*`` kernels.

    Written by hand because autograd through the foreach ops would save every intermediate; here only F·(θ − c) is
    kept, and the backward is one fused multiply.
    """

    @staticmethod
    def forward(ctx, importances: Sequence[Tensor], centres: Sequence[Tensor], *params: Tensor) -> Tensor:
        diffs = torch._foreach_sub(params, centres)
        weighted = torch._foreach_mul(diffs, importances)
        torch._foreach_mul_(diffs, weighted)  # F (θ − c)², non-negative, so its L1 norm is its sum
        total = torch.stack(torch._foreach_norm(diffs, 1)).sum()
        ctx.weighted = weighted
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grads = torch._foreach_mul(ctx.weighted, 2 * grad_output)
        return (None, None, *grads)


def quadratic_penalty(importances: Sequence[Tensor], centres: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Σ_i F_i (θ_i − c_i)² as a differentiable scalar (float32)."""
    if not params:
        return torch.zeros(())
    return _FusedQuadratic.apply(importances, centres, *params)
