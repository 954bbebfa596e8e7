"""LoRA fine-tuning of a small causal LM on two tasks in a row, with and without EWC on the adapters.

A Llama-architecture model built from a config (nothing downloaded) is first trained on generic synthetic sequences,
the stand-in for a pretrained base, and frozen. One set of LoRA adapters is then fine-tuned on task A (count up:
each token is the previous + 1) and afterwards on task B (count down: the previous − 1). Both tasks show their
direction in a two-token prompt, so one set of adapters can hold both; without EWC, training on B alone overwrites
what the adapters learnt for A. With EWC the adapters are anchored where A left them, stiff where A's Fisher is large.

    python docs/examples/lora_two_tasks.py            # under a minute on 2 CPU cores
    python docs/examples/lora_two_tasks.py --quick    # fewer steps, for the test suite
    python docs/examples/lora_two_tasks.py --seed 1 --ewc-lambda 30

It prints next-token accuracy (on held-out sequences, the prompt not scored) on task A after task B, and on task B,
for fine-tuning without and with EWC.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings

import lightning.pytorch as L
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_ewc import EWCCallback, EWCMixin

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here": prompt and padding
PAD = 0
VOCAB = 24  # token 0 is padding; sequences use 1..VOCAB-1
LENGTH = 12
PROMPT = 2  # the first tokens are given, not predicted (and left out of the Fisher)


# ----------------------------------------------------------------------------------------------------------------------
# Data: dicts of input_ids, attention_mask and labels, as a Hugging Face causal LM takes them
# ----------------------------------------------------------------------------------------------------------------------
class Sequences(Dataset):
    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        padding = torch.arange(input_ids.shape[1])[None, :] >= lengths[:, None]
        self.input_ids = input_ids.masked_fill(padding, PAD)
        self.attention_mask = (~padding).long()
        self.labels = self.input_ids.masked_fill(padding, IGNORE_INDEX)  # unshifted: the model shifts them
        self.labels[:, :PROMPT] = IGNORE_INDEX

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def progressions(steps: torch.Tensor, generator: torch.Generator) -> Sequences:
    """Each row counts by its step mod VOCAB - 1 over the tokens 1..VOCAB-1 from a random start, padded after a
    random length."""
    n = steps.shape[0]
    start = torch.randint(0, VOCAB - 1, (n, 1), generator=generator)
    input_ids = (start + steps[:, None] * torch.arange(LENGTH)) % (VOCAB - 1) + 1
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=generator)
    return Sequences(input_ids, lengths)


def generic_corpus(n: int, generator: torch.Generator) -> Sequences:
    """The "pretraining" text: progressions with steps ±2..±4, so the base learns to read a step off the context,
    but has never seen ±1."""
    choices = torch.tensor([2, 3, 4, -2, -3, -4])
    return progressions(choices[torch.randint(0, len(choices), (n,), generator=generator)], generator)


def task(step: int, n: int, generator: torch.Generator) -> Sequences:
    return progressions(torch.full((n,), step), generator)


# ----------------------------------------------------------------------------------------------------------------------
# The LightningModule: any Hugging Face causal LM; the EWC variant adds what the importance pass needs
# ----------------------------------------------------------------------------------------------------------------------
class CausalLM(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss  # the model shifts the labels and skips -100

    def configure_optimizers(self):
        # only what is trainable: the adapters once the model is wrapped by peft
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class EWCCausalLM(EWCMixin, CausalLM):
    def ewc_logits(self, batch):
        """Logits at every position, [N, T, V]: the Fisher treats a sequence as one sample whose log-likelihood sums
        its predicted tokens."""
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def ewc_targets(self, batch):
        """The label of position t is the token at t + 1 (the shift the model's own loss makes), -100 after the last
        token and wherever the labels are -100 (prompt, padding): those positions are left out."""
        labels = batch["labels"]
        return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def trainer(steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=list(callbacks), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )


def loader(data: Dataset, seed: int, batch_size: int = 32) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Sequences) -> float:
    """Next-token accuracy over the scored positions (not the prompt, not the padding)."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits[:, :-1]
    model.train(was_training)
    labels = data.labels[:, 1:]
    scored = labels != IGNORE_INDEX
    return (logits.argmax(-1) == labels)[scored].float().mean().item()


def pretrained_base(seed: int, steps: int) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=LENGTH, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
    )
    L.seed_everything(seed, verbose=False)
    base = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    trainer(steps).fit(CausalLM(base, lr=3e-3), loader(generic_corpus(4096, generator), seed))
    return base


