"""The consolidated quadratic equals the per-task springs it replaces; online EWC; constant state size."""

import pytest
import torch
from torch import nn

from lightning_ewc import EWCCallback
from lightning_ewc.consolidation import ConsolidatedState, merge_separate, quadratic_penalty


def random_tasks(shapes, num_tasks, seed=0, zero_fraction=0.3, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num_tasks):
        importance, anchor = {}, {}
        for name, shape in shapes.items():
            f = torch.rand(shape, generator=g) * 3
            f[torch.rand(shape, generator=g) < zero_fraction] = 0.0  # parameters that did not matter for this task
            importance[name] = f
            anchor[name] = offset + torch.randn(shape, generator=g)
        tasks.append((importance, anchor))
    return tasks


def per_task_penalty(tasks, theta):
    """Σ_t Σ_i F_t,i (θ_i − θ*_t,i)² in float64: the springs one by one, as Kirkpatrick et al. write them."""
    return sum(
        ((f[n].double() * (theta[n].double() - a[n].double()).square()).sum() for f, a in tasks for n in theta),
        torch.zeros((), dtype=torch.float64),
    )


def state_penalty(state, theta):
    names = list(state.importance)
    params = [theta[n] for n in names]
    value = quadratic_penalty([state.root_importance[n] for n in names], [state.centre[n] for n in names], params)
    return value + state.constant


SHAPES = {"w": (7, 5), "b": (5,)}


