"""Our diagonal Fisher against the per-sample-gradient libraries: BackPACK, nngeometry, ASDL, Opacus (and curvlinops).

Same samples, models and batch size as fisher_speed.py (bench/_common.py's MODELS: the MLP 784-400-400-10, the app's
CNN and ViT on MNIST, the app's causal LM on its sequence tasks; batch 128), plus transformer_routes.py's encoder
classifier on random tokens. Every variant runs on its own copy of the model (BackPACK's and Opacus' hooks stay on the
copy they extend) and is timed against the others, each round in a fresh shuffled order; the table gives each one's
median as a multiple of one plain forward+backward pass over the same samples. Target (issue 17): per model and
estimator, ours <= 1.0x the fastest peer that computes all of it (exit 1 otherwise); where none does, ours is the only
one.

    exact      ours | BackPACK DiagGGNExact | nngeometry FIM (classif_logits) | ASDL fisher_exact
    sampled    ours | BackPACK DiagGGNMC(mc_samples=1) | nngeometry FIM_MonteCarlo(trials=1) | ASDL fisher_mc
               | Opacus GradSampleModule with labels drawn by the caller
    empirical  ours | BackPACK SumGradSquared | nngeometry's Jacobian backend on log p(y|x) | ASDL fisher_emp
               | Opacus GradSampleModule, per-sample gradients squared and summed
    curvlinops: matrix-vector products only, no diagonal (a cell says so)

--check (small N, no timing) compares values: exact and empirical in float64 against a float64 per-sample loop and
against ours; sampled in float32 draw for draw (the peers draw from torch's global RNG, seeded here as ours seeds its
generator, so their labels are ours); BackPACK's and Opacus' scale factors for mean-reduced losses. It exits non-zero
on a mismatch (a peer's known error, such as ASDL's on the check-only small_maps net, is shown and not counted).
Run: python bench/peers.py [--check] [--quick] [--repeats R] [--models mlp,cnn,encoder] [--device cuda]
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import MODELS, machine, mnist_batches, parser, task_loss
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_ewc import estimate_fisher

ESTIMATORS = ("exact", "sampled", "empirical")
CLASSES = 10  # MNIST digits: exact takes C − 1 = 9 backward passes
SEED = 0
TOLERANCE = 1e-5  # max relative error (max |a − b| / max |b| over each parameter tensor, the worst tensor)
DISTRIBUTIONS = ("backpack-for-pytorch", "nngeometry", "asdfghjkl", "opacus", "curvlinops-for-pytorch")
INSTALL = 'pip install -e ".[bench]" && pip install --no-deps backpack-for-pytorch==1.7.1 nngeometry==0.4 ' \
          "curvlinops-for-pytorch==3.0.1"

Batches = list[tuple[Tensor, Tensor]]
Fisher = dict[str, Tensor]


class NotAvailable(Exception):
    """A table cell without a figure: ``kind`` is "not supported", "no such estimator" or "not installed"."""

    def __init__(self, kind: str, short: str, detail: str = "", partial: Fisher | None = None) -> None:
        super().__init__(f"{kind}: {short}")
        self.kind, self.short, self.detail = kind, short, detail
        self.partial = partial  # what the peer computed for the parameters it does cover, if anything

    @property
    def cell(self) -> str:
        return f"{self.kind}: {self.short}"


# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared by the peers
# ----------------------------------------------------------------------------------------------------------------------
def sample_count(batches: Batches) -> int:
    return sum(len(x) for x, _ in batches)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """nngeometry builds its helper tensors (the Cholesky mask of FIM, the per-sample buffers of conv and BatchNorm
    layers) in the default dtype, not the model's: a float64 model needs float64 as the default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else old)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Prebatched(DataLoader):
    """A DataLoader over ready batches. nngeometry takes only a DataLoader (it reads ``len(sampler)`` for the mean and
    ``batch_size``); iterating yields the same batch tensors the other variants get, without collating samples, and
    without the random base seed a DataLoader iterator draws from the global RNG (which would shift the labels
    FIM_MonteCarlo draws away from ours)."""

    def __init__(self, batches: Batches) -> None:
        super().__init__(range(sample_count(batches)), batch_size=len(batches[0][0]))
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules of the list that no other module of the list contains."""
    return [m for m in modules if not any(o is not m and any(m is sub for sub in o.modules()) for o in modules)]


def require(distribution: str) -> None:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise NotAvailable("not installed", distribution, f"install the peers with: {INSTALL}") from None


def drawn_labels(logits: Tensor, generator: torch.Generator) -> Tensor:
    """Labels drawn from the model as ours draws them (float32 probabilities, one multinomial draw per sample)."""
    p = torch.softmax(logits.detach().float(), dim=-1).cpu()
    return torch.multinomial(p, 1, generator=generator).flatten().to(logits.device)


# ----------------------------------------------------------------------------------------------------------------------
# The variants: each builds its copy of the model and returns a callable that computes the mean diagonal Fisher over
# all samples, {parameter name: tensor} under the model's own names
# ----------------------------------------------------------------------------------------------------------------------
Runner = Callable[[], Fisher]


def ours(model: nn.Module, batches: Batches, estimator: str) -> Runner:
    m = copy.deepcopy(model)
    return lambda: estimate_fisher(m, batches, estimator, seed=SEED)


def plain(model: nn.Module, batches: Batches) -> Callable[[], None]:
    """What training costs: forward, cross-entropy, backward into .grad (as in fisher_speed.py)."""
    m = copy.deepcopy(model)

    def run() -> None:
        for x, y in batches:
            m.zero_grad(set_to_none=True)
            task_loss(m(x), y).backward()

    return run


def backpack_fisher(model: nn.Module, batches: Batches, estimator: str, reduction: str = "sum") -> Runner:
    """BackPACK: DiagGGNExact (the GGN's diagonal, for softmax cross-entropy the exact Fisher), DiagGGNMC with one
    sample (the sampled Fisher), SumGradSquared (Σ over the batch of squared per-sample gradients: the empirical
    Fisher). With reduction="sum" each batch gives the sum over its samples; we add the batches and divide by N. With
    "mean" BackPACK scales each sample's square root of the loss Hessian by 1/√B, so DiagGGN* carry 1/B and
    SumGradSquared 1/B² per batch of B (undone here; the check verifies both)."""
    require("backpack-for-pytorch")
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, SumGradSquared

    make, attr = {
        "exact": (DiagGGNExact, "diag_ggn_exact"),
        "sampled": (lambda: DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
        "empirical": (SumGradSquared, "sum_grad_squared"),
    }[estimator]
    m = copy.deepcopy(model)
    names = {id(p): n for n, p in m.named_parameters()}
    # BackPACK looks its rules up by the module's exact class; a parameterized module without one gets no value (first
    # order) or stops the backward pass (second order). The table names them rather than the error they lead to.
    rules = make()._BackpropExtension__module_extensions  # BackPACK's private map: module class -> rule
    lacking: list[nn.Module] = []
    for module in m.modules():
        inside = any(any(module is sub for sub in outer.modules()) for outer in lacking)
        if not inside and any(True for _ in module.parameters(recurse=False)) and type(module) not in rules:
            lacking.append(module)
    if lacking:
        kinds = ", ".join(sorted({type(module).__name__ for module in lacking}))
        raise NotAvailable("not supported", f"no {type(make()).__name__} for {kinds}",
                           f"BackPACK's {type(make()).__name__} has no rule for {kinds}")
    # Second-order extensions backpropagate through every module, so a container with its own forward (the app's MLP
    # and CNN classes) needs BackPACK's torch.fx converter, which rewrites it as a graph of known modules (sharing
    # the parameters). First-order extensions only need hooks on the parameterized modules.
    try:
        net = extend(m, use_converter=estimator != "empirical")
    except Exception as error:  # the converter's fx trace can fail on control flow
        raise NotAvailable("not supported", f"extend() failed: {type(error).__name__}", str(error)) from error
    loss_fn = extend(nn.CrossEntropyLoss(reduction=reduction))
    n = sample_count(batches)

    def run() -> Fisher:
        torch.manual_seed(SEED)  # DiagGGNMC draws from the global RNG; seeded as ours seeds its generator
        total: dict[int, Tensor] = {}
        for x, y in batches:
            net.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            with backpack(make()):
                loss.backward()
            scale = 1.0 if reduction == "sum" else (len(x) if estimator != "empirical" else len(x) ** 2)
            for p in net.parameters():
                value = getattr(p, attr, None)
                if value is None:
                    owners = [type(mod).__name__ for mod in net.modules() if any(q is p for q in mod.parameters(False))]
                    raise NotAvailable("not supported", f"no {attr} for {', '.join(owners)}",
                                       f"BackPACK computed no {attr} for {names[id(p)]}")
                total[id(p)] = total[id(p)] + scale * value if id(p) in total else scale * value
        return {names[i]: t / n for i, t in total.items()}

    return run


def nngeometry_fisher(model: nn.Module, batches: Batches, estimator: str, device: str,
                      float64_default: bool = True) -> Runner:
    """nngeometry: FIM(variant="classif_logits") with PMatDiag is the exact Fisher in C − 1 backward passes (Tanabe and
    Sagae's Cholesky factor of the softmax covariance), FIM_MonteCarlo(trials=1) the sampled one. It has no empirical
    helper; its Jacobian backend (TorchHooksJacobianBackend) with f(x, y) = log p(y|x) gives the empirical Fisher. All
    divide by the number of samples."""
    require("nngeometry")
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatDiag

    m = copy.deepcopy(model)
    unknown: list[nn.Module] = []
    for module in m.modules():
        inside = any(any(module is sub for sub in outer.modules()) for outer in unknown)
        if not inside and any(True for _ in module.parameters(recurse=False)) and \
                type(module).__name__ not in LayerCollection._known_modules:
            unknown.append(module)
    if unknown:  # from_model raises for a leaf among them and leaves the others' parameters out
        kinds = ", ".join(sorted({type(module).__name__ for module in unknown}))
        raise NotAvailable("not supported", f"no rule for {kinds}",
                           f"nngeometry's LayerCollection knows {', '.join(LayerCollection._known_modules)} (by class "
                           f"name); it raises 'I do not know what to do with layer' for a leaf module of another class "
                           f"and leaves the parameters of a container (MultiheadAttention's in_proj_weight) out")
    layers = LayerCollection.from_model(m)
    loader = Prebatched([(x.clone(), y) for x, y in batches])  # nngeometry sets requires_grad on the inputs
    modules, _ = layers.get_layerid_module_maps(m)
    names = {mod: name for name, mod in m.named_modules()}
    dtype = next(m.parameters()).dtype if float64_default else torch.get_default_dtype()

    def log_likelihood(x: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(m(x), dim=-1).gather(1, y[:, None])

    def run() -> Fisher:
        with default_dtype(dtype):
            if estimator == "exact":
                fim = FIM(m, loader, PMatDiag, variant="classif_logits", device=device, layer_collection=layers)
            elif estimator == "sampled":
                torch.manual_seed(SEED)  # FIM_MonteCarlo draws from the global RNG; seeded as ours seeds its generator
                fim = FIM_MonteCarlo(m, loader, PMatDiag, variant="classif_logits", trials=1, device=device,
                                     layer_collection=layers)
            else:
                backend = TorchHooksJacobianBackend(m, function=log_likelihood, layer_collection=layers)
                fim = PMatDiag(generator=backend, examples=loader)
        flat = fim.get_diag()
        out = {}
        for layer_id in layers.layers:
            module, start = modules[layer_id], layers.p_pos[layer_id]
            for kind in ("weight", "bias"):
                p = getattr(module, kind, None)
                if isinstance(p, Tensor):
                    out[f"{names[module]}.{kind}"] = flat[start : start + p.numel()].view_as(p)
                    start += p.numel()
        missing = [name for name, _ in m.named_parameters() if name not in out]
        if missing:
            raise NotAvailable("not supported", f"{missing[0]} left out", f"nngeometry left out {missing}")
        return out

    return run


def asdl_fisher(model: nn.Module, batches: Batches, estimator: str) -> Runner:
    """ASDL (asdfghjkl): FisherConfig(fisher_shapes=["diag"]) with fisher_exact (C backward passes of √p_c-weighted
    NLL losses, one per class), fisher_mc (one label per sample from torch.distributions.Categorical) or fisher_emp.
    The loss is summed and the Fisher scaled by 1/data_size, so data_size=N gives the mean."""
    require("asdfghjkl")
    import asdl

    if batches[0][1].dim() > 1:
        raise NotAvailable("not supported", "per-position outputs",
                           "ASDL's cross-entropy Fisher takes [N, C] logits with [N] labels (and its Linear "
                           "flattens positions into samples: see the encoder's note)")

    m = copy.deepcopy(model)
    fisher_type = {"exact": asdl.FISHER_EXACT, "sampled": asdl.FISHER_MC, "empirical": asdl.FISHER_EMP}[estimator]
    config = asdl.FisherConfig(fisher_type=fisher_type, fisher_shapes=[asdl.SHAPE_DIAG],
                               loss_type=asdl.LOSS_CROSS_ENTROPY, data_size=sample_count(batches))
    maker = asdl.get_fisher_maker(m, config)

    def run() -> Fisher:
        torch.manual_seed(SEED)  # fisher_mc draws from the global RNG; seeded as ours seeds its generator
        for i, (x, y) in enumerate(batches):
            m.zero_grad(set_to_none=True)
            dummy_logits = maker.setup_model_call(m, x)
            maker.setup_loss_call(F.cross_entropy, dummy_logits, y)
            maker.forward_and_backward(accumulate=i > 0)  # the first batch clears the previous run's sums
        out = {}
        for name, module in m.named_modules():
            fisher = getattr(module, "fisher", None)
            if fisher is None or module is m or fisher.diag is None:
                continue
            for kind in ("weight", "bias"):
                value = getattr(fisher.diag, kind, None)
                if value is not None:
                    out[f"{name}.{kind}"] = value
        missing = [name for name, _ in m.named_parameters() if name not in out]
        if missing:
            modules = dict(m.named_modules())
            owners = outermost([modules[name.rpartition(".")[0]] for name in missing])
            kinds = ", ".join(sorted({type(module).__name__ for module in owners}))
            raise NotAvailable("not supported", f"no diagonal for {kinds}",
                               f"ASDL has no operation for {kinds} and leaves its parameters out without an error "
                               f"({len(missing)} tensors: {', '.join(missing[:3])}, ...)", partial=out)
        return out

    return run


def opacus_fisher(model: nn.Module, batches: Batches, estimator: str, freeze_batchnorm: bool = False,
                  reduction: str = "sum") -> Runner:
    """Opacus: GradSampleModule stores each parameter's per-sample gradients in p.grad_sample; we square and sum
    them (empirical: the true labels; sampled: labels the caller draws from the model, as ours draws them). It has no
    exact Fisher. It records activations only of modules in training mode, so the parameterized modules are put in
    train mode (the MLP and the CNN's conv/Linear layers compute the same in both). It refuses BatchNorm (a layer
    with buffers) whether strict or not; freeze_batchnorm leaves the BatchNorm parameters out and the layers in eval
    mode, a partial figure. loss_reduction tells Opacus how the loss reduces, and it undoes a mean: grad_sample is
    each sample's own gradient either way."""
    require("opacus")
    from opacus import GradSampleModule

    if estimator == "exact":
        raise NotAvailable("no such estimator", "per-sample gradients only",
                           "Opacus gives per-sample gradients of a loss the caller writes; the exact Fisher would be "
                           "C such passes of √p_c-weighted losses, written by hand")
    m = copy.deepcopy(model)
    if freeze_batchnorm:
        for module in m.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(False)
    for module in m.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train()
    try:
        net = GradSampleModule(m, loss_reduction=reduction)
    except NotImplementedError as error:
        refused = {name: type(mod).__name__ for name, mod in m.named_modules()
                   if any(True for _ in mod.buffers(recurse=False)) and any(True for _ in mod.parameters(recurse=False))}
        try:
            GradSampleModule(m, loss_reduction=reduction, strict=False)
            lenient = "strict=False accepts it"
        except NotImplementedError as second:
            lenient = f"strict=False too ({second})"
        first = str(error.args[0][0] if isinstance(error.args[0], list) else error).split("(")[0].strip()
        short = f"{', '.join(sorted(set(refused.values())))} (layers with buffers)"
        raise NotAvailable("not supported", short, "Opacus' GradSampleModule refuses "
                           f"{', '.join(f'{n} ({kind})' for n, kind in refused.items())}: with "
                           f"strict=True, its default ({first}), and with {lenient}") from error
    params = {name: p for name, p in m.named_parameters() if p.requires_grad}
    n = sample_count(batches)

    def run() -> Fisher:
        generator = torch.Generator().manual_seed(SEED)
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for x, y in batches:
            try:
                logits = net(x).flatten(0, -2)  # per position: [N·T, C], its loss summing over positions
                labels = y.flatten()
                if estimator == "sampled":
                    labels = torch.where(labels == -100, labels, drawn_labels(logits, generator))
                F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction).backward()
            except TypeError as error:  # in backward: functorch's fallback passes a module its first input only
                kinds = ", ".join(sorted({type(mod).__name__ for mod in outermost([
                    mod for mod in m.modules()
                    if type(mod) not in net.GRAD_SAMPLERS and any(p.requires_grad for p in mod.parameters(False))
                ])}))
                raise NotAvailable("not supported", kinds, f"Opacus has no grad sampler for {kinds}, and its functorch "
                                   f"fallback calls the module with its first input only ({error}); Opacus' "
                                   "replacement for nn.MultiheadAttention is opacus.layers.DPMultiheadAttention") \
                    from error
            for name, p in params.items():
                if p.grad_sample is None:
                    raise NotAvailable("not supported", f"no grad_sample for {name}")
                total[name].add_(p.grad_sample.square().sum(0))
                p.grad_sample = None
                p.grad = None
        return {name: t / n for name, t in total.items()}

    return run


def curvlinops_fisher(model: nn.Module, batches: Batches, estimator: str) -> Runner:
    require("curvlinops-for-pytorch")
    count = sum(p.numel() for p in model.parameters())
    raise NotAvailable(
        "no such estimator", "products only, no diagonal",
        "curvlinops multiplies curvature matrices by vectors (GGNLinearOperator: for softmax cross-entropy the exact "
        "Fisher; FisherMCLinearOperator: sampled; EFLinearOperator: empirical) and has no diagonal of any: it would "
        f"take one product per parameter ({count:,} here), and hutchinson_diag/xdiag estimate it stochastically, "
        "a different quantity",
    )


@dataclass
class Peer:
    """A column of the table: ``make(model, batches, estimator)`` returns a Runner or raises NotAvailable."""

    name: str
    make: Callable[[nn.Module, Batches, str], Runner]
    applies: Callable[[nn.Module], bool] = lambda model: True


def peers(device: str) -> list[Peer]:
    return [
        Peer("ours", ours),
        Peer("BackPACK", backpack_fisher),
        Peer("nngeometry", lambda m, b, e: nngeometry_fisher(m, b, e, device)),
        Peer("ASDL", asdl_fisher),
        Peer("Opacus", opacus_fisher),
        Peer("Opacus, BatchNorm frozen", lambda m, b, e: opacus_fisher(m, b, e, freeze_batchnorm=True),
             applies=has_batchnorm),
        Peer("curvlinops", curvlinops_fisher),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Workloads: a model and its batches. Every model of bench/_common.py's MODELS is one, on MNIST; adding a model there
# (or a Workload here, with its own batches) adds its table. A model with per-position outputs (a causal LM) needs
# each peer's sequence conventions first: BackPACK's CrossEntropyLoss wants [N, C, T], ASDL flattens positions into
# samples, nngeometry's classif_logits variant takes [N, C] only.
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batches: Callable[[int, int, str], Batches]  # (n, batch_size, device) -> batches
    check_only: bool = False  # a value check, not a figure
    known: dict[tuple[str, str], str] = field(default_factory=dict)  # (estimator, peer) -> a peer's known error
    notes: list[str] = field(default_factory=list)  # printed under its tables
    float32_exact: bool = False  # --check also compares exact in float32 against the float64 loop (to 1e-4)


def small_maps_cnn() -> nn.Module:
    """Convolutions whose outputs are 4×4 maps: ASDL's diagonal takes its other conv branch here (see KNOWN)."""
    return nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64 * 16, CLASSES))


