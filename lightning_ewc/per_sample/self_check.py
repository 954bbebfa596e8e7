"""The first-batch self-check: the taps' per-sample gradients, summed over the samples, must equal autograd's batch
gradient. It is run once, on the first few samples in a forward of their own (cheap next to the pass). The vector
backpropagated is the logits themselves: the identity holds for any vector, and this draws no random labels.

Two things make a tap wrong, and both show up as a mismatch: a tapped weight also used outside its module call (tied
weights through ``F.linear``), which goes to the exact fallback, and a conv whose output also feeds something besides
its BatchNorm (a skip connection), which is then computed on its own instead of through the BatchNorm.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample.batches import Batch, batch_size_of, slice_batch
from lightning_ewc.per_sample.rules.conv_batchnorm import conv_batchnorm_sums, fused_pairs
from lightning_ewc.per_sample.taps import Tap

log = logging.getLogger(__name__)

# Samples the first-batch self-check runs on.
CHECK_SAMPLES = 8


def first_samples(batch: Batch) -> Batch:
    """The samples the check runs on: the first ``CHECK_SAMPLES`` of ``batch``."""
    n = batch_size_of(batch)
    return slice_batch(batch, 0, min(n, CHECK_SAMPLES), n) if n else batch


def check_taps(taps: list[Tap], params: dict[str, nn.Parameter], logits: Tensor, unfused: set[int]) -> list[str]:
    """Compares, for the forward that gave ``logits`` (its calls captured by ``taps``), the taps' summed gradients
    with autograd's. Adds to ``unfused`` the convs whose output goes elsewhere than their BatchNorm, then checks
    again; returns the full names of the tapped parameters that are still wrong."""
    v = logits.detach()
    while True:
        wrong, pairs = _mismatches(taps, params, logits, v, unfused)
        wrong_pairs = [pair for pair in pairs if any(f in wrong for tap in pair for f in tap.names.values())]
        if not wrong_pairs:
            return wrong
        log.info(
            "per-sample gradients: %s feed more than %s; computing them apart",
            ", ".join(conv.name for conv, _ in wrong_pairs),
            ", ".join(bn.name for _, bn in wrong_pairs),
        )
        unfused.update(id(conv.module) for conv, _ in wrong_pairs)


def _mismatches(
    taps: list[Tap], params: dict[str, nn.Parameter], logits: Tensor, v: Tensor, unfused: set[int]
) -> tuple[list[str], list[tuple[Tap, Tap]]]:
    """The tapped parameters whose summed per-sample gradients differ from autograd's batch gradient, and the
    (conv, BatchNorm) pairs that were fused in computing them."""
    tapped = [(tap, local, full) for tap in taps for local, full in tap.names.items()]
    if not tapped:
        return [], []
    outputs = [call.output for tap in taps for call in tap.calls]
    tapped_params = [params[full] for _, _, full in tapped]
    batch_grads = torch.autograd.grad(logits, tapped_params, grad_outputs=v, retain_graph=True, allow_unused=True)
    out_grads = (
        torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=True, allow_unused=True) if outputs else []
    )
    it = iter(out_grads)
    grads_of = {id(tap): [next(it) for _ in tap.calls] for tap in taps}
    pairs = fused_pairs([tap for tap in taps if tap.calls], unfused)
    fused = {id(tap) for pair in pairs for tap in pair}
    tap_sums: dict[str, Tensor] = {}

    def add(tap: Tap, sums: dict[str, Tensor]) -> None:
        for local, t in sums.items():
            if local in tap.names:
                full = tap.names[local]
                tap_sums[full] = t if full not in tap_sums else tap_sums[full] + t

    for conv, bn in pairs:  # the same fused computation the pass uses, summed over the samples
        g_bn = grads_of[id(bn)][0]
        if g_bn is not None:
            conv_sums, bn_sums = conv_batchnorm_sums(
                conv.module, bn.module, conv.calls[0].input, g_bn, bn.calls[0].input, _identity
            )
            add(conv, conv_sums)
            add(bn, bn_sums)
    for tap in taps:
        if id(tap) not in fused:
            for call, g in zip(tap.calls, grads_of[id(tap)]):
                if g is not None:
                    add(tap, tap.rule.batch_sum(tap.module, call.input, g))
    wrong = []
    for (_, _, full), expected in zip(tapped, batch_grads):
        got = tap_sums.get(full)
        expected = torch.zeros_like(params[full]) if expected is None else expected
        got = torch.zeros_like(expected) if got is None else got
        # Norms, not elementwise: a weight used outside its module call is off by a large amount.
        if float((got - expected).norm()) > 1e-4 * float(expected.norm() + got.norm()) + 1e-12:
            wrong.append(full)
    return wrong, pairs


def _identity(x: Tensor) -> Tensor:
    return x
