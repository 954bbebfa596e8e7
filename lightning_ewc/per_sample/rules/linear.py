"""nn.Linear: a sample's weight gradient is ``Σ_l g_l a_lᵀ`` over its positions (one position for 2-D input)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample.rules.base import InputAndGrad, LayerRule, concatenated


class LinearRule(LayerRule):
    """``y = a Wᵀ + b`` with the weight ``[out, in]``; ``transposed`` rules (GPT-2's Conv1D) keep it ``[in, out]``."""

    route = "linear"
    transposed = False

    def applies(self, module: nn.Module) -> bool:
        # A subclass that keeps Linear's forward computes F.linear(x, weight, bias), as MultiheadAttention's out_proj
        # (NonDynamicallyQuantizableLinear) does; one that overrides it (LoRA, quantised layers) may compute anything.
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def accepts_samples_dim(self, module: nn.Module, dim: int, input_dim: int) -> bool:
        return dim < input_dim - 1  # any dim but the features

    def has_bias(self, module: nn.Module) -> bool:
        return module.bias is not None

    def merge_calls(self, calls: list[InputAndGrad]) -> list[InputAndGrad]:
        return concatenated(calls, lambda a, n: a.reshape(n, -1, a.shape[-1]))

    def per_sample(self, module, a, g):
        n = a.shape[0]
        a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
        weight = torch.einsum("nli,nlo->nio", a3, g3) if self.transposed else torch.einsum("nlo,nli->noi", g3, a3)
        out = {"weight": weight}
        if self.has_bias(module):
            out["bias"] = g3.sum(1)
        return out

    def batch_sum(self, module, a, g):
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        out = {"weight": self.outer_sum(g2, a2)}
        if self.has_bias(module):
            out["bias"] = g2.sum(0)
        return out

    def outer_sum(self, g: Tensor, a: Tensor) -> Tensor:
        """``Σ_rows g aᵀ`` in the weight's layout, for ``g`` ``[rows, out]`` and ``a`` ``[rows, in]``."""
        return a.t().mm(g) if self.transposed else g.t().mm(a)
