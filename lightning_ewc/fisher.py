"""Diagonal Fisher information (and MAS importance) of a classifier, estimated exactly per sample.

For a classifier with logits z and p = softmax(z), the gradient of log p(c|x) with respect to z is ``e_c − p``, so
every estimator is "backpropagate a vector v_n from the logits and square the per-sample gradient"
(see :mod:`lightning_ewc.per_sample`):

========== ===================================================================== ==============================
estimator  F_i =                                                                  vectors v_n per sample
========== ===================================================================== ==============================
exact      E_x Σ_c p(c|x) (∂ log p(c|x)/∂θ_i)²                                    C − 1 factors of diag(p) − ppᵀ
sampled    E_x (∂ log p(ŷ|x)/∂θ_i)², ŷ ~ p(·|x)                                  e_ŷ − p
empirical  E_(x,y) (∂ log p(y|x)/∂θ_i)², y the true label                         e_y − p
batched    mean over mini-batches of (∂ mean_b log p(y|x)/∂θ_i)²                  (no per-sample gradients)
mas        E_x |∂ ||z(x)||² / ∂θ_i|  (Aljundi et al. 2018; absolute, not squared)  2 z
========== ===================================================================== ==============================

``batched`` is what Avalanche and most EWC repositories compute: the square of a mean, not a mean of squares. It is
offered only so that λ values from those libraries carry over; it is smaller than the Fisher by about the batch size.

**Per-position outputs** (token taggers, causal language models under teacher forcing): logits ``[N, T, C]`` (or
``[N, ..., C]``). A sample's log-likelihood is log p(y|x) = Σ_t m_t log p(y_t|x), the positions conditionally
independent given the input, with m_t = 0 where the label is ``IGNORE_INDEX`` (−100, as in ``cross_entropy``:
padding, prompt tokens). The estimators keep their meaning per *sample*: ``empirical`` and ``sampled`` square the
gradient of that sum (v_n = Σ_t m_t (e_{y_t} − p_t) at the true or at drawn labels, one backward pass), and ``exact``
is its expectation, Σ_t m_t J_tᵀ (diag(p_t) − p_t p_tᵀ) J_t: the cross-position terms vanish in expectation, so it
takes T·(C − 1) passes and is refused above ``MAX_EXACT_PASSES`` (a vocabulary) in favour of ``sampled``. For
``exact``, ``sampled`` and ``mas`` the labels serve only as the mask; without labels every position counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_ewc._lightning import move_data_to_device
from lightning_ewc.per_sample import Batch, PerSampleAccumulator, batch_size_of, finite_or_raise, slice_batch

FISHER_ESTIMATORS = ("exact", "sampled", "empirical", "batched")
PER_SAMPLE_IMPORTANCES = FISHER_ESTIMATORS + ("mas",)

IGNORE_INDEX = -100  # a label that marks a position to leave out, as in torch.nn.functional.cross_entropy
# Backward passes of one batch's exact Fisher over per-position outputs, T·(C − 1), beyond which it is refused.
MAX_EXACT_PASSES = 4096

_INPUT_KEYS = ("x", "input", "inputs", "image", "images")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")


# ----------------------------------------------------------------------------------------------------------------------
# Batch conventions
# ----------------------------------------------------------------------------------------------------------------------
def default_inputs(batch: Batch) -> Any:
    """The model input of a batch: ``batch[0]`` of a tuple/list, ``batch['x']`` (or input/image) of a dict, or the
    batch itself."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise KeyError(
            f"cannot find the model input in a batch with keys {sorted(batch)}: use one of {_INPUT_KEYS}, or "
            "override `ewc_logits(batch)` on your module (or pass `logits_fn=` to estimate_fisher)"
        )
    return batch


class MissingLabelsError(ValueError):
    """The batch holds no labels (the estimators that need none go on without a position mask)."""


