"""Run by tests/test_distributed.py in a subprocess: on 2 CPU ranks, the importance data of one rank holds a NaN (or a
label out of range), so that rank's estimation raises before the all-reduce; every rank must raise that error.

Usage: ``python tests/ddp_failure_script.py OUT_DIR``. Each rank writes ``OUT_DIR/failure_rank{global_rank}.txt``
with one line per case: the case, the exception's type, and its message with notes.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as L  # noqa: E402
from helpers import TaskNet, loader, make_trainer, split_mnist_task  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_ewc import EWCCallback  # noqa: E402

NUM_SAMPLES = 64  # rank 0 estimates on samples 0-31, rank 1 on 32-63


def rank_one_data(case: str) -> DataLoader:
    x, y = split_mnist_task(0, train=True, limit=NUM_SAMPLES).tensors
    x, y = x.clone(), y.clone()
    if case == "nan":
        x[40, 3] = float("nan")
    else:
        y[50] = 7  # a 2-way head
    return DataLoader(TensorDataset(x, y), batch_size=16)


class ConsolidateAndRecord(L.Callback):
    """Consolidates unattached EWCCallbacks on the bad data at the end of training and records what each rank raised."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        lines = []
        for case, fisher in (("nan", "exact"), ("label", "empirical")):
            ewc = EWCCallback(fisher=fisher, fisher_dataloader=rank_one_data(case))
            try:
                ewc.consolidate(pl_module, trainer=trainer)
                lines.append(f"{case}\tno error")
            except Exception as err:  # noqa: BLE001 - what each rank raised is the result
                text = "".join(traceback.format_exception_only(err)).replace("\n", " | ")
                lines.append(f"{case}\t{type(err).__name__}\t{text}")
            assert ewc.num_tasks == 0
        with open(os.path.join(self.out_dir, f"failure_rank{trainer.global_rank}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def main(out_dir: str) -> None:
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # two ranks on two cores
    os.makedirs(out_dir, exist_ok=True)
    model = TaskNet(hidden=8, num_tasks=1)
    trainer = make_trainer(strategy="ddp", devices=2, max_steps=2, callbacks=[ConsolidateAndRecord(out_dir)])
    trainer.fit(model, loader(split_mnist_task(0, train=True, limit=NUM_SAMPLES), batch_size=16))
    # Left to interpreter exit, gloo's threads may abort the process after the broadcasts of the errors above.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
