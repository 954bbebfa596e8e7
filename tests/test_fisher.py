"""estimate_fisher / accumulate_importance against a brute-force reference.

The reference never uses the library's ``v = e_c - p`` formulation: it loops over single samples (batch size 1, model
in eval mode) and asks autograd for the gradient of ``log_softmax(logits)[0, c]`` (or of ``||z||²`` for MAS) with
respect to every parameter, in float64.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ewc.fisher import FISHER_ESTIMATORS, accumulate_importance, estimate_fisher, exact_vectors

RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Brute-force reference
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def sampled_labels(model, batches, logits_fn=None, seed=0) -> torch.Tensor:
    """The labels the 'sampled' estimator draws: per batch in order, from the eval-mode softmax, own generator."""
    logits_fn = logits_fn or (lambda b: model(b[0]))
    g = torch.Generator().manual_seed(seed)
    out = []
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            p = torch.softmax(logits_fn(batch).float(), 1).cpu()
            out.append(torch.multinomial(p, 1, generator=g).squeeze(1))
    return torch.cat(out)


def brute_force(model, batches, estimator, *, logits_fn=None, labels=None) -> dict[str, torch.Tensor]:
    """Mean over single samples of the squared (|.| for 'mas') gradient, one autograd call per sample and class."""
    logits_fn = logits_fn or (lambda b: model(b[0]))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    total = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in named}
    count = 0
    with eval_mode(model):
        for batch in batches:
            for i in range(batch[0].shape[0]):
                single = tuple(t[i : i + 1] for t in batch)
                z = logits_fn(single)
                assert z.shape[0] == 1
                if estimator == "mas":
                    terms = [(1.0, z.double().square().sum())]
                else:
                    logp = torch.log_softmax(z.double(), dim=1)
                    if estimator == "exact":
                        terms = [(logp[0, c].exp().item(), logp[0, c]) for c in range(logp.shape[1])]
                    elif estimator == "empirical":
                        terms = [(1.0, logp[0, int(single[1][0])])]
                    elif estimator == "sampled":
                        terms = [(1.0, logp[0, int(labels[count])])]
                    else:
                        raise AssertionError(estimator)
                for weight, objective in terms:
                    grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
                    for (name, _), g in zip(named, grads):
                        if g is not None:
                            g = g.double()
                            total[name] += weight * (g.abs() if estimator == "mas" else g.square())
                count += 1
    assert count > 0
    return {name: t / count for name, t in total.items()}


def reference(model, batches, estimator, *, logits_fn=None, seed=0):
    labels = sampled_labels(model, batches, logits_fn, seed) if estimator == "sampled" else None
    return brute_force(model, batches, estimator, logits_fn=logits_fn, labels=labels)


def library(model, batches, estimator, **kwargs):
    """estimate_fisher for the Fisher estimators, accumulate_importance(...).sums / count for 'mas'."""
    if estimator == "mas":
        result = accumulate_importance(model, batches, "mas", **kwargs)
        return {name: s / result.count for name, s in result.sums.items()}
    return estimate_fisher(model, batches, estimator, **kwargs)


def assert_matches(got: dict, ref: dict, rtol: float = RTOL):
    assert set(got) == set(ref)
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        scale = r.abs().max().item()
        err = (g.double() - r).abs().max().item()
        assert err <= rtol * scale, f"{name}: max abs error {err:.3e}, reference max {scale:.3e}"


def randomize(model: nn.Module, seed: int, std: float = 0.5) -> nn.Module:
    """Non-trivial parameters (LayerNorm/BatchNorm weights not all 1) and BatchNorm running statistics, float64."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=torch.float64) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model


def split(*tensors, sizes):
    """Batches of the given sizes (a ragged last one included)."""
    out, start = [], 0
    for n in sizes:
        out.append(tuple(t[start : start + n] for t in tensors))
        start += n
    assert start == tensors[0].shape[0]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 1. Estimators on a conv / BatchNorm / dropout / multi-head model, with state restored
