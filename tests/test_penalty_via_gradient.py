"""EWCCallback(penalty_via="gradient"): the penalty's gradient added before the optimizer step instead of the penalty
added to the loss. Same training, step for step, as the loss-side penalty; its pieces against autograd."""

import lightning.pytorch as L
import pytest
import torch

from helpers import TaskNet, loader, make_trainer, split_mnist_task
from lightning_ewc import EWCCallback
from lightning_ewc.consolidation import ConsolidatedState, add_penalty_gradient, penalty_from_squared, quadratic_penalty


@pytest.fixture(scope="module")
def task_data(mnist_dir):
    return [split_mnist_task(t, limit=256) for t in range(3)]


def test_penalty_gradient_and_value_match_autograd():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (3,), (2, 2, 2)]
    params = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    fisher = [torch.rand(s, generator=g) for s in shapes]
    fisher[1][0] = 0.0  # a weight that did not matter
    centres = [p.detach() + 0.1 * torch.randn(p.shape, generator=g) for p in params]
    ewc_lambda = 37.0
    value = 0.5 * ewc_lambda * sum((f * (p - c) ** 2).sum() for p, f, c in zip(params, fisher, centres))
    value.backward()

    grads = [torch.full(s, 0.25) for s in shapes]  # the task loss's gradient already there
    add_penalty_gradient(grads, [p.detach() for p in params], fisher, centres, ewc_lambda)
    for grad, p in zip(grads, params):
        torch.testing.assert_close(grad, p.grad + 0.25)
    quadratic = penalty_from_squared(params, fisher, centres)
    assert float(quadratic) == pytest.approx(float(value.detach()) / (0.5 * ewc_lambda), rel=1e-6)
    fused = quadratic_penalty([f.sqrt() for f in fisher], centres, params)
    assert float(quadratic) == pytest.approx(float(fused.detach()), rel=1e-6)

    at_anchor = [torch.zeros(s) for s in shapes]
    add_penalty_gradient(at_anchor, centres, fisher, centres, 1e6)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in at_anchor)  # exactly zero, not rounding noise


def test_state_holding_f_consolidates_like_the_state_holding_its_root():
    g = torch.Generator().manual_seed(1)
    tasks = [({"w": torch.rand(4, 3, generator=g)}, {"w": torch.randn(4, 3, generator=g)}) for _ in range(3)]
    for mode, gamma in (("separate", 1.0), ("online", 0.7)):
        roots, squares = ConsolidatedState(mode=mode, gamma=gamma), ConsolidatedState(mode=mode, gamma=gamma)
        squares.hold_squared(True)
        for importance, anchor in tasks:
            roots.consolidate(importance, anchor)
            squares.consolidate(importance, anchor)
        assert squares.squared and not squares.root_importance and set(squares.fisher) == {"w"}
        torch.testing.assert_close(squares.importance["w"], roots.importance["w"], rtol=1e-6, atol=0)
        assert torch.equal(squares.centre["w"], roots.centre["w"])
        assert squares.constant == pytest.approx(roots.constant) and squares.num_bytes() == roots.num_bytes()
        torch.testing.assert_close(squares.state_dict()["importance"]["w"], roots.state_dict()["importance"]["w"])


def train_three_tasks(task_data, penalty_via, importance, tmp_path):
    torch.manual_seed(0)
    net = TaskNet(hidden=32)
    callback = EWCCallback(ewc_lambda=300.0, importance=importance, penalty_via=penalty_via)
    logged = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append(float(trainer.callback_metrics.get("ewc/penalty", float("nan"))))

    for task in range(3):
        net.task = task
        # accumulation and clipping: the penalty's gradient must enter once per optimizer step, before clipping
        trainer = make_trainer(max_steps=6, accumulate_grad_batches=2, gradient_clip_val=0.05, log_every_n_steps=1,
                               callbacks=[callback, Record()], default_root_dir=tmp_path)
        trainer.fit(net, loader(task_data[task], 16, shuffle=False))
    return net, callback, logged


