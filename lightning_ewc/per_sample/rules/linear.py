"""nn.Linear: a sample's weight gradient is ``Σ_l g_l a_lᵀ`` over its positions (one position for 2-D input)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_ewc.per_sample.rules.base import InputAndGrad, LayerRule, concatenated


class LinearRule(LayerRule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.Linear

    def merge_calls(self, calls: list[InputAndGrad]) -> list[InputAndGrad]:
        return concatenated(calls, lambda a, n: a.reshape(n, -1, a.shape[-1]))

    def per_sample(self, module, a, g):
        n = a.shape[0]
        a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
        out = {"weight": torch.einsum("nlo,nli->noi", g3, a3)}
        if module.bias is not None:
            out["bias"] = g3.sum(1)
        return out

    def batch_sum(self, module, a, g):
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        out = {"weight": g2.t().mm(a2)}
        if module.bias is not None:
            out["bias"] = g2.sum(0)
        return out