@pytest.mark.parametrize("num_tasks", [1, 3, 6])
def test_separate_equals_sum_of_per_task_springs_value_and_gradient(num_tasks):
    tasks = random_tasks(SHAPES, num_tasks)
    state = ConsolidatedState(mode="separate")
    for importance, anchor in tasks:
        state.consolidate(importance, anchor)
    assert state.num_tasks == num_tasks

    for trial in range(3):
        theta = {n: torch.randn(s, generator=torch.Generator().manual_seed(100 + trial), requires_grad=True)
                 for n, s in SHAPES.items()}
        got = state_penalty(state, theta)
        want = per_task_penalty(tasks, {n: t.detach() for n, t in theta.items()})
        assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)

        got_grads = torch.autograd.grad(got, list(theta.values()))
        theta64 = {n: t.detach().double().requires_grad_() for n, t in theta.items()}
        want_grads = torch.autograd.grad(per_task_penalty(tasks, theta64), list(theta64.values()))
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_penalty_gradient_through_a_retained_graph_twice_and_after_a_weight_change():
    """The backward reuses the forward's temporary in place; a second backward must still be right, and a weight
    changed in place between forward and backward must be an error, as with any autograd op."""
    tasks = random_tasks(SHAPES, 2)
    state = ConsolidatedState(mode="separate")
    for importance, anchor in tasks:
        state.consolidate(importance, anchor)
    theta = {n: torch.randn(s, generator=torch.Generator().manual_seed(7), requires_grad=True) for n, s in SHAPES.items()}
    theta64 = {n: t.detach().double().requires_grad_() for n, t in theta.items()}
    want = torch.autograd.grad(per_task_penalty(tasks, theta64), list(theta64.values()))

    value = state_penalty(state, theta)
    first = torch.autograd.grad(value, list(theta.values()), retain_graph=True)
    first = [g.clone() for g in first]
    second = torch.autograd.grad(value, list(theta.values()))
    for a, b, w in zip(first, second, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.double(), w, rtol=1e-5, atol=1e-6)

    value = state_penalty(state, theta)
    with torch.no_grad():
        theta["w"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def test_separate_penalty_at_the_minimum_is_the_constant():
    """At the weighted centre the quadratic part vanishes and only the springs' tension (the constant) remains."""
    tasks = random_tasks(SHAPES, 3, zero_fraction=0.0)
    state = ConsolidatedState(mode="separate")
    for importance, anchor in tasks:
        state.consolidate(importance, anchor)
    at_centre = per_task_penalty(tasks, state.centre)
    assert state.constant > 0
    assert state.constant == pytest.approx(float(at_centre), rel=1e-5)


def test_merge_is_numerically_stable_with_large_offsets():
    """Anchors far from zero with small differences: no Σ F θ² cancellation."""
    tasks = random_tasks(SHAPES, 4, offset=1e4, zero_fraction=0.0)
    state = ConsolidatedState(mode="separate")
    for importance, anchor in tasks:
        state.consolidate(importance, anchor)
    theta = {n: 1e4 + torch.randn(s) for n, s in SHAPES.items()}
    got = float(state_penalty(state, theta))
    want = float(per_task_penalty(tasks, theta))
    # float32 storage of θ≈1e4 has ulp 1e-3; relative error of the sum stays small.
    assert got == pytest.approx(want, rel=1e-3)


def test_zero_importance_everywhere_gives_zero_penalty_and_the_latest_anchor():
    zeros = {n: torch.zeros(s) for n, s in SHAPES.items()}
    state = ConsolidatedState(mode="separate")
    first = {n: torch.randn(s) for n, s in SHAPES.items()}
    second = {n: torch.randn(s) for n, s in SHAPES.items()}
    state.consolidate(zeros, first)
    state.consolidate(zeros, second)
    for n in SHAPES:
        assert torch.equal(state.centre[n], second[n])
        assert torch.isfinite(state.centre[n]).all()
    assert state.constant == 0.0
    assert float(state_penalty(state, {n: torch.randn(s) for n, s in SHAPES.items()})) == 0.0


def test_merge_separate_pure_function_two_springs():
    fa, a = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 5.0, 1.0])
    fb, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([4.0, 7.0, -1.0])
    total, centre, added = merge_separate(fa, a, fb, b)
    torch.testing.assert_close(total, torch.tensor([4.0, 0.0, 2.0]))
    torch.testing.assert_close(centre, torch.tensor([3.0, 7.0, 1.0]))  # (1·0 + 3·4)/4; no weight: latest; only a
    assert added == pytest.approx(1 * 3 / 4 * 16)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_online_is_decayed_sum_anchored_at_latest(gamma):
    tasks = random_tasks(SHAPES, 4)
    state = ConsolidatedState(mode="online", gamma=gamma)
    for importance, anchor in tasks:
        state.consolidate(importance, anchor)
    for n in SHAPES:
        want = sum(gamma ** (len(tasks) - 1 - t) * tasks[t][0][n] for t in range(len(tasks)))
        torch.testing.assert_close(state.importance[n], want)
        assert torch.equal(state.centre[n], tasks[-1][1][n])
    assert state.constant == 0.0
    theta = {n: torch.randn(s, requires_grad=True) for n, s in SHAPES.items()}
    value = state_penalty(state, theta)
    want = sum((state.importance[n] * (theta[n] - tasks[-1][1][n]).square()).sum() for n in SHAPES)
    assert float(value.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    grads = torch.autograd.grad(value, list(theta.values()))
    for g, n in zip(grads, SHAPES):
        torch.testing.assert_close(g, 2 * state.importance[n] * (theta[n].detach() - tasks[-1][1][n]))


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_size_is_constant_over_20_tasks(mode):
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    callback = EWCCallback(mode=mode, gamma=0.9 if mode == "online" else 1.0)
    sizes = []
    for t in range(20):
        importance = {n: torch.rand_like(p) for n, p in model.named_parameters()}
        callback.state.consolidate(importance, {n: p.detach() + t for n, p in model.named_parameters()})
        sizes.append(callback.num_bytes())
    assert callback.num_tasks == 20
    assert sizes == [2 * param_bytes] * 20


def test_penalty_through_callback_matches_formula_with_lambda_half():
    model = nn.Linear(6, 3)
    tasks = random_tasks({n: tuple(p.shape) for n, p in model.named_parameters()}, 3)
    callback = EWCCallback(ewc_lambda=7.0)
    for importance, anchor in tasks:
        callback.state.consolidate(importance, anchor)
    value = callback.penalty(model)
    want = 0.5 * 7.0 * per_task_penalty(tasks, {n: p.detach() for n, p in model.named_parameters()})
    assert float(value.detach()) == pytest.approx(float(want), rel=1e-5)
    value.backward()
    theta64 = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    want_grads = torch.autograd.grad(0.5 * 7.0 * per_task_penalty(tasks, theta64), list(theta64.values()))
    for p, w in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad.double(), w, rtol=1e-5, atol=1e-6)


