"""The first-batch self-check, run once on the first few samples in forwards of their own (cheap next to the pass).

1. **Where the samples lie** (``place_samples``) in every tapped call: the tapped forward runs on ``k`` samples and
   on ``k + 1`` (the first sample again), and a call's samples' dim is the one dim of its input and output that grows
   from ``k`` to ``k + 1``. A sequence-first model's Linear sees ``[T, N, D]``; a position embedding looked up once
   for the whole batch sees the same ``[1, T]`` either way (a *shared* call: its output is expanded to one copy per
   sample, so the gradient at it is per sample); a call whose samples are merged with other positions
   (``[N·T, D]``) has no such dim and goes to the exact fallback. Shapes alone would mistake ``[T, N, D]`` for
   ``[N, T, D]`` when ``T = N``, and the summed-gradient check below cannot see that (a sum over samples does not
   depend on which positions are called samples), hence the probe.
2. **The tapped forward computes the model** (``same_logits``): where the pass runs a forward of its own (attention,
   ``rules/attention.py``) or expands shared outputs, its logits must equal the model's.
3. **Samples stay apart** (``isolation``): backpropagating from sample 0's logits alone, every tapped output's
   gradient must vanish at the other samples.
4. **The taps' per-sample gradients, summed over the samples, equal autograd's batch gradient** (``check_taps``),
   with the logits themselves as the vector (the identity holds for any vector, and this draws no random labels).
   A tapped weight also used outside its module call (tied weights through ``F.linear``) goes to the exact fallback,
   and a conv whose output also feeds something besides its BatchNorm (a skip connection) is computed on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_ewc.per_sample.batches import Batch, batch_size_of, slice_batch, with_first_repeated
from lightning_ewc.per_sample.rules.conv_batchnorm import conv_batchnorm_sums, fused_pairs
from lightning_ewc.per_sample.taps import Tap

log = logging.getLogger(__name__)

# Samples the first-batch self-check runs on.
CHECK_SAMPLES = 8

Shapes = list[tuple[torch.Size, torch.Size]]  # one tap's calls in one forward: (input shape, output shape) each


def first_samples(batch: Batch) -> Batch:
    """The samples the check runs on: the first ``CHECK_SAMPLES`` of ``batch``."""
    n = batch_size_of(batch)
    return slice_batch(batch, 0, min(n, CHECK_SAMPLES), n) if n else batch


def place_samples(taps: list[Tap], shapes_of: Callable[[Batch], dict[int, Shapes]], check: Batch) -> list[Tap]:
    """Sets ``samples_dim`` (or ``shared``) on every tap called in the forward of ``check``, from its calls' shapes
    there (``shapes_of``: tap id -> shapes) and with one more sample; returns the taps whose calls have no place for
    the samples their rule accepts."""
    k = batch_size_of(check)
    at_k = shapes_of(check)
    try:
        at_k1: dict[int, Shapes] | None = shapes_of(with_first_repeated(check, k))
    except Exception as err:  # a model that wants a fixed batch size: only an unambiguous dim 0 is accepted then
        log.info(
            "per-sample gradients: the model did not run on %d samples (%s); reading layouts from shapes", k + 1, err
        )
        at_k1 = None
    unplaced = []
    for tap in taps:
        calls = at_k.get(id(tap), [])
        if not calls:
            continue  # not called on this batch; a later call of it leaves the taps (``Tap.fits``)
        where = _samples_dim(calls, None if at_k1 is None else at_k1.get(id(tap), []), k)
        if where == "shared":
            tap.shared = tap.placed = True
        elif where is not None and tap.rule.accepts_samples_dim(tap.module, where, len(calls[0][0])):
            tap.samples_dim, tap.placed = where, True
        else:
            unplaced.append(tap)
    return unplaced


def _samples_dim(at_k: Shapes, at_k1: Shapes | None, k: int) -> int | str | None:
    if at_k1 is None:
        dims = {_only_dim_of_size(i, o, k) for i, o in at_k}
    elif len(at_k1) != len(at_k):
        return None
    else:
        dims = {"shared" if (i, o) == (i1, o1) else _grown(i, i1, o, o1, k) for (i, o), (i1, o1) in zip(at_k, at_k1)}
    return dims.pop() if len(dims) == 1 else None


def _grown(i: torch.Size, i1: torch.Size, o: torch.Size, o1: torch.Size, k: int) -> int | None:
    """The one dim where both input and output grow from ``k`` to ``k + 1``, all else equal."""
    found = []
    for a, b in ((i, i1), (o, o1)):
        diff = [d for d in range(len(a)) if a[d] != b[d]] if len(a) == len(b) else []
        if len(diff) != 1 or a[diff[0]] != k or b[diff[0]] != k + 1:
            return None
        found.append(diff[0])
    return found[0] if found[0] == found[1] else None


def _only_dim_of_size(i: torch.Size, o: torch.Size, k: int) -> int | None:
    ok = len(i) and len(o) and i[0] == o[0] == k and k not in (*i[1:], *o[1:])
    return 0 if ok else None


def same_logits(tapped: Tensor, plain: Tensor) -> bool:
    """Whether the tapped forward's logits are the model's, up to the rounding of a differently ordered computation
    (attention through scaled dot-product attention or an explicit softmax): a wrong forward is off by far more."""
    if tapped.shape != plain.shape:
        return False
    tolerance = {torch.float64: 1e-8, torch.float32: 1e-4}.get(plain.dtype, 5e-2)
    tapped, plain = tapped.detach().double(), plain.detach().double()
    return bool(torch.isfinite(tapped).all()) and float((tapped - plain).norm()) <= tolerance * float(plain.norm())


def isolation(taps: list[Tap], logits: Tensor) -> list[Tap]:
    """The taps whose output gradient, from sample 0's logits alone, reaches another sample's slice of the output:
    the samples' dim found for them is not where the samples are (or the samples interact)."""
    taps = [tap for tap in taps if tap.calls]
    outputs = [call.output for tap in taps for call in tap.calls]
    if logits.shape[0] < 2 or not outputs:
        return []
    v = torch.zeros_like(logits)
    v[0] = 1
    grads = iter(torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=True, allow_unused=True))
    leaking = []
    for tap in taps:
        for g in [next(grads) for _ in tap.calls]:
            if g is None:
                continue
            g = tap.samples_first(g).detach()
            others = g[1:].abs().max() if g.shape[0] > 1 else g.new_zeros(())
            if not bool(others <= 1e-6 * g[:1].abs().max()) and tap not in leaking:
                leaking.append(tap)
    return leaking


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
    tapped = sorted({full for tap in taps for full in tap.names.values()})
    if not tapped:
        return [], []
    outputs = [call.output for tap in taps for call in tap.calls]
    tapped_params = [params[full] for full in tapped]
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
                if full not in tap_sums:
                    tap_sums[full] = torch.zeros(params[full].shape, dtype=t.dtype, device=t.device)
                tap_sums[full][tap.rows.get(local, slice(None))] += t

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
            for a, g in tap.inputs_and_grads(grads_of[id(tap)]):
                add(tap, tap.rule.batch_sum(tap.module, a, g))
    wrong = []
    for full, expected in zip(tapped, batch_grads):
        got = tap_sums.get(full)
        expected = torch.zeros_like(params[full]) if expected is None else expected
        got = torch.zeros_like(expected) if got is None else got
        # Norms, not elementwise: a weight used outside its module call is off by a large amount.
        if float((got - expected).norm()) > 1e-4 * float(expected.norm() + got.norm()) + 1e-12:
            wrong.append(full)
    return wrong, pairs


def _identity(x: Tensor) -> Tensor:
    return x
