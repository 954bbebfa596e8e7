"""Taps: what the engine captures of every tapped module call during one forward (its input and its output), and
where the samples lie in them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from lightning_ewc.per_sample.rules import InputAndGrad, LayerRule


class Call(NamedTuple):
    input: Tensor  # detached (expanded to the samples for a shared call)
    output: Tensor
    version: int  # the output's version counter when the tap saw it
    graph_input: Any  # the input as the module received it, to recognise "this module consumes that one's output"


@dataclass
class Tap:
    name: str  # the module's qualified name, with the part's label for a module in several parts ("attn[q]")
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # local param name -> full name (only trainable, selected params)
    rows: dict[str, slice] = field(default_factory=dict)  # local name -> rows of the full parameter (a part's block)
    part: str = ""  # the part's label ("q", "k", "v" of an attention module), "" for a whole module
    calls: list[Call] = field(default_factory=list)
    clone_output: bool = False  # set when a later in-place op (ReLU(inplace=True)) rewrites this module's output
    # Where the samples lie in the module's input and output, found by the self-check (``self_check.place_samples``):
    # dim ``samples_dim``, or, for a ``shared`` call that has no samples' dim (a position embedding looked up once
    # and broadcast over the batch), none: its output is then expanded to ``samples`` copies, one per sample, so that
    # the gradient at it is per sample.
    samples_dim: int = 0
    placed: bool = False
    shared: bool = False
    samples: int = 0
    # Full name -> the tensor the module computed with in the last forward, when ``capture_in_use`` is set: with
    # FSDP2 that is the gathered full-size parameter, which autograd can differentiate, not the sharded one.
    capture_in_use: bool = False
    in_use: dict[str, Tensor] = field(default_factory=dict)

    def hook(self, module, inputs, output):
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return None
        out = self.record(inputs[0], output)
        return None if out is output else out

    def record(self, input: Tensor, output: Tensor) -> Tensor:
        """Captures one call; returns the output the network goes on with."""
        graph_input = input
        if self.capture_in_use:
            own = dict(self.module.named_parameters(recurse=False))
            self.in_use.update({full: own[full.rsplit(".", 1)[-1]] for full in self.names.values()})
        if self.shared:
            input, output = expanded(input, output, self.samples)
        self.calls.append(Call(input.detach(), output, output._version, graph_input))
        # An in-place op downstream would rewrite `output`'s history, and the gradient autograd gives for it would be
        # the one after that op. Such taps hand the network a copy instead (found on the first forward). An FSDP2 unit
        # gets a copy of an expanded (shared) output too: FSDP2 hooks its pre-backward all-gather on the module's
        # outputs and warns for a view, whose in-place use downstream would drop that hook.
        if self.clone_output or (self.shared and isinstance(self.module, FSDPModule)):
            return output.clone()
        return output

    def rewritten_in_place(self) -> bool:
        return any(call.output._version != call.version for call in self.calls)

    def samples_first(self, x: Tensor) -> Tensor:
        return x.movedim(self.samples_dim, 0) if self.samples_dim else x

    def inputs_and_grads(self, grads: list[Tensor | None]) -> list[InputAndGrad]:
        """Each call's input and output gradient (zeros where autograd gave None), samples along dim 0."""
        return [
            (
                self.samples_first(c.input),
                self.samples_first(g if g is not None else c.output.new_zeros(c.output.shape)),
            )
            for c, g in zip(self.calls, grads)
        ]

    def fits(self, n: int) -> bool:
        """Whether this forward's calls have ``n`` samples where the self-check found them."""
        d = self.samples_dim
        return self.placed and all(
            c.input.dim() > d and c.input.shape[d] == n and c.output.dim() > d and c.output.shape[d] == n
            for c in self.calls
        )


def expanded(input: Tensor, output: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """A shared call's input and output as ``n`` identical samples along a new leading dim, or along their leading
    dim where both have size 1 there (``[1, T]`` positions): views, no copy."""
    if input.dim() and output.dim() and input.shape[0] == 1 and output.shape[0] == 1:
        return input.expand(n, *input.shape[1:]), output.expand(n, *output.shape[1:])
    return input.unsqueeze(0).expand(n, *input.shape), output.unsqueeze(0).expand(n, *output.shape)
