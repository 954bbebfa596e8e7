"""Normalisation layers whose samples do not interact: BatchNorm in eval mode, LayerNorm, RMSNorm, GroupNorm. The
weight's per-sample gradient is ``Σ g·x̂`` over the positions the scale is shared by, the bias's ``Σ g``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ewc.per_sample.rules.base import LayerRule, module_type, sum_over


class BatchNormRule(LayerRule):
    """BatchNorm in eval mode normalises with running statistics, so samples are independent."""

    route = "batchnorm"

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
        g_sum = sum_over(g, dims)
        ga_sum = sum_over(g * a, dims)
        inv_std = torch.rsqrt(module.running_var + module.eps)
        return {"weight": (ga_sum - module.running_mean * g_sum) * inv_std, "bias": g_sum}


class _TrailingNormRule(LayerRule):
    """Norms over the trailing ``normalized_shape`` dims: the samples may lie along any dim before them."""

    def accepts_samples_dim(self, module: nn.Module, dim: int, input_dim: int) -> bool:
        return dim < input_dim - len(module.normalized_shape)

    def normalized(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, module, a, g):
        xhat = self.normalized(module, a)
        n, k = a.shape[0], len(module.normalized_shape)
        middle = tuple(range(1, a.dim() - k))
        out = {"weight": sum_over(g * xhat, middle)}
        if getattr(module, "bias", None) is not None:
            out["bias"] = sum_over(g, middle)
        return {name: t.reshape(n, *module.normalized_shape) for name, t in out.items()}


class LayerNormRule(_TrailingNormRule):
    route = "layernorm"

    def applies(self, module: nn.Module) -> bool:
        return module_type(module) is nn.LayerNorm and module.elementwise_affine

    def normalized(self, module, a):
        return F.layer_norm(a, module.normalized_shape, eps=module.eps)


class RMSNormRule(_TrailingNormRule):
    """``nn.RMSNorm`` (torch ≥ 2.4): ``x̂ = x / √(mean x² + ε)``, scaled by the weight; no bias."""

    route = "rmsnorm"
    local_names = ("weight",)

    def applies(self, module: nn.Module) -> bool:
        rms_norm = getattr(nn, "RMSNorm", None)
        return rms_norm is not None and module_type(module) is rms_norm and module.elementwise_affine

    def normalized(self, module, a):
        return F.rms_norm(a, module.normalized_shape, None, module.eps)


class GroupNormRule(LayerRule):
    route = "groupnorm"

    def applies(self, module: nn.Module) -> bool:
        return module_type(module) is nn.GroupNorm and module.affine

    def per_sample(self, module, a, g):
        xhat = F.group_norm(a, module.num_groups, eps=module.eps)
        dims = tuple(range(2, a.dim()))
        return {"weight": (g * xhat).sum(dims), "bias": g.sum(dims)}
