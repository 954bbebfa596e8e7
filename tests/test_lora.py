"""Adapters (peft's LoRA, DoRA, IA³) on Hugging Face causal LMs built from configs: EWC consolidates the trainable
adapter weights only, and every per-sample estimator on the wrapped model equals a float64 loop over samples (and, for
``exact``, over positions and classes).

The batches are what a causal-LM fine-tune feeds ``model(**batch)``: ``input_ids``, ``attention_mask`` and Hugging
Face's unshifted ``labels`` (-100 on the prompt and the padding); the EWC targets are those labels shifted left by one,
so that position t is scored on the token at t + 1, as the model's own loss does.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import make_trainer
from peft import IA3Config, LoraConfig, get_peft_model
from test_fisher import eval_mode
from test_sequence_fisher import assert_matches
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_ewc import EWCCallback, EWCMixin, estimate_fisher
from lightning_ewc.fisher import IGNORE_INDEX, accumulate_importance

# transformers 5 deprecates a method peft still calls when wrapping a model; not ours to act on
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

VOCAB, T, PROMPT, PAD = 16, 7, 2, 0
FALLBACK_ROUTES = {"vmap", "loop"}  # the routes that compute per-sample gradients; a layer rule names its own


# ----------------------------------------------------------------------------------------------------------------------
# Models and batches
# ----------------------------------------------------------------------------------------------------------------------
def tiny_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
    )
    config._attn_implementation = "eager"  # the reference loop and the library run the same attention code
    return LlamaForCausalLM(config)


def tiny_gpt2() -> nn.Module:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=None,
                        eos_token_id=None, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


# name -> (base model, adapter config). LoRA's A and B are nn.Linear layers (also around GPT-2's Conv1D, whose weight
# is transposed: peft sets fan_in_fan_out); LoRA on an embedding, IA³ and DoRA's magnitudes are bare parameters.
ADAPTERS = {
    "lora-llama-attention": (
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]),
    ),
    "lora-gpt2-conv1d": (
        tiny_gpt2,
        lambda: LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"]),
    ),
    "lora-llama-embedding-mlp": (
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "up_proj", "down_proj"]),
    ),
    "ia3-llama": (
        tiny_llama,
        lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    ),
    # DoRA also calls lora_A and lora_B on torch.eye(in_features) to form its weight norm: a call without a dimension
    # of samples, so their per-sample gradients cannot come from the Linear closed form
    "dora-llama": (
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    ),
}
CLOSED_FORM_FACTORS = {"lora-llama-attention", "lora-gpt2-conv1d", "lora-llama-embedding-mlp"}


def adapted(name: str, seed: int = 0) -> nn.Module:
    """The adapter-wrapped model in float64 with every weight random (the base as if pretrained, the adapters as if
    trained: peft starts LoRA's B at zero, where A's Fisher is zero too), in train mode so that the pass must switch
    dropout off and back."""
    make_base, make_config = ADAPTERS[name]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that it switched fan_in_fan_out on for Conv1D
        model = get_peft_model(make_base(), make_config())
    model.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            # norm and IA³ scales around 1, everything else around 0
            p.copy_(1 + 0.3 * noise if ("norm" in pname or "ln_" in pname or "ia3_" in pname) else 0.4 * noise)
    return model.train()


def is_lora_factor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def lm_batches(seed: int = 1, n: int = 6, sizes=(4, 2), length: int = T) -> list[dict]:
    """Sequences right-padded to ``length`` tokens (attention mask 0, label -100), the first PROMPT tokens a prompt
    (-100); one sample is all prompt and padding but for one predicted token."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (n, length), generator=gen)
    lengths = torch.randint(PROMPT + 1, length + 1, (n,), generator=gen)
    lengths[0] = PROMPT + 1
    padding = torch.arange(length)[None, :] >= lengths[:, None]
    input_ids[padding] = PAD
    labels = input_ids.masked_fill(padding, IGNORE_INDEX)
    labels[:, :PROMPT] = IGNORE_INDEX
    rows = {"input_ids": input_ids, "attention_mask": (~padding).long(), "labels": labels}
    batches, start = [], 0
    for size in sizes:
        batches.append({k: v[start : start + size] for k, v in rows.items()})
        start += size
    return batches


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's labels shifted left: the label of position t is the token at t + 1 (-100 after the last)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1)


