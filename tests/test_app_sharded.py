"""The app under FSDP2 (strategy=fsdp_cpu: ModelParallelStrategy on 2 CPU processes, the model sharding its layers in
configure_model): the same accuracy matrix as strategy=ddp_cpu from the same seed, also when the run dies after its
first task and resumes from that task's sharded (distributed) checkpoint.

The runs are subprocesses of the console script: Lightning's launcher re-executes the command line for rank 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SMALL = ["stream=digits", "method=ewc", "train.steps_per_task=10", "stream.num_tasks=2", "logger=none",
         "trainer.enable_progress_bar=false"]


def app(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)  # the launcher must start rank 1 itself
    return subprocess.run([sys.executable, "-m", "lightning_ewc", *SMALL, *args, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=240, check=False)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_fsdp_cpu_run_resumed_after_a_crash_gives_the_ddp_cpu_matrix(tmp_path):
    ddp_dir, fsdp_dir = tmp_path / "ddp", tmp_path / "fsdp"
    ddp = app(ddp_dir, "strategy=ddp_cpu")
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    # dies as the second task starts: the first task's end is the checkpoint to resume from
    crash = "+extra_callbacks=[{_target_: helpers.CrashAt, task: 1, step: 0}]"
    crashed = app(fsdp_dir, "strategy=fsdp_cpu", crash)
    assert crashed.returncode != 0 and "simulated crash at step 0 of task 1" in crashed.stderr
    assert results(fsdp_dir)["tasks_done"] == 1
    checkpoint = fsdp_dir / "checkpoints" / "task0_end.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").exists()  # the strategy's distributed checkpoint

    resumed = app(fsdp_dir, "strategy=fsdp_cpu", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ewc: task 1/2 done" not in resumed.stdout and "ewc: task 2/2 done" in resumed.stdout
    sharded, plain = results(fsdp_dir), results(ddp_dir)
    assert sharded["config"]["trainer"]["strategy"]["_target_"].endswith("ModelParallelStrategy")
    assert sharded["tasks_done"] == plain["tasks_done"] == 2
    # Same data order, same averaged gradients, same Fisher: the weights agree to float32 rounding, so the test
    # predictions, and the accuracies, are the same but for a sample whose two top logits are that close (one of a
    # task's 90 or 92 test digits).
    assert sharded["baseline"] == plain["baseline"]
    for row_sharded, row_plain in zip(sharded["acc_matrix"], plain["acc_matrix"]):
        assert row_sharded == pytest.approx(row_plain, abs=1 / 90 + 1e-6)
    assert not (fsdp_dir / "checkpoints" / "task0_end.ckpt").exists()  # superseded by task 1's, directory removed
    assert (fsdp_dir / "checkpoints" / "task1_end.ckpt").is_dir()
