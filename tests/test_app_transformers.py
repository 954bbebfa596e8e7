"""Transformers in the app: the ViT backbone on the image streams, the synthetic sequence stream and the causal LM."""

import math

import pytest
import torch
from helpers import make_trainer
from test_app import compose_app, options, run_app
from torch.utils.data import DataLoader

from lightning_ewc import EWCCallback
from lightning_ewc.app.datamodule import TaskDataModule
from lightning_ewc.app.models import ContinualClassifier, ViT
from lightning_ewc.app.runner import build, build_model
from lightning_ewc.app.sequences import SEQUENCE_TASKS, CausalTransformer, SequenceClassifier, sequence_tasks
from lightning_ewc.app.streams import digits

# A small causal LM and stream for the runs below: 2 tasks, prompts of 4 symbols out of 5.
TINY_LM = ["model=causal_lm", "stream=sequence_tasks", "model.backbone.dim=32", "stream.length=4", "stream.vocab=5",
           "stream.train_samples=256", "stream.test_samples=128"]
TINY_VIT = ["model=vit", "model.backbone.dim=32", "model.backbone.depth=1"]


# ----------------------------------------------------------------------------------------------------------------------
# ViT
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [s for s in options("stream") if s != "sequence_tasks"])
def test_vit_defaults_fit_every_image_stream(stream, mnist_dir):
    small = [] if stream.endswith("digits") else ["stream.subsample=16", "stream.test_subsample=16"]
    cfg = compose_app("model=vit", f"stream={stream}", *small)
    built = build(cfg.stream)
    model = build_model(cfg, built)
    side = built.input_shape[-1]
    assert model.backbone.num_patches == math.ceil(side / cfg.model.backbone.patch_size) ** 2
    x, _, t = built.tasks[-1].test.tensors
    assert model(x[:3], t[:3]).shape == (3, built.classes_per_task)


def test_vit_pads_sizes_the_patch_does_not_divide_and_refuses_impossible_ones():
    x = torch.rand(2, 1, 28, 28)
    vit = ViT((1, 28, 28), patch_size=5, dim=16, depth=1, heads=2)
    assert vit.num_patches == 36 and vit(x).shape == (2, 16)  # 28 → 30: 6 x 6 patches
    # The zero padding is on the right and bottom: it is the same as a 30x30 image with those zeros.
    padded = torch.nn.functional.pad(x, (0, 2, 0, 2))
    tokens = vit.patches(padded).flatten(2).transpose(1, 2) + vit.positions.weight
    torch.testing.assert_close(vit(x), vit.norm(vit.encoder(tokens)).mean(1))
    with pytest.raises(ValueError, match=r"from 1 to 8 for 8x8 images .*\[1, 2, 4, 8\]"):
        ViT((1, 8, 8), patch_size=16)
    with pytest.raises(ValueError, match="multiple of model.backbone.heads"):
        ViT((1, 8, 8), dim=30, heads=4)
    with pytest.raises(ValueError, match=r"images \[channels, height, width\]"):
        ViT((13,))


@pytest.mark.parametrize("scenario, heads", [("task", 5), ("class", 1)])
def test_vit_runs_through_the_app_on_digits(scenario, heads, tmp_path):
    results = run_app(tmp_path, *TINY_VIT, f"stream.scenario={scenario}", "stream.num_tasks=2",
                      "train.steps_per_task=30")
    matrix = results["acc_matrix"]
    assert len(matrix) == 2 and results["config"]["model"]["backbone"]["_target_"].endswith("ViT")
    # 30 steps learn a pair of digits well above chance (1/2 per task head, 1/2 of the classes seen in class)
    assert matrix[0][0] > 0.8


def test_vit_runs_through_the_app_on_mnist(tmp_path, mnist_dir):
    results = run_app(tmp_path, *TINY_VIT, "stream=split_mnist", "stream.num_tasks=2", "stream.subsample=200",
                      "stream.test_subsample=200", "train.steps_per_task=20")
    assert results["stream"] == "split_mnist" and results["acc_matrix"][0][0] > 0.8  # 0 against 1


