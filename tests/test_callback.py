"""EWCCallback through a real Trainer: when it consolidates, what it consolidates, and its errors."""

import signal

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import TaskNet, loader, make_trainer, split_mnist_task
from lightning_ewc import EWCCallback, EWCMixin, estimate_fisher


@pytest.fixture(scope="module")
def task_data(mnist_dir):
    return [split_mnist_task(t, limit=256) for t in range(3)]


def fit_task(net, callback, data, task, **trainer_kwargs):
    net.task = task
    trainer_kwargs.setdefault("max_steps", 8)
    trainer = make_trainer(callbacks=[callback] if callback else [], **trainer_kwargs)
    trainer.fit(net, loader(data[task], batch_size=32))
    return trainer


def test_consolidates_weights_and_fisher_of_the_task_at_the_end_of_fit(task_data):
    torch.manual_seed(0)
    net, callback = TaskNet(hidden=32), EWCCallback(ewc_lambda=10.0)
    fit_task(net, callback, task_data, 0)
    assert callback.num_tasks == 1
    for name, p in net.named_parameters():
        assert torch.equal(callback.state.centre[name], p.detach())
    want = estimate_fisher(net, DataLoader(task_data[0], batch_size=32), "exact", logits_fn=lambda b: net(b[0], 0))
    for name in want:
        torch.testing.assert_close(callback.state.importance[name], want[name], rtol=1e-5, atol=1e-9)
    assert callback.last_estimate.count == len(task_data[0])
    assert set(callback.last_estimate.routes.values()) == {"linear"}
    # heads of other tasks did not take part in task 0's log-likelihood
    assert callback.state.importance["heads.1.weight"].abs().sum() == 0
    assert callback.state.importance["heads.0.weight"].abs().sum() > 0


def test_penalty_is_added_to_the_loss_lightning_backpropagates_and_logged(task_data):
    torch.manual_seed(0)
    net, callback = TaskNet(hidden=32), EWCCallback(ewc_lambda=100.0)
    trainer = fit_task(net, callback, task_data, 0)
    assert float(trainer.callback_metrics["ewc/penalty"]) == 0.0  # nothing consolidated during task 0

    class Spy(L.Callback):
        expected, seen = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():  # the loss Lightning should see, at the weights before this step
                task_loss = nn.functional.cross_entropy(pl_module(batch[0]), batch[1])
                self.expected.append((float(task_loss), float(callback.penalty(pl_module))))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(float(outputs["loss"]))
            self.logged = float(trainer.callback_metrics["ewc/penalty"])

    net.task = 1
    spy = Spy()
    make_trainer(max_steps=4, callbacks=[callback, spy]).fit(net, loader(task_data[1], 32, shuffle=False))
    assert len(spy.seen) == 4
    for (task_loss, penalty), seen in zip(spy.expected, spy.seen):
        assert seen == pytest.approx(task_loss + penalty, rel=1e-5)
    assert spy.expected[0][1] == 0.0 and spy.expected[-1][1] > 0  # at the anchor, then pulled away by task 1
    assert spy.logged == pytest.approx(spy.expected[-1][1], rel=1e-5)


