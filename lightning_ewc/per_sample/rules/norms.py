"""Normalisation layers whose samples do not interact: BatchNorm in eval mode, LayerNorm, GroupNorm. The weight's
per-sample gradient is ``Σ g·x̂`` over the positions the scale is shared by, the bias's ``Σ g``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ewc.per_sample.rules.base import LayerRule


class BatchNormRule(LayerRule):
    """BatchNorm in eval mode normalises with running statistics, so samples are independent."""

    def applies(self, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.affine
            and module.running_mean is not None
            and not module.training
        )

    def per_sample(self, module, a, g):
        # Σ_hw g·x̂ with x̂ = (a − μ)/σ per channel is (Σ_hw g·a − μ Σ_hw g)/σ: no x̂ tensor needed.
        dims = tuple(range(2, a.dim()))
        g_sum = g.sum(dims) if dims else g
        ga_sum = (g * a).sum(dims) if dims else g * a
        inv_std = torch.rsqrt(module.running_var + module.eps)
        return {"weight": (ga_sum - module.running_mean * g_sum) * inv_std, "bias": g_sum}


class LayerNormRule(LayerRule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.LayerNorm and module.elementwise_affine

    def per_sample(self, module, a, g):
        xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
        n, k = a.shape[0], len(module.normalized_shape)
        middle = tuple(range(1, a.dim() - k))
        out = {"weight": (g * xhat).sum(middle) if middle else g * xhat}
        if module.bias is not None:
            out["bias"] = g.sum(middle) if middle else g
        return {name: t.reshape(n, *module.normalized_shape) for name, t in out.items()}


class GroupNormRule(LayerRule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.GroupNorm and module.affine

    def per_sample(self, module, a, g):
        xhat = F.group_norm(a, module.num_groups, eps=module.eps)
        dims = tuple(range(2, a.dim()))
        return {"weight": (g * xhat).sum(dims), "bias": g.sum(dims)}
