"""Synthetic sequence tasks for a tiny causal language model: copy, reverse, sort, increment, rotate.

A sample is ``[task token, prompt, separator, answer]``: the prompt is ``length`` symbols drawn uniformly from
``0 .. vocab - 1`` and the answer is the task's function of it, of the same length. The model reads the sequence
without its last token (teacher forcing) and is scored on the next token at the positions whose next token is an
answer token; every other position has the label -100 (ignored by ``cross_entropy`` and by EWC's Fisher). Symbols are
token ids ``0 .. vocab - 1``, the separator ``vocab``, the task token of task k ``vocab + 1 + k``; the outputs are
the ``vocab`` symbols only (answers hold nothing else), which keeps the exact Fisher at length·(vocab − 1) backward
passes per batch.

Only the task-incremental scenario makes sense here: the tasks map the same prompt to different answers (copy and
reverse of one prompt differ), so a model that is not told the task cannot do two of them, and there are no
task-specific classes for a class-incremental scenario. The task token tells the model; the heads follow
``model.heads`` as for images (``auto``: one output head per task).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_ewc.app.models import ContinualClassifier, pre_norm_encoder
from lightning_ewc.app.streams import Task, TaskStream

IGNORE_INDEX = -100

# Each maps prompts [N, L] of symbols 0..V-1 to answers [N, L].
SEQUENCE_TASKS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "copy": lambda p, vocab: p.clone(),
    "reverse": lambda p, vocab: p.flip(1),
    "sort": lambda p, vocab: p.sort(dim=1).values,
    "increment": lambda p, vocab: (p + 1) % vocab,  # each symbol replaced by the next, the last by the first
    "rotate": lambda p, vocab: p.roll(-1, dims=1),  # the prompt from its second symbol on, then its first
}
_TRAIN, _TEST = 0, 1


@dataclass
class SequenceStream(TaskStream):
    """A :class:`TaskStream` of token sequences: ``x`` int64 ``[N, T]``, ``y`` int64 ``[N, T]`` (-100 outside the
    answer), ``t`` int64 ``[N]``; ``input_shape`` is ``(T,)`` and ``classes_per_task`` the number of symbols."""

    vocab_size: int = 0  # token ids the model reads: symbols, separator, task tokens
    answer_length: int = 0

    @property
    def separator(self) -> int:
        return self.classes_per_task

    def task_token(self, task: int) -> int:
        return self.classes_per_task + 1 + task


def sequence_tasks(
    *,
    scenario: str = "task",
    tasks: Sequence[str] = ("copy", "reverse", "increment", "sort"),
    length: int = 6,
    vocab: int = 8,
    train_samples: int = 2000,
    test_samples: int = 500,
    seed: int = 0,
) -> SequenceStream:
    """One task per name of ``tasks`` (:data:`SEQUENCE_TASKS`), prompts of ``length`` symbols out of ``vocab``,
    drawn from ``seed``."""
    if scenario != "task":
        raise ValueError(
            f"the sequence stream supports only stream.scenario=task, got {scenario!r}: its tasks give the same "
            "prompt different answers (copy and reverse of one prompt differ), so without the task token no model "
            "can do two of them (domain), and every task answers in the same symbols (no classes of its own for "
            "class)"
        )
    tasks = [str(name) for name in tasks]  # Hydra hands over a ListConfig
    unknown = [name for name in tasks if name not in SEQUENCE_TASKS]
    if not tasks or unknown:
        raise ValueError(f"stream.tasks must name tasks out of {sorted(SEQUENCE_TASKS)}; got {tasks}")
    for name, value, least in (("length", length, 2), ("vocab", vocab, 2), ("train_samples", train_samples, 1),
                               ("test_samples", test_samples, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"stream.{name} must be a whole number >= {least}, got {value!r}")

    def part(k: int, name: str, samples: int, split: int) -> TensorDataset:
        generator = np.random.default_rng([seed, k, split])
        prompts = torch.from_numpy(generator.integers(0, vocab, size=(samples, length)))
        return encode(prompts, SEQUENCE_TASKS[name](prompts, vocab), task=k, vocab=vocab)

    built = [
        Task(part(k, name, train_samples, _TRAIN), part(k, name, test_samples, _TEST), classes=list(range(vocab)))
        for k, name in enumerate(tasks)
    ]
    return SequenceStream(
        "sequence_tasks", scenario, built, input_shape=(2 * length + 1,), classes_per_task=vocab,
        vocab_size=vocab + 1 + len(tasks), answer_length=length,
    )


def encode(prompts: Tensor, answers: Tensor, task: int, vocab: int) -> TensorDataset:
    """``(x, y, t)`` for teacher forcing: x is ``[task token, prompt, separator, answer]`` without its last token,
    ``y[:, i]`` the token after ``x[:, i]`` where that is an answer token, -100 elsewhere."""
    n, length = prompts.shape
    column = torch.ones(n, 1, dtype=torch.long)
    sequence = torch.cat([column * (vocab + 1 + task), prompts, column * vocab, answers], dim=1)
    labels = torch.full((n, 2 * length + 1), IGNORE_INDEX, dtype=torch.long)
    labels[:, length + 1 :] = answers  # position length + 1 is the separator, whose next token is the first answer
    return TensorDataset(sequence[:, :-1].contiguous(), labels, torch.full((n,), task, dtype=torch.long))


class CausalTransformer(nn.Module):
    """A tiny decoder-only language model trunk: token and learned position embeddings, ``depth`` pre-norm
    ``nn.TransformerEncoderLayer`` under a causal mask (position i sees positions 0..i), a final LayerNorm;
    returns ``[N, T, dim]``, one feature vector per position."""

    def __init__(
        self,
        input_shape: Sequence[int],
        vocab_size: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(
                f"CausalTransformer reads token sequences [positions]; the stream gives inputs of shape "
                f"{tuple(input_shape)}"
            )
        (length,) = input_shape
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(length, dim)
        self.encoder = pre_norm_encoder(dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(dim)
        # True above the diagonal: position i may not attend to j > i. Passed with is_causal=True, which torch takes
        # as a hint to use a causal kernel where it has one; the mask itself is what the EWC pass reproduces.
        self.register_buffer("causal_mask", torch.ones(length, length, dtype=torch.bool).triu(1), persistent=False)
        self.out_features = dim

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        h = self.tokens(tokens) + self.positions(torch.arange(length, device=tokens.device))
        return self.norm(self.encoder(h, mask=self.causal_mask[:length, :length], is_causal=True))


class SequenceClassifier(ContinualClassifier):
    """:class:`ContinualClassifier` with heads that act at every position: logits ``[N, T, symbols]``.

    The loss is the cross-entropy over the answer positions (labels -100 elsewhere); ``ewc_logits`` keeps the
    positions apart, ``[N, T, C]``, so that EWC's Fisher is per sequence with the log-likelihood summed over its
    answer tokens. The test accuracy of a task (``last_test_accuracies``) is its answer-token accuracy under teacher
    forcing; ``last_test_exact_match`` is the fraction of answers right in every token, which equals the exact match
    of greedy decoding (the first wrong token under teacher forcing has the right prefix, so greedy decoding goes
    wrong there too).
    """

    takes_tokens = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.scenario != "task":
            raise ValueError(f"SequenceClassifier supports the task scenario only, got {self.scenario!r}")
        self.test_accuracy = nn.ModuleList(
            MulticlassAccuracy(num_classes=self.num_outputs, average="micro", ignore_index=IGNORE_INDEX)
            for _ in range(self.num_tasks)
        )
        self.test_exact_match = nn.ModuleList(MeanMetric() for _ in range(self.num_tasks))
        self.last_test_exact_match: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        loss = nn.functional.cross_entropy(self.logits(x, t).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
        self.log("train/loss", loss, prog_bar=True)
        self.log("step", float(self.logged_steps_before + self.global_step))  # see ContinualClassifier.training_step
        return loss

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x, y, t = batch
        predicted = self.logits(x, t).argmax(-1)
        self.test_accuracy[dataloader_idx].update(predicted, y)
        scored = y != IGNORE_INDEX
        self.test_exact_match[dataloader_idx].update(((predicted == y) | ~scored).all(1).float())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.last_test_exact_match = [float(metric.compute()) for metric in self.test_exact_match]
        for metric in self.test_exact_match:
            metric.reset()