def default_targets(batch: Batch) -> Tensor:
    """The true labels of a batch: ``batch[1]`` of a tuple/list or ``batch['y']`` (or target/label) of a dict."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in _TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise MissingLabelsError(
        "the 'empirical' and 'batched' estimators need the true labels, but the batch has none "
        f"(type {type(batch).__name__}); yield (x, y) batches, override `ewc_targets(batch)` on your module, or "
        "pass `targets_fn=`; the 'exact' and 'sampled' estimators need no labels"
    )


def check_logits(logits: Any, estimator: str, samples: int | None = None) -> Tensor:
    """Float logits ``[N, C]`` or ``[N, ..., C]`` (positions), one row per sample of the batch (``samples``)."""
    if not isinstance(logits, Tensor) or not torch.is_floating_point(logits):
        raise TypeError(
            f"the {estimator!r} estimator needs the model to return class logits as a float tensor [batch, classes] "
            f"(or [batch, positions, classes]); got {type(logits).__name__}"
            f"{'' if not isinstance(logits, Tensor) else ' of dtype ' + str(logits.dtype)}. "
            "Override `ewc_logits(batch)` on your module (or pass `logits_fn=`) to return the logits"
        )
    if samples is not None and logits.dim() > 0 and logits.shape[0] != samples:
        raise ValueError(
            f"the logits have {logits.shape[0]} rows but the batch holds {samples} samples (shape "
            f"{tuple(logits.shape)}): per-sample gradients need one row per sample. Return per-position logits as "
            "[batch, positions, classes] from `ewc_logits(batch)` (not flattened to [batch·positions, classes]: "
            "that would make every position a sample of its own), with labels [batch, positions] and -100 where a "
            "position is to be left out"
        )
    if estimator != "mas" and logits.dim() < 2:
        raise ValueError(
            f"the {estimator!r} estimator needs class logits of shape [batch, classes] or [batch, positions, "
            f"classes]; got shape {tuple(logits.shape)}"
        )
    if estimator != "mas" and logits.shape[-1] < 2:
        raise ValueError(
            f"the {estimator!r} estimator needs at least 2 classes (softmax logits); got shape {tuple(logits.shape)}. "
            "A single-logit binary classifier should return two logits [-z/2, z/2] from `ewc_logits`"
        )
    return logits


def check_targets(targets: Any, logits: Tensor) -> Tensor:
    """Integer labels shaped like the logits without their class dimension, each a class or ``IGNORE_INDEX``."""
    if not isinstance(targets, Tensor) or targets.dtype in (torch.bool,) or torch.is_floating_point(targets):
        raise TypeError(
            f"true labels must be an integer tensor of class indices, got "
            f"{type(targets).__name__}{' of dtype ' + str(targets.dtype) if isinstance(targets, Tensor) else ''}"
        )
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(targets.shape)} do not match logits of shape {tuple(logits.shape)}: the labels "
            f"must be shaped {tuple(logits.shape[:-1])} (the logits without their class dimension)"
        )
    kept = targets[targets != IGNORE_INDEX]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= logits.shape[-1]):
        raise ValueError(
            f"labels range over [{int(kept.min())}, {int(kept.max())}] but the logits have {logits.shape[-1]} "
            f"classes ({IGNORE_INDEX} marks a position to leave out); for a multi-head model return the current "
            "task's head from `ewc_logits` and labels local to it"
        )
    return targets


def labels_and_mask(estimator: str, logits: Tensor, targets: Callable[[], Any]) -> tuple[Tensor | None, Tensor | None]:
    """The checked labels (or None) and which outputs count, shaped like the logits without the class dimension
    (None: all of them).

    The estimators that read the labels take them as they are; the others read them only to mask positions of
    per-position outputs, and go on without a mask when the batch has no labels."""
    if estimator in ("empirical", "batched"):
        labels = check_targets(targets(), logits)
        return labels, labels != IGNORE_INDEX
    if logits.dim() < 3:
        return None, None
    try:
        labels = targets()
    except MissingLabelsError:
        return None, None
    if labels is None:
        return None, None
    labels = check_targets(labels, logits)
    return labels, labels != IGNORE_INDEX


# ----------------------------------------------------------------------------------------------------------------------
# Vectors to backpropagate, per estimator
# ----------------------------------------------------------------------------------------------------------------------
def output_vectors(
    estimator: str,
    logits: Tensor,
    targets: Callable[[], Tensor],
    generator: torch.Generator | None = None,
    every_position: bool = False,
) -> list[Tensor]:
    """The vectors v (shaped like the logits) whose per-sample backpropagation gives the estimator's gradients.
    ``every_position``: the exact Fisher makes passes also for positions masked in the whole batch (zero vectors),
    so that every rank makes the same number of passes (sharded models run collectives in them)."""
    z = logits.detach().float()
    labels, mask = labels_and_mask(estimator, logits, targets)
    if estimator == "mas":
        return [_masked(2 * z, mask).to(logits.dtype)]
    p = torch.softmax(z, dim=-1)
    classes = p.shape[-1]
    if estimator == "exact":
        if p.dim() == 2:
            # One contiguous [N, C] block per pass: strided views as grad_outputs measured slower (bench/README.md).
            return list(exact_vectors(p).transpose(0, 1).contiguous().to(logits.dtype).unbind(0))
        return per_position_exact_vectors(p, mask, logits.dtype, every_position)
    if estimator == "sampled":
        flat = torch.multinomial(p.reshape(-1, classes).cpu(), 1, generator=generator)
        labels = flat.reshape(p.shape[:-1]).to(p.device)
    elif estimator == "empirical":
        labels = labels.clamp_min(0)  # ignored positions are masked below
    else:
        raise ValueError(f"unknown per-sample estimator {estimator!r}; choose one of {PER_SAMPLE_IMPORTANCES}")
    v = torch.nn.functional.one_hot(labels, classes).to(p.dtype) - p
    return [_masked(v, mask).to(logits.dtype)]


def _masked(v: Tensor, mask: Tensor | None) -> Tensor:
    return v if mask is None else v * mask.unsqueeze(-1).to(v.dtype)


def per_position_exact_vectors(
    p: Tensor, mask: Tensor | None, dtype: torch.dtype, every_position: bool = False
) -> list[Tensor]:
    """The exact Fisher's vectors for per-position outputs: for each position t and k < C, w_k(p_t) at position t
    and zero elsewhere, since Σ_t J_tᵀ (diag(p_t) − p_t p_tᵀ) J_t needs each position's factors apart (their sum
    would add cross-position terms). Positions masked in every sample of the batch are skipped."""
    n, classes = p.shape[0], p.shape[-1]
    flat = p.reshape(n, -1, classes)  # [N, T, C], T the positions
    keep = torch.ones(flat.shape[:2], dtype=torch.bool, device=p.device) if mask is None else mask.reshape(n, -1)
    positions = list(range(flat.shape[1])) if every_position else keep.any(0).nonzero().flatten().tolist()
    passes = len(positions) * (classes - 1)
    if passes > MAX_EXACT_PASSES:
        raise ValueError(
            f"the 'exact' Fisher of per-position logits {tuple(p.shape)} takes one backward pass per position and "
            f"class but one: {len(positions)} × {classes - 1} = {passes} for this batch, more than MAX_EXACT_PASSES = "
            f"{MAX_EXACT_PASSES}. Use fisher='sampled' (unbiased: the labels drawn from the model at every position, "
            "one backward pass), or raise lightning_ewc.fisher.MAX_EXACT_PASSES if the time is yours to spend"
        )
    vectors = []
    for t in positions:
        factors = exact_vectors(flat[:, t]) * keep[:, t, None, None].to(flat.dtype)  # [N, C − 1, C]
        for k in range(classes - 1):
            v = torch.zeros_like(flat)
            v[:, t] = factors[:, k]
            vectors.append(v.reshape(p.shape).to(dtype))
    return vectors


def exact_vectors(p: Tensor) -> Tensor:
    """C − 1 vectors per sample, [N, C − 1, C], whose outer products sum to the softmax's covariance diag(p) − ppᵀ.

    The exact Fisher of a sample is Jᵀ (diag(p) − ppᵀ) J, J the Jacobian of the logits, so its diagonal is
    Σ_k (Jᵀ w_k)² for any w_k with Σ_k w_k w_kᵀ = diag(p) − ppᵀ. The obvious choice, √p_c (e_c − p) for every
    class, takes C backward passes; the matrix has rank C − 1 (its rows sum to zero), so C − 1 suffice: a
    binary head needs one, like ``empirical``. We use the Cholesky factor of the multinomial covariance
    (stick-breaking): with the classes ordered so the most probable comes last and s_k = Σ_{j ≥ k} p_j,
    w_k = √(p_k s_{k+1} / s_k) (e_k − Σ_{j > k} p_j e_j / s_{k+1}). Every s is a sum of positive terms and at least
    the largest p ≥ 1/C, so nothing cancels or divides by a small number, and float32 keeps each entry of
    diag(p) − ppᵀ to 1e-5 of its row and column scale even for saturated predictions (tests/test_fisher.py).
    Computed in the dtype of ``p`` (float32 at least): float64 is not available on every accelerator.
    """
    p = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
    p = p / p.sum(dim=1, keepdim=True)  # the factors assume Σ p = 1; a softmax is off by rounding
    n, classes = p.shape
    ordered, order = torch.sort(p, dim=1)  # ascending: the most probable class last
    remaining = ordered.flip(1).cumsum(1).flip(1)  # s_k = Σ_{j ≥ k} p_j
    after = remaining[:, 1:]  # s_{k+1}, k = 1..C − 1
    scale = (ordered[:, :-1] * after / remaining[:, :-1]).sqrt()  # [N, C − 1]
    k = torch.arange(classes - 1, device=p.device)
    later = k[:, None] < torch.arange(classes, device=p.device)[None, :]  # [C − 1, C]: class j comes after k
    sorted_vectors = torch.where(later, -(scale / after)[:, :, None] * ordered[:, None, :], 0.0)
    sorted_vectors[:, k, k] = scale
    vectors = torch.empty_like(sorted_vectors)
    vectors.scatter_(2, order[:, None, :].expand(n, classes - 1, classes), sorted_vectors)
    return vectors


# ----------------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ImportanceSums:
    """Unnormalised sums and the number of terms they sum (samples, or mini-batches for ``batched``)."""

    sums: dict[str, Tensor]
    count: int
    routes: dict[str, str] = field(default_factory=dict)
    # (conv, BatchNorm) module names whose per-sample gradients came from the BatchNorm's output gradient alone
    fused: list[tuple[str, str]] = field(default_factory=list)
    # sharded parameters whose sums are already this rank's shard of the sum over ranks (``reduce_shards``)
    reduced: list[str] = field(default_factory=list)
    # the most bytes of full-size sums of sharded parameters held at once during the pass (``reduce_shards``)
    peak_full_bytes: int = 0

    def mean(self) -> dict[str, Tensor]:
        if self.count == 0:
            raise ValueError(
                "the importance dataloader yielded no samples: pass a non-empty dataloader (check its dataset, "
                "`drop_last`, and `num_samples`)"
            )
        return {name: s / self.count for name, s in self.sums.items()}


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the pass (dropout off, BatchNorm on running statistics), each submodule's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def limit_samples(batches: Iterable[Batch], num_samples: int | None) -> Iterator[Batch]:
    """The batches, cut so that at most ``num_samples`` samples are yielded (None: all)."""
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer or None (all samples); got {num_samples}")
    seen = 0
    for batch in batches:
        n = batch_size_of(batch)
        if n is None:
            raise TypeError(f"a batch of type {type(batch).__name__} holds no tensor with a batch dimension")
        if num_samples is not None and seen + n > num_samples:
            batch, n = slice_batch(batch, 0, num_samples - seen, n), num_samples - seen
        seen += n
        yield batch
        if num_samples is not None and seen >= num_samples:
            return  # before asking the loader for a batch we would not use


def accumulate_importance(
    model: nn.Module,
    batches: Iterable[Batch],
    estimator: str = "exact",
    *,
    params: dict[str, nn.Parameter] | None = None,
    logits_fn: Callable[[Batch], Tensor] | None = None,
    targets_fn: Callable[[Batch], Tensor] | None = None,
    generator: torch.Generator | None = None,
    agree: Callable[[BaseException | None], None] | None = None,
    reduce_shards: bool = False,
) -> ImportanceSums:
    """Sums of squared per-sample gradients (``abs`` for MAS) over ``batches`` and the sample count.

    ``agree(error)`` is called once per batch, after its forward and before its backward passes, with what computing
    the vectors raised (or None): under sharding the ranks' passes run collectives in step, so one rank's error must
    stop the others there rather than leave them waiting (``distributed.agreeing``).

    ``reduce_shards``: every rank of a sharded (FSDP2) model runs this pass in step, on its own samples, and the sums
    of its sharded parameters come back as this rank's shard of the sum over all ranks (listed in ``reduced``),
    reduced module by module during the pass (``per_sample/shards.py``). Without it they come back full-size, this
    rank's samples only.

    The model runs in eval mode; its modes, BatchNorm buffers and ``.grad`` are left as they were. Batches must
    already be on the model's device.
    """
    if estimator not in PER_SAMPLE_IMPORTANCES:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {PER_SAMPLE_IMPORTANCES}")
    params = trainable_parameters(model) if params is None else params
    if not params:
        raise ValueError(
            f"no parameter to estimate the importance of: {type(model).__name__} has no trainable parameter "
            "(requires_grad=True) among those asked for; unfreeze the parameters to consolidate, or name them with "
            "`parameters=`"
        )
    inference = [name for name, p in params.items() if p.is_inference()]
    if inference:
        raise RuntimeError(
            f"parameters {inference[:3]} were created under torch.inference_mode(), so autograd can never "
            "differentiate through them; build (or load) the model outside inference_mode"
        )
    if estimator == "batched" and any(isinstance(p, DTensor) for p in params.values()):
        # It needs each rank's own full-size mini-batch gradient, squared before any sum over ranks; with FSDP2 the
        # sharded parameters' gradients come from its backward's reduce-scatter (a sum over ranks) instead.
        raise NotImplementedError(
            "fisher='batched' is not supported with sharded (FSDP2) parameters; use 'exact', 'sampled' or "
            "'empirical' (per-sample, and the Fisher itself), or train with strategy='ddp'"
        )
    if logits_fn is None:
        logits_fn = lambda batch: model(default_inputs(batch))  # noqa: E731
    targets_fn = default_targets if targets_fn is None else targets_fn
    checked_logits = lambda batch: check_logits(logits_fn(batch), estimator, batch_size_of(batch))  # noqa: E731
    # The pass needs autograd whatever the caller's context: under torch.no_grad() it enables it, and under
    # torch.inference_mode() it leaves inference mode, taking copies of the batches made there (autograd cannot
    # save inference tensors for backward). Nothing it creates leaks out: the result is detached sums.
    batches = (apply_to_collection(batch, Tensor, _outside_inference) for batch in batches)
    with evaluation_mode(model), torch.inference_mode(False), torch.enable_grad():
        if estimator == "batched":
            result = _batched_sums(params, batches, checked_logits, targets_fn)
        else:
            acc = PerSampleAccumulator(model, params, checked_logits, "abs" if estimator == "mas" else "sq",
                                       reduce_shards=reduce_shards)
            for batch in batches:
                acc.add_batch(batch, _agreed(agree, lambda z, b: output_vectors(
                    estimator, z, lambda: targets_fn(b), generator, every_position=acc.sharded
                )))
            result = ImportanceSums(acc.sums, acc.count, dict(acc.report.routes), sorted(acc.report.fused),
                                    acc.reduced, acc.peak_pending_bytes)
    finite_or_raise(result.sums, f"the {estimator!r} importance")
    return result


def _agreed(agree, output_grads):
    if agree is None:
        return output_grads

    def vectors(logits, batch):
        try:
            result = output_grads(logits, batch)
        except Exception as err:
            agree(err)
            raise
        agree(None)
        return result

    return vectors


def _outside_inference(x: Tensor) -> Tensor:
    return x.clone() if x.is_inference() else x


def _batched_sums(params, batches, logits_fn, targets_fn) -> ImportanceSums:
    names = list(params)
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for batch in batches:
        logits = logits_fn(batch)
        labels, kept = labels_and_mask("batched", logits, lambda: targets_fn(batch))
        log_p = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        # each sample's log-likelihood sums its kept positions; the mean is over the mini-batch's samples
        log_lik = (log_p * kept).reshape(logits.shape[0], -1).sum(1).mean()
        grads = torch.autograd.grad(log_lik, [params[n] for n in names], allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                sums[name] += g.float().square()
        count += 1
    return ImportanceSums(sums, count, {name: "batched" for name in names})


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable[Batch],
    estimator: str = "exact",
    num_samples: int | None = None,
    *,
    logits_fn: Callable[[Batch], Tensor] | None = None,
    targets_fn: Callable[[Batch], Tensor] | None = None,
    parameters: Iterable[str] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``model`` on ``dataloader``: parameter name → mean over samples.

    Args:
        model: any ``nn.Module``; by default ``model(batch[0])`` must return class logits ``[batch, classes]``.
        dataloader: any iterable of batches (``(x, y)`` tuples, dicts, or bare inputs for ``exact``/``sampled``).
        estimator: ``"exact"``, ``"sampled"``, ``"empirical"`` or ``"batched"`` (see the module docstring).
        num_samples: use at most this many samples (the first ones the dataloader yields); None: all.
        logits_fn: ``batch -> logits`` to use instead of ``model(batch[0])``, e.g. to select a task's head.
        targets_fn: ``batch -> labels`` for ``empirical``/``batched`` instead of ``batch[1]``.
        parameters: names of the parameters to estimate; default every parameter with ``requires_grad``.
        seed: seeds the labels drawn by ``sampled`` (the global RNG is not touched).

    Returns:
        ``{name: Tensor}`` shaped like each parameter, float32. For ``batched`` the mean is over mini-batches.
    """
    if estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {estimator!r}; choose one of {FISHER_ESTIMATORS}")
    all_params = dict(model.named_parameters())
    if parameters is None:
        params = trainable_parameters(model)
    else:
        unknown = [name for name in parameters if name not in all_params]
        if unknown:
            raise KeyError(f"unknown parameter names {unknown}; the model has {list(all_params)[:10]} ...")
        params = {name: all_params[name] for name in parameters}
    device = next(iter(all_params.values())).device if all_params else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    batches = (move_data_to_device(b, device) for b in limit_samples(dataloader, num_samples))
    result = accumulate_importance(
        model, batches, estimator, params=params, logits_fn=logits_fn, targets_fn=targets_fn, generator=generator
    )
    return result.mean()