def fit_with_ewc(model, stream, fisher="exact", steps=3):
    """One task of a real fit with EWC on it; the callback after its importance pass."""
    ewc = EWCCallback(ewc_lambda=1.0, fisher=fisher, num_samples=32)
    datamodule = TaskDataModule(stream, batch_size=16)
    make_trainer(max_steps=steps, callbacks=[ewc]).fit(model, datamodule=datamodule)
    return ewc


def test_vit_importance_pass_takes_the_closed_form_routes():
    stream = digits(scenario="task", num_tasks=2)
    model = ContinualClassifier(ViT((1, 8, 8), dim=16, depth=2, heads=2), "task", 2, 2)
    routes = fit_with_ewc(model, stream).last_estimate.routes
    assert set(routes) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "vmap" not in routes.values()
    layer = "backbone.encoder.layers.1"
    assert routes["backbone.patches.weight"] == "conv" and routes["backbone.positions.weight"] == "embedding"
    assert routes[f"{layer}.self_attn.in_proj_weight"] == routes[f"{layer}.self_attn.in_proj_bias"] == "attention"
    assert routes[f"{layer}.self_attn.out_proj.weight"] == "linear"  # attention's own forward calls it as a module
    assert routes[f"{layer}.norm1.weight"] == routes["backbone.norm.bias"] == "layernorm"
    assert routes[f"{layer}.linear1.weight"] == routes["heads.1.weight"] == "linear"


# ----------------------------------------------------------------------------------------------------------------------
# The sequence stream
# ----------------------------------------------------------------------------------------------------------------------
PYTHON_TASKS = {
    "copy": lambda p, v: list(p),
    "reverse": lambda p, v: list(reversed(p)),
    "sort": lambda p, v: sorted(p),
    "increment": lambda p, v: [(s + 1) % v for s in p],
    "rotate": lambda p, v: list(p[1:]) + [p[0]],
}


def test_sequence_stream_scores_exactly_the_answer_tokens():
    assert set(PYTHON_TASKS) == set(SEQUENCE_TASKS)
    length, vocab = 5, 7
    names = sorted(SEQUENCE_TASKS)
    stream = sequence_tasks(tasks=names, length=length, vocab=vocab, train_samples=50, test_samples=20, seed=3)
    assert stream.input_shape == (2 * length + 1,) and stream.num_classes == vocab
    assert stream.vocab_size == vocab + 1 + len(names)
    for k, (name, task) in enumerate(zip(names, stream.tasks)):
        x, y, t = task.train.tensors
        assert x.shape == y.shape == (50, 2 * length + 1) and set(t.tolist()) == {k}
        assert (x[:, 0] == stream.task_token(k)).all() and (x[:, length + 1] == stream.separator).all()
        assert (y[:, : length + 1] == -100).all() and (y[:, length + 1 :] >= 0).all()
        for xs, ys in zip(x.tolist(), y.tolist()):
            prompt, answer = xs[1 : length + 1], ys[length + 1 :]
            assert answer == PYTHON_TASKS[name](prompt, vocab), name
            assert xs[length + 2 :] == answer[:-1]  # teacher forcing: the answer so far is in the input
    # seeded: the same seed gives the same data, another seed other prompts
    again = sequence_tasks(tasks=names, length=length, vocab=vocab, train_samples=50, test_samples=20, seed=3)
    other = sequence_tasks(tasks=names, length=length, vocab=vocab, train_samples=50, test_samples=20, seed=4)
    assert torch.equal(again.tasks[1].test.tensors[0], stream.tasks[1].test.tensors[0])
    assert not torch.equal(other.tasks[1].test.tensors[0], stream.tasks[1].test.tensors[0])
    assert not torch.equal(stream.tasks[1].train.tensors[0][:, 1:], stream.tasks[1].test.tensors[0][:20, 1:])


def test_sequence_stream_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="supports only stream.scenario=task.*copy and reverse"):
        sequence_tasks(scenario="domain")
    with pytest.raises(ValueError, match="supports only stream.scenario=task"):
        sequence_tasks(scenario="class")
    with pytest.raises(ValueError, match=r"out of \['copy'.*\['copy', 'shuffle'\]"):
        sequence_tasks(tasks=["copy", "shuffle"])
    with pytest.raises(ValueError, match="stream.length must be a whole number >= 2"):
        sequence_tasks(length=1)


