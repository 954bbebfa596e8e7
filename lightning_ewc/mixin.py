"""``EWCMixin``: adds the consolidated penalty to a LightningModule's training loss."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_ewc._lightning import LightningModule, rank_zero_warn
from lightning_ewc.fisher import default_inputs, default_targets


class EWCMixin:
    """Mix into a ``LightningModule`` (``class Net(EWCMixin, LightningModule)``); ``training_step`` stays as it is.

    With automatic optimization, the loss your ``training_step`` returns (a tensor, or a dict with ``"loss"``) gets
    the penalty of the Trainer's :class:`~lightning_ewc.EWCCallback` added, so gradient accumulation, AMP loss
    scaling and clipping treat it exactly like the task loss; ``ewc/penalty`` is logged at the Trainer's
    ``log_every_n_steps`` cadence (``log_every_n_steps=1`` for every step).

    With manual optimization (``self.automatic_optimization = False``) nothing is added behind your back: add
    ``self.ewc_penalty()`` to the loss you pass to ``self.manual_backward``. With
    ``EWCCallback(penalty_via="gradient")`` the loss is left alone in either case: the callback adds the penalty's
    gradient before each optimizer step, and ``ewc_penalty()`` is a value to log, without a graph.

    Override :meth:`ewc_logits` for multi-head / task-incremental models so that the importance pass takes the
    log-likelihood over the current task's head, and :meth:`ewc_targets` if labels are not ``batch[1]``.
    """

    #: Say once when the Trainer has no EWCCallback. Apps that train without one on purpose (baselines) set False.
    ewc_warn_without_callback: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Through the MRO, so that `class Net(EWCMixin, ExistingModule): pass` wraps the inherited step too. Never
        # Lightning's own default: wrapping it would make Lightning believe training_step is implemented.
        step = getattr(cls, "training_step", None)
        if (
            step is not None
            and step is not getattr(LightningModule, "training_step", None)
            and not getattr(step, "_adds_ewc_penalty", False)
        ):
            cls.training_step = _adding_penalty(step)

    # -- user overrides -----------------------------------------------------------------------------------------------
    def ewc_logits(self, batch: Any) -> Tensor:
        """Logits ``[batch, classes]`` for the importance pass, or ``[batch, positions, classes]`` for per-position
        outputs (a tagger, a causal LM under teacher forcing). Default: ``self(x)`` on the batch's inputs.

        Multi-head models return the head of the task being consolidated, e.g.
        ``return self(batch[0])[:, self.current_task_classes]`` or ``self.heads[self.task_id](self.trunk(x))``.
        A Hugging Face causal LM returns ``self.model(input_ids=..., attention_mask=...).logits``.
        """
        return self(default_inputs(batch))

    def ewc_targets(self, batch: Any) -> Tensor:
        """True labels (class indices into :meth:`ewc_logits`), shaped like the logits without their class dimension,
        -100 where a position is to be left out (padding, a prompt); the ``empirical``/``batched`` estimators read
        them, the others only their -100 mask of per-position outputs."""
        return default_targets(batch)

    # -- penalty ------------------------------------------------------------------------------------------------------
    def ewc_penalty(self) -> Tensor:
        """The EWC penalty for the current weights (a differentiable scalar; zero before the first consolidation)."""
        callback = self._ewc_callback()
        if callback is None:
            return torch.zeros((), device=self.device)
        return callback.penalty(self)

    def _ewc_callback(self):
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return None
        # By a marker rather than isinstance: the callback imports this module, and this one need not import it.
        found = next((cb for cb in trainer.callbacks if getattr(cb, "provides_ewc_penalty", False)), None)
        if found is None and self.ewc_warn_without_callback and not self.__dict__.get("_ewc_warned"):
            self.__dict__["_ewc_warned"] = True
            rank_zero_warn(
                f"{type(self).__name__} inherits EWCMixin but the Trainer has no EWCCallback: training without the EWC "
                "penalty. Add `callbacks=[EWCCallback(...)]` to the Trainer to consolidate tasks."
            )
        return found

    def _ewc_log(self, callback, penalty: Tensor) -> None:
        # With sharded parameters each rank holds its part of the penalty: the logged value is their sum.
        sharded = callback.sharded(self)
        self.log("ewc/penalty", penalty, on_step=True, on_epoch=False, sync_dist=sharded, reduce_fx="sum")

    def _ewc_add_to(self, output: Any) -> Any:
        if output is None or not self.automatic_optimization:
            return output
        callback = self._ewc_callback()
        if callback is None:
            return output
        logs = self.trainer.training and _logs_this_step(self.trainer)  # not for training_step called by hand
        if callback.penalty_via == "gradient":  # the callback adds the gradient before the optimizer step
            if logs:
                self._ewc_log(callback, callback.penalty(self))
            return output
        penalty = callback.penalty(self)
        if logs:
            self._ewc_log(callback, penalty.detach())
        if isinstance(output, Tensor):
            return output + penalty
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + penalty}
        raise TypeError(
            f"EWCMixin adds the penalty to the loss returned by training_step, which must be a tensor or a dict with "
            f"'loss'; got {type(output).__name__}"
        )


def _logs_this_step(trainer) -> bool:
    """Whether Lightning writes step metrics to the loggers after this step (every ``log_every_n_steps``).

    An ``on_step`` value logged between two logging steps is dropped anyway, and ``self.log`` is not free, so the
    penalty is logged only when it will be written. Lightning's own test (on its logger connector, not public) counts
    the optimizer steps of the fit, which with automatic optimization, the only case that reaches here, is
    ``global_step``; the ``+ 1`` because the step being taken is not counted yet.
    """
    return (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0 or trainer.should_stop


def _adding_penalty(step):
    @functools.wraps(step)
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_ewc_in_step"):  # an overriding subclass calling super().training_step()
            return step(self, *args, **kwargs)
        self.__dict__["_ewc_in_step"] = True
        try:
            output = step(self, *args, **kwargs)
        finally:
            self.__dict__["_ewc_in_step"] = False
        return self._ewc_add_to(output)

    training_step._adds_ewc_penalty = True
    return training_step
