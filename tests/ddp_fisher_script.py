"""Run by tests/test_distributed.py in a subprocess: a 2-process CPU DDP fit whose EWCCallback estimates the Fisher.

Usage: ``python tests/ddp_fisher_script.py OUT_DIR``. Lightning's DDP launcher re-executes this same command line for
rank 1, so everything here runs on both ranks. Each rank writes ``OUT_DIR/rank{global_rank}.pt`` with:

* ``exact``: the EWCCallback's consolidated importance and centre (``fisher="exact"``, the callback on the Trainer),
* ``empirical``: the importance of a second EWCCallback (``fisher="empirical"``) consolidated by hand from a helper
  callback's ``on_train_end`` while the process group is alive (same sharding and all-reduce path),
* ``state_dict``: the weights at the end of the fit (the ones both estimations saw),
* ``world_size`` / ``num_samples``: what the run used.

The training set has an odd number of samples (301), so the contiguous shards are uneven (151 + 150) and a
DistributedSampler-style padding or a per-rank mean-of-means would show up as a mismatch with the single-process
reference.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as L  # noqa: E402
from helpers import TaskNet, loader, make_trainer, split_mnist_task  # noqa: E402

from lightning_ewc import EWCCallback  # noqa: E402

NUM_SAMPLES = 301
HIDDEN = 16
FISHER_BATCH_SIZE = 32


class EmpiricalToo(L.Callback):
    """Consolidates a second, unattached EWCCallback with the empirical estimator at the end of training."""

    def __init__(self) -> None:
        self.ewc = EWCCallback(ewc_lambda=1.0, fisher="empirical", fisher_batch_size=FISHER_BATCH_SIZE)

    def on_train_end(self, trainer, pl_module) -> None:
        self.ewc.consolidate(pl_module, trainer=trainer)


def main(out_dir: str) -> None:
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # two ranks on two cores
    model = TaskNet(hidden=HIDDEN, num_tasks=2, lr=1e-2)
    data = split_mnist_task(0, train=True, limit=NUM_SAMPLES)
    assert len(data) == NUM_SAMPLES
    ewc = EWCCallback(ewc_lambda=1.0, fisher="exact", fisher_batch_size=FISHER_BATCH_SIZE)
    empirical = EmpiricalToo()
    # Head 1 gets no gradient during task 0: DDP must be told that unused parameters are expected.
    trainer = make_trainer(
        strategy="ddp_find_unused_parameters_true", devices=2, max_steps=5, callbacks=[ewc, empirical]
    )
    trainer.fit(model, loader(data, batch_size=32, shuffle=True))

    assert ewc.num_tasks == 1 and empirical.ewc.num_tasks == 1
    os.makedirs(out_dir, exist_ok=True)
    torch.save(
        {
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "global_step": trainer.global_step,
            "num_samples": NUM_SAMPLES,
            "hidden": HIDDEN,
            "exact": {k: v.cpu() for k, v in ewc.state.importance.items()},
            "centre": {k: v.cpu() for k, v in ewc.state.centre.items()},
            "empirical": {k: v.cpu() for k, v in empirical.ewc.state.importance.items()},
            "empirical_centre": {k: v.cpu() for k, v in empirical.ewc.state.centre.items()},
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(sys.argv[1])
