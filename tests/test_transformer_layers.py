"""The layers of current sequence models on closed-form per-sample routes, against the brute-force float64 loop.

Every model here returns one output per sample ([N, C] logits, a sequence pooled over its positions), and every
parameter must take a closed form (no vmap, no loop) where one exists: nn.MultiheadAttention in its variants, the
Transformer encoder and decoder layers, a Llama-style block (Linear projections on [N, T, D], rotary positions, RMSNorm,
SwiGLU), Hugging Face GPT-2 (Conv1D projections, a position embedding looked up once for the batch, the LM head tied to
the token embedding), and sequence-first models whose Linear layers see [T, N, D].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ewc.fisher import accumulate_importance
from test_fisher import assert_matches, randomize, reference, split

ESTIMATORS = ["exact", "sampled", "empirical", "mas"]
FALLBACK = {"vmap", "loop"}
VOCAB, CLASSES = 11, 3


def tokens_and_labels(n: int = 7, length: int = 5, seed: int = 0, padded: bool = True):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, length), generator=gen)
    if padded:  # trailing padding (token 0) in some samples, never a whole sample
        tokens[::2, -1] = 0
        tokens[1::3, -2:] = 0
    return tokens, torch.randint(0, CLASSES, (n,), generator=gen)


def token_batches(seed: int, padded: bool = True):
    """Seven samples in batches of 4 and 3."""
    return split(*tokens_and_labels(seed=seed, padded=padded), sizes=[4, 3])


def run(model, batches, estimator):
    """The library's mean and routes, with the model's modes, .grad and the global RNG checked to be untouched."""
    model.train()
    modes = {name: m.training for name, m in model.named_modules()}
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 0.25)
    rng = torch.get_rng_state()
    result = accumulate_importance(model, batches, estimator, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(s.requires_grad for s in result.sums.values())  # no graph kept alive by the sums (vmap's too)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(first.grad, torch.full_like(first, 0.25))
    assert all(p.grad is None for p in model.parameters() if p is not first)
    first.grad = None
    return {name: s / result.count for name, s in result.sums.items()}, result.routes


def check(model, batches, estimator, routes=None):
    """The library against the brute-force loop; every route closed-form (or, given ``routes``, exactly those)."""
    want = reference(model, batches, estimator)
    got, taken = run(model, batches, estimator)
    assert_matches(got, want)
    if routes is None:
        assert not set(taken.values()) & FALLBACK, {k: v for k, v in taken.items() if v in FALLBACK}
    else:
        assert taken == routes(model)
    return taken


# ----------------------------------------------------------------------------------------------------------------------
# 1. nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------------------------------
class AttentionNet(nn.Module):
    """Embeddings, one MultiheadAttention and a mean-pooled head. ``source``: self-attention (query = key = value),
    "memory" (cross-attention to a second view of the tokens, key = value) or "separate" (key and value differ, with
    their own kdim/vdim when ``kdim`` is set)."""

    def __init__(
        self,
        batch_first=True,
        bias=True,
        kdim=None,
        source="self",
        padding_mask=True,
        attn_mask=None,
        need_weights=False,
        heads=2,
        dim=8,
    ):
        super().__init__()
        self.batch_first, self.source, self.padding_mask, self.attn_mask = batch_first, source, padding_mask, attn_mask
        self.need_weights, self.heads = need_weights, heads
        self.emb = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.key_emb = nn.Embedding(VOCAB, kdim or dim)
        self.value_emb = nn.Embedding(VOCAB, (kdim + 1) if kdim else dim)
        vdim = (kdim + 1) if kdim else None
        self.attn = nn.MultiheadAttention(dim, heads, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens):  # [N, T]
        t = tokens.shape[1]
        x = self.emb(tokens)
        if self.source == "self":
            q = k = v = x
        elif self.source == "memory":
            q, k = x, torch.tanh(self.key_emb(tokens.flip(1)))
            v = k
        else:
            q, k, v = x, self.key_emb(tokens.flip(1)), self.value_emb(tokens)
        kwargs = {"need_weights": self.need_weights}
        if self.padding_mask:
            kwargs["key_padding_mask"] = tokens.flip(1) == 0 if self.source != "self" else tokens == 0
        if self.attn_mask == "causal_bool":
            kwargs["attn_mask"] = torch.ones(t, t, dtype=torch.bool).triu(1)
        elif self.attn_mask == "per_sample_float":  # [N·H, T, T]: a per-sample additive bias from the tokens
            bias = -0.1 * (tokens.unsqueeze(1) - tokens.unsqueeze(2)).abs().to(x.dtype)
            kwargs["attn_mask"] = bias.repeat_interleave(self.heads, 0)
        if self.padding_mask and self.attn_mask == "per_sample_float":
            kwargs["key_padding_mask"] = kwargs["key_padding_mask"].to(x.dtype) * -1e4
        if not self.batch_first:  # keeping query is key is value (self-attention) and key is value (memory)
            if self.source == "self":
                q = k = v = q.transpose(0, 1)
            elif self.source == "memory":
                q, k = q.transpose(0, 1), k.transpose(0, 1)
                v = k
            else:
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        out, _ = self.attn(q, k, v, **kwargs)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(1))


MHA_CASES = {
    "self_batch_first_padding": {},
    "self_sequence_first_padding": {"batch_first": False},
    "self_no_bias_causal": {"bias": False, "attn_mask": "causal_bool", "padding_mask": False},
    "self_need_weights_causal_padding": {"need_weights": True, "attn_mask": "causal_bool"},
    "self_per_sample_float_mask": {"attn_mask": "per_sample_float", "need_weights": True},
    "memory_sequence_first": {"source": "memory", "batch_first": False},
    "separate_same_dims": {"source": "separate", "bias": False},
    "separate_kdim_vdim": {"source": "separate", "kdim": 6},
    "separate_kdim_vdim_sequence_first": {"source": "separate", "kdim": 6, "batch_first": False, "need_weights": True},
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_matches_brute_force_on_the_attention_route(case, estimator):
    model = randomize(AttentionNet(**MHA_CASES[case]), seed=1, std=0.4)
    routes = check(model, token_batches(2), estimator)
    attn = {name: route for name, route in routes.items() if name.startswith("attn.")}
    own = {"attn.out_proj.weight": "linear"} | (
        {"attn.out_proj.bias": "linear"} if model.attn.out_proj.bias is not None else {}
    )
    projections = (
        ["in_proj_weight"] if model.attn._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    )
    projections += ["in_proj_bias"] if model.attn.in_proj_bias is not None else []
    assert attn == own | {f"attn.{name}": "attention" for name in projections}


def attention_outputs(model: AttentionNet, tokens, need_weights: bool, average: bool, ours: bool):
    """The model's logits and its attention module's (output, weights), through torch's forward or the pass's; with
    the pass's, also the projections it recorded."""
    from lightning_ewc.per_sample.rules.attention import AttentionRule

    recorded = []
    records = {part: (lambda x, out, part=part: recorded.append(part) or out) for part in "qkv"}
    forward = AttentionRule().forward_override(model.attn, records) if ours else model.attn.forward
    outputs = []
    handle = model.attn.register_forward_hook(lambda m, i, o: outputs.append(o))
    model.attn.forward = lambda *a, **k: forward(*a, **{**k, "need_weights": need_weights,
                                                        "average_attn_weights": average})  # fmt: skip
    try:
        logits = model(tokens)
    finally:
        del model.attn.forward
        handle.remove()
    return logits, outputs[0], sorted(recorded)


