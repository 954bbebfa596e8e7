"""The per-task runner: for each task of a stream, fit, then test on every task; results after every task.

One Trainer serves the whole stream (raising max_steps/max_epochs per task), so logged steps keep increasing across
tasks and every callback (EWC included) sees each task's fit.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_ewc.app.datamodule import TaskDataModule
from lightning_ewc.app.metrics import format_matrix, summarize
from lightning_ewc.app.methods import METHODS, CarryOptimizerState
from lightning_ewc.app.models import ContinualClassifier, resolve_heads
from lightning_ewc.app.streams import SCENARIOS, TaskStream

CHECKPOINTS = "checkpoints"
RESULTS = "results.json"


# ----------------------------------------------------------------------------------------------------------------------
# Validation before any training
# ----------------------------------------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> None:
    """Refuses impossible combinations with the reason, before anything is built or trained."""
    method = cfg.method
    if method.name not in METHODS:
        raise ValueError(f"unknown method {method.name!r}; valid: {', '.join(METHODS)}")
    scenario = cfg.stream.get("scenario", "task")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")
    resolve_heads(scenario, cfg.model.get("heads", "auto"))
    if method.joint and method.callback is not None:
        raise ValueError(
            "method=joint trains on the union of all tasks seen so far, so there is nothing to consolidate; "
            "a penalty or freezing callback (method.callback) makes no sense with it: set method.callback=null"
        )
    steps, epochs = cfg.train.steps_per_task, cfg.train.epochs_per_task
    if (steps is None) == (epochs is None):
        raise ValueError("set exactly one of train.steps_per_task and train.epochs_per_task (the other to null)")
    if (steps or epochs or 0) <= 0:
        raise ValueError("train.steps_per_task / train.epochs_per_task must be a positive integer")
    if cfg.train.get("keep_optimizer_state") and method.name == "freeze":
        raise ValueError(
            "train.keep_optimizer_state=true cannot carry the optimizer over to method=freeze's later tasks, whose "
            "optimizer has other parameter groups (the frozen trunk is left out); set train.keep_optimizer_state=false"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Results: written after every task, read back on resume
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Results:
    path: Path
    acc_matrix: list[list[float]] = field(default_factory=list)
    baseline: list[float] | None = None
    task_times: list[float] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks_done(self) -> int:
        return len(self.acc_matrix)

    def summary(self) -> dict[str, float | None]:
        if not self.acc_matrix:
            return {"avg_acc": None, "bwt": None, "fwt": None, "forgetting": None}
        return summarize(self.acc_matrix, self.baseline)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.meta,
            "acc_matrix": self.acc_matrix,
            "baseline": self.baseline,
            **self.summary(),
            "task_times": self.task_times,
            "tasks_done": self.tasks_done,
        }

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=2))
        tmp.replace(self.path)  # atomic: a crash never leaves a half-written results.json

    @classmethod
    def load(cls, path: Path) -> Results:
        data = json.loads(path.read_text())
        meta = {k: v for k, v in data.items() if k not in ("acc_matrix", "baseline", "task_times", "tasks_done",
                                                            "avg_acc", "bwt", "fwt", "forgetting")}
        return cls(path, data["acc_matrix"], data["baseline"], data["task_times"], meta)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks from the config
# ----------------------------------------------------------------------------------------------------------------------
def build(conf, **kwargs):
    """``hydra.utils.instantiate``, but our own clear errors (missing data, bad arguments) reach the user as they
    are rather than wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(conf, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (FileNotFoundError, ValueError, TypeError, KeyError)):
            raise err.__cause__ from None
        raise


# ----------------------------------------------------------------------------------------------------------------------
# Model and loggers
# ----------------------------------------------------------------------------------------------------------------------
def build_model(cfg: DictConfig, stream: TaskStream) -> ContinualClassifier:
    backbone = build(cfg.model.backbone, input_shape=stream.input_shape)
    return ContinualClassifier(
        backbone,
        scenario=stream.scenario,
        num_tasks=stream.num_tasks,
        classes_per_task=stream.classes_per_task,
        heads=cfg.model.get("heads", "auto"),
        optimizer=build(cfg.optimizer),
    )


