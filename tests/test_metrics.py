"""Continual-learning metrics, their pictures and the multirun summary table (lightning_ewc.app.metrics/plots/sweep)."""

import csv
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import imread

from lightning_ewc.app.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    format_matrix,
    forward_transfer,
    summarize,
)
from lightning_ewc.app.plots import accuracy_matrix_figure, plot_accuracy_matrix, plot_task_curves
from lightning_ewc.app.sweep import collect_runs, summary_rows, write_summary

# Two tasks: task 0 is forgotten (0.9 -> 0.7), task 1 starts above its baseline before it is trained.
R2 = [[0.9, 0.3], [0.7, 0.95]]
B2 = [0.1, 0.2]

# Three tasks. Task 0 improves after task 1 (0.8 -> 0.9), then drops to 0.6: forgetting must use the max 0.9, not
# the diagonal 0.8. Task 1 scores 0.75 *before* it is trained, above its 0.7 just after: that pre-training value
# must not count as the max for forgetting.
R3 = [
    [0.8, 0.75, 0.1],
    [0.9, 0.7, 0.3],
    [0.6, 0.5, 0.9],
]
B3 = [0.1, 0.1, 0.1]


# --- metrics -------------------------------------------------------------------------------------------------------


def test_two_task_metrics_by_hand():
    assert average_accuracy(R2) == pytest.approx((0.7 + 0.95) / 2)
    assert backward_transfer(R2) == pytest.approx(0.7 - 0.9)  # negative: task 0 was forgotten
    assert forward_transfer(R2, B2) == pytest.approx(0.3 - 0.2)  # positive: R[0][1] above the baseline b[1]
    assert average_forgetting(R2) == pytest.approx(0.9 - 0.7)


def test_three_task_metrics_by_hand():
    assert average_accuracy(R3) == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    assert backward_transfer(R3) == pytest.approx(((0.6 - 0.8) + (0.5 - 0.7)) / 2)  # -0.2
    assert forward_transfer(R3, B3) == pytest.approx(((0.75 - 0.1) + (0.3 - 0.1)) / 2)  # +0.425
    # Task 0: max(0.8, 0.9) - 0.6 = 0.3 (the max is off the diagonal); task 1: max(0.7) - 0.5 = 0.2 (not 0.75).
    assert average_forgetting(R3) == pytest.approx((0.3 + 0.2) / 2)


def test_forgetting_differs_from_minus_bwt_when_a_task_improved_before_dropping():
    # With the diagonal instead of the max, forgetting would equal -BWT = 0.2.
    assert average_forgetting(R3) == pytest.approx(0.25)
    assert -backward_transfer(R3) == pytest.approx(0.2)


def test_single_task_has_no_transfer_or_forgetting():
    assert average_accuracy([[0.42]]) == pytest.approx(0.42)
    assert backward_transfer([[0.42]]) is None
    assert forward_transfer([[0.42]], [0.1]) is None
    assert average_forgetting([[0.42]]) is None
    assert summarize([[0.42]], [0.1]) == {"avg_acc": pytest.approx(0.42), "bwt": None, "fwt": None, "forgetting": None}


def test_summarize_matches_the_individual_metrics():
    assert summarize(R3, B3) == {
        "avg_acc": pytest.approx(2.0 / 3),
        "bwt": pytest.approx(-0.2),
        "fwt": pytest.approx(0.425),
        "forgetting": pytest.approx(0.25),
    }


def test_partial_matrix_uses_the_trained_block():
    two_rows = R3[:2]  # a run still going: tasks 0 and 1 trained, all three evaluated
    block = [row[:2] for row in two_rows]
    partial = summarize(two_rows, B3)
    assert partial == summarize(block, B3[:2])
    # By hand on [[0.8, 0.75], [0.9, 0.7]]: task 0 improved, so BWT is positive and forgetting negative.
    assert partial == {
        "avg_acc": pytest.approx((0.9 + 0.7) / 2),
        "bwt": pytest.approx(0.9 - 0.8),
        "fwt": pytest.approx(0.75 - 0.1),
        "forgetting": pytest.approx(0.8 - 0.9),
    }
    # After the first task only: the mean over task 0 alone, not over all three columns of the last row.
    assert summarize(R3[:1], B3) == {"avg_acc": pytest.approx(0.8), "bwt": None, "fwt": None, "forgetting": None}