@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_attention_forward_returns_what_torch_returns(case, need_weights, average):
    # The pass's forward against torch's: logits, attention output, and the averaged or per-head weights.
    model = randomize(AttentionNet(**MHA_CASES[case]), seed=4, std=0.4).eval()
    tokens, _ = tokens_and_labels(seed=3)
    want, (out_want, w_want), _ = attention_outputs(model, tokens, need_weights, average, ours=False)
    got, (out_got, w_got), parts = attention_outputs(model, tokens, need_weights, average, ours=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_got, out_want, rtol=1e-10, atol=1e-12)
    assert (w_want is None) == (w_got is None) == (not need_weights)
    if need_weights:
        torch.testing.assert_close(w_got, w_want, rtol=1e-10, atol=1e-12)
    assert parts == ["k", "q", "v"]


class BiasKVNet(AttentionNet):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching")
@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_attention_with_bias_kv_keeps_the_exact_fallback_for_its_weights(estimator):
    # add_bias_kv is not covered: all of the module's weights (out_proj too, which torch uses through F.linear) go to
    # vmap, the rest of the model stays on its closed forms.
    model = randomize(BiasKVNet(), seed=5, std=0.4)
    routes = check(
        model,
        token_batches(6),
        estimator,
        routes=lambda m: {
            name: "vmap" if name.startswith("attn.") else ("embedding" if "emb" in name else "linear")
            for name, _ in m.named_parameters()
        },
    )
    assert routes["attn.bias_k"] == routes["attn.out_proj.weight"] == "vmap"


