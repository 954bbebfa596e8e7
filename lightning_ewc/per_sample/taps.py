"""Taps: forward hooks that capture the (input, output) of every tapped module during one forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn

from lightning_ewc.per_sample.rules import LayerRule


class Call(NamedTuple):
    input: Tensor  # detached
    output: Tensor
    version: int  # the output's version counter when the hook saw it
    graph_input: Any  # the input as the module received it, to recognise "this module consumes that one's output"


@dataclass
class Tap:
    name: str  # the module's qualified name
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # local param name -> full name (only trainable, selected params)
    calls: list[Call] = field(default_factory=list)
    clone_output: bool = False  # set when a later in-place op (ReLU(inplace=True)) rewrites this module's output

    def hook(self, module, inputs, output):
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return None
        self.calls.append(Call(inputs[0].detach(), output, output._version, inputs[0]))
        # An in-place op downstream would rewrite `output`'s history, and the gradient autograd gives for it would be
        # the one after that op. Such taps hand the network a copy instead (found on the first forward).
        return output.clone() if self.clone_output else None

    def rewritten_in_place(self) -> bool:
        return any(call.output._version != call.version for call in self.calls)