def test_parameter_new_after_a_task_has_no_spring_until_its_task_ends():
    state = ConsolidatedState()
    state.consolidate({"trunk": torch.ones(3)}, {"trunk": torch.zeros(3)})
    assert "head2" not in state.importance
    state.consolidate({"trunk": torch.ones(3), "head2": torch.full((2,), 2.0)},
                      {"trunk": torch.ones(3), "head2": torch.full((2,), 5.0)})
    torch.testing.assert_close(state.importance["head2"], torch.full((2,), 2.0))
    torch.testing.assert_close(state.centre["head2"], torch.full((2,), 5.0))
    torch.testing.assert_close(state.centre["trunk"], torch.full((3,), 0.5))


def test_resized_parameter_is_a_clear_error():
    state = ConsolidatedState()
    state.consolidate({"head.weight": torch.ones(2, 4)}, {"head.weight": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="head.weight.*shape.*new head|exclude"):
        state.consolidate({"head.weight": torch.ones(3, 4)}, {"head.weight": torch.zeros(3, 4)})
    callback = EWCCallback()
    callback.state = state
    model = nn.Module()
    model.head = nn.Linear(4, 3, bias=False)
    with pytest.raises(ValueError, match="head.weight.*resized"):
        callback.penalty(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="sum"), "unknown mode"),
        (dict(mode="online", gamma=-0.1), "gamma must be in"),
        (dict(mode="online", gamma=1.5), "gamma must be in"),
        (dict(ewc_lambda=-1.0), "ewc_lambda must be"),
        (dict(ewc_lambda=float("nan")), "ewc_lambda must be a finite number"),
        (dict(ewc_lambda=float("inf")), "ewc_lambda must be a finite number"),
        (dict(ewc_lambda=True), "ewc_lambda must be"),
        (dict(mode="online", gamma=float("nan")), "gamma must be in"),
        (dict(importance="fisherr"), "unknown importance"),
        (dict(fisher="diag"), "unknown Fisher estimator"),
        (dict(num_samples=0), "num_samples must be"),
        (dict(exclude="heads.*"), "list of glob patterns"),
        (dict(importance="si", si_damping=0.0), "damping"),
        (dict(importance="si", si_damping=float("inf")), "damping"),
    ],
)
def test_bad_callback_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EWCCallback(**kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -2.0])
def test_lambda_set_between_tasks_is_checked_too(value):
    callback = EWCCallback(ewc_lambda=1.0)
    with pytest.raises(ValueError, match="ewc_lambda must be a finite number >= 0"):
        callback.ewc_lambda = value
    assert callback.ewc_lambda == 1.0
    callback.ewc_lambda = 5
    assert callback.ewc_lambda == 5.0


def consolidated_callback(model: nn.Module, penalty_via: str = "loss", seed: int = 0) -> EWCCallback:
    callback = EWCCallback(ewc_lambda=2.0, penalty_via=penalty_via)
    tasks = random_tasks({n: tuple(p.shape) for n, p in model.named_parameters()}, 2, seed=seed)
    for importance, anchor in tasks:
        callback.state.consolidate(importance, anchor)
    return callback


