"""Task streams for continual learning: Split / Permuted / Rotated MNIST, Split Fashion-MNIST, split and permuted
8x8 digits.

A stream is a list of tasks, each with in-memory train and test tensors ``(x, y, t)``. The labels follow the three
scenarios of van de Ven & Tolias (2019):

- ``task``: labels are indices within the task and the model is told the task ``t`` (one head per task);
- ``domain``: labels are indices within the task, the model is not told ``t`` (one shared head);
- ``class``: labels are global (split streams: the original digit; permuted/rotated: ``10 * task + digit``), so the
  model must tell all classes of all tasks apart.

Builders take keyword arguments only, so that Hydra configs can call them through ``_target_``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_ewc.app import idx

SCENARIOS = ("task", "domain", "class")

# What a seeded draw is for, so that draws for different purposes never share a random stream.
_TRAIN_SUBSET, _TEST_SUBSET, _PERMUTATION, _CLASS_ORDER = 0, 1, 2, 3
_ROTATION_CHUNK = 8192  # images rotated at once; bounds the sampling grid's memory (~50 MB at 28x28)
Images = tuple[Tensor, Tensor]  # (images [N, H, W]: uint8 0..255 or float in [0, 1], labels int64 [N])


@dataclass
class Task:
    train: TensorDataset  # (x float32 [N, C, H, W] in [0, 1], y int64 [N], t int64 [N])
    test: TensorDataset
    classes: list[int]  # labels, in the scenario's label space, that occur in this task


@dataclass
class TaskStream:
    name: str
    scenario: str
    tasks: list[Task]
    input_shape: tuple[int, ...]
    classes_per_task: int

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_classes(self) -> int:
        """Outputs the model needs: per head for task/domain, over all tasks for class."""
        if self.scenario == "class":
            return self.num_tasks * self.classes_per_task
        return self.classes_per_task

    def classes_seen(self, task: int) -> list[int]:
        """Sorted labels of tasks 0..task."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), got {task}")
        return sorted({c for t in self.tasks[: task + 1] for c in t.classes})


# ----------------------------------------------------------------------------------------------------------- builders


def split_mnist(
    scenario: str = "task",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    num_tasks: int = 5,
    subsample: int | None = None,
    test_subsample: int | None = None,
    seed: int = 0,
    class_order: Sequence[int] | str | None = None,
) -> TaskStream:
    """MNIST as two-digit tasks: 0/1, 2/3, ..., 8/9, or the pairs of ``class_order`` (:func:`class_order_of`)."""
    return _split_idx_stream(
        "split_mnist", "MNIST", scenario, data_dir, download, num_tasks, subsample, test_subsample, seed, class_order
    )


def split_fashion_mnist(
    scenario: str = "task",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    num_tasks: int = 5,
    subsample: int | None = None,
    test_subsample: int | None = None,
    seed: int = 0,
    class_order: Sequence[int] | str | None = None,
) -> TaskStream:
    """Fashion-MNIST as tasks of two classes: 0/1 (T-shirt, trouser), 2/3 (pullover, dress), ..., or ``class_order``."""
    return _split_idx_stream(
        "split_fashion_mnist", "FashionMNIST", scenario, data_dir, download, num_tasks, subsample, test_subsample, seed,
        class_order,
    )


def permuted_mnist(
    scenario: str = "domain",
    num_tasks: int = 10,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    subsample: int | None = None,
    test_subsample: int | None = None,
    seed: int = 0,
    pad: int = 0,
) -> TaskStream:
    """All ten MNIST digits per task; task 0 in the original pixel order, task k > 0 under a seeded permutation.

    ``pad`` > 0 first surrounds each image with that many rows and columns of zeros, so that the permutations move
    the pixels over the larger image (``pad=2``: 32x32, as in van de Ven's code).
    """
    return _permuted_stream(
        "permuted_mnist", lambda: {train: _load_idx("MNIST", train, data_dir, download) for train in (True, False)},
        28, scenario, num_tasks, pad, subsample, test_subsample, seed,
    )


def rotated_mnist(
    scenario: str = "domain",
    angles: Sequence[float] = (0, 45, 90, 135, 180),
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    subsample: int | None = None,
    test_subsample: int | None = None,
    seed: int = 0,
) -> TaskStream:
    """All ten MNIST digits per task; task k shows them rotated counter-clockwise by ``angles[k]`` degrees."""
    _check_scenario(scenario)
    angles = [float(a) for a in angles]  # Hydra hands over a ListConfig
    if not angles:
        raise ValueError("rotated_mnist needs at least one angle")
    data = {train: _load_idx("MNIST", train, data_dir, download) for train in (True, False)}
    tasks = [
        _whole_dataset_task(
            data, task, functools.partial(rotate, degrees=angle), scenario, subsample, test_subsample, seed
        )
        for task, angle in enumerate(angles)
    ]
    return TaskStream("rotated_mnist", scenario, tasks, input_shape=(1, 28, 28), classes_per_task=10)


