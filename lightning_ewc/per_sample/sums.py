"""How a per-sample gradient enters its sum (the reduction), and the check that the sums came out finite."""

from __future__ import annotations

import torch
from torch import Tensor

Reduction = str  # "sq" (sum of squares) or "abs" (sum of absolute values)


def reduce_per_sample(x: Tensor, reduction: Reduction) -> Tensor:
    """``r(x)``, elementwise: the square for a Fisher, the absolute value for MAS."""
    return x.square() if reduction == "sq" else x.abs()


def reduce_per_sample_owned(x: Tensor, reduction: Reduction, shared_with: list[Tensor]) -> Tensor:
    """``r(x)``, in place where ``x`` shares no memory with ``shared_with`` (the tensors it was computed from, which
    other sums still read): materialised per-sample gradients are the largest tensors of the pass, and a second one of
    the same size for their squares cost more than the squaring."""
    storage = x.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == storage for t in shared_with):
        return reduce_per_sample(x, reduction)
    return x.square_() if reduction == "sq" else x.abs_()


def finite_or_raise(sums: dict[str, Tensor], what: str) -> None:
    # One sum per tensor: NaN and inf anywhere reach it, at a fraction of an elementwise isfinite per tensor.
    totals = torch.stack([t.sum() for t in sums.values()]) if sums else torch.zeros(0)
    if bool(torch.isfinite(totals).all()):
        return
    bad = [name for name, t in sums.items() if not bool(torch.isfinite(t).all())]
    raise FloatingPointError(
        f"{what} has non-finite values (NaN/inf) for {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. "
        "The weights or the data already hold NaN/inf, or the logits overflow: check the task's training "
        "loss, lower the learning rate or clip gradients, and re-run."
    )