# ----------------------------------------------------------------------------------------------------------------------
# 2. Transformer encoder and decoder layers
# ----------------------------------------------------------------------------------------------------------------------
class EncoderDecoderNet(nn.Module):
    """Token and learned position embeddings (positions looked up once for the batch), an encoder layer over the
    padded tokens, a decoder layer over the first positions with a causal mask and cross-attention to the encoder,
    mean-pooled into a Linear head."""

    def __init__(self, batch_first=True, norm_first=False, activation="relu", decoder=True, dim=8):
        super().__init__()
        self.batch_first, self.decoder = batch_first, decoder
        self.emb, self.pos = nn.Embedding(VOCAB, dim, padding_idx=0), nn.Embedding(8, dim)
        layer = {"nhead": 2, "dim_feedforward": 12, "dropout": 0.1, "activation": activation,
                 "batch_first": batch_first, "norm_first": norm_first}  # fmt: skip
        self.encoder = nn.TransformerEncoderLayer(dim, **layer)
        self.dec = nn.TransformerDecoderLayer(dim, **layer) if decoder else None
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.emb(tokens) + self.pos(torch.arange(t))
        padding = tokens == 0
        if not self.batch_first:
            x = x.transpose(0, 1)
        h = self.encoder(x, src_key_padding_mask=padding)
        if self.decoder:
            tgt = x[:, :3] if self.batch_first else x[:3]
            causal = nn.Transformer.generate_square_subsequent_mask(3, dtype=x.dtype)
            h = self.dec(tgt, h, tgt_mask=causal, memory_key_padding_mask=padding, tgt_is_causal=True)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


