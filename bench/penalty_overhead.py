"""Training-step overhead of the EWC penalty after 1, 10 and 50 consolidated tasks, and memory held by the callback.

Targets (issue 4): a training step (forward, loss + penalty, backward, Adam step) on the MLP 784-400-400-10 at
batch 128 costs <= 1.05x the same step without EWC, and does not grow with the number of tasks; the callback holds
at most two parameter-sized copies whatever the number of tasks (SI adds its training-time accumulators).
Both ways of applying the penalty are timed: added to the loss (the default) and, with
``EWCCallback(penalty_via="gradient")``, its gradient added to ``.grad`` before the optimizer step.
Run: python bench/penalty_overhead.py [--quick] [--device cuda]
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from _common import MODELS, Report, machine, mnist_batches, parser
from lightning_ewc import EWCCallback


def consolidated(model: nn.Module, tasks: int, mode: str, penalty_via: str = "loss") -> EWCCallback:
    """A callback whose state holds ``tasks`` consolidated tasks (random importances and anchors)."""
    callback = EWCCallback(ewc_lambda=100.0, mode=mode, gamma=0.9 if mode == "online" else 1.0,
                           penalty_via=penalty_via)
    for t in range(tasks):
        g = torch.Generator().manual_seed(t)
        callback.state.consolidate(
            {n: torch.rand(p.shape, generator=g).to(p.device) for n, p in model.named_parameters()},
            {n: (p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=g)).to(p.device)
             for n, p in model.named_parameters()},
        )
    return callback


def step_times(model, optimizer, batches, penalty, steps: int, device: str, gradient=None) -> list[float]:
    times = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        if gradient is not None:
            gradient(model)  # what EWCCallback(penalty_via="gradient") does in on_before_optimizer_step
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parser(__doc__).parse_args()
    steps = 30 if args.quick else 300
    rounds = args.repeats or (2 if args.quick else 7)
    print(f"# penalty_overhead: batch 128, {steps} steps x {rounds} interleaved rounds, {machine(args.device)}")
    report = Report()
    torch.manual_seed(0)
    model = MODELS["mlp"]().to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = mnist_batches(128 * 8, 128, args.device)
    callbacks = {k: consolidated(model, k, "separate") for k in (1, 10, 50)}
    by_gradient = {k: consolidated(model, k, "separate", "gradient") for k in (1, 10, 50)}
    # Interleave the variants round by round so that machine noise hits them alike; median per step.
    samples: dict[str, list[float]] = defaultdict(list)
    step_times(model, optimizer, batches, None, 10, args.device)  # warm-up
    for _ in range(rounds):
        samples["none"] += step_times(model, optimizer, batches, None, steps, args.device)
        for k in callbacks:
            samples[f"{k} tasks"] += step_times(model, optimizer, batches, callbacks[k].penalty, steps, args.device)
            samples[f"{k} tasks, gradient"] += step_times(model, optimizer, batches, None, steps, args.device,
                                                          gradient=by_gradient[k].add_penalty_gradient)
    base = statistics.median(samples["none"])
    print(f"step without EWC: {1e3 * base:.3f} ms (median)")
    for suffix, how in (("", "penalty in the loss"), (", gradient", "penalty_via=gradient")):
        for k in callbacks:
            t = statistics.median(samples[f"{k} tasks{suffix}"])
            report.line(f"step with {how}, {k} tasks / without", f"{1e3 * t:.3f} ms vs {1e3 * base:.3f} ms",
                        t / base, "<= 1.05", t / base <= 1.05)

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for mode in ("separate", "online"):
        sizes = {k: consolidated(model, k, mode).num_bytes() for k in (1, 10, 50)}
        for k, size in sizes.items():
            report.line(f"memory {mode}, {k} tasks / parameter bytes", f"{size / 1e6:.2f} MB vs {param_bytes / 1e6:.2f} MB",
                        size / param_bytes, "<= 2", size <= 2 * param_bytes and size == sizes[1])
    report.exit()


if __name__ == "__main__":
    main()
