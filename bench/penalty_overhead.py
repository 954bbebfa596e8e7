"""Training-step overhead of the EWC penalty after 1, 10 and 50 consolidated tasks, and memory held by the callback.

A training step (forward, loss, backward, Adam step) on the MLP 784-400-400-10 at batch 128, with and without EWC,
after 1, 10 and 50 consolidated tasks. Both ways of applying the penalty are timed: its gradient added to ``.grad``
before the optimizer step (``EWCCallback(penalty_via="gradient")``) and the penalty added to the loss (the default).

Targets (issue 17): with ``penalty_via="gradient"`` a step costs <= 1.10x the step without EWC at 1, 10 and 50
tasks (the state is one quadratic whatever the number of tasks); the callback holds two parameter-sized tensors.
The bound the step's extra time is measured against is memory traffic: adding λF ⊙ (θ − θ*) to the gradient reads
θ, θ*, F and the gradient and writes the gradient, 5 × 4 bytes per parameter, at the bandwidth this run measures by
copying a buffer larger than the caches. The loss-side penalty (no target) also forms its value and a backward.
Run: python bench/penalty_overhead.py [--quick] [--device cuda]
"""

from __future__ import annotations

import random
import statistics
import time
from collections import defaultdict

import torch
from torch import nn

from _common import MODELS, Report, machine, mnist_batches, parser, timed
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


def stream_bandwidth(device: str, megabytes: int = 256) -> float:
    """Bytes per second of a large copy (read + write), the median of 7: the memory traffic bound's rate."""
    src = torch.rand(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 7, device)
    return 2 * src.numel() * src.element_size() / t


def main() -> None:
    args = parser(__doc__).parse_args()
    # Blocks of 20 steps per variant, in an order shuffled anew each round: on a shared host the speed drifts over
    # seconds, and blocks of hundreds of steps in a fixed order put that drift between the variants.
    block = 20
    rounds = args.repeats or (3 if args.quick else 100)
    print(f"# penalty_overhead: batch 128, {rounds} rounds of {block} steps per variant, variants in shuffled order, "
          f"{machine(args.device)}")
    report = Report()
    torch.manual_seed(0)
    model = MODELS["mlp"].build().to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = mnist_batches(128 * 8, 128, args.device)
    callbacks = {k: consolidated(model, k, "separate") for k in (1, 10, 50)}
    by_gradient = {k: consolidated(model, k, "separate", "gradient") for k in (1, 10, 50)}
    variants = {"none": {}}
    for k in callbacks:
        variants[f"{k} tasks"] = {"penalty": callbacks[k].penalty}
        variants[f"{k} tasks, gradient"] = {"gradient": by_gradient[k].add_penalty_gradient}
    samples: dict[str, list[float]] = defaultdict(list)
    for options in variants.values():  # warm-up
        step_times(model, optimizer, batches, options.get("penalty"), 10, args.device, options.get("gradient"))
    order, rng = list(variants), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            options = variants[name]
            samples[name] += step_times(model, optimizer, batches, options.get("penalty"), block, args.device,
                                        options.get("gradient"))
    base = statistics.median(samples["none"])
    params = sum(p.numel() for p in model.parameters())
    bandwidth = stream_bandwidth(args.device)
    traffic = 5 * 4 * params / bandwidth  # read θ, θ*, F, grad; write grad
    print(f"step without EWC: {1e3 * base:.3f} ms (median); memory-traffic bound of the penalty's gradient: "
          f"5 x 4 B x {params} parameters at {bandwidth / 1e9:.1f} GB/s (copy of 256 MiB) = {1e3 * traffic:.3f} ms "
          f"= {1 + traffic / base:.3f}x the step")
    for suffix, how, target in (("", "penalty in the loss", None), (", gradient", "penalty_via=gradient", 1.10)):
        for k in callbacks:
            t = statistics.median(samples[f"{k} tasks{suffix}"])
            detail = f"{1e3 * t:.3f} ms vs {1e3 * base:.3f} ms, +{(t - base) / traffic:.1f}x bound"
            if target is None:
                print(f"{f'step with {how}, {k} tasks / without':<44} {detail:<44} (no target) ratio {t / base:.3f}")
            else:
                report.line(f"step with {how}, {k} tasks / without", detail, t / base, f"<= {target:g}",
                            t / base <= target)

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for mode in ("separate", "online"):
        sizes = {k: consolidated(model, k, mode).num_bytes() for k in (1, 10, 50)}
        for k, size in sizes.items():
            report.line(f"memory {mode}, {k} tasks / parameter bytes", f"{size / 1e6:.2f} MB vs {param_bytes / 1e6:.2f} MB",
                        size / param_bytes, "<= 2", size <= 2 * param_bytes and size == sizes[1])
    report.exit()


if __name__ == "__main__":
    main()
