"""FSDP2 (Lightning's ModelParallelStrategy with fully_shard) on 2 CPU ranks: each rank keeps EWC's state for its shard
only, and a stream of 3 tasks trains as under DDP with the same data order, for both ways of applying the penalty and
both modes; the state a checkpoint holds is full-size and loads with another number of ranks; a run resumed from the
strategy's own checkpoint mid-task equals the uninterrupted one; every estimator's importance, reduced to the shards
module by module during the pass, equals the single-process one on the same samples.

The fits run in subprocesses (tests/sharded_script.py): Lightning's launcher re-executes ``sys.argv`` for rank 1.
"""

from __future__ import annotations

import types

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from helpers import TaskNet, loader, split_mnist_task
from sharded_script import ShardedViTNet
from lightning_ewc import EWCCallback
from lightning_ewc.distributed import check_strategy, shard
from lightning_ewc.fisher import accumulate_importance
from test_distributed import TESTS, run_ddp_script

CONFIGS = ["loss-separate", "gradient-separate", "loss-online", "gradient-online"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("sharded")
    printed = {strategy: run_ddp_script(TESTS / "sharded_script.py", out, strategy) for strategy in ("ddp", "fsdp")}
    saved = {s: [torch.load(out / f"{s}_rank{r}.pt", weights_only=False) for r in range(2)] for s in ("ddp", "fsdp")}
    return {**saved, "printed": printed}


def test_the_fisher_pass_hands_fsdp_units_no_views(runs):
    # The pass expands a position embedding looked up once for the batch (the ViT's); an FSDP2 unit returning that
    # view would lose its pre-backward hook to an in-place op downstream, and FSDP2 warns.
    assert "ShardedViTNet" in runs["printed"]["fsdp"]  # the ViT ran
    assert "returned a view tensor" not in runs["printed"]["fsdp"]


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


def test_a_stream_resumed_from_the_fsdp_checkpoint_equals_the_uninterrupted_run(runs):
    """The 'loss-online' stream saved a checkpoint with the strategy's own saving (a distributed checkpoint directory)
    when task 2 ended; a fresh model (another initialisation) and a fresh callback restored the weights and the EWC
    state from it and trained task 3. Same weights, data and EWC state, a fresh optimizer in both: the two runs compute
    the same numbers in the same order, so they agree to float32 rounding (1e-6 of each tensor's scale)."""
    uninterrupted, resumed = runs["fsdp"][0]["loss-online"], runs["fsdp"][0]["resumed"]
    assert resumed["checkpoint_is_a_directory"]  # the strategy's own sharded checkpoint, not one torch.save file
    assert max_rel(resumed["weights"], uninterrupted["weights"]) <= 1e-6
    assert max_rel(resumed["importance"], uninterrupted["importance"]) <= 1e-6
    assert max_rel(resumed["centre"], uninterrupted["centre"]) <= 1e-6
    assert resumed["constant"] == pytest.approx(uninterrupted["constant"], rel=1e-6)
    assert resumed["state_dict"]["consolidated"]["num_tasks"] == 3


FISHER_SEED, FISHER_BATCH = 3, 12
FISHER_RUNS = {"mlp": "fisher", "vit": "fisher_vit"}


def fisher_model(name: str, weights: dict | None = None) -> torch.nn.Module:
    model = TaskNet(hidden=16, num_tasks=1, classes=3) if name == "mlp" else ShardedViTNet()  # unsharded here
    if weights is not None:
        model.load_state_dict(weights)
    return model


def single_process_importance(name: str, weights: dict, estimator: str) -> dict:
    """Each rank's share of the 45 samples, as the callback cuts them (23 and 22), through the per-sample engine in
    this one process with that rank's generator for the sampled labels; summed over the ranks, over 45."""
    model = fisher_model(name, weights)
    data = loader(split_mnist_task(0, train=True, limit=45), batch_size=FISHER_BATCH, shuffle=False)
    total, count = None, 0
    for rank in range(2):
        batches = shard(data, rank, 2, None, FISHER_BATCH, FISHER_SEED + 1, same_batch_count=True)
        generator = torch.Generator().manual_seed(FISHER_SEED * 1_000_003 + rank)  # EWCCallback's, for task 0
        result = accumulate_importance(model, batches, estimator, generator=generator)
        total = result.sums if total is None else {n: total[n] + result.sums[n] for n in total}
        count += result.count
    return {n: t / count for n, t in total.items()}


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical", "mas"])
@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_the_sharded_importance_equals_the_single_process_one(runs, model, estimator):
    """Reduced to the shards module by module during the pass, gathered back: the single-process importance on the
    same samples (and draws) to 1e-5 of each tensor's scale, on both ranks. The MLP's layers are Linears on 2-D
    inputs; the ViT's are a conv, an embedding, attention, LayerNorms and Linears on sequences, each its own FSDP2
    unit as the app shards them."""
    run = FISHER_RUNS[model]
    expected = single_process_importance(model, runs["fsdp"][0][run]["weights"], estimator)
    assert all(float(t.abs().max()) > 0 for n, t in expected.items())
    for saved in runs["fsdp"]:
        got = saved[run]["estimators"][estimator]
        assert got["count"] == 45
        assert max_rel(got["importance"], expected) <= 1e-5


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_the_sharded_pass_holds_one_module_at_full_size(runs, model):
    """The most full-size sums a rank held at once during the pass is one module's (the one with the most parameters
    of its own: the MLP's first Linear, 784 x 16 + 16 floats; the ViT's attention, whose q, k and v rows share one
    weight), not the model's: each module's sums are reduced to the shards once complete, pass by pass for the
    exact Fisher's two passes a batch, once a batch for the one-pass estimators."""
    net = fisher_model(model)
    largest = max(sum(p.numel() * 4 for p in m.parameters(recurse=False)) for m in net.modules())
    model_bytes = sum(p.numel() * 4 for p in net.parameters())
    for saved in runs["fsdp"]:
        for estimator in ("exact", "sampled", "empirical", "mas"):
            peak = saved[FISHER_RUNS[model]]["estimators"][estimator]["peak_full_bytes"]
            assert peak == largest < model_bytes, estimator  # a second module's sums alive would exceed it


def test_the_batched_fisher_is_refused_on_sharded_parameters(runs):
    for saved in runs["fsdp"]:
        for run in FISHER_RUNS.values():
            refused = saved[run]["estimators"]["batched_refused"]
            assert "fisher='batched' is not supported with sharded (FSDP2) parameters" in refused
