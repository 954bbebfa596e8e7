"""Consolidated EWC state: one quadratic per parameter, whatever the number of tasks.

``separate`` (Kirkpatrick et al. 2017) keeps a spring per earlier task: Σ_t F_t (θ − θ*_t)². A sum of quadratics
around different centres is one quadratic around their importance-weighted centre plus a constant:

    F_a (θ − a)² + F_b (θ − b)² = (F_a + F_b) (θ − c)² + F_a F_b / (F_a + F_b) · (a − b)²,
    c = a + F_b / (F_a + F_b) · (b − a)

so the state is two parameter-sized tensors (total importance, centre) and one scalar, updated incrementally like
Welford's running mean (no Σ F θ² that would cancel catastrophically). Where the total importance is zero the centre
is irrelevant; it is set to the latest anchor.

The state is float32 whatever the parameters' dtype: an importance of 1e-9 is 0 in float16, and a bfloat16 centre
would round each anchor to 3 significant digits. The penalty is computed in float32 as well (float64 parameters keep
float64 arithmetic); only its gradient is cast to the parameters' dtype. Merges run in float64 on the CPU and in
float32 elsewhere, since not every accelerator has float64 (MPS has none).

``online`` (Schwarz et al. 2018): F̃ ← γ F̃ + F_t, anchored at the latest θ*_t, no constant.

The penalty is (λ/2) (Σ_i F_i (θ_i − c_i)² + const), computed with one fused pass over all parameters; or, applied
to the gradients instead of the loss, its gradient λ F ⊙ (θ − c) is added to ``.grad`` by two fused kernels, for
which the state holds F instead of √F.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_ewc.per_sample import finite_or_raise

MODES = ("separate", "online")


def merge_separate(
    importance: Tensor, centre: Tensor, new_importance: Tensor, new_anchor: Tensor
) -> tuple[Tensor, Tensor, float]:
    """Adds the quadratic ``F_new (θ − θ_new)²`` to ``F (θ − c)²``; returns (F', c', constant added)."""
    wide = merge_dtype(importance.device)
    f_old, c_old = importance.to(wide), centre.to(wide)
    f_new, anchor = new_importance.to(wide), new_anchor.to(wide)
    total = f_old + f_new
    delta = anchor - c_old
    positive = total > 0
    safe_total = torch.where(positive, total, torch.ones_like(total))
    weight_new = torch.where(positive, f_new / safe_total, torch.ones_like(total))
    merged_centre = c_old + weight_new * delta
    added = torch.where(positive, f_old * f_new / safe_total * delta.square(), torch.zeros_like(total)).sum()
    return total.to(importance.dtype), merged_centre.to(centre.dtype), float(added)


def merge_dtype(device: torch.device) -> torch.dtype:
    """float64 where it is cheap and everywhere available (the CPU), float32 on accelerators (MPS has no float64)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def merge_online(importance: Tensor, new_importance: Tensor, new_anchor: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """F̃' = γ F̃ + F_new, anchored at the newest weights."""
    return gamma * importance + new_importance, new_anchor.clone()


@dataclass
class ConsolidatedState:
    """Importance and centre per parameter name, the constant, and how many tasks were consolidated.

    The importance is held as its square root √F: the penalty is then ‖√F ⊙ (θ − c)‖² and its gradient
    2 √F ⊙ (√F ⊙ (θ − c)), which takes one temporary per step instead of two (parameter-sized temporaries are fresh
    pages on CPU, and page faults dominated the penalty's cost). ``importance`` gives F itself.

    With ``squared=True`` the importance is held as F itself (``fisher``; ``root_importance`` is then empty), what
    the gradient-side penalty reads (see :func:`add_penalty_gradient`).

    Parameters first consolidated at task k (e.g. a new head) simply enter with no earlier springs.
    """

    mode: str = "separate"
    gamma: float = 1.0
    root_importance: dict[str, Tensor] = field(default_factory=dict)
    centre: dict[str, Tensor] = field(default_factory=dict)
    constant: float = 0.0
    num_tasks: int = 0
    squared: bool = False
    fisher: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_mode(self.mode, self.gamma)
        wanted, self.squared = self.squared, False
        self.hold_squared(wanted)

    @property
    def importance(self) -> dict[str, Tensor]:
        """F per parameter name."""
        if self.squared:
            return dict(self.fisher)
        return {name: root.square() for name, root in self.root_importance.items()}

    def hold_squared(self, squared: bool) -> None:
        """Hold F (for the gradient-side penalty) or √F (for the loss-side one)."""
        if squared == self.squared:
            return
        source, target = (self.root_importance, self.fisher) if squared else (self.fisher, self.root_importance)
        for name in list(source):
            value = source.pop(name)
            target[name] = value.square() if squared else value.sqrt()
        self.squared = squared

    def consolidate(
        self, importance: dict[str, Tensor], anchor: dict[str, Tensor], what: str = "the importance"
    ) -> dict[str, float]:
        """Adds one task: its importance and its weights at the end of the task (same keys). Returns what each
        parameter added to the constant (``separate`` mode), so that a caller holding shards can sum them over ranks.

        Non-finite values in either are refused before anything changes (``what`` names the importance in the
        message), so a failed task leaves the state as it was."""
        missing = sorted(set(importance) ^ set(anchor))
        if missing:
            raise KeyError(f"importance and anchor must name the same parameters; only one of them has {missing}")
        finite_or_raise(importance, what)
        finite_or_raise(anchor, "the weights to anchor at")
        squared = self.squared
        self.hold_squared(False)  # the merges below read √F; the switch costs once per task
        try:
            return self._consolidate(importance, anchor)
        finally:
            self.hold_squared(squared)

    def _consolidate(self, importance: dict[str, Tensor], anchor: dict[str, Tensor]) -> dict[str, float]:
        added_by_name = {}
        for name, f_new in importance.items():
            theta = anchor[name].detach().float()
            f_new = f_new.detach().to(device=theta.device, dtype=torch.float32)
            if name in self.root_importance and self.root_importance[name].shape != theta.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(theta.shape)} but was consolidated with shape "
                    f"{tuple(self.root_importance[name].shape)}; EWC cannot anchor a resized parameter. Give new classes "
                    f"a new parameter (e.g. a new head module), or leave it out with exclude=[{name!r}]"
                )
            if name not in self.root_importance:
                self.root_importance[name], self.centre[name] = f_new.sqrt(), theta.clone()
                continue
            f_old = self.root_importance[name].to(theta.device).square()
            c_old = self.centre[name].to(theta.device)
            if self.mode == "separate":
                total, self.centre[name], added = merge_separate(f_old, c_old, f_new, theta)
                self.constant += added
                added_by_name[name] = added
            else:
                total, self.centre[name] = merge_online(f_old, f_new, theta, self.gamma)
            self.root_importance[name] = total.sqrt()
        self.num_tasks += 1
        return added_by_name

    def num_bytes(self) -> int:
        held = (self.root_importance, self.fisher, self.centre)
        return sum(t.numel() * t.element_size() for d in held for t in d.values())

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "gamma": self.gamma,
            "importance": self.importance,  # F itself in checkpoints: what users and other tools expect to read
            "centre": dict(self.centre),
            "constant": self.constant,
            "num_tasks": self.num_tasks,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ConsolidatedState:
        """The state saved by :meth:`state_dict`; one with missing entries, or an importance without its centre (or
        the other way round, or of another shape), is refused with a message naming what is wrong."""
        require_keys(state, ("mode", "gamma", "importance", "centre", "constant", "num_tasks"), "the EWC state")
        importance, centre = state["importance"], state["centre"]
        unpaired = sorted(set(importance) ^ set(centre))
        if unpaired:
            raise ValueError(
                f"the EWC state in the checkpoint is incomplete: {unpaired} have an importance but no centre, or a "
                "centre but no importance; the checkpoint was edited or written by something else: resume from "
                "another checkpoint, or start this callback afresh"
            )
        for name, f in importance.items():
            if f.shape != centre[name].shape:
                raise ValueError(
                    f"the EWC state in the checkpoint is inconsistent: {name!r} has importance of shape "
                    f"{tuple(f.shape)} but centre of shape {tuple(centre[name].shape)}"
                )
        return cls(
            mode=state["mode"],
            gamma=state["gamma"],
            root_importance={name: f.float().sqrt() for name, f in importance.items()},
            centre={name: c.float() for name, c in centre.items()},
            constant=float(state["constant"]),
            num_tasks=int(state["num_tasks"]),
        )


