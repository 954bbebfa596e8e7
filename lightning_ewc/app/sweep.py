"""One table for a Hydra multirun: every job's results.json gathered into summary.csv and summary.md.

Register :class:`SweepSummary` in the app's config so that the table is written when the sweep ends::

    hydra:
      callbacks:
        summary:
          _target_: lightning_ewc.app.sweep.SweepSummary
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["SUMMARY_COLUMNS", "SweepSummary", "collect_runs", "summary_rows", "write_summary"]

SUMMARY_COLUMNS = ("job", "overrides", "avg_acc", "bwt", "fwt", "forgetting", "tasks_done", "wall_s")
_METRIC_COLUMNS = ("avg_acc", "bwt", "fwt", "forgetting")  # fractions, shown as percentages in the markdown
_MISSING = "—"


def _job_number(run: dict) -> int | None:
    try:
        return int(run["job"])
    except (KeyError, TypeError, ValueError):
        return None


def collect_runs(sweep_dir: str | Path) -> list[dict]:
    """Every ``<sweep_dir>/**/results.json`` as a dict, ordered by job number (jobs without one last, by path)."""
    found: list[tuple[Path, dict]] = []
    for path in Path(sweep_dir).rglob("results.json"):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as error:
            # One job that died mid-write must not cost the summary of all the others.
            warnings.warn(f"skipping unreadable {path}: {error}", stacklevel=2)

    def order(item: tuple[Path, dict]) -> tuple[bool, int, str]:
        job = _job_number(item[1])
        return (job is None, job if job is not None else 0, str(item[0]))

    return [run for _, run in sorted(found, key=order)]


def summary_rows(runs: list[dict]) -> list[dict]:
    """One flat row per run with the columns of :data:`SUMMARY_COLUMNS`; absent values are None."""
    rows = []
    for run in runs:
        task_times = run.get("task_times")
        rows.append(
            {
                "job": run.get("job"),
                "overrides": " ".join(run.get("overrides") or []),
                **{metric: run.get(metric) for metric in _METRIC_COLUMNS},
                "tasks_done": run.get("tasks_done"),
                "wall_s": None if task_times is None else float(sum(task_times)),
            }
        )
    return rows


def _markdown_cell(column: str, value: Any) -> str:
    if value is None or value == "":
        return _MISSING
    if column in _METRIC_COLUMNS:
        return f"{100 * value:.2f}"
    if column == "wall_s":
        return f"{value:.1f}"
    # A "|" inside an override value would otherwise split the cell.
    return str(value).replace("|", r"\|")


def _markdown_table(rows: list[dict]) -> str:
    headers = [f"{column} (%)" if column in _METRIC_COLUMNS else column for column in SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(column, row[column]) for column in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path]:
    """Write ``<sweep_dir>/summary.csv`` and ``<sweep_dir>/summary.md`` from the jobs' results; return both paths."""
    sweep_dir = Path(sweep_dir)
    # One row per job: a job's comparison run (method.compare_with) sits in the job's folder, and its figures are in
    # the job's results.json under "compared_with".
    rows = summary_rows([run for run in collect_runs(sweep_dir) if not run.get("comparison_for")])
    csv_path, markdown_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)  # None is written as an empty field
    markdown_path.write_text(_markdown_table(rows))
    return csv_path, markdown_path


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, summarise its jobs into summary.csv and summary.md in the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            print(f"SweepSummary: sweep dir {sweep_dir} does not exist, no summary written")
            return
        csv_path, markdown_path = write_summary(sweep_dir)
        print(f"SweepSummary: wrote {csv_path} and {markdown_path}")
