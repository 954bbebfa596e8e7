"""The per-task runner: for each task of a stream, fit, then test on every task; results after every task.

Each task gets a Trainer of its own; the loggers are shared, and the model logs the step count of the whole run, so
logged curves keep increasing across tasks and every callback (EWC included) sees each task's fit. A method config
with ``compare_with`` (the default, ``ewc_vs_finetune``) first trains that other method on the same stream, in a
folder of its own, and the run ends with both accuracy matrices side by side.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_ewc.app.console import TaskProgressBar, quiet_lightning, say
from lightning_ewc.app.datamodule import TaskDataModule
from lightning_ewc.app.methods import METHODS, CarryOptimizerState
from lightning_ewc.app.metrics import format_matrices, format_matrix, summarize
from lightning_ewc.app.models import ContinualClassifier, resolve_heads
from lightning_ewc.app.sequences import SequenceStream
from lightning_ewc.app.sharding import RestoreTaskEnd, is_distributed_checkpoint, restore_task_end
from lightning_ewc.app.streams import SCENARIOS, TaskStream

CHECKPOINTS = "checkpoints"
RESULTS = "results.json"


# ----------------------------------------------------------------------------------------------------------------------
# Validation before any training
# ----------------------------------------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> None:
    """Refuses impossible combinations with the reason, before anything is built or trained."""
    _validate_method(cfg.method, "method")
    compare_with = cfg.method.get("compare_with")
    if compare_with is not None:
        if not isinstance(compare_with, DictConfig) or "name" not in compare_with:
            raise ValueError(
                "method.compare_with names a method config to train first for comparison, e.g. "
                f"'+method@method.compare_with=finetune', or is null; got {compare_with!r}"
            )
        _validate_method(compare_with, "method.compare_with")
        if compare_with.get("compare_with") is not None:
            raise ValueError("method.compare_with cannot itself have a compare_with: one comparison per run")
    scenario = cfg.stream.get("scenario", "task")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")
    resolve_heads(scenario, cfg.model.get("heads", "auto"))
    steps, epochs = cfg.train.steps_per_task, cfg.train.epochs_per_task
    if (steps is None) == (epochs is None):
        raise ValueError("set exactly one of train.steps_per_task and train.epochs_per_task (the other to null)")
    if (steps or epochs or 0) <= 0:
        raise ValueError("train.steps_per_task / train.epochs_per_task must be a positive integer")
    if cfg.train.get("keep_optimizer_state") and "freeze" in (cfg.method.name, (compare_with or {}).get("name")):
        raise ValueError(
            "train.keep_optimizer_state=true cannot carry the optimizer over to method=freeze's later tasks, whose "
            "optimizer has other parameter groups (the frozen trunk is left out); set train.keep_optimizer_state=false"
        )


def _validate_method(method: DictConfig, where: str) -> None:
    if method.name not in METHODS:
        raise ValueError(f"unknown method {method.name!r} in {where}; valid: {', '.join(METHODS)}")
    if method.joint and method.callback is not None:
        raise ValueError(
            "method=joint trains on the union of all tasks seen so far, so there is nothing to consolidate; "
            f"a penalty or freezing callback ({where}.callback) makes no sense with it: set {where}.callback=null"
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
    pictures: list[Path] = field(default_factory=list)  # drawn at the end, not saved in results.json

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
    """The model config's module (``model.module``, default :class:`ContinualClassifier`) around its backbone;
    refuses a model that reads images on a stream of token sequences, and the other way round."""
    module = get_class(cfg.model.get("module") or f"{ContinualClassifier.__module__}.ContinualClassifier")
    tokens, takes_tokens = isinstance(stream, SequenceStream), getattr(module, "takes_tokens", False)
    if tokens != takes_tokens:
        backbone_name = str(cfg.model.backbone.get("_target_", "?")).rsplit(".", 1)[-1]
        raise ValueError(
            f"stream {stream.name} gives token sequences, which model {backbone_name} cannot read: use model=causal_lm"
            if tokens else
            f"model {backbone_name} ({module.__name__}) reads token sequences, which stream {stream.name} does not "
            "give (it gives images): use stream=sequence_tasks, or model=mlp, cnn or vit for images"
        )
    extra = {"vocab_size": stream.vocab_size} if tokens else {}
    try:
        backbone = build(cfg.model.backbone, input_shape=stream.input_shape, **extra)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        # e.g. experiment=permuted_mnist_10 sets model.backbone.hidden for its MLP, which model=vit does not take
        raise TypeError(
            f"{err}; model.backbone holds {sorted(k for k in cfg.model.backbone if k != '_target_')}, some set by an "
            "experiment config written for another model: drop a setting with ~model.backbone.<name> on the command "
            "line, or use the model the experiment names"
        ) from None
    return module(
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


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Trains and tests the configured stream (after the comparison method, if the method config names one);
    returns what results.json holds.

    Each task gets a fresh Trainer (so a fresh optimizer and clean loop state, as in the library's own usage); the
    callbacks that carry state across tasks (the method's) are the same objects throughout. After each task the
    weights and those callbacks' states go to ``checkpoints/task{k}_end.ckpt``, so a resumed run restarts a task
    exactly as an uninterrupted one does.
    """
    validate(cfg)
    with quiet_lightning(enabled=not cfg.get("verbose", False)):
        compared = None
        if cfg.method.get("compare_with") is not None:
            compared = _train_stream(comparison_config(cfg), comparison_for=cfg.method.name)
        results = _train_stream(cfg, compared=compared)
        if rank_zero_only.rank == 0:
            _print_summary(results, compared)
    return results.as_dict()


