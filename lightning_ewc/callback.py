"""``EWCCallback``: consolidates each task when its ``fit`` ends and holds the state the penalty needs."""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from lightning_ewc._lightning import Callback, rank_zero_info, rank_zero_warn
from lightning_ewc.consolidation import (
    ConsolidatedState,
    add_penalty_gradient,
    check_mode,
    penalty_from_squared,
    quadratic_penalty,
    require_keys,
)
from lightning_ewc.distributed import (
    agreeing,
    check_strategy,
    gather_full,
    local,
    on_every_rank,
    rank_batches,
    rank_of,
    shard_of,
)
from lightning_ewc.fisher import FISHER_ESTIMATORS, ImportanceSums, accumulate_importance
from lightning_ewc.importance import IMPORTANCES, PathIntegral, uniform_importance
from lightning_ewc.mixin import EWCMixin
from lightning_ewc.structure import structure_generation

FisherData = DataLoader | Callable[[Any], Iterable] | None
PENALTY_VIA = ("loss", "gradient")


class EWCCallback(Callback):
    """Elastic Weight Consolidation for any ``LightningModule`` that inherits :class:`~lightning_ewc.EWCMixin`.

    Each ``trainer.fit`` is one task. When a fit's training ends normally (max epochs/steps, early stopping; not on
    an exception or interrupt), the callback snapshots the weights θ*_t and estimates the importance F_t on that
    task's training data; the mixin then adds (λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)² to every later training loss.

    Args:
        ewc_lambda: λ ≥ 0, the strength of the penalty. We use the ½ of Kirkpatrick et al. and van de Ven: a library
            that writes λ Σ F (θ − θ*)² without the ½ needs half our λ for the same penalty.
        mode: ``"separate"`` (one spring per earlier task, the original EWC) or ``"online"`` (Schwarz et al. 2018:
            F̃ ← γ F̃ + F_t, anchored at the latest weights). Either way the state is two parameter-sized tensors.
        gamma: γ ∈ [0, 1], the decay of older importance in ``online`` mode (0: only the latest task's spring).
        importance: ``"fisher"`` (EWC), ``"l2"`` (uniform importance), ``"mas"`` (Aljundi et al. 2018) or ``"si"``
            (Zenke et al. 2017, path integral with damping ``si_damping``).
        fisher: the Fisher estimator: ``"exact"``, ``"sampled"``, ``"empirical"`` or ``"batched"``.
        num_samples: estimate on at most this many samples (a seeded random subset); None: the whole dataset.
        fisher_dataloader: the data to estimate on, instead of the training dataloader of the fit: a ``DataLoader``
            or a callable ``trainer -> DataLoader``.
        fisher_batch_size: batch size of the estimation pass; default the training dataloader's.
        include / exclude: glob patterns on parameter names (e.g. ``"heads.*"``); by default every trainable
            parameter is consolidated. Frozen parameters are skipped.
        si_damping: ξ of Synaptic Intelligence.
        seed: seeds the subset drawn for ``num_samples`` and the labels drawn by ``sampled``.
        penalty_via: ``"loss"`` (default): the mixin adds the penalty to the training loss. ``"gradient"``: the
            callback adds the penalty's gradient λ F ⊙ (θ − c) to ``.grad`` in ``on_before_optimizer_step`` (after
            AMP unscaling, before clipping, once per optimizer step, so accumulation, clipping and DDP see the same
            gradients as with ``"loss"``), about a third of the penalty's per-step cost (bench/penalty_overhead.py). The
            loss then excludes the penalty: ``ewc/penalty`` is still logged, but an optimizer that re-evaluates the
            loss in a closure (LBFGS) must use ``"loss"``.
    """

    #: How :class:`EWCMixin` recognises the callback on a Trainer without importing this module.
    provides_ewc_penalty = True

    def __init__(
        self,
        ewc_lambda: float = 1.0,
        mode: str = "separate",
        gamma: float = 1.0,
        importance: str = "fisher",
        fisher: str = "exact",
        num_samples: int | None = None,
        fisher_dataloader: FisherData = None,
        fisher_batch_size: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        si_damping: float = 0.1,
        seed: int = 0,
        penalty_via: str = "loss",
    ) -> None:
        check_mode(mode, gamma)
        if importance not in IMPORTANCES:
            raise ValueError(f"unknown importance {importance!r}; choose one of {IMPORTANCES}")
        if fisher not in FISHER_ESTIMATORS:
            raise ValueError(f"unknown Fisher estimator {fisher!r}; choose one of {FISHER_ESTIMATORS}")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
            raise ValueError(f"num_samples must be a positive integer or None (all samples); got {num_samples!r}")
        if penalty_via not in PENALTY_VIA:
            raise ValueError(
                f"unknown penalty_via {penalty_via!r}; choose 'loss' (added to the training loss) or 'gradient' "
                "(added to the gradients before each optimizer step)"
            )
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError("include/exclude take a list of glob patterns, e.g. exclude=['heads.*']")
        self.ewc_lambda = ewc_lambda
        self.importance_name = importance
        self.fisher = fisher
        self.num_samples = num_samples
        self.fisher_dataloader = fisher_dataloader
        self.fisher_batch_size = fisher_batch_size
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.seed = seed
        self.penalty_via = penalty_via
        self.state = ConsolidatedState(mode=mode, gamma=gamma, squared=penalty_via == "gradient")
        self.path_integral = PathIntegral(si_damping) if importance == "si" else None
        self.last_estimate: ImportanceSums | None = None  # sample count and per-parameter route of the last pass
        self._version = 0  # bumped whenever the state changes; invalidates the penalty cache
        self._penalty_cache: tuple | None = None
        self._owned_cache: tuple | None = None  # (optimizer id, its parameter count, their ids) within one fit
        self._fit_start_step: int | None = None
        # sharded (DTensor) parameters by name: the state holds their local shards; their layout serves checkpoints
        self._sharded: dict[str, DTensor] = {}
        self._ranks_sharing = 1

    # ------------------------------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------------------------------
    @property
    def ewc_lambda(self) -> float:
        """λ, the strength of the penalty; may be changed between tasks (a finite number >= 0)."""
        return self._ewc_lambda

    @ewc_lambda.setter
    def ewc_lambda(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"ewc_lambda must be a finite number >= 0 (the penalty strength λ); got {value!r}")
        self._ewc_lambda = float(value)

    @property
    def mode(self) -> str:
        return self.state.mode

    @property
    def num_tasks(self) -> int:
        """Tasks consolidated so far."""
        return self.state.num_tasks

    def num_bytes(self) -> int:
        """Bytes held in tensors: the consolidated state plus SI's training-time accumulators."""
        extra = self.path_integral.num_bytes() if self.path_integral is not None else 0
        return self.state.num_bytes() + extra

    # ------------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, EWCMixin):
            raise TypeError(
                f"EWCCallback needs the LightningModule to inherit EWCMixin so that the penalty reaches the loss: "
                f"declare `class {type(pl_module).__name__}(EWCMixin, LightningModule)`"
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        # here rather than in setup(): a module may create its parameters in configure_model, which comes after
        self._check_patterns(pl_module)
        check_strategy(trainer, self.selected_parameters(pl_module))
        self._fit_start_step = trainer.global_step
        self._owned_cache = None  # each fit makes new optimizers, which may reuse a freed one's id()

    def on_train_start(self, trainer, pl_module) -> None:
        self._localize(pl_module)
        if self.path_integral is not None:
            if not self.path_integral.active:
                self.path_integral.begin_task(self.selected_parameters(pl_module))
            self.path_integral.watch(trainer.optimizers, lambda: self.selected_parameters(pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.penalty_via == "gradient":
            self.add_penalty_gradient(pl_module, optimizer)

    def on_train_end(self, trainer, pl_module) -> None:
        # on_train_end, not on_fit_end: the strategy's teardown (model moved to CPU, DDP process group) comes between.
        if self.path_integral is not None:
            self.path_integral.unwatch()
        if trainer.global_step != self._fit_start_step:
            self.consolidate(pl_module, trainer=trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.path_integral is not None:
            self.path_integral.unwatch()  # the optimizers may be stepped again outside this fit

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_step == self._fit_start_step:
            rank_zero_warn(
                "EWCCallback: this fit ran no optimizer step, so there is no new task to consolidate. When fitting the "
                "same Trainer again, raise `trainer.fit_loop.max_epochs` (or max_steps) first."
            )

    def state_dict(self) -> dict[str, Any]:
        """The state, with full-size tensors also for sharded parameters (gathered: every rank must call it, as
        Lightning does when it saves a checkpoint), so that a checkpoint loads with any number of ranks."""
        consolidated = self.state.state_dict()
        for name, like in self._sharded.items():
            for table in ("importance", "centre"):
                if name in consolidated[table]:
                    consolidated[table][name] = gather_full(consolidated[table][name], like)
        state = {"version": 1, "consolidated": consolidated, "importance": self.importance_name}
        if self.path_integral is not None:
            state["path_integral"] = self.path_integral.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        require_keys(state_dict, ("consolidated", "importance"), "EWCCallback's state")
        loaded = ConsolidatedState.from_state_dict(state_dict["consolidated"])
        if (loaded.mode, state_dict["importance"]) != (self.state.mode, self.importance_name):
            raise ValueError(
                f"the checkpoint holds EWC state for mode={loaded.mode!r}, importance={state_dict['importance']!r} but "
                f"this EWCCallback has mode={self.state.mode!r}, importance={self.importance_name!r}; construct the "
                "callback with the checkpoint's settings to resume"
            )
        if self.path_integral is not None and "path_integral" in state_dict:
            self.path_integral.load_state_dict(state_dict["path_integral"])  # validated before anything changes
        if loaded.mode == "online" and loaded.gamma != self.state.gamma:
            rank_zero_warn(
                f"EWCCallback: the checkpoint was saved with gamma={loaded.gamma} but this callback has "
                f"gamma={self.state.gamma}; this callback's gamma decays the importance from the next consolidation on "
                "(the importance already accumulated is kept as saved). Construct the callback with "
                f"gamma={loaded.gamma} to resume exactly as before."
            )
            loaded.gamma = self.state.gamma
        loaded.hold_squared(self.penalty_via == "gradient")
        self.state = loaded
        self._sharded = {}  # the loaded tensors are full-size; _localize cuts this rank's shards once it sees the module
        self._version += 1

    # ------------------------------------------------------------------------------------------------------------------
    # Consolidation
    # ------------------------------------------------------------------------------------------------------------------
    def selected_parameters(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """Trainable parameters chosen by ``include``/``exclude``."""
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad and self._selects(name)}

    def _selects(self, name: str) -> bool:
        if self.include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def _check_patterns(self, pl_module: nn.Module) -> None:
        """A pattern that matches no parameter name is a typo that would silently change what is consolidated."""
        names = [name for name, _ in pl_module.named_parameters()]
        unmatched = [
            (kind, pat)
            for kind, patterns in (("include", self.include or ()), ("exclude", self.exclude))
            for pat in patterns
            if not any(fnmatch.fnmatchcase(name, pat) for name in names)
        ]
        if unmatched:
            raise ValueError(
                f"EWCCallback: {', '.join(f'{kind} pattern {pat!r}' for kind, pat in unmatched)} matches no parameter "
                f"of {type(pl_module).__name__}; parameter names look like {names[:6]} (glob patterns on the names "
                "of named_parameters(), e.g. 'heads.*')"
            )

    def consolidate(self, pl_module: nn.Module, dataloader: FisherData = None, trainer=None) -> None:
        """Ends a task by hand: snapshot the weights and add their importance to the state.

        Called automatically at the end of every ``fit``; call it yourself from custom loops. ``dataloader``
        overrides where the importance is estimated (default: ``fisher_dataloader``, else the fit's training data).
        """
        self._check_patterns(pl_module)
        for module in pl_module.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # the sharded parameters registered, not the gathered ones a forward left behind
        params = self.selected_parameters(pl_module)
        if not params:
            raise ValueError(
                f"EWCCallback selected no parameter (include={self.include}, exclude={self.exclude}); trainable names "
                f"look like {[n for n, p in pl_module.named_parameters() if p.requires_grad][:5]}"
            )
        self._localize(pl_module)
        if any(isinstance(p, DTensor) for p in params.values()) and self.importance_name == "si":
            raise NotImplementedError(
                "SI with sharded parameters (FSDP2) is not supported: its path integral would need the optimizer's "
                "sharded steps; use importance='fisher', 'mas' or 'l2' there"
            )
        started = time.perf_counter()
        importance, detail = self._estimate(pl_module, params, dataloader, trainer)
        what = f"the {self.importance_name!r} importance" if self.importance_name != "fisher" else (
            f"the {self.fisher!r} Fisher"
        )
        added = self.state.consolidate(importance, {name: local(p.detach()) for name, p in params.items()}, what=what)
        sharded = {name: p for name, p in params.items() if isinstance(p, DTensor)}
        self._sharded.update(sharded)
        if sharded and trainer is not None and trainer.world_size > 1:
            # Each rank added the springs' tension of its own shards: the constant is their sum over ranks.
            mine = sum(added.get(name, 0.0) for name in sharded)
            mine_t = torch.tensor(mine, dtype=torch.float32, device=trainer.strategy.root_device)
            total = trainer.strategy.reduce(mine_t, reduce_op="sum")
            self.state.constant += float(total) - mine
        if self.path_integral is not None:
            self.path_integral.end_task()
        self._version += 1
        rank_zero_info(
            f"EWC: consolidated task {self.state.num_tasks} ({self.importance_name}"
            f"{'/' + self.fisher if self.importance_name == 'fisher' else ''}{detail}) in "
            f"{time.perf_counter() - started:.2f}s"
        )

    def _estimate(self, pl_module, params, dataloader, trainer) -> tuple[dict[str, Tensor], str]:
        if self.importance_name == "l2":
            return uniform_importance({name: local(p) for name, p in params.items()}), ""
        if self.importance_name == "si":
            if not self.path_integral.active:
                raise RuntimeError(
                    "SI accumulates its importance during training, but no training step was seen for this task; "
                    "consolidate after fitting the task with this callback on the Trainer"
                )
            return self.path_integral.importance(params), ""
        estimator = "mas" if self.importance_name == "mas" else self.fisher
        source = self._estimation_source(dataloader, trainer)
        task = self.state.num_tasks
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + task * 7919 + rank_of(trainer))
        sharded = any(isinstance(p, DTensor) for p in params.values())

        def this_rank() -> ImportanceSums:
            batches = rank_batches(
                source,
                trainer,
                next(pl_module.parameters()).device,
                num_samples=self.num_samples,
                batch_size=self.fisher_batch_size,
                subset_seed=self.seed + 1 + task,
                same_batch_count=sharded,
            )
            return accumulate_importance(
                pl_module,
                batches,
                estimator,
                params=params,
                logits_fn=pl_module.ewc_logits,
                targets_fn=pl_module.ewc_targets,
                generator=generator,
                agree=agreeing(trainer) if sharded else None,
                reduce_shards=sharded,
            )

        sums = on_every_rank(
            this_rank, trainer, f"estimating the {estimator!r} importance of task {task + 1}", params=params
        )
        self.last_estimate = sums
        routes = sorted(set(sums.routes.values()))
        return sums.mean(), f", {sums.count} {'batches' if estimator == 'batched' else 'samples'}, {'+'.join(routes)}"

    def _estimation_source(self, dataloader: FisherData, trainer) -> DataLoader | Iterable:
        source = dataloader if dataloader is not None else self.fisher_dataloader
        if source is not None and not isinstance(source, DataLoader) and callable(source):
            source = source(trainer)
        if source is None:
            source = trainer.train_dataloader if trainer is not None else None
            if source is None:
                raise ValueError(
                    "no data to estimate the importance on: pass `dataloader=` to consolidate(), or "
                    "`fisher_dataloader=` to EWCCallback"
                )
            if not isinstance(source, DataLoader):
                raise TypeError(
                    f"the fit used {type(source).__name__} as training data (several dataloaders?); EWCCallback cannot "
                    "tell which one is the task: pass `fisher_dataloader=` to EWCCallback"
                )
        return source

    # ------------------------------------------------------------------------------------------------------------------
    # Penalty
    # ------------------------------------------------------------------------------------------------------------------
    def penalty(self, pl_module: nn.Module) -> Tensor:
        """(λ/2) (Σ_i F_i (θ_i − c_i)² + const): the EWC term for the module's current weights.

        Differentiable with ``penalty_via="loss"``; with ``"gradient"`` a value without a graph (for logging), since
        the callback applies the gradient itself."""
        params, first, second = self._aligned(pl_module)
        if not params:
            device = next(pl_module.parameters()).device if any(True for _ in pl_module.parameters()) else None
            return torch.zeros((), device=device)
        ranks = self._ranks_sharing
        shards = params if ranks == 1 else [local(p) for p in params]  # each rank's part of a sharded sum
        if self.penalty_via == "gradient":
            quadratic = penalty_from_squared(shards, first, second)
        else:
            quadratic = quadratic_penalty(first, second, shards)
        return (0.5 * self.ewc_lambda) * (quadratic + self.state.constant / ranks)

    def add_penalty_gradient(self, pl_module: nn.Module, optimizer=None) -> None:
        """Adds λ F ⊙ (θ − c) to the ``.grad`` of the consolidated parameters (those of ``optimizer`` if given)."""
        if self.ewc_lambda == 0 or not self.state.num_tasks:
            return
        params, fisher, centres = self._aligned(pl_module)
        if optimizer is not None:
            owned = self._owned_ids(optimizer)
            chosen = [i for i, p in enumerate(params) if p.requires_grad and id(p) in owned]
        else:
            chosen = [i for i, p in enumerate(params) if p.requires_grad]
        for i in chosen:
            if params[i].grad is None:  # as autograd would: the penalty alone gives it a gradient
                params[i].grad = torch.zeros_like(params[i])
        add_penalty_gradient(
            [local(params[i].grad) for i in chosen],  # a sharded parameter's gradient is sharded like it
            [local(params[i].detach()) for i in chosen],
            [fisher[i] for i in chosen],
            [centres[i] for i in chosen],
            self.ewc_lambda,
        )

    def sharded(self, pl_module: nn.Module) -> bool:
        """Whether the consolidated parameters are sharded: each rank's penalty is then its part of the whole."""
        self._aligned(pl_module)
        return self._ranks_sharing > 1

    def _localize(self, pl_module: nn.Module) -> None:
        """Cuts this rank's shard out of full-size state (from a checkpoint, saved with any number of ranks) for every
        parameter that is sharded now; no communication."""
        named = dict(pl_module.named_parameters())
        changed = False
        for name in list(self.state.centre):
            p = named.get(name)
            if not isinstance(p, DTensor) or self.state.centre[name].shape == p.to_local().shape:
                continue
            if self.state.centre[name].shape != p.shape:
                continue  # left for the resize check, which names it
            for table in (self.state.fisher if self.state.squared else self.state.root_importance, self.state.centre):
                table[name] = shard_of(table[name], p)
            self._sharded[name] = p
            changed = True
        if changed:
            self._version += 1

    def _owned_ids(self, optimizer) -> set[int]:
        count = sum(len(group["params"]) for group in optimizer.param_groups)  # add_param_group changes it
        if self._owned_cache is None or self._owned_cache[:2] != (id(optimizer), count):
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._owned_cache = (id(optimizer), count, owned)
        return self._owned_cache[2]

    def _aligned(self, pl_module: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The consolidated parameters and their state (√F or F, and the centre) on each parameter's device.

        Cached between steps; the cache is keyed on the parameter tensors themselves: a module or parameter
        registered anywhere since (a new head, a replaced layer) or a parameter whose shape changed rebuilds it, so
        the shape check below and the gradient to the new tensor are never skipped. The state itself is never
        touched: the copies on another device live only in the cache."""
        generation = structure_generation()
        cached = self._penalty_cache
        if (
            cached is not None
            and cached[0] == (id(pl_module), self._version, generation)
            and all(p.shape == shape for p, shape in zip(cached[1][0], cached[2]))
        ):
            return cached[1]
        named = dict(pl_module.named_parameters())
        # √F for the loss-side penalty, F for the gradient-side one
        firsts = self.state.fisher if self.state.squared else self.state.root_importance
        params, roots, centres = [], [], []
        for name, root in firsts.items():
            if not self._selects(name):
                continue
            if name not in named:
                raise KeyError(
                    f"parameter {name!r} was consolidated but the module has no parameter of that name any more; "
                    f"keep the module's structure across tasks, or drop it from the penalty with exclude=[{name!r}]"
                )
            p = named[name]
            sharded = self._sharded.get(name)
            if sharded is not None and not isinstance(p, DTensor) and p.shape == sharded.shape:
                # FSDP2 registers a module's gathered parameters while it computes (the root one after its forward
                # too); the penalty and the optimizer act on the sharded one
                p = sharded
            if local(p).shape != root.shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(local(p).shape)} but was consolidated with shape "
                    f"{tuple(root.shape)}; "
                    f"EWC cannot anchor a resized parameter. Give new classes a new parameter (e.g. a new head "
                    f"module), or leave it out with exclude=[{name!r}]"
                )
            params.append(p)
            roots.append(root.to(p.device))  # float32 always: the penalty's arithmetic dtype
            centres.append(self.state.centre[name].to(p.device))
        aligned = (params, roots, centres)
        # how many ranks each hold a part of the penalty: the ranks of the sharding, 1 without
        self._ranks_sharing = next((p.device_mesh.size() for p in params if isinstance(p, DTensor)), 1)
        self._penalty_cache = ((id(pl_module), self._version, generation), aligned, [p.shape for p in params])
        return aligned
