"""l2, MAS and SI importances equal their definitions, through a real Trainer."""

import copy

import pytest
import torch
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
