"""Fisher estimation time against the bounds a per-sample method cannot beat, the vmap route and the batch-1 loop.

Per model (bench/_common.py's MODELS: the MLP and the CNN on MNIST, the app's ViT on MNIST, the app's causal LM on
its synthetic sequence tasks), all variants interleaved in one run, medians:

- `empirical` and `sampled` against one plain forward+backward pass over the same samples. The bound is 1.0: the
  same forward, and a backward whose multiply-adds are the plain one's (input gradients, then per layer a product of
  squared output gradients and inputs where training forms the weight gradient). Targets: <= 1.2 (issue 4) for the
  MLP and CNN, <= 1.5 (issue 15) for the transformers, whose per-position layers must form each sample's gradient
  before squaring it.
- `exact` over C classes against forward + (C − 1) backward passes (positions × (C − 1) for the LM): C − 1 vector
  backward passes (the rank of the softmax's Fisher in the logits, the fewest vectors any method that squares exact
  vector-Jacobian products needs: bench/README.md), each at the cost of training's backward. Reported, no target:
  Linear layers beat it (their squares add up over the passes before one product per batch), while per-sample
  weight gradients of convolutions and of layers applied per position cost the multiply-adds of training's weight
  gradient but run as many small products, slower than its one large one. peers.py holds `exact` to the peers.
- the same estimators with every parameter on the library's exact fallback (torch.func.vmap of per-sample
  gradients), which is what a model gets without per-layer rules. Target: ours <= the vmap route.
- the single-sample loop (van de Ven's: per sample, zero_grad, NLL, backward, add p.grad ** 2), timed on fewer
  samples and scaled; reported, no target: how much slower it is depends on how well the device runs batch-1 work.
- exactness: `empirical` against that loop in float64, <= 1e-5 relative.

Run: python bench/fisher_speed.py [--quick] [--device cuda] [--models mlp,vit] [--threads N]
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from _common import MODELS, BenchModel, Report, machine, parser, plain_pass, task_loss, timed, timed_interleaved
from lightning_ewc import estimate_fisher
from lightning_ewc.fisher import accumulate_importance
from lightning_ewc.per_sample import rules
from lightning_ewc.per_sample.rules.attention import AttentionRule

FAST_TARGET = {"mlp": 1.2, "cnn": 1.2}  # the others (transformers): 1.5


def forward_only(model: nn.Module, batches) -> None:
    """The forward of a training pass (graph built, loss formed), without its backward."""
    for x, y in batches:
        task_loss(model(x), y)


@contextlib.contextmanager
def every_parameter_on_vmap() -> Iterator[None]:
    """No per-layer rule applies, so every parameter takes the library's exact fallback (vmap of per-sample
    gradients). A bench-only switch: the library offers no such option, since the rules are always faster."""
    with mock.patch.object(rules, "RULES", ()), mock.patch.object(AttentionRule, "applies", lambda self, m: False):
        yield


def on_vmap(model: nn.Module, batches, estimator: str) -> dict[str, torch.Tensor]:
    with every_parameter_on_vmap():
        return estimate_fisher(model, batches, estimator)


def single_sample_loop(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """The empirical Fisher one sample at a time, as van de Ven's continual-learning code computes it (a sample's
    log-likelihood sums its labelled positions)."""
    estimate = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    for x, y in batches:
        for i in range(len(x)):
            log_p = F.log_softmax(model(x[i : i + 1]), dim=-1)
            label = y[i : i + 1]
            if log_p.dim() == 3:  # [1, T, C]: the labelled positions
                kept = label != -100
                nll = -log_p[kept].gather(-1, label[kept].unsqueeze(-1)).sum()
            else:
                nll = F.nll_loss(log_p, label)
            model.zero_grad()
            nll.backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    estimate[n] += p.grad.detach() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    return {n: e / count for n, e in estimate.items()}


def max_relative_error(got: dict, want: dict) -> float:
    return max(float((got[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-30)) for n in want)


def bench_model(name: str, spec: BenchModel, args, report: Report) -> None:
    quick = args.quick
    n = 256 if quick else args.n or spec.default_n
    batch_size, loop_n = 128, 64 if quick else 256
    repeats = args.repeats or (2 if quick else 7)
    passes = spec.positions * (spec.classes - 1)
    with_exact = passes <= 64  # a vocabulary's exact Fisher is refused above MAX_EXACT_PASSES; here kept small
    torch.manual_seed(0)
    model = spec.build().to(args.device).eval()
    batches = spec.batches(n, batch_size, args.device)
    variants = {
        "plain": lambda: plain_pass(model, batches),
        "forward": lambda: forward_only(model, batches),
        "empirical": lambda: estimate_fisher(model, batches, "empirical"),
        "sampled": lambda: estimate_fisher(model, batches, "sampled"),
        "empirical, vmap": lambda: on_vmap(model, batches, "empirical"),
    }
    if with_exact:
        variants["exact"] = lambda: estimate_fisher(model, batches, "exact")
    times = timed_interleaved(variants, repeats, args.device)
    plain, forward = times["plain"], times["forward"]
    backward = plain - forward
    print(f"{name}: N={n}, plain forward+backward {1e3 * plain:.1f} ms (forward {1e3 * forward:.1f} ms)", flush=True)
    target = FAST_TARGET.get(name, 1.5)
    for estimator in ("empirical", "sampled"):
        t = times[estimator]
        report.line(f"{name} {estimator} / plain pass", f"{1e3 * t:.1f} ms vs {1e3 * plain:.1f} ms (bound 1.0)",
                    t / plain, f"<= {target:g}", t / plain <= target)
    t_vmap = times["empirical, vmap"]
    report.line(f"{name} empirical / vmap route", f"{1e3 * times['empirical']:.1f} ms vs {1e3 * t_vmap:.1f} ms "
                f"({t_vmap / plain:.2f}x plain)", times["empirical"] / t_vmap, "<= 1", times["empirical"] <= t_vmap)
    if with_exact:
        bound = forward + passes * backward
        t = times["exact"]
        print(f"{f'{name} exact (C={spec.classes}) / fwd + {passes} bwd':<44} "
              f"{f'{1e3 * t:.1f} ms vs {1e3 * bound:.1f} ms ({t / plain:.2f}x plain)':<44} (no target) ratio "
              f"{t / bound:.3f}", flush=True)

    loop_batches = spec.batches(loop_n, batch_size, args.device)  # the loop is slow: timed on fewer samples
    t_loop = timed(lambda: single_sample_loop(model, loop_batches), 1 if quick else 3, args.device) * n / loop_n
    print(f"{name} single-sample loop: {1e3 * t_loop:.0f} ms scaled to N = {t_loop / times['empirical']:.1f}x "
          f"empirical, {t_loop / plain:.1f}x plain (no target)", flush=True)
    # Exactness in float64: in float32 a pre-activation within rounding of 0 can land on either side of a ReLU
    # depending on the batch size, so the loop (batch 1) and any batched pass disagree on that sample's whole
    # gradient (seen on the MLP's first layer and the CNN's convs). The sums are float32 either way.
    model64 = copy.deepcopy(model).double()
    batches64 = [(x.double() if x.is_floating_point() else x, y) for x, y in loop_batches]
    error = max_relative_error(estimate_fisher(model64, batches64, "empirical"), single_sample_loop(model64, batches64))
    report.line(f"{name} empirical vs loop, max rel. error", f"{error:.2e} over {loop_n} samples, float64",
                error, "<= 1e-5", error <= 1e-5)
    summary = accumulate_importance(model, batches[:1], "empirical")
    print(f"{name}: per-sample route(s) used: {', '.join(sorted(set(summary.routes.values())))}"
          + "".join(f"; {conv} from {bn}'s output gradient" for conv, bn in summary.fused), flush=True)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    p.add_argument("--n", type=int, default=None, help="samples (default per model: 4096 MLP/CNN, 1024 others)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {list(MODELS)}")
    print(f"# fisher_speed: batch 128, {machine(args.device)}, torch {torch.__version__}, interleaved medians")
    report = Report()
    for name in names:
        bench_model(name, MODELS[name], args, report)
    report.exit()


if __name__ == "__main__":
    main()
