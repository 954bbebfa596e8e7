"""A LightningDataModule that serves one task of a :class:`~lightning_ewc.app.streams.TaskStream` at a time."""

from __future__ import annotations

from collections.abc import Iterator

import lightning.pytorch as L
import numpy as np
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from lightning_ewc.app.streams import TaskStream

TEST_BATCH_SIZE = 1024  # evaluation keeps no activations for backward, so large batches are cheap


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation derived from (seed, epoch) only, so a run resumed from a checkpoint at an epoch
    boundary sees the same order as an uninterrupted one; Lightning calls set_epoch(epoch) each epoch."""

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # A fresh generator per epoch, instead of one that advances, is what makes the order independent of history.
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


class TaskDataModule(L.LightningDataModule):
    """Train on the current task (or, with ``joint``, on all tasks so far); test on every task of the stream.

    The runner calls :meth:`set_task` before fitting each task; Lightning asks for fresh loaders on each ``fit``.
    """

    def __init__(
        self, stream: TaskStream, batch_size: int = 128, num_workers: int = 0, seed: int = 0, joint: bool = False
    ):
        super().__init__()
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.joint = joint
        self.task = 0

    def set_task(self, task: int) -> None:
        if not 0 <= task < self.stream.num_tasks:
            raise ValueError(f"task must be in [0, {self.stream.num_tasks}) for stream {self.stream.name}, got {task}")
        self.task = task

    def train_dataset(self) -> Dataset:
        """Task ``task``'s train set, or with ``joint`` the union of tasks 0..task (the upper-bound baseline)."""
        if self.joint:
            return ConcatDataset([t.train for t in self.stream.tasks[: self.task + 1]])
        return self.stream.tasks[self.task].train

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        # Each task gets its own seed, so tasks of equal size are not shuffled identically.
        sampler = EpochSeededSampler(len(dataset), seed=self.seed + 1000 * self.task)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task of the stream, seen or not, in task order (dataloader_idx = task)."""
        return [
            DataLoader(task.test, batch_size=TEST_BATCH_SIZE, shuffle=False, num_workers=self.num_workers)
            for task in self.stream.tasks
        ]