# ----------------------------------------------------------------------------------------------------------------------
class ConvMultiHead(nn.Module):
    def __init__(self, classes: int = 3, heads: int = 2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 8),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(8, classes) for _ in range(heads))

    def forward(self, x, head: int = 0):
        return self.heads[head](self.features(x))


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical", "mas"])
def test_estimator_matches_brute_force_and_leaves_model_state_untouched(estimator):
    torch.manual_seed(0)
    model = randomize(ConvMultiHead(), seed=1)
    x = torch.randn(7, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    loader = DataLoader(TensorDataset(x, y), batch_size=3)  # batches of 3, 3, 1
    logits_fn = lambda b: model(b[0], head=1)  # noqa: E731

    ref = reference(model, loader, estimator, logits_fn=logits_fn)

    # Mixed training state, known gradients, and the BatchNorm buffers as they are before the call.
    model.train()
    model.features[3].eval()  # one submodule in eval mode: its own flag must survive too
    modes = {name: m.training for name, m in model.named_modules()}
    bn = model.features[1]
    buffers = {name: b.clone() for name, b in bn.named_buffers()}
    conv_w, head_b = model.features[0].weight, model.heads[1].bias
    conv_w.grad = torch.full_like(conv_w, 0.25)
    head_b.grad = torch.arange(3, dtype=torch.float64)
    expected_grads = {id(conv_w): conv_w.grad.clone(), id(head_b): head_b.grad.clone()}

    got = library(model, loader, estimator, logits_fn=logits_fn)

    # Equal to the eval-mode brute force: dropout was off and BatchNorm used its running statistics.
    assert_matches(got, ref)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert got["heads.1.weight"].abs().max() > 0
    assert torch.count_nonzero(got["heads.0.weight"]) == 0 and torch.count_nonzero(got["heads.0.bias"]) == 0
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, b in bn.named_buffers():
        assert torch.equal(b, buffers[name]), name
    for name, p in model.named_parameters():
        if id(p) in expected_grads:
            assert torch.equal(p.grad, expected_grads[id(p)]), name
        else:
            assert p.grad is None, name
    # Every parameter of this model is on the fast path (ReLU(inplace=True) after BatchNorm must not push BatchNorm
    # off it).
    routes = accumulate_importance(model, loader, "exact", logits_fn=logits_fn).routes
    fused = {"features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"}
    assert routes == {name: "conv+batchnorm" if name in fused else "linear" for name, _ in model.named_parameters()}


def softmax_covariance(z: torch.Tensor) -> torch.Tensor:
    """diag(p) − ppᵀ in float64 with each diagonal entry p_i Σ_{j≠i} p_j, so that 1 − p_i never cancels."""
    p = torch.softmax(z.double(), dim=1)
    others = torch.stack([torch.cat([p[:, :i], p[:, i + 1 :]], 1).sum(1) for i in range(p.shape[1])], 1)
    return torch.diag_embed(p * others) - (p[:, :, None] * p[:, None, :]) * (1 - torch.eye(p.shape[1]))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("classes", [2, 3, 10])
def test_exact_vectors_are_c_minus_1_factors_of_the_softmax_covariance(classes, dtype, tolerance):
    # Flat, peaked and confident rows (1 − p of the top class far below float32's resolution), ties, and rows where
    # the softmax underflows to exact zeros.
    gen = torch.Generator().manual_seed(classes)
    scales = torch.tensor([0.0, 0.1, 3.0, 12.0, 30.0, 3000.0, 30000.0], dtype=torch.float64)[:, None]
    z = torch.randn(7, classes, generator=gen, dtype=torch.float64) * scales
    p = torch.softmax(z.to(dtype), dim=1)
    assert (p == 0).any() and (p[0] == p[0, 0]).all()

    v = exact_vectors(p)

    assert v.shape == (7, classes - 1, classes) and v.dtype == dtype
    assert torch.isfinite(v).all()
    got = torch.einsum("nkc,nkd->ncd", v.double(), v.double())
    want = softmax_covariance(z)
    # Entrywise, relative to √(C_ii C_jj), wherever that is within the dtype's normal range.
    diagonal = want.diagonal(dim1=1, dim2=2)
    scale = (diagonal[:, :, None] * diagonal[:, None, :]).sqrt()
    resolved = scale > 1e3 * torch.finfo(dtype).tiny
    assert resolved.sum() > 7 * classes
    assert ((got - want).abs()[resolved] / scale[resolved]).max() <= tolerance
    assert ((got - want)[~resolved].abs() <= tolerance * want[~resolved].abs() + 1e3 * torch.finfo(dtype).tiny).all()


def test_exact_fisher_of_a_binary_head_matches_brute_force():
    # One backward pass instead of two: the covariance of a 2-class softmax is p0 p1 (e0 - e1)(e0 - e1)ᵀ.
    model = randomize(ConvMultiHead(classes=2), seed=4)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batches = split(x, torch.zeros(5, dtype=torch.long), sizes=[3, 2])
    assert_matches(estimate_fisher(model, batches, "exact"), brute_force(model, batches, "exact"))


def test_sampled_estimator_uses_drawn_labels_not_true_or_argmax_labels():
    # Guard for the test above: the sampled reference differs from the empirical one on this data, so matching it
    # really checks the draw.
    torch.manual_seed(0)
    model = randomize(ConvMultiHead(), seed=1)
    x = torch.randn(7, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    batches = split(x, y, sizes=[3, 3, 1])
    logits_fn = lambda b: model(b[0], head=1)  # noqa: E731
    labels = sampled_labels(model, batches, logits_fn)
    assert not torch.equal(labels, y)
    got = estimate_fisher(model, batches, "sampled", logits_fn=logits_fn)
    empirical = brute_force(model, batches, "empirical", logits_fn=logits_fn)
    assert any((got[k].double() - empirical[k]).abs().max() > 1e-3 * empirical[k].abs().max() for k in got)


def test_batched_is_mean_over_minibatches_of_squared_minibatch_gradient():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)), seed=2)
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    batches = split(x, y, sizes=[4, 4, 2])

    names = [n for n, _ in model.named_parameters()]
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with eval_mode(model):
        for xb, yb in batches:
            objective = torch.log_softmax(model(xb), 1).gather(1, yb[:, None]).mean()
            for n, g in zip(names, torch.autograd.grad(objective, list(model.parameters()))):
                ref[n] += g.square()
    ref = {n: t / len(batches) for n, t in ref.items()}

    model.train()
    got = estimate_fisher(model, batches, "batched")
    assert_matches(got, ref)
    assert model.training
    # Not the per-sample Fisher (that is larger by about the batch size).
    exact = brute_force(model, batches, "empirical")
    assert exact["0.weight"].sum() > 2 * got["0.weight"].sum()