def test_penalty_is_logged_at_the_trainers_logging_steps_only(task_data, tmp_path):
    """Logged where Lightning writes step metrics (every log_every_n_steps), with that step's value; every step's
    loss still carries the penalty."""
    torch.manual_seed(0)
    net, callback = TaskNet(hidden=32), EWCCallback(ewc_lambda=100.0)
    fit_task(net, callback, task_data, 0)
    penalties = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            penalties.append(float(callback.penalty(pl_module).detach()))

    net.task = 1
    csv = L.loggers.CSVLogger(tmp_path, name="log")
    trainer = make_trainer(max_steps=7, log_every_n_steps=3, logger=csv, callbacks=[callback, Record()])
    trainer.fit(net, loader(task_data[1], 32, shuffle=False))
    rows = [line.split(",") for line in (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()]
    column, step = rows[0].index("ewc/penalty"), rows[0].index("step")
    logged = {int(r[step]): float(r[column]) for r in rows[1:] if r[column]}
    assert sorted(logged) == [2, 5]
    for k, value in logged.items():
        assert value == pytest.approx(penalties[k], rel=1e-5) and value > 0


def test_penalty_grows_as_weights_leave_the_anchor(task_data):
    torch.manual_seed(0)
    net, callback = TaskNet(hidden=32), EWCCallback(ewc_lambda=100.0)
    fit_task(net, callback, task_data, 0)
    fit_task(net, callback, task_data, 1, max_steps=6)
    penalty = float(callback.penalty(net).detach())
    names = list(callback.state.importance)
    params = {n: p.detach() for n, p in net.named_parameters()}
    by_hand = 0.5 * 100.0 * sum(
        float((callback.state.importance[n] * (params[n] - callback.state.centre[n]) ** 2).sum()) for n in names
    ) + 0.5 * 100.0 * callback.state.constant
    assert penalty > 0
    assert penalty == pytest.approx(by_hand, rel=1e-5)


def test_no_consolidation_when_fit_raises(task_data):
    class Exploding(TaskNet):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    net, callback = Exploding(hidden=16), EWCCallback()
    with pytest.raises(RuntimeError, match="boom"):
        fit_task(net, callback, task_data, 0)
    assert callback.num_tasks == 0


def test_no_consolidation_on_keyboard_interrupt(task_data):
    class Interrupted(TaskNet):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    net, callback = Interrupted(hidden=16), EWCCallback()
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into a graceful shutdown and exit(1)
            fit_task(net, callback, task_data, 0)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert callback.num_tasks == 0


def test_early_stopping_ends_the_task_normally(task_data):
    class Validating(TaskNet):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(1.0))  # never improves: early stopping after `patience` checks

    net, callback = Validating(hidden=16), EWCCallback()
    net.task = 0
    trainer = make_trainer(max_epochs=50, callbacks=[callback, EarlyStopping("val_loss", patience=1)])
    trainer.fit(net, loader(task_data[0], 64), loader(task_data[0], 64, shuffle=False))
    assert trainer.current_epoch < 50
    assert callback.num_tasks == 1


def test_include_exclude_and_frozen_parameters(task_data):
    torch.manual_seed(0)
    net = TaskNet(hidden=16)
    net.trunk[0].bias.requires_grad_(False)
    callback = EWCCallback(include=["trunk.*", "heads.0.*"], exclude=["*.2.bias"])
    fit_task(net, callback, task_data, 0)
    assert set(callback.state.importance) == {"trunk.0.weight", "trunk.2.weight", "heads.0.weight", "heads.0.bias"}

    frozen_only = TaskNet(hidden=16)
    frozen_only.trunk[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="selected no parameter"):
        fit_task(frozen_only, EWCCallback(include=["trunk.0.bias"]), task_data, 0)


@pytest.mark.parametrize("kwargs", [{"include": ["encoder.*"]}, {"exclude": ["heads.*", "head.*"]}])
def test_a_pattern_matching_no_parameter_is_refused_before_the_first_task_trains(task_data, kwargs):
    net = TaskNet(hidden=16)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer = make_trainer(max_steps=3, callbacks=[EWCCallback(**kwargs)])
    with pytest.raises(ValueError, match=r"pattern '(encoder|head)\.\*' matches no parameter of TaskNet"):
        trainer.fit(net, loader(task_data[0], 32))
    assert trainer.global_step == 0  # refused before any training, not a task later
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())