# ----------------------------------------------------------------------------------------------------------------------
# The causal LM
# ----------------------------------------------------------------------------------------------------------------------
def test_the_causal_mask_hides_later_tokens():
    torch.manual_seed(0)
    lm = CausalTransformer((9,), vocab_size=12, dim=16, depth=2, heads=2).eval()
    tokens = torch.randint(0, 12, (4, 9))
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 12
    before, after = lm(tokens), lm(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)  # positions 0-4 cannot see position 5
    assert (before[:, 5:] - after[:, 5:]).abs().amax(-1).min() > 1e-3  # position 5 and every later one do


def test_causal_lm_has_per_position_logits_and_its_importance_routes():
    stream = sequence_tasks(tasks=["copy", "reverse"], length=4, vocab=5, train_samples=64, test_samples=16)
    cfg = compose_app(*TINY_LM)
    model = build_model(cfg, stream)
    assert isinstance(model, SequenceClassifier) and len(model.heads) == 2
    batch = next(iter(DataLoader(stream.tasks[1].train, batch_size=8)))
    assert model.ewc_logits(batch).shape == (8, 9, 5)  # [N, T, symbols]: EWC's Fisher sums over positions per sample
    ewc = fit_with_ewc(model, stream)
    routes = ewc.last_estimate.routes
    assert ewc.last_estimate.count == 32 and "vmap" not in routes.values()
    assert routes["backbone.encoder.layers.0.self_attn.in_proj_weight"] == "attention"
    assert routes["backbone.tokens.weight"] == routes["backbone.positions.weight"] == "embedding"
    assert routes["backbone.encoder.layers.1.norm2.weight"] == "layernorm"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model=causal_lm"], "reads token sequences, which stream digits does not give"),
        (["model=vit", "stream=sequence_tasks"], "gives token sequences, which model ViT cannot read"),
        (["model=mlp", "stream=sequence_tasks"], "model MLP cannot read: use model=causal_lm"),
        (["model=causal_lm", "stream=sequence_tasks", "stream.scenario=domain"], "supports only stream.scenario=task"),
    ],
)
def test_mismatched_model_and_stream_are_refused_before_training(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_app(tmp_path, *overrides)
    assert not (tmp_path / "results.json").exists()


def test_experiments_take_other_models_or_say_which_setting_to_drop():
    stream = digits(scenario="task")
    # The Split MNIST experiments leave the MLP's widths to model=mlp, so another model can replace it.
    assert isinstance(build_model(compose_app("experiment=split_mnist_task_il", "model=vit"), stream).backbone, ViT)
    # Permuted MNIST's MLP is 1000 wide: a ViT refuses the width, and the message says how to drop it.
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'hidden'.*~model\.backbone\.<name>"):
        build_model(compose_app("experiment=permuted_mnist_10", "model=vit"), stream)
    dropped = compose_app("experiment=permuted_mnist_10", "model=vit", "~model.backbone.hidden")
    assert isinstance(build_model(dropped, stream).backbone, ViT)


def test_tiny_causal_lm_learns_copy_and_ewc_keeps_it(tmp_path):
    """Copy, then reverse: fine-tuning forgets copy, EWC keeps most of it. Chance is 1/5 per answer token."""
    common = [*TINY_LM, "stream.tasks=[copy,reverse]", "train.steps_per_task=150"]
    finetune = run_app(tmp_path / "finetune", *common, "method=finetune")
    ewc = run_app(tmp_path / "ewc", *common, "method=ewc", "method.callback.ewc_lambda=1000",
                  "method.callback.num_samples=128")
    assert finetune["acc_matrix"][0][0] >= 0.9  # copy learnt
    assert finetune["acc_matrix"][1][1] >= 0.9  # reverse learnt
    assert finetune["acc_matrix"][1][0] < 0.6  # and copy forgotten by fine-tuning
    assert ewc["acc_matrix"][1][0] > finetune["acc_matrix"][1][0] + 0.2