def comparison_config(cfg: DictConfig) -> DictConfig:
    """The run's config with ``method.compare_with`` as the method, writing to a folder of the run named after it."""
    other = cfg.method.compare_with
    config = copy.deepcopy(cfg)
    with open_dict(config):
        config.method = OmegaConf.to_container(other, resolve=True)
        config.output_dir = str(Path(cfg.output_dir) / other.name)
    return config


def _train_stream(cfg: DictConfig, compared: Results | None = None, comparison_for: str | None = None) -> Results:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # every method of a comparison starts from the same init
    stream: TaskStream = build(cfg.stream)
    model = build_model(cfg, stream)
    datamodule = TaskDataModule(
        stream, batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers, seed=cfg.seed,
        joint=bool(cfg.method.joint),
    )
    results = Results(out / RESULTS, meta=_meta(cfg, stream))
    if cfg.resume and results.path.exists():
        results = Results.load(results.path)
    if comparison_for is not None:
        results.meta["comparison_for"] = comparison_for  # sweep summaries keep one row per job (sweep.py)
    if compared is not None:
        results.meta["compared_with"] = {
            "method": compared.meta["method"], "results": str(compared.path.relative_to(out)), **compared.summary()
        }
    ckpt_dir = out / CHECKPOINTS
    method = cfg.method.name
    say(f"{stream.name}, {stream.num_tasks} {stream.scenario}-incremental tasks: training {method}; writing to {out}")

    persistent: list[L.Callback] = [build(cfg.method.callback)] if cfg.method.callback is not None else []
    persistent += [build(c) for c in cfg.get("extra_callbacks") or []]
    if cfg.train.get("keep_optimizer_state"):
        persistent.append(CarryOptimizerState())
    loggers = build_loggers(cfg)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if results.baseline is None:  # accuracy of the untrained network: the reference for forward transfer
        results.baseline = _test(_trainer(cfg, [], [], enable_progress_bar=False), model, datamodule)
    first_task = results.tasks_done
    restoring: list[L.Callback] = []  # restores a sharded checkpoint inside the first fit, once the model is sharded
    if first_task > 0:  # resuming: the weights and callback states after the last finished task
        restoring = _restore(ckpt_dir / f"task{first_task - 1}_end.ckpt", model, persistent)

    for task in range(first_task, stream.num_tasks):
        model.set_task(task)
        datamodule.set_task(task)
        model.logged_steps_before = results.meta.get("logged_steps", 0)
        mid_task = ckpt_dir / f"task{task}_last.ckpt"
        resume_mid_task = bool(cfg.resume) and mid_task.exists()
        # a mid-task checkpoint holds the weights and callback states too, and Lightning restores it in the fit
        callbacks = ([] if resume_mid_task else restoring) + persistent + [
            # rolling, overwritten at every epoch end (Lightning writes save_last only beside a top-k file)
            ModelCheckpoint(dirpath=ckpt_dir, filename=mid_task.stem, save_top_k=1, save_on_train_epoch_end=True,
                            enable_version_counter=False),
        ]
        if cfg.trainer.get("enable_progress_bar", True):
            callbacks.append(TaskProgressBar(f"{method}: task {task + 1}/{stream.num_tasks}"))
        trainer = _trainer(
            cfg, callbacks, loggers,
            log_every_n_steps=_log_every_n_steps(cfg, datamodule),
            # the same model every task: its summary once, for the run's first fit, if the trainer config asks for it
            enable_model_summary=bool(cfg.trainer.get("enable_model_summary")) and task == 0 and compared is None,
        )
        started = time.perf_counter()
        with warnings.catch_warnings():  # the folder holds the previous task's checkpoint on purpose
            warnings.filterwarnings("ignore", message=".*exists and is not empty")
            # and the rolling mid-task checkpoint is rewritten on purpose (torch's distributed checkpoint, under fsdp)
            warnings.filterwarnings("ignore", message="Detected an existing checkpoint in")
            trainer.fit(model, datamodule=datamodule, ckpt_path=mid_task if resume_mid_task else None)
        restoring = []
        row = _test(trainer, model, datamodule)
        trainer.save_checkpoint(ckpt_dir / f"task{task}_end.ckpt", weights_only=False)
        results.acc_matrix.append(row)
        results.task_times.append(time.perf_counter() - started)
        results.meta["logged_steps"] = model.logged_steps_before + trainer.global_step
        if trainer.is_global_zero:
            results.save()
            _log_task(loggers, results, task, results.meta["logged_steps"])
            # only now are these superseded: a crash before results.save() resumes from them
            _remove_checkpoint(mid_task)
            _remove_checkpoint(ckpt_dir / f"task{task - 1}_end.ckpt")
        seen = "accuracy on task 0" if task == 0 else f"average accuracy on tasks 0-{task}"
        say(f"{method}: task {task + 1}/{stream.num_tasks} done in {results.task_times[-1]:.1f} s, "
            f"{seen}: {100 * results.summary()['avg_acc']:.2f}%")

    if rank_zero_only.rank == 0:
        _finish(results, loggers, out)
    return results


