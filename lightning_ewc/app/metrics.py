"""Continual-learning metrics computed from an accuracy matrix.

``R[i][j]`` is the test accuracy (a fraction in [0, 1]) on task ``j`` after training task ``i``. Every task is
evaluated after every task, seen or not, because forward transfer needs the accuracy on a task *before* it is
trained. ``baseline[j]`` is the accuracy on task ``j`` of the model before any training (random init).

A run that is still going has fewer rows than columns (rows ``0..k`` trained). Every metric here is computed on the
leading ``(k+1) x (k+1)`` block, i.e. on the tasks trained so far, so that a partial run reports the same numbers as
a finished run of ``k+1`` tasks would.

References: Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning" (ACC, BWT, FWT);
Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning" (forgetting). See docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Matrix = list[list[float]]

__all__ = [
    "as_rows",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "format_matrices",
    "format_matrix",
    "forward_transfer",
    "summarize",
]


def as_rows(R: Any) -> Matrix:
    """R (list of rows, tensor or array) as a validated list of float rows: at least one row, rows of equal length, no more rows than columns."""
    # Tensors and arrays both offer .tolist(); going through Python floats keeps the arithmetic backend-free.
    rows = R.tolist() if hasattr(R, "tolist") else R
    if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):
        raise ValueError(f"accuracy matrix must be a 2-D list of rows, tensor or array, got {type(R).__name__}")
    if len(rows) == 0:
        raise ValueError("accuracy matrix must have at least one row")
    if not all(isinstance(row, Sequence) and not isinstance(row, (str, bytes)) for row in rows):
        raise ValueError("accuracy matrix must be 2-D: each row must be a sequence of accuracies")
    n_columns = len(rows[0])
    lengths = [len(row) for row in rows]
    if any(length != n_columns for length in lengths):
        raise ValueError(f"accuracy matrix rows must all have the same length, got lengths {lengths}")
    if n_columns < len(rows):
        raise ValueError(
            f"accuracy matrix has {len(rows)} rows but only {n_columns} columns: "
            "every task trained must also be evaluated (columns >= rows)"
        )
    return [[float(value) for value in row] for row in rows]


def _as_baseline(baseline: Any, n_columns: int) -> list[float]:
    values = baseline.tolist() if hasattr(baseline, "tolist") else baseline
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        raise ValueError(f"baseline must be a 1-D sequence of accuracies, got {type(baseline).__name__}")
    if len(values) != n_columns:
        raise ValueError(
            f"baseline has {len(values)} entries but the accuracy matrix has {n_columns} columns (one per task)"
        )
    return [float(value) for value in values]


def _trained_block(R: Any) -> Matrix:
    """The leading square block of R: the tasks trained so far, evaluated on those same tasks."""
    rows = as_rows(R)
    n_trained = len(rows)
    return [row[:n_trained] for row in rows]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def average_accuracy(R: Any) -> float:
    """ACC: mean accuracy over the tasks trained so far, measured after the last of them."""
    block = _trained_block(R)
    return _mean(block[-1])


def backward_transfer(R: Any) -> float | None:
    """BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j]); negative means forgetting. None for a single task."""
    block = _trained_block(R)
    T = len(block)
    if T == 1:
        return None
    return _mean([block[T - 1][j] - block[j][j] for j in range(T - 1)])


def forward_transfer(R: Any, baseline: Any) -> float | None:
    """FWT = 1/(T-1) Σ_{j>=1} (R[j-1][j] - b[j]); positive means earlier tasks helped before task j was trained."""
    rows = as_rows(R)
    b = _as_baseline(baseline, len(rows[0]))
    T = len(rows)
    if T == 1:
        return None
    return _mean([rows[j - 1][j] - b[j] for j in range(1, T)])


def average_forgetting(R: Any) -> float | None:
    """Mean over j < T-1 of (best accuracy on j before the last task) - (accuracy on j now); None for a single task."""
    block = _trained_block(R)
    T = len(block)
    if T == 1:
        return None
    # The best is taken from task j's training onwards: accuracy on j before it was learned is not "knowledge" to lose.
    drops = [max(block[i][j] for i in range(j, T - 1)) - block[T - 1][j] for j in range(T - 1)]
    return _mean(drops)


def summarize(R: Any, baseline: Any) -> dict[str, float | None]:
    """All four metrics for the tasks trained so far: {"avg_acc", "bwt", "fwt", "forgetting"}."""
    rows = as_rows(R)
    _as_baseline(baseline, len(rows[0]))  # validate against all columns, even the ones not trained yet
    return {
        "avg_acc": average_accuracy(rows),
        "bwt": backward_transfer(rows),
        "fwt": forward_transfer(rows, baseline),
        "forgetting": average_forgetting(rows),
    }


def format_matrix(R: Any) -> str:
    """Fixed-width text table of R in percent (1 decimal): one line per "after task i", one column per "task j"."""
    rows = as_rows(R)
    row_labels = [f"after task {i}" for i in range(len(rows))]
    column_labels = [f"task {j}" for j in range(len(rows[0]))]
    corner = "acc (%)"
    label_width = max(len(label) for label in [corner, *row_labels])
    # Wide enough for "100.0" and for the widest "task j" header.
    cell_width = max(5, *(len(label) for label in column_labels))
    header = corner.ljust(label_width) + "".join("  " + label.rjust(cell_width) for label in column_labels)
    lines = [header]
    for label, row in zip(row_labels, rows):
        cells = "".join("  " + f"{100 * value:.1f}".rjust(cell_width) for value in row)
        lines.append(label.ljust(label_width) + cells)
    return "\n".join(lines)


def format_matrices(matrices: Mapping[str, Any]) -> str:
    """Several accuracy matrices of one stream side by side, in percent, under their names (e.g. two methods).

    Compact so that two five-task matrices fit an 80-column terminal: rows are "after training task i", columns
    "task j", both labelled by number only, as the first line says.
    """
    if not matrices:
        raise ValueError("format_matrices needs at least one matrix")
    blocks = {name: as_rows(R) for name, R in matrices.items()}
    shapes = {name: (len(rows), len(rows[0])) for name, rows in blocks.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"matrices to show side by side must have the same shape, got {shapes}")
    n_rows, n_columns = next(iter(shapes.values()))
    cell, gap = 6, "   "
    label_width = max(5, len(str(n_rows - 1)))
    block_width = cell * n_columns

    def line(label: str, cells: list[list[str]]) -> str:
        blocks_text = gap.join("".join(c.rjust(cell) for c in block) for block in cells)
        return (label.rjust(label_width) + gap + blocks_text).rstrip()

    names = " " * (label_width + len(gap)) + gap.join(name[:block_width].ljust(block_width) for name in blocks)
    lines = [
        "accuracy (%) on task j (columns) after training task i (rows)",
        names.rstrip(),
        line("i \\ j", [[str(j) for j in range(n_columns)] for _ in blocks]),
    ]
    for i in range(n_rows):
        lines.append(line(str(i), [[f"{100 * value:.1f}" for value in rows[i]] for rows in blocks.values()]))
    return "\n".join(lines)