def require_keys(state: Any, keys: Sequence[str], what: str) -> None:
    """Refuses a saved state that is not a mapping holding ``keys``, naming the missing ones."""
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} in the checkpoint must be a dict, got {type(state).__name__}")
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(
            f"{what} in the checkpoint lacks {missing} (it has {sorted(state)}); it was written by another version "
            "or edited: resume from another checkpoint, or start afresh"
        )


def check_mode(mode: str, gamma: float) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'separate' (one spring per task) or 'online' (decayed sum)")
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(
            f"gamma must be in [0, 1] (the decay of older tasks' importance in online mode; 0 keeps only the latest "
            f"task's); got {gamma}"
        )


class _FusedQuadratic(torch.autograd.Function):
    """Σ_i F_i (θ_i − c_i)² = ‖√F ⊙ (θ − c)‖² over a list of tensors in a few fused ``torch._foreach_*`` kernels, in
    float32 for half-precision parameters (the gradient is cast back to their dtype by autograd).

    Written by hand because autograd through the foreach ops would keep every intermediate; here one temporary
    e = √F ⊙ (θ − c) serves the value and then becomes the gradient 2 √F ⊙ e in place (a fresh parameter-sized
    tensor costs page faults on CPU, so the backward allocates none). Under ``create_graph=True`` (a Hessian-vector
    product, a gradient penalty) the backward is built from differentiable operations instead, so that second
    derivatives (2 F on the diagonal) are right rather than silently zero.
    """

    @staticmethod
    def forward(ctx, roots: Sequence[Tensor], centres: Sequence[Tensor], *params: Tensor) -> Tensor:
        scaled = torch._foreach_sub(at_least_float32(params), centres)
        torch._foreach_mul_(scaled, roots)
        ctx.scaled, ctx.roots, ctx.centres = scaled, roots, centres
        ctx.save_for_backward(*params)
        return torch.stack(torch._foreach_norm(scaled, 2)).square().sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        params = ctx.saved_tensors  # unpacking checks that no parameter changed in place since the forward
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            grads = [
                2 * grad_output * r.square() * (p - c)
                for p, r, c in zip(at_least_float32(params), ctx.roots, ctx.centres)
            ]
            return (None, None, *grads)
        grads, ctx.scaled = ctx.scaled, None
        if grads is None:  # a second backward through a retained graph: e was used up by the first
            grads = torch._foreach_sub(at_least_float32(params), ctx.centres)
            torch._foreach_mul_(grads, ctx.roots)
        torch._foreach_mul_(grads, ctx.roots)
        torch._foreach_mul_(grads, 2 * grad_output)
        return (None, None, *grads)


