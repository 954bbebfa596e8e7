"""The engine: taps the covered layers during one forward per batch, backpropagates each vector to the layer outputs,
turns (input, output gradient) into sums through each layer's rule, and leaves the other parameters to the exact
fallback. The route for each parameter is decided once, by the first-batch self-check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lightning_ewc.per_sample.batches import Batch, batch_size_of
from lightning_ewc.per_sample.fallback import ExactFallback
from lightning_ewc.per_sample.rules import AttentionRule, ConvRule, LinearRule, bypassed_submodules, rule_for
from lightning_ewc.per_sample.rules.conv import ConvChunks, reduced_conv_sums
from lightning_ewc.per_sample.rules.conv_batchnorm import conv_batchnorm_sums, fused_pairs
from lightning_ewc.per_sample.rules.tied import Use, tied_sums
from lightning_ewc.per_sample.self_check import (
    check_taps,
    first_samples,
    isolation,
    place_samples,
    same_logits,
)
from lightning_ewc.per_sample.shards import max_over_ranks, reduce_to_shards
from lightning_ewc.per_sample.sums import Reduction, reduce_per_sample
from lightning_ewc.per_sample.taps import Tap

log = logging.getLogger(__name__)

OutputGrads = Callable[[Tensor, Batch], Sequence[Tensor]]
"""Given the logits [N, ...] of a batch (and the batch), the vectors v (same shape as the logits) to backpropagate;
one vector per backward pass (e.g. C − 1 for the exact Fisher over C classes)."""

FUSED_ROUTE = "conv+batchnorm"


@dataclass
class PerSampleReport:
    """Which route each parameter took: the closed-form rule that computed it (``linear``, ``attention``, ``conv``,
    ``conv+batchnorm``, ``batchnorm``, ``layernorm``, ``rmsnorm``, ``groupnorm``, ``embedding``, ``conv1d``; rules
    joined by ``+`` for a weight several modules share, e.g. ``embedding+linear``), or the exact fallback, ``vmap``
    or ``loop``. Logged once per estimation."""

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
        reduce_shards: bool = False,
    ) -> None:
        if reduction not in ("sq", "abs"):
            raise ValueError(f"reduction must be 'sq' or 'abs', got {reduction!r}")
        self.model, self.params, self.logits_fn, self.reduction = model, params, logits_fn, reduction
        # Sharded (DTensor) parameters' rules see the global shape while FSDP2 has them gathered, so their sums are
        # computed at full size. Without ``reduce_shards`` they are summed so over the pass, for the caller to reduce;
        # with it (every rank running the pass in step), each module's full-size sums of a batch are reduced to this
        # rank's shard as soon as they are complete (``shards.py``), and ``sums`` holds, for those parameters, this
        # rank's shard of the sum over all ranks.
        self._shards = {n: p for n, p in params.items() if isinstance(p, DTensor)} if reduce_shards else {}
        self.sums = {
            name: torch.zeros(p.to_local().shape if name in self._shards else p.shape, dtype=torch.float32,
                              device=p.device)
            for name, p in params.items()
        }
        self._pending: dict[str, Tensor] = {}  # full-size sums of sharded parameters, this batch, not yet reduced
        self.pending_bytes = self.peak_pending_bytes = 0  # their bytes now and at most (bench/sharded_memory.py)
        self.sharded = any(isinstance(p, DTensor) for p in params.values())
        self.count = 0
        self.report = PerSampleReport()
        self._taps = self._build_taps()
        # Attention modules that run a forward of their own during the pass (``rules/attention.py``): those with a
        # tapped projection or out_proj.
        tapped_modules = {id(tap.module) for tap in self._taps}
        self._overrides = [
            m
            for m in model.modules()
            if AttentionRule().applies(m) and (id(m) in tapped_modules or id(m.out_proj) in tapped_modules)
        ]
        self._tied_names: set[str] = set()
        self._fallback = ExactFallback(model, logits_fn, reduction, self.report.routes)
        for name, p in params.items():
            routes = sorted({tap.rule.route for tap in self._taps if name in tap.names.values()})
            if routes:
                self.report.routes[name] = "+".join(routes)
            else:
                self._fallback.add_param(name, p)
        self._checked = False
        # ids of convs whose output also goes elsewhere than their BatchNorm, and, when sharded, every conv: the fused
        # route reads parameter values outside the forward, where FSDP2 holds only shards
        self._unfused: set[int] = {id(m) for m in model.modules()} if self.sharded else set()
        self._conv_chunks = ConvChunks()  # keeps unfolded conv inputs across one batch's backward passes

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _build_taps(self) -> list[Tap]:
        by_id = {id(p): name for name, p in self.params.items()}
        owners: dict[int, list[int]] = {}
        for module in self.model.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(id(module))
        rules = {id(m): rule_for(m) for m in self.model.modules()}
        bypassed = {id(sub) for m in self.model.modules() for sub in bypassed_submodules(m, rules[id(m)])}
        taps = []
        for module_name, module in self.model.named_modules():
            rule = rules[id(module)]
            if rule is None or id(module) in bypassed:
                continue
            own = dict(module.named_parameters(recurse=False))
            for part in rule.parts(module):
                names, rows = {}, {}
                for local, (param, block) in part.params.items():
                    p = own.get(param)
                    if p is not None and id(p) in by_id:
                        names[local] = by_id[id(p)]
                        if block is not None:
                            rows[local] = block
                if names:
                    label = f"{module_name}[{part.label}]" if part.label else module_name
                    taps.append(Tap(label, module, part.rule, names, rows, part.label))
        return self._drop_unshareable(taps, owners)

    def _drop_unshareable(self, taps: list[Tap], owners: dict[int, list[int]]) -> list[Tap]:
        """A parameter owned by several modules stays on the taps only if each owner's rule computes it whole (then
        the contributions are added per sample, ``rules/tied.py``); one also owned by a module no rule covers goes to
        the fallback. Blocks of rows (attention's q, k, v) are disjoint, so they add up without that."""
        claims: dict[str, list[Tap]] = {}
        for tap in taps:
            for full in tap.names.values():
                claims.setdefault(full, []).append(tap)
        drop = set()
        for full, claiming in claims.items():
            owner_ids = owners[id(self.params[full])]
            if len(owner_ids) == 1:
                continue
            whole = all(local not in tap.rows for tap in claiming for local, f in tap.names.items() if f == full)
            if not whole or sorted(owner_ids) != sorted(id(tap.module) for tap in claiming):
                drop.add(full)
        for tap in taps:
            tap.names = {k: v for k, v in tap.names.items() if v not in drop}
        return [tap for tap in taps if tap.names]

    def _tied(self) -> dict[str, list[Tap]]:
        """Full names computed by more than one tap as whole parameters (a weight several modules own)."""
        claims: dict[str, list[Tap]] = {}
        for tap in self._taps:
            for local, full in tap.names.items():
                if local not in tap.rows:
                    claims.setdefault(full, []).append(tap)
        return {full: claiming for full, claiming in claims.items() if len(claiming) > 1}

    def _untap(self, names: Iterable[str]) -> None:
        names = set(names)
        for tap in self._taps:
            tap.names = {k: v for k, v in tap.names.items() if v not in names}
        self._taps = [tap for tap in self._taps if tap.names]
        for name in names:
            self._fallback.add_param(name, self.params[name])

    def _untap_taps(self, taps: list[Tap], why: str) -> None:
        names = sorted({full for tap in taps for full in tap.names.values()})
        if names:
            log.warning("per-sample gradients: %s %s; using the exact fallback for them", ", ".join(names), why)
            self._untap(names)

    def _self_check(self, batch: Batch) -> None:
        """Runs the first-batch self-check (``self_check.py``): where the samples lie in each tapped call, that the
        tapped forward computes the model, that samples stay apart, and that the taps' summed gradients are
        autograd's. Convs it finds feeding more than their BatchNorm are computed apart from it, and tapped
        parameters that fail go to the exact fallback."""
        check = first_samples(batch)
        for tap in self._taps:
            tap.capture_in_use = self.sharded
        try:
            unplaced = place_samples(self._taps, self._call_shapes, check)
        except Exception as err:  # only when the attention forward is what failed: retried without it
            if not self._overrides:
                raise
            self._drop_forward_changes(f"fails ({err})")
            unplaced = place_samples(self._taps, self._call_shapes, check)
        self._untap_taps(unplaced, "are used where their module's input has no dimension of samples")
        logits = self._forward_like_the_model(check)
        try:
            self._untap_taps(isolation(self._taps, logits), "have outputs whose samples do not stay apart")
            in_use = {full: t for tap in self._taps for full, t in tap.in_use.items()}
            wrong = check_taps(self._taps, {**self.params, **in_use}, logits, self._unfused)
            if wrong:
                log.warning(
                    "per-sample gradients: %s used outside their own module call (tied weights through a "
                    "functional call?); using the exact fallback for them",
                    ", ".join(wrong),
                )
                self._untap(wrong)
        finally:
            self._clear_calls()
            for tap in self._taps:
                tap.capture_in_use, tap.in_use = False, {}

    def _forward_like_the_model(self, check: Batch) -> Tensor:
        """The tapped forward of the check samples. Where the pass changes the forward (attention's own forward,
        per-sample copies of shared outputs) it must give the model's logits; if it does not, or fails, the changes
        are dropped and their parameters go to the exact fallback."""
        if not self._overrides and not any(tap.shared for tap in self._taps):
            return self._forward_without_rewrites(check)
        # With grad, as the pass differentiates it: torch's fast paths without grad can differ (a TransformerEncoder's
        # nested tensors zero the padded positions).
        with torch.enable_grad():
            plain = self.logits_fn(check).detach()
        try:
            logits = self._forward_without_rewrites(check)
            if same_logits(logits, plain):
                return logits
            problem = "does not reproduce the model's logits"
        except Exception as err:  # the model's own forward just ran: the changes are what failed
            problem = f"fails ({err})"
        self._drop_forward_changes(problem)
        return self._forward_without_rewrites(check)

    def _drop_forward_changes(self, problem: str) -> None:
        changed = [f"{type(m).__name__} forward" for m in self._overrides]
        changed += [f"per-sample copies of {tap.name}" for tap in self._taps if tap.shared]
        log.warning("per-sample gradients: the pass's forward (%s) %s", ", ".join(changed), problem)
        covered = {id(m) for m in self._overrides} | {id(m.out_proj) for m in self._overrides}
        self._overrides = []
        self._clear_calls()
        self._untap_taps(
            [tap for tap in self._taps if tap.shared or id(tap.module) in covered], "depend on those changes"
        )

    def _call_shapes(self, batch: Batch) -> dict[int, list[tuple[torch.Size, torch.Size]]]:
        try:
            self._forward_without_rewrites(batch)
            return {id(tap): [(c.input.shape, c.output.shape) for c in tap.calls] for tap in self._taps}
        finally:
            self._clear_calls()

    def _clear_calls(self) -> None:
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
            self._untap_taps(
                [tap for tap in self._taps if tap.calls and not tap.fits(n)],
                f"are used where the first batch had no dimension of samples, or that dimension is not {n} here",
            )
            vectors = [v.detach() for v in output_grads(logits, batch)]
            self._add_tapped(logits, vectors)
            if self._fallback.params:
                self._fallback.add_batch(batch, vectors, n, self.sums)
        finally:
            self._clear_calls()
            self._conv_chunks.clear()
            self._pending.clear()  # empty unless this batch failed
            self.pending_bytes = 0
        self.count += n
        return n

    def _forward_without_rewrites(self, batch: Batch) -> Tensor:
        logits = self._tapped_forward(batch)
        rewritten = [tap for tap in self._taps if not tap.clone_output and tap.rewritten_in_place()]
        if rewritten:  # an output was changed in place after its tap saw it: redo this forward with copies
            self._clear_calls()
            for tap in rewritten:
                tap.clone_output = True
            logits = self._tapped_forward(batch)
        return logits

    def _tapped_forward(self, batch: Batch) -> Tensor:
        n = batch_size_of(batch) or 0
        handles = []
        try:
            for tap in self._taps:
                tap.samples = n
                if not tap.part:
                    # first among the module's hooks: FSDP2's own reshards the module once the forward is done
                    handles.append(tap.module.register_forward_hook(tap.hook, prepend=True))
            with self._attention_forwards(), torch.enable_grad():
                return self.logits_fn(batch)
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _attention_forwards(self) -> Iterator[None]:
        """Attention modules run ``rules/attention.py``'s forward (an instance attribute shadowing the class's),
        recording their q, k and v projections into their parts' taps."""
        patched = []
        try:
            for module in self._overrides:
                if "forward" in vars(module):  # someone else's per-instance forward: leave it (and its taps fail)
                    continue
                records = {tap.part: tap.record for tap in self._taps if tap.module is module and tap.part}
                module.forward = AttentionRule().forward_override(module, records)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward

    def _add_tapped(self, logits: Tensor, vectors: list[Tensor]) -> None:
        taps = [tap for tap in self._taps if tap.calls]
        tied = self._tied()
        self._tied_names = set(tied)
        tied_taps = {id(tap) for claiming in tied.values() for tap in claiming}
        # A shared weight needs its module's own output gradient: such a conv or BatchNorm is not fused.
        pairs = [pair for pair in fused_pairs(taps, self._unfused) if not {id(pair[0]), id(pair[1])} & tied_taps]
        conv_of = {id(bn): conv for conv, bn in pairs}
        fused_convs = {id(conv) for conv, _ in pairs}
        taps = [tap for tap in taps if id(tap) not in fused_convs]  # their gradients come through the BatchNorm's
        self.report.fused.update((conv.name, bn.name) for conv, bn in pairs)
        for conv, bn in pairs:
            for full in (*conv.names.values(), *bn.names.values()):
                self.report.routes[full] = FUSED_ROUTE
        # The taps in the order their sums are completed and, with ``reduce_shards``, reduced: the same on every rank
        # (a tap no rank called is left out; one called on another rank only reduces zeros here).
        schedule = self._schedule(taps, tied, len(vectors))
        if not schedule:
            return
        outputs = [call.output for tap in taps for call in tap.calls]
        # Linear layers called once on 2-D input: accumulate Σ_k g_k² (or |g_k|) over passes, one matmul at the end
        # (``_deferred``; the others add to their sums pass by pass).
        rank_one: dict[int, Tensor] = {}
        for k, v in enumerate(vectors):
            grads = (
                torch.autograd.grad(logits, outputs, grad_outputs=v, retain_graph=k + 1 < len(vectors),
                                    allow_unused=True)
                if outputs else ()
            )
            it = iter(grads)
            calls_of: dict[int, list[tuple[Tensor, Tensor]]] = {}
            claims = dict(self._claims)
            for tap in schedule:
                if tap.calls:  # called on this rank's batch
                    gs = [next(it) for _ in tap.calls]
                    if id(tap) in conv_of:
                        self._add_fused(conv_of[id(tap)], tap, gs[0], len(vectors))
                    else:
                        calls = calls_of[id(tap)] = tap.inputs_and_grads(gs)
                        if isinstance(tap.rule, ConvRule) and len(calls) == 1:
                            self._add_conv(tap, calls[0], len(vectors))
                        elif _rank_one(tap):
                            r = reduce_per_sample(calls[0][1], self.reduction)
                            if id(tap) in self._deferred:
                                rank_one[id(tap)] = r if id(tap) not in rank_one else rank_one[id(tap)] + r
                            else:
                                self._add_rank_one(tap, r, tied)
                        else:
                            self._add_materialised(tap, calls)
                if id(tap) not in self._deferred:
                    self._completed(tap, claims)
            for full, claiming in tied.items():
                uses = [
                    Use(tap.rule, tap.module, local, calls_of[id(tap)])
                    for tap in claiming
                    if id(tap) in calls_of
                    for local, f in tap.names.items()
                    if f == full
                ]
                if uses:
                    self._full(full).add_(tied_sums(uses, self.params[full].shape, self.reduction).float())
            self._reduce_to_shards(sorted(tied))
        claims = dict(self._claims)
        for tap in schedule:
            if id(tap) in rank_one:
                self._add_rank_one(tap, rank_one.pop(id(tap)), tied)
            if id(tap) in self._deferred:
                self._completed(tap, claims)

    def _add_rank_one(self, tap: Tap, g_r: Tensor, tied: dict[str, list[Tap]]) -> None:
        a_r = reduce_per_sample(tap.calls[0].input, self.reduction)
        if "weight" in tap.names and tap.names["weight"] not in tied:  # Σ_n r(g_n)ᵀ r(a_n), in place
            weight = self._target(tap, "weight")
            if tap.rule.transposed:
                weight.addmm_(a_r.t().float(), g_r.float())
            else:
                weight.addmm_(g_r.t().float(), a_r.float())
        if "bias" in tap.names and tap.names["bias"] not in tied:
            self._target(tap, "bias").add_(g_r.sum(0).float())

    # -- sharded parameters: full-size sums of one module at a time (``shards.py``) -------------------------------
    @property
    def reduced(self) -> list[str]:
        """The parameters whose ``sums`` are this rank's shard of the sum over ranks (``reduce_shards``)."""
        return sorted(self._shards)

    def _schedule(self, taps: list[Tap], tied: dict[str, list[Tap]], passes: int) -> list[Tap]:
        """``taps`` (this rank's), or, with ``reduce_shards``, the taps called on any rank, in the taps' order. Sets
        ``_deferred``, the taps whose sums are added once after the batch's passes (rank-one Linear calls), and
        ``_claims``, for each sharded parameter, how many taps add to it before its sums are complete.

        With ``reduce_shards`` the other taps' sums are reduced pass by pass: the exact Fisher makes C − 1 passes a
        batch, and keeping their full-size sums over the passes would hold them for every such module at once (all of
        a transformer's, whose Linears see sequences). That costs C − 1 collectives a batch for those modules instead
        of one: memory is what sharding is for."""
        if not self._shards:
            self._deferred = {id(tap) for tap in taps if _rank_one(tap)}
            self._claims = {}
            return taps
        like = next(iter(self._shards.values()))
        # 0: not called here, 1: a rank-one Linear call, 2: any other; the largest over the ranks
        kinds = max_over_ranks([0 if not tap.calls else 1 if _rank_one(tap) else 2 for tap in self._taps], like)
        schedule = [tap for tap, kind in zip(self._taps, kinds) if kind]
        deferred = {id(tap) for tap, kind in zip(self._taps, kinds) if kind == 1} if passes > 1 else set()
        claiming: dict[str, list[Tap]] = {}
        for tap in schedule:
            for full in dict.fromkeys(tap.names.values()):
                if full in self._shards and full not in tied:
                    claiming.setdefault(full, []).append(tap)
        # the taps adding to one parameter are reduced together, so all when its sums are complete: pass by pass
        # if any of them is
        changed = True
        while changed:
            changed = False
            for taps_of in claiming.values():
                ids = {id(tap) for tap in taps_of}
                if ids & deferred and not ids <= deferred:
                    deferred -= ids
                    changed = True
        self._deferred = deferred
        self._claims = {full: len(taps_of) for full, taps_of in claiming.items()}
        return schedule

    def _completed(self, tap: Tap, claims: dict[str, int]) -> None:
        """``tap`` has added all it adds for now: its parameters no other tap still adds to (``claims``, counted
        down) are reduced."""
        if not self._shards:
            return
        complete = []
        for full in dict.fromkeys(tap.names.values()):
            if full in claims:
                claims[full] -= 1
                if claims[full] == 0:
                    complete.append(full)
        self._reduce_to_shards(complete)

    def _full(self, name: str) -> Tensor:
        """The full-size running sum of a parameter: its sum for the pass, or, for a parameter reduced to shards,
        this batch's (allocated when first added to)."""
        if name not in self._shards:
            return self.sums[name]
        total = self._pending.get(name)
        if total is None:
            total = self._pending[name] = torch.zeros(self.params[name].shape, dtype=torch.float32,
                                                      device=self.sums[name].device)
            self.pending_bytes += total.numel() * total.element_size()
            self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)
        return total

    def _reduce_to_shards(self, names: Iterable[str]) -> None:
        """Adds this rank's shard of the sum over ranks of these parameters' full-size sums (zeros where this rank
        added nothing) to ``sums``, in one collective, and drops the full-size sums."""
        names = [name for name in names if name in self._shards]
        if not names:
            return
        fulls = [self._full(name) for name in names]
        for name in names:
            del self._pending[name]
        for name, shard in zip(names, reduce_to_shards(fulls, [self._shards[name] for name in names])):
            self.sums[name] += shard
        self.pending_bytes -= sum(t.numel() * t.element_size() for t in fulls)

    def _add_conv(self, conv: Tap, call: tuple[Tensor, Tensor], passes: int) -> None:
        module, (a, g) = conv.module, call
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

    def _add_materialised(self, tap: Tap, calls: list[tuple[Tensor, Tensor]]) -> None:
        for sums in tap.rule.reduced_sums(tap.module, calls, self.reduction):
            self._accumulate(tap, sums)

    def _reduce(self, x: Tensor) -> Tensor:
        return reduce_per_sample(x, self.reduction)

    def _target(self, tap: Tap, local: str) -> Tensor:
        """Where ``tap``'s sums for ``local`` go: the parameter's running sum, or its rows for a part."""
        total = self._full(tap.names[local])
        return total[tap.rows[local]] if local in tap.rows else total

    def _accumulate(self, tap: Tap, local_sums: dict[str, Tensor]) -> None:
        for local, full in tap.names.items():
            if local in local_sums and full not in self._tied_names:  # those are added up across modules
                self._target(tap, local).add_(local_sums[local].to(torch.float32))


def _rank_one(tap: Tap) -> bool:
    """A Linear called once on 2-D input: its per-sample gradients are rank one (``_add_rank_one``)."""
    return isinstance(tap.rule, LinearRule) and len(tap.calls) == 1 and tap.calls[0].input.dim() == 2
