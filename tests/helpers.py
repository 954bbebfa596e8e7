"""Shared test pieces: a quiet Trainer, a multi-head task-incremental network, Split MNIST tasks from real files."""

from __future__ import annotations

import functools

import lightning.pytorch as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ewc import EWCMixin
from lightning_ewc.app.idx import load_idx_dataset


# A quiet single-process CPU Trainer: the settings every test starts from (either Lightning namespace).
QUIET_TRAINER = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=1,  # tests read ewc/penalty after every step; the mixin logs at Lightning's cadence
)


def make_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{**QUIET_TRAINER, **kwargs})


class TaskNet(EWCMixin, L.LightningModule):
    """MLP trunk with one 2-way head per task (task-incremental); ``task`` selects the head for training and EWC."""

    def __init__(self, in_features: int = 784, hidden: int = 100, num_tasks: int = 5, classes: int = 2, lr: float = 1e-3):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(num_tasks))
        self.task = 0
        self.lr = lr

    def forward(self, x, task=None):
        return self.heads[self.task if task is None else task](self.trunk(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@functools.lru_cache(maxsize=2)
def _mnist(train: bool):
    return load_idx_dataset("MNIST", train=train)


def split_mnist_task(task: int, train: bool = True, limit: int | None = None) -> TensorDataset:
    """Digits (2t, 2t+1) of MNIST, labels 0/1 within the task, images flattened to [N, 784] in [0, 1]."""
    images, labels = _mnist(train)
    keep = (labels == 2 * task) | (labels == 2 * task + 1)
    x = images[keep].float().div_(255).flatten(1)
    y = labels[keep] - 2 * task
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return TensorDataset(x, y)


def loader(dataset, batch_size: int = 64, shuffle: bool = True, seed: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def task_accuracy(net: TaskNet, task: int) -> float:
    data = split_mnist_task(task, train=False)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        acc = (net(data.tensors[0], task).argmax(1) == data.tensors[1]).float().mean().item()
    net.train(was_training)
    return acc


class CrashAt(L.Callback):
    """Raises at a step of a task, to simulate a run that dies mid-stream (used through the app's extra_callbacks)."""

    def __init__(self, task: int, step: int) -> None:
        self.task, self.step = task, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.task == self.task and trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step} of task {self.task}")


def wandb_history(run_file) -> list[dict]:
    """History rows of an offline W&B run, read from its ``run-*.wandb`` file.

    Written here because wandb 0.31 ships no Python reader: the file is a 7-byte header (":W&B", magic, version)
    followed by LevelDB-log records (crc32c, little-endian length, type) in 32 KiB blocks, each a protobuf Record.
    The writer is a separate process that may still be flushing after ``finish()``: a record not yet written whole
    ends the history (callers poll, see ``wait_for_wandb_history``).
    """
    import json
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = open(run_file, "rb").read()
    assert raw[:4] == b":W&B", "not a W&B run file"
    block, pos, pending, rows = 32 * 1024, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a record header never straddles blocks: the tail is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        if pos + 7 + length > len(raw):  # W&B's writer has not flushed this record yet
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def wait_for_wandb_history(run_file, complete, timeout: float = 30.0) -> list[dict]:
    """``wandb_history`` once ``complete(rows)`` holds, polling while W&B's writer process flushes the file."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        rows = wandb_history(run_file)
        if complete(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)