def at_least_float32(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Half-precision tensors in float32, the others as they are (no copy): the penalty's arithmetic dtype."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def quadratic_penalty(roots: Sequence[Tensor], centres: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """Σ_i F_i (θ_i − c_i)² as a differentiable scalar, given √F (``roots``) and the centres."""
    if not params:
        return torch.zeros(())
    return _FusedQuadratic.apply(roots, centres, *params)


def add_penalty_gradient(
    grads: Sequence[Tensor], params: Sequence[Tensor], fisher: Sequence[Tensor], centres: Sequence[Tensor],
    ewc_lambda: float,
) -> None:
    """grad += ∂/∂θ (λ/2) Σ F (θ − c)² = λ F ⊙ (θ − c), in place: one temporary, two fused kernels.

    Written by hand because it is the point: autograd through the penalty reads and writes each parameter-sized
    tensor about twice as often. θ − c is formed first so that the gradient is exactly zero at the anchor (with
    F θ − F c it would be rounding noise, which Adam divides by its tiny second moment and turns into steps).
    """
    if grads:
        difference = torch._foreach_sub(at_least_float32(params), centres)
        torch._foreach_addcmul_(grads, difference, fisher, value=ewc_lambda)


def penalty_from_squared(params: Sequence[Tensor], fisher: Sequence[Tensor], centres: Sequence[Tensor]) -> Tensor:
    """Σ F (θ − c)² from F itself, without a graph (the value to log when the gradient is applied directly)."""
    with torch.no_grad():
        return sum(((p - c).square() * f).sum() for p, f, c in zip(params, fisher, centres))