@pytest.mark.parametrize("importance", ["fisher", "si"])
def test_training_with_the_gradient_side_penalty_equals_the_loss_side_one(task_data, tmp_path, importance):
    by_loss, loss_callback, loss_logged = train_three_tasks(task_data, "loss", importance, tmp_path / "loss")
    by_grad, grad_callback, grad_logged = train_three_tasks(task_data, "gradient", importance, tmp_path / "grad")
    assert grad_callback.num_tasks == 3 and grad_callback.state.squared
    moved = 0.0
    for (name, p), q in zip(by_loss.named_parameters(), by_grad.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, float((p.detach() - loss_callback.state.centre[name]).abs().max()))
    assert moved > 1e-3  # the last task did move the weights: the comparison is not of untouched networks
    assert len(grad_logged) == len(loss_logged) == 36 and grad_logged[-1] > 0
    assert grad_logged == pytest.approx(loss_logged, rel=1e-3, abs=1e-6)
    for name in loss_callback.state.importance:
        torch.testing.assert_close(grad_callback.state.importance[name], loss_callback.state.importance[name],
                                   rtol=1e-3, atol=1e-7)


def test_gradient_side_penalty_survives_a_checkpoint(task_data, tmp_path):
    torch.manual_seed(0)
    net, callback = TaskNet(hidden=32), EWCCallback(ewc_lambda=10.0, penalty_via="gradient")
    trainer = make_trainer(max_steps=4, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(net, loader(task_data[0], 32))
    trainer.save_checkpoint(tmp_path / "after_task_0.ckpt")
    saved = torch.load(tmp_path / "after_task_0.ckpt", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if "EWCCallback" in k]
    for name, f in callback.state.fisher.items():  # checkpoints hold F whichever way it is held in memory
        assert torch.equal(state["consolidated"]["importance"][name], f)

    resumed = EWCCallback(ewc_lambda=10.0, penalty_via="gradient")
    resumed.load_state_dict(state)
    assert resumed.state.squared and float(resumed.penalty(net)) == pytest.approx(float(callback.penalty(net)))
    by_loss = EWCCallback(ewc_lambda=10.0)  # and a loss-side callback reads the same checkpoint
    by_loss.load_state_dict(state)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    assert float(by_loss.penalty(net).detach()) == pytest.approx(float(resumed.penalty(net)), rel=1e-5)


def test_unknown_penalty_via_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown penalty_via 'grad'; choose 'loss'.*or 'gradient'"):
        EWCCallback(penalty_via="grad")


class ManualNet(TaskNet):
    """Manual optimization: the loss-side penalty must be added by hand, the gradient-side one must not."""

    def __init__(self, add_penalty: bool):
        super().__init__(hidden=32)
        self.automatic_optimization = False
        self.add_penalty = add_penalty

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss + self.ewc_penalty() if self.add_penalty else loss)
        optimizer.step()


def test_manual_optimization_gets_the_gradient_when_it_steps(task_data):
    nets = {}
    for penalty_via in ("loss", "gradient"):
        torch.manual_seed(0)
        net, callback = ManualNet(add_penalty=penalty_via == "loss"), EWCCallback(ewc_lambda=300.0,
                                                                                  penalty_via=penalty_via)
        for task in range(2):
            net.task = task
            make_trainer(max_steps=5, callbacks=[callback]).fit(net, loader(task_data[task], 16, shuffle=False))
        nets[penalty_via] = net
    for p, q in zip(nets["loss"].parameters(), nets["gradient"].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    torch.manual_seed(0)
    without = ManualNet(add_penalty=False)
    without.ewc_warn_without_callback = False  # on purpose: the reference trains with no EWC at all
    for task in range(2):
        without.task = task
        make_trainer(max_steps=5).fit(without, loader(task_data[task], 16, shuffle=False))
    pairs = zip(without.parameters(), nets["gradient"].parameters())
    assert max(float((p - q).detach().abs().max()) for p, q in pairs) > 1e-4