LAYER_CASES = {
    "post_norm_relu_batch_first": {},
    "pre_norm_gelu_batch_first": {"norm_first": True, "activation": "gelu"},
    "post_norm_gelu_sequence_first": {"batch_first": False, "activation": "gelu"},
    "pre_norm_relu_sequence_first": {"batch_first": False, "norm_first": True},
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_transformer_encoder_and_decoder_layers_match_brute_force(case, estimator):
    model = randomize(EncoderDecoderNet(**LAYER_CASES[case]), seed=7, std=0.3)
    routes = check(model, token_batches(8), estimator)
    assert routes["pos.weight"] == "embedding"  # looked up once for the batch: per-sample copies of its output
    assert {routes[f"{block}.{attn}.in_proj_weight"] for block, attn in
            [("encoder", "self_attn"), ("dec", "self_attn"), ("dec", "multihead_attn")]} == {"attention"}  # fmt: skip
    assert routes["dec.norm3.weight"] == "layernorm" and routes["encoder.linear2.weight"] == "linear"


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen_encoder"])
def test_transformer_encoder_fast_path_with_nested_tensors(frozen):
    # In eval mode, TransformerEncoder runs torch's fused layers on nested tensors (padded positions come out as
    # zeros) when nothing it computes needs grad. The pass differentiates with grad, so a trainable encoder takes the
    # regular path there, as the brute force does; a frozen one (behind a frozen embedding) takes the fused path in
    # both, and only the head is estimated.
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
            layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
            self.head = nn.Linear(8, CLASSES)

        def forward(self, tokens):
            return self.head(self.encoder(self.emb(tokens), src_key_padding_mask=tokens == 0).mean(1))

    model = randomize(Stack(), seed=9, std=0.3)
    if frozen:
        model.emb.requires_grad_(False)
        model.encoder.requires_grad_(False)
    routes = check(model, token_batches(10), "exact")
    assert len(routes) == (2 if frozen else 2 + 1 + 2 * 12)


class AppViT(nn.Module):
    """The app's ViT (model=vit) with a Linear head: 4x4 patches of a 10x10 image, padded to 12x12 (9 patches)."""

    def __init__(self):
        super().__init__()
        from lightning_ewc.app.models import ViT

        self.backbone = ViT((1, 10, 10), patch_size=4, dim=8, depth=2, heads=2)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_the_apps_vit_matches_brute_force_on_closed_form_routes(estimator):
    model = randomize(AppViT(), seed=11, std=0.3)
    gen = torch.Generator().manual_seed(12)
    images = torch.rand(7, 1, 10, 10, generator=gen, dtype=torch.float64)
    routes = check(model, split(images, torch.randint(0, CLASSES, (7,), generator=gen), sizes=[4, 3]), estimator)
    assert routes["backbone.patches.weight"] == "conv" and routes["backbone.positions.weight"] == "embedding"
    assert routes["backbone.encoder.layers.0.self_attn.in_proj_weight"] == "attention"
    assert routes["backbone.encoder.layers.1.norm1.weight"] == "layernorm"


# ----------------------------------------------------------------------------------------------------------------------
# 3. Llama-style blocks: Linear projections on [N, T, D], rotary positions, RMSNorm, SwiGLU
# ----------------------------------------------------------------------------------------------------------------------
def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of [N, H, T, d] (pairs of channels rotated by position-dependent angles)."""
    t, d = x.shape[-2], x.shape[-1]
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    angle = torch.arange(t, dtype=x.dtype)[:, None] * freq[None, :]
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)
    pairs = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
    return x * cos + pairs * sin


class LlamaBlock(nn.Module):
    def __init__(self, dim=8, heads=2, hidden=12):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim, eps=1e-5)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):  # [N, T, D]
        n, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(n, t, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(n, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaNet(nn.Module):
    def __init__(self, dim=8, layers=2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, CLASSES, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, -1])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_llama_style_blocks_match_brute_force(estimator):
    model = randomize(LlamaNet(), seed=11, std=0.4)
    routes = check(model, token_batches(12, padded=False), estimator)
    assert routes["blocks.0.attn_norm.weight"] == routes["norm.weight"] == "rmsnorm"
    assert routes["blocks.1.q.weight"] == routes["blocks.1.down.weight"] == "linear"


@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_linear_on_sequences_materialises_bounded_blocks(monkeypatch, estimator):
    # Per-sample gradients of Linear layers on [N, T, D] are materialised, a chunk of samples at a time: with a bound
    # of 200 elements the 8x8 and 12x8 weights go one or two samples at a time, and the result does not change.
    from lightning_ewc.per_sample import limits
    from lightning_ewc.per_sample.rules.linear import LinearRule

    model = randomize(LlamaNet(layers=1), seed=13, std=0.4)
    batches = token_batches(14, padded=False)
    want = reference(model, batches, estimator)
    blocks = []
    per_sample = LinearRule.per_sample

    def recorded(self, module, a, g):
        out = per_sample(self, module, a, g)
        blocks.append((out["weight"].numel(), module.weight.numel()))
        return out

    monkeypatch.setattr(limits, "MAX_BLOCK_ELEMENTS", 200)
    monkeypatch.setattr(LinearRule, "per_sample", recorded)
    got, _ = run(model, batches, estimator)
    assert_matches(got, want)
    assert blocks and all(size <= max(200, one) for size, one in blocks)
    assert any(size > one for size, one in blocks)  # some blocks did hold several samples


def test_rmsnorm_without_eps_and_over_two_dims_matches_brute_force():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = nn.RMSNorm((3, 4)), nn.Linear(12, CLASSES)

        def forward(self, x):  # [N, T, 3, 4]
            return self.head(torch.tanh(self.norm(x)).mean(1).flatten(1))

    model = randomize(Net(), seed=15)
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(7, 2, 3, 4, generator=gen, dtype=torch.float64) * 2 + 1
    batches = split(x, torch.randint(0, CLASSES, (7,), generator=gen), sizes=[4, 3])
    for estimator in ("exact", "mas"):
        assert check(model, batches, estimator)["norm.weight"] == "rmsnorm"


# ----------------------------------------------------------------------------------------------------------------------
# 4. Hugging Face GPT-2: Conv1D projections, positions looked up once, the LM head tied to the token embedding
# ----------------------------------------------------------------------------------------------------------------------
def tiny_gpt2(lm_head: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=8, bos_token_id=None, eos_token_id=None
    )
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config) if lm_head else transformers.GPT2Model(config)


class GPT2Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt2, self.head = tiny_gpt2(lm_head=False), nn.Linear(8, CLASSES)

    def forward(self, tokens):
        return self.head(self.gpt2(input_ids=tokens).last_hidden_state.mean(1))


class GPT2NextToken(nn.Module):
    """The LM's next-token logits at the last position: a [N, V] classifier whose head is the token embedding."""

    def __init__(self):
        super().__init__()
        self.lm = tiny_gpt2(lm_head=True)

    def forward(self, tokens):
        return self.lm(input_ids=tokens).logits[:, -1]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gpt2_conv1d_layers_match_brute_force(estimator):
    model = randomize(GPT2Classifier(), seed=17, std=0.3)
    routes = check(model, token_batches(18, padded=False), estimator)
    assert routes["gpt2.h.0.attn.c_attn.weight"] == routes["gpt2.h.1.mlp.c_proj.bias"] == "conv1d"
    assert routes["gpt2.wpe.weight"] == "embedding"  # position ids [1, T]: per-sample copies of the lookup
    assert routes["gpt2.ln_f.weight"] == "layernorm"


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gpt2_lm_head_tied_to_the_embedding_matches_brute_force(estimator):
    model = randomize(GPT2NextToken(), seed=19, std=0.3)
    assert model.lm.lm_head.weight is model.lm.transformer.wte.weight
    gen = torch.Generator().manual_seed(20)
    tokens = torch.randint(0, VOCAB, (7, 5), generator=gen)
    tokens[:, 1] = tokens[:, 0]  # a repeated token: the embedding rows of a sample add up before the square
    labels = torch.randint(0, VOCAB, (7,), generator=gen)
    routes = check(model, split(tokens, labels, sizes=[4, 3]), estimator)
    assert routes["lm.transformer.wte.weight"] == "embedding+linear"


# ----------------------------------------------------------------------------------------------------------------------
# 5. Embeddings: padding, a tied head, and the functional tie that stays on the fallback
# ----------------------------------------------------------------------------------------------------------------------
class TiedHeadLM(nn.Module):
    """An Embedding and a Linear head sharing one Parameter (``head.weight = emb.weight``), optionally over every
    position (then the head's input is [N, T, D] and its per-sample gradient sums over positions)."""

    def __init__(self, every_position=False, padding_idx=0):
        super().__init__()
        self.every_position = every_position
        self.emb, self.fc = nn.Embedding(VOCAB, 6, padding_idx=padding_idx), nn.Linear(6, 6)
        self.head = nn.Linear(6, VOCAB)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = torch.tanh(self.fc(self.emb(tokens)))
        return self.head(h).mean(1) if self.every_position else self.head(h.mean(1))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("every_position", [False, True], ids=["pooled", "every_position"])
def test_embedding_tied_to_a_linear_head_matches_brute_force(every_position, estimator):
    model = randomize(TiedHeadLM(every_position), seed=21, std=0.4)
    tokens, _ = tokens_and_labels(seed=22)
    tokens[:, 1] = tokens[:, 0]
    labels = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(23))
    routes = check(model, split(tokens, labels, sizes=[4, 3]), estimator)
    assert routes == {"emb.weight": "embedding+linear", "fc.weight": "linear", "fc.bias": "linear",
                      "head.bias": "linear"}  # fmt: skip


