"""Results across many runs: one row per (benchmark, method variant, λ), mean ± std over seeds, and the pictures.

``python -m lightning_ewc.app.report RUNS_DIR [--out DIR]`` reads every ``results.json`` under RUNS_DIR (any mix
of sweeps), prints the table as markdown and writes ``runs.csv`` (one line per run), ``table.md``, the bar chart
``results_bars.png`` (best λ per variant) and, per benchmark, the heatmap of the seed-mean accuracy matrix of the
main variants (``heatmap_<stream>_<scenario>_<schedule>_<variant>.png``; ``--heatmaps`` picks them).
``--published CSV`` puts the papers' values (columns ``benchmark,variant,published``) beside ours in the table and
on the chart. ``--include runs.csv`` merges the rows of an earlier report (runs whose folders are gone, or that ran
on another machine) into the table and the chart; runs found under RUNS_DIR take precedence over included rows of
the same benchmark, variant, λ and seed. ``sweep.py`` tables one multirun; this tables them all.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning_ewc.app.plots import _new_figure, _save, plot_accuracy_matrix
from lightning_ewc.app.sweep import collect_runs

__all__ = ["benchmark_of", "best_rows", "group_runs", "read_published", "read_runs_csv", "run_row", "variant_of"]

RUN_COLUMNS = ("benchmark", "variant", "ewc_lambda", "seed", "avg_acc", "bwt", "forgetting", "tasks_done",
               "num_tasks", "wall_s")


def benchmark_of(config: dict) -> str:
    """A short name for what was trained: stream, scenario, schedule, and a class order or padding other than the
    default (``split_mnist/task/2000it``, ``split_mnist/task/2000it/seeded``, ``permuted_mnist/domain/5000it/pad2``)."""
    stream = config["stream"]
    name = str(stream["_target_"]).rsplit(".", 1)[-1]
    train = config["train"]
    schedule = f"{train['steps_per_task']}it" if train.get("steps_per_task") else f"{train['epochs_per_task']}ep"
    parts = [name, str(stream["scenario"]), schedule]
    order = stream.get("class_order")
    if order is not None:  # the default pairing (0/1, 2/3, ...) gets no suffix
        parts.append(order if isinstance(order, str) else "".join(map(str, order)))
    if stream.get("pad"):
        parts.append(f"pad{stream['pad']}")
    return "/".join(parts)


def variant_of(config: dict) -> str:
    """The method as a table row names it: ``ewc (exact)``, ``ewc (exact, 500)``, ``online_ewc (exact)``, ``si``,
    ``l2 (online, γ=0)`` (a mode other than the method's own), ``finetune + kept optimizer``
    (``train.keep_optimizer_state=true``)."""
    method = config["method"]
    callback = method.get("callback") or {}
    name = str(method["name"])
    details = []
    if callback.get("importance") == "fisher":
        details.append(str(callback.get("fisher", "exact")))
        if callback.get("num_samples"):
            details.append(str(callback["num_samples"]))
    mode, gamma = callback.get("mode"), float(callback.get("gamma", 1.0))
    online_by_default = name in ("online_ewc", "si")
    if mode == "online" and not online_by_default:
        details.append(f"online, γ={gamma:g}")
    elif mode == "online" and gamma != 1.0:
        details.append(f"γ={gamma:g}")
    elif mode == "separate" and online_by_default:
        details.append("separate")
    if details:
        name += f" ({', '.join(details)})"
    if config["train"].get("keep_optimizer_state"):
        name += " + kept optimizer"
    return name


def run_row(run: dict) -> dict[str, Any]:
    """One flat row of :data:`RUN_COLUMNS` for a run's results.json."""
    config = run["config"]
    callback = config["method"].get("callback") or {}
    return {
        "benchmark": benchmark_of(config),
        "variant": variant_of(config),
        "ewc_lambda": callback.get("ewc_lambda"),
        "seed": config["seed"],
        "avg_acc": run["avg_acc"],
        "bwt": run.get("bwt"),
        "forgetting": run.get("forgetting"),
        "tasks_done": run.get("tasks_done"),
        "num_tasks": len(run["acc_matrix"][0]),
        "wall_s": sum(run.get("task_times") or []),
        "acc_matrix": run["acc_matrix"],
    }


def group_runs(rows: list[dict]) -> list[dict]:
    """Rows of one (benchmark, variant, λ) merged: mean and std of the metrics over seeds, and the mean R.

    Only finished runs count (all tasks done), so that a sweep still in progress does not lower a mean. The mean R
    (and ``matrix_seeds``) covers the members that carry an accuracy matrix: rows read from a runs.csv have none.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["tasks_done"] == row["num_tasks"]:
            groups[(row["benchmark"], row["variant"], row["ewc_lambda"])].append(row)
    merged = []
    for (benchmark, variant, ewc_lambda), members in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
        accs = [m["avg_acc"] for m in members]
        matrices = [m["acc_matrix"] for m in members if m.get("acc_matrix")]
        mean_R = [[statistics.fmean(col) for col in zip(*cells)] for cells in zip(*matrices)] if matrices else None
        merged.append(
            {
                "benchmark": benchmark,
                "variant": variant,
                "ewc_lambda": ewc_lambda,
                "seeds": sorted(m["seed"] for m in members),
                "mean": statistics.fmean(accs),
                "std": statistics.stdev(accs) if len(accs) > 1 else None,
                "bwt": statistics.fmean(m["bwt"] for m in members if m["bwt"] is not None) if members else None,
                "mean_R": mean_R,
                "matrix_seeds": len(matrices),
            }
        )
    return merged


def _sort_key(key: tuple) -> tuple:
    benchmark, variant, ewc_lambda = key
    return (benchmark, variant, -1.0 if ewc_lambda is None else float(ewc_lambda))


def best_rows(groups: list[dict], min_seeds: int = 1) -> list[dict]:
    """Per (benchmark, variant), the λ with the highest mean accuracy among the groups with the most seeds.

    Preferring the most seeds follows how the sweeps are run: λ is chosen on one seed, then the chosen λ is repeated
    with more seeds, and a lucky single seed at another λ must not displace that mean. Groups with fewer than
    ``min_seeds`` seeds are ignored.
    """
    best: dict[tuple, dict] = {}
    for group in groups:
        if len(group["seeds"]) < min_seeds:
            continue
        key = (group["benchmark"], group["variant"])
        rank = (len(group["seeds"]), group["mean"])
        if key not in best or rank > (len(best[key]["seeds"]), best[key]["mean"]):
            best[key] = group
    return [best[k] for k in sorted(best)]


def read_published(path: str | Path) -> dict[tuple[str, str], float]:
    """Published accuracies (%) from a CSV with columns ``benchmark,variant,published`` (more columns allowed)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"benchmark", "variant", "published"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: the published-results CSV needs the columns benchmark, variant, published; "
                         f"missing {sorted(missing)}")
    published = {}
    for line, row in enumerate(rows, start=2):
        value = (row["published"] or "").strip()
        if not value:
            continue
        try:
            published[(row["benchmark"], row["variant"])] = float(value)
        except ValueError:
            raise ValueError(
                f"{path}, line {line}: published value {value!r} is not a number (a field holding a comma, such as "
                '"ewc (exact, 500)", must be in double quotes)'
            ) from None
    return published