def digits(
    scenario: str = "task",
    num_tasks: int = 5,
    subsample: int | None = None,
    test_subsample: int | None = None,
    seed: int = 0,
    class_order: Sequence[int] | str | None = None,
) -> TaskStream:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as tasks of two digits, split 75/25 by ``seed``."""
    _check_scenario(scenario)
    tasks = _split_tasks(_digits_split(seed), scenario, num_tasks, subsample, test_subsample, seed, class_order)
    return TaskStream("digits", scenario, tasks, input_shape=(1, 8, 8), classes_per_task=2)


def permuted_digits(
    scenario: str = "domain",
    num_tasks: int = 5,
    pad: int = 2,
    subsample: int | None = None,
    test_subsample: int | None = None,
    seed: int = 0,
) -> TaskStream:
    """Permuted MNIST in miniature, offline: all ten of scikit-learn's 8x8 digits per task (split 75/25 by ``seed``);
    task 0 in the original pixel order, task k > 0 under a seeded pixel permutation.

    ``pad`` surrounds each image with that many rows and columns of zeros before permuting, as
    :func:`permuted_mnist` does (2 gives 12x12 images).
    """
    return _permuted_stream(
        "permuted_digits", lambda: _digits_split(seed), 8, scenario, num_tasks, pad, subsample, test_subsample, seed
    )


# ------------------------------------------------------------------------------------------------------- transforms


def pixel_permutation(task: int, seed: int = 0, num_pixels: int = 28 * 28) -> Tensor:
    """Pixel order of permuted-MNIST task ``task``: the identity for task 0, else a permutation drawn from ``seed``."""
    if task == 0:
        return torch.arange(num_pixels)
    return torch.from_numpy(_rng(seed, task, _PERMUTATION).permutation(num_pixels))


def permute(images: Tensor, permutation: Tensor) -> Tensor:
    """Images ``[N, H, W]`` with their ``H * W`` pixels reordered by ``permutation``."""
    return images.flatten(1).index_select(1, permutation).view_as(images)


def pad_and_permute(images: Tensor, pad: int, permutation: Tensor) -> Tensor:
    """Images ``[N, ..., H, W]`` with ``pad`` zero rows and columns on every side, then their pixels permuted."""
    if pad:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    return permute(images, permutation)


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Float images ``[N, H, W]`` rotated counter-clockwise about their centre.

    Bilinear, with zeros outside the original; multiples of 90 degrees move pixel centres onto pixel centres, so
    they are exact up to float rounding.
    """
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    # affine_grid maps each output position to where it samples the input; this matrix makes content turn
    # counter-clockwise as seen on screen (y grows downwards).
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32)
    rotated = []
    for chunk in images.unsqueeze(1).split(_ROTATION_CHUNK):
        grid = F.affine_grid(theta.expand(len(chunk), 2, 3), list(chunk.shape), align_corners=False)
        rotated.append(F.grid_sample(chunk, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.cat(rotated).squeeze(1)


# ----------------------------------------------------------------------------------------------------------- helpers


def _split_idx_stream(
    stream_name: str,
    dataset: str,
    scenario: str,
    data_dir: str | os.PathLike | None,
    download: bool,
    num_tasks: int,
    subsample: int | None,
    test_subsample: int | None,
    seed: int,
    class_order: Sequence[int] | str | None,
) -> TaskStream:
    _check_scenario(scenario)
    order = class_order_of(class_order, seed)  # checked before the (slower) data loading
    data = {train: _load_idx(dataset, train, data_dir, download) for train in (True, False)}
    tasks = _split_tasks(data, scenario, num_tasks, subsample, test_subsample, seed, order)
    return TaskStream(stream_name, scenario, tasks, input_shape=(1, 28, 28), classes_per_task=2)


def class_order_of(class_order: Sequence[int] | str | None, seed: int = 0, num_classes: int = 10) -> list[int]:
    """The order in which a split stream deals out its classes, two per task.

    ``None``: 0, 1, ..., 9 (tasks 0/1, 2/3, ...). ``"seeded"``: a permutation drawn from ``seed``, so that each seed
    pairs the classes differently, as van de Ven's code does. A list: those classes, each exactly once.
    """
    if class_order is None:
        return list(range(num_classes))
    if isinstance(class_order, str):
        if class_order != "seeded":
            raise ValueError(
                f"class_order={class_order!r} is not understood: use null (0..{num_classes - 1} in order), 'seeded' "
                f"(a permutation drawn from the seed) or a list of the {num_classes} class labels"
            )
        return [int(c) for c in _rng(seed, 0, _CLASS_ORDER).permutation(num_classes)]
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(
            f"class_order must list each of the classes 0..{num_classes - 1} exactly once; got {order}"
        )
    return order


def _split_tasks(
    data: dict[bool, Images],
    scenario: str,
    num_tasks: int,
    subsample: int | None,
    test_subsample: int | None,
    seed: int,
    class_order: Sequence[int] | str | None = None,
) -> list[Task]:
    """Task k holds classes ``order[2k]`` and ``order[2k+1]`` of a ten-class dataset.

    Labels are positions: 0/1 within the task for the task and domain scenarios, ``2k``/``2k+1`` in the class
    scenario (so that the outputs of the classes seen so far are the first ones; with the default order these are
    the original labels).
    """
    if not 1 <= num_tasks <= 5:
        raise ValueError(f"a split stream has 1 to 5 tasks of two classes, got num_tasks={num_tasks}")
    order = class_order_of(class_order, seed)
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))
    tasks = []
    for task in range(num_tasks):
        first = 2 * task
        offset = 0 if scenario == "class" else first
        pair = torch.tensor(order[first : first + 2])

        def part(train: bool) -> TensorDataset:
            images, labels = data[train]
            index = torch.nonzero(torch.isin(labels, pair)).squeeze(1)
            index = index[_subset(len(index), subsample if train else test_subsample, seed, task, train)]
            return _task_dataset(_unit_pixels(images[index]), position[labels[index]] - offset, task)

        tasks.append(Task(part(True), part(False), classes=[first - offset, first + 1 - offset]))
    return tasks


