"""FSDP2 for the app's models (``strategy=fsdp`` / ``fsdp_cpu``: Lightning's ModelParallelStrategy): the model shards
itself in ``configure_model``, and a task's end checkpoint, which that strategy writes as a distributed checkpoint
directory, is read back into the sharded model when a run resumes."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

# Modules whose forward calls their children's forward in turn: FSDP2 gathers a unit's parameters when the unit's
# forward runs, so the units are what these hold, not these themselves.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.TransformerEncoder)

# The file beside the shards in which Lightning's ModelParallelStrategy keeps the rest of a checkpoint (callbacks'
# states, loops); lightning.fabric names it in a private constant (_METADATA_FILENAME), so it is spelt out here.
METADATA = "meta.pt"


def shard_blocks(module: L.LightningModule, backbone: nn.Module) -> None:
    """``fully_shard`` on every block of the model (each layer with parameters of the backbone and the heads, found
    through containers), then on the model itself, over the strategy's data-parallel mesh. Nothing without a mesh
    (any strategy but ModelParallelStrategy), nor a second time: the runner's Trainer for each task calls
    ``configure_model`` again on the same, already sharded, model."""
    mesh = module.device_mesh
    if mesh is None or isinstance(module, FSDPModule):
        return
    if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "the app shards its models over data-parallel ranks only (FSDP2): use "
            "ModelParallelStrategy(tensor_parallel_size=1), as strategy=fsdp and strategy=fsdp_cpu do"
        )
    dp_mesh = mesh["data_parallel"]
    for block in blocks(module, backbone):
        fully_shard(block, mesh=dp_mesh)
    fully_shard(module, mesh=dp_mesh)


def blocks(module: nn.Module, backbone: nn.Module) -> list[nn.Module]:
    """The modules with parameters under ``module``, looking inside containers and the backbone wrapper; a module
    that is neither (a Linear, a conv, an attention layer, a transformer layer) is one block with its children,
    since its forward may read their parameters without calling them (attention reads its out_proj's weight)."""
    found = []
    for child in module.children():
        if isinstance(child, CONTAINERS) or child is backbone:
            found += blocks(child, backbone)
        elif any(True for _ in child.parameters()):
            found.append(child)
    return found


def is_distributed_checkpoint(path: Path) -> bool:
    return path.is_dir()


def restore_task_end(path: Path, model: nn.Module, callbacks: list[L.Callback]) -> None:
    """Weights and callback states from a task's end checkpoint, without Lightning's loop and optimizer state: a
    ``torch.save`` file, or the distributed checkpoint directory ModelParallelStrategy writes, whose shards are read
    into the model's own (which must be sharded already: call it inside a fit, see :class:`RestoreTaskEnd`)."""
    if not is_distributed_checkpoint(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["state_dict"])
    else:
        if not isinstance(model, FSDPModule):
            raise RuntimeError(
                f"{path} is a distributed (sharded) checkpoint, written under strategy=fsdp or fsdp_cpu: it loads into "
                "a model sharded the same way, in a run with that strategy (any number of ranks)"
            )
        # Only the weights: the checkpoint also holds the optimizer, which a new task starts afresh without.
        weights = {"state_dict": get_model_state_dict(model)}
        dcp_load(weights, checkpoint_id=str(path))
        set_model_state_dict(model, weights["state_dict"])
        state = torch.load(path / METADATA, map_location="cpu", weights_only=False)
    for callback in callbacks:
        if callback.state_key in state.get("callbacks", {}):
            callback.load_state_dict(state["callbacks"][callback.state_key])


class RestoreTaskEnd(L.Callback):
    """Restores a distributed task-end checkpoint once the strategy has sharded the model, at the start of the first
    fit of a resumed run (before the other callbacks' ``on_train_start``, where EWC cuts its shards of the state)."""

    def __init__(self, path: Path, callbacks: list[L.Callback]) -> None:
        self.path, self.callbacks, self.done = path, callbacks, False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.done:
            restore_task_end(self.path, pl_module, self.callbacks)
            self.done = True
