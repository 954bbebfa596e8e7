"""What a run prints: one line per task, a progress bar per task, and none of the chatter a Trainer repeats each time.

The runner builds a Trainer per task (and a few more to test), so whatever Lightning says when a Trainer is made or a
fit ends comes five or ten times in a run. :func:`quiet_lightning` filters out those messages and the third-party
warnings a user of the app cannot act on, each by its text and the logger or module that emits it, so that anything
else (a new warning, an error) still shows; ``verbose=true`` turns the filters off.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

__all__ = ["TaskProgressBar", "quiet_lightning", "say"]

PREFIX = "[lightning-ewc]"

# {logger: messages it repeats for every Trainer or fit of a run}
_REPEATED_INFO = {
    # Lightning's rank_zero_info (and the library's own notes, which use it)
    "lightning.pytorch.utilities.rank_zero": (
        r"GPU available: ",  # hardware banners: the same for every Trainer of the run
        r"TPU available: ",
        r"💡 Tip: ",  # advertisements for other Lightning products
        r"`Trainer\.fit` stopped: `max_(steps|epochs)=\d+` reached\.",  # every task stops there, by design
        r"EWC: consolidated task \d+ ",  # the library's note per task; the app's task line says the same and more
    ),
    "lightning.pytorch.accelerators.cuda": (r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES: ",),  # each fit and test on GPU
}
# (message, category, module) of warnings raised inside third-party code on every fit, whatever the user configures.
_THIRD_PARTY_WARNINGS = (
    # torch deprecated LeafSpec and Lightning's own pytree helper still uses it; nothing to change on our side.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


@contextmanager
def quiet_lightning(enabled: bool = True) -> Iterator[None]:
    """Within the block, the messages and warnings listed above are dropped; ``enabled=False`` changes nothing."""
    if not enabled:
        yield
        return
    filters = [(logging.getLogger(name), _DropMessages(patterns)) for name, patterns in _REPEATED_INFO.items()]
    for logger, drop in filters:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message, category, module in _THIRD_PARTY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
            yield
    finally:
        for logger, drop in filters:
            logger.removeFilter(drop)


@rank_zero_only
def say(message: str) -> None:
    """One line of the run's own output, on stdout, from the first process only."""
    print(f"{PREFIX} {message}", flush=True)


class TaskProgressBar(ProgressBar):
    """Lightning's progress bar for one task: one bar over the task's whole training, described as the task
    (``ewc: task 2/5``) rather than by epoch, which says little when a task is a number of steps spanning epochs.

    Testing every task after each one takes a moment and gets no bar. The bar goes to stderr and is cleared when the
    task ends; the runner's line for the task takes its place.
    """

    def __init__(self, description: str) -> None:
        super().__init__()
        self.description = description
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _total_batches(self, trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and self.total_train_batches != float("inf"):
            return int(trainer.max_epochs * self.total_train_batches)
        return None

    def on_train_start(self, trainer, pl_module) -> None:
        self._bar = tqdm(
            total=self._total_batches(trainer),
            initial=trainer.global_step * trainer.accumulate_grad_batches,  # a resumed task starts where it stopped
            desc=self.description,
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
            disable=not self._enabled,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self._bar.update(1)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version number: the same for the whole run
        return metrics