def test_tensor_and_array_inputs_give_the_same_numbers():
    expected = summarize(R3, B3)
    assert summarize(torch.tensor(R3), torch.tensor(B3)) == pytest.approx(expected)
    assert summarize(np.array(R3), np.array(B3)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "matrix, baseline, message",
    [
        ([], [], "at least one row"),
        ([[0.5, 0.5], [0.5]], [0.1, 0.1], "same length"),
        ([[0.5], [0.5]], [0.1], "columns"),  # more rows than columns
        ([0.5, 0.5], [0.1, 0.1], "2-D"),
        (R2, [0.1], "baseline has 1 entries"),
        (R2[:1], [0.1], "baseline has 1 entries"),  # partial matrix: baseline still needs one entry per column
    ],
)
def test_bad_inputs_raise_value_error(matrix, baseline, message):
    with pytest.raises(ValueError, match=message):
        summarize(matrix, baseline)


def test_bad_matrix_raises_in_every_metric():
    ragged = [[0.5, 0.5], [0.5]]
    for metric in (average_accuracy, backward_transfer, average_forgetting, format_matrix):
        with pytest.raises(ValueError, match="same length"):
            metric(ragged)
    with pytest.raises(ValueError, match="same length"):
        forward_transfer(ragged, [0.1, 0.1])


def test_format_matrix_is_a_fixed_width_percent_table():
    lines = format_matrix(R3[:2]).splitlines()
    assert len(lines) == 3  # header + one line per trained task
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert "task 0" in lines[0] and "task 2" in lines[0]
    assert lines[1].startswith("after task 0") and lines[1].split()[-3:] == ["80.0", "75.0", "10.0"]
    assert lines[2].startswith("after task 1") and lines[2].split()[-3:] == ["90.0", "70.0", "30.0"]
    assert format_matrix([[1.0]]).splitlines()[1].split()[-1] == "100.0"


# --- plots ---------------------------------------------------------------------------------------------------------


def _assert_real_png(path):
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.shape[2] in (3, 4)
    assert not np.all(pixels == pixels[0, 0])  # something was drawn


def test_plot_accuracy_matrix_writes_a_png(tmp_path):
    path = plot_accuracy_matrix(R3, tmp_path / "nested" / "matrix.png")
    assert path == tmp_path / "nested" / "matrix.png"
    _assert_real_png(path)


def test_plot_task_curves_writes_a_png(tmp_path):
    _assert_real_png(plot_task_curves(torch.tensor(R3), tmp_path / "curves.png"))


def test_plots_of_a_single_row_matrix(tmp_path):
    _assert_real_png(plot_accuracy_matrix([[0.9, 0.1, 0.1]], tmp_path / "m.png"))
    _assert_real_png(plot_task_curves([[0.9, 0.1, 0.1]], tmp_path / "c.png"))


def test_accuracy_matrix_figure_shows_only_trained_rows_on_a_fixed_scale():
    figure = accuracy_matrix_figure(R3[:2], "partial run")
    assert isinstance(figure, Figure)
    heatmap_axes = figure.axes[0]
    image = heatmap_axes.images[0]
    assert image.get_array().shape == (2, 3)  # the untrained third row is absent
    assert image.get_clim() == (0.0, 1.0)
    assert heatmap_axes.get_title() == "partial run"
    annotations = sorted(text.get_text() for text in heatmap_axes.texts)
    assert annotations == sorted(["80.0", "75.0", "10.0", "90.0", "70.0", "30.0"])


# --- sweep summary -------------------------------------------------------------------------------------------------


def _write_result(directory, **fields):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(fields))


def _fake_sweep(sweep_dir):
    # Directory order ("a" < "b") and string order ("10" < "2") both disagree with the job order 2, 10.
    _write_result(
        sweep_dir / "a",
        job=10,
        overrides=["method=ewc", "method.callback.ewc_lambda=10"],
        acc_matrix=R2,
        baseline=B2,
        avg_acc=0.825,
        bwt=-0.2,
        fwt=0.1,
        forgetting=0.2,
        task_times=[1.25, 2.25],
        tasks_done=2,
    )
    _write_result(
        sweep_dir / "b",
        job=2,
        overrides=["method=finetune"],
        acc_matrix=[[0.9, 0.1]],
        baseline=B2,
        avg_acc=0.9,
        bwt=None,
        fwt=None,
        forgetting=None,
        task_times=[1.0],
        tasks_done=1,
    )


