"""Per-position outputs: logits [N, T, C] with labels [N, T] and -100 where a position is left out.

The reference loops over samples (batch size 1) and, for ``exact``, over positions and classes, in float64: a sample's
log-likelihood is Σ_t m_t log p(y_t|x), the Fisher is the mean over samples of its squared gradient (``empirical``,
``sampled``) or of its expectation Σ_t m_t Σ_c p_tc (∇ log p_tc)² (``exact``).
"""

from __future__ import annotations

import re

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_ewc.fisher as fisher_module
from helpers import make_trainer
from lightning_ewc import EWCCallback, EWCMixin, estimate_fisher
from lightning_ewc.fisher import IGNORE_INDEX, accumulate_importance
from test_fisher import RTOL, eval_mode, randomize, split

VOCAB, CLASSES, T = 11, 4, 6


class Tagger(nn.Module):
    """A token tagger: embedding (padding row 0), a per-token MLP and a 1-D conv over positions, logits per token."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.mix = nn.Conv1d(dim, dim, 3, padding=1)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, CLASSES)

    def forward(self, tokens):  # [N, T] -> [N, T, C]
        h = self.embed(tokens)
        h = h + self.mix(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.tanh(self.hidden(h)))


class TinyCausalLM(nn.Module):
    """Embedding, learned positions (a bare parameter: the vmap route), one causal attention head built from Linear
    layers, a LayerNorm and an LM head: logits over the vocabulary at every position."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.positions = nn.Parameter(torch.zeros(T, dim))
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens) + self.positions[: tokens.shape[1]]
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
        h = h + self.o(torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ self.v(h))
        return self.head(self.norm(h))


def assert_matches(got: dict, ref: dict) -> None:
    """Each tensor within RTOL of its own scale; a tensor whose Fisher is zero in exact arithmetic (the key bias of
    attention: softmax ignores a shift shared by all keys) within RTOL of the largest scale."""
    assert set(got) == set(ref)
    largest = max(r.abs().max().item() for r in ref.values())
    for name, r in ref.items():
        assert got[name].shape == r.shape and torch.isfinite(got[name]).all(), name
        err = (got[name].double() - r).abs().max().item()
        assert err <= RTOL * max(r.abs().max().item(), 1e-9 * largest), f"{name}: max abs error {err:.3e}"


def tagged_batches(seed: int = 0, n: int = 7, sizes=(4, 3)):
    """Tokens with trailing padding (token 0, label -100) of random lengths, one sample fully padded but for one token."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, T), generator=gen)
    labels = torch.randint(0, CLASSES, (n, T), generator=gen)
    lengths = torch.randint(1, T + 1, (n,), generator=gen)
    lengths[0] = 1
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    tokens[pad], labels[pad] = 0, IGNORE_INDEX
    return split(tokens, labels, sizes=list(sizes))


def lm_batches(seed: int = 1, n: int = 6, sizes=(4, 2)):
    """Next-token prediction with teacher forcing: labels are the inputs shifted left; a prompt is left out."""
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.randint(0, VOCAB, (n, T + 1), generator=gen)
    tokens, labels = sequences[:, :-1].clone(), sequences[:, 1:].clone()
    labels[:, :2] = IGNORE_INDEX  # the prompt: not predicted
    return split(tokens, labels, sizes=list(sizes))


def drawn_labels(model, batches, seed=0):
    """The labels 'sampled' draws: per batch, from the softmax at every position, flattened, with its own generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model), torch.no_grad():
        for tokens, _ in batches:
            p = torch.softmax(model(tokens).float(), -1)
            out.append(torch.multinomial(p.reshape(-1, p.shape[-1]).cpu(), 1, generator=gen).reshape(p.shape[:-1]))
    return torch.cat(out)


def brute_force(model, batches, estimator, drawn=None, use_labels=True):
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in named}
    count = 0
    with eval_mode(model):
        for tokens, labels in batches:
            for i in range(tokens.shape[0]):
                z = model(tokens[i : i + 1]).double()[0]  # [T, C]
                keep = labels[i] != IGNORE_INDEX if use_labels else torch.ones(T, dtype=torch.bool)
                logp = torch.log_softmax(z, -1)
                if estimator == "exact":
                    terms = [(logp[t, c].exp().item(), logp[t, c]) for t in range(T) if keep[t] for c in range(z.shape[-1])]
                elif estimator == "mas":
                    terms = [(1.0, (z[keep] ** 2).sum())]
                else:
                    y = labels[i] if estimator == "empirical" else drawn[count]
                    terms = [(1.0, sum(logp[t, int(y[t])] for t in range(T) if keep[t]))]
                for weight, objective in terms:
                    grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
                    for (name, _), g in zip(named, grads):
                        if g is not None:
                            total[name] += weight * (g.double().abs() if estimator == "mas" else g.double().square())
                count += 1
    return {name: t / count for name, t in total.items()}


def library(model, batches, estimator, seed=0):
    if estimator == "mas":
        result = accumulate_importance(model, batches, "mas")
        return {name: s / result.count for name, s in result.sums.items()}
    return estimate_fisher(model, batches, estimator, seed=seed)


class AppCausalLM(nn.Module):
    """The app's causal LM trunk (model=causal_lm: embeddings, pre-norm encoder layers under a causal mask, LayerNorm)
    with one head at every position."""

    def __init__(self, dim: int = 8):
        super().__init__()
        from lightning_ewc.app.sequences import CausalTransformer

        self.trunk = CausalTransformer((T,), vocab_size=VOCAB, dim=dim, depth=2, heads=2)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens):
        return self.head(self.trunk(tokens))


