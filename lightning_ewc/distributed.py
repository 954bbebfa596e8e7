"""What EWC needs from the strategy: each rank's share of the data, one reduction of the sums, an agreement on failure
so that an error on one rank is raised on every rank with its cause, and the layout of sharded parameters.

Sharded parameters (FSDP2's ``fully_shard``, as Lightning's ``ModelParallelStrategy`` applies it) are DTensors: each
rank holds a shard of every parameter, and EWC's state for a parameter is kept for the local shard only, so a rank
holds 2 × its shard's bytes. The importance pass computes full-size sums from each rank's data (the per-sample rules
see whole layers while FSDP has them gathered) and reduce-scatters them module by module as they are completed
(``per_sample/shards.py``), so each rank keeps only its shard of the sum and about one module's sums at full size.

Kept apart from the callback's hooks because none of it depends on when it runs, only on the Trainer's strategy (or
on no Trainer at all: one process, the whole dataset).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_ewc._lightning import move_data_to_device
from lightning_ewc.fisher import ImportanceSums, limit_samples


def rank_of(trainer) -> int:
    return trainer.global_rank if trainer is not None else 0


def world_of(trainer) -> int:
    return trainer.world_size if trainer is not None else 1


def is_map_style(dataset: Dataset) -> bool:
    return not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def rank_batches(
    source: DataLoader | Iterable,
    trainer,
    device: torch.device,
    *,
    num_samples: int | None,
    batch_size: int | None,
    subset_seed: int,
    same_batch_count: bool = False,
) -> Iterator:
    """This rank's batches of ``source``, on its device.

    A map-style dataset is cut into contiguous shares of its (seeded, ``num_samples``-sized) subset: no
    DistributedSampler padding, so no sample counts twice. An iterable one cannot be indexed: each rank reads its own
    stream, up to its share of ``num_samples``. ``same_batch_count``: every rank gets the same number of batches (a
    sharded model gathers its layers in every forward, in step across ranks), the shares split evenly."""
    world, rank = world_of(trainer), rank_of(trainer)
    if isinstance(source, DataLoader) and is_map_style(source.dataset):
        loader, limit = shard(source, rank, world, num_samples, batch_size, subset_seed, same_batch_count), None
    elif same_batch_count and world > 1:
        raise NotImplementedError(
            "with sharded parameters every rank must run the same number of batches, which an iterable dataset "
            "cannot promise: pass a map-style dataset (one with __len__ and __getitem__) as fisher_dataloader"
        )
    else:
        loader, limit = source, None if num_samples is None else -(-num_samples // world)
    if trainer is not None:
        # as the training loop hands batches over: on the device, then in the weights' dtype under "bf16-true"/"16-true"
        transfer = lambda b: trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(b))  # noqa: E731
    else:
        transfer = lambda b: move_data_to_device(b, device)  # noqa: E731
    return (transfer(batch) for batch in limit_samples(loader, limit))


def shard(
    source: DataLoader,
    rank: int,
    world: int,
    num_samples: int | None,
    batch_size: int | None,
    subset_seed: int,
    same_batch_count: bool = False,
) -> DataLoader:
    """This rank's contiguous share of the (sub)sampled indices, in index order."""
    n = len(source.dataset)
    if num_samples is not None and num_samples < n:
        generator = torch.Generator().manual_seed(subset_seed)
        indices = torch.randperm(n, generator=generator)[:num_samples].sort().values.tolist()
    else:
        indices = list(range(n))
    per_rank = -(-len(indices) // world)
    mine = indices[rank * per_rank : (rank + 1) * per_rank]
    batch_size = batch_size or source.batch_size or 128
    loader_args = dict(collate_fn=source.collate_fn, num_workers=source.num_workers, pin_memory=source.pin_memory)
    if not same_batch_count:
        return DataLoader(Subset(source.dataset, mine), batch_size=batch_size, shuffle=False, **loader_args)
    if len(indices) < world:
        raise ValueError(
            f"{len(indices)} samples to estimate the importance on cannot be shared by {world} ranks, each of which "
            "must run the same passes over its sharded model: give it at least as many samples as ranks"
        )
    batches = -(-per_rank // batch_size)  # what the largest share needs; every share splits into as many
    split = torch.tensor_split(torch.arange(len(mine)), batches)
    return DataLoader(Subset(source.dataset, mine), batch_sampler=[b.tolist() for b in split], **loader_args)


# ----------------------------------------------------------------------------------------------------------------------
# Sharded parameters
# ----------------------------------------------------------------------------------------------------------------------
# Strategies that shard parameters without DTensors (flat parameters, ZeRO partitions): EWC would see fragments or
# full-size placeholders, so they are refused by name (both Lightning namespaces) rather than computed wrongly.
UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "FSDP (version 1) flattens parameters",
    "DeepSpeedStrategy": "DeepSpeed ZeRO partitions parameters outside DTensor",
}


def check_strategy(trainer, params: dict[str, Tensor]) -> None:
    """Refuses a strategy whose sharding EWC does not handle, before anything trains."""
    for cls in type(trainer.strategy).__mro__:
        if cls.__name__ in UNSUPPORTED_STRATEGIES:
            raise NotImplementedError(
                f"EWCCallback does not support {type(trainer.strategy).__name__} ({UNSUPPORTED_STRATEGIES[cls.__name__]}):"
                " its state and Fisher would be computed on fragments of the parameters. Use Lightning's "
                "ModelParallelStrategy with torch's fully_shard (FSDP2) in configure_model, or strategy='ddp'"
            )
    world = trainer.world_size
    for name, p in params.items():
        if not isinstance(p, DTensor):
            continue
        mesh = p.device_mesh
        if mesh.ndim != 1 or mesh.size() != world or not all(isinstance(pl, (Shard, Replicate)) for pl in p.placements):
            raise NotImplementedError(
                f"parameter {name!r} is a DTensor on a {mesh.ndim}-D mesh of {mesh.size()} ranks with placements "
                f"{p.placements}; EWCCallback supports data-parallel sharding only (FSDP2 over all {world} ranks, "
                "ModelParallelStrategy(tensor_parallel_size=1)): with tensor parallelism the ranks of a group see the "
                "same data, which the importance pass would count twice"
            )


def local(t: Tensor) -> Tensor:
    """This rank's shard of a sharded tensor (differentiable), the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def reduce_to_shard(full: Tensor, like: DTensor) -> Tensor:
    """Σ over ranks of each rank's full-size ``full``, of which this rank keeps only its shard in ``like``'s layout
    (one reduce-scatter)."""
    mesh = like.device_mesh
    partial = DTensor.from_local(full, mesh, [Partial()] * mesh.ndim, run_check=False, shape=like.shape,
                                 stride=like.stride())
    return partial.redistribute(mesh, like.placements).to_local()


def shard_of(full: Tensor, like: DTensor) -> Tensor:
    """This rank's shard, in ``like``'s layout, of a full-size tensor that every rank holds (no communication)."""
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None).to_local()


def gather_full(shard: Tensor, like: DTensor) -> Tensor:
    """The full-size tensor whose shards the ranks hold, on every rank (an all-gather: call it on every rank)."""
    return DTensor.from_local(shard, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride()).full_tensor()


AGREED = "_raised_on_every_rank"  # set on an exception that every rank raises


def agreeing(trainer) -> Callable[[BaseException | None], None] | None:
    """A per-batch agreement for the importance pass of a sharded model (``accumulate_importance(agree=...)``): each
    rank says whether computing its batch's vectors failed, and if one did every rank raises its error there, before
    the backward passes whose collectives the failed rank would never join."""
    if world_of(trainer) == 1:
        return None
    strategy, rank, world = trainer.strategy, rank_of(trainer), world_of(trainer)

    def agree(error: BaseException | None) -> None:
        status = torch.zeros(world, dtype=torch.int64, device=strategy.root_device)
        if error is not None:
            status[rank] = 1
        failed = strategy.reduce(status, reduce_op="sum").nonzero().flatten().tolist()
        if failed:
            raise_everywhere(strategy, rank, failed[0], error, "computing the importance pass's vectors")

    return agree


def on_every_rank(
    compute: Callable[[], ImportanceSums], trainer, what: str, params: dict[str, Tensor] | None = None
) -> ImportanceSums:
    """``compute()`` on this rank's share, then the sums over ranks, or the first failing rank's error on every rank.
    The sums of sharded ``params`` are full-size from ``compute()`` and come back as this rank's shard.

    Each rank's pass may fail on its own data (a NaN, a label out of range) before the collective that sums the
    ranks' results; a rank that raised there would leave the others waiting in that collective (NCCL) or dying with
    "connection closed by peer" (gloo), neither of which names the cause. So every rank first reports whether it
    failed, with its sample count, in one small collective; then either all raise, or all reduce the sums.
    """
    world = world_of(trainer)
    if world == 1:
        return compute()
    try:
        sums, error = compute(), None
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        if getattr(err, AGREED, False):  # every rank raised it already (a per-batch agreement)
            raise
        sums, error = None, err
    strategy, rank = trainer.strategy, rank_of(trainer)
    status = torch.zeros(world + 1, dtype=torch.int64, device=strategy.root_device)
    if error is not None:
        status[rank] = 1
    else:
        status[world] = sums.count
    status = strategy.reduce(status, reduce_op="sum")
    failed = status[:world].nonzero().flatten().tolist()
    if failed:
        raise_everywhere(strategy, rank, failed[0], error, what)
    return _sum_over_ranks(sums, int(status[world]), strategy, params or {})


def raise_everywhere(strategy, rank: int, source: int, error: BaseException | None, what: str):
    """Every rank raises rank ``source``'s error: that rank its own exception, the others a copy of it (same type and
    message, where it can be pickled) noting which rank it came from."""
    payload = None
    if rank == source:
        try:
            payload = pickle.dumps(error)
            pickle.loads(payload)  # an exception whose constructor takes other arguments may not round-trip
        except Exception:  # noqa: BLE001
            payload = pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
    payload = strategy.broadcast(payload, src=source)
    if rank == source:
        setattr(error, AGREED, True)
        raise error
    copy = pickle.loads(payload)
    setattr(copy, AGREED, True)
    note = f"(raised on rank {source} while {what}; this is rank {rank}, which stopped with it)"
    if hasattr(copy, "add_note"):
        copy.add_note(note)
        raise copy
    raise RuntimeError(f"{type(copy).__name__}: {copy} {note}") from copy


def _sum_over_ranks(sums: ImportanceSums, count: int, strategy, params: dict[str, Tensor]) -> ImportanceSums:
    """The sums over ranks in their own dtype (float32: not every accelerator has float64): the replicated ones in one
    all-reduce, each sharded one in a reduce-scatter to this rank's shard, unless the pass reduced it already
    (``sums.reduced``)."""
    out = {n: sums.sums[n] for n in sums.reduced}
    out.update({n: reduce_to_shard(t, params[n]) for n, t in sums.sums.items()
                if n not in out and isinstance(params.get(n), DTensor)})
    names = [n for n in sums.sums if n not in out]
    if names:
        flat = strategy.reduce(torch.cat([sums.sums[n].reshape(-1) for n in names]), reduce_op="sum")
        offset = 0
        for n in names:
            t = sums.sums[n]
            out[n] = flat[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
    return ImportanceSums({n: out[n] for n in sums.sums}, count, sums.routes, sums.fused, sums.reduced,
                          sums.peak_full_bytes)