def test_tied_weights_through_the_materialised_route_match_brute_force():
    # Two Linear layers sharing a weight: no special form, per-sample gradients added per chunk, then reduced.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, CLASSES)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    model = randomize(Net(), seed=24)
    gen = torch.Generator().manual_seed(25)
    batches = split(torch.randn(7, 4, generator=gen, dtype=torch.float64),
                    torch.randint(0, CLASSES, (7,), generator=gen), sizes=[4, 3])  # fmt: skip
    for estimator in ("exact", "mas"):
        assert check(model, batches, estimator)["a.weight"] == "linear"


class TiedConvs(nn.Module):
    """Two convs sharing a weight, each straight into an eval-mode BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 3)
        self.b.weight = self.a.weight
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.head = nn.Linear(2 * 3 * 16, CLASSES)

    def forward(self, x):  # [N, 2, 6, 6]
        a, b = torch.relu(self.bn_a(self.a(x))), torch.tanh(self.bn_b(self.b(x.flip(-1))))
        return self.head(torch.cat([a, b], 1).flatten(1))


@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_tied_conv_weight_is_not_fused_with_its_batchnorms(estimator):
    # A shared weight adds its modules' per-sample gradients, which needs each conv's own output gradient: the
    # conv -> BatchNorm pairs are computed apart.
    model = randomize(TiedConvs(), seed=3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 2, 6, 6, generator=gen, dtype=torch.float64)
    routes = check(model, split(x, torch.randint(0, CLASSES, (7,), generator=gen), sizes=[4, 3]), estimator)
    assert routes["a.weight"] == "conv" and routes["bn_b.weight"] == "batchnorm"


@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_embedding_padding_row_gets_nothing(estimator):
    model = randomize(TiedHeadLM(), seed=26, std=0.4)
    model.head = nn.Linear(6, VOCAB).double()  # untied: the embedding on its own route
    tokens, _ = tokens_and_labels(seed=27)
    labels = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(28))
    batches = split(tokens, labels, sizes=[4, 3])
    routes = check(model, batches, estimator)
    assert routes["emb.weight"] == "embedding"
    got, _ = run(model, batches, estimator)
    assert torch.count_nonzero(got["emb.weight"][0]) == 0 and torch.count_nonzero(got["emb.weight"][1:]) > 0


# ----------------------------------------------------------------------------------------------------------------------
# 6. Where the samples lie: sequence-first Linear layers, samples merged with positions
# ----------------------------------------------------------------------------------------------------------------------
class SequenceFirst(nn.Module):
    """Linear and LayerNorm on [T, N, D]; with T = N a shape test alone would take T for the samples."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, CLASSES)

    def forward(self, x):  # [N, T, D] in, [T, N, D] inside
        return self.head(self.norm(torch.tanh(self.fc(x.transpose(0, 1)))).mean(0))


