"""The importance pass under FSDP2: full-size sums of one module at a time, reduced to the ranks' shards as soon as they
are complete (``PerSampleAccumulator(reduce_shards=True)``).

Each rank computes a module's per-sample sums at full size from its own samples (the rules need the whole layer's
input and output gradient, which exist only at full size); the sum over ranks of those is what a rank needs, and only
its shard of it. Summing every parameter at full size over the whole pass and reducing once at the end would hold one
float32 copy of the whole model per rank for the pass; reducing each module's sums as soon as they are complete bounds
that to the largest module (and the copy the collective sends), at one reduce-scatter per module per batch (per pass
of the exact Fisher for modules other than a Linear on 2-D inputs: ``PerSampleAccumulator._schedule``) instead of one
per parameter at the end. One per module, not per parameter: a Linear's weight and bias travel in one collective,
which halves the count for the common layers, and per module (not one per batch for all) is what keeps the full-size
part one module large.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Shard


def dim0_sharded(like: DTensor) -> bool:
    """FSDP2's default layout: one mesh dimension, the tensor cut into chunks along dim 0 (``torch.chunk``)."""
    return like.device_mesh.ndim == 1 and tuple(like.placements) == (Shard(0),)


def reduce_to_shards(fulls: list[Tensor], likes: list[DTensor]) -> list[Tensor]:
    """For each full-size ``fulls[i]`` (this rank's), Σ over ranks of it, of which this rank gets its shard in
    ``likes[i]``'s layout. One reduce-scatter for all of them when they are dim-0 sharded on one mesh (FSDP2's default:
    what FSDP2 itself does with gradients), else one per tensor through DTensor. Every rank must call it with the same
    tensors' shapes, in the same order."""
    if not fulls:
        return []
    mesh = likes[0].device_mesh
    if mesh.size() == 1 and all(like.device_mesh == mesh for like in likes):
        return [full.view(like.to_local().shape) for full, like in zip(fulls, likes)]  # one rank holds it all
    if not all(dim0_sharded(like) and like.device_mesh == mesh for like in likes):
        return [_via_dtensor(full, like) for full, like in zip(fulls, likes)]
    world = mesh.size()
    # The send buffer holds, rank by rank, each tensor's dim-0 chunk padded to the largest chunk (ceil(d0 / world)
    # rows, as torch.chunk and DTensor's Shard(0) cut): the layout reduce-scatter hands out in equal pieces.
    chunk_rows = [-(-full.shape[0] // world) if full.dim() else 1 for full in fulls]
    row_numel = [full[0].numel() if full.dim() else 1 for full in fulls]
    per_rank = sum(r * n for r, n in zip(chunk_rows, row_numel))
    send = fulls[0].new_zeros(world, per_rank)
    offset = 0
    for full, rows, numel in zip(fulls, chunk_rows, row_numel):
        flat = full.reshape(full.shape[0] if full.dim() else 1, numel)
        for r in range(world):
            piece = flat[r * rows : (r + 1) * rows]
            send[r, offset : offset + piece.numel()] = piece.reshape(-1)
        offset += rows * numel
    received = send.new_empty(per_rank)
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in 2.13
    reduce_scatter(received, send.reshape(-1), group=mesh.get_group())
    del send
    shards, offset = [], 0
    for full, like, rows, numel in zip(fulls, likes, chunk_rows, row_numel):
        local_shape = like.to_local().shape
        mine = received[offset : offset + rows * numel][: local_shape.numel()]
        shards.append(mine.view(local_shape))
        offset += rows * numel
    return shards


def _via_dtensor(full: Tensor, like: DTensor) -> Tensor:
    mesh = like.device_mesh
    partial = DTensor.from_local(full, mesh, [Partial()] * mesh.ndim, run_check=False, shape=like.shape,
                                 stride=like.stride())
    return partial.redistribute(mesh, like.placements).to_local()


def max_over_ranks(values: list[int], like: DTensor) -> list[int]:
    """Each value's largest over the ranks of ``like``'s mesh (one small all-reduce). The pass's reductions must follow
    the same schedule on every rank: a module called on one rank's batch and not on another's still has its sums
    reduced, and at the same point."""
    if like.device_mesh.size() == 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.int32, device=like.to_local().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=like.device_mesh.get_group())
    return [int(x) for x in t.tolist()]
