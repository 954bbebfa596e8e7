"""The exact fallback for parameters no tap covers: ``torch.func.vmap(grad(...))`` over the samples, or, for a model
vmap cannot trace (data-dependent Python, ``.item()``, ...), one sample at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_ewc.per_sample.batches import Batch, slice_batch
from lightning_ewc.per_sample.sums import Reduction, reduce_per_sample

log = logging.getLogger(__name__)


class ExactFallback:
    """Adds ``Σ_n r(∂(v_n·z_n)/∂θ)`` into the sums for its parameters, by vmap until vmap fails on the model, then by
    the per-sample loop. ``routes`` (the report's) is kept up to date with the route each parameter takes."""

    def __init__(
        self,
        model: nn.Module,
        logits_fn: Callable[[Batch], Tensor],
        reduction: Reduction,
        routes: dict[str, str],
    ) -> None:
        self.model, self.logits_fn, self.reduction, self.routes = model, logits_fn, reduction, routes
        self.params: dict[str, nn.Parameter] = {}
        self.route = "vmap"

    def add_param(self, name: str, param: nn.Parameter) -> None:
        if isinstance(param, DTensor):
            # Per-sample forwards and functional_call would see a shard, or run collectives rank by rank unmatched.
            raise NotImplementedError(
                f"parameter {name!r} needs the exact fallback (vmap or a per-sample loop: no closed-form rule covers "
                "its use), which cannot run on sharded (FSDP2) parameters. Its layer must be one with a rule "
                "(Linear, Conv1d/2d, norms, Embedding, MultiheadAttention, ...: see the README's routes), or leave it "
                f"out with exclude=[{name!r}]"
            )
        self.params[name] = param
        self.routes[name] = self.route

    def add_batch(self, batch: Batch, vectors: list[Tensor], n: int, sums: dict[str, Tensor]) -> None:
        if self.route == "vmap":
            try:
                self._add_vmap(batch, vectors, n, sums)
                return
            except Exception as err:  # vmap cannot trace every model; the loop below always can
                log.info("per-sample gradients: torch.func.vmap failed (%s); using a per-sample loop", err)
                self.route = "loop"
                for name in self.params:
                    self.routes[name] = "loop"
        self._add_loop(batch, vectors, n, sums)

    def _add_vmap(self, batch: Batch, vectors: list[Tensor], n: int, sums: dict[str, Tensor]) -> None:
        from torch.func import functional_call, grad, vmap

        leaves, spec = tree_flatten(batch)
        batched = [isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n for x in leaves]
        wrapper = _CallLogits(self.model, self.logits_fn)
        names = list(self.params)
        detached = {f"model.{name}": self.params[name].detach() for name in names}

        def phi(fallback_params, sample_leaves, v):
            full = [x.unsqueeze(0) if b else x for x, b in zip(sample_leaves, batched)]
            z = functional_call(wrapper, fallback_params, (tree_unflatten(full, spec),))
            return (z.squeeze(0) * v).sum()

        in_dims = (None, [0 if b else None for b in batched], 0)
        per_sample_grad = vmap(grad(phi), in_dims=in_dims)
        results = []
        for v in vectors:
            # torch.func.grad differentiates inside whatever the outer mode is; without no_grad outside, its result
            # would also carry a graph back to the model's other parameters (which still require grad), built for
            # nothing and kept alive by the sums.
            with torch.no_grad():
                g = per_sample_grad(detached, leaves, v)
            results.append({name: reduce_per_sample(g[f"model.{name}"], self.reduction).sum(0) for name in names})
        for result in results:  # only accumulate once every pass succeeded
            for name, t in result.items():
                sums[name] += t.to(torch.float32)

    def _add_loop(self, batch: Batch, vectors: list[Tensor], n: int, sums: dict[str, Tensor]) -> None:
        names = list(self.params)
        params = [self.params[name] for name in names]
        for i in range(n):
            z = self.logits_fn(slice_batch(batch, i, i + 1, n))
            for k, v in enumerate(vectors):
                grads = torch.autograd.grad(
                    z, params, grad_outputs=v[i : i + 1], retain_graph=k + 1 < len(vectors), allow_unused=True
                )
                for name, g in zip(names, grads):
                    if g is not None:
                        sums[name] += reduce_per_sample(g, self.reduction).to(torch.float32)


class _CallLogits(nn.Module):
    """Lets ``torch.func.functional_call`` substitute parameters inside an arbitrary ``logits_fn(batch)``."""

    def __init__(self, model: nn.Module, logits_fn: Callable[[Batch], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._logits_fn = logits_fn

    def forward(self, batch: Batch) -> Tensor:
        return self._logits_fn(batch)
