"""The EWC penalty through real Trainers in the ways people train: both Lightning namespaces, gradient accumulation,
bf16 autocast, manual optimization, one Trainer fitted several times, and a new Trainer per task."""

from __future__ import annotations

import lightning.pytorch
import pytest
import pytorch_lightning
import torch
from helpers import QUIET_TRAINER, TaskNet, loader, make_trainer, split_mnist_task
from torch import nn
from torch.utils.data import DataLoader

from lightning_ewc import EWCCallback, EWCMixin, estimate_fisher

HIDDEN = 24
QUIET = QUIET_TRAINER


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
def task_data(task: int, n: int = 64):
    return split_mnist_task(task, train=True, limit=n)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def snapshot(callback: EWCCallback) -> dict:
    """λ and a copy of the consolidated state: the penalty a fit sees is the state before that fit consolidates."""
    state = callback.state
    return {
        "lambda": callback.ewc_lambda,
        "importance": {k: v.detach().clone() for k, v in state.importance.items()},
        "centre": {k: v.detach().clone() for k, v in state.centre.items()},
        "constant": state.constant,
        "num_tasks": state.num_tasks,
    }


def hand_penalty(snap: dict, params: dict[str, torch.Tensor]) -> float:
    """(λ/2) (Σ_i F_i (θ_i − c_i)² + const) from a state snapshot, in float64."""
    quadratic = sum(
        (f.double() * (params[name].double() - snap["centre"][name].double()).square()).sum().item()
        for name, f in snap["importance"].items()
    )
    return 0.5 * snap["lambda"] * (quadratic + snap["constant"])


def sum_of_springs(ewc_lambda: float, springs: list, params: dict[str, torch.Tensor]) -> float:
    """(λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)², one spring per task, in float64."""
    total = 0.0
    for fisher, anchor in springs:
        for name, f in fisher.items():
            total += (f.double() * (params[name].double() - anchor[name].double()).square()).sum().item()
    return 0.5 * ewc_lambda * total


