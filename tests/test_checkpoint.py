"""All EWC state travels in Lightning checkpoints: resuming mid-task equals an uninterrupted run."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import TaskNet, loader, make_trainer, split_mnist_task
from lightning_ewc import EWCCallback


class Crashing(TaskNet):
    crash_at_epoch = None

    def training_step(self, batch, batch_idx):
        if self.current_epoch == self.crash_at_epoch and batch_idx == 1:
            raise RuntimeError("simulated crash")
        return super().training_step(batch, batch_idx)


def make_callback(importance):
    return EWCCallback(ewc_lambda=50.0, importance=importance, mode="online" if importance == "si" else "separate")


def run_two_tasks(tmp_path, importance, crash: bool):
    data = [split_mnist_task(t, limit=96) for t in range(2)]
    torch.manual_seed(0)
    net, callback = Crashing(hidden=16), make_callback(importance)
    make_trainer(max_epochs=1, callbacks=[callback]).fit(net, loader(data[0], 32, shuffle=False))

    net.task = 1
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = make_trainer(max_epochs=3, callbacks=[callback, checkpoints], enable_checkpointing=True)
    if not crash:
        trainer.fit(net, loader(data[1], 32, shuffle=False))
        return net, callback
    net.crash_at_epoch = 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(net, loader(data[1], 32, shuffle=False))
    assert callback.num_tasks == 1  # the crashed task was not consolidated
    (ckpt,) = sorted(tmp_path.glob("epoch=0*.ckpt"))

    # A new process: fresh module and callback, everything else from the checkpoint.
    torch.manual_seed(123)
    resumed_net, resumed_callback = Crashing(hidden=16), make_callback(importance)
    resumed_net.task = 1
    trainer = make_trainer(max_epochs=3, callbacks=[resumed_callback])
    trainer.fit(resumed_net, loader(data[1], 32, shuffle=False), ckpt_path=ckpt)
    return resumed_net, resumed_callback


@pytest.mark.parametrize("importance", ["fisher", "si"])
def test_resume_mid_task_equals_uninterrupted_run(tmp_path, mnist_dir, importance):
    straight_net, straight = run_two_tasks(tmp_path / "a", importance, crash=False)
    resumed_net, resumed = run_two_tasks(tmp_path / "b", importance, crash=True)
    assert straight.num_tasks == resumed.num_tasks == 2
    for (name, p), q in zip(straight_net.named_parameters(), resumed_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    for name in straight.state.importance:
        torch.testing.assert_close(straight.state.importance[name], resumed.state.importance[name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(straight.state.centre[name], resumed.state.centre[name], rtol=1e-6, atol=1e-7)
    assert straight.state.constant == pytest.approx(resumed.state.constant, rel=1e-6)
    with torch.no_grad():
        for p in resumed_net.parameters():
            p.add_(0.01)
        for p in straight_net.parameters():
            p.add_(0.01)
    with torch.no_grad():
        assert float(straight.penalty(straight_net)) == pytest.approx(float(resumed.penalty(resumed_net)), rel=1e-6)
        assert float(straight.penalty(straight_net)) > 0


def test_checkpoint_with_other_settings_is_refused(tmp_path, mnist_dir):
    data = split_mnist_task(0, limit=64)
    net = TaskNet(hidden=8)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True)
    make_trainer(max_epochs=1, callbacks=[EWCCallback(), checkpoints], enable_checkpointing=True).fit(net, loader(data))
    (ckpt,) = tmp_path.glob("*.ckpt")
    with pytest.raises(ValueError, match="mode='separate'.*mode='online'"):
        make_trainer(max_epochs=2, callbacks=[EWCCallback(mode="online")]).fit(TaskNet(hidden=8), loader(data),
                                                                             ckpt_path=ckpt)


def saved_state(**kwargs) -> dict:
    callback = EWCCallback(**kwargs)
    callback.state.consolidate({"w": torch.rand(3), "b": torch.rand(2)}, {"w": torch.randn(3), "b": torch.randn(2)})
    return callback.state_dict()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda s: s.pop("consolidated"), r"EWCCallback's state in the checkpoint lacks \['consolidated'\]"),
        (lambda s: s["consolidated"].pop("centre"), r"the EWC state in the checkpoint lacks \['centre'\]"),
        (lambda s: s["consolidated"]["centre"].pop("b"), r"\['b'\] have an importance but no centre"),
        (lambda s: s["consolidated"]["importance"].update(w=torch.rand(4)), r"'w' has importance of shape \(4,\)"),
    ],
    ids=["no-consolidated", "no-centre", "centre-missing-a-parameter", "shapes-differ"],
)
def test_incomplete_checkpoint_state_is_refused_naming_what_is_missing(corrupt, match):
    state = saved_state()
    corrupt(state)
    callback = EWCCallback()
    with pytest.raises(ValueError, match=match):
        callback.load_state_dict(state)
    assert callback.num_tasks == 0  # nothing half-loaded


def test_si_checkpoint_without_its_path_integral_entries_is_refused():
    state = saved_state(importance="si", mode="online")
    state["path_integral"] = {"damping": 0.1, "start": {"w": torch.zeros(3)}}
    with pytest.raises(ValueError, match=r"SI's path integral in the checkpoint lacks \['omega'\]"):
        EWCCallback(importance="si", mode="online").load_state_dict(state)


def test_checkpoint_with_another_gamma_says_the_callbacks_gamma_wins():
    state = saved_state(mode="online", gamma=0.9)
    callback = EWCCallback(mode="online", gamma=0.5)
    with pytest.warns(UserWarning, match=r"saved with gamma=0\.9 but this callback has gamma=0\.5; this callback's"):
        callback.load_state_dict(state)
    before = callback.state.importance["w"].clone()
    new = torch.rand(3)
    callback.state.consolidate({"w": new, "b": torch.zeros(2)}, {"w": torch.zeros(3), "b": torch.zeros(2)})
    torch.testing.assert_close(callback.state.importance["w"], 0.5 * before + new)