def confident_mlp() -> nn.Module:
    """The MLP with its head's weights and bias ×300: on the first 256 MNIST digits the mean top probability is 0.88, a
    trained classifier's kind of confidence (at initialization it is 0.11)."""
    model = MODELS["mlp"].build()
    with torch.no_grad():
        model[-1].weight.mul_(300)
        model[-1].bias.mul_(300)
    return model


def random_batches(n: int, batch_size: int, device: str) -> Batches:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 8, 4, 4, generator=g).to(device), torch.randint(0, CLASSES, (n,), generator=g).to(device)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]


def encoder_classifier() -> nn.Module:
    """bench/transformer_routes.py's classifier: embeddings, 2 TransformerEncoderLayers (d 64, 4 heads, LayerNorm,
    MultiheadAttention), mean-pooled into a 10-way head."""
    from transformer_routes import EncoderClassifier

    return EncoderClassifier()


def token_batches(n: int, batch_size: int, device: str) -> Batches:
    from transformer_routes import VOCAB

    g = torch.Generator().manual_seed(3)
    tokens, labels = torch.randint(0, VOCAB, (n, 16), generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return [(tokens[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)) for i in range(0, n, batch_size)]


ASDL_SMALL_MAPS = (
    "ASDL 0.1a5's Conv2d diagonal (operations/conv.py, cov_diag_weight), when out_size·(c_out + c_in·k²) < "
    "c_out·c_in·k² ('a calculation method that consumes less memory'), returns Σ_n Σ_l g²_nl x²_nl instead of "
    "Σ_n (Σ_l g_nl x_nl)²: the cross terms between output positions l are dropped, so its conv weights are wrong "
    "on small feature maps (a ViT's patch embedding takes this branch too); its bias, Linear and the app's CNN "
    "(28×28 and 14×14 maps) are right"
)
WORKLOADS = {name: Workload(name, spec.build, spec.batches) for name, spec in MODELS.items()}
ASDL_POSITIONS = (
    "ASDL's Linear (operations/linear.py, preprocess_in_data and preprocess_out_grads: 'n x * x f_in -> n x f_in') "
    "flattens the positions of an [N, T, f] input into rows, so the per-sample squares it sums are per position, "
    "Σ_t (g_t a_tᵀ)² instead of (Σ_t g_t a_tᵀ)²: on the encoder every layer applied per position comes out wrong "
    "(what --check prints as 'the rest ... off'); the head, on [N, d], is right"
)
WORKLOADS["encoder"] = Workload("encoder", encoder_classifier, token_batches, notes=[ASDL_POSITIONS])
NNGEOMETRY_FLOAT32 = (
    "nngeometry 0.4's FIM (metrics.py, variant classif_logits) computes q = 1 − p.cumsum(1) and takes the square root "
    "of p_i q_i / q_(i−1): in float32 a cumulative sum that reaches 1 leaves q slightly negative (−1.2e-7 for 18 of "
    "256 samples here), the root is NaN, and the sums carry it into nearly every entry. Ours sums the tail "
    "probabilities instead of subtracting from 1. In float64 nngeometry is right"
)
WORKLOADS["confident_mlp"] = Workload("confident_mlp", confident_mlp, mnist_batches, check_only=True,
                                      float32_exact=True, known={("exact float32", "nngeometry"): NNGEOMETRY_FLOAT32})
WORKLOADS["small_maps"] = Workload("small_maps", small_maps_cnn, random_batches, check_only=True,
                                   known={(e, "ASDL"): ASDL_SMALL_MAPS for e in ESTIMATORS})


def build(peer: Peer, model: nn.Module, batches: Batches, estimator: str) -> Runner | NotAvailable:
    try:
        return peer.make(model, batches, estimator)
    except NotAvailable as reason:
        return reason


def call(run: Runner) -> Fisher | NotAvailable:
    """One run of a variant; an unsupported layer found while running becomes a cell, any other error too (with its
    type), so that one peer's failure does not hide the others' figures."""
    try:
        return run()
    except NotAvailable as reason:
        return reason
    except Exception as error:  # noqa: BLE001
        text = str(error).splitlines()[0] if str(error) else ""
        return NotAvailable("not supported", f"{type(error).__name__}: {text[:60]}", f"{type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------------------------------------
# Reference and comparison
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def loop_fisher(model: nn.Module, batches: Batches, estimator: str) -> Fisher:
    """One sample at a time: empirical (∇ log p(y|x))², exact Σ_c p_c (∇ log p(c|x))², in the model's dtype.

    On one thread: batch-1 work gains nothing from more, and on a shared host two spinning threads made each sample
    of the CNN 40× slower (150–230 ms instead of 4 ms)."""
    with threads(1):
        return _loop_fisher(model, batches, estimator)


def _loop_fisher(model: nn.Module, batches: Batches, estimator: str) -> Fisher:
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, y in batches:
        for i in range(len(x)):
            log_p = torch.log_softmax(model(x[i : i + 1])[0], dim=-1)
            if log_p.dim() == 2:  # per position [T, C]: a sample's log-likelihood sums its labelled positions
                kept = (y[i] != -100).nonzero().flatten().tolist()
            else:
                log_p, kept = log_p[None], [0]
            labels = y[i].reshape(-1)
            if estimator == "empirical":
                terms = [(1.0, sum(log_p[t, labels[t]] for t in kept))]
            else:  # Σ_t of each position's exact Fisher: the cross-position terms vanish in expectation
                p = log_p.detach().exp()
                terms = [(p[t, c], log_p[t, c]) for t in kept for c in range(log_p.shape[-1])]
            for k, (weight, f) in enumerate(terms):
                grads = torch.autograd.grad(f, list(params.values()), retain_graph=k < len(terms) - 1)
                for t, g in zip(total.values(), grads):
                    t.add_(weight * g * g)
    n = sample_count(batches)
    return {name: t / n for name, t in total.items()}


def relative_error(got: Fisher, want: Fisher) -> float:
    """max over parameters of max |got − want| / max |want|, in float64; a name missing on either side is a failure."""
    if set(got) != set(want):
        return float("inf")
    return max(
        float((got[n].double() - want[n].double()).abs().max() / (want[n].double().abs().max() + 1e-300)) for n in want
    )


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Gives eval-mode BatchNorm layers non-trivial affine parameters and running statistics (fresh ones are close to
    the identity, which would hide a peer that used batch statistics or forgot γ/σ). For --check only."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                size = m.num_features
                m.weight.copy_(0.5 + torch.rand(size, generator=g))
                m.bias.copy_(0.2 * torch.randn(size, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(size, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(size, generator=g))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------
def header(args, n: int, repeats: int | None) -> None:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
    versions = []
    for dist in ("torch", "lightning-ewc") + DISTRIBUTIONS:
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    mode = "check (values only, no timing)" if args.check else f"medians of {repeats} rounds, variants in shuffled order"
    print(f"# peers: N={n}, batch {args.batch_size}, {mode}")
    print(f"# machine: {machine(args.device)}{f', {cpu}' if cpu else ''}; {platform.platform()}; "
          f"python {platform.python_version()}")
    print(f"# versions: {', '.join(versions)}; git {commit or '?'}", flush=True)


def table(model_name: str, cells: dict[tuple[str, str], str], columns: list[str], title: str,
          notes: list[str]) -> None:
    """A markdown table, rows the estimators, columns ours and each peer; long reasons go below as notes."""
    footnotes: dict[str, int] = {}
    print(f"\n{model_name}: {title}\n")
    print("| estimator | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for estimator in ESTIMATORS + tuple(sorted({e for e, _ in cells} - set(ESTIMATORS))):
        row = []
        for column in columns:
            cell = cells.get((estimator, column), "")
            if isinstance(cell, NotAvailable):
                key = cell.detail or cell.cell
                mark = footnotes.setdefault(key, len(footnotes) + 1)
                cell = f"{cell.cell} [{mark}]"
            row.append(cell)
        label = estimator.replace(" ", ", ")
        print(f"| {label} | " + " | ".join(row) + " |")
    for text, mark in footnotes.items():
        print(f"\n[{mark}] {text}")
    for note in notes:
        print(f"\n{note}")
    print(flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Checks:
    failed: list[str] = field(default_factory=list)

    def line(self, label: str, what: str, error: float, known: str | None = None, tolerance: float = TOLERANCE) -> bool:
        """One comparison; a mismatch fails the check unless it is a peer's known error (printed as such)."""
        ok = error <= tolerance  # False for NaN
        verdict = "ok" if ok else "MISMATCH" if known is None else "peer's known error (not counted)"
        print(f"{label:<46} {what:<44} max rel. error {error:9.2e}  {verdict}", flush=True)
        if not ok and known is None:
            self.failed.append(f"{label} {what}")
        return ok


def check_model(workload: Workload, args, checks: Checks) -> None:
    name = workload.name
    torch.manual_seed(0)
    model = randomize_batchnorm(workload.build()).to(args.device).eval()
    batches = workload.batches(args.n, args.batch_size, args.device)
    model64 = copy.deepcopy(model).double()
    batches64 = [(x.double() if x.is_floating_point() else x, y) for x, y in batches]
    cells: dict[tuple[str, str], object] = {}
    active = [p for p in peers(args.device) if p.applies(model)]
    references: dict[str, Fisher] = {}
    mine64: dict[str, Fisher] = {}
    for estimator in ESTIMATORS:
        if estimator == "sampled":  # draw for draw: float32, so that the peers' probabilities are ours
            m, b, reference = model, batches, None
        else:
            m, b, reference = model64, batches64, loop_fisher(model64, batches64, estimator)
            references[estimator] = reference
        mine = estimate_fisher(m, b, estimator, seed=SEED)
        mine64[estimator] = mine
        if reference is not None:
            error = relative_error(mine, reference)
            checks.line(f"{name} {estimator} ours", "vs float64 loop", error)
            cells[estimator, "ours"] = f"loop {error:.0e}"
        else:
            cells[estimator, "ours"] = "(reference)"
        for peer in active[1:]:
            runner = build(peer, m, b, estimator)
            result = runner if isinstance(runner, NotAvailable) else call(runner)
            if isinstance(result, NotAvailable):
                cells[estimator, peer.name] = result
                print(f"{name} {estimator} {peer.name:<37} {result.cell}", flush=True)
                if result.partial:  # what it gave for the rest: not a check, but a wrong value should be seen
                    want = reference or mine
                    error = relative_error(result.partial, {k: want[k] for k in result.partial})
                    worst = max(result.partial, key=lambda k: relative_error({k: result.partial[k]}, {k: want[k]}))
                    print(f"{'':<46} the {len(result.partial)} tensors it covers: max rel. error {error:.1e} "
                          f"(worst {worst})", flush=True)
                    if error > TOLERANCE:
                        result.short += f"; the rest {error:.0e} off"
                continue
            label = f"{name} {estimator} {peer.name}"
            known = workload.known.get((estimator, peer.name))
            error = relative_error(result, {k: mine[k] for k in result} if peer.name.endswith("frozen") else mine)
            what = "vs ours, float64" if reference is not None else "vs ours, float32, same draws"
            ok = checks.line(label, what, error, known)
            cells[estimator, peer.name] = f"{error:.1e}"
            if reference is not None:
                covered = {k: reference[k] for k in result} if peer.name.endswith("frozen") else reference
                loop_error = relative_error(result, covered)
                ok = checks.line(label, "vs float64 loop", loop_error, known) and ok
                cells[estimator, peer.name] += f" (loop {loop_error:.0e})"
            if known is not None:
                worst = max(result, key=lambda k: relative_error({k: result[k]}, {k: (reference or mine)[k]}))
                print(f"{'':<46} known error: {'none seen (fixed?)' if ok else f'worst on {worst}'}")
                if not ok:
                    cells[estimator, peer.name] = NotAvailable("wrong", f"{error:.1e} off", known)
    if workload.float32_exact:
        check_float32_exact(workload, model, batches, references["exact"], active, checks, cells)
    check_scales(name, model64, batches64, mine64, checks)
    observe_nngeometry_default_dtype(name, model64, batches64, references["empirical"])
    table(name, cells, [p.name for p in active],
          f"max relative error against ours (exact, empirical: float64, ours summing in float32; sampled: float32, "
          f"the same draws) and, in brackets, against a float64 per-sample loop; N = {args.n}, batch {args.batch_size}",
          workload.notes + ([BATCHNORM_NOTE] if has_batchnorm(model) else []))


def check_float32_exact(workload: Workload, model: nn.Module, batches: Batches, reference: Fisher, active: list[Peer],
                        checks: Checks, cells: dict) -> None:
    """Exact in float32 against the float64 loop, to 1e-4: where the factor of diag(p) − ppᵀ loses precision."""
    estimator = "exact float32"
    for peer in active:
        runner = build(peer, model, batches, "exact")
        result = runner if isinstance(runner, NotAvailable) else call(runner)
        if isinstance(result, NotAvailable):
            cells[estimator, peer.name] = result
            continue
        known = workload.known.get((estimator, peer.name))
        error = relative_error(result, reference)
        checks.line(f"{workload.name} {estimator} {peer.name}", "vs float64 loop", error, known, tolerance=1e-4)
        cells[estimator, peer.name] = NotAvailable("wrong", f"{error:.1e}", known) if known and not error <= 1e-4 \
            else f"loop {error:.0e}"


BATCHNORM_NOTE = "BatchNorm layers were given random affine parameters and running statistics for this check."


def check_scales(name: str, model64: nn.Module, batches64: Batches, mine: dict[str, Fisher], checks: Checks) -> None:
    """The factors between a mean-reduced loss and the mean Fisher, as bench/README.md states them."""
    for estimator in ("exact", "empirical"):
        try:
            result = call(backpack_fisher(model64, batches64, estimator, reduction="mean"))
        except NotAvailable as reason:
            result = reason
        factor = "B/N" if estimator == "exact" else "B²/N"
        if not isinstance(result, NotAvailable):
            checks.line(f"{name} {estimator} BackPACK, reduction='mean'", f"Σ over batches × {factor} vs ours",
                        relative_error(result, mine[estimator]))
    try:
        result = call(opacus_fisher(model64, batches64, "empirical", reduction="mean"))
    except NotAvailable as reason:
        result = reason
    if not isinstance(result, NotAvailable):
        checks.line(f"{name} empirical Opacus, loss_reduction='mean'", "Σ grad_sample² / N vs ours",
                    relative_error(result, mine["empirical"]))


def observe_nngeometry_default_dtype(name: str, model64: nn.Module, batches64: Batches, reference: Fisher) -> None:
    """Not a check: what nngeometry does with a float64 model while the default dtype stays float32."""
    try:
        require("nngeometry")
    except NotAvailable:
        return
    for estimator in ("exact", "empirical"):
        runner = build(Peer("", lambda m, b, e: nngeometry_fisher(m, b, e, "cpu", float64_default=False)),
                       model64, batches64, estimator)
        if isinstance(runner, NotAvailable):  # a layer it does not know: said in the table already
            return
        result = call(runner)
        if isinstance(result, NotAvailable):
            outcome = result.detail or result.cell
        else:
            outcome = f"runs; empirical vs float64 loop: max rel. error {relative_error(result, reference):.1e}" \
                if estimator == "empirical" else "runs"
        print(f"{name} {estimator} nngeometry, float64 model, float32 default dtype (observation): {outcome}")


def timed_shuffled(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds, each round running every function once in an order
    shuffled anew (seeded): _common.timed_interleaved's fixed order would put the same variant before the plain pass
    in every round, and some variants leave a lot behind (Opacus' per-sample gradients of the CNN's 3136→256 layer
    are 0.4 GB a batch). The probe run before this serves as the warm-up."""
    order, rng = list(fns), random.Random(SEED)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fns[name]()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def time_model(workload: Workload, args, repeats: int, missed: list[str]) -> None:
    """The timing table of one model; appends to ``missed`` each estimator where ours is slower than the fastest
    peer that computes the whole of it."""
    name = workload.name
    torch.manual_seed(0)
    model = workload.build().to(args.device).eval()
    batches = workload.batches(args.n, args.batch_size, args.device)
    active = [p for p in peers(args.device) if p.applies(model)]
    cells: dict[tuple[str, str], object] = {}
    fns: dict[str, Callable[[], object]] = {"plain": plain(model, batches)}
    values: dict[tuple[str, str], Fisher] = {}
    for estimator in ESTIMATORS:
        for peer in active:
            runner = build(peer, model, batches, estimator)
            result = runner if isinstance(runner, NotAvailable) else call(runner)  # also a warm-up
            if isinstance(result, NotAvailable):
                cells[estimator, peer.name] = result
                print(f"{name} {estimator} {peer.name}: {result.cell}", flush=True)
                continue
            values[estimator, peer.name] = result
            fns[f"{estimator}/{peer.name}"] = runner
    fns["plain"]()  # its warm-up (the others had their probe)
    times = timed_shuffled(fns, repeats, args.device)
    base = times["plain"]
    print(f"{name}: plain forward+backward over N: {1e3 * base:.1f} ms")
    agreement = []
    for key, t in times.items():
        if key == "plain":
            continue
        estimator, peer = key.split("/", 1)
        cells[estimator, peer] = f"{t / base:.2f}"
        print(f"{name} {estimator:<9} {peer:<26} {1e3 * t:10.1f} ms   {t / base:7.2f} x plain", flush=True)
        if peer != "ours":
            mine = values[estimator, "ours"]
            covered = {k: mine[k] for k in values[estimator, peer]} if peer.endswith("frozen") else mine
            agreement.append(f"{estimator} {peer} {relative_error(values[estimator, peer], covered):.0e}")
    for estimator in ESTIMATORS:
        rivals = {peer: times[f"{estimator}/{peer}"] for e, peer in (key.split("/", 1) for key in times if "/" in key)
                  if e == estimator and peer != "ours" and not peer.endswith("frozen")}  # frozen: a partial figure
        mine = times.get(f"{estimator}/ours")
        if mine is None:
            continue
        if not rivals:
            print(f"{name} {estimator:<9} ours / fastest peer: no peer computes it on this model (target met: the "
                  "only one)", flush=True)
            continue
        fastest = min(rivals, key=rivals.get)
        ratio = mine / rivals[fastest]
        verdict = "ok" if ratio <= 1.0 else "MISSED"
        print(f"{name} {estimator:<9} ours / fastest peer ({fastest}): {1e3 * mine:.1f} vs {1e3 * rivals[fastest]:.1f} "
              f"ms, target <= 1.0 {verdict} ratio {ratio:.3f}", flush=True)
        if ratio > 1.0:
            missed.append(f"{name} {estimator} vs {fastest}")
    table(name, cells, [p.name for p in active],
          f"time / one plain forward+backward over the same samples ({1e3 * base:.1f} ms), N = {args.n}, batch "
          f"{args.batch_size}, medians of {repeats} rounds in shuffled order",
          [f"Values of this run against ours (float32; --check compares in float64): {', '.join(agreement)}."]
          + workload.notes)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--check", action="store_true", help="compare values only (small N, float64 where possible)")
    p.add_argument("--models", default=None, help=f"comma-separated, from {sorted(WORKLOADS)} (default: all; "
                   "those marked check-only only with --check)")
    p.add_argument("--n", type=int, default=None, help="samples (default 4096; --quick 512; --check 256)")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    # The peers' module hooks, on every backward: BackPACK's and Opacus' full hooks where the input needs no gradient,
    # ASDL's non-full hooks. Harmless here, and they would bury the lines that matter.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    warnings.filterwarnings("ignore", message="Using a non-full backward hook when the forward contains multiple")
    args.n = args.n or (256 if args.check else 512 if args.quick else 4096)
    repeats = None if args.check else args.repeats or (3 if args.quick else 9)
    names = args.models.split(",") if args.models else [w.name for w in WORKLOADS.values()
                                                         if args.check or not w.check_only]
    unknown = [m for m in names if m not in WORKLOADS]
    if unknown:
        sys.exit(f"unknown models {unknown}; choose from {sorted(WORKLOADS)}")
    header(args, args.n, repeats)
    checks, missed = Checks(), []
    for name in names:
        if args.check:
            check_model(WORKLOADS[name], args, checks)
        else:
            time_model(WORKLOADS[name], args, repeats, missed)
    if checks.failed:
        print(f"mismatches: {'; '.join(checks.failed)}", file=sys.stderr)
        sys.exit(1)
    if missed:
        print(f"slower than a peer: {'; '.join(missed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