def targets_of(batch: dict) -> torch.Tensor:
    return next_token_labels(batch["labels"])


# ----------------------------------------------------------------------------------------------------------------------
# Reference: one sample at a time, one position and class at a time for exact, float64
# ----------------------------------------------------------------------------------------------------------------------
def drawn_labels(model, batches, seed=0) -> list[torch.Tensor]:
    """The labels 'sampled' draws: per batch, from the float32 softmax at every position, with its own generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            p = torch.softmax(logits_of(model, batch).float(), -1)
            out.append(torch.multinomial(p.reshape(-1, VOCAB), 1, generator=gen).reshape(p.shape[:-1]))
    return out


def brute_force(model, batches, estimator, drawn=None) -> dict[str, torch.Tensor]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in named}
    count = 0
    with eval_mode(model):
        for b, batch in enumerate(batches):
            labels = targets_of(batch)
            for i in range(labels.shape[0]):
                sample = {k: v[i : i + 1] for k, v in batch.items()}
                z = logits_of(model, sample).double()[0]  # [T, V]
                kept = [t for t in range(labels.shape[1]) if labels[i, t] != IGNORE_INDEX]
                logp = torch.log_softmax(z, -1)
                if estimator == "exact":
                    terms = [(logp[t, c].exp().item(), logp[t, c]) for t in kept for c in range(VOCAB)]
                elif estimator == "mas":
                    terms = [(1.0, (z[kept] ** 2).sum())]
                else:
                    y = labels[i] if estimator == "empirical" else drawn[b][i]
                    terms = [(1.0, sum(logp[t, int(y[t])] for t in kept))]
                for weight, objective in terms:
                    grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
                    for (name, _), g in zip(named, grads):
                        if g is not None:
                            total[name] += weight * (g.abs() if estimator == "mas" else g.square())
                count += 1
    return {name: t / count for name, t in total.items()}


# ----------------------------------------------------------------------------------------------------------------------
# The estimators on adapter-wrapped models
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical", "mas"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_estimators_on_adapters_match_the_brute_force_loop(adapter, estimator):
    model = adapted(adapter, seed=3)
    batches = lm_batches()
    drawn = drawn_labels(model, batches) if estimator == "sampled" else None
    want = brute_force(model, batches, estimator, drawn)

    trainable = adapter_names(model)
    base = [p for p in model.parameters() if not p.requires_grad]
    base_before = [p.detach().clone() for p in base]
    sentinel = {name: torch.full_like(p, 0.25) for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        p.grad = sentinel.get(name)
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()

    result = accumulate_importance(model, batches, estimator, logits_fn=lambda b: logits_of(model, b),
                                   targets_fn=targets_of, generator=torch.Generator().manual_seed(0))
    got = {name: s / result.count for name, s in result.sums.items()}

    assert set(got) == trainable and result.count == 6  # the adapters and nothing of the frozen base
    assert_matches(got, want)
    # LoRA's A and B around a Linear or a Conv1D are nn.Linear layers: a closed form, no per-sample gradients.
    # Bare parameters (LoRA's embedding factors, IA³'s scales, DoRA's magnitudes) and DoRA's factors take vmap; none
    # may fall back to the loop.
    for name, route in result.routes.items():
        closed_form = adapter in CLOSED_FORM_FACTORS and is_lora_factor(name)
        assert route != "loop" and (route not in FALLBACK_ROUTES or not closed_form), (name, route)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is sentinel.get(name) for name, p in model.named_parameters())
    assert all(torch.equal(p.grad, sentinel[name]) for name, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, q) for p, q in zip(base, base_before))
    assert torch.equal(torch.get_rng_state(), rng)


def test_estimate_fisher_on_an_adapter_model_names_only_the_adapters():
    """The plain function too: every trainable parameter by default, which on a peft model are the adapters."""
    model = adapted("lora-llama-attention", seed=4)
    got = estimate_fisher(model, lm_batches(), "sampled", logits_fn=lambda b: logits_of(model, b))
    assert set(got) == adapter_names(model)
    assert all(is_lora_factor(name) for name in got)
    assert all(float(f.abs().max()) > 0 for f in got.values())


@pytest.mark.parametrize("n, length", [(4, 8), (32, T)], ids=["4x8-positions", "32-samples"])
def test_doras_identity_call_is_not_taken_for_samples(n, length):
    """Batches shaped so that DoRA's torch.eye(32) call could pass for samples: 4 × 8 positions, whose rows regroup
    into 32, and 32 samples, as many as the identity has rows. Summed gradients are the same either way; only the
    per-sample ones tell."""
    model = adapted("dora-llama", seed=5)
    batches = lm_batches(n=n, sizes=(n,), length=length)
    want = brute_force(model, batches, "empirical")
    result = accumulate_importance(model, batches, "empirical", logits_fn=lambda b: logits_of(model, b),
                                   targets_fn=targets_of)
    assert_matches({name: s / result.count for name, s in result.sums.items()}, want)
    assert "loop" not in result.routes.values()


# ----------------------------------------------------------------------------------------------------------------------
# Two tasks through a real Trainer
# ----------------------------------------------------------------------------------------------------------------------
class Rows(Dataset):
    """A map-style dataset of dict rows, collated by the default collate into dicts of batched tensors."""

    def __init__(self, rows: dict[str, torch.Tensor]):
        self.rows = rows

    def __len__(self):
        return next(iter(self.rows.values())).shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.rows.items()}


def task_rows(step: int, n: int = 24, seed: int = 0) -> Rows:
    """Counting by ``step`` mod VOCAB from a random start, a prompt of PROMPT tokens, random lengths (padded)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (n, 1), generator=gen)
    input_ids = (start + step * torch.arange(T)) % (VOCAB - 1) + 1  # tokens 1..VOCAB-1, PAD kept for padding
    lengths = torch.randint(PROMPT + 2, T + 1, (n,), generator=gen)
    padding = torch.arange(T)[None, :] >= lengths[:, None]
    input_ids = input_ids.masked_fill(padding, PAD)
    labels = input_ids.masked_fill(padding, IGNORE_INDEX)
    labels[:, :PROMPT] = IGNORE_INDEX
    return Rows({"input_ids": input_ids, "attention_mask": (~padding).long(), "labels": labels})