class MergedSamples(nn.Module):
    """A Linear on [N·T, D] (samples merged with positions): no dim of its input is the samples'."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, CLASSES)

    def forward(self, x):
        n, t, d = x.shape
        return self.head(torch.tanh(self.fc(x.reshape(n * t, d))).view(n, t, -1).mean(1))


@pytest.mark.parametrize("estimator", ["exact", "mas"])
@pytest.mark.parametrize("positions", [3, 4], ids=["T<N", "T=N"])
def test_sequence_first_layers_take_the_samples_from_dim_1(positions, estimator):
    model = randomize(SequenceFirst(), seed=29)
    gen = torch.Generator().manual_seed(30)
    x = torch.randn(8, positions, 4, generator=gen, dtype=torch.float64)
    batches = split(x, torch.randint(0, CLASSES, (8,), generator=gen), sizes=[4, 4])  # first batch: 4 = T
    routes = check(model, batches, estimator)
    assert routes["fc.weight"] == "linear" and routes["norm.weight"] == "layernorm"


@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_samples_merged_with_positions_go_to_the_exact_fallback(estimator):
    model = randomize(MergedSamples(), seed=31)
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    batches = split(x, torch.randint(0, CLASSES, (7,), generator=gen), sizes=[4, 3])
    check(
        model,
        batches,
        estimator,
        routes=lambda m: {"fc.weight": "vmap", "fc.bias": "vmap", "head.weight": "linear", "head.bias": "linear"},
    )


def test_rotary_helper_rotates_pairs():
    # The test model's rotary embedding keeps norms per pair of channels (a rotation), so the Llama test exercises it.
    x = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    y = rotary(x)

    def pair_norms(t):
        return t.view(*t.shape[:-1], -1, 2).norm(dim=-1)

    torch.testing.assert_close(pair_norms(y), pair_norms(x))
    assert not torch.allclose(y[..., 1:, :], x[..., 1:, :])
    assert math.isclose(float((y[..., 0, :] - x[..., 0, :]).abs().max()), 0.0, abs_tol=1e-12)