def test_collect_runs_orders_by_job_number(tmp_path):
    _fake_sweep(tmp_path)
    assert [run["job"] for run in collect_runs(tmp_path)] == [2, 10]


def test_collect_runs_without_job_numbers_orders_by_path(tmp_path):
    _write_result(tmp_path / "2", overrides=["x=2"])
    _write_result(tmp_path / "1", overrides=["x=1"])
    assert [run["overrides"] for run in collect_runs(tmp_path)] == [["x=1"], ["x=2"]]


def test_summary_rows_flatten_each_run(tmp_path):
    _fake_sweep(tmp_path)
    rows = summary_rows(collect_runs(tmp_path))
    assert rows[1] == {
        "job": 10,
        "overrides": "method=ewc method.callback.ewc_lambda=10",
        "avg_acc": 0.825,
        "bwt": -0.2,
        "fwt": 0.1,
        "forgetting": 0.2,
        "tasks_done": 2,
        "wall_s": 3.5,
    }
    assert rows[0]["bwt"] is None and rows[0]["wall_s"] == 1.0


def test_write_summary_csv_and_markdown(tmp_path):
    _fake_sweep(tmp_path)
    csv_path, markdown_path = write_summary(tmp_path)
    assert (csv_path, markdown_path) == (tmp_path / "summary.csv", tmp_path / "summary.md")

    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["job"] for row in rows] == ["2", "10"]
    assert rows[0]["overrides"] == "method=finetune" and rows[0]["bwt"] == ""  # null written as an empty field
    assert rows[1]["overrides"] == "method=ewc method.callback.ewc_lambda=10"
    assert float(rows[1]["avg_acc"]) == 0.825 and float(rows[1]["wall_s"]) == 3.5

    lines = markdown_path.read_text().splitlines()
    assert len(lines) == 4  # header, separator, two jobs
    assert lines[0].startswith("| job | overrides | avg_acc (%) |")
    finetune_cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    ewc_cells = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert finetune_cells == ["2", "method=finetune", "90.00", "—", "—", "—", "1", "1.0"]
    assert ewc_cells == ["10", "method=ewc method.callback.ewc_lambda=10", "82.50", "-20.00", "10.00", "20.00", "2", "3.5"]


def test_unreadable_results_are_skipped_with_a_warning(tmp_path):
    _fake_sweep(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text('{"job": 3, "acc_')  # a job killed mid-write
    with pytest.warns(UserWarning, match="skipping unreadable"):
        runs = collect_runs(tmp_path)
    assert [run["job"] for run in runs] == [2, 10]


_HYDRA_APP = '''
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base=None, config_path=".", config_name="config")
def main(cfg):
    hydra_cfg = HydraConfig.get()
    result = {
        "job": hydra_cfg.job.num,
        "overrides": list(hydra_cfg.overrides.task),
        "avg_acc": 0.5 + 0.1 * cfg.x,
        "bwt": None,
        "fwt": None,
        "forgetting": None,
        "task_times": [0.5],
        "tasks_done": 1,
    }
    (Path(hydra_cfg.runtime.output_dir) / "results.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
'''

_HYDRA_CONFIG = """
x: 0
hydra:
  callbacks:
    summary:
      _target_: lightning_ewc.app.sweep.SweepSummary
"""


def test_sweep_summary_callback_in_a_real_hydra_multirun(tmp_path):
    app_dir, sweep_dir = tmp_path / "app", tmp_path / "sweep"
    app_dir.mkdir()
    (app_dir / "app.py").write_text(textwrap.dedent(_HYDRA_APP))
    (app_dir / "config.yaml").write_text(_HYDRA_CONFIG)
    completed = subprocess.run(
        [sys.executable, str(app_dir / "app.py"), "-m", "x=1,2", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert f"wrote {sweep_dir / 'summary.csv'}" in completed.stdout

    with (sweep_dir / "summary.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["job"], row["overrides"]) for row in rows] == [("0", "x=1"), ("1", "x=2")]
    assert [float(row["avg_acc"]) for row in rows] == pytest.approx([0.6, 0.7])
    assert "| 1 | x=2 | 70.00 |" in (sweep_dir / "summary.md").read_text()
