"""Task streams and the task datamodule, on the real MNIST / Fashion-MNIST files and scikit-learn's digits."""

from __future__ import annotations

import functools

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lightning_ewc.app.datamodule import EpochSeededSampler, TaskDataModule
from lightning_ewc.app.streams import (
    SCENARIOS,
    class_order_of,
    digits,
    permuted_mnist,
    pixel_permutation,
    rotated_mnist,
    split_fashion_mnist,
    split_mnist,
)
from lightning_ewc.app.idx import DATA_ENV, load_idx_dataset

BUILDERS = {
    "split_mnist": split_mnist,
    "split_fashion_mnist": split_fashion_mnist,
    "permuted_mnist": permuted_mnist,
    "rotated_mnist": rotated_mnist,
    "digits": digits,
}
TWO_CLASS_TASKS = {"split_mnist", "split_fashion_mnist", "digits"}


@functools.lru_cache(maxsize=None)
def original(name: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference images [N, 1, 28, 28] in [0, 1] and labels, read independently of the streams' cache."""
    images, labels = load_idx_dataset(name, train=train)
    return images.float().div(255).unsqueeze(1), labels


def expected_classes(builder: str, scenario: str, task: int) -> list[int]:
    per_task = 2 if builder in TWO_CLASS_TASKS else 10
    first = per_task * task if scenario == "class" else 0
    return list(range(first, first + per_task))


# ------------------------------------------------------------------------------------------------------ every stream


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("builder", BUILDERS)
def test_stream_layout_and_label_space(builder, scenario, mnist_dir):
    stream = BUILDERS[builder](scenario=scenario, subsample=200, test_subsample=100)

    assert stream.name == builder and stream.scenario == scenario
    assert stream.num_tasks == {"permuted_mnist": 10}.get(builder, 5)
    assert stream.input_shape == ((1, 8, 8) if builder == "digits" else (1, 28, 28))
    assert stream.classes_per_task == (2 if builder in TWO_CLASS_TASKS else 10)
    assert stream.num_classes == stream.classes_per_task * (stream.num_tasks if scenario == "class" else 1)
    for k, task in enumerate(stream.tasks):
        assert task.classes == expected_classes(builder, scenario, k)
        seen = {c for j in range(k + 1) for c in expected_classes(builder, scenario, j)}
        assert stream.classes_seen(k) == sorted(seen)
        for split, cap in ((task.train, 200), (task.test, 100)):
            x, y, t = split.tensors
            assert 0 < len(x) <= cap and len(x) == len(y) == len(t)
            assert x.dtype == torch.float32 and x.shape[1:] == stream.input_shape
            assert x.min() >= 0 and 0.9 < x.max() <= 1  # scaled to [0, 1] once, not twice
            assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == task.classes
            assert t.dtype == torch.int64 and (t == k).all()
        assert len(task.train) == 200


def test_classes_seen_rejects_unknown_task():
    stream = digits(scenario="class")
    assert stream.classes_seen(4) == list(range(10))
    with pytest.raises(ValueError):
        stream.classes_seen(5)


@pytest.mark.parametrize("builder", BUILDERS)
def test_unknown_scenario_lists_the_valid_ones(builder):
    with pytest.raises(ValueError, match="task, domain, class"):
        BUILDERS[builder](scenario="instance")


@pytest.mark.parametrize("builder", ["split_mnist", "split_fashion_mnist", "permuted_mnist", "rotated_mnist"])
def test_missing_data_names_where_it_looked(builder, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "explicit")):
        BUILDERS[builder](data_dir=tmp_path / "explicit")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "from_env"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "from_env")):
        BUILDERS[builder]()


# ------------------------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("builder, dataset", [(split_mnist, "MNIST"), (split_fashion_mnist, "FashionMNIST")])
def test_split_task_holds_exactly_its_two_classes(builder, dataset, mnist_dir):
    by_class = builder(scenario="class")
    by_task = builder(scenario="task")
    for train, total in ((True, 60000), (False, 10000)):
        images, labels = original(dataset, train)
        assert sum(len(task.train if train else task.test) for task in by_class.tasks) == total
        for k in range(5):
            mine = labels.eq(2 * k) | labels.eq(2 * k + 1)
            x, y, _ = (by_class.tasks[k].train if train else by_class.tasks[k].test).tensors
            assert torch.equal(x, images[mine]) and torch.equal(y, labels[mine])
            y_within = (by_task.tasks[k].train if train else by_task.tasks[k].test).tensors[1]
            assert torch.equal(y_within, labels[mine] - 2 * k)


