"""Backbones and the continual classifier whose heads follow the scenario (hard parameter sharing)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import lightning.pytorch as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ewc import EWCMixin
from lightning_ewc.app.sharding import shard_blocks

HEAD_LAYOUTS = ("auto", "multi", "single")


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks; ``out_features`` is the width of the last block."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (400, 400), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = size
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class CNN(nn.Module):
    """Small conv net: [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] per channel count, then one Linear-ReLU layer."""

    def __init__(
        self, input_shape: Sequence[int], channels: Sequence[int] = (32, 64), hidden: int = 256, dropout: float = 0.0
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels, height, width = out_channels, height // 2, width // 2
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(in_channels * height * width, hidden), nn.ReLU())
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc(self.features(x)))


def pre_norm_encoder(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.TransformerEncoder:
    """``depth`` pre-norm ``nn.TransformerEncoderLayer`` (GELU, batch first): the trunk of the app's transformers,
    whose attention and LayerNorms the EWC importance pass takes on closed-form routes."""
    if dim % heads:
        raise ValueError(
            f"model.backbone.dim ({dim}) must be a multiple of model.backbone.heads ({heads}): each attention head "
            "gets dim / heads features"
        )
    layer = nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=round(mlp_ratio * dim), dropout=dropout, activation="gelu", batch_first=True,
        norm_first=True,
    )
    # Nested tensors only serve padding masks, which these models do not use (and torch warns about them pre-norm).
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ViT(nn.Module):
    """Vision transformer: non-overlapping ``patch_size`` x ``patch_size`` patches as tokens, a learned position
    embedding, ``depth`` pre-norm encoder layers, a final LayerNorm, and the mean over the patches.

    An image side the patch size does not divide is padded with zeros on the right and bottom (28x28 with
    ``patch_size=5`` becomes 30x30): the streams' images already lie on a zero background, so this adds no new kind
    of input. Mean pooling rather than a CLS token: the output then comes from every patch, and every parameter is
    a module's (Conv2d, Embedding, attention, LayerNorm, Linear), so the EWC importance pass takes a closed-form route
    for each instead of vmap for a bare CLS parameter.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"ViT takes images [channels, height, width]; the stream gives inputs of shape {tuple(input_shape)}"
            )
        channels, height, width = (int(s) for s in input_shape)
        if not isinstance(patch_size, int) or not 1 <= patch_size <= min(height, width):
            divisors = [p for p in range(1, min(height, width) + 1) if height % p == 0 and width % p == 0]
            raise ValueError(
                f"model.backbone.patch_size must be a whole number from 1 to {min(height, width)} for "
                f"{height}x{width} images (sizes that tile them without padding: {divisors}); got {patch_size!r}"
            )
        self.patch_size = patch_size
        self.padding = (0, -width % patch_size, 0, -height % patch_size)  # F.pad order: left, right, top, bottom
        self.num_patches = math.ceil(height / patch_size) * math.ceil(width / patch_size)
        self.patches = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.positions = nn.Embedding(self.num_patches, dim)
        self.encoder = pre_norm_encoder(dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim

    def forward(self, x: Tensor) -> Tensor:
        if any(self.padding):
            x = nn.functional.pad(x, self.padding)
        tokens = self.patches(x).flatten(2).transpose(1, 2)  # [N, patches, dim]
        tokens = tokens + self.positions(torch.arange(tokens.shape[1], device=x.device))
        return self.norm(self.encoder(tokens)).mean(1)


def resolve_heads(scenario: str, heads: str) -> str:
    """``auto`` → one head per task for the task scenario, one shared head otherwise; refuses impossible layouts."""
    if heads not in HEAD_LAYOUTS:
        raise ValueError(f"unknown head layout {heads!r}; choose one of {HEAD_LAYOUTS}")
    if heads == "auto":
        return "multi" if scenario == "task" else "single"
    if heads == "multi" and scenario != "task":
        raise ValueError(
            f"task-specific heads need the task identity at test time, which the {scenario!r} scenario does not give; "
            "use model.heads=auto (one shared head) or stream.scenario=task"
        )
    return heads


class ContinualClassifier(EWCMixin, L.LightningModule):
    """A shared backbone ("trunk") with heads laid out for the scenario.

    * task scenario, multi-head: one head of ``classes_per_task`` outputs per task, chosen by the batch's task ids;
    * domain scenario: one head of ``classes_per_task`` outputs;
    * class scenario: one head over all classes, of which only the classes seen so far are active (van de Ven et
      al. 2022), so a task's training cannot push up classes that do not exist yet.

    Batches are ``(x, y, t)``. The EWC importance pass uses the same logits as training (``ewc_logits``).
    """

    ewc_warn_without_callback = False  # fine-tuning, freezing and joint training run without EWC on purpose

    def __init__(
        self,
        backbone: nn.Module,
        scenario: str,
        num_tasks: int,
        classes_per_task: int,
        heads: str = "auto",
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ) -> None:
        super().__init__()
        self.scenario, self.num_tasks, self.classes_per_task = scenario, num_tasks, classes_per_task
        self.head_layout = resolve_heads(scenario, heads)
        self.backbone = backbone
        outputs = num_tasks * classes_per_task if scenario == "class" else classes_per_task
        count = num_tasks if self.head_layout == "multi" else 1
        self.heads = nn.ModuleList(nn.Linear(backbone.out_features, outputs) for _ in range(count))
        self.num_outputs = outputs
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.task = 0
        # Steps trained before this fit (earlier tasks had Trainers of their own): the loggers' step axis starts there.
        self.logged_steps_before = 0
        self.active_classes = outputs if scenario != "class" else classes_per_task
        self.test_accuracy = nn.ModuleList(
            MulticlassAccuracy(num_classes=outputs, average="micro") for _ in range(num_tasks)
        )
        self.last_test_accuracies: list[float] = []

    def set_task(self, task: int) -> None:
        """The task about to be trained: selects the active classes of the class scenario."""
        self.task = task
        if self.scenario == "class":
            self.active_classes = (task + 1) * self.classes_per_task

    def logits(self, x: Tensor, t: Tensor) -> Tensor:
        features = self.backbone(x)
        if self.head_layout == "multi":
            every_head = torch.stack([head(features) for head in self.heads], dim=1)  # [N, heads, C]
            return every_head[torch.arange(len(t), device=t.device), t]
        out = self.heads[0](features)
        return out[:, : self.active_classes] if self.scenario == "class" else out

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.logits(x, t)

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        loss = nn.functional.cross_entropy(self.logits(x, t), y)
        self.log("train/loss", loss, prog_bar=True)
        # A metric named "step" is what Lightning hands the loggers as the step of this row (instead of the Trainer's
        # own count, which restarts with each task's Trainer), so curves run on over the tasks.
        self.log("step", float(self.logged_steps_before + self.global_step))
        return loss

    def ewc_logits(self, batch) -> Tensor:
        x, _, t = batch
        return self.logits(x, t)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y, t = batch
        self.test_accuracy[dataloader_idx].update(self.logits(x, t).argmax(1), y)

    def on_test_epoch_end(self) -> None:
        # One accuracy per test dataloader (= per task); torchmetrics syncs them across DDP ranks.
        self.last_test_accuracies = [float(metric.compute()) for metric in self.test_accuracy]
        for metric in self.test_accuracy:
            metric.reset()

    def configure_model(self) -> None:
        # strategy=fsdp / fsdp_cpu (ModelParallelStrategy): every layer, then the model, sharded over the ranks;
        # nothing under any other strategy, nor when a later task's Trainer calls this again
        shard_blocks(self, self.backbone)

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())