def fine_tune_two_tasks(base, data, ewc_lambda: float | None, steps: int, seed: int) -> dict[str, float]:
    """LoRA on a copy of the base; task A then task B. ``ewc_lambda=None``: plain fine-tuning."""
    L.seed_everything(seed, verbose=False)
    # Adapters on the attention and MLP projections of both layers. On the attention projections alone they could not
    # hold both tasks under the penalty (seed 0, 100 steps, lambda 100: 0.83 on A after B, 0.58 on B).
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=projections)
    model = get_peft_model(copy.deepcopy(base), lora)  # freezes the base: only the adapters train
    callbacks = []
    if ewc_lambda is None:
        module = CausalLM(model, lr=3e-3)
    else:
        module = EWCCausalLM(model, lr=3e-3)
        # 'sampled': labels drawn from the model at every predicted position, one backward pass per batch. 'exact'
        # takes one pass per predicted position and vocabulary entry but one: (LENGTH - PROMPT) * (VOCAB - 1) = 230
        # here, and it is refused above lightning_ewc.fisher.MAX_EXACT_PASSES, as with any real vocabulary.
        callbacks = [EWCCallback(ewc_lambda=ewc_lambda, fisher="sampled", num_samples=512, seed=seed)]
    trainer(steps, callbacks).fit(module, loader(data["train_a"], seed))
    after_a = accuracy(model, data["test_a"])
    trainer(steps, callbacks).fit(module, loader(data["train_b"], seed + 1))
    result = {"A after A": after_a, "A after B": accuracy(model, data["test_a"]), "B": accuracy(model, data["test_b"])}
    if callbacks:
        ewc = callbacks[0]
        adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        routes = sorted(set(ewc.last_estimate.routes.values()))
        print(
            f"  EWC holds {ewc.num_bytes()} bytes = 2 x {adapter_bytes} bytes of adapters ({len(ewc.state.importance)} "
            f"tensors, importance and centre; none for the frozen base), Fisher routes {routes}"
        )
    return result


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (the test suite's run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ewc-lambda", type=float, default=100.0)
    args = parser.parse_args(argv)
    # Tensors this small (32 features, 12 tokens) gain nothing from intra-op threads, and on a busy machine the
    # threads' synchronisation made every step many times slower; one thread also keeps the run's numbers fixed.
    torch.set_num_threads(1)
    pretrain_steps, task_steps = (200, 50) if args.quick else (300, 100)

    generator = torch.Generator().manual_seed(args.seed + 100)
    data = {
        "train_a": task(+1, 1024, generator), "train_b": task(-1, 1024, generator),
        "test_a": task(+1, 256, generator), "test_b": task(-1, 256, generator),
    }
    base = pretrained_base(args.seed, pretrain_steps)
    print(f"base (pretrained on steps ±2..±4): task A {accuracy(base, data['test_a']):.3f}, "
          f"task B {accuracy(base, data['test_b']):.3f}")
    results = {}
    for name, ewc_lambda in (("without EWC", None), ("with EWC", args.ewc_lambda)):
        results[name] = fine_tune_two_tasks(base, data, ewc_lambda, task_steps, args.seed)
    print(f"seed {args.seed}, {task_steps} steps per task, lambda {args.ewc_lambda:g}")
    for name, r in results.items():
        print(f"{name:<12}: task A after A {r['A after A']:.3f}, task A after B {r['A after B']:.3f}, "
              f"task B {r['B']:.3f}")
    return results


if __name__ == "__main__":
    # Quiet runs: Lightning's start-up notes, the single-process DataLoader hint, and a transformers deprecation
    # peft triggers when it wraps the model say nothing about this example.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing.*", FutureWarning)
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    main()