def test_new_head_is_anchored_only_after_its_own_task(task_data):
    class Growing(EWCMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Linear(784, 16)
            self.heads = nn.ModuleList([nn.Linear(16, 2)])

        def forward(self, x):
            return self.heads[-1](torch.relu(self.trunk(x)))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    net, callback = Growing(), EWCCallback(ewc_lambda=1.0)
    make_trainer(max_steps=4, callbacks=[callback]).fit(net, loader(task_data[0], 32))
    net.heads.append(nn.Linear(16, 2))
    assert "heads.1.weight" not in callback.state.importance
    make_trainer(max_steps=4, callbacks=[callback]).fit(net, loader(task_data[1], 32))
    assert callback.num_tasks == 2
    assert torch.equal(callback.state.centre["heads.1.weight"], net.heads[1].weight.detach())
    # the old head took no part in task 1's likelihood: its spring still sits at its task-0 weights
    assert callback.state.importance["heads.1.weight"].abs().sum() > 0


def test_resized_parameter_fails_at_the_next_training_step(task_data):
    torch.manual_seed(0)
    net, callback = TaskNet(hidden=16), EWCCallback()
    fit_task(net, callback, task_data, 0)
    net.heads[1] = nn.Linear(16, 2)
    net.heads[0] = nn.Linear(16, 3)  # the consolidated head changed its number of classes
    with pytest.raises(ValueError, match="heads.0.weight.*resized"):
        fit_task(net, callback, task_data, 1)


def test_training_step_returning_a_dict_gets_the_penalty(task_data):
    class DictNet(TaskNet):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "extra": 1}

    torch.manual_seed(0)
    net, callback = DictNet(hidden=16), EWCCallback(ewc_lambda=1e4)
    fit_task(net, callback, task_data, 0)
    fit_task(net, callback, task_data, 1, max_steps=3)
    batch = next(iter(loader(task_data[1], 32)))
    out = net.training_step(batch, 0)
    assert out["loss"].requires_grad  # a loss to backpropagate, penalty included
    penalty = float(callback.penalty(net).detach())
    assert penalty > 0 and out["extra"] == 1
    task_loss = float(nn.functional.cross_entropy(net(batch[0]), batch[1]).detach())
    assert float(out["loss"].detach()) == pytest.approx(task_loss + penalty, rel=1e-6)


def test_subclass_calling_super_training_step_adds_the_penalty_once(task_data):
    class Child(TaskNet):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    net, callback = Child(hidden=16), EWCCallback(ewc_lambda=1e3)
    fit_task(net, callback, task_data, 0)
    fit_task(net, callback, task_data, 1, max_steps=2)
    batch = next(iter(loader(task_data[1], 32)))
    task_loss = TaskNet.training_step.__wrapped__(net, batch, 0)
    total = net.training_step(batch, 0)
    assert float(total.detach()) == pytest.approx(float((task_loss + callback.penalty(net)).detach()), rel=1e-6)


def test_mixin_over_an_existing_module_wraps_its_inherited_training_step(task_data):
    class Existing(L.LightningModule):  # the user's module, untouched
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(784, 2)

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Continual(EWCMixin, Existing):
        pass

    torch.manual_seed(0)
    net, callback = Continual(), EWCCallback(ewc_lambda=1e3)
    make_trainer(max_steps=3, callbacks=[callback]).fit(net, loader(task_data[0], 32))
    make_trainer(max_steps=3, callbacks=[callback]).fit(net, loader(task_data[1], 32))
    batch = next(iter(loader(task_data[1], 32)))
    penalty = float(callback.penalty(net).detach())
    assert penalty > 0
    with_penalty, without = net.training_step(batch, 0), Existing.training_step(net, batch, 0)
    assert float(with_penalty.detach()) == pytest.approx(float(without.detach()) + penalty, rel=1e-6)
    assert "training_step" not in EWCMixin.__dict__  # Lightning's default stays recognisably un-overridden


def test_callback_on_module_without_mixin_is_refused(task_data):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(784, 2)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"class Plain\(EWCMixin, LightningModule\)"):
        make_trainer(max_steps=1, callbacks=[EWCCallback()]).fit(Plain(), loader(task_data[0], 32))