MODELS = {"tagger": (Tagger, tagged_batches), "causal_lm": (TinyCausalLM, lm_batches),
          "app_causal_lm": (AppCausalLM, lm_batches)}


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical", "mas"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_per_position_estimators_match_the_brute_force_loop(model_name, estimator):
    make, batches_of = MODELS[model_name]
    model = randomize(make(), seed=3)
    batches = batches_of()
    drawn = drawn_labels(model, batches) if estimator == "sampled" else None
    want = brute_force(model, batches, estimator, drawn)
    got = library(model, batches, estimator)
    assert_matches(got, want)
    assert all(p.grad is None for p in model.parameters())
    if estimator == "exact":  # the padding row of the tagger's embedding gets nothing
        assert model_name != "tagger" or float(got["embed.weight"][0].abs().max()) == 0.0
    if model_name == "app_causal_lm":  # every parameter on a closed-form route, the attention included
        routes = accumulate_importance(model, batches[:1], estimator).routes
        assert not set(routes.values()) & {"vmap", "loop"}, routes
        assert routes["trunk.encoder.layers.1.self_attn.in_proj_weight"] == "attention"


def test_the_mask_changes_the_estimate():
    """Guards the brute-force comparisons above: with the padding labelled (unmasked) the estimate differs."""
    model = randomize(Tagger(), seed=4)
    batches = tagged_batches()
    unmasked = [(tokens, labels.clamp_min(0)) for tokens, labels in batches]
    for estimator in ("exact", "empirical"):
        masked, full = estimate_fisher(model, batches, estimator), estimate_fisher(model, unmasked, estimator)
        assert any(not torch.allclose(full[k], masked[k]) for k in masked)


@pytest.mark.parametrize("estimator", ["exact", "sampled", "mas"])
def test_without_labels_every_position_counts(estimator):
    model = randomize(TinyCausalLM(), seed=5)
    batches = lm_batches()
    bare = [tokens for tokens, _ in batches]
    drawn = drawn_labels(model, batches) if estimator == "sampled" else None
    want = brute_force(model, batches, estimator, drawn, use_labels=False)
    if estimator == "mas":
        result = accumulate_importance(model, bare, "mas")
        got = {name: s / result.count for name, s in result.sums.items()}
    else:
        got = estimate_fisher(model, bare, estimator)
    assert_matches(got, want)


def test_batched_sums_each_samples_kept_positions_then_squares_the_batch_mean():
    model = randomize(Tagger(), seed=6)
    batches = tagged_batches()
    params = dict(model.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    with eval_mode(model):
        for tokens, labels in batches:
            logp = torch.log_softmax(model(tokens), -1)
            keep = labels != IGNORE_INDEX
            per_sample = (logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep).sum(1)
            for (n, _), g in zip(params.items(), torch.autograd.grad(per_sample.mean(), list(params.values()))):
                want[n] += g.square()
    got = estimate_fisher(model, batches, "batched")
    assert_matches(got, {n: w / len(batches) for n, w in want.items()})


def test_logits_flattened_to_samples_times_positions_are_refused():
    model = randomize(Tagger(), seed=7)
    with pytest.raises(ValueError, match=re.escape("not flattened to [batch·positions, classes]")):
        estimate_fisher(model, tagged_batches(), "sampled", logits_fn=lambda b: model(b[0]).reshape(-1, CLASSES),
                        targets_fn=lambda b: b[1].reshape(-1))


def test_exact_over_a_vocabulary_is_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr(fisher_module, "MAX_EXACT_PASSES", 20)  # the causal LM: 4 predicted positions × 10 = 40
    model = randomize(TinyCausalLM(), seed=8)
    with pytest.raises(ValueError, match=r"4 × 10 = 40 for this batch.*Use fisher='sampled'"):
        estimate_fisher(model, lm_batches(), "exact")


def test_labels_out_of_range_ignoring_the_ignore_index():
    model = randomize(Tagger(), seed=9)
    tokens, labels = tagged_batches()[0]
    bad = labels.clone()
    bad[1, 0] = CLASSES
    with pytest.raises(ValueError, match=r"labels range over \[0, 4\] but the logits have 4 classes \(-100 marks"):
        estimate_fisher(model, [(tokens, bad)], "empirical")


class TaggerModule(EWCMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Tagger(dim=16)

    def forward(self, tokens):
        return self.net(tokens)

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens).transpose(1, 2), labels, ignore_index=IGNORE_INDEX)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_callback_consolidates_a_token_tagger_with_padding():
    torch.manual_seed(0)
    batches = tagged_batches(n=40, sizes=(40,))
    dataset = TensorDataset(*batches[0])
    module, callback = TaggerModule(), EWCCallback(fisher="exact", ewc_lambda=10.0)
    make_trainer(max_steps=5, callbacks=[callback]).fit(module, DataLoader(dataset, batch_size=8, shuffle=True))
    assert callback.num_tasks == 1 and callback.last_estimate.count == 40
    want = estimate_fisher(module.net, DataLoader(dataset, batch_size=16), "exact")
    for name, f in want.items():
        torch.testing.assert_close(callback.state.importance[f"net.{name}"], f, rtol=1e-5, atol=1e-9)
    make_trainer(max_steps=3, callbacks=[callback]).fit(module, DataLoader(dataset, batch_size=8, shuffle=True))
    assert callback.num_tasks == 2