def test_a_replaced_parameter_is_seen_after_the_penalty_was_cached():
    """The penalty caches which tensors it acts on; a module replaced after that must not be served from the cache."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    callback = consolidated_callback(model)
    callback.penalty(model).backward()  # cached now
    model[1] = nn.Linear(3, 5)  # a new head of another size
    with pytest.raises(ValueError, match=r"'1\.weight' has shape \(5, 3\) but was consolidated with shape \(2, 3\)"):
        callback.penalty(model)
    model[1] = nn.Linear(3, 2)  # the same size: the penalty must act on (and give a gradient to) the new tensor
    value = callback.penalty(model)
    value.backward()
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
    want = 0.5 * 2.0 * (sum(float((callback.state.importance[n] * (p.detach() - callback.state.centre[n]) ** 2).sum())
                            for n, p in model.named_parameters()) + callback.state.constant)
    assert float(value.detach()) == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        model[1].weight.data = torch.zeros(4, 3)  # a shape change behind the module's back
    with pytest.raises(ValueError, match="'1.weight' has shape"):
        callback.penalty(model)


def test_penalty_supports_second_derivatives():
    """Under create_graph=True the gradient is differentiable: the Hessian of (λ/2) Σ F (θ − c)² is λ F on the
    diagonal (a Hessian-vector product, a gradient penalty), not silently zero."""
    model = nn.Linear(5, 3).double()
    callback = consolidated_callback(model)
    params = list(model.parameters())
    grads = torch.autograd.grad(callback.penalty(model), params, create_graph=True)
    vector = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(grads, params, grad_outputs=vector)
    for (name, _), v, h in zip(model.named_parameters(), vector, hvp):
        torch.testing.assert_close(h, 2.0 * callback.state.importance[name].double() * v, rtol=1e-6, atol=1e-9)
    state = callback.state
    roots = [state.root_importance[n].double() for n, _ in model.named_parameters()]
    centres = [state.centre[n].double() for n, _ in model.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradgradcheck(lambda *ps: quadratic_penalty(roots, centres, ps), inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_keep_a_float32_state(dtype):
    """An importance of 1e-9 is 0 in float16; the state and the penalty stay float32 whatever the weights' dtype."""
    state = ConsolidatedState()
    importance = {"w": torch.tensor([1e-9, 3.0], dtype=dtype)}
    anchor = {"w": torch.tensor([1.0, 2.0], dtype=dtype)}
    state.consolidate({"w": torch.tensor([1e-9, 3.0])}, anchor)
    assert state.importance["w"].dtype == state.centre["w"].dtype == torch.float32
    assert float(state.importance["w"][0]) == pytest.approx(1e-9, rel=1e-5)
    state.consolidate(importance, anchor)  # a half-precision importance is widened, not the state narrowed
    assert state.importance["w"].dtype == torch.float32

    model = nn.Linear(8, 4).to(dtype)
    callback = consolidated_callback(model)
    stored = {n: (f.clone(), f.dtype) for n, f in callback.state.root_importance.items()}
    value = callback.penalty(model)
    assert value.dtype == torch.float32
    want = 0.5 * 2.0 * (sum(float((callback.state.importance[n].double() * (p.detach().double()
                                   - callback.state.centre[n].double()) ** 2).sum())
                            for n, p in model.named_parameters()) + callback.state.constant)
    assert float(value.detach()) == pytest.approx(want, rel=1e-5)
    value.backward()
    for n, p in model.named_parameters():
        assert p.grad.dtype == dtype
        want_grad = 2.0 * callback.state.importance[n] * (p.detach().float() - callback.state.centre[n])
        torch.testing.assert_close(p.grad.float(), want_grad, rtol=1e-2, atol=1e-3)
    for n, (f, dtype_before) in stored.items():  # the cache made copies; the state itself was not recast
        assert callback.state.root_importance[n].dtype == dtype_before == torch.float32
        assert torch.equal(callback.state.root_importance[n], f)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_side_penalty_on_half_precision_weights(dtype):
    model = nn.Linear(8, 4).to(dtype)
    callback = consolidated_callback(model, penalty_via="gradient")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    callback.add_penalty_gradient(model)
    for n, p in model.named_parameters():
        want = 2.0 * callback.state.importance[n] * (p.detach().float() - callback.state.centre[n])
        torch.testing.assert_close(p.grad.float(), want, rtol=1e-2, atol=1e-3)
    assert all(f.dtype == torch.float32 for f in callback.state.fisher.values())
