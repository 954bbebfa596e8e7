"""Pictures of an accuracy matrix (see :mod:`lightning_ewc.app.metrics` for what R means).

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas, never through pyplot: no
display is needed, nothing is registered in pyplot's global figure list (so nothing leaks across a long sweep), and
the process-wide backend that other code may rely on is left alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_ewc.app.metrics import as_rows

__all__ = ["accuracy_matrix_figure", "plot_accuracy_matrix", "plot_comparison", "plot_task_curves"]

_CMAP = "viridis"


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas: PNG rendering without pyplot
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    # Drop the artists now rather than waiting for the garbage collector: sweeps draw many of these.
    figure.clear()
    return path


def _draw_heatmap(axes, rows: list[list[float]], title: str) -> Any:
    """R in percent on ``axes``, colour scale fixed to 0..1 so that figures from different runs compare by eye."""
    n_trained, n_tasks = len(rows), len(rows[0])
    image = axes.imshow(rows, cmap=_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            # Dark text on the bright (yellow) end of viridis, light text on the dark end.
            colour = "black" if value > 0.6 else "white"
            axes.text(j, i, f"{100 * value:.1f}", ha="center", va="center", color=colour, fontsize=8)
    axes.set_xticks(range(n_tasks))
    axes.set_yticks(range(n_trained))
    axes.set_xlabel("task evaluated")
    axes.set_ylabel("after training task")
    axes.set_title(title)
    return image


def accuracy_matrix_figure(R: Any, title: str = "Accuracy matrix") -> Figure:
    """Heatmap of R in percent, colour scale fixed to 0..1 so that figures from different runs compare by eye."""
    rows = as_rows(R)
    n_trained, n_tasks = len(rows), len(rows[0])
    figure = _new_figure(width=1.6 + 0.75 * n_tasks, height=1.4 + 0.6 * n_trained)
    axes = figure.add_subplot()
    image = _draw_heatmap(axes, rows, title)
    figure.colorbar(image, ax=axes, label="accuracy")
    return figure


def plot_accuracy_matrix(R: Any, path: str | Path, title: str = "Accuracy matrix") -> Path:
    """Save the heatmap of R as a PNG at ``path``; rows not trained yet are simply absent."""
    return _save(accuracy_matrix_figure(R, title), path)


def plot_task_curves(R: Any, path: str | Path, title: str = "Accuracy per task") -> Path:
    """Save a PNG with one line per task: its accuracy against the number of tasks trained, plus the average.

    Each task's line is dotted before the task is trained (what FWT looks at) and solid from then on (what BWT and
    forgetting look at). The thick black line is the average accuracy over the tasks seen so far.
    """
    rows = as_rows(R)
    n_trained, n_tasks = len(rows), len(rows[0])
    tasks_trained = list(range(1, n_trained + 1))
    figure = _new_figure(width=7.0, height=4.5)
    axes = figure.add_subplot()
    colours = matplotlib.colormaps["tab20" if n_tasks > 10 else "tab10"]
    for j in range(n_tasks):
        colour = colours(j % colours.N)
        accuracy_on_j = [row[j] for row in rows]
        # Index i is "after training task i", so task j is trained from index j (x = j + 1) onwards.
        axes.plot(tasks_trained[: j + 1], accuracy_on_j[: j + 1], color=colour, linestyle=":", linewidth=1)
        axes.plot(
            tasks_trained[j:], accuracy_on_j[j:], color=colour, marker="o", markersize=4, linewidth=1.5,
            label=f"task {j}",
        )
    seen_average = [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(rows)]
    axes.plot(tasks_trained, seen_average, color="black", linewidth=3.5, marker="o", label="average (seen tasks)")
    axes.set_xlim(0.5, max(n_trained, 1) + 0.5)
    axes.set_xticks(tasks_trained)
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("tasks trained")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return _save(figure, path)


def _seen_average(rows: list[list[float]]) -> list[float]:
    """After each task trained, the mean accuracy over the tasks trained so far."""
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(rows)]


def plot_comparison(matrices: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Save one PNG that compares methods trained on the same stream: each method's accuracy matrix as a heatmap
    (same colour scale), and beside them the average accuracy over the tasks seen so far, one line per method.

    In a heatmap, row i is the network after training task i and column j its accuracy on task j: the diagonal is
    each task just learned, everything left of it is what is left of the earlier tasks (forgetting shows as dark).
    """
    if not matrices:
        raise ValueError("plot_comparison needs at least one accuracy matrix")
    blocks = {name: as_rows(R) for name, R in matrices.items()}
    n_trained, n_tasks = len(next(iter(blocks.values()))), len(next(iter(blocks.values()))[0])
    heatmap_width = 1.0 + 0.6 * n_tasks
    figure = _new_figure(width=1.5 + heatmap_width * len(blocks) + 4.5, height=1.8 + 0.6 * max(n_trained, 4))
    grid = figure.add_gridspec(1, len(blocks) + 1, width_ratios=[heatmap_width] * len(blocks) + [4.0])
    heatmaps, image = [], None
    for k, (name, rows) in enumerate(blocks.items()):
        axes = figure.add_subplot(grid[0, k])
        image = _draw_heatmap(axes, rows, f"{name}: average {100 * _seen_average(rows)[-1]:.1f}%")
        if k:
            axes.set_ylabel("")
        heatmaps.append(axes)
    figure.colorbar(image, ax=heatmaps, label="accuracy", shrink=0.8)
    curves = figure.add_subplot(grid[0, -1])
    colours = matplotlib.colormaps["tab10"]
    for k, (name, rows) in enumerate(blocks.items()):
        trained = list(range(len(rows)))
        curves.plot(trained, _seen_average(rows), color=colours(k % colours.N), marker="o", linewidth=2.5, label=name)
    curves.set_xticks(range(n_trained))
    curves.set_ylim(-0.02, 1.02)
    curves.set_xlabel("after training task")
    curves.set_ylabel("average accuracy on the tasks trained so far")
    curves.grid(alpha=0.3)
    curves.legend(loc="lower left", frameon=False)
    if title:
        figure.suptitle(title)
    return _save(figure, path)
