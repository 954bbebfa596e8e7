"""FSDP2 (Lightning's ModelParallelStrategy with fully_shard) on 2 CPU ranks: each rank keeps EWC's state for its shard
only, and a stream of 3 tasks trains as under DDP with the same data order, for both ways of applying the penalty and
both modes; the state a checkpoint holds is full-size and loads with another number of ranks.

The fits run in subprocesses (tests/sharded_script.py): Lightning's launcher re-executes ``sys.argv`` for rank 1.
"""

from __future__ import annotations

import types

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from helpers import TaskNet
from lightning_ewc import EWCCallback
from lightning_ewc.distributed import check_strategy
from test_distributed import TESTS, run_ddp_script

CONFIGS = ["loss-separate", "gradient-separate", "loss-online", "gradient-online"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("sharded")
    for strategy in ("ddp", "fsdp"):
        run_ddp_script(TESTS / "sharded_script.py", out, strategy)
    return {s: [torch.load(out / f"{s}_rank{r}.pt", weights_only=False) for r in range(2)] for s in ("ddp", "fsdp")}


def max_rel(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) / max(float(b[n].abs().max()), 1e-12) for n in b)


def test_fsdp_sharded_the_parameters_and_the_state_holds_two_shards(runs):
    for saved in runs["fsdp"]:
        for config in CONFIGS:
            run = saved[config]
            assert run["sharded"]
            assert run["callback_bytes"] == 2 * run["local_param_bytes"], config  # 2 x the shard, not 2 x P
    total = sum(p.numel() * 4 for p in TaskNet(hidden=16, num_tasks=3).parameters())
    assert runs["fsdp"][0]["loss-separate"]["local_param_bytes"] < 0.6 * total


@pytest.mark.parametrize("config", CONFIGS)
def test_fsdp_trains_the_stream_as_ddp_does(runs, config):
    """Same data order, same averaged gradients: the weights agree to float32 reduction-order rounding (1e-4 of each
    tensor's scale after 9 Adam steps), and so do the importance, the centre and the constant."""
    ddp, fsdp = runs["ddp"][0][config], runs["fsdp"][0][config]
    assert max_rel(fsdp["weights"], ddp["weights"]) < 1e-4
    assert max_rel(fsdp["importance"], ddp["importance"]) < 1e-4
    assert max_rel(fsdp["centre"], ddp["centre"]) < 1e-4
    assert fsdp["constant"] == pytest.approx(ddp["constant"], rel=1e-4, abs=1e-9)
    for saved in runs["fsdp"][1:]:  # every rank gathered the same state
        assert max_rel(saved[config]["importance"], fsdp["importance"]) == 0.0


def test_the_penalty_changed_the_training(runs):
    """Guards the comparison above: the configurations do train differently."""
    a, b = runs["fsdp"][0]["loss-separate"]["weights"], runs["fsdp"][0]["loss-online"]["weights"]
    assert max_rel(a, b) > 1e-3


def test_a_sharded_checkpoint_state_loads_in_one_process(runs):
    """The state a checkpoint holds under FSDP2 on 2 ranks is full-size: one process (another world size) loads it and
    its penalty equals the one the DDP run's state gives."""
    fsdp, ddp = runs["fsdp"][0]["loss-separate"], runs["ddp"][0]["loss-separate"]
    model = TaskNet(hidden=16, num_tasks=3)
    model.load_state_dict(fsdp["weights"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    loaded, reference = EWCCallback(ewc_lambda=300.0), EWCCallback(ewc_lambda=300.0)
    loaded.load_state_dict(fsdp["state_dict"])
    reference.load_state_dict(ddp["state_dict"])
    with torch.no_grad():
        assert float(loaded.penalty(model)) == pytest.approx(float(reference.penalty(model)), rel=1e-4)
        assert float(loaded.penalty(model)) > 0


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_strategies_that_shard_without_dtensors_are_refused(strategy):
    trainer = types.SimpleNamespace(strategy=object.__new__(strategy), world_size=1)
    with pytest.raises(NotImplementedError, match=f"does not support {strategy.__name__}.*ModelParallelStrategy"):
        check_strategy(trainer, dict(TaskNet(hidden=4).named_parameters()))
    check_strategy(types.SimpleNamespace(strategy=object.__new__(DDPStrategy), world_size=1), {})  # accepted
