"""Layer rules: per-sample parameter gradients of one layer type from its inputs and output gradients.

``RULES`` is tried in order, and a module takes the first rule that applies to it. A new layer type is a module in
this package with a ``LayerRule`` subclass (see ``base.py``), and an entry in ``RULES``.
"""

from __future__ import annotations

from torch import nn

from lightning_ewc.per_sample.rules.attention import AttentionRule, ProjectionRule, bypassed_submodules
from lightning_ewc.per_sample.rules.base import InputAndGrad, LayerRule, Part
from lightning_ewc.per_sample.rules.conv import ConvRule
from lightning_ewc.per_sample.rules.conv1d import Conv1DRule
from lightning_ewc.per_sample.rules.embedding import EmbeddingRule
from lightning_ewc.per_sample.rules.linear import LinearRule
from lightning_ewc.per_sample.rules.norms import BatchNormRule, GroupNormRule, LayerNormRule, RMSNormRule

RULES: tuple[LayerRule, ...] = (
    LinearRule(),
    ConvRule(),
    BatchNormRule(),
    LayerNormRule(),
    RMSNormRule(),
    GroupNormRule(),
    EmbeddingRule(),
    AttentionRule(),
    Conv1DRule(),
)


def rule_for(module: nn.Module) -> LayerRule | None:
    return next((rule for rule in RULES if rule.applies(module)), None)


__all__ = [
    "RULES",
    "AttentionRule",
    "BatchNormRule",
    "Conv1DRule",
    "ConvRule",
    "EmbeddingRule",
    "GroupNormRule",
    "InputAndGrad",
    "LayerNormRule",
    "LayerRule",
    "LinearRule",
    "Part",
    "ProjectionRule",
    "RMSNormRule",
    "bypassed_submodules",
    "rule_for",
]