def build_loggers(cfg: DictConfig) -> list:
    loggers = cfg.get("logger") or {}
    return [build(conf) for conf in loggers.values() if conf is not None and "_target_" in conf]


class TaskProgress(L.Callback):
    """A task-level line above Lightning's progress bar: which task, and the average accuracy so far."""

    def __init__(self, num_tasks: int, results: Results) -> None:
        self.num_tasks, self.results = num_tasks, results

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            avg = self.results.summary()["avg_acc"]
            so_far = "" if avg is None else f" | average accuracy so far {100 * avg:.2f}%"
            print(f"[lightning-ewc] task {pl_module.task + 1}/{self.num_tasks}{so_far}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Trains and tests the configured stream; returns what results.json holds.

    Each task gets a fresh Trainer (so a fresh optimizer and clean loop state, as in the library's own usage); the
    callbacks that carry state across tasks (the method's) are the same objects throughout. After each task the
    weights and those callbacks' states go to ``checkpoints/task{k}_end.ckpt``, so a resumed run restarts a task
    exactly as an uninterrupted one does.
    """
    validate(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    stream: TaskStream = build(cfg.stream)
    model = build_model(cfg, stream)
    datamodule = TaskDataModule(
        stream, batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers, seed=cfg.seed,
        joint=bool(cfg.method.joint),
    )
    results = Results(out / RESULTS, meta=_meta(cfg, stream))
    if cfg.resume and results.path.exists():
        results = Results.load(results.path)
    ckpt_dir = out / CHECKPOINTS

    persistent: list[L.Callback] = [build(cfg.method.callback)] if cfg.method.callback is not None else []
    persistent += [build(c) for c in cfg.get("extra_callbacks") or []]
    if cfg.train.get("keep_optimizer_state"):
        persistent.append(CarryOptimizerState())
    loggers = build_loggers(cfg)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if results.baseline is None:  # accuracy of the untrained network: the reference for forward transfer
        results.baseline = _test(_trainer(cfg, [], [], logged_steps=0), model, datamodule)
    first_task = results.tasks_done
    if first_task > 0:  # resuming: the weights and callback states after the last finished task
        _restore(ckpt_dir / f"task{first_task - 1}_end.ckpt", model, persistent)

    for task in range(first_task, stream.num_tasks):
        model.set_task(task)
        datamodule.set_task(task)
        mid_task = ckpt_dir / f"task{task}_last.ckpt"
        callbacks = persistent + [
            # rolling, overwritten at every epoch end (Lightning writes save_last only beside a top-k file)
            ModelCheckpoint(dirpath=ckpt_dir, filename=mid_task.stem, save_top_k=1, save_on_train_epoch_end=True,
                            enable_version_counter=False),
            TaskProgress(stream.num_tasks, results),
        ]
        trainer = _trainer(cfg, callbacks, loggers, logged_steps=results.meta.get("logged_steps", 0))
        started = time.perf_counter()
        with warnings.catch_warnings():  # the folder holds the previous task's checkpoint on purpose
            warnings.filterwarnings("ignore", message=".*exists and is not empty")
            trainer.fit(model, datamodule=datamodule, ckpt_path=mid_task if cfg.resume and mid_task.exists() else None)
        row = _test(trainer, model, datamodule)
        trainer.save_checkpoint(ckpt_dir / f"task{task}_end.ckpt", weights_only=False)
        results.acc_matrix.append(row)
        results.task_times.append(time.perf_counter() - started)
        results.meta["logged_steps"] = trainer.fit_loop.epoch_loop._batches_that_stepped
        if trainer.is_global_zero:
            results.save()
            _log_task(loggers, results, task, results.meta["logged_steps"])
            # only now are these superseded: a crash before results.save() resumes from them
            mid_task.unlink(missing_ok=True)
            (ckpt_dir / f"task{task - 1}_end.ckpt").unlink(missing_ok=True)

    if _is_global_zero():
        _finish(results, loggers, out)
    return results.as_dict()


def _trainer(cfg: DictConfig, callbacks: list, loggers: list, logged_steps: int) -> L.Trainer:
    steps, epochs = cfg.train.steps_per_task, cfg.train.epochs_per_task
    length = {"max_steps": steps, "max_epochs": -1} if steps is not None else {"max_epochs": epochs}
    trainer: L.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False, **length)
    # Loggers are shared by the tasks' Trainers; continue their step axis where the last task stopped (this is the
    # counter Lightning logs with; it is restored from checkpoints too, so a mid-task resume keeps it as well).
    trainer.fit_loop.epoch_loop._batches_that_stepped = logged_steps
    return trainer


def _restore(path: Path, model: ContinualClassifier, callbacks: list[L.Callback]) -> None:
    """Weights and callback states from a checkpoint, without Lightning's loop and optimizer state."""
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} is missing; start the run afresh (resume=false)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["state_dict"])
    for callback in callbacks:
        if callback.state_key in state.get("callbacks", {}):
            callback.load_state_dict(state["callbacks"][callback.state_key])


def _is_global_zero() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or \
        torch.distributed.get_rank() == 0


def _test(trainer: L.Trainer, model: ContinualClassifier, datamodule: TaskDataModule) -> list[float]:
    trainer.test(model, datamodule=datamodule, verbose=False)
    return list(model.last_test_accuracies)


def _meta(cfg: DictConfig, stream: TaskStream) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    overrides, job = [], None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        job = hydra_cfg.job.get("num")
    return {
        "job": job,
        "overrides": overrides,
        "stream": stream.name,
        "scenario": stream.scenario,
        "method": cfg.method.name,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _log_task(loggers: list, results: Results, task: int, step: int) -> None:
    row = results.acc_matrix[-1]
    metrics = {f"acc/task{j}": acc for j, acc in enumerate(row)}
    metrics["acc/avg_seen"] = sum(row[: task + 1]) / (task + 1)
    metrics["tasks_trained"] = task + 1
    metrics.update({f"summary/{k}": v for k, v in results.summary().items() if v is not None})
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


def _finish(results: Results, loggers: list, out: Path) -> None:
    from lightning_ewc.app.plots import plot_accuracy_matrix, plot_task_curves

    heatmap = plot_accuracy_matrix(results.acc_matrix, out / "accuracy_matrix.png")
    curves = plot_task_curves(results.acc_matrix, out / "task_curves.png")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _log_to_wandb(logger, results, heatmap, curves)
    summary = results.summary()
    print(format_matrix(results.acc_matrix))
    print(
        "average accuracy {avg_acc}, BWT {bwt}, FWT {fwt}, forgetting {forgetting}".format(
            **{k: "n/a" if v is None else f"{100 * v:.2f}%" for k, v in summary.items()}
        )
    )
    print(f"results: {results.path}\npictures: {heatmap}, {curves}")


def _log_to_wandb(logger: WandbLogger, results: Results, heatmap: Path, curves: Path) -> None:
    """The accuracy matrix as a table and as a heatmap, the curves, and the summary metrics as run summary."""
    num_tasks = len(results.acc_matrix[0])
    logger.log_table(
        key="acc_matrix",
        columns=["after task"] + [f"task {j}" for j in range(num_tasks)],
        data=[[i] + row for i, row in enumerate(results.acc_matrix)],
    )
    logger.log_image(key="acc_matrix_heatmap", images=[str(heatmap)])
    logger.log_image(key="task_curves", images=[str(curves)])
    logger.experiment.summary.update({k: v for k, v in results.summary().items() if v is not None})
    logger.experiment.finish()  # flush now: Lightning leaves W&B runs open for reuse