def _permuted_stream(
    name: str,
    load: Callable[[], dict[bool, Images]],
    side: int,
    scenario: str,
    num_tasks: int,
    pad: int,
    subsample: int | None,
    test_subsample: int | None,
    seed: int,
) -> TaskStream:
    """All ten classes in every task, task k > 0 under a seeded permutation of the pixels of the images padded by
    ``pad``; ``load()`` gives the ``side`` x ``side`` images, called once the arguments are checked."""
    _check_scenario(scenario)
    _check_positive("num_tasks", num_tasks)
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(
            f"pad must be a whole number of pixels >= 0 (2 gives {side + 4}x{side + 4} images); got {pad!r}"
        )
    padded = side + 2 * pad
    data = load()
    tasks = [
        _whole_dataset_task(
            data, task,
            functools.partial(pad_and_permute, pad=pad, permutation=pixel_permutation(task, seed, padded * padded)),
            scenario, subsample, test_subsample, seed,
        )
        for task in range(num_tasks)
    ]
    return TaskStream(name, scenario, tasks, input_shape=(1, padded, padded), classes_per_task=10)


def _whole_dataset_task(
    data: dict[bool, Images],
    task: int,
    transform: Callable[[Tensor], Tensor],
    scenario: str,
    subsample: int | None,
    test_subsample: int | None,
    seed: int,
) -> Task:
    """All ten classes under ``transform``; the class scenario gives task k its own labels 10k..10k+9."""
    offset = 10 * task if scenario == "class" else 0

    def part(train: bool) -> TensorDataset:
        images, labels = data[train]
        index = _subset(len(labels), subsample if train else test_subsample, seed, task, train)
        return _task_dataset(transform(_unit_pixels(images[index])), labels[index] + offset, task)

    return Task(part(True), part(False), classes=list(range(offset, offset + 10)))


def _unit_pixels(images: Tensor) -> Tensor:
    """float32 in [0, 1]: uint8 images are scaled by 1/255, float ones are taken as already scaled."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def _task_dataset(images: Tensor, labels: Tensor, task: int) -> TensorDataset:
    """(x float32 [N, 1, H, W], y int64 [N], t int64 [N] = task)."""
    task_ids = torch.full_like(labels, task, dtype=torch.long)
    return TensorDataset(images.unsqueeze(1).contiguous(), labels.long(), task_ids)


def _subset(size: int, limit: int | None, seed: int, task: int, train: bool) -> Tensor:
    """Indices of a seeded random subset of at most ``limit`` of ``size`` samples, kept in their original order."""
    if limit is None or limit >= size:
        return torch.arange(size)
    _check_positive("subsample", limit)
    chosen = _rng(seed, task, _TRAIN_SUBSET if train else _TEST_SUBSET).choice(size, size=limit, replace=False)
    return torch.from_numpy(np.sort(chosen))


def _rng(seed: int, task: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, task, purpose])


def _load_idx(name: str, train: bool, data_dir: str | os.PathLike | None, download: bool) -> Images:
    root = idx.data_dir(data_dir)
    try:
        return _cached_idx(name, train, root)
    except FileNotFoundError:
        if not download:
            raise
        idx.load_idx_dataset(name, train, root, download=True)  # fetches the files; the cached read below keeps them
        return _cached_idx(name, train, root)


@functools.lru_cache(maxsize=None)
def _cached_idx(name: str, train: bool, root: Path) -> Images:
    # Every stream and every seed reads the same files; decompressing MNIST takes about a second, so do it once.
    # Callers index into these tensors (which copies) and never write to them.
    return idx.load_idx_dataset(name, train, root)


def _digits_split(seed: int) -> dict[bool, Images]:
    """The 8x8 digits as {train: (images, labels)}: a stratified 75/25 split drawn from ``seed``."""
    images, labels = _sklearn_digits()
    from sklearn.model_selection import train_test_split  # scikit-learn is slow to import; only these streams need it

    train_index, test_index = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels.numpy(), random_state=seed
    )
    train_index, test_index = torch.from_numpy(np.sort(train_index)), torch.from_numpy(np.sort(test_index))
    return {True: (images[train_index], labels[train_index]), False: (images[test_index], labels[test_index])}


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> Images:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.from_numpy(bunch.images / 16.0).float(), torch.from_numpy(bunch.target).long()


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
