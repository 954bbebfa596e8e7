"""Shared pieces of the bench scripts: models with their data, timing, and the report line format."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ewc.app.idx import load_idx_dataset
from lightning_ewc.app.models import CNN, MLP


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run, not figures")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (median reported)")
    return p


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def mlp(classes: int = 10) -> nn.Module:
    """The MLP 784-400-400-10 of the targets."""
    backbone = MLP((1, 28, 28), hidden=(400, 400))
    return nn.Sequential(backbone, nn.Linear(backbone.out_features, classes))


def cnn(classes: int = 10) -> nn.Module:
    """The app's small CNN (conv32-conv64 with BatchNorm, 256 hidden) with a 10-way head."""
    backbone = CNN((1, 28, 28))
    return nn.Sequential(backbone, nn.Linear(backbone.out_features, classes))


def vit(classes: int = 10) -> nn.Module:
    """The app's ViT (``model=vit``: 4×4 patches of a 28×28 image as 49 tokens, pre-norm encoder) with a 10-way head."""
    from lightning_ewc.app.models import ViT

    backbone = ViT((1, 28, 28))
    return nn.Sequential(backbone, nn.Linear(backbone.out_features, classes))


class PerPositionHead(nn.Module):
    """A trunk returning [N, T, D] features and one Linear head applied at every position: [N, T, C] logits."""

    def __init__(self, trunk: nn.Module, classes: int) -> None:
        super().__init__()
        self.trunk, self.head = trunk, nn.Linear(trunk.out_features, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(tokens))


# The app's sequence stream as configured by default (conf/stream/sequence_tasks.yaml): prompts of 6 symbols out of 8.
SEQUENCE_LENGTH, SEQUENCE_VOCAB = 6, 8


def causal_lm() -> nn.Module:
    """The app's causal LM (``model=causal_lm``: token and position embeddings, 2 pre-norm encoder layers under a
    causal mask, d 64) with one head over the 8 symbols at every position."""
    from lightning_ewc.app.sequences import CausalTransformer

    stream = _sequence_stream(1)
    trunk = CausalTransformer(stream.input_shape, vocab_size=stream.vocab_size)
    return PerPositionHead(trunk, SEQUENCE_VOCAB)


def _sequence_stream(n: int):
    from lightning_ewc.app.sequences import sequence_tasks

    return sequence_tasks(length=SEQUENCE_LENGTH, vocab=SEQUENCE_VOCAB, train_samples=n, test_samples=1, seed=0)


def sequence_batches(n: int, batch_size: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first task of the app's sequence stream (copy): tokens [N, 2·6 + 1] and labels with -100 outside the
    answer, so a sample's log-likelihood sums its 6 answer tokens."""
    x, y, _ = _sequence_stream(n).tasks[0].train.tensors
    x, y = x.to(device), y.to(device)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def mnist_batches(n: int, batch_size: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = load_idx_dataset("MNIST", train=True)
    x = images[:n].float().div_(255).unsqueeze(1).to(device)
    y = labels[:n].to(device)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


@dataclass(frozen=True)
class BenchModel:
    """A bench model and its data: ``build()`` returns the network, ``batches(n, batch_size, device)`` a list of
    ``(inputs, labels)``. ``positions`` is the number of labelled positions per sample (1 for a classifier; a causal
    LM's answer tokens), so ``exact`` takes ``positions × (classes − 1)`` backward passes."""

    build: Callable[[], nn.Module]
    batches: Callable[[int, int, str], list[tuple[torch.Tensor, torch.Tensor]]]
    classes: int
    positions: int = 1
    default_n: int = 4096  # samples the figures are measured on


MODELS: dict[str, BenchModel] = {
    "mlp": BenchModel(mlp, mnist_batches, 10),
    "cnn": BenchModel(cnn, mnist_batches, 10),
    "vit": BenchModel(vit, mnist_batches, 10, default_n=1024),
    "causal_lm": BenchModel(causal_lm, sequence_batches, SEQUENCE_VOCAB, positions=SEQUENCE_LENGTH, default_n=1024),
}


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Training's loss: cross-entropy over samples, or over the labelled positions of [N, T, C] logits."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    return F.cross_entropy(logits, labels)


def plain_pass(model: nn.Module, batches) -> None:
    """What training costs: forward, the loss, backward into .grad."""
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        task_loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    return statistics.median(_once(fn, device) for _ in range(repeats))


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median wall time of each function, run in turn ``repeats`` times so that machine noise hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_once(fn, device))
    return {name: statistics.median(ts) for name, ts in samples.items()}


def _once(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Report:
    """One line per figure, the ratio last; remembers missed targets for the exit code."""

    def __init__(self) -> None:
        self.missed: list[str] = []

    def line(self, label: str, detail: str, ratio: float, target: str, ok: bool) -> None:
        mark = "ok" if ok else "MISSED"
        print(f"{label:<44} {detail:<44} target {target:<10} {mark:<6} ratio {ratio:.3f}", flush=True)
        if not ok:
            self.missed.append(label)

    def exit(self) -> None:
        if self.missed:
            print(f"missed: {', '.join(self.missed)}", file=sys.stderr)
            sys.exit(1)
