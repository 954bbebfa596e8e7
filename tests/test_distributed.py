"""DDP: the Fisher the EWCCallback consolidates over 2 CPU ranks equals the single-process Fisher, and the penalty
applied through the gradients trains as the penalty in the loss does.

The DDP fits run in subprocesses (tests/ddp_fisher_script.py, tests/ddp_penalty_script.py): Lightning's DDP launcher re-executes ``sys.argv`` for
the other ranks, which must not be pytest's command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TaskNet, split_mnist_task
from torch.utils.data import DataLoader

from lightning_ewc import estimate_fisher
from lightning_ewc.app.idx import DATA_ENV, data_dir

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCRIPT = TESTS / "ddp_fisher_script.py"


def assert_close_rel(actual: dict, expected: dict, rel: float) -> None:
    """Same keys, and every tensor within ``rel`` of the reference relative to the reference tensor's largest entry."""
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name].double(), expected[name].double()
        assert a.shape == e.shape, name
        scale = e.abs().max().item()
        err = (a - e).abs().max().item()
        assert err <= rel * scale + 1e-12, f"{name}: max |diff| {err:.3e} vs scale {scale:.3e}"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("ddp")
    output = run_ddp_script(SCRIPT, out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return ranks, output


def run_ddp_script(script: Path, out: Path, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(TESTS), env.get("PYTHONPATH", "")) if p)
    env[DATA_ENV] = str(data_dir())
    env.pop("LOCAL_RANK", None)  # the launcher must start rank 1 itself
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(out), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.perf_counter() - started
    output = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"DDP script failed (rc={proc.returncode}) after {elapsed:.1f}s\n{output}"
    print(f"\nDDP subprocess took {elapsed:.1f}s")
    return output


def reference_fisher(saved: dict, estimator: str) -> dict:
    model = TaskNet(hidden=saved["hidden"], num_tasks=2)
    model.load_state_dict(saved["state_dict"])
    data = split_mnist_task(0, train=True, limit=saved["num_samples"])
    return estimate_fisher(
        model,
        DataLoader(data, batch_size=50, shuffle=False),
        estimator,
        logits_fn=lambda batch: model(batch[0], 0),
    )


def test_ddp_ran_two_ranks_with_uneven_shards(ddp_run):
    ranks, output = ddp_run
    assert [r["global_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 for r in ranks)
    assert all(r["global_step"] == 5 for r in ranks)
    assert ranks[0]["num_samples"] % 2 == 1  # 151 + 150: the shards differ in size
    # The all-reduced count is the dataset size: no DistributedSampler padding (302), no per-rank count (151).
    assert "fisher/exact, 301 samples" in output
    assert "fisher/empirical, 301 samples" in output
    # DDP kept the replicas identical, so the reference below may use either rank's weights.
    for name, w in ranks[0]["state_dict"].items():
        assert torch.equal(w, ranks[1]["state_dict"][name]), name


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_ddp_fisher_equals_single_process_fisher(ddp_run, estimator):
    ranks, _ = ddp_run
    # Both ranks hold the same all-reduced importance.
    assert_close_rel(ranks[1][estimator], ranks[0][estimator], rel=1e-6)
    expected = reference_fisher(ranks[0], estimator)
    assert set(expected) == set(ranks[0][estimator])
    # Something was actually estimated: the trunk and head 0 carry importance; head 1 saw no data.
    assert expected["trunk.0.weight"].abs().max() > 0 and expected["heads.0.weight"].abs().max() > 0
    assert ranks[0][estimator]["heads.1.weight"].abs().max() == 0
    for saved in ranks:
        assert_close_rel(saved[estimator], expected, rel=1e-5)


def test_ddp_exact_and_empirical_differ(ddp_run):
    # Guards the parametrized test above against comparing the same tensors twice.
    ranks, _ = ddp_run
    diff = (ranks[0]["exact"]["trunk.0.weight"] - ranks[0]["empirical"]["trunk.0.weight"]).abs().max()
    assert diff > 1e-3 * ranks[0]["exact"]["trunk.0.weight"].abs().max()


def test_ddp_centre_is_the_final_weights(ddp_run):
    ranks, _ = ddp_run
    for saved in ranks:
        for key in ("centre", "empirical_centre"):
            assert saved[key].keys() == saved["state_dict"].keys()
            for name, c in saved[key].items():
                assert torch.equal(c, saved["state_dict"][name]), (key, name)


def test_ddp_gradient_side_penalty_trains_like_the_loss_side_one(tmp_path, mnist_dir):
    run_ddp_script(TESTS / "ddp_penalty_script.py", tmp_path)
    ranks = [torch.load(tmp_path / f"penalty_rank{r}.pt", weights_only=True) for r in range(2)]
    for name, w in ranks[0]["gradient"].items():
        assert torch.equal(w, ranks[1]["gradient"][name]), name  # the replicas stayed identical
        torch.testing.assert_close(w, ranks[0]["loss"][name], rtol=1e-4, atol=1e-6, msg=name)
    # and the penalty did change the training: the same run with λ = 0 ends elsewhere
    moved = max(float((ranks[0]["loss"][n] - ranks[0]["without"][n]).abs().max()) for n in ranks[0]["loss"])
    assert moved > 1e-3


def test_an_error_on_one_rank_is_raised_on_every_rank_with_its_cause(tmp_path, mnist_dir):
    """Rank 1's share of the importance data holds a NaN (then a label out of range); it raises before the collective
    that sums the ranks' results. Without an agreement first, rank 0 would wait there (NCCL) or die with "connection
    closed by peer" (gloo); the script runs under a timeout, and both ranks must name the cause."""
    run_ddp_script(TESTS / "ddp_failure_script.py", tmp_path)
    lines = {r: dict(line.split("\t", 1) for line in (tmp_path / f"failure_rank{r}.txt").read_text().splitlines())
             for r in range(2)}
    for case, kind, cause in (("nan", "FloatingPointError", "non-finite values"),
                              ("label", "ValueError", "labels range over [0, 7]")):
        for rank in range(2):
            assert lines[rank][case].startswith(kind + "\t"), (rank, lines[rank][case])
            assert cause in lines[rank][case], (rank, lines[rank][case])
        assert "raised on rank 1" in lines[0][case]  # rank 0 says where it came from
        assert "raised on rank 1" not in lines[1][case]  # rank 1 raised its own exception
