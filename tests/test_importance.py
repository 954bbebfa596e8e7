"""l2, MAS and SI importances equal their definitions, through a real Trainer."""

import copy

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from helpers import TaskNet, loader, make_trainer, split_mnist_task
from lightning_ewc import EWCCallback


class SGDNet(TaskNet):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.fixture(scope="module")
def data(mnist_dir):
    return [split_mnist_task(t, limit=128) for t in range(2)]


def test_l2_is_uniform_importance_and_plain_l2_to_previous_weights(data):
    torch.manual_seed(0)
    net, callback = SGDNet(hidden=8, lr=0.1), EWCCallback(ewc_lambda=3.0, importance="l2")
    anchors = []
    for task in range(2):
        net.task = task
        make_trainer(max_steps=3, callbacks=[callback]).fit(net, loader(data[task], 32))
        anchors.append({n: p.detach().clone() for n, p in net.named_parameters()})
        ones = task + 1
        for f in callback.state.importance.values():  # stored as √F, so equal to float rounding
            torch.testing.assert_close(f, torch.full_like(f, ones), rtol=1e-6, atol=0)
    for n, p in net.named_parameters():  # two unit springs: centred between the two anchors
        torch.testing.assert_close(callback.state.centre[n], (anchors[0][n] + anchors[1][n]) / 2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    want = 0.5 * 3.0 * sum(float(((p.detach() - a[n]) ** 2).sum()) for a in anchors for n, p in net.named_parameters())
    assert float(callback.penalty(net).detach()) == pytest.approx(want, rel=1e-5)


def test_mas_is_mean_absolute_gradient_of_squared_output_norm(data):
    torch.manual_seed(0)
    net, callback = SGDNet(hidden=8, lr=0.1), EWCCallback(importance="mas")
    make_trainer(max_steps=3, callbacks=[callback]).fit(net, loader(data[0], 32))
    net.eval()
    params = dict(net.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    x_all = data[0].tensors[0]
    for i in range(len(x_all)):  # brute force: one sample at a time
        out = net(x_all[i : i + 1], 0)
        grads = torch.autograd.grad(out.pow(2).sum(), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                want[n] += g.abs()
    for n in want:
        torch.testing.assert_close(callback.state.importance[n], want[n] / len(x_all), rtol=1e-5, atol=1e-9)
    assert callback.last_estimate.count == len(x_all)


def test_si_is_the_path_integral_over_the_optimizer_steps(data):
    torch.manual_seed(0)
    lr, xi, steps = 0.2, 0.05, 6
    net = SGDNet(hidden=8, lr=lr)
    start = copy.deepcopy(net)
    callback = EWCCallback(importance="si", si_damping=xi, mode="online")
    make_trainer(max_steps=steps, callbacks=[callback]).fit(net, loader(data[0], 16, shuffle=False))

    # Replay the same SGD steps by hand: ω = Σ −g·Δθ, Ω = max(0, ω / ((θ_end − θ_start)² + ξ)).
    replay = copy.deepcopy(start)
    params = dict(replay.named_parameters())
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    for i, (x, y) in enumerate(DataLoader(data[0], batch_size=16)):
        if i == steps:
            break
        loss = nn.functional.cross_entropy(replay(x, 0), y)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads):
                if g is None:
                    continue
                before = p.clone()
                p -= lr * g
                omega[n] += -g * (p - before)
    for n, p in params.items():
        torch.testing.assert_close(p, dict(net.named_parameters())[n])  # the replay followed the same path
        travelled = (p.detach() - dict(start.named_parameters())[n].detach()) ** 2
        want = (omega[n] / (travelled + xi)).clamp_min(0)
        torch.testing.assert_close(callback.state.importance[n], want, rtol=1e-5, atol=1e-8)
    assert callback.state.importance["trunk.0.weight"].sum() > 0
    assert callback.state.importance["heads.1.weight"].abs().sum() == 0  # untouched head: no path, no importance


def test_si_accumulates_across_tasks_and_restarts_its_path(data):
    torch.manual_seed(0)
    net, callback = SGDNet(hidden=8, lr=0.1), EWCCallback(importance="si", mode="online", gamma=1.0)
    make_trainer(max_steps=3, callbacks=[callback]).fit(net, loader(data[0], 32))
    first = {n: f.clone() for n, f in callback.state.importance.items()}
    assert not callback.path_integral.active  # accumulators are released between tasks
    net.task = 1
    make_trainer(max_steps=3, callbacks=[callback]).fit(net, loader(data[1], 32))
    assert callback.num_tasks == 2
    grew = callback.state.importance["heads.1.weight"].sum() - first["heads.1.weight"].sum()
    assert grew > 0
    assert torch.all(callback.state.importance["heads.0.weight"] >= first["heads.0.weight"] - 1e-7)


# ----------------------------------------------------------------------------------------------------------------------
# SI measures each optimizer step where the optimizer takes it
# ----------------------------------------------------------------------------------------------------------------------
def replay_path_integral(start: TaskNet, data, batch_size: int, steps: int, lr: float, accumulate: int = 1):
    """SGD replayed by hand, ``accumulate`` micro-batches (loss divided by it) per step: ω = Σ −g·Δθ."""
    replay = copy.deepcopy(start)
    params = dict(replay.named_parameters())
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    batches = iter(DataLoader(data, batch_size=batch_size))
    for _ in range(steps):
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        for _ in range(accumulate):
            x, y = next(batches)
            loss = nn.functional.cross_entropy(replay(x, 0), y) / accumulate
            for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    grads[n] += g
        with torch.no_grad():
            for n, p in params.items():
                before = p.clone()
                p -= lr * grads[n]
                omega[n] += -grads[n] * (p - before)
    return replay, omega


def assert_si_importance(callback, start, end, omega, xi):
    for n, p in dict(end.named_parameters()).items():
        travelled = (p.detach() - dict(start.named_parameters())[n].detach()) ** 2
        want = (omega[n] / (travelled + xi)).clamp_min(0)
        torch.testing.assert_close(callback.state.importance[n], want, rtol=1e-5, atol=1e-8, msg=n)


class ManualSGDNet(SGDNet):
    """Manual optimization the ways people write it: zero_grad before or after the step, and accumulation."""

    def __init__(self, zero_grad: str, accumulate: int, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.zero_grad_when, self.accumulate = zero_grad, accumulate

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        if self.zero_grad_when == "before":
            optimizer.zero_grad()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y) / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            optimizer.step()
            if self.zero_grad_when == "after":
                optimizer.zero_grad()


@pytest.mark.parametrize("zero_grad, accumulate", [("before", 1), ("after", 1), ("after", 2)])
def test_si_under_manual_optimization_measures_each_step_it_takes(data, zero_grad, accumulate):
    """`.grad` is zeroed right after the step in the second form: read at batch end it would give SI no importance."""
    torch.manual_seed(0)
    lr, xi, steps = 0.2, 0.05, 4
    net = ManualSGDNet(zero_grad, accumulate, hidden=8, lr=lr)
    start = copy.deepcopy(net)
    callback = EWCCallback(importance="si", si_damping=xi, mode="online")
    make_trainer(max_steps=steps, callbacks=[callback]).fit(net, loader(data[0], 16, shuffle=False))
    replay, omega = replay_path_integral(start, data[0], 16, steps, lr, accumulate)
    for p, q in zip(replay.parameters(), net.parameters()):
        torch.testing.assert_close(p, q)  # the replay followed the same path
    assert_si_importance(callback, start, net, omega, xi)
    assert callback.state.importance["trunk.0.weight"].sum() > 0


class StepRecorder(L.Callback):
    """Per batch: the unscaled gradient the optimizer was handed, and whether the weights moved (a step was taken)."""

    def __init__(self):
        self.grads, self.moves = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self._grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        moved = {n: p.detach() - self._before[n] for n, p in pl_module.named_parameters()}
        self.grads.append(self._grads)
        self.moves.append(moved if any(m.abs().sum() > 0 for m in moved.values()) else None)


def test_si_ignores_the_steps_fp16_loss_scaling_skips(data):
    """A skipped step has inf gradients and no update: 0 · inf = NaN if it were counted."""
    torch.manual_seed(0)
    xi = 0.05
    net = SGDNet(hidden=8, lr=0.2)
    start = copy.deepcopy(net)
    callback, recorder = EWCCallback(importance="si", si_damping=xi, mode="online"), StepRecorder()
    # The first scale overflows fp16 (step skipped), the backoff then brings it to 2^10 for the rest.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60, backoff_factor=2.0**-50, growth_interval=1000)
    trainer = make_trainer(max_steps=5, callbacks=[recorder, callback],
                           plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(net, loader(data[0], 16, shuffle=False))
    taken = [i for i, moved in enumerate(recorder.moves) if moved is not None]
    assert 0 not in taken and len(taken) >= 3  # the first step was skipped, the others taken
    omega = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in taken:
        for n, g in recorder.grads[i].items():
            omega[n] += -g * recorder.moves[i][n]
    assert all(torch.isfinite(f).all() for f in callback.state.importance.values())
    assert_si_importance(callback, start, net, omega, xi)
    assert callback.state.importance["trunk.0.weight"].sum() > 0


class Poison(L.Callback):
    """Puts a NaN into one weight when training ends, before the EWCCallback (after it in the list) consolidates."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.trunk[0].weight[0, 0] = float("nan")


@pytest.mark.parametrize("importance", ["fisher", "l2", "mas", "si"])
def test_every_importance_refuses_non_finite_values_naming_the_parameter(data, importance):
    torch.manual_seed(0)
    net, callback = SGDNet(hidden=8, lr=0.1), EWCCallback(importance=importance)
    with pytest.raises(FloatingPointError, match=r"non-finite values \(NaN/inf\) for trunk\.0\.weight"):
        make_trainer(max_steps=2, callbacks=[Poison(), callback]).fit(net, loader(data[0], 32))
    assert callback.num_tasks == 0 and not callback.state.centre  # nothing half-consolidated
