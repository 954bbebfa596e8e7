"""nn.Embedding: a sample's weight gradient is its output gradients added into the rows of the tokens it looked up
(padding rows excepted), so it is sparse and, for its own sums, never materialised dense."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample.rules.base import InputAndGrad, LayerRule, concatenated, module_type
from lightning_ewc.per_sample.sums import Reduction, reduce_per_sample


class EmbeddingRule(LayerRule):
    route = "embedding"
    local_names = ("weight",)

    def applies(self, module: nn.Module) -> bool:
        return module_type(module) is nn.Embedding and module.max_norm is None

    def accepts_samples_dim(self, module: nn.Module, dim: int, input_dim: int) -> bool:
        return dim < input_dim

    def merge_calls(self, calls: list[InputAndGrad]) -> list[InputAndGrad]:
        return concatenated(calls, lambda a, n: a.reshape(n, -1))

    def per_sample(self, module, a, g):
        """Dense ``[N, V, D]``: only for a weight shared with another layer (``rules/tied.py``), in bounded chunks."""
        n = a.shape[0]
        idx, rows = per_sample_rows(module, a, g)
        dense = torch.zeros(n * module.weight.shape[0], g.shape[-1], dtype=g.dtype, device=g.device)
        dense.index_add_(0, idx, rows)
        return {"weight": dense.view(n, *module.weight.shape)}

    def batch_sum(self, module, a, g):
        rows = g.reshape(-1, g.shape[-1]) * (a.reshape(-1) != padding(module)).unsqueeze(-1)
        # the weight's shape only: under FSDP2 the weight itself is a shard here, outside the module's forward
        weight = torch.zeros(module.weight.shape, dtype=g.dtype, device=g.device)
        return {"weight": weight.index_add_(0, a.reshape(-1), rows)}

    def reduced_sums(
        self, module: nn.Module, calls: list[InputAndGrad], reduction: Reduction
    ) -> Iterator[dict[str, Tensor]]:
        """Σ_n r(per-sample gradient) without the dense [N, V, D] tensor: group each sample's rows by token."""
        ((a, g),) = self.merge_calls(calls)
        vocab = module.weight.shape[0]
        uniq, rows = grouped_rows(module, a, g)
        out = torch.zeros(module.weight.shape, dtype=rows.dtype, device=rows.device)
        yield {"weight": out.index_add_(0, uniq % vocab, reduce_per_sample(rows, reduction))}


def padding(module: nn.Embedding) -> int:
    return -1 if module.padding_idx is None else module.padding_idx


def per_sample_rows(module: nn.Embedding, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """For every looked-up token of every sample, its key ``n·V + token`` and its output gradient (zero at padding),
    ``[N·L]`` and ``[N·L, D]``."""
    n, vocab = a.shape[0], module.weight.shape[0]
    idx = a.reshape(n, -1)
    gg = g.reshape(n, -1, g.shape[-1]) * (idx != padding(module)).unsqueeze(-1)
    keys = (torch.arange(n, device=idx.device).unsqueeze(1) * vocab + idx).reshape(-1)
    return keys, gg.reshape(-1, gg.shape[-1])


def grouped_rows(module: nn.Embedding, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The nonzero rows of the per-sample gradients: unique keys ``n·V + token`` (sorted) and each row summed over
    the sample's occurrences of that token, ``[P]`` and ``[P, D]``."""
    keys, rows = per_sample_rows(module, a, g)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    grouped = torch.zeros(len(uniq), rows.shape[-1], dtype=rows.dtype, device=rows.device)
    return uniq, grouped.index_add_(0, inverse, rows)
