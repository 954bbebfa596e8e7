"""The methods users compare: what each adds to the Trainer, and which combinations make no sense."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.callbacks import BaseFinetuning
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