def test_class_order_deals_out_the_given_pairs_with_positions_as_labels(mnist_dir):
    order = [3, 8, 0, 5, 9, 1, 2, 7, 6, 4]
    by_class = split_mnist(scenario="class", class_order=order)
    by_domain = split_mnist(scenario="domain", class_order=order)
    images, labels = original("MNIST", False)
    for k in range(5):
        first, second = order[2 * k], order[2 * k + 1]
        mine = labels.eq(first) | labels.eq(second)
        x, y, _ = by_class.tasks[k].test.tensors
        assert torch.equal(x, images[mine])
        # class scenario: the pair's labels are its positions 2k, 2k+1, so the classes seen so far are outputs 0..2k+1
        assert torch.equal(y, torch.where(labels[mine] == first, 2 * k, 2 * k + 1))
        assert by_class.tasks[k].classes == [2 * k, 2 * k + 1]
        assert torch.equal(by_domain.tasks[k].test.tensors[1], torch.where(labels[mine] == first, 0, 1))


def test_seeded_class_order_is_a_permutation_per_seed():
    orders = {seed: class_order_of("seeded", seed) for seed in range(4)}
    assert all(sorted(o) == list(range(10)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == 4 and class_order_of("seeded", 2) == orders[2]
    assert class_order_of(None) == list(range(10))
    seeded, explicit = digits(class_order="seeded", seed=1), digits(class_order=orders[1], seed=1)
    for a, b in zip(seeded.tasks, explicit.tasks):
        assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(seeded.tasks[0].train.tensors[0], digits(seed=1).tasks[0].train.tensors[0])


@pytest.mark.parametrize("bad, message", [("shuffled", "not understood"), ([0, 1, 2], "exactly once"),
                                          ([0] * 10, "exactly once")])
def test_bad_class_order_is_refused_before_loading(bad, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        split_mnist(class_order=bad, data_dir=tmp_path)  # no data there: the order is checked first


def test_split_num_tasks_truncates_and_is_bounded(mnist_dir):
    stream = split_mnist(num_tasks=3, scenario="class", subsample=10, test_subsample=10)
    assert stream.num_tasks == 3 and stream.num_classes == 6 and stream.classes_seen(2) == list(range(6))
    with pytest.raises(ValueError):
        split_mnist(num_tasks=6)


def test_subsample_caps_each_task_and_is_seeded(mnist_dir):
    first = split_mnist(subsample=50, test_subsample=20, seed=0)
    again = split_mnist(subsample=50, test_subsample=20, seed=0)
    other = split_mnist(subsample=50, test_subsample=20, seed=1)
    for a, b, c in zip(first.tasks, again.tasks, other.tasks):
        assert len(a.train) == 50 and len(a.test) == 20
        assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[0], b.test.tensors[0])
        assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    # A cap above the task's size keeps everything.
    assert len(split_mnist(subsample=10**6, num_tasks=1).tasks[0].train) == 12665


# ---------------------------------------------------------------------------------------------------------- permuted


@pytest.fixture(scope="module")
def permuted(mnist_dir):
    return permuted_mnist(num_tasks=3, seed=0)


def test_permuted_task_zero_is_the_original(permuted):
    for train in (True, False):
        images, labels = original("MNIST", train)
        x, y, _ = (permuted.tasks[0].train if train else permuted.tasks[0].test).tensors
        assert torch.equal(x, images) and torch.equal(y, labels)


def test_permuted_tasks_permute_pixels_alike_in_train_and_test(permuted):
    for train in (True, False):
        images, labels = original("MNIST", train)
        flat = images.flatten(1)
        for k in (1, 2):
            x, y, _ = (permuted.tasks[k].train if train else permuted.tasks[k].test).tensors
            assert torch.equal(y, labels)
            assert not torch.equal(x, images)
            if not train:  # each image keeps its pixel values, only their places move (sorting 60000 images is slow)
                assert torch.equal(x.flatten(1).sort(1).values, flat.sort(1).values)
            # They move by the task's one permutation, the same in train and in test.
            assert torch.equal(x.flatten(1), flat[:, pixel_permutation(k, seed=0)])
    assert not torch.equal(pixel_permutation(1, seed=0), pixel_permutation(2, seed=0))


def test_permutations_are_reproducible_from_the_seed(permuted):
    again = permuted_mnist(num_tasks=2, seed=0, subsample=10)
    other = permuted_mnist(num_tasks=2, seed=1, subsample=10)
    assert torch.equal(again.tasks[1].test.tensors[0], permuted.tasks[1].test.tensors[0])
    assert not torch.equal(other.tasks[1].test.tensors[0], permuted.tasks[1].test.tensors[0])
    images, _ = original("MNIST", False)
    assert torch.equal(other.tasks[1].test.tensors[0].flatten(1), images.flatten(1)[:, pixel_permutation(1, seed=1)])


# ----------------------------------------------------------------------------------------------------------- rotated


def test_rotations_match_exact_turns(mnist_dir):
    stream = rotated_mnist(angles=(0, 90, 180, 45), subsample=10)
    images, labels = original("MNIST", False)
    rotated = [task.test.tensors[0] for task in stream.tasks]
    torch.testing.assert_close(rotated[0], images, atol=1e-5, rtol=0)
    counter_clockwise = torch.rot90(images, 1, dims=(-2, -1))
    torch.testing.assert_close(rotated[1], counter_clockwise, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotated[2], images.flip(-2, -1), atol=1e-5, rtol=0)
    assert (rotated[3] - images).abs().max() > 0.5 and 0 <= rotated[3].min() and rotated[3].max() <= 1
    assert all(torch.equal(task.test.tensors[1], labels) for task in stream.tasks)


# ------------------------------------------------------------------------------------------------------------ digits


def test_digits_needs_no_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    stream = digits(scenario="class")
    train = sum(len(task.train) for task in stream.tasks)
    test = sum(len(task.test) for task in stream.tasks)
    assert train + test == 1797 and test == 450  # sklearn rounds the 25% test share up
    for task in stream.tasks:
        assert 0.2 < len(task.test) / (len(task.train) + len(task.test)) < 0.3  # stratified: every task near 25%
    assert not torch.equal(digits(seed=1).tasks[0].test.tensors[0], digits(seed=0).tasks[0].test.tensors[0])


# ------------------------------------------------------------------------------------------------------ data module


def test_epoch_seeded_sampler_depends_on_seed_and_epoch_only():
    sampler = EpochSeededSampler(100, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(100)) and len(sampler) == 100
    assert list(sampler) == epoch0  # iterating does not advance anything
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    resumed = EpochSeededSampler(100, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1
    assert list(EpochSeededSampler(100, seed=4)) != epoch0


@pytest.fixture(scope="module")
def small_split(mnist_dir):
    return split_mnist(subsample=64, test_subsample=100)


def test_datamodule_serves_current_task_joint_union_and_all_tests(small_split):
    dm = TaskDataModule(small_split, batch_size=16, seed=5)
    assert dm.task == 0
    dm.set_task(2)
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 64 and loader.batch_size == 16
    assert isinstance(loader.sampler, EpochSeededSampler) and loader.sampler.seed == 5 + 2000
    assert all((t == 2).all() for _, _, t in loader)

    joint = TaskDataModule(small_split, batch_size=16, joint=True)
    joint.set_task(2)
    seen = torch.cat([t for _, _, t in joint.train_dataloader()])
    assert sorted(seen.tolist()) == [0] * 64 + [1] * 64 + [2] * 64

    tests = dm.test_dataloader()
    assert len(tests) == 5
    for k, test_loader in enumerate(tests):
        assert test_loader.dataset is small_split.tasks[k].test
        assert all((t == k).all() for _, _, t in test_loader)

    for bad in (-1, 5):
        with pytest.raises(ValueError):
            dm.set_task(bad)
    assert dm.task == 2


class TinyNet(L.LightningModule):
    """Logistic regression that remembers what Lightning fed it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(28 * 28, 2)
        self.train_batches: list[torch.Tensor] = []
        self.test_tasks: dict[int, set[int]] = {}

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.train_batches.append(x.clone())
        return nn.functional.cross_entropy(self.linear(x.flatten(1)), y)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        _, _, t = batch
        self.test_tasks.setdefault(dataloader_idx, set()).update(t.tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trains_in_the_sampler_order_across_epochs(small_split):
    dm = TaskDataModule(small_split, batch_size=32, seed=7)
    dm.set_task(1)
    net = TinyNet()
    before = net.linear.weight.detach().clone()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(net, datamodule=dm)

    assert trainer.global_step == 3 and not torch.equal(net.linear.weight, before)
    # 64 samples in batches of 32: steps 1-2 are epoch 0, step 3 opens epoch 1, which Lightning must have set.
    x = small_split.tasks[1].train.tensors[0]
    order = EpochSeededSampler(64, seed=7 + 1000)
    epoch0 = list(order)
    order.set_epoch(1)
    epoch1 = list(order)
    expected = [x[epoch0[:32]], x[epoch0[32:]], x[epoch1[:32]]]
    assert all(torch.equal(got, want) for got, want in zip(net.train_batches, expected, strict=True))

    trainer.test(net, datamodule=dm, verbose=False)
    assert net.test_tasks == {k: {k} for k in range(5)}


def test_permuted_with_padding_permutes_the_padded_image(mnist_dir):
    stream = permuted_mnist(num_tasks=2, seed=0, subsample=10, pad=2)  # 32x32, as van de Ven
    assert stream.input_shape == (1, 32, 32)
    images, _ = original("MNIST", False)
    padded = torch.zeros(len(images), 1, 32, 32)
    padded[:, :, 2:30, 2:30] = images
    first, second = (stream.tasks[k].test.tensors[0] for k in (0, 1))
    assert torch.equal(first, padded)
    assert torch.equal(second.flatten(1), padded.flatten(1)[:, pixel_permutation(1, seed=0, num_pixels=32 * 32)])
    with pytest.raises(ValueError, match="pad must be a whole number of pixels >= 0"):
        permuted_mnist(num_tasks=1, pad=-1)
