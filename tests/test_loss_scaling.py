"""fp16 AMP: the GradScaler scales the penalty once, like the task loss, or not at all when it enters the gradients
(run on CPU with an explicit plugin)."""

import copy

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from helpers import TaskNet, loader, make_trainer, split_mnist_task
from lightning_ewc import EWCCallback


class SGDNet(TaskNet):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("penalty_via", ["loss", "gradient"])
def test_fp16_grad_scaler_scales_the_penalty_once(mnist_dir, penalty_via):
    """In the loss, the scaler scales the penalty with the task loss and unscales both; in the gradients, the
    callback adds it after the unscaling, so it must not be scaled at all."""
    torch.manual_seed(0)
    lam, lr = 1e3, 1e-3
    data = [split_mnist_task(t, limit=64) for t in range(2)]
    net, callback = SGDNet(hidden=16, lr=lr), EWCCallback(ewc_lambda=lam, penalty_via=penalty_via)
    make_trainer(max_steps=3, callbacks=[callback]).fit(net, loader(data[0], 32))
    with torch.no_grad():  # leave the anchor so that the penalty pulls from the first step on
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.task = 1
    before = copy.deepcopy(net)

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = make_trainer(max_steps=1, callbacks=[callback], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(net, loader(data[1], 32, shuffle=False))
    assert scaler.get_scale() == 1024.0  # the step was taken (no inf/NaN skipped it)

    # By hand in float32: one SGD step on task loss + penalty, both unscaled.
    x, y = next(iter(loader(data[1], 32, shuffle=False)))
    params = dict(before.named_parameters())
    importance, centre = callback.state.importance, callback.state.centre
    penalty = 0.5 * lam * (sum((importance[n] * (p - centre[n]) ** 2).sum() for n, p in params.items())
                           + callback.state.constant)
    assert float(penalty.detach()) == pytest.approx(float(callback.penalty(before).detach()), rel=1e-5)
    loss = nn.functional.cross_entropy(before(x), y) + penalty
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    errors, moves = [], []
    for (name, p), g in zip(params.items(), grads):
        want = p.detach() - lr * (g if g is not None else 0)
        errors.append((dict(net.named_parameters())[name].detach() - want).flatten())
        moves.append((want - p.detach()).flatten())
    # fp16 autocast perturbs the task gradient by a few percent; a double-scaled penalty would move weights ~1000x
    # further than this update
    assert torch.cat(errors).norm() <= 0.02 * torch.cat(moves).norm()
    assert float(callback.penalty(before).detach()) > 1.0
