"""The methods users compare: what each adds to the Trainer, and which combinations make no sense."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn

METHODS = ("finetune", "freeze", "l2", "ewc", "online_ewc", "si", "mas", "joint")


class FreezeAfterFirstTask(BaseFinetuning):
    """Transfer learning: from the second task on, the named modules (default the shared backbone) are frozen and
    only the rest (the heads) trains. Lightning's ``BaseFinetuning`` does the freezing and keeps it out of the
    optimizer's way."""

    def __init__(self, modules: Sequence[str] = ("backbone",), train_bn: bool = False) -> None:
        super().__init__()
        self.module_names = list(modules)
        self.train_bn = train_bn

    def _modules(self, pl_module) -> list[nn.Module]:
        found = []
        for name in self.module_names:
            try:
                found.append(pl_module.get_submodule(name))
            except AttributeError as err:
                names = [n for n, _ in pl_module.named_children()]
                raise ValueError(f"method.freeze: no module {name!r} to freeze; the model has {names}") from err
        return found

    def freeze_before_training(self, pl_module) -> None:
        if getattr(pl_module, "task", 0) >= 1:
            self.freeze(self._modules(pl_module), train_bn=self.train_bn)

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        """Nothing is unfrozen later: the frozen trunk stays as the first task left it."""


class CarryOptimizerState(Callback):
    """Keeps the optimizer's state (Adam's moment estimates and step count) from one task's fit to the next.

    The runner gives every task a fresh Trainer, and so a fresh optimizer; published code often keeps one optimizer
    for the whole stream instead (van de Ven's does). With Adam that matters: the second-moment estimate of a
    converged task is small, so the first steps of the next task can be up to 1/sqrt(1 − β₂)·(1 − β₁) ≈ 3× the
    learning rate. Set ``train.keep_optimizer_state=true`` to train that way. Lightning has no option for this
    (its optimizer state belongs to one fit), hence this callback.
    """

    def __init__(self) -> None:
        self._states: list[dict] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # global_step > 0: a fit resumed mid-task, whose checkpoint already restored the optimizer
        if self._states is None or trainer.global_step > 0:
            return
        for optimizer, state in zip(trainer.optimizers, self._states):
            try:
                optimizer.load_state_dict(state)
            except ValueError as err:
                raise ValueError(
                    "train.keep_optimizer_state: the optimizer of this task has other parameter groups than the "
                    f"previous task's ({err}); methods that change them between tasks (e.g. method=freeze) need "
                    "train.keep_optimizer_state=false"
                ) from err

    def on_train_end(self, trainer, pl_module) -> None:
        self._states = [copy.deepcopy(optimizer.state_dict()) for optimizer in trainer.optimizers]

    def state_dict(self) -> dict:
        return {"optimizer_states": self._states}

    def load_state_dict(self, state_dict: dict) -> None:
        self._states = state_dict["optimizer_states"]
