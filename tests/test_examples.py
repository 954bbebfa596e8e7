"""The scripts under docs/examples run as a user would run them and still show what their pages claim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

RESULT = re.compile(
    r"^(?P<name>without EWC|with EWC)\s*: task A after A (?P<a_after_a>[0-9.]+), "
    r"task A after B (?P<a_after_b>[0-9.]+), task B (?P<b>[0-9.]+)$",
    re.MULTILINE,
)
STATE = re.compile(r"EWC holds (?P<held>\d+) bytes = 2 x (?P<adapters>\d+) bytes of adapters")

# Task A accuracy after task B, with EWC minus without, in the quick mode: we measured 0.712 for seed 0
# (0.245 -> 0.957) and 0.70 to 0.74 over seeds 0-3. Half of that leaves room for other platforms' numerics and still
# fails if the penalty stops reaching the adapters (a margin near 0).
MIN_MARGIN = 0.35


def test_lora_two_tasks_keeps_task_a_with_ewc(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "lora_two_tasks.py"), "--quick"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {
        m["name"]: {key: float(value) for key, value in m.groupdict().items() if key != "name"}
        for m in RESULT.finditer(done.stdout)
    }
    assert set(results) == {"without EWC", "with EWC"}, done.stdout
    plain, ewc = results["without EWC"], results["with EWC"]

    # both runs learnt task A, and plain fine-tuning on B forgot much of it (else the example shows nothing)
    assert plain["a_after_a"] >= 0.95 and ewc["a_after_a"] >= 0.95, done.stdout
    assert plain["a_after_b"] <= 0.5 and plain["b"] >= 0.95, done.stdout
    # EWC kept task A (0.95-0.98 measured over seeds 0-3) and still learnt task B (0.83-0.93)
    assert ewc["a_after_b"] - plain["a_after_b"] >= MIN_MARGIN, done.stdout
    assert ewc["a_after_b"] >= 0.8 and ewc["b"] >= 0.7, done.stdout

    # the consolidated state is the adapters' importance and centre, nothing of the frozen base
    state = STATE.search(done.stdout)
    assert state and int(state["held"]) == 2 * int(state["adapters"]) > 0, done.stdout
