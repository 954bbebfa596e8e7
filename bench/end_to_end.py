"""Whole runs through the app: Split MNIST task-incremental, EWC vs fine-tuning, and the input pipeline's speed.

Target (issue 4): the whole run with EWC (exact Fisher on every training sample of each task) <= 1.1x the
fine-tuning run's wall time, both in this one invocation: 5 tasks, 2000 steps each, batch 128, MLP 784-400-400.
EWC runs twice: the penalty added to the loss (the default) and ``method.callback.penalty_via=gradient``.
Also: samples/s of the data pipeline vs of the model step, so that input never bounds a run.
Run: python bench/end_to_end.py [--quick] [--device cuda]
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time

import torch
from hydra import compose, initialize_config_module
from torch import nn

from _common import Report, machine, parser
from lightning_ewc.app.datamodule import TaskDataModule
from lightning_ewc.app.runner import build, build_model, run


def config(method: str, steps: int, out: str, device: str, extra: list[str]):
    overrides = [
        "experiment=split_mnist_task_il", f"method={method}", f"train.steps_per_task={steps}", "logger=none",
        "trainer.enable_progress_bar=false", f"output_dir={out}", *extra,
    ]
    if device.startswith("cuda"):
        overrides.append("trainer=gpu")
    with initialize_config_module("lightning_ewc.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def wall_time(cfg) -> tuple[float, dict]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = run(cfg)
    return time.perf_counter() - start, results


def pipeline_vs_step(cfg, device: str, batches: int) -> tuple[float, float]:
    """Samples/s of iterating the training loader alone, and of forward+backward+Adam on its batches."""
    stream = build(cfg.stream)
    data = TaskDataModule(stream, batch_size=cfg.train.batch_size, seed=cfg.seed)
    loader = data.train_dataloader()
    start, seen = time.perf_counter(), 0
    while seen < batches:
        for x, _, _ in loader:
            seen += 1
            if seen == batches:
                break
    pipeline = batches * cfg.train.batch_size / (time.perf_counter() - start)

    model = build_model(cfg, stream).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y, t = (v.to(device) for v in next(iter(loader)))
    start = time.perf_counter()
    for _ in range(batches):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model.logits(x, t), y).backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    step = batches * cfg.train.batch_size / (time.perf_counter() - start)
    return pipeline, step


def main() -> None:
    args = parser(__doc__).parse_args()
    steps = 100 if args.quick else 2000
    extra = ["stream.subsample=2000"] if args.quick else []
    print(f"# end_to_end: Split MNIST task-IL, 5 tasks x {steps} steps, batch 128, {machine(args.device)}")
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        runs = {"finetune": ("finetune", []), "ewc": ("ewc", []),
                "ewc, penalty_via=gradient": ("ewc", ["method.callback.penalty_via=gradient"])}
        for name, (method, more) in runs.items():
            cfg = config(method, steps, f"{tmp}/{method}{len(more)}", args.device, extra + more)
            times[name], results = wall_time(cfg)
            print(f"{name}: {times[name]:.1f} s, average accuracy {100 * results['avg_acc']:.2f}%", flush=True)
        for name in ("ewc", "ewc, penalty_via=gradient"):
            ratio = times[name] / times["finetune"]
            report.line(f"whole run, {name.replace('ewc', 'EWC (exact, all samples)')} / fine-tuning",
                        f"{times[name]:.1f} s vs {times['finetune']:.1f} s", ratio, "<= 1.1", ratio <= 1.1)
        pipeline, step = pipeline_vs_step(config("ewc", steps, f"{tmp}/p", args.device, extra), args.device,
                                          50 if args.quick else 400)
        report.line("data pipeline / model step, samples/s", f"{pipeline:,.0f} vs {step:,.0f}", pipeline / step,
                    ">= 5", pipeline / step >= 5)
    report.exit()


if __name__ == "__main__":
    main()