def penalty_gradient(snap: dict, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∂/∂θ (λ/2) Σ F (θ − c)² = λ F (θ − c), by hand (zero for parameters not in the state)."""
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    for name, f in snap["importance"].items():
        grads[name] = snap["lambda"] * f * (params[name] - snap["centre"][name])
    return grads


def assert_tensors_close(actual: dict, expected: dict, rel: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().item()
        err = (actual[name].double() - expected[name].double()).abs().max().item()
        assert err <= rel * scale + 1e-12, f"{name}: max |diff| {err:.3e}, scale {scale:.3e}"


def distance(a: dict, b: dict) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def perturb_(module: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Moves the weights away from the centre, so that the penalty gradient is non-zero at the next step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def probe_class(namespace):
    """A callback (of the given Lightning namespace) that records, per training step, the weights the step used, the
    ``ewc/penalty`` the mixin logged, and the loss Lightning received from ``training_step``."""

    class Probe(namespace.Callback):
        def __init__(self) -> None:
            self.steps: list[dict] = []
            self._pending: dict | None = None

        def _flush(self, trainer) -> None:
            # callback_metrics are updated after on_train_batch_end: read a step's logged value one hook later.
            if self._pending is not None:
                metric = trainer.callback_metrics.get("ewc/penalty")
                self._pending["logged"] = None if metric is None else metric.item()
                self.steps.append(self._pending)
                self._pending = None

        def on_train_start(self, trainer, pl_module) -> None:
            self._pending = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._flush(trainer)
            self._pending = {"params": params_of(pl_module)}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._pending["loss_seen"] = outputs["loss"].item()

        def on_train_end(self, trainer, pl_module) -> None:
            self._flush(trainer)

    return Probe


def net_class(namespace):
    """TaskNet's architecture on the given namespace's LightningModule, recording each step's task loss."""

    class Net(EWCMixin, namespace.LightningModule):
        def __init__(self, lr: float = 1e-2) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(784, HIDDEN), nn.ReLU())
            self.heads = nn.ModuleList(nn.Linear(HIDDEN, 2) for _ in range(2))
            self.task = 0
            self.lr = lr
            self.task_losses: list[float] = []

        def forward(self, x):
            return self.heads[self.task](self.trunk(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.task_losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    return Net


class SGDTaskNet(TaskNet):
    """TaskNet with plain SGD (no momentum, no weight decay), so that an update is exactly −lr × gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def task_gradient(model: TaskNet, state: dict, task: int, batches: list) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of the gradients of the task loss, on a copy of ``model`` at weights ``state``."""
    ref = TaskNet(hidden=HIDDEN, num_tasks=len(model.heads))
    ref.load_state_dict(state)
    ref.task = task
    grads = {name: torch.zeros_like(p) for name, p in ref.named_parameters()}
    for x, y in batches:
        loss = nn.functional.cross_entropy(ref(x), y)
        for (name, p), g in zip(
            ref.named_parameters(), torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)
        ):
            if g is not None:
                grads[name] += g / len(batches)
    return grads


def train_tasks(model, ewc, tasks, namespace=lightning.pytorch, probe=None, n=64, batch_size=16, steps=4, **trainer_kw):
    """Fits ``model`` on each task with a new Trainer; returns the state snapshot each fit started from."""
    started_from = []
    for task in tasks:
        model.task = task
        started_from.append(snapshot(ewc))
        callbacks = [probe, ewc] if probe is not None else [ewc]
        trainer = namespace.Trainer(max_steps=steps, callbacks=callbacks, **{**QUIET, **trainer_kw})
        trainer.fit(model, loader(task_data(task, n), batch_size=batch_size))
        assert ewc.num_tasks == started_from[-1]["num_tasks"] + 1
    return started_from, trainer


# ----------------------------------------------------------------------------------------------------------------------
# a. Both Lightning namespaces
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("namespace", [pytorch_lightning, lightning.pytorch], ids=["pytorch_lightning", "lightning"])
def test_namespace_two_tasks_penalty_logged_and_added(namespace, mnist_dir):
    torch.manual_seed(0)
    model = net_class(namespace)()
    ewc = EWCCallback(ewc_lambda=100.0)
    probe = probe_class(namespace)()
    started_from, trainer = train_tasks(model, ewc, [0, 1], namespace=namespace, probe=probe)
    assert isinstance(trainer, namespace.Trainer)
    assert ewc.num_tasks == 2
    assert len(probe.steps) == 8 and len(model.task_losses) == 8

    for i, (step, task_loss) in enumerate(zip(probe.steps, model.task_losses)):
        snap = started_from[i // 4]  # the state the step's fit started from (task 2 is consolidated after it)
        expected = hand_penalty(snap, step["params"])
        assert step["logged"] == pytest.approx(expected, rel=1e-5, abs=1e-9), f"step {i}"
        # The penalty reached the loss that Lightning backpropagated, exactly once.
        assert step["loss_seen"] == pytest.approx(task_loss + step["logged"], rel=1e-6, abs=1e-7), f"step {i}"

    assert all(step["logged"] == 0.0 for step in probe.steps[:4])  # task 1: nothing consolidated yet
    assert probe.steps[4]["logged"] == pytest.approx(0.0, abs=1e-9)  # task 2 starts at θ*_1, the only centre
    assert probe.steps[-1]["logged"] > 1e-3
    assert trainer.callback_metrics["ewc/penalty"].item() == pytest.approx(probe.steps[-1]["logged"], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# b. Gradient accumulation
# ----------------------------------------------------------------------------------------------------------------------
def test_gradient_accumulation_counts_penalty_once_per_optimizer_step(mnist_dir):
    torch.manual_seed(0)
    lr, lam = 0.1, 200.0
    model = SGDTaskNet(hidden=HIDDEN, num_tasks=2, lr=lr)
    ewc = EWCCallback(ewc_lambda=lam)
    make_trainer(max_steps=3, callbacks=[ewc]).fit(model, loader(task_data(0), batch_size=16))
    assert ewc.num_tasks == 1

    perturb_(model)
    model.task = 1
    snap, before = snapshot(ewc), params_of(model)
    data = task_data(1)
    micro = [data[0:16], data[16:32]]  # the two micro-batches of the one optimizer step (shuffle=False)
    trainer = make_trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[ewc])
    trainer.fit(model, loader(data, batch_size=16, shuffle=False))
    assert trainer.global_step == 1 and ewc.num_tasks == 2
    update = {name: p.detach() - before[name] for name, p in model.named_parameters()}

    g_task = task_gradient(model, before, task=1, batches=micro)
    g_pen = penalty_gradient(snap, before)
    expected = {name: -lr * (g_task[name] + g_pen[name]) for name in before}
    assert_tensors_close(update, expected, rel=1e-4)
    # The check tells the right scaling from a penalty counted per micro-batch (×2) or divided twice (×½).
    assert max(g.abs().max().item() for g in g_pen.values()) > 1e-2
    for factor in (0.5, 2.0):
        wrong = {name: -lr * (g_task[name] + factor * g_pen[name]) for name in before}
        assert distance(update, wrong) > 100 * distance(update, expected)


# ----------------------------------------------------------------------------------------------------------------------
# c. bf16 mixed precision
# ----------------------------------------------------------------------------------------------------------------------
def test_bf16_mixed_penalty_is_float32(mnist_dir):
    torch.manual_seed(0)
    model = TaskNet(hidden=HIDDEN, num_tasks=2, lr=1e-2)
    ewc = EWCCallback(ewc_lambda=100.0)
    probe = probe_class(lightning.pytorch)()
    started_from, _ = train_tasks(model, ewc, [0, 1], probe=probe, precision="bf16-mixed")

    assert ewc.num_tasks == 2 and torch.isfinite(torch.tensor(ewc.state.constant))
    for table in (ewc.state.importance, ewc.state.centre):
        for name, t in table.items():
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), name
    assert ewc.state.importance["trunk.0.weight"].max() > 0 and ewc.state.importance["heads.1.weight"].max() > 0

    task2 = probe.steps[4:]
    assert len(task2) == 4
    for step in task2:
        assert step["logged"] is not None and torch.isfinite(torch.tensor(step["logged"]))
        # float32 arithmetic: bf16 (8 bits of mantissa) would be off by ~1e-2 relative.
        assert step["logged"] == pytest.approx(hand_penalty(started_from[1], step["params"]), rel=1e-5, abs=1e-9)
    assert task2[-1]["logged"] > 1e-3

    perturb_(model, scale=0.01)  # anywhere, not only at a centre
    plain = ewc.penalty(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = ewc.penalty(model)
    assert plain.dtype == under.dtype == torch.float32
    assert under.item() == pytest.approx(plain.item(), rel=1e-6)
    assert plain.item() == pytest.approx(hand_penalty(snapshot(ewc), params_of(model)), rel=1e-5)
    assert plain.item() > 0


# ----------------------------------------------------------------------------------------------------------------------
# d. Manual optimization
# ----------------------------------------------------------------------------------------------------------------------
class ManualNet(TaskNet):
    """Manual optimization: the user adds ``self.ewc_penalty()`` to the loss and steps the optimizer."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.records: list[dict] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        task_loss = nn.functional.cross_entropy(self(x), y)
        penalty = self.ewc_penalty()
        loss = task_loss + penalty
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        self.records.append({"task": task_loss.item(), "penalty": penalty.item(), "loss": loss.item()})
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_manual_optimization_penalty_added_once(mnist_dir):
    torch.manual_seed(0)
    lr, lam = 0.1, 200.0
    model = ManualNet(hidden=HIDDEN, num_tasks=2, lr=lr)
    ewc = EWCCallback(ewc_lambda=lam)
    make_trainer(max_steps=3, callbacks=[ewc]).fit(model, loader(task_data(0), batch_size=16))
    assert ewc.num_tasks == 1 and len(model.records) == 3
    assert all(r["penalty"] == 0.0 for r in model.records)

    perturb_(model)
    model.task = 1
    snap, before = snapshot(ewc), params_of(model)
    data = task_data(1)
    probe = probe_class(lightning.pytorch)()
    trainer = make_trainer(max_steps=1, callbacks=[probe, ewc])
    trainer.fit(model, loader(data, batch_size=32, shuffle=False))
    assert trainer.global_step == 1 and ewc.num_tasks == 2 and len(model.records) == 4

    record = model.records[-1]
    assert record["penalty"] == pytest.approx(hand_penalty(snap, before), rel=1e-5)
    assert record["penalty"] > 1e-2
    # Lightning received the loss training_step computed, not one with the penalty added a second time.
    assert probe.steps[0]["loss_seen"] == record["loss"]
    assert record["loss"] == pytest.approx(record["task"] + record["penalty"], rel=1e-6)

    # The update is one SGD step on task loss + penalty, the penalty's gradient counted once.
    update = {name: p.detach() - before[name] for name, p in model.named_parameters()}
    g_task = task_gradient(model, before, task=1, batches=[data[0:32]])
    g_pen = penalty_gradient(snap, before)
    expected = {name: -lr * (g_task[name] + g_pen[name]) for name in before}
    assert_tensors_close(update, expected, rel=1e-4)
    twice = {name: -lr * (g_task[name] + 2 * g_pen[name]) for name in before}
    assert distance(update, twice) > 100 * distance(update, expected)


# ----------------------------------------------------------------------------------------------------------------------
# e. One Trainer, fitted again
# ----------------------------------------------------------------------------------------------------------------------
def test_same_trainer_fitted_again(mnist_dir):
    torch.manual_seed(0)
    model = TaskNet(hidden=HIDDEN, num_tasks=2, lr=1e-2)
    ewc = EWCCallback(ewc_lambda=10.0)
    trainer = make_trainer(max_epochs=1, callbacks=[ewc])
    trainer.fit(model, loader(task_data(0), batch_size=32))
    assert ewc.num_tasks == 1 and trainer.global_step == 2
    f1 = {k: v.clone() for k, v in ewc.state.importance.items()}

    model.task = 1
    data1 = task_data(1)
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, loader(data1, batch_size=32))
    assert ewc.num_tasks == 2 and trainer.global_step == 4
    # Task 2's importance was estimated on the second fit's data with head 1, not on the first fit's dataloader.
    f2 = estimate_fisher(model, DataLoader(data1, batch_size=32), "exact", logits_fn=lambda b: model(b[0], 1))
    added = {k: ewc.state.importance[k] - f1[k] for k in f1}
    assert_tensors_close(added, f2, rel=1e-4)
    assert f2["heads.1.weight"].max() > 0

    before, weights, step = snapshot(ewc), params_of(model), trainer.global_step
    with pytest.warns(UserWarning, match="no optimizer step"):
        trainer.fit(model, loader(data1, batch_size=32))
    assert trainer.global_step == step
    assert ewc.num_tasks == 2
    assert distance(params_of(model), weights) == 0.0
    after = snapshot(ewc)
    assert after["constant"] == before["constant"]
    assert distance(after["importance"], before["importance"]) == 0.0
    assert distance(after["centre"], before["centre"]) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# f. A new Trainer per task
# ----------------------------------------------------------------------------------------------------------------------
def test_new_trainer_per_task_penalty_is_sum_of_task_springs(mnist_dir):
    torch.manual_seed(0)
    lam = 50.0
    model = TaskNet(hidden=HIDDEN, num_tasks=3, lr=1e-2)
    ewc = EWCCallback(ewc_lambda=lam)
    springs = []
    for task in range(2):
        data = task_data(task, 96)
        train_tasks(model, ewc, [task], n=96, batch_size=32)
        assert ewc.num_tasks == task + 1
        # The callback's estimate: the fit's training set in index order, batches of the train loader's size.
        fisher = estimate_fisher(
            model, DataLoader(data, batch_size=32), "exact", logits_fn=lambda b, t=task: model(b[0], t)
        )
        springs.append((fisher, params_of(model)))

    # Start of task 3 (θ = θ*_2): only task 1's spring is stretched.
    model.task = 2
    start = sum_of_springs(lam, springs, params_of(model))
    assert start > 1e-3
    assert ewc.penalty(model).item() == pytest.approx(start, rel=1e-5)

    probe = probe_class(lightning.pytorch)()
    train_tasks(model, ewc, [2], probe=probe, n=96, batch_size=32)
    assert ewc.num_tasks == 3
    assert len(probe.steps) == 4
    assert probe.steps[0]["logged"] == pytest.approx(start, rel=1e-5)
    for i, step in enumerate(probe.steps):
        assert step["logged"] == pytest.approx(sum_of_springs(lam, springs, step["params"]), rel=1e-5), f"step {i}"
    # By the last step both springs are stretched, so the sum is really over two tasks.
    last = probe.steps[-1]["params"]
    assert all(sum_of_springs(lam, [spring], last) > 1e-4 for spring in springs)


# ----------------------------------------------------------------------------------------------------------------------
# c'. Half-precision weights (bf16-true): the state and the penalty stay float32
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("penalty_via", ["loss", "gradient"])
def test_bf16_true_weights_keep_a_float32_state_and_penalty(mnist_dir, penalty_via):
    torch.manual_seed(0)
    model = TaskNet(hidden=HIDDEN, num_tasks=2, lr=1e-2)
    ewc = EWCCallback(ewc_lambda=100.0, penalty_via=penalty_via)
    probe = probe_class(lightning.pytorch)()
    started_from, _ = train_tasks(model, ewc, [0], probe=probe, precision="bf16-true")
    assert next(model.parameters()).dtype == torch.bfloat16  # Lightning converted the weights themselves
    # The Fisher of these bf16 weights again, in float32 from the same weights and data: bf16 passes keep 2-3 digits.
    reference = TaskNet(hidden=HIDDEN, num_tasks=2)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    want = estimate_fisher(reference, loader(task_data(0), batch_size=16, shuffle=False), "exact",
                           logits_fn=lambda batch: reference(batch[0], 0))
    for name, f in ewc.state.importance.items():
        assert f.dtype == ewc.state.centre[name].dtype == torch.float32, name
        assert float((f - want[name]).norm()) <= 3e-2 * float(want[name].norm()) + 1e-12, name
    assert ewc.state.importance["trunk.0.weight"].max() > 0

    started_from += train_tasks(model, ewc, [1], probe=probe, precision="bf16-true")[0]
    for table in (ewc.state.importance, ewc.state.centre):
        for name, t in table.items():
            assert t.dtype == torch.float32 and torch.isfinite(t).all(), name
    for step in probe.steps[4:]:
        assert step["logged"] == pytest.approx(hand_penalty(started_from[1], step["params"]), rel=1e-3, abs=1e-9)
    assert probe.steps[-1]["logged"] > 1e-3
    assert ewc.state.importance["trunk.0.weight"].max() > 0 and ewc.state.importance["heads.1.weight"].max() > 0
    assert ewc.penalty(model).dtype == torch.float32
