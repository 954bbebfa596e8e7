"""A batch is whatever the user's ``logits_fn`` takes: any nesting of tensors and other values (a pytree)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

Batch = Any


def slice_batch(batch: Batch, start: int, stop: int, n: int) -> Batch:
    """Rows ``start:stop`` of every tensor in ``batch`` whose first dimension is the batch size ``n``."""
    leaves, spec = tree_flatten(batch)
    sliced = [x[start:stop] if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n else x for x in leaves]
    return tree_unflatten(sliced, spec)


def batch_size_of(batch: Batch) -> int | None:
    """The first dimension of the first tensor in ``batch`` (None if the batch holds no tensor).

    Not Lightning's ``extract_batch_size``: that one counts a 0-dim tensor (a temperature, a task id) as a batch of
    1 and warns on every batch whose tensors differ in their first dimension (labels [N] beside a vocabulary table),
    and raises where a batch has no tensor; the importance pass needs the samples of the inputs, quietly."""
    for x in tree_flatten(batch)[0]:
        if isinstance(x, Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None


def with_first_repeated(batch: Batch, n: int) -> Batch:
    """``batch`` (of ``n`` samples) with its first sample appended again: ``n + 1`` samples, whatever ``n`` is."""
    leaves, spec = tree_flatten(batch)
    grown = [torch.cat([x, x[:1]]) if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n else x for x in leaves]
    return tree_unflatten(grown, spec)
