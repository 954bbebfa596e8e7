"""Run by tests/test_sharded.py in a subprocess: a stream of 3 tasks on 2 CPU ranks, under DDP or under FSDP2
(Lightning's ModelParallelStrategy with torch's fully_shard in configure_model), for both ways of applying the penalty
and both modes.

Usage: ``python tests/sharded_script.py OUT_DIR ddp|fsdp``. Lightning's launcher re-executes this command line for
rank 1. Each rank writes ``OUT_DIR/{strategy}_rank{global_rank}.pt`` with, per configuration, the final weights and
the EWC state as full-size tensors (gathered from the shards under FSDP2), the bytes the callback holds on this rank
and the bytes of this rank's shard of the parameters, and, for the first configuration, the callback's state_dict
(what a checkpoint holds). Under FSDP2 it also writes ``resumed`` (the 'loss-online' stream restored from the
checkpoint saved when task 2 ended, then task 3) and ``fisher`` (every estimator's importance on the sharded model).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as L  # noqa: E402
from helpers import TaskNet, loader, make_trainer, split_mnist_task  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_ewc import EWCCallback, EWCMixin  # noqa: E402
from lightning_ewc.app.models import ViT  # noqa: E402
from lightning_ewc.app.sharding import RestoreTaskEnd, shard_blocks  # noqa: E402

CONFIGS = [("loss", "separate"), ("gradient", "separate"), ("loss", "online"), ("gradient", "online")]
TASKS, STEPS = 3, 3


class ShardedTaskNet(TaskNet):
    """TaskNet whose layers FSDP2 shards when the strategy gives it a device mesh (each later task's Trainer calls
    configure_model again: the guard keeps it from sharding twice)."""

    def configure_model(self):
        if self._device_mesh is None or isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.trunk:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def task_trainer(strategy_name: str, callbacks: list) -> L.Trainer:
    if strategy_name == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp_find_unused_parameters_true"  # the other tasks' heads get no gradient
    return make_trainer(strategy=strategy, devices=2, max_steps=STEPS, callbacks=callbacks)


def task_data(task: int):
    # 61 samples, batches of 16 on each of 2 ranks: 2 steps an epoch, so the 3 steps of a task span 2 epochs
    return loader(split_mnist_task(task, train=True, limit=61), batch_size=16, shuffle=False)


def make_callback(penalty_via: str, mode: str) -> EWCCallback:
    return EWCCallback(ewc_lambda=300.0, mode=mode, gamma=0.8 if mode == "online" else 1.0, penalty_via=penalty_via,
                       fisher_batch_size=20)


def run(strategy_name: str, penalty_via: str, mode: str, checkpoint: str | None = None) -> dict:
    """The stream; ``checkpoint``: also save one, with the strategy's own saving, when the second task ends."""
    L.seed_everything(0, verbose=False)
    model = ShardedTaskNet(hidden=16, num_tasks=TASKS, lr=1e-2)
    callback = make_callback(penalty_via, mode)
    trainer = None
    for task in range(TASKS):
        model.task = task
        trainer = task_trainer(strategy_name, [callback])
        trainer.fit(model, task_data(task))
        if checkpoint and task == TASKS - 2:
            trainer.save_checkpoint(checkpoint, weights_only=False)
    return outcome(trainer, model, callback)


def resumed(strategy_name: str, penalty_via: str, mode: str, checkpoint: str) -> dict:
    """A fresh model and callback (as in a new process) that train the last task after restoring the weights and the
    EWC state from ``checkpoint`` (the app's resume: RestoreTaskEnd reads the distributed checkpoint into the model
    once the strategy has sharded it); the optimizer starts afresh, as every task's does."""
    L.seed_everything(1, verbose=False)  # another initialisation: only the checkpoint can make it equal
    model = ShardedTaskNet(hidden=16, num_tasks=TASKS, lr=1e-2)
    L.seed_everything(0, verbose=False)  # the run's seed, from which Lightning's DistributedSampler shuffles
    callback = make_callback(penalty_via, mode)
    model.task = TASKS - 1
    trainer = task_trainer(strategy_name, [RestoreTaskEnd(Path(checkpoint), [callback]), callback])
    trainer.fit(model, task_data(TASKS - 1))
    return outcome(trainer, model, callback)


