"""Run by tests/test_distributed.py in a subprocess: two tasks under 2-process CPU DDP, once with the penalty in the
loss, once with ``penalty_via="gradient"`` and once with λ = 0 (the reference the penalty must move away from);
each rank writes ``OUT_DIR/penalty_rank{global_rank}.pt`` with the final weights of the three runs.

Usage: ``python tests/ddp_penalty_script.py OUT_DIR``. Lightning's DDP launcher re-executes this command line for
rank 1, which then runs the same six fits.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as L  # noqa: E402
from helpers import TaskNet, loader, make_trainer, split_mnist_task  # noqa: E402

from lightning_ewc import EWCCallback  # noqa: E402


def train_two_tasks(penalty_via: str, ewc_lambda: float = 1e3) -> tuple[dict, int]:
    L.seed_everything(0, verbose=False)
    model = TaskNet(hidden=16, num_tasks=2, lr=1e-2)
    callback = EWCCallback(ewc_lambda=ewc_lambda, penalty_via=penalty_via)
    trainer = None
    for task in range(2):
        model.task = task
        data = split_mnist_task(task, train=True, limit=128)
        # the other task's head gets no gradient: DDP must be told that unused parameters are expected
        trainer = make_trainer(strategy="ddp_find_unused_parameters_true", devices=2, max_steps=4,
                               callbacks=[callback])
        trainer.fit(model, loader(data, batch_size=16, shuffle=False))
    assert callback.num_tasks == 2
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, trainer.global_rank


def main(out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    by_loss, rank = train_two_tasks("loss")
    by_gradient, _ = train_two_tasks("gradient")
    without, _ = train_two_tasks("gradient", ewc_lambda=0.0)
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"loss": by_loss, "gradient": by_gradient, "without": without},
               os.path.join(out_dir, f"penalty_rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