def test_mixin_without_callback_trains_with_zero_penalty_and_says_so_once(task_data):
    net = TaskNet(hidden=16)
    with pytest.warns(UserWarning, match="no EWCCallback") as record:
        fit_task(net, None, task_data, 0, max_steps=3)
    assert sum("no EWCCallback" in str(w.message) for w in record) == 1
    assert float(net.ewc_penalty().detach()) == 0.0


def test_two_callbacks_are_refused():
    # Lightning itself refuses two stateful callbacks of one type (their checkpoint states would collide).
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `EWCCallback`"):
        make_trainer(max_steps=1, callbacks=[EWCCallback(), EWCCallback()])


def test_empty_fisher_dataloader_is_a_clear_error(task_data):
    empty = DataLoader(TensorDataset(torch.zeros(0, 784), torch.zeros(0, dtype=torch.long)), batch_size=8)
    net, callback = TaskNet(hidden=8), EWCCallback(fisher_dataloader=empty)
    with pytest.raises(ValueError, match="no samples"):
        fit_task(net, callback, task_data, 0, max_steps=2)
    assert callback.num_tasks == 0


def test_non_finite_fisher_is_a_clear_error(task_data):
    bad = TensorDataset(torch.full((16, 784), float("nan")), torch.zeros(16, dtype=torch.long))
    net, callback = TaskNet(hidden=8), EWCCallback(fisher_dataloader=DataLoader(bad, batch_size=8))
    with pytest.raises(FloatingPointError, match="non-finite"):
        fit_task(net, callback, task_data, 0, max_steps=2)
    assert callback.num_tasks == 0


def test_model_output_that_is_not_logits_is_a_clear_error(task_data):
    class TupleOut(TaskNet):
        def forward(self, x, task=None):
            return super().forward(x, task), x

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0])[0], batch[1])

    with pytest.raises(TypeError, match="ewc_logits"):
        fit_task(TupleOut(hidden=8), EWCCallback(), task_data, 0, max_steps=2)


def test_num_samples_uses_a_subset_of_that_size(task_data):
    net, callback = TaskNet(hidden=8), EWCCallback(num_samples=100, fisher_batch_size=64)
    fit_task(net, callback, task_data, 0, max_steps=2)
    assert callback.last_estimate.count == 100


def test_consolidate_by_hand_for_custom_loops(task_data):
    torch.manual_seed(0)
    net, callback = TaskNet(hidden=8), EWCCallback(fisher="empirical")
    callback.consolidate(net, dataloader=DataLoader(task_data[0], batch_size=50))
    assert callback.num_tasks == 1
    want = estimate_fisher(net, DataLoader(task_data[0], batch_size=50), "empirical")
    for name in want:
        torch.testing.assert_close(callback.state.importance[name], want[name], rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="no data to estimate"):
        callback.consolidate(net)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_consolidate_by_hand_inside_no_grad_or_inference_mode_then_train(task_data, context):
    """Custom loops often end a task inside an evaluation block; the state made there must serve training after."""
    torch.manual_seed(0)
    net = TaskNet(hidden=8)
    outside, inside = EWCCallback(ewc_lambda=10.0), EWCCallback(ewc_lambda=10.0)
    outside.consolidate(net, dataloader=DataLoader(task_data[0], batch_size=50))
    with context():
        inside.consolidate(net, dataloader=DataLoader(task_data[0], batch_size=50))
    for name, f in outside.state.importance.items():
        torch.testing.assert_close(inside.state.importance[name], f, rtol=1e-6, atol=0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    net.task = 1
    trainer = make_trainer(max_steps=2, callbacks=[inside])
    trainer.fit(net, DataLoader(task_data[1], batch_size=32))  # penalty and its gradient with that state
    assert inside.num_tasks == 2 and float(inside.penalty(net).detach()) > 0