def outcome(trainer, model, callback) -> dict:
    local_bytes = sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters()
    )
    state = callback.state_dict()  # every rank: it gathers the shards
    return {
        "rank": trainer.global_rank,
        "weights": {n: full(p) for n, p in model.named_parameters()},
        "importance": state["consolidated"]["importance"],
        "centre": state["consolidated"]["centre"],
        "constant": callback.state.constant,
        "callback_bytes": callback.num_bytes(),
        "local_param_bytes": local_bytes,
        "state_dict": state,
        "sharded": any(isinstance(p, DTensor) for p in model.parameters()),
    }


RESUMED = ("loss", "online")  # the configuration interrupted and resumed


ESTIMATORS = {
    "exact": {"fisher": "exact"},
    "sampled": {"fisher": "sampled"},
    "empirical": {"fisher": "empirical"},
    "mas": {"importance": "mas"},
}


class FisherOnTrainEnd(L.Callback):
    """At the end of a fit, every estimator's importance through EWCCallback.consolidate on the sharded model (each
    rank its share of ``data``), gathered full-size, and the most full-size sums the pass held at once."""


    def __init__(self, data) -> None:
        self.data, self.results = data, {}

    def on_train_end(self, trainer, pl_module):
        for name, kwargs in ESTIMATORS.items():
            callback = EWCCallback(fisher_dataloader=self.data, fisher_batch_size=12, seed=3, **kwargs)
            callback.consolidate(pl_module, trainer=trainer)
            self.results[name] = {
                "importance": callback.state_dict()["consolidated"]["importance"],
                "count": callback.last_estimate.count,
                "peak_full_bytes": callback.last_estimate.peak_full_bytes,
            }
        try:  # refused on every rank alike, before any collective
            EWCCallback(fisher="batched", fisher_dataloader=self.data).consolidate(pl_module, trainer=trainer)
        except NotImplementedError as err:
            self.results["batched_refused"] = str(err)


class ShardedViTNet(EWCMixin, L.LightningModule):
    """The app's ViT backbone (a patch Conv2d, a position Embedding, an encoder layer with MultiheadAttention,
    LayerNorms and Linears on sequences) and a 3-way head, sharded block by block as the app shards its models."""

    def __init__(self):
        super().__init__()
        self.backbone = ViT((1, 28, 28), patch_size=7, dim=16, depth=1, heads=2, mlp_ratio=2.0)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x.view(-1, 1, 28, 28)))

    def configure_model(self):
        shard_blocks(self, self.backbone)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fisher_run(strategy_name: str, model_name: str) -> dict:
    """Three steps of task 0, then the importance of every estimator on 45 samples (uneven: 23 and 22 per rank)."""
    L.seed_everything(0, verbose=False)
    # 3 classes: exact makes 2 passes a batch
    model = ShardedTaskNet(hidden=16, num_tasks=1, classes=3, lr=1e-2) if model_name == "mlp" else ShardedViTNet()
    fisher = FisherOnTrainEnd(loader(split_mnist_task(0, train=True, limit=45), batch_size=12, shuffle=False))
    trainer = task_trainer(strategy_name, [fisher])
    trainer.fit(model, task_data(0))
    return {"weights": {n: full(p) for n, p in model.named_parameters()}, "estimators": fisher.results}


def main(out_dir: str, strategy_name: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    checkpoint = os.path.join(out_dir, "task2_end.ckpt") if strategy_name == "fsdp" else None
    results = {
        f"{via}-{mode}": run(strategy_name, via, mode, checkpoint if (via, mode) == RESUMED else None)
        for via, mode in CONFIGS
    }
    if strategy_name == "fsdp":
        results["resumed"] = resumed(strategy_name, *RESUMED, checkpoint)
        results["resumed"]["checkpoint_is_a_directory"] = os.path.isdir(checkpoint)
        results["fisher"] = fisher_run(strategy_name, "mlp")
        results["fisher_vit"] = fisher_run(strategy_name, "vit")
    os.makedirs(out_dir, exist_ok=True)
    rank = next(iter(results.values()))["rank"]
    torch.save(results, os.path.join(out_dir, f"{strategy_name}_rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
