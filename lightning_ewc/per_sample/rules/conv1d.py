"""transformers' ``Conv1D`` (GPT-2's projections): ``y = x W + b`` with the weight ``[in, out]``, a Linear with its
weight transposed. Matched by class name and defining module, so that importing this package never imports
transformers."""

from __future__ import annotations

from torch import nn

from lightning_ewc.per_sample.rules.base import module_type
from lightning_ewc.per_sample.rules.linear import LinearRule


class Conv1DRule(LinearRule):
    route = "conv1d"
    transposed = True

    def applies(self, module: nn.Module) -> bool:
        cls = module_type(module)
        return (
            cls.__name__ == "Conv1D"
            and cls.__module__ == "transformers.pytorch_utils"  # the class itself, not a subclass defined elsewhere
            and isinstance(getattr(module, "weight", None), nn.Parameter)
            and module.weight.shape == (getattr(module, "nx", None), getattr(module, "nf", None))
        )