# ----------------------------------------------------------------------------------------------------------------------
# 2. Fast-path (closed-form) layer types
# ----------------------------------------------------------------------------------------------------------------------
class Linear3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # [N, T, D]
        return self.head(torch.tanh(self.fc(x)).sum(1))


class LinearTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(2, 3, 3, padding=1, stride=2), nn.Linear(3 * 4, 3)

    def forward(self, x):  # [N, 2, 8]
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Conv2dStridedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1, bias=False)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):  # [N, 2, 8, 8] -> [N, 3, 3, 3]
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class FirstLayerConvNet(nn.Module):
    """One input channel: 9 patch elements <= 10 output channels, so the per-sample gradients go through unfold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3, stride=2, dilation=2, padding=2)
        self.head = nn.Linear(10 * 3 * 3, 3)

    def forward(self, x):  # [N, 1, 6, 6] -> [N, 10, 3, 3]
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class BatchNorm1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


class LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.head = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):  # [N, T, D]
        return self.head(torch.tanh(self.ln(x)).mean(1))


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn, self.head = nn.GroupNorm(2, 4), nn.Linear(4 * 5, 3)

    def forward(self, x):  # [N, 4, 5]
        return self.head(torch.tanh(self.gn(x)).flatten(1))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 3)

    def forward(self, tokens):  # [N, T]
        return self.head(torch.tanh(self.emb(tokens)).sum(1))


def _tokens(n, gen):
    t = torch.randint(0, 6, (n, 5), generator=gen)
    t[:, 1] = t[:, 0]  # a repeated token in every sample
    t[:, 2] = t[:, 0]
    t[::2, 4] = 0  # padding in some samples
    return t


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.head = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):  # [N, 4, 4, 4]
        return self.head(torch.tanh(self.conv(x)).flatten(1))


TAP_CASES = {
    "conv2d_grouped": (GroupedConvNet, lambda n, g: torch.randn(n, 4, 4, 4, generator=g, dtype=torch.float64)),
    "linear_3d_input": (Linear3D, lambda n, g: torch.randn(n, 3, 4, generator=g, dtype=torch.float64)),
    "linear_called_twice": (LinearTwice, lambda n, g: torch.randn(n, 4, generator=g, dtype=torch.float64)),
    "conv1d": (Conv1dNet, lambda n, g: torch.randn(n, 2, 8, generator=g, dtype=torch.float64)),
    "conv2d_stride_dilation_padding_nobias": (
        Conv2dStridedNet,
        lambda n, g: torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64),
    ),
    "conv2d_first_layer_unfold": (
        FirstLayerConvNet,
        lambda n, g: torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
    ),
    "batchnorm1d": (BatchNorm1dNet, lambda n, g: torch.randn(n, 4, generator=g, dtype=torch.float64)),
    "layernorm_3d": (LayerNormNet, lambda n, g: torch.randn(n, 3, 4, generator=g, dtype=torch.float64) * 2 + 1),
    "groupnorm": (GroupNormNet, lambda n, g: torch.randn(n, 4, 5, generator=g, dtype=torch.float64) * 2 + 1),
    "embedding_padding_repeats": (EmbeddingNet, _tokens),
}


# The closed-form routes each case's parameters take (the head is a Linear).
TAP_ROUTES = {
    "conv2d_grouped": {"conv", "linear"},
    "linear_3d_input": {"linear"},
    "linear_called_twice": {"linear"},
    "conv1d": {"conv", "linear"},
    "conv2d_stride_dilation_padding_nobias": {"conv", "linear"},
    "conv2d_first_layer_unfold": {"conv", "linear"},
    "batchnorm1d": {"batchnorm", "linear"},
    "layernorm_3d": {"layernorm", "linear"},
    "groupnorm": {"groupnorm", "linear"},
    "embedding_padding_repeats": {"embedding", "linear"},
}
FALLBACK_ROUTES = {"vmap", "loop"}


@pytest.mark.parametrize("estimator", ["exact", "mas"])
@pytest.mark.parametrize("case", list(TAP_CASES))
def test_tapped_layer_matches_brute_force_on_tap_route(case, estimator):
    factory, make_x = TAP_CASES[case]
    model = randomize(factory(), seed=3)
    gen = torch.Generator().manual_seed(4)
    x = make_x(7, gen)
    y = torch.randint(0, 3, (7,), generator=gen)
    batches = split(x, y, sizes=[4, 3])

    ref = reference(model, batches, estimator)
    result = accumulate_importance(model, batches, estimator)

    assert result.count == 7
    assert set(result.routes) == {name for name, _ in model.named_parameters()}
    assert set(result.routes.values()) == TAP_ROUTES[case]
    assert_matches({n: s / result.count for n, s in result.sums.items()}, ref)
    if case == "embedding_padding_repeats":
        assert torch.count_nonzero(result.sums["emb.weight"][0]) == 0  # padding row


class ConvBatchNormNet(nn.Module):
    """conv -> eval BatchNorm pairs: a one-channel Conv2d (its per-sample gradients go through unfold, and BatchNorm's
    weight through <W, G>) then ReLU in place, and a Conv1d (BatchNorm's weight through Σ g·z); ``skip`` adds the
    Conv1d's raw output back after its BatchNorm, so that conv's output gradient is not the BatchNorm's alone."""

    def __init__(self, skip: bool = False, freeze_bn: bool = False, conv_bias: bool = False):
        super().__init__()
        self.skip = skip
        self.conv, self.bn = nn.Conv2d(1, 9, 3, padding=1, bias=conv_bias), nn.BatchNorm2d(9)
        self.conv1d, self.bn1d = nn.Conv1d(9, 3, 3, stride=2), nn.BatchNorm1d(3)
        self.head = nn.Linear(3 * 7, 3)
        if freeze_bn:
            self.bn.requires_grad_(False)

    def forward(self, x):  # [N, 1, 4, 4]
        h = torch.relu_(self.bn(self.conv(x))).flatten(2)  # [N, 9, 16]
        z = self.conv1d(h)
        out = self.bn1d(z) + z if self.skip else self.bn1d(z)
        return self.head(torch.tanh(out).flatten(1))


@pytest.mark.parametrize("estimator", ["exact", "mas"])
@pytest.mark.parametrize(
    "variant, fused",
    [
        ({}, [("conv", "bn"), ("conv1d", "bn1d")]),
        ({"conv_bias": True}, [("conv", "bn"), ("conv1d", "bn1d")]),
        # the self-check sees that conv1d's output also feeds the sum, and computes that pair apart
        ({"skip": True}, [("conv", "bn")]),
        # a frozen BatchNorm has no tap: its conv is computed on its own
        ({"freeze_bn": True}, [("conv1d", "bn1d")]),
    ],
)
def test_conv_then_batchnorm_from_batchnorm_output_gradient_matches_brute_force(variant, fused, estimator):
    model = randomize(ConvBatchNormNet(**variant), seed=8)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(7, 1, 4, 4, generator=gen, dtype=torch.float64)
    batches = split(x, torch.randint(0, 3, (7,), generator=gen), sizes=[4, 3])

    ref = reference(model, batches, estimator)
    result = accumulate_importance(model, batches, estimator)

    assert result.fused == fused
    assert not set(result.routes.values()) & FALLBACK_ROUTES
    assert_matches({n: s / result.count for n, s in result.sums.items()}, ref)


@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_small_memory_bounds_split_conv_batches_into_chunks_with_the_same_result(monkeypatch, estimator):
    # Bounds small enough that every conv works on one or two samples at a time and only some unfolded inputs are
    # kept across the exact Fisher's classes: chunking and the cache must not change the result.
    from lightning_ewc.per_sample import limits

    model = randomize(ConvBatchNormNet(), seed=8)
    strided = randomize(Conv2dStridedNet(), seed=3)
    gen = torch.Generator().manual_seed(9)
    cases = [
        (model, torch.randn(7, 1, 4, 4, generator=gen, dtype=torch.float64)),
        (strided, torch.randn(7, 2, 8, 8, generator=gen, dtype=torch.float64)),
    ]
    monkeypatch.setattr(limits, "MAX_BLOCK_ELEMENTS", 200)
    monkeypatch.setattr(limits, "MAX_CACHED_ELEMENTS", 400)
    for net, x in cases:
        batches = split(x, torch.randint(0, 3, (7,), generator=gen), sizes=[4, 3])
        result = accumulate_importance(net, batches, estimator)
        assert not set(result.routes.values()) & FALLBACK_ROUTES
        assert_matches({n: s / result.count for n, s in result.sums.items()}, reference(net, batches, estimator))


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_app_cnn_on_mnist_matches_brute_force_with_both_blocks_fused(mnist_dir, estimator):
    # The app's CNN (conv, BatchNorm, ReLU, max-pool, twice) on real digits: the model the conv routes were built for.
    from lightning_ewc.app.models import CNN
    from lightning_ewc.app.idx import load_idx_dataset

    images, labels = load_idx_dataset("MNIST", train=False, root=mnist_dir)
    backbone = CNN((1, 28, 28), channels=(4, 6), hidden=8)
    model = randomize(nn.Sequential(backbone, nn.Linear(8, 10)), seed=11, std=0.3)
    x = images[:6].double().div(255).unsqueeze(1)
    batches = split(x, labels[:6], sizes=[4, 2])

    result = accumulate_importance(model, batches, estimator)

    assert result.fused == [("0.features.0", "0.features.1"), ("0.features.4", "0.features.5")]
    assert not set(result.routes.values()) & FALLBACK_ROUTES
    assert_matches({n: s / result.count for n, s in result.sums.items()}, reference(model, batches, estimator))


# ----------------------------------------------------------------------------------------------------------------------
# 3. Fallback routes
# ----------------------------------------------------------------------------------------------------------------------
class UntappableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")  # non-zero padding: no tap
        self.prelu = nn.PReLU(4)
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):  # [N, 4, 5, 5]
        h = self.prelu(self.conv(x)) * self.scale.view(1, -1, 1, 1)
        return self.head(h.flatten(1))


