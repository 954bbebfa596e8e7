"""nn.Embedding: a sample's weight gradient is its output gradients added into the rows of the tokens it looked up
(padding rows excepted), so it is sparse and never materialised dense."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample.rules.base import InputAndGrad, LayerRule, concatenated
from lightning_ewc.per_sample.sums import Reduction, reduce_per_sample


class EmbeddingRule(LayerRule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.Embedding and module.max_norm is None

    def merge_calls(self, calls: list[InputAndGrad]) -> list[InputAndGrad]:
        return concatenated(calls, lambda a, n: a.reshape(n, -1))

    def batch_sum(self, module, a, g):
        rows = g.reshape(-1, g.shape[-1]) * (a.reshape(-1) != _padding(module)).unsqueeze(-1)
        return {"weight": torch.zeros_like(module.weight, dtype=g.dtype).index_add_(0, a.reshape(-1), rows)}

    def reduced_sums(
        self, module: nn.Module, calls: list[InputAndGrad], reduction: Reduction
    ) -> Iterator[dict[str, Tensor]]:
        """Σ_n r(per-sample gradient) without the dense [N, V, D] tensor: group each sample's rows by token."""
        ((a, g),) = self.merge_calls(calls)
        n, vocab = a.shape[0], module.weight.shape[0]
        idx = a.reshape(n, -1)
        gg = g.reshape(n, -1, g.shape[-1]) * (idx != _padding(module)).unsqueeze(-1)
        keys = (torch.arange(n, device=idx.device).unsqueeze(1) * vocab + idx).reshape(-1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        per_sample_rows = torch.zeros(len(uniq), gg.shape[-1], dtype=gg.dtype, device=gg.device)
        per_sample_rows.index_add_(0, inverse, gg.reshape(-1, gg.shape[-1]))
        out = torch.zeros_like(module.weight, dtype=gg.dtype)
        yield {"weight": out.index_add_(0, uniq % vocab, reduce_per_sample(per_sample_rows, reduction))}


def _padding(module: nn.Embedding) -> int:
    return -1 if module.padding_idx is None else module.padding_idx
