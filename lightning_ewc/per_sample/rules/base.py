"""The interface every layer rule implements, and what rules share: how many samples one materialised block holds.

A rule turns one layer's input ``a`` and the gradient ``g`` at its output, both with the samples along dim 0, into
that layer's per-sample parameter gradients. (The engine moves the samples to dim 0 first: inside a sequence-first
model a Linear sees ``[T, N, D]``.) A new layer type is a new module in this package with a ``LayerRule`` subclass,
listed in ``RULES`` (``rules/__init__.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from lightning_ewc.per_sample import limits
from lightning_ewc.per_sample.sums import Reduction, reduce_per_sample_owned

InputAndGrad = tuple[Tensor, Tensor]  # one call of a module: its input and the gradient at its output


def module_type(module: nn.Module) -> type:
    """The module's class, for rules that accept a class but not its subclasses (which may compute otherwise). A
    module that FSDP2's ``fully_shard`` made a unit of its own has a class made for it, ``FSDP<Class>`` with bases
    ``(FSDPModule, Class)``, which adds hooks and methods but no computation: its ``Class`` is meant."""
    cls = type(module)
    if isinstance(module, FSDPModule) and len(cls.__bases__) == 2 and cls.__bases__[0] is FSDPModule:
        return cls.__bases__[1]
    return cls


def samples_per_block(module: nn.Module) -> int:
    """How many samples' per-sample gradients of ``module``'s own parameters fit in ``limits.MAX_BLOCK_ELEMENTS``."""
    numel = sum(p.numel() for p in module.parameters(recurse=False))
    return max(1, limits.MAX_BLOCK_ELEMENTS // max(numel, 1))


def concatenated(calls: list[InputAndGrad], positions: Callable[[Tensor, int], Tensor]) -> list[InputAndGrad]:
    """Several calls as one: each input reshaped by ``positions(a, n)`` and each output gradient to ``[N, L, D]``,
    then concatenated along dim 1. Right for layers whose parameters act on every position alike (a Linear on a
    sequence, an Embedding), where a second call is just more positions."""
    if len(calls) <= 1:
        return calls
    n = calls[0][0].shape[0]
    a = torch.cat([positions(a, n) for a, _ in calls], 1)
    g = torch.cat([g.reshape(n, -1, g.shape[-1]) for _, g in calls], 1)
    return [(a, g)]


def sum_over(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t.sum(dims)``, or ``t`` itself when there is nothing to sum over."""
    return t.sum(dims) if dims else t


@dataclass(frozen=True)
class Part:
    """What one tap of a module computes: ``rule``'s local names, each the rows ``rows`` (None: all) of the module's
    parameter ``param``. Most modules are one part; MultiheadAttention is three (q, k, v: blocks of in_proj_weight)."""

    label: str
    rule: LayerRule
    params: dict[str, tuple[str, slice | None]]  # local name -> (the module's parameter name, rows of it)


class LayerRule:
    """How one layer type turns its inputs and output-gradients into per-sample parameter gradients."""

    route = "tap"  # the name ``PerSampleReport.routes`` gives the parameters on this rule
    local_names: tuple[str, ...] = ("weight", "bias")  # the module's own parameters this rule computes

    def applies(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def parts(self, module: nn.Module) -> list[Part]:
        """The taps the module needs; by default one, computing the rule's local names on the whole parameters."""
        return [Part("", self, {name: (name, None) for name in self.local_names})]

    def accepts_samples_dim(self, module: nn.Module, dim: int, input_dim: int) -> bool:
        """Whether the samples may lie along ``dim`` of the module's ``input_dim``-dimensional input (and the same
        dim of its output). Layers that act on every position alike accept any dim before their feature dims;
        layers with a channel dim (convs, BatchNorm, GroupNorm) want the samples first."""
        return dim == 0

    def per_sample(self, module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Per-sample gradients ``{param_name: Tensor[N, *param.shape]}`` for one call of the module."""
        raise NotImplementedError

    def merge_calls(self, calls: list[InputAndGrad]) -> list[InputAndGrad]:
        """The module's calls in one forward, merged into fewer where the rule allows it (by default, left apart)."""
        return calls

    def batch_sum(self, module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Σ_n of the per-sample gradients (what autograd gives), in chunks so memory stays bounded."""
        chunk = samples_per_block(module)
        total: dict[str, Tensor] = {}
        for start in range(0, a.shape[0], chunk):
            for name, t in self.per_sample(module, a[start : start + chunk], g[start : start + chunk]).items():
                total[name] = t.sum(0) if name not in total else total[name] + t.sum(0)
        return total

    def summed_per_sample(self, module: nn.Module, merged: list[InputAndGrad], rows: slice) -> dict[str, Tensor]:
        """The per-sample gradients of samples ``rows``, summed over the module's calls (as ``merge_calls`` gave
        them)."""
        total: dict[str, Tensor] = {}
        for a, g in merged:
            for name, t in self.per_sample(module, a[rows], g[rows]).items():
                total[name] = t if name not in total else total[name] + t
        return total

    def reduced_sums(
        self, module: nn.Module, calls: list[InputAndGrad], reduction: Reduction
    ) -> Iterator[dict[str, Tensor]]:
        """Σ_n r(per-sample gradient) over all the module's calls in one forward, one partial sum per chunk of
        samples: each chunk's per-sample gradients are materialised, summed over the calls, then reduced."""
        merged = self.merge_calls(calls)
        n = merged[0][0].shape[0]
        chunk = samples_per_block(module)
        for start in range(0, n, chunk):
            total = self.summed_per_sample(module, merged, slice(start, start + chunk))
            sources = [x for call in merged for x in call]
            yield {name: reduce_per_sample_owned(t, reduction, sources).sum(0) for name, t in total.items()}
