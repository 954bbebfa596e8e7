"""nn.Conv1d / nn.Conv2d with zero padding: each sample's weight gradient is the weight-gradient convolution of that
sample alone, run for all samples at once with ``torch.func.vmap`` (it covers grouped convolutions), or, for a
Conv2d, a bmm of the output gradient with the unfolded input (see ``uses_unfold``). Also here: how a conv call's
samples are split into bounded chunks, with the unfolded inputs kept across a batch's backward passes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ewc.per_sample import limits
from lightning_ewc.per_sample.rules.base import LayerRule, module_type


class ConvRule(LayerRule):
    route = "conv"

    def applies(self, module: nn.Module) -> bool:
        return (
            module_type(module) in (nn.Conv1d, nn.Conv2d)
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )

    def per_sample(self, module, a, g):
        out = {"weight": per_sample_weight_grads(module, a, g)}
        if module.bias is not None:
            out["bias"] = g.sum(tuple(range(2, g.dim())))
        return out

    def batch_sum(self, module, a, g):
        out = {"weight": weight_grad(module, a, g)}
        if module.bias is not None:
            out["bias"] = g.sum((0, *range(2, g.dim())))
        return out


def weight_grad(module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    """The weight gradient summed over the samples of ``a`` and ``g`` (what autograd gives)."""
    grad_fn = torch.nn.grad.conv2d_weight if isinstance(module, nn.Conv2d) else torch.nn.grad.conv1d_weight
    return grad_fn(a, module.weight.shape, g, module.stride, module.padding, module.dilation, module.groups)


def uses_unfold(module: nn.Module, passes: int) -> bool:
    """Unfold + bmm where it is the faster route: when the unfolded input is no bigger than the output gradient (a
    first layer with few input channels), or when the unfolded input serves several backward passes of the batch
    (the exact Fisher: one per class but one). Elsewhere unfolding costs about as much as the bmm itself, and the
    two together lose to the vmapped weight-gradient convolution."""
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        return False
    return passes > 1 or module.weight.shape[1:].numel() <= module.out_channels


def unfold(module: nn.Module, a: Tensor) -> Tensor:
    """The input patches ``[N, I*K, L]`` (L output positions)."""
    return F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)


def per_sample_weight_grads(module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    """``[N, *weight.shape]`` by the vmapped weight-gradient convolution."""
    one = lambda a_n, g_n: weight_grad(module, a_n.unsqueeze(0), g_n.unsqueeze(0))  # noqa: E731
    return torch.func.vmap(one)(a, g)


def patch_grads(module: nn.Module, a: Tensor, g: Tensor, cols: Tensor | None) -> tuple[Tensor, bool]:
    """Per-sample weight gradients, contiguous, as ``[N, O, I*K]`` (False) or, from the unfolded input ``cols``, as
    ``[N, I*K, O]`` (True): the bmm's own layout. Both operands go in as laid out: the other orientation needs a
    transposed copy of the patches, and copying the result into the weight's layout is one more pass over the
    largest tensor here, so the sums read either layout instead (``sum_patch_grads``)."""
    n = a.shape[0]
    if cols is not None:
        return torch.bmm(cols, g.reshape(n, g.shape[1], -1).transpose(1, 2)), True
    return per_sample_weight_grads(module, a, g).reshape(n, module.out_channels, -1), False


def sum_patch_grads(per_sample: Tensor, transposed: bool, shape: torch.Size, reduce: Callable) -> Tensor:
    """Σ_n reduce(G_n) in the weight's ``shape``, from ``patch_grads``."""
    total = reduce(per_sample).sum(0)
    return (total.t() if transposed else total).reshape(shape)


def reduced_conv_sums(
    module: nn.Module, a: Tensor, g: Tensor, cols: Tensor | None, reduce: Callable
) -> dict[str, Tensor]:
    """Σ_n reduce(per-sample gradient) of one conv call's samples ``a``, ``g`` (``cols``: their unfolded input)."""
    per_sample, transposed = patch_grads(module, a, g, cols)
    sums = {"weight": sum_patch_grads(per_sample, transposed, module.weight.shape, reduce)}
    if module.bias is not None:
        sums["bias"] = reduce(g.sum(tuple(range(2, g.dim())))).sum(0)
    return sums


class ConvChunks:
    """Splits a conv call's samples into ranges whose per-sample gradients fit in ``limits.MAX_BLOCK_ELEMENTS``,
    each with its unfolded input when that route is taken. Unfolded inputs are kept for the batch's next backward
    pass while they fit in ``limits.MAX_CACHED_ELEMENTS``; ``clear`` drops them at the end of the batch."""

    def __init__(self) -> None:
        self._cols: dict[tuple[int, int], Tensor] = {}  # (conv key, first sample) -> unfolded input, one batch

    def split(
        self, key: int, module: nn.Module, a: Tensor, g: Tensor, passes: int
    ) -> Iterator[tuple[slice, Tensor | None]]:
        """Sample ranges of the conv call with input ``a`` and output gradient ``g``; ``key`` names the call."""
        use_unfold = uses_unfold(module, passes)
        per_sample = module.weight.numel()
        if use_unfold:  # the patches [I*K, L] of one sample can be larger than its gradient [O, I*K]
            per_sample = max(per_sample, module.weight.shape[1:].numel() * g[0, 0].numel())
        chunk = max(1, limits.MAX_BLOCK_ELEMENTS // per_sample)
        for start in range(0, a.shape[0], chunk):
            rows = slice(start, start + chunk)
            cols = self._cols.get((key, start)) if use_unfold else None
            if use_unfold and cols is None:
                cols = unfold(module, a[rows])
                cached = sum(t.numel() for t in self._cols.values())
                if passes > 1 and cached + cols.numel() <= limits.MAX_CACHED_ELEMENTS:
                    self._cols[(key, start)] = cols
            yield rows, cols

    def clear(self) -> None:
        self._cols.clear()
