"""Run by tests/test_sharded.py in a subprocess: a stream of 3 tasks on 2 CPU ranks, under DDP or under FSDP2
(Lightning's ModelParallelStrategy with torch's fully_shard in configure_model), for both ways of applying the penalty
and both modes.

Usage: ``python tests/sharded_script.py OUT_DIR ddp|fsdp``. Lightning's launcher re-executes this command line for
rank 1. Each rank writes ``OUT_DIR/{strategy}_rank{global_rank}.pt`` with, per configuration, the final weights and
the EWC state as full-size tensors (gathered from the shards under FSDP2), the bytes the callback holds on this rank
and the bytes of this rank's shard of the parameters, and, for the first configuration, the callback's state_dict
(what a checkpoint holds).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as L  # noqa: E402
from helpers import TaskNet, loader, make_trainer, split_mnist_task  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_ewc import EWCCallback  # noqa: E402

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


def run(strategy_name: str, penalty_via: str, mode: str) -> dict:
    L.seed_everything(0, verbose=False)
    model = ShardedTaskNet(hidden=16, num_tasks=TASKS, lr=1e-2)
    callback = EWCCallback(ewc_lambda=300.0, mode=mode, gamma=0.8 if mode == "online" else 1.0, penalty_via=penalty_via,
                           fisher_batch_size=20)
    trainer = None
    for task in range(TASKS):
        model.task = task
        if strategy_name == "fsdp":
            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        else:
            strategy = "ddp_find_unused_parameters_true"  # the other tasks' heads get no gradient
        trainer = make_trainer(strategy=strategy, devices=2, max_steps=STEPS, callbacks=[callback])
        trainer.fit(model, loader(split_mnist_task(task, train=True, limit=61), batch_size=16, shuffle=False))
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


def main(out_dir: str, strategy_name: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    results = {f"{via}-{mode}": run(strategy_name, via, mode) for via, mode in CONFIGS}
    os.makedirs(out_dir, exist_ok=True)
    rank = next(iter(results.values()))["rank"]
    torch.save(results, os.path.join(out_dir, f"{strategy_name}_rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
