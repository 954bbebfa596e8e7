"""The engine: taps the covered layers during one forward per batch, backpropagates each vector to the layer outputs,
turns (input, output gradient) into sums through each layer's rule, and leaves the other parameters to the exact
fallback. The route for each parameter is decided once, by the first-batch self-check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample.batches import Batch
from lightning_ewc.per_sample.fallback import ExactFallback
from lightning_ewc.per_sample.rules import ConvRule, LinearRule, rule_for
from lightning_ewc.per_sample.rules.conv import ConvChunks, reduced_conv_sums
from lightning_ewc.per_sample.rules.conv_batchnorm import conv_batchnorm_sums, fused_pairs
from lightning_ewc.per_sample.self_check import check_taps, first_samples
from lightning_ewc.per_sample.sums import Reduction, reduce_per_sample
from lightning_ewc.per_sample.taps import Tap

log = logging.getLogger(__name__)

OutputGrads = Callable[[Tensor, Batch], Sequence[Tensor]]
"""Given the logits [N, ...] of a batch (and the batch), the vectors v (same shape as the logits) to backpropagate;
one vector per backward pass (e.g. C − 1 for the exact Fisher over C classes)."""


@dataclass
class PerSampleReport:
    """Which route each parameter took (``tap``, ``vmap`` or ``loop``); logged once per estimation."""

    routes: dict[str, str] = field(default_factory=dict)
    # (conv, BatchNorm) module names whose per-sample gradients came from the BatchNorm's output gradient alone
    fused: set[tuple[str, str]] = field(default_factory=set)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for route in self.routes.values():
            counts[route] = counts.get(route, 0) + 1
        return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


class PerSampleAccumulator:
    """Accumulates ``Σ_n r(∂(v_n·z_n)/∂θ)`` over batches for the selected parameters of ``model``.

    ``logits_fn(batch)`` runs the model on a batch (through any head selection the user needs) and returns the output
    ``z`` with the samples along dim 0. Samples must not interact (the model in eval mode), which is what makes
    per-sample gradients meaningful.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        logits_fn: Callable[[Batch], Tensor],
        reduction: Reduction = "sq",
    ) -> None:
        if reduction not in ("sq", "abs"):
            raise ValueError(f"reduction must be 'sq' or 'abs', got {reduction!r}")
        self.model, self.params, self.logits_fn, self.reduction = model, params, logits_fn, reduction
        self.sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.count = 0
        self.report = PerSampleReport()
        self._taps = self._build_taps()
        self._fallback = ExactFallback(model, logits_fn, reduction, self.report.routes)
        tapped = self._tapped_names()
        for name, p in params.items():
            if name in tapped:
                self.report.routes[name] = "tap"
            else:
                self._fallback.add_param(name, p)
        self._checked = False
        self._unfused: set[int] = set()  # ids of convs whose output also goes elsewhere than their BatchNorm
        self._conv_chunks = ConvChunks()  # keeps unfolded conv inputs across one batch's backward passes

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _build_taps(self) -> list[Tap]:
        by_id = {id(p): name for name, p in self.params.items()}
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        taps = []
        for module_name, module in self.model.named_modules():
            rule = rule_for(module)
            if rule is None:
                continue
            names = {
                local: by_id[id(p)]
                for local, p in module.named_parameters(recurse=False)
                if id(p) in by_id and owners[id(p)] == 1  # a parameter shared by two modules goes to the fallback
            }
            if names:
                taps.append(Tap(module_name, module, rule, names))
        return taps

    def _tapped_names(self) -> set[str]:
        return {full for tap in self._taps for full in tap.names.values()}

    def _untap(self, names: Iterable[str]) -> None:
        names = set(names)
        for tap in self._taps:
            tap.names = {k: v for k, v in tap.names.items() if v not in names}
        self._taps = [tap for tap in self._taps if tap.names]
        for name in names:
            self._fallback.add_param(name, self.params[name])

    def _self_check(self, batch: Batch) -> None:
        """Runs the first-batch self-check (``self_check.py``): convs it finds feeding more than their BatchNorm are
        computed apart from it, and tapped parameters still wrong go to the exact fallback."""
        logits = self._forward_without_rewrites(first_samples(batch))
        try:
            wrong = check_taps(self._taps, self.params, logits, self._unfused)
            if wrong:
                log.warning(
                    "per-sample gradients: %s used outside their own module call (tied weights?); "
                    "using the exact fallback for them",
                    ", ".join(wrong),
                )
                self._untap(wrong)
        finally:
            for tap in self._taps:
                tap.calls.clear()

    # -- one batch --------------------------------------------------------------------------------------------------
    def add_batch(self, batch: Batch, output_grads: OutputGrads) -> int:
        """Adds one batch; returns its number of samples."""
        if not self._checked:
            self._self_check(batch)
            self._checked = True
        logits = self._forward_without_rewrites(batch)
        try:
            n = logits.shape[0]
            vectors = [v.detach() for v in output_grads(logits, batch)]
            self._add_tapped(logits, vectors)
            if self._fallback.params:
                self._fallback.add_batch(batch, vectors, n, self.sums)
        finally:
            for tap in self._taps:
                tap.calls.clear()
            self._conv_chunks.clear()
        self.count += n
        return n

    def _forward_without_rewrites(self, batch: Batch) -> Tensor:
        logits = self._tapped_forward(batch)
        rewritten = [tap for tap in self._taps if not tap.clone_output and tap.rewritten_in_place()]
        if rewritten:  # an output was changed in place after its tap saw it: redo this forward with copies
            for tap in self._taps:
                tap.calls.clear()
            for tap in rewritten:
                tap.clone_output = True
            logits = self._tapped_forward(batch)
        return logits

    def _tapped_forward(self, batch: Batch) -> Tensor:
        handles = [tap.module.register_forward_hook(tap.hook) for tap in self._taps]
        try:
            with torch.enable_grad():
                return self.logits_fn(batch)
        finally:
            for h in handles:
                h.remove()

    def _add_tapped(self, logits: Tensor, vectors: list[Tensor]) -> None:
        taps = [tap for tap in self._taps if tap.calls]
        if not taps:
            return
        pairs = fused_pairs(taps, self._unfused)
        conv_of = {id(bn): conv for conv, bn in pairs}
        fused_convs = {id(conv) for conv, _ in pairs}
        taps = [tap for tap in taps if id(tap) not in fused_convs]  # their gradients come through the BatchNorm's
        self.report.fused.update((conv.name, bn.name) for conv, bn in pairs)
        outputs = [call.output for tap in taps for call in tap.calls]
        # Linear layers called once on 2-D input: accumulate Σ_k g_k² (or |g_k|) over passes, one matmul at the end.
        rank_one: dict[int, Tensor] = {}
        for k, v in enumerate(vectors):
            grads = torch.autograd.grad(
                logits, outputs, grad_outputs=v, retain_graph=k + 1 < len(vectors), allow_unused=True
            )
            it = iter(grads)
            for tap in taps:
                gs = [next(it) for _ in tap.calls]
                if id(tap) in conv_of:
                    self._add_fused(conv_of[id(tap)], tap, gs[0], len(vectors))
                elif isinstance(tap.rule, ConvRule) and len(tap.calls) == 1:
                    self._add_conv(tap, gs[0], len(vectors))
                elif isinstance(tap.rule, LinearRule) and len(tap.calls) == 1 and tap.calls[0].input.dim() == 2:
                    g = gs[0] if gs[0] is not None else torch.zeros_like(tap.calls[0].output)
                    r = reduce_per_sample(g, self.reduction)
                    rank_one[id(tap)] = r if id(tap) not in rank_one else rank_one[id(tap)] + r
                else:
                    self._add_materialised(tap, gs)
        for tap in taps:
            if id(tap) in rank_one:
                g_r, a_r = rank_one[id(tap)], reduce_per_sample(tap.calls[0].input, self.reduction)
                if "weight" in tap.names:  # Σ_n r(g_n)ᵀ r(a_n), added in place into the running sum
                    self.sums[tap.names["weight"]].addmm_(g_r.t().float(), a_r.float())
                if "bias" in tap.names:
                    self.sums[tap.names["bias"]] += g_r.sum(0).float()

    def _add_conv(self, conv: Tap, g: Tensor | None, passes: int) -> None:
        module, a = conv.module, conv.calls[0].input
        g = g if g is not None else torch.zeros_like(conv.calls[0].output)
        for rows, cols in self._conv_chunks.split(id(conv), module, a, g, passes):
            self._accumulate(conv, reduced_conv_sums(module, a[rows], g[rows], cols, self._reduce))

    def _add_fused(self, conv: Tap, bn: Tap, g_bn: Tensor | None, passes: int) -> None:
        a, z = conv.calls[0].input, bn.calls[0].input
        g_bn = g_bn if g_bn is not None else torch.zeros_like(bn.calls[0].output)
        for rows, cols in self._conv_chunks.split(id(conv), conv.module, a, g_bn, passes):
            conv_sums, bn_sums = conv_batchnorm_sums(
                conv.module, bn.module, a[rows], g_bn[rows], z[rows], self._reduce, cols
            )
            self._accumulate(conv, conv_sums)
            self._accumulate(bn, bn_sums)

    def _add_materialised(self, tap: Tap, gs: list[Tensor | None]) -> None:
        calls = [(c.input, g if g is not None else torch.zeros_like(c.output)) for c, g in zip(tap.calls, gs)]
        for sums in tap.rule.reduced_sums(tap.module, calls, self.reduction):
            self._accumulate(tap, sums)

    def _reduce(self, x: Tensor) -> Tensor:
        return reduce_per_sample(x, self.reduction)

    def _accumulate(self, tap: Tap, local_sums: dict[str, Tensor]) -> None:
        for local, full in tap.names.items():
            if local in local_sums:
                self.sums[full] += local_sums[local].to(torch.float32)
