"""The app: Hydra configs, the per-task runner, results, loggers, resume, multirun and the console script."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from hydra.utils import instantiate

from helpers import make_trainer, wait_for_wandb_history
from lightning_ewc.app.models import ContinualClassifier
from lightning_ewc.app.runner import build_model, run
from lightning_ewc.app.streams import digits

CONF = Path(__file__).resolve().parents[1] / "conf"
# Small runs of one method on the split 8x8 digits; a test's own overrides come later and win.
QUICK = ["stream=digits", "method=ewc", "train.steps_per_task=6", "train.batch_size=32", "logger=none",
         "trainer.enable_progress_bar=false"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_app(*overrides: str):
    with initialize_config_module("lightning_ewc.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_app(tmp_path, *overrides: str) -> dict:
    return run(compose_app(*QUICK, f"output_dir={tmp_path}", *overrides))


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------
def test_every_group_has_the_options_the_docs_promise():
    assert options("stream") == [
        "digits", "permuted_digits", "permuted_mnist", "rotated_mnist", "sequence_tasks", "split_fashion_mnist",
        "split_mnist",
    ]
    assert options("method") == [
        "ewc", "ewc_vs_finetune", "finetune", "freeze", "joint", "l2", "mas", "online_ewc", "si"
    ]
    assert options("model") == ["causal_lm", "cnn", "mlp", "vit"]
    assert options("trainer") == ["cpu", "gpu"]
    assert options("strategy") == ["ddp", "ddp_cpu", "fsdp", "fsdp_cpu", "single"]
    assert options("logger") == ["csv", "many", "none", "tensorboard", "wandb"]
    assert {"split_mnist_task_il", "permuted_mnist_10"} <= set(options("experiment"))
    assert {"lambda_sweep", "optuna"} <= set(options("hparams_search"))


@pytest.mark.parametrize("group", ["stream", "model", "method", "trainer", "strategy", "logger", "experiment"])
def test_every_group_option_composes_and_instantiates(group, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for option in options(group):
        cfg = compose_app(f"{group}={option}", f"output_dir={tmp_path}")
        assert cfg.method.name in ("finetune", "freeze", "l2", "ewc", "online_ewc", "si", "mas", "joint")
        if group == "model" and option == "causal_lm":  # token sequences [N, T] in, features per position out
            backbone = instantiate(cfg.model.backbone, input_shape=(5,), vocab_size=9)
            assert backbone(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, backbone.out_features)
        elif group == "model":
            backbone = instantiate(cfg.model.backbone, input_shape=(1, 8, 8))
            assert backbone(torch.zeros(2, 1, 8, 8)).shape == (2, backbone.out_features)
        if group == "method" and cfg.method.callback is not None:
            assert instantiate(cfg.method.callback) is not None
        if group == "logger":
            for conf in (cfg.logger or {}).values():
                assert instantiate(conf).save_dir.startswith(str(tmp_path))
        if group == "strategy":
            assert "strategy" in cfg.trainer
        if group == "experiment":
            assert cfg.train.batch_size == 128 and cfg.stream._target_.endswith("_mnist")


def test_experiments_reproduce_the_published_setups():
    split = compose_app("experiment=split_mnist_task_il")
    assert (split.stream.scenario, list(split.model.backbone.hidden)) == ("task", [400, 400])
    assert (split.train.steps_per_task, split.train.batch_size, split.optimizer.lr) == (2000, 128, 1e-3)
    permuted = compose_app("experiment=permuted_mnist_10")
    assert (permuted.stream.scenario, permuted.stream.num_tasks) == ("domain", 10)
    assert (list(permuted.model.backbone.hidden), permuted.optimizer.lr) == ([1000, 1000], 1e-4)
    assert permuted.train.steps_per_task == 5000
    assert permuted.stream.pad == 2  # van de Ven's code pads to 32x32 before permuting
    for scenario in ("domain", "class"):
        other = compose_app(f"experiment=split_mnist_{scenario}_il")
        assert (other.stream.scenario, list(other.model.backbone.hidden)) == (scenario, [400, 400])
        assert (other.train.steps_per_task, other.train.batch_size, other.optimizer.lr) == (2000, 128, 1e-3)
    hsu = compose_app("experiment=split_mnist_hsu")
    assert (hsu.stream.scenario, hsu.train.steps_per_task, hsu.train.epochs_per_task) == ("task", None, 4)
    # van de Ven's code keeps one Adam for the whole stream; Hsu et al.'s resets it for every task
    for name in ("split_mnist_task_il", "split_mnist_domain_il", "split_mnist_class_il", "permuted_mnist_10"):
        assert compose_app(f"experiment={name}").train.keep_optimizer_state is True
    assert hsu.train.keep_optimizer_state is False


def test_lambda_sweep_sweeps_decades():
    cfg = compose_app("hparams_search=lambda_sweep")
    # the sweeper's params live under hydra; compose gives them with return_hydra_config
    with initialize_config_module("lightning_ewc.conf", version_base="1.3"):
        hydra_cfg = compose("config", overrides=["hparams_search=lambda_sweep"], return_hydra_config=True)
    assert hydra_cfg.hydra.sweeper.params["method.callback.ewc_lambda"] == ",".join(f"1e{k}" for k in range(9))
    assert cfg.method.name == "ewc"
    # a sweep over EWC's lambda trains EWC alone in each job, not the default's fine-tuning comparison as well
    assert "compare_with" not in cfg.method and "compare_with" not in compose_app("hparams_search=optuna").method


def test_the_default_compares_ewc_with_finetuning_and_an_explicit_method_trains_alone():
    default = compose_app()
    assert (default.stream._target_.rsplit(".", 1)[-1], default.stream.scenario) == ("permuted_digits", "domain")
    assert default.method.name == "ewc" and default.method.compare_with.name == "finetune"
    assert default.method.compare_with.callback is None
    assert "compare_with" not in compose_app("method=ewc").method
    # any method can be compared with another one from the command line
    si = compose_app("method=si", "+method@method.compare_with=l2").method
    assert (si.name, si.compare_with.name, si.compare_with.callback.importance) == ("si", "l2", "l2")


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["stream", "method", "model", "logger"])
def test_unknown_names_list_the_valid_ones(group):
    with pytest.raises(MissingConfigException) as err:
        compose_app(f"{group}=nonsense")
    for valid in options(group):
        assert valid in str(err.value)


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "MNIST" / "raw")):
        run_app(tmp_path, "stream=split_mnist", f"stream.data_dir={tmp_path / 'nowhere'}")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stream.scenario=class", "model.heads=multi"], "task-specific heads need the task identity"),
        (["method=joint", "+method.callback={_target_: lightning_ewc.EWCCallback}"], "nothing to consolidate"),
        (["train.steps_per_task=null"], "exactly one of"),
        (["stream.scenario=sideways"], "unknown scenario"),
        (["method=freeze", "train.keep_optimizer_state=true"], "other parameter groups"),
        (["+method.compare_with=finetune"], "names a method config to train first"),
        (["+method@method.compare_with=joint", "+method.compare_with.callback={_target_: lightning_ewc.EWCCallback}"],
         "method.compare_with.callback"),
        (["method=ewc_vs_finetune", "method.compare_with.name=sgd"], "unknown method 'sgd' in method.compare_with"),
    ],
)
def test_impossible_combinations_are_refused_before_training(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_app(tmp_path, *overrides)
    assert not (tmp_path / "results.json").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Heads per scenario
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scenario, heads, outputs",
    [("task", 5, 2), ("domain", 1, 2), ("class", 1, 10)],
)
def test_scenarios_get_the_head_layout_they_promise(scenario, heads, outputs):
    cfg = compose_app(f"stream.scenario={scenario}")
    stream = digits(scenario=scenario)
    model: ContinualClassifier = build_model(cfg, stream)
    assert len(model.heads) == heads
    assert all(h.out_features == outputs for h in model.heads)
    x, y, t = stream.tasks[2].train.tensors
    model.set_task(2)
    logits = model.logits(x[:4], t[:4])
    assert logits.shape == (4, 6 if scenario == "class" else 2)  # class: only the 6 classes seen so far are active
    if scenario == "task":  # the batch's task id picks the head
        torch.testing.assert_close(logits, model.heads[2](model.backbone(x[:4])))


def test_permuted_digits_shuffles_the_same_padded_digits_per_task():
    from lightning_ewc.app.streams import permuted_digits

    def sorted_images(images):
        return sorted(map(tuple, images.flatten(1).tolist()))

    stream = permuted_digits(num_tasks=3, pad=2, seed=0)
    assert (stream.input_shape, stream.scenario, stream.num_classes) == ((1, 12, 12), "domain", 10)
    plain = digits(scenario="class", num_tasks=5).tasks  # the same 75/25 split, dealt out in pairs, unpermuted
    x0, y0, _ = stream.tasks[0].train.tensors
    # task 0: the training digits, each in its own pixel order, inside a 2-pixel frame of zeros
    assert sorted_images(x0[:, :, 2:10, 2:10]) == sorted_images(torch.cat([task.train.tensors[0] for task in plain]))
    frame = x0.clone()
    frame[:, :, 2:10, 2:10] = 0
    assert not frame.any()
    for k, task in enumerate(stream.tasks[1:], start=1):
        x, y, t = task.train.tensors
        assert torch.equal(y, y0) and set(t.tolist()) == {k}
        # every image keeps its pixel values, in another order, and the order differs from task 0's
        assert torch.equal(x.flatten(1).sort(1).values, x0.flatten(1).sort(1).values) and not torch.equal(x, x0)
    with pytest.raises(ValueError, match="2 gives 12x12"):
        permuted_digits(pad=-1)


# ----------------------------------------------------------------------------------------------------------------------
# End-to-end runs
# ----------------------------------------------------------------------------------------------------------------------
def check_results(results: dict, out: Path, num_tasks: int) -> None:
    matrix = results["acc_matrix"]
    assert len(matrix) == num_tasks and all(len(row) == num_tasks for row in matrix)
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
    assert len(results["baseline"]) == num_tasks and len(results["task_times"]) == num_tasks
    assert results["avg_acc"] == pytest.approx(sum(matrix[-1]) / num_tasks)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["acc_matrix"] == matrix and on_disk["config"]["output_dir"] == str(out)
    assert (out / "accuracy_matrix.png").stat().st_size > 1000 and (out / "task_curves.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "stream, extra, num_tasks",
    [
        ("digits", [], 5),
        ("permuted_digits", [], 5),
        ("split_mnist", ["stream.num_tasks=2"], 2),
        ("split_fashion_mnist", ["stream.num_tasks=2"], 2),
        ("permuted_mnist", ["stream.num_tasks=2"], 2),
        ("rotated_mnist", ["stream.angles=[0,90]"], 2),
    ],
)
def test_one_run_per_stream(stream, extra, num_tasks, tmp_path, mnist_dir):
    small = [] if stream.endswith("digits") else ["stream.subsample=300", "stream.test_subsample=300"]
    results = run_app(tmp_path, f"stream={stream}", *small, *extra)
    check_results(results, tmp_path, num_tasks)
    assert results["stream"] == stream


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_config_runs_on_a_subsample(experiment, tmp_path, mnist_dir):
    """The smoke run of each published setup that CI keeps (the real runs are the sweeps in docs/results.md)."""
    cfg = compose_app(f"experiment={experiment}")
    schedule = ["train.epochs_per_task=1"] if cfg.train.steps_per_task is None else ["train.steps_per_task=3"]
    results = run(compose_app(f"experiment={experiment}", *schedule, "stream.num_tasks=2", "stream.subsample=256",
                              "stream.test_subsample=200", "logger=none", f"output_dir={tmp_path}"))
    check_results(results, tmp_path, 2)
    assert results["config"]["train"]["batch_size"] == 128


@pytest.mark.parametrize("method", ["finetune", "freeze", "l2", "ewc", "online_ewc", "si", "mas", "joint"])
def test_one_run_per_method(method, tmp_path):
    # 30 steps: enough for a trunk that `freeze` can keep and still learn new heads on
    results = run_app(tmp_path, f"method={method}", "stream.num_tasks=3", "train.steps_per_task=30")
    check_results(results, tmp_path, 3)
    assert results["method"] == method
    # every method learns each task it has just trained on, well above chance (0.5); `freeze` and a strong `l2`
    # are the weakest at this: a trunk kept from task 0 limits the later tasks
    assert all(results["acc_matrix"][k][k] > 0.6 for k in range(3))


class AdamSteps(L.Callback):
    """Adam's step count and first moment of one weight when each task's training starts and ends (in ``seen``,
    a class attribute: the runner builds this callback itself from ``extra_callbacks``)."""

    seen: list[tuple[str, float, torch.Tensor | None]] = []

    def _record(self, trainer, when: str) -> None:
        optimizer = trainer.optimizers[0]
        state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
        step = float(state["step"]) if "step" in state else 0.0
        AdamSteps.seen.append((when, step, state["exp_avg"].clone() if "exp_avg" in state else None))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self._record(trainer, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer, "end")


@pytest.mark.parametrize("keep", [False, True])
def test_keep_optimizer_state_carries_adams_moments_across_tasks(keep, tmp_path):
    AdamSteps.seen = []
    run_app(tmp_path, "stream.num_tasks=3", "method=finetune", f"train.keep_optimizer_state={keep}",
            "+extra_callbacks=[{_target_: test_app.AdamSteps}]")
    starts = [s for s in AdamSteps.seen if s[0] == "start"]
    ends = [s for s in AdamSteps.seen if s[0] == "end"]
    assert [e[1] for e in ends] == ([6.0, 12.0, 18.0] if keep else [6.0, 6.0, 6.0])
    for task in (1, 2):
        if keep:  # the new task starts from exactly the state the last one ended with
            assert starts[task][1] == ends[task - 1][1]
            torch.testing.assert_close(starts[task][2], ends[task - 1][2])
        else:
            assert starts[task][1] == 0.0 and starts[task][2] is None


def test_freeze_keeps_the_backbone_from_the_second_task_on():
    from lightning_ewc.app.datamodule import TaskDataModule
    from lightning_ewc.app.methods import FreezeAfterFirstTask

    cfg = compose_app("method=freeze")
    stream = digits(num_tasks=2)
    model, freeze = build_model(cfg, stream), FreezeAfterFirstTask(modules=["backbone"])
    data = TaskDataModule(stream, batch_size=32)
    snapshots = []
    for task in range(2):
        model.set_task(task)
        data.set_task(task)
        make_trainer(max_steps=5, callbacks=[freeze]).fit(model, datamodule=data)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    backbone = [k for k in snapshots[0] if k.startswith("backbone.")]
    assert backbone and all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in backbone)
    assert not torch.equal(snapshots[0]["heads.1.weight"], snapshots[1]["heads.1.weight"])  # the new head trains
    assert torch.equal(snapshots[0]["heads.0.weight"], snapshots[1]["heads.0.weight"])  # the old head is untouched


def test_class_incremental_ewc_runs_with_growing_outputs(tmp_path):
    results = run_app(tmp_path, "stream.scenario=class", "stream.num_tasks=3")
    check_results(results, tmp_path, 3)
    assert results["acc_matrix"][0][1] == 0.0  # classes of a task not seen yet cannot be predicted


@pytest.mark.parametrize("crash_step", [5, 10])  # before task 1's first epoch end (9 batches), and after it
def test_resume_after_a_crash_gives_the_uninterrupted_matrix(tmp_path, crash_step):
    common = ["stream.num_tasks=3", "train.steps_per_task=12", "method=ewc"]
    straight = run_app(tmp_path / "straight", *common)

    crashed = tmp_path / "crashed"
    crash = f"+extra_callbacks=[{{_target_: helpers.CrashAt, task: 1, step: {crash_step}}}]"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_app(crashed, *common, crash)
    partial = json.loads((crashed / "results.json").read_text())
    assert partial["tasks_done"] == 1  # task 0's results survived the crash
    mid_task = (crashed / "checkpoints" / "task1_last.ckpt").exists()
    assert mid_task == (crash_step > 9)  # the later crash resumes inside task 1, the earlier one from its start
    resumed = run_app(crashed, *common, "resume=true")

    assert resumed["acc_matrix"] == straight["acc_matrix"]
    assert resumed["baseline"] == straight["baseline"]
    assert resumed["acc_matrix"][0] == partial["acc_matrix"][0]
    assert sorted(p.name for p in (crashed / "checkpoints").iterdir()) == ["task2_end.ckpt"]


def test_wandb_offline_history_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = run(compose_app("stream=digits", "method=ewc", "train.steps_per_task=6", "logger=wandb",
                              "stream.num_tasks=2", f"output_dir={tmp_path}", "logger.wandb.tags=[test]"))
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = wait_for_wandb_history(run_file, lambda rows: any(k.startswith("task_curves") for r in rows for k in r))
    # (the curves image is the last thing the runner logs)
    per_task = [r for r in rows if "acc/task0" in r]
    assert len(per_task) == 2  # one row of accuracies per task trained
    assert per_task[-1]["acc/task1"] == pytest.approx(results["acc_matrix"][-1][1])
    assert per_task[-1]["summary/avg_acc"] == pytest.approx(results["avg_acc"])
    assert any("train/loss" in r for r in rows) and any("ewc/penalty" in r for r in rows)
    logged = {k: v for r in rows for k, v in r.items()}  # images and tables are logged as nested keys
    assert logged["acc_matrix/_type"] == "table-file" and logged["acc_matrix/nrows"] == 2
    assert "image" in logged["acc_matrix_heatmap/_type"] and "image" in logged["task_curves/_type"]


def test_csv_logger_has_curves_across_tasks(tmp_path):
    # each task's Trainer counts its own steps from 0; the model logs the run's count as the loggers' step
    results = run(compose_app("stream=digits", "method=ewc", "train.steps_per_task=10", "logger=csv",
                              "stream.num_tasks=2", f"output_dir={tmp_path}"))
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    header, *lines = metrics.read_text().splitlines()
    columns = header.split(",")
    rows = [dict(zip(columns, line.split(","))) for line in lines]
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps)  # one increasing step axis over both tasks
    # a task of the digits has 5 batches of 64, fewer than trainer=cpu's 10: it is logged every 5 steps (the
    # interval Lightning would otherwise warn about), after the 5th and 10th step of each task
    assert [int(row["step"]) for row in rows if row.get("train/loss")] == [4, 9, 14, 19]
    assert [int(row["step"]) for row in rows if row.get("acc/task0")] == [10, 20]  # after each task
    assert results["logged_steps"] == 20
    last = dict(zip(columns, lines[-1].split(",")))
    assert float(last["acc/task1"]) == pytest.approx(results["acc_matrix"][-1][1])


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------
def cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "lightning_ewc", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_help_lists_the_config_groups(tmp_path):
    out = cli("--help", cwd=tmp_path).stdout
    for group in ("stream", "method", "model", "logger", "strategy", "experiment"):
        assert f"{group}:" in out
    # what the command does without arguments, first
    assert out.startswith("lightning-ewc: continual learning") and "With no arguments: five permuted-digit" in out
    assert "method: ewc, ewc_vs_finetune, finetune" in out
    console = Path(sys.executable).with_name("lightning-ewc")
    assert subprocess.run([str(console), "--help"], capture_output=True, text=True).returncode == 0


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What Lightning prints for every Trainer or fit (banners, product tips, the stop notice), a third-party deprecation
# raised inside Lightning, the library's per-task note, and what Lightning says when our own settings are off.
CHATTER = ["GPU available", "TPU available", "💡 Tip", "`Trainer.fit` stopped", "EWC: consolidated"]
THIRD_PARTY = ["LeafSpec"]
OUR_OWN = ["log_every_n_steps", "Epoch ", "/-2", "v_num"]


def task_lines(stdout: str, method: str, num_tasks: int) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"[lightning-ewc] {method}: task ")
            and f"/{num_tasks} done in " in line]


def test_default_run_with_no_arguments(tmp_path):
    """The zero-argument run shows what EWC is for: fine-tuning forgets the permuted-digit tasks, EWC keeps them."""
    done = cli(cwd=tmp_path, timeout=600)
    (results,) = tmp_path.glob("outputs/*/*/results.json")
    ewc = json.loads(results.read_text())
    finetune = json.loads((results.parent / "finetune" / "results.json").read_text())
    assert (ewc["stream"], ewc["scenario"], ewc["method"], ewc["tasks_done"]) == ("permuted_digits", "domain", "ewc", 5)
    assert (finetune["method"], finetune["tasks_done"], finetune["comparison_for"]) == ("finetune", 5, "ewc")
    assert ewc["compared_with"]["avg_acc"] == finetune["avg_acc"]
    # the same network from the same initial weights: the same accuracies before any training, and on task 0
    assert ewc["baseline"] == finetune["baseline"] and ewc["acc_matrix"][0] == finetune["acc_matrix"][0]
    # the point of the default: EWC keeps the earlier tasks that fine-tuning forgets, by a wide margin (the target
    # for this run is 15 points of average accuracy; over seeds 0-2 it is 22, docs/app.md)
    assert ewc["avg_acc"] >= finetune["avg_acc"] + 0.15
    assert finetune["forgetting"] > 0.2 and ewc["forgetting"] < 0.1
    assert all(row[k] > 0.8 for k, row in enumerate(ewc["acc_matrix"]))  # and still learns each new task
    picture = results.parent / "ewc_vs_finetune.png"
    assert picture.read_bytes()[:8] == PNG_SIGNATURE and picture.stat().st_size > 20_000
    out = done.stdout
    lines = out.splitlines()
    caption = lines.index("accuracy (%) on task j (columns) after training task i (rows)")
    assert lines[caption + 1].split() == ["finetune", "ewc"]  # the two matrices side by side, a row per task
    assert [line.split()[0] for line in lines[caption + 3 : caption + 8]] == ["0", "1", "2", "3", "4"]
    assert len(lines[caption + 7].split()) == 1 + 5 + 5
    assert f"ewc ends at {100 * ewc['avg_acc']:.1f}% average accuracy" in out and str(picture) in out
    assert len(task_lines(out, "finetune", 5)) == 5 and len(task_lines(out, "ewc", 5)) == 5
    for text in CHATTER + THIRD_PARTY + OUR_OWN:
        assert text not in out + done.stderr
    assert list(results.parent.glob("csv/version_0/metrics.csv"))


@pytest.mark.parametrize("verbose", [False, True])
def test_console_says_one_line_per_task_unless_verbose(tmp_path, verbose):
    # 100 training samples a task: 2 batches, fewer than the trainer config's logging interval of 10
    done = cli("stream=digits", "method=ewc", "stream.num_tasks=3", "train.steps_per_task=8", "stream.subsample=100",
               f"verbose={str(verbose).lower()}", cwd=tmp_path)
    lines = task_lines(done.stdout, "ewc", 3)
    assert [line.split(" done in ")[0] for line in lines] == [f"[lightning-ewc] ewc: task {k}/3" for k in (1, 2, 3)]
    assert all("accuracy on task" in line for line in lines)
    everything = done.stdout + done.stderr
    assert "ewc: task 3/3: " in done.stderr  # Lightning's progress bar while a task trains, named after the task
    for text in CHATTER:
        assert (text in everything) == verbose, text
    for text in OUR_OWN:  # fixed where the app calls Lightning, not filtered: absent either way
        assert text not in everything, text
    if not verbose:
        # what the run is, a line per task, the matrix (header and 3 rows), the metrics, where results and pictures are
        assert "Warning" not in everything and len(done.stdout.splitlines()) == 1 + 3 + (1 + 3) + 1 + 2


def test_quiet_lightning_drops_the_listed_messages_and_nothing_else(caplog):
    """The filters act on the loggers Lightning really uses; GPU-only messages are checked here, on any machine."""
    from lightning_ewc.app.console import quiet_lightning

    rank_zero, cuda = "lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"
    messages = [
        (rank_zero, "GPU available: True (cuda), used: True"), (cuda, "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]"),
        (rank_zero, "Restoring states from the checkpoint path at x.ckpt"), (cuda, "something new"),
    ]
    for quiet in (True, False):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"), quiet_lightning(enabled=quiet):
            for name, message in messages:
                logging.getLogger(name).info(message)
        expected = [m for _, m in messages[2:]] if quiet else [m for _, m in messages]
        assert [record.getMessage() for record in caplog.records] == expected
    assert not logging.getLogger(rank_zero).filters and not logging.getLogger(cuda).filters  # removed afterwards


def test_multirun_writes_one_summary_table(tmp_path):
    sweep = tmp_path / "sweep"
    cli("-m", "method.callback.ewc_lambda=1,1000", "train.steps_per_task=5", "stream.num_tasks=2", "logger=none",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3  # header + one row per job: the default's fine-tuning comparison is not a job of its own
    assert "method.callback.ewc_lambda=1 " in rows[1] + " " and "method.callback.ewc_lambda=1000" in rows[2]
    assert "avg_acc" in (sweep / "summary.md").read_text()
    assert sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("results.json")) == [
        "0/finetune/results.json", "0/results.json", "1/finetune/results.json", "1/results.json"
    ]


def test_optuna_sweep_finds_a_lambda_and_writes_the_summary(tmp_path):
    sweep = tmp_path / "optuna"
    cli("hparams_search=optuna", "hydra.sweeper.n_trials=2", "train.steps_per_task=5", "stream.num_tasks=2",
        "logger=none", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    best = (sweep / "optimization_results.yaml").read_text()
    assert "method.callback.ewc_lambda" in best and "best_value" in best
    assert len((sweep / "summary.csv").read_text().splitlines()) == 3


def test_ddp_cpu_run_matches_the_metrics_it_reports(tmp_path):
    run_dir = tmp_path / "ddp"
    done = cli("strategy=ddp_cpu", "stream=digits", "method=ewc", "train.steps_per_task=10", "stream.num_tasks=2",
               "logger=none", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert len(task_lines(done.stdout, "ewc", 2)) == 2  # from the first process only
    results = json.loads((run_dir / "results.json").read_text())
    assert results["tasks_done"] == 2 and results["config"]["trainer"]["devices"] == 2
    assert all(results["acc_matrix"][k][k] > 0.8 for k in range(2))
    assert (run_dir / "train_ddp_process_1.log").exists()  # a second process really ran


def test_configs_are_found_from_a_non_editable_install(tmp_path):
    """The wheel carries conf/ as lightning_ewc.conf; run from outside the repository with only the wheel's files."""
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(repo)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("lightning_ewc-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    probe = "import lightning_ewc, lightning_ewc.conf as c; print(lightning_ewc.__file__, c.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert str(tmp_path / "site") in where.stdout and str(repo) not in where.stdout
    done = subprocess.run([sys.executable, "-m", "lightning_ewc", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "split_mnist" in done.stdout and "permuted_mnist_10" in done.stdout


def test_penalty_via_gradient_is_taken_from_the_command_line(tmp_path):
    # the method config hands the option to EWCCallback (a misspelt key would fail to instantiate); the library's
    # tests check that the training is the same, here the accuracies agree as a sanity check
    by_loss = run_app(tmp_path / "loss", "stream.num_tasks=3", "method.callback.ewc_lambda=1000")
    by_grad = run_app(tmp_path / "grad", "stream.num_tasks=3", "method.callback.ewc_lambda=1000",
                      "method.callback.penalty_via=gradient")
    assert by_grad["config"]["method"]["callback"]["penalty_via"] == "gradient"
    for row_loss, row_grad in zip(by_loss["acc_matrix"], by_grad["acc_matrix"]):
        assert row_grad == pytest.approx(row_loss, abs=0.02)


# ----------------------------------------------------------------------------------------------------------------------
# Packaging: the library without the app's dependencies
# ----------------------------------------------------------------------------------------------------------------------
# Run first in a fresh interpreter: makes hydra-core, matplotlib and scikit-learn (the app's extra) not installed, as
# far as imports and package metadata can tell (libraries such as torchmetrics look for matplotlib by its metadata).
WITHOUT_APP_EXTRA = '''
import re, sys
MODULES = {"hydra", "omegaconf", "matplotlib", "sklearn"}
DISTRIBUTIONS = {"hydra-core", "omegaconf", "matplotlib", "scikit-learn"}

class NotInstalled:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MODULES:
            return None
        return self.finder.find_spec(name, path, target)
    def find_distributions(self, *args, **kwargs):
        for dist in getattr(self.finder, "find_distributions", lambda *a, **k: [])(*args, **kwargs):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() not in DISTRIBUTIONS:
                yield dist
    def __getattr__(self, name):
        return getattr(self.finder, name)

sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
'''
LIBRARY_MODULES = ["lightning_ewc", "lightning_ewc.callback", "lightning_ewc.mixin", "lightning_ewc.fisher",
                   "lightning_ewc.consolidation", "lightning_ewc.importance", "lightning_ewc.per_sample"]


def without_app_extra(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_APP_EXTRA + code], capture_output=True, text=True,
                          timeout=300, check=False)


def test_the_library_imports_without_the_apps_dependencies():
    imports = "\n".join(f"import {module}" for module in LIBRARY_MODULES)
    done = without_app_extra(imports + '''
import importlib, pkgutil, lightning_ewc
for info in pkgutil.walk_packages(lightning_ewc.__path__, "lightning_ewc."):
    if not info.name.startswith(("lightning_ewc.app", "lightning_ewc.__main__")):
        importlib.import_module(info.name)
print(sorted({name.partition(".")[0] for name in sys.modules} & MODULES))
''')
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
    # and the simulation is real: the app itself cannot be imported in that interpreter
    assert without_app_extra("import hydra").returncode != 0


def test_the_app_without_its_extra_says_what_to_install():
    done = without_app_extra("import lightning_ewc.app.runner")
    assert done.returncode != 0
    assert "ImportError: the lightning-ewc app" in done.stderr and 'pip install "lightning-ewc[app]"' in done.stderr
    assert "hydra-core, matplotlib, scikit-learn" in done.stderr
    # the command (console script and python -m lightning_ewc) exits with the message alone
    done = without_app_extra("sys.argv = ['lightning-ewc']\nfrom lightning_ewc.__main__ import main\nmain()")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("lightning-ewc: the lightning-ewc app")
    assert 'pip install "lightning-ewc[app]"' in done.stderr


def test_pyproject_keeps_the_apps_dependencies_in_its_extra():
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", requirement)[0] for requirement in project["dependencies"]}
    assert names == {"torch", "lightning", "torchmetrics", "numpy"}
    extras = project["optional-dependencies"]
    assert {re.split(r"[<>= ]", r)[0] for r in extras["app"]} == {"hydra-core", "matplotlib", "scikit-learn"}
    # pip install -e ".[dev]" sets up the app and its tests too
    own_extras = [re.match(r"lightning-ewc\[(.*)\]$", r) for r in extras["dev"]]
    assert any("app" in match.group(1).replace(" ", "").split(",") for match in own_extras if match)
    assert project["scripts"]["lightning-ewc"] == "lightning_ewc.__main__:main"
