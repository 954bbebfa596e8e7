"""A convolution whose output goes straight into an eval-mode BatchNorm: both layers' per-sample gradients come from
the gradient at the BatchNorm's output, so the backward pass stops there.

Eval-mode BatchNorm is a per-channel affine map y = s·z + t with s = γ/σ, so the gradient at the conv output is
s·g_bn. Stopping at the BatchNorm output skips BatchNorm's input-gradient pass and the capture of a second
activation-sized gradient. The first-batch self-check finds convs whose output also goes elsewhere (a skip
connection), for which this does not hold; those are left out of the pairing (``unfused``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample.rules.conv import ConvRule, patch_grads, sum_patch_grads
from lightning_ewc.per_sample.rules.norms import BatchNormRule

if TYPE_CHECKING:
    from lightning_ewc.per_sample.taps import Tap


def fused_pairs(taps: list[Tap], unfused: set[int]) -> list[tuple[Tap, Tap]]:
    """``(conv tap, BatchNorm tap)`` for each eval-mode BatchNorm that takes a conv's output as its input (one call
    each), except convs whose module id is in ``unfused``: both get their gradients from the BatchNorm's output
    gradient alone (see ``conv_batchnorm_sums``)."""
    convs = {
        id(tap.calls[0].output): tap
        for tap in taps
        if isinstance(tap.rule, ConvRule)
        and len(tap.calls) == 1
        and "weight" in tap.names
        and id(tap.module) not in unfused
    }
    pairs = []
    for bn in taps:
        if isinstance(bn.rule, BatchNormRule) and len(bn.calls) == 1:
            conv = convs.get(id(bn.calls[0].graph_input))  # both tensors are alive: ids cannot collide
            if conv is not None:
                pairs.append((conv, bn))
    return pairs


def conv_batchnorm_sums(
    conv: nn.Module, bn: nn.Module, a: Tensor, g_bn: Tensor, z: Tensor, reduce: Callable, cols: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Σ_n reduce(per-sample gradient) for a convolution and the eval-mode BatchNorm right after it, from the conv's
    input ``a``, the BatchNorm's input ``z`` (the conv output) and the gradient ``g_bn`` at the BatchNorm's *output*
    only. ``reduce`` is the square, the absolute value or the identity (then these are autograd's batch gradients);
    ``cols`` the unfolded ``a``, where the conv takes that route.

    With s = γ/σ, G = weight-gradient of (a, g_bn) per sample, and Σ_p over one sample's positions:
      conv weight = s·G,  conv bias = s·Σ_p g_bn,  BatchNorm bias = Σ_p g_bn,
      BatchNorm weight = Σ_p g_bn·(z − μ)/σ, where Σ_p g_bn·z = ⟨W, G⟩ + b·Σ_p g_bn
    because z = W∗a + b is linear in W: whichever of g_bn·z and ⟨W, G⟩ has fewer elements is formed. reduce(s·x) =
    reduce(s)·reduce(x), so s is applied to the sums, not to every sample.
    """
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = bn.weight.detach() * inv_std
    per_sample, transposed = patch_grads(conv, a, g_bn, cols)
    spatial = tuple(range(2, g_bn.dim()))
    g_sum = g_bn.sum(spatial)  # [N, O]
    if g_bn[0].numel() <= per_sample[0].numel():
        g_dot_z = (g_bn * z).sum(spatial)
    else:
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        g_dot_z = (per_sample * w.t()).sum(1) if transposed else (per_sample * w).sum(2)
        if conv.bias is not None:
            g_dot_z = g_dot_z + conv.bias.detach() * g_sum
    bias_sums = reduce(g_sum).sum(0)
    channel = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv_sums = {
        "weight": sum_patch_grads(per_sample, transposed, conv.weight.shape, reduce) * reduce(scale).view(channel)
    }
    if conv.bias is not None:
        conv_sums["bias"] = bias_sums * reduce(scale)
    bn_sums = {"weight": reduce((g_dot_z - bn.running_mean * g_sum) * inv_std).sum(0), "bias": bias_sums}
    return conv_sums, bn_sums
