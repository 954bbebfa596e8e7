"""Sums over samples of squared (or absolute) per-sample gradients, without a loop over samples.

Every importance measure here is ``Σ_n r(∂ φ_n / ∂θ)`` where ``φ_n = v_n · z_n(θ)`` is a sample's output ``z_n``
(logits) contracted with a fixed vector ``v_n`` (for the Fisher ``v_n = e_y − p_n``, the gradient of log p(y|x)
with respect to the logits) and ``r`` is the square or the absolute value. Autograd only ever gives the *sum* over
samples of gradients, and squaring a sum is not a sum of squares, so we need per-sample gradients. Three routes,
chosen per parameter, all exact:

1. **Taps** on layers whose per-sample gradient is a known function of the layer's input ``a`` and the gradient
   ``g`` at its output (Linear, Conv1d/2d, BatchNorm in eval mode, LayerNorm, GroupNorm, Embedding). One forward
   and one backward *to the layer outputs* per vector ``v`` gives every ``g``. For a Linear layer called once on
   2-D input the per-sample gradient is the outer product ``g_n a_nᵀ``, so ``Σ_n (g_n a_nᵀ)² = (g²)ᵀ(a²)`` and
   ``Σ_n |g_n a_nᵀ| = |g|ᵀ|a|``: one matrix product, nothing materialised. A conv whose output goes straight into
   an eval-mode BatchNorm gets both layers' gradients from the BatchNorm's output gradient, so the backward stops
   there (``_conv_bn_sums``).
2. **vmap**: ``torch.func.vmap(grad(...))`` over the samples, for every other parameter.
3. **loop**: one sample at a time, when vmap cannot trace the model (data-dependent Python, ``.item()``, ...).

A first-batch self-check compares the taps' summed gradient with autograd's batch gradient, so a tapped weight that
is also used outside its module (tied weights through ``F.linear``) moves to the exact fallback instead of being
silently wrong, and a conv whose output also feeds something besides its BatchNorm is computed on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)

Batch = Any
Reduction = str  # "sq" (sum of squares) or "abs" (sum of absolute values)

# Bound on the elements of one materialised per-sample gradient block (per layer), to keep memory flat.
_MAX_BLOCK_ELEMENTS = 16 * 1024 * 1024
# Bound on the unfolded conv inputs kept across the backward passes of one batch (the exact Fisher's classes).
_MAX_CACHED_ELEMENTS = 4 * _MAX_BLOCK_ELEMENTS
# Samples the first-batch self-check runs on.
_CHECK_SAMPLES = 8


def _reduce(x: Tensor, reduction: Reduction) -> Tensor:
    return x.square() if reduction == "sq" else x.abs()


def _identity(x: Tensor) -> Tensor:
    return x


# ----------------------------------------------------------------------------------------------------------------------
# Per-layer rules: per-sample gradients from (input, output-gradient)
# ----------------------------------------------------------------------------------------------------------------------
class _Rule:
    """How one layer type turns its inputs and output-gradients into per-sample parameter gradients."""

    def applies(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def per_sample(self, module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Per-sample gradients ``{param_name: Tensor[N, *param.shape]}`` for one call of the module."""
        raise NotImplementedError

    def concat_calls(self) -> bool:
        """Whether several calls can be merged by concatenating inputs along a non-batch axis (then one call)."""
        return False

    def batch_sum(self, module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Σ_n of the per-sample gradients (what autograd gives), in chunks so memory stays bounded."""
        numel = sum(p.numel() for p in module.parameters(recurse=False))
        chunk = max(1, _MAX_BLOCK_ELEMENTS // max(numel, 1))
        total: dict[str, Tensor] = {}
        for start in range(0, a.shape[0], chunk):
            for name, t in self.per_sample(module, a[start : start + chunk], g[start : start + chunk]).items():
                total[name] = t.sum(0) if name not in total else total[name] + t.sum(0)
        return total


class _LinearRule(_Rule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.Linear

    def concat_calls(self) -> bool:
        return True

    def per_sample(self, module, a, g):
        n = a.shape[0]
        a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
        out = {"weight": torch.einsum("nlo,nli->noi", g3, a3)}
        if module.bias is not None:
            out["bias"] = g3.sum(1)
        return out


    def batch_sum(self, module, a, g):
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        out = {"weight": g2.t().mm(a2)}
        if module.bias is not None:
            out["bias"] = g2.sum(0)
        return out


class _ConvRule(_Rule):
    """Conv1d/Conv2d: each sample's weight gradient is the weight-gradient convolution of that sample alone, run for
    all samples at once with ``torch.func.vmap`` (it covers grouped convolutions), or, for a Conv2d, a bmm of the
    output gradient with the unfolded input (see ``uses_unfold``)."""

    def applies(self, module: nn.Module) -> bool:
        return (
            type(module) in (nn.Conv1d, nn.Conv2d)
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )

    @staticmethod
    def _weight_grad(module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
        weight_grad = torch.nn.grad.conv2d_weight if isinstance(module, nn.Conv2d) else torch.nn.grad.conv1d_weight
        return weight_grad(a, module.weight.shape, g, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def uses_unfold(module: nn.Module, passes: int) -> bool:
        """Unfold + bmm where it is the faster route. Measured on CPU, batch 128, per backward pass: for 1->32
        channels on 28x28 the unfolded input is no bigger than the output gradient and the route takes 1.7 ms against
        3.1 ms for vmap; for 32->64 on 14x14 unfolding costs 7 ms and the bmm 6, against 8.4 for vmap, so it pays
        only when the unfolded input serves several passes (the exact Fisher: one per class but one)."""
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            return False
        return passes > 1 or module.weight[0].numel() <= module.out_channels

    @staticmethod
    def unfold(module: nn.Module, a: Tensor) -> Tensor:
        """The input patches ``[N, I*K, L]`` (L output positions)."""
        return F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)

    def weight_per_sample(self, module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
        """``[N, *weight.shape]`` by the vmapped weight-gradient convolution."""
        one = lambda a_n, g_n: self._weight_grad(module, a_n.unsqueeze(0), g_n.unsqueeze(0))  # noqa: E731
        return torch.func.vmap(one)(a, g)

    def patch_grads(self, module: nn.Module, a: Tensor, g: Tensor, cols: Tensor | None) -> tuple[Tensor, bool]:
        """Per-sample weight gradients, contiguous, as ``[N, O, I*K]`` (False) or, from the unfolded input ``cols``,
        as ``[N, I*K, O]`` (True): the bmm's own layout. Both operands go in as laid out; the other orientation
        needs a transposed copy of the patches and measured 1.7x slower, and copying the result into the weight's
        layout cost a third of the bmm, so the sums below read either layout instead."""
        n = a.shape[0]
        if cols is not None:
            return torch.bmm(cols, g.reshape(n, g.shape[1], -1).transpose(1, 2)), True
        return self.weight_per_sample(module, a, g).reshape(n, module.out_channels, -1), False

    def per_sample(self, module, a, g):
        out = {"weight": self.weight_per_sample(module, a, g)}
        if module.bias is not None:
            out["bias"] = g.sum(tuple(range(2, g.dim())))
        return out

    def batch_sum(self, module, a, g):
        out = {"weight": self._weight_grad(module, a, g)}
        if module.bias is not None:
            out["bias"] = g.sum((0, *range(2, g.dim())))
        return out


class _BatchNormRule(_Rule):
    """BatchNorm in eval mode normalises with running statistics, so samples are independent."""

    def applies(self, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.affine
            and module.running_mean is not None
            and not module.training
        )

    def per_sample(self, module, a, g):
        # Σ_hw g·x̂ with x̂ = (a − μ)/σ per channel is (Σ_hw g·a − μ Σ_hw g)/σ: no x̂ tensor needed.
        dims = tuple(range(2, a.dim()))
        g_sum = g.sum(dims) if dims else g
        ga_sum = (g * a).sum(dims) if dims else g * a
        inv_std = torch.rsqrt(module.running_var + module.eps)
        return {"weight": (ga_sum - module.running_mean * g_sum) * inv_std, "bias": g_sum}


class _LayerNormRule(_Rule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.LayerNorm and module.elementwise_affine

    def per_sample(self, module, a, g):
        xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
        n, k = a.shape[0], len(module.normalized_shape)
        middle = tuple(range(1, a.dim() - k))
        out = {"weight": (g * xhat).sum(middle) if middle else g * xhat}
        if module.bias is not None:
            out["bias"] = g.sum(middle) if middle else g
        return {name: t.reshape(n, *module.normalized_shape) for name, t in out.items()}


class _GroupNormRule(_Rule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.GroupNorm and module.affine

    def per_sample(self, module, a, g):
        xhat = F.group_norm(a, module.num_groups, eps=module.eps)
        dims = tuple(range(2, a.dim()))
        return {"weight": (g * xhat).sum(dims), "bias": g.sum(dims)}


class _EmbeddingRule(_Rule):
    def applies(self, module: nn.Module) -> bool:
        return type(module) is nn.Embedding and module.max_norm is None

    def concat_calls(self) -> bool:
        return True

    def batch_sum(self, module, a, g):
        rows = g.reshape(-1, g.shape[-1]) * (a.reshape(-1) != _padding(module)).unsqueeze(-1)
        return {"weight": torch.zeros_like(module.weight, dtype=g.dtype).index_add_(0, a.reshape(-1), rows)}

    def reduce_rows(self, module, a, g, reduction: Reduction) -> Tensor:
        """Σ_n r(per-sample gradient) without the dense [N, V, D] tensor: group each sample's rows by token."""
        n, vocab = a.shape[0], module.weight.shape[0]
        idx = a.reshape(n, -1)
        gg = g.reshape(n, -1, g.shape[-1]) * (idx != _padding(module)).unsqueeze(-1)
        keys = (torch.arange(n, device=idx.device).unsqueeze(1) * vocab + idx).reshape(-1)
        uniq, inverse = torch.unique(keys, return_inverse=True)
        per_sample_rows = torch.zeros(len(uniq), gg.shape[-1], dtype=gg.dtype, device=gg.device)
        per_sample_rows.index_add_(0, inverse, gg.reshape(-1, gg.shape[-1]))
        out = torch.zeros_like(module.weight, dtype=gg.dtype)
        return out.index_add_(0, uniq % vocab, _reduce(per_sample_rows, reduction))


def _sum_patch_grads(per_sample: Tensor, transposed: bool, shape: torch.Size, reduce: Callable) -> Tensor:
    """Σ_n reduce(G_n) in the weight's ``shape``, from ``_ConvRule.patch_grads``."""
    total = reduce(per_sample).sum(0)
    return (total.t() if transposed else total).reshape(shape)


def _conv_bn_sums(
    conv: nn.Module, bn: nn.Module, a: Tensor, g_bn: Tensor, z: Tensor, reduce: Callable, cols: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Σ_n reduce(per-sample gradient) for a convolution and the eval-mode BatchNorm right after it, from the conv's
    input ``a``, the BatchNorm's input ``z`` (the conv output) and the gradient ``g_bn`` at the BatchNorm's *output*
    only. ``reduce`` is the square, the absolute value or the identity (then these are autograd's batch gradients).

    Eval-mode BatchNorm is a per-channel affine map y = s·z + t with s = γ/σ, so the gradient at the conv output is
    s·g_bn, and the backward pass can stop at the BatchNorm output: it skips BatchNorm's input-gradient pass and the
    capture of a second activation-sized gradient (on the app's CNN a quarter of the backward). With
    G = weight-gradient of (a, g_bn) per sample, and Σ_p over one sample's positions:
      conv weight = s·G,  conv bias = s·Σ_p g_bn,  BatchNorm bias = Σ_p g_bn,
      BatchNorm weight = Σ_p g_bn·(z − μ)/σ, where Σ_p g_bn·z = ⟨W, G⟩ + b·Σ_p g_bn
    because z = W∗a + b is linear in W: whichever of g_bn·z and ⟨W, G⟩ has fewer elements is formed. reduce(s·x) =
    reduce(s)·reduce(x), so s is applied to the sums, not to every sample.
    """
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = bn.weight.detach() * inv_std
    per_sample, transposed = _CONV_RULE.patch_grads(conv, a, g_bn, cols)
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
        "weight": _sum_patch_grads(per_sample, transposed, conv.weight.shape, reduce) * reduce(scale).view(channel)
    }
    if conv.bias is not None:
        conv_sums["bias"] = bias_sums * reduce(scale)
    bn_sums = {"weight": reduce((g_dot_z - bn.running_mean * g_sum) * inv_std).sum(0), "bias": bias_sums}
    return conv_sums, bn_sums


def _padding(module: nn.Embedding) -> int:
    return -1 if module.padding_idx is None else module.padding_idx


_CONV_RULE = _ConvRule()
_RULES: tuple[_Rule, ...] = (
    _LinearRule(),
    _CONV_RULE,
    _BatchNormRule(),
    _LayerNormRule(),
    _GroupNormRule(),
    _EmbeddingRule(),
)


def _rule_for(module: nn.Module) -> _Rule | None:
    return next((rule for rule in _RULES if rule.applies(module)), None)


# ----------------------------------------------------------------------------------------------------------------------
# Taps: capture (input, output) of every tapped module during one forward
# ----------------------------------------------------------------------------------------------------------------------
class _Call(NamedTuple):
    input: Tensor  # detached
    output: Tensor
    version: int  # the output's version counter when the hook saw it
    graph_input: Any  # the input as the module received it, to recognise "this module consumes that one's output"


@dataclass
class _Tap:
    name: str  # the module's qualified name
    module: nn.Module
    rule: _Rule
    names: dict[str, str]  # local param name -> full name (only trainable, selected params)
    calls: list[_Call] = field(default_factory=list)
    clone_output: bool = False  # set when a later in-place op (ReLU(inplace=True)) rewrites this module's output

    def hook(self, module, inputs, output):
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return None
        self.calls.append(_Call(inputs[0].detach(), output, output._version, inputs[0]))
        # An in-place op downstream would rewrite `output`'s history, and the gradient autograd gives for it would be
        # the one after that op. Such taps hand the network a copy instead (found on the first forward).
        return output.clone() if self.clone_output else None

    def rewritten_in_place(self) -> bool:
        return any(call.output._version != call.version for call in self.calls)


# ----------------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------------
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
        self._fallback = {name: p for name, p in params.items() if name not in self._tapped_names()}
        self._fallback_route = "vmap"
        self._checked = False
        self._unfused: set[int] = set()  # ids of convs whose output also goes elsewhere than their BatchNorm
        self._cols: dict[tuple[int, int], Tensor] = {}  # (id(conv tap), first sample) -> unfolded input, one batch
        for name in params:
            self.report.routes[name] = "tap" if name not in self._fallback else self._fallback_route

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _build_taps(self) -> list[_Tap]:
        by_id = {id(p): name for name, p in self.params.items()}
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        taps = []
        for module_name, module in self.model.named_modules():
            rule = _rule_for(module)
            if rule is None:
                continue
            names = {
                local: by_id[id(p)]
                for local, p in module.named_parameters(recurse=False)
                if id(p) in by_id and owners[id(p)] == 1  # a parameter shared by two modules goes to the fallback
            }
            if names:
                taps.append(_Tap(module_name, module, rule, names))
        return taps

    def _tapped_names(self) -> set[str]:
        return {full for tap in self._taps for full in tap.names.values()}

    def _untap(self, names: Iterable[str]) -> None:
        names = set(names)
        for tap in self._taps:
            tap.names = {k: v for k, v in tap.names.items() if v not in names}
        self._taps = [tap for tap in self._taps if tap.names]
        for name in names:
            self._fallback[name] = self.params[name]
            self.report.routes[name] = self._fallback_route

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
            if self._fallback:
                self._add_fallback(batch, vectors, n)
        finally:
            for tap in self._taps:
                tap.calls.clear()
            self._cols.clear()
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

    def _fused_pairs(self, taps: list[_Tap]) -> list[tuple[_Tap, _Tap]]:
        """``(conv tap, BatchNorm tap)`` for each eval-mode BatchNorm that takes a conv's output as its input (one call
        each): both get their gradients from the BatchNorm's output gradient alone (see ``_conv_bn_sums``)."""
        convs = {
            id(tap.calls[0].output): tap
            for tap in taps
            if isinstance(tap.rule, _ConvRule)
            and len(tap.calls) == 1
            and "weight" in tap.names
            and id(tap.module) not in self._unfused
        }
        pairs = []
        for bn in taps:
            if isinstance(bn.rule, _BatchNormRule) and len(bn.calls) == 1:
                conv = convs.get(id(bn.calls[0].graph_input))  # both tensors are alive: ids cannot collide
                if conv is not None:
                    pairs.append((conv, bn))
        return pairs

    def _add_tapped(self, logits: Tensor, vectors: list[Tensor]) -> None:
        taps = [tap for tap in self._taps if tap.calls]
        if not taps:
            return
        pairs = self._fused_pairs(taps)
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
                elif isinstance(tap.rule, _ConvRule) and len(tap.calls) == 1:
                    self._add_conv(tap, gs[0], len(vectors))
                elif isinstance(tap.rule, _LinearRule) and len(tap.calls) == 1 and tap.calls[0].input.dim() == 2:
                    g = gs[0] if gs[0] is not None else torch.zeros_like(tap.calls[0].output)
                    r = _reduce(g, self.reduction)
                    rank_one[id(tap)] = r if id(tap) not in rank_one else rank_one[id(tap)] + r
                else:
                    self._add_materialised(tap, gs)
        for tap in taps:
            if id(tap) in rank_one:
                g_r, a_r = rank_one[id(tap)], _reduce(tap.calls[0].input, self.reduction)
                if "weight" in tap.names:  # Σ_n r(g_n)ᵀ r(a_n), added in place into the running sum
                    self.sums[tap.names["weight"]].addmm_(g_r.t().float(), a_r.float())
                if "bias" in tap.names:
                    self.sums[tap.names["bias"]] += g_r.sum(0).float()

    def _conv_chunks(self, conv: _Tap, g: Tensor, passes: int) -> Iterator[tuple[slice, Tensor | None]]:
        """Sample ranges for one conv call's per-sample gradients, each with its unfolded input when that route is
        taken; those are kept for the batch's next backward pass while they fit in ``_MAX_CACHED_ELEMENTS``."""
        module, a = conv.module, conv.calls[0].input
        unfold = _CONV_RULE.uses_unfold(module, passes)
        per_sample = module.weight.numel()
        if unfold:  # the patches [I*K, L] of one sample can be larger than its gradient [O, I*K]
            per_sample = max(per_sample, module.weight[0].numel() * g[0, 0].numel())
        chunk = max(1, _MAX_BLOCK_ELEMENTS // per_sample)
        for start in range(0, a.shape[0], chunk):
            rows = slice(start, start + chunk)
            cols = self._cols.get((id(conv), start)) if unfold else None
            if unfold and cols is None:
                cols = _CONV_RULE.unfold(module, a[rows])
                cached = sum(t.numel() for t in self._cols.values())
                if passes > 1 and cached + cols.numel() <= _MAX_CACHED_ELEMENTS:
                    self._cols[(id(conv), start)] = cols
            yield rows, cols

    def _add_conv(self, conv: _Tap, g: Tensor | None, passes: int) -> None:
        module, a = conv.module, conv.calls[0].input
        g = g if g is not None else torch.zeros_like(conv.calls[0].output)
        reduce = self._reduce_fn
        for rows, cols in self._conv_chunks(conv, g, passes):
            per_sample, transposed = _CONV_RULE.patch_grads(module, a[rows], g[rows], cols)
            sums = {"weight": _sum_patch_grads(per_sample, transposed, module.weight.shape, reduce)}
            if module.bias is not None:
                sums["bias"] = reduce(g[rows].sum(tuple(range(2, g.dim())))).sum(0)
            self._accumulate(conv, sums)

    def _add_fused(self, conv: _Tap, bn: _Tap, g_bn: Tensor | None, passes: int) -> None:
        a, z = conv.calls[0].input, bn.calls[0].input
        g_bn = g_bn if g_bn is not None else torch.zeros_like(bn.calls[0].output)
        for rows, cols in self._conv_chunks(conv, g_bn, passes):
            conv_sums, bn_sums = _conv_bn_sums(
                conv.module, bn.module, a[rows], g_bn[rows], z[rows], self._reduce_fn, cols
            )
            self._accumulate(conv, conv_sums)
            self._accumulate(bn, bn_sums)

    def _reduce_fn(self, x: Tensor) -> Tensor:
        return _reduce(x, self.reduction)

    def _add_materialised(self, tap: _Tap, gs: list[Tensor | None]) -> None:
        calls = [(c.input, g if g is not None else torch.zeros_like(c.output)) for c, g in zip(tap.calls, gs)]
        if len(calls) > 1 and tap.rule.concat_calls():
            n = calls[0][0].shape[0]
            if isinstance(tap.rule, _EmbeddingRule):
                a = torch.cat([a.reshape(n, -1) for a, _ in calls], 1)
            else:
                a = torch.cat([a.reshape(n, -1, a.shape[-1]) for a, _ in calls], 1)
            g = torch.cat([g.reshape(n, -1, g.shape[-1]) for _, g in calls], 1)
            calls = [(a, g)]
        if isinstance(tap.rule, _EmbeddingRule) and len(calls) == 1:
            a, g = calls[0]
            self._accumulate(tap, {"weight": tap.rule.reduce_rows(tap.module, a, g, self.reduction)})
            return
        n = calls[0][0].shape[0]
        numel = sum(p.numel() for p in tap.module.parameters(recurse=False))
        chunk = max(1, _MAX_BLOCK_ELEMENTS // max(numel, 1))
        for start in range(0, n, chunk):
            total: dict[str, Tensor] = {}
            for a, g in calls:
                for name, t in tap.rule.per_sample(tap.module, a[start : start + chunk], g[start : start + chunk]).items():
                    total[name] = t if name not in total else total[name] + t
            self._accumulate(tap, {name: _reduce(t, self.reduction).sum(0) for name, t in total.items()})

    def _accumulate(self, tap: _Tap, local_sums: dict[str, Tensor]) -> None:
        for local, full in tap.names.items():
            if local in local_sums:
                self.sums[full] += local_sums[local].to(torch.float32)

    # -- exact fallback for everything the taps do not cover ----------------------------------------------------------
    def _add_fallback(self, batch: Batch, vectors: list[Tensor], n: int) -> None:
        if self._fallback_route == "vmap":
            try:
                self._add_vmap(batch, vectors, n)
                return
            except Exception as err:  # vmap cannot trace every model; the loop below always can
                log.info("per-sample gradients: torch.func.vmap failed (%s); using a per-sample loop", err)
                self._fallback_route = "loop"
                for name in self._fallback:
                    self.report.routes[name] = "loop"
        self._add_loop(batch, vectors, n)

    def _add_vmap(self, batch: Batch, vectors: list[Tensor], n: int) -> None:
        from torch.func import functional_call, grad, vmap

        leaves, spec = tree_flatten(batch)
        batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n for x in leaves]
        wrapper = _CallLogits(self.model, self.logits_fn)
        names = list(self._fallback)
        detached = {f"model.{name}": self._fallback[name].detach() for name in names}

        def phi(fallback_params, sample_leaves, v):
            full = [x.unsqueeze(0) if b else x for x, b in zip(sample_leaves, batched)]
            z = functional_call(wrapper, fallback_params, (tree_unflatten(full, spec),))
            return (z.squeeze(0) * v).sum()

        in_dims = (None, [0 if b else None for b in batched], 0)
        per_sample_grad = vmap(grad(phi), in_dims=in_dims)
        results = []
        for v in vectors:
            g = per_sample_grad(detached, leaves, v)
            results.append({name: _reduce(g[f"model.{name}"], self.reduction).sum(0) for name in names})
        for result in results:  # only accumulate once every pass succeeded
            for name, t in result.items():
                self.sums[name] += t.to(torch.float32)

    def _add_loop(self, batch: Batch, vectors: list[Tensor], n: int) -> None:
        names = list(self._fallback)
        params = [self._fallback[name] for name in names]
        for i in range(n):
            z = self.logits_fn(slice_batch(batch, i, i + 1, n))
            for k, v in enumerate(vectors):
                grads = torch.autograd.grad(
                    z, params, grad_outputs=v[i : i + 1], retain_graph=k + 1 < len(vectors), allow_unused=True
                )
                for name, g in zip(names, grads):
                    if g is not None:
                        self.sums[name] += _reduce(g, self.reduction).to(torch.float32)

    # -- self-check ---------------------------------------------------------------------------------------------------
    def _self_check(self, batch: Batch) -> None:
        """Σ_n of the taps' per-sample gradients must equal autograd's batch gradient; else use the fallback.

        Run once, on the first few samples in a forward of their own (cheap next to the pass). The vector
        backpropagated is the logits themselves: the identity holds for any vector, and this draws no random labels.
        """
        n = batch_size_of(batch)
        sample = slice_batch(batch, 0, min(n, _CHECK_SAMPLES), n) if n else batch
        logits = self._forward_without_rewrites(sample)
        try:
            self._compare_with_autograd(logits, logits.detach())
        finally:
            for tap in self._taps:
                tap.calls.clear()

    def _compare_with_autograd(self, logits: Tensor, v: Tensor) -> None:
        tapped = [(tap, local, full) for tap in self._taps for local, full in tap.names.items()]
        if not tapped:
            return
        outputs = [call.output for tap in self._taps for call in tap.calls]
        params = [self.params[full] for _, _, full in tapped]
        batch_grads = torch.autograd.grad(logits, params, grad_outputs=v, retain_graph=True, allow_unused=True)
        out_grads = (
            torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=True, allow_unused=True)
            if outputs
            else []
        )
        it = iter(out_grads)
        grads_of = {id(tap): [next(it) for _ in tap.calls] for tap in self._taps}
        pairs = self._fused_pairs([tap for tap in self._taps if tap.calls])
        fused = {id(tap) for pair in pairs for tap in pair}
        tap_sums: dict[str, Tensor] = {}

        def add(tap: _Tap, sums: dict[str, Tensor]) -> None:
            for local, t in sums.items():
                if local in tap.names:
                    full = tap.names[local]
                    tap_sums[full] = t if full not in tap_sums else tap_sums[full] + t

        for conv, bn in pairs:  # the same fused computation the pass uses, summed over the samples
            g_bn = grads_of[id(bn)][0]
            if g_bn is not None:
                conv_sums, bn_sums = _conv_bn_sums(
                    conv.module, bn.module, conv.calls[0].input, g_bn, bn.calls[0].input, _identity
                )
                add(conv, conv_sums)
                add(bn, bn_sums)
        for tap in self._taps:
            if id(tap) not in fused:
                for call, g in zip(tap.calls, grads_of[id(tap)]):
                    if g is not None:
                        add(tap, tap.rule.batch_sum(tap.module, call.input, g))
        wrong = []
        for (_, _, full), expected in zip(tapped, batch_grads):
            got = tap_sums.get(full)
            expected = torch.zeros_like(self.params[full]) if expected is None else expected
            got = torch.zeros_like(expected) if got is None else got
            # Norms, not elementwise: a weight used outside its module call is off by a large amount.
            if float((got - expected).norm()) > 1e-4 * float(expected.norm() + got.norm()) + 1e-12:
                wrong.append(full)
        wrong_pairs = [pair for pair in pairs if any(f in wrong for tap in pair for f in tap.names.values())]
        if wrong_pairs:  # the conv's output also goes elsewhere (a skip connection): no fusion for it; check again
            log.info(
                "per-sample gradients: %s feed more than %s; computing them apart",
                ", ".join(conv.name for conv, _ in wrong_pairs),
                ", ".join(bn.name for _, bn in wrong_pairs),
            )
            self._unfused.update(id(conv.module) for conv, _ in wrong_pairs)
            self._compare_with_autograd(logits, v)
            return
        if wrong:
            log.warning(
                "per-sample gradients: %s used outside their own module call (tied weights?); "
                "using the exact fallback for them",
                ", ".join(wrong),
            )
            self._untap(wrong)


class _CallLogits(nn.Module):
    """Lets ``torch.func.functional_call`` substitute parameters inside an arbitrary ``logits_fn(batch)``."""

    def __init__(self, model: nn.Module, logits_fn: Callable[[Batch], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._logits_fn = logits_fn

    def forward(self, batch: Batch) -> Tensor:
        return self._logits_fn(batch)


def slice_batch(batch: Batch, start: int, stop: int, n: int) -> Batch:
    """Rows ``start:stop`` of every tensor in ``batch`` whose first dimension is the batch size ``n``."""
    leaves, spec = tree_flatten(batch)
    sliced = [x[start:stop] if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n else x for x in leaves]
    return tree_unflatten(sliced, spec)


def batch_size_of(batch: Batch) -> int | None:
    """The first dimension of the first tensor in ``batch`` (None if the batch holds no tensor)."""
    for x in tree_flatten(batch)[0]:
        if isinstance(x, Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return None


def finite_or_raise(sums: dict[str, Tensor], what: str) -> None:
    # One sum per tensor: NaN and inf anywhere reach it, at a fraction of an elementwise isfinite per tensor.
    totals = torch.stack([t.sum() for t in sums.values()]) if sums else torch.zeros(0)
    if bool(torch.isfinite(totals).all()):
        return
    bad = [name for name, t in sums.items() if not bool(torch.isfinite(t).all())]
    raise FloatingPointError(
        f"{what} has non-finite values (NaN/inf) for {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. "
        "The weights or the data already hold NaN/inf, or the logits overflow: check the task's training "
        "loss, lower the learning rate or clip gradients, and re-run."
    )