def _trainer(cfg: DictConfig, callbacks: list, loggers: list, **settings: Any) -> L.Trainer:
    steps, epochs = cfg.train.steps_per_task, cfg.train.epochs_per_task
    length = {"max_steps": steps, "max_epochs": -1} if steps is not None else {"max_epochs": epochs}
    return build(cfg.trainer, callbacks=callbacks, logger=loggers or False, **length, **settings)


def _log_every_n_steps(cfg: DictConfig, datamodule: TaskDataModule) -> int:
    """The trainer config's logging interval, but at most one epoch of one process's batches: Lightning warns when
    an epoch is shorter than the interval (tiny or subsampled tasks)."""
    configured = int(cfg.trainer.get("log_every_n_steps") or 50)
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1) or 1
    processes = devices * nodes if isinstance(devices, int) and devices > 0 else 1  # "auto", -1: not known here
    per_process = math.ceil(len(datamodule.train_dataset()) / processes)
    return max(1, min(configured, math.ceil(per_process / cfg.train.batch_size)))


def _restore(path: Path, model: ContinualClassifier, callbacks: list[L.Callback]) -> list[L.Callback]:
    """Weights and callback states from a checkpoint, without Lightning's loop and optimizer state. A distributed
    checkpoint (a directory: strategy=fsdp or fsdp_cpu) loads into the sharded model, which exists only once a fit has
    set up the strategy: the returned callback restores it there."""
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} is missing; start the run afresh (resume=false)")
    if is_distributed_checkpoint(path):
        return [RestoreTaskEnd(path, callbacks)]
    restore_task_end(path, model, callbacks)
    return []


def _remove_checkpoint(path: Path) -> None:
    """A checkpoint file, or the directory a sharded (distributed) checkpoint is."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
    """The run's own pictures, and the results in W&B."""
    from lightning_ewc.app.plots import plot_accuracy_matrix, plot_task_curves

    heatmap = plot_accuracy_matrix(results.acc_matrix, out / "accuracy_matrix.png")
    curves = plot_task_curves(results.acc_matrix, out / "task_curves.png")
    results.pictures = [heatmap, curves]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _log_to_wandb(logger, results, heatmap, curves)


def _print_summary(results: Results, compared: Results | None) -> None:
    """The accuracy matrix (both, side by side, in a comparison), the metrics, and where the files are. A comparison
    also gets its picture: both heatmaps and both average-accuracy curves."""
    method = results.meta["method"]
    if compared is None:
        print(format_matrix(results.acc_matrix))
        runs = [results]
    else:
        runs = [compared, results]
        print(format_matrices({run.meta["method"]: run.acc_matrix for run in runs}))
    width = max(len(run.meta["method"]) for run in runs)
    for run in runs:
        metrics = {k: "n/a" if v is None else f"{100 * v:.2f}%" for k, v in run.summary().items()}
        print(f"{run.meta['method'] + ':':<{width + 1}} average accuracy {metrics['avg_acc']}, BWT {metrics['bwt']}, "
              f"FWT {metrics['fwt']}, forgetting {metrics['forgetting']}")
    pictures = list(results.pictures)
    if compared is not None:
        from lightning_ewc.app.plots import plot_comparison

        other = compared.meta["method"]
        ours, theirs = results.summary()["avg_acc"], compared.summary()["avg_acc"]
        print(f"{method} ends at {100 * ours:.1f}% average accuracy over the tasks, {other} at {100 * theirs:.1f}% "
              f"({100 * (ours - theirs):+.1f} points)")
        title = f"{results.meta['stream']}: {len(results.acc_matrix)} tasks, {other} then {method} from the same start"
        pictures.insert(0, plot_comparison({other: compared.acc_matrix, method: results.acc_matrix},
                                           results.path.parent / f"{method}_vs_{other}.png", title))
    print(f"results: {results.path}" + ("" if compared is None else f" ({compared.meta['method']}: {compared.path})"))
    print(f"pictures: {', '.join(str(p) for p in pictures)}")


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
