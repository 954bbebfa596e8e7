"""Layer rules: per-sample parameter gradients of one layer type from its inputs and output gradients.

``RULES`` is tried in order, and a module takes the first rule that applies to it. A new layer type is a module in
this package with a ``LayerRule`` subclass (see ``base.py``), and an entry in ``RULES``.
"""

from __future__ import annotations

from torch import nn

from lightning_ewc.per_sample.rules.base import InputAndGrad, LayerRule
from lightning_ewc.per_sample.rules.conv import ConvRule
from lightning_ewc.per_sample.rules.embedding import EmbeddingRule
from lightning_ewc.per_sample.rules.linear import LinearRule
from lightning_ewc.per_sample.rules.norms import BatchNormRule, GroupNormRule, LayerNormRule

RULES: tuple[LayerRule, ...] = (
    LinearRule(),
    ConvRule(),
    BatchNormRule(),
    LayerNormRule(),
    GroupNormRule(),
    EmbeddingRule(),
)


def rule_for(module: nn.Module) -> LayerRule | None:
    return next((rule for rule in RULES if rule.applies(module)), None)


__all__ = [
    "RULES",
    "BatchNormRule",
    "ConvRule",
    "EmbeddingRule",
    "GroupNormRule",
    "InputAndGrad",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "rule_for",
]