class LoRALM(EWCMixin, L.LightningModule):
    """A peft-wrapped causal LM: the loss is the model's own (it shifts the labels), EWC sees the per-position
    logits [N, T, V] and the shifted labels."""

    def __init__(self, model: nn.Module, lr: float = 1e-2):
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def ewc_logits(self, batch):
        return self(batch["input_ids"], batch["attention_mask"])

    def ewc_targets(self, batch):
        return next_token_labels(batch["labels"])

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def lora_module(seed: int = 0) -> LoRALM:
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return LoRALM(model)


def fit_two_tasks(ewc_lambda: float, penalty_via: str, steps: int = 8):
    """Task A (count up) then task B (count down) on one set of LoRA adapters; returns the module, the callback, the
    base weights before training and the adapter weights after A."""
    module = lora_module()
    base_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    callback = EWCCallback(ewc_lambda=ewc_lambda, fisher="sampled", penalty_via=penalty_via)
    data_a, data_b = task_rows(+1, seed=1), task_rows(-1, seed=2)
    torch.manual_seed(10)
    make_trainer(max_steps=steps, callbacks=[callback]).fit(module, DataLoader(data_a, batch_size=8, shuffle=True))
    after_a = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    torch.manual_seed(11)
    make_trainer(max_steps=steps, callbacks=[callback]).fit(module, DataLoader(data_b, batch_size=8, shuffle=True))
    return module, callback, base_before, after_a, data_a