def read_runs_csv(path: str | Path) -> list[dict]:
    """The rows of a runs.csv written by an earlier report, typed as :func:`run_row` makes them (no matrix)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = set(RUN_COLUMNS) - set(rows[0] if rows else RUN_COLUMNS)
    if missing:
        raise ValueError(f"{path}: a runs.csv to include needs the columns {', '.join(RUN_COLUMNS)}; missing "
                         f"{sorted(missing)} (num_tasks is the stream's task count, so that unfinished runs can be "
                         "told apart: add it, or write the file again with this version of the report)")

    def number(text: str, kind=float):
        return None if text in ("", None) else kind(float(text))

    typed = []
    for line, row in enumerate(rows, start=2):
        try:
            typed.append({**row, "ewc_lambda": number(row["ewc_lambda"]), "seed": number(row["seed"], int),
                          "avg_acc": float(row["avg_acc"]), "bwt": number(row["bwt"]),
                          "forgetting": number(row["forgetting"]), "tasks_done": number(row["tasks_done"], int),
                          "num_tasks": number(row["num_tasks"], int), "wall_s": number(row["wall_s"]),
                          "acc_matrix": None})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}, line {line}: {error} (seed, avg_acc, tasks_done and num_tasks must be "
                             "numbers)") from None
    return typed


def _run_key(row: dict) -> tuple:
    lam = row["ewc_lambda"]
    return (row["benchmark"], row["variant"], None if lam is None else float(lam), int(row["seed"]))


def _pct(mean: float, std: float | None) -> str:
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def markdown_table(groups: list[dict], published: dict[tuple[str, str], float] | None = None) -> str:
    head = "| benchmark | variant | λ | seeds | average accuracy (%) | BWT (%) |"
    if published:
        head += " published (%) |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for g in groups:
        lam = "—" if g["ewc_lambda"] is None else f"{float(g['ewc_lambda']):g}"
        bwt = "—" if g["bwt"] is None else f"{100 * g['bwt']:.2f}"
        seeds = ",".join(str(s) for s in g["seeds"])
        line = f"| {g['benchmark']} | {g['variant']} | {lam} | {seeds} | {_pct(g['mean'], g['std'])} | {bwt} |"
        if published:
            value = published.get((g["benchmark"], g["variant"]))
            line += " — |" if value is None else f" {value:g} |"
        lines.append(line)
    return "\n".join(lines)


def plot_bars(best: list[dict], path: str | Path, published: dict[tuple[str, str], float] | None = None) -> Path:
    """One panel per benchmark, one bar per variant (its best λ): mean average accuracy with the std as error bar,
    and a black diamond at the published value where ``published`` has one."""
    benchmarks = sorted({g["benchmark"] for g in best})
    columns = min(3, len(benchmarks))
    rows_of_panels = -(-len(benchmarks) // columns)
    figure = _new_figure(width=5.6 * columns, height=3.6 * rows_of_panels)
    for k, benchmark in enumerate(benchmarks):
        axes = figure.add_subplot(rows_of_panels, columns, k + 1)
        rows = [g for g in best if g["benchmark"] == benchmark]
        heights = [100 * g["mean"] for g in rows]
        errors = [0.0 if g["std"] is None else 100 * g["std"] for g in rows]
        axes.barh(range(len(rows)), heights, xerr=errors, color="tab:blue")
        axes.set_yticks(range(len(rows)), [g["variant"] for g in rows], fontsize=8)
        marks = [(i, (published or {}).get((benchmark, g["variant"]))) for i, g in enumerate(rows)]
        marks = [(i, v) for i, v in marks if v is not None]
        if marks:
            axes.scatter([v for _, v in marks], [i for i, _ in marks], marker="D", color="black", zorder=3,
                         label="published")
            axes.legend(loc="lower left", fontsize=7)
        axes.invert_yaxis()
        low = min(heights + [v for _, v in marks]) if heights else 0.0
        axes.set_xlim(max(0.0, low - 10.0), 100.0)
        axes.set_xlabel("average accuracy after the last task (%)")
        axes.set_title(benchmark, fontsize=9)
    return _save(figure, path)


MAIN_VARIANTS = ("finetune", "ewc (exact)", "joint")


def write_report(
    runs_dir: str | Path,
    out: str | Path,
    min_seeds: int = 1,
    heatmaps: tuple[str, ...] = MAIN_VARIANTS,
    published: dict[tuple[str, str], float] | None = None,
    include: tuple[str | Path, ...] = (),
) -> list[dict]:
    """Write runs.csv, table.md, the bar chart and the heatmaps of the ``heatmaps`` variants under ``out``;
    ``published`` (see :func:`read_published`) adds the papers' values to the table and the chart; ``include``
    names runs.csv files of earlier reports whose rows join those found under ``runs_dir``."""
    out = Path(out)
    # Read everything before writing anything: an included runs.csv may be the one this report overwrites.
    rows = [run_row(run) for run in collect_runs(runs_dir) if "config" in run and run.get("acc_matrix")]
    seen = {_run_key(row) for row in rows}
    for path in include:
        for row in read_runs_csv(path):
            if _run_key(row) not in seen:
                seen.add(_run_key(row))
                rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["benchmark"], r["variant"], float(r["ewc_lambda"] or 0),
                                                     r["seed"])))
    groups = group_runs(rows)
    best = best_rows(groups, min_seeds)
    (out / "table.md").write_text(
        f"## Best λ per variant\n\n{markdown_table(best, published)}\n\n## Every λ\n\n{markdown_table(groups)}\n"
    )
    if best:
        plot_bars(best, out / "results_bars.png", published)
    for g in (g for g in best if g["variant"] in heatmaps and g["mean_R"] is not None):
        slug = "_".join([*g["benchmark"].split("/"), _slug(g["variant"])])  # the whole name: 2000it and 4ep differ
        plot_accuracy_matrix(g["mean_R"], out / f"heatmap_{slug}.png",
                             title=f"{g['benchmark']}\n{g['variant']} (mean of {g['matrix_seeds']})")
    return best


def _slug(text: str) -> str:
    """``ewc (exact, 500) + kept optimizer`` → ``ewc-exact-500-kept-optimizer``."""
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="folder holding the runs (searched recursively for results.json)")
    parser.add_argument("--out", default="report", help="where to write runs.csv, table.md and the PNGs")
    parser.add_argument("--min-seeds", type=int, default=1, help="ignore (variant, λ) groups with fewer seeds")
    parser.add_argument("--heatmaps", default=",".join(MAIN_VARIANTS),
                        help="variants to draw heatmaps of, comma-separated")
    parser.add_argument("--published", default=None,
                        help="CSV with columns benchmark,variant,published (%%): the papers' values beside ours")
    parser.add_argument("--include", action="append", default=[], metavar="RUNS_CSV",
                        help="runs.csv of an earlier report to merge in (repeatable); runs under runs_dir win")
    args = parser.parse_args(argv)
    published = read_published(args.published) if args.published else None
    heatmaps = tuple(v.strip() for v in args.heatmaps.split(","))
    best = write_report(args.runs_dir, args.out, args.min_seeds, heatmaps, published, tuple(args.include))
    print(markdown_table(best, published))


if __name__ == "__main__":
    main()