class ItemNet(nn.Module):
    """Calls .item() in forward: torch.func.vmap cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc, self.prelu, self.head = nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3)

    def forward(self, x):
        if not torch.isfinite(x).all().item():
            raise ValueError("non-finite input")
        return self.head(self.prelu(self.fc(x)))


@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_untapped_parameters_use_vmap_and_match_brute_force(estimator):
    model = randomize(UntappableNet(), seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(7, 4, 5, 5, generator=gen, dtype=torch.float64)
    batches = split(x, torch.zeros(7, dtype=torch.long), sizes=[4, 3])

    ref = reference(model, batches, estimator)
    result = accumulate_importance(model, batches, estimator)

    assert result.routes == {
        "conv.weight": "vmap",
        "conv.bias": "vmap",
        "prelu.weight": "vmap",
        "scale": "vmap",
        "head.weight": "linear",
        "head.bias": "linear",
    }
    assert_matches({n: s / result.count for n, s in result.sums.items()}, ref)


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_model_calling_item_falls_back_to_loop_and_matches_brute_force(estimator):
    model = randomize(ItemNet(), seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    batches = split(x, y, sizes=[4, 3])

    ref = reference(model, batches, estimator)
    result = accumulate_importance(model, batches, estimator)

    assert result.routes == {
        "fc.weight": "linear",
        "fc.bias": "linear",
        "prelu.weight": "loop",
        "head.weight": "linear",
        "head.bias": "linear",
    }
    assert_matches({n: s / result.count for n, s in result.sums.items()}, ref)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Tied weights
# ----------------------------------------------------------------------------------------------------------------------
class TiedEmbeddingLM(nn.Module):
    def __init__(self, vocab: int = 6, dim: int = 4):
        super().__init__()
        self.emb, self.fc = nn.Embedding(vocab, dim), nn.Linear(dim, dim)

    def forward(self, tokens):
        h = torch.tanh(self.fc(self.emb(tokens).mean(1)))
        return F.linear(h, self.emb.weight)  # output projection tied to the input embedding


@pytest.mark.parametrize("estimator", ["exact", "mas"])
def test_tied_embedding_weight_leaves_tap_route_and_matches_brute_force(estimator):
    model = randomize(TiedEmbeddingLM(), seed=9)
    gen = torch.Generator().manual_seed(10)
    tokens = torch.randint(0, 6, (7, 3), generator=gen)
    batches = split(tokens, torch.zeros(7, dtype=torch.long), sizes=[4, 3])

    ref = reference(model, batches, estimator)
    result = accumulate_importance(model, batches, estimator)

    assert result.routes["emb.weight"] in FALLBACK_ROUTES
    assert result.routes["fc.weight"] == result.routes["fc.bias"] == "linear"
    assert_matches({n: s / result.count for n, s in result.sums.items()}, ref)


# ----------------------------------------------------------------------------------------------------------------------
# 5. num_samples, parameters=, mean
# ----------------------------------------------------------------------------------------------------------------------
def _mlp(seed=11):
    return randomize(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), seed=seed)


def _data(n=12, seed=12):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("estimator", ["exact", "sampled", "empirical"])
def test_num_samples_uses_only_the_first_samples_cutting_inside_a_batch(estimator):
    model = _mlp()
    x, y = _data()
    batches = split(x, y, sizes=[4, 4, 4])

    got = estimate_fisher(model, batches, estimator, num_samples=6)

    assert_matches(got, reference(model, split(x[:6], y[:6], sizes=[4, 2]), estimator))
    full = reference(model, batches, estimator)
    assert any((got[k].double() - full[k]).abs().max() > 1e-3 * full[k].abs().max() for k in got)


def test_parameters_argument_restricts_the_returned_keys():
    model = _mlp()
    x, y = _data()
    batches = split(x, y, sizes=[5, 5, 2])
    full = estimate_fisher(model, batches, "exact")
    some = estimate_fisher(model, batches, "exact", parameters=["2.weight", "0.bias"])
    assert set(full) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(some) == {"2.weight", "0.bias"}
    for k in some:
        torch.testing.assert_close(some[k], full[k], rtol=1e-6, atol=0)


@pytest.mark.parametrize("estimator", ["exact", "empirical", "batched"])
def test_result_is_a_mean_so_repeating_the_data_leaves_it_unchanged(estimator):
    model = _mlp()
    x, y = _data()
    batches = split(x, y, sizes=[4, 4, 4])
    once = estimate_fisher(model, batches, estimator)
    twice = estimate_fisher(model, batches + batches, estimator)
    for k in once:
        torch.testing.assert_close(twice[k], once[k], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 6. Sampled: RNG hygiene and seeding
# ----------------------------------------------------------------------------------------------------------------------
def test_sampled_leaves_global_rng_untouched_and_is_reproducible_per_seed():
    model = _mlp()
    x, y = _data()
    batches = split(x, y, sizes=[5, 5, 2])  # a list, not a DataLoader (whose iterator draws from the global RNG)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = estimate_fisher(model, batches, "sampled", seed=5)
    assert torch.equal(torch.get_rng_state(), state)

    again = estimate_fisher(model, batches, "sampled", seed=5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert_matches(first, reference(model, batches, "sampled", seed=5))

    assert not torch.equal(sampled_labels(model, batches, seed=5), sampled_labels(model, batches, seed=6))
    other = estimate_fisher(model, batches, "sampled", seed=6)
    assert any(not torch.allclose(first[k], other[k]) for k in first)
    assert_matches(other, reference(model, batches, "sampled", seed=6))


# ----------------------------------------------------------------------------------------------------------------------
# 7. Clear errors
# ----------------------------------------------------------------------------------------------------------------------
class _Wrap(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.fc, self.out = nn.Linear(5, 3).double(), out

    def forward(self, x):
        return self.out(self.fc(x))


def _batches():
    x, y = _data(n=6)
    return split(x, y, sizes=[4, 2])


def test_unknown_estimator_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown.*'fisherish'") as err:
        estimate_fisher(_mlp(), _batches(), "fisherish")
    for name in FISHER_ESTIMATORS:
        assert name in str(err.value)


def test_model_returning_a_tuple_points_to_ewc_logits_and_logits_fn():
    model = _Wrap(lambda z: (z, z.detach()))
    with pytest.raises(TypeError, match="ewc_logits.*logits_fn"):
        estimate_fisher(model, _batches(), "exact")


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_logits_without_a_class_dimension_are_rejected(estimator):
    with pytest.raises(ValueError, match=re.escape("[batch, classes]")):
        estimate_fisher(_Wrap(lambda z: z.sum(1)), _batches(), estimator)


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_per_position_labels_must_match_the_logits_positions(estimator):
    """[N, 1, C] logits are per-position outputs; labels [N] do not say which position they label."""
    with pytest.raises(ValueError, match=re.escape("the labels must be shaped (4, 1)")):
        estimate_fisher(_Wrap(lambda z: z.unsqueeze(1)), _batches(), estimator)


def test_empirical_without_labels_is_rejected():
    x, _ = _data(n=6)
    with pytest.raises(ValueError, match="true labels"):
        estimate_fisher(_mlp(), [x[:4], x[4:]], "empirical")
    # exact needs no labels: bare input batches work
    assert set(estimate_fisher(_mlp(), [x[:4], x[4:]], "exact")) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("estimator", ["empirical", "batched"])
def test_labels_out_of_range_are_rejected(estimator):
    x, _ = _data(n=4)
    with pytest.raises(ValueError, match="3 classes"):
        estimate_fisher(_mlp(), [(x, torch.tensor([0, 1, 3, 2]))], estimator)


@pytest.mark.parametrize("estimator", ["exact", "batched"])
def test_empty_dataloader_is_rejected(estimator):
    with pytest.raises(ValueError, match="no samples"):
        estimate_fisher(_mlp(), [], estimator)
    x, y = _data(n=3)
    with pytest.raises(ValueError, match="no samples"):
        estimate_fisher(_mlp(), DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True), estimator)


def test_nan_weight_raises_floating_point_error_naming_the_parameter():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=re.escape("2.weight")):
        estimate_fisher(model, _batches(), "exact")


def test_model_without_trainable_parameters_is_refused():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        estimate_fisher(model, _batches(), "exact")


# ----------------------------------------------------------------------------------------------------------------------
# 8. The caller's grad mode
# ----------------------------------------------------------------------------------------------------------------------
GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enabled": contextlib.nullcontext}


@pytest.mark.parametrize("context", list(GRAD_MODES))
@pytest.mark.parametrize("estimator", FISHER_ESTIMATORS)
def test_estimation_works_inside_no_grad_and_inference_mode(context, estimator):
    """Evaluation code often runs under no_grad or inference_mode; the pass enables autograd for itself, and batches
    created in inference mode are copied (autograd cannot save them)."""
    model = _mlp()
    x, y = _data()
    want = estimate_fisher(model, split(x, y, sizes=[5, 7]), estimator)
    with GRAD_MODES[context]():
        batches = split(x.clone(), y.clone(), sizes=[5, 7])  # made inside the context, as a user's would be
        got = estimate_fisher(model, batches, estimator)
        assert torch.is_grad_enabled() == (context == "enabled")  # the caller's mode is left as it was
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_loop_fallback_works_inside_no_grad_and_inference_mode(context):
    model = randomize(ItemNet(), seed=9)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    batches = split(x, torch.zeros(6, dtype=torch.long), sizes=[3, 3])
    want = reference(model, batches, "exact")
    with GRAD_MODES[context]():
        result = accumulate_importance(model, split(x.clone(), torch.zeros(6, dtype=torch.long), sizes=[3, 3]))
    assert result.routes["prelu.weight"] == "loop"
    assert_matches({n: s / result.count for n, s in result.sums.items()}, want)