@pytest.mark.parametrize("penalty_via", ["loss", "gradient"])
def test_two_tasks_through_a_trainer_consolidate_only_the_adapters(penalty_via):
    module, callback, base_before, _, data_a = fit_two_tasks(ewc_lambda=50.0, penalty_via=penalty_via)
    trainable = adapter_names(module)
    assert trainable and all(is_lora_factor(n) for n in trainable)
    assert callback.num_tasks == 2 and callback.last_estimate.count == len(data_a)
    assert not set(callback.last_estimate.routes.values()) & FALLBACK_ROUTES

    # the state: an importance and a centre for each adapter tensor, nothing for the frozen base
    importance, centre = callback.state.importance, callback.state.centre
    assert set(importance) == set(centre) == trainable
    adapter_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    assert callback.num_bytes() == 2 * adapter_bytes
    assert all(float(f.max()) > 0 for f in importance.values())

    # the frozen base never moved and never received a gradient (nor did the penalty give it one)
    for name, p in module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[name]) and p.grad is None, name

    # the penalty is (λ/2) Σ F (θ − c)² over the adapters, plus the constant of the merged springs
    params = dict(module.named_parameters())
    want = 0.5 * callback.ewc_lambda * (
        sum(float((importance[n] * (params[n].detach() - centre[n]).square()).sum()) for n in trainable)
        + callback.state.constant
    )
    got = float(callback.penalty(module).detach())
    assert got == pytest.approx(want, rel=1e-5)
    assert got > 0


def test_the_callbacks_first_importance_is_the_fisher_of_task_a():
    """What the callback held after task A equals estimate_fisher on task A's data at the weights A ended with (the
    callback draws 'sampled' labels from the generator of seed 0 for the first task, in index order)."""
    module = lora_module()
    callback = EWCCallback(ewc_lambda=1.0, fisher="sampled")
    data_a = task_rows(+1, seed=1)
    make_trainer(max_steps=6, callbacks=[callback]).fit(module, DataLoader(data_a, batch_size=8, shuffle=True))
    want = estimate_fisher(module.model, DataLoader(data_a, batch_size=8), "sampled", seed=0,
                           logits_fn=lambda b: logits_of(module.model, b), targets_fn=targets_of)
    assert set(callback.state.importance) == {f"model.{name}" for name in want}
    for name, f in want.items():
        torch.testing.assert_close(callback.state.importance[f"model.{name}"], f, rtol=1e-5, atol=1e-12)


def test_penalty_modes_train_alike_and_the_penalty_holds_task_a():
    """The gradient-side penalty trains like the loss-side one step for step, and against λ = 0 it keeps the adapter
    weights that mattered for task A nearer where A left them."""
    runs = {via: fit_two_tasks(ewc_lambda=200.0, penalty_via=via) for via in ("loss", "gradient")}
    free = fit_two_tasks(ewc_lambda=0.0, penalty_via="loss")
    final = {via: {n: p.detach() for n, p in run[0].named_parameters() if p.requires_grad} for via, run in runs.items()}
    for name, p in final["loss"].items():
        torch.testing.assert_close(final["gradient"][name], p, rtol=1e-4, atol=1e-6)

    _, callback, _, after_a, _ = runs["loss"]
    importance = callback.state.importance

    def weighted_drift(run):
        params = dict(run[0].named_parameters())
        return sum(float((importance[n] * (params[n].detach() - after_a[n]).square()).sum()) for n in importance)

    assert weighted_drift(runs["loss"]) < 0.5 * weighted_drift(free)
