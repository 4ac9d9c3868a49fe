"""Task regularisers (group lasso, learned task covariance, tensor-normal prior) and ``drn``.

Each penalty and update is checked against an independent implementation in NumPy (loops,
explicit unfoldings and Kronecker products), the closed-form updates against the objective
they minimise (random feasible points never do better), and the attachment against the
model contract (outputs unchanged, partition kept, gradient only on the selected weights,
state saved in the state dict).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from polytask.config import load_config
from polytask.data.multidigits import multidigits
from polytask.errors import ConfigError
from polytask.models import ARCHITECTURES, check_parameter_partition, linear_head, mlp_head
from polytask.models.backbones import MLP
from polytask.models.regularizers import (
    ClusteredTasks,
    GroupLasso,
    RegularizerSpec,
    TaskCovariance,
    TensorNormal,
    attach_regularizers,
    select_layers,
)
from polytask.models.regularizers.clustered import optimal_cluster_covariance
from polytask.models.regularizers.task_covariance import optimal_task_covariance
from polytask.models.regularizers.tensor_normal import flip_flop, tensor_normal_quadratic
from polytask.models.sharing import HardSharing
from polytask.training.build import build_model, check_component_options

TASKS = ["a", "b", "c"]


def _random_spd(n: int, rng: np.random.Generator) -> np.ndarray:
    m = rng.normal(size=(n, n))
    return m @ m.T + n * np.eye(n)


# -- group lasso ---------------------------------------------------------------------------


def _naive_group_lasso(weights: list[np.ndarray], norm: str) -> tuple[float, list[np.ndarray]]:
    """sum_j ||a_j||_q and its minimum-norm subgradient, one feature at a time."""
    d = weights[0].shape[1]
    total = 0.0
    grads = [np.zeros_like(w) for w in weights]
    for j in range(d):
        block = np.concatenate([w[:, j].ravel() for w in weights])
        if norm == "l2":
            value = math.sqrt(float((block**2).sum()))
            g = block / value if value > 0 else np.zeros_like(block)
        else:
            value = float(np.abs(block).max())
            ties = np.abs(block) == value
            g = np.where(ties, np.sign(block), 0.0) / ties.sum() if value > 0 else 0 * block
        total += value
        start = 0
        for w, grad in zip(weights, grads, strict=True):
            size = w[:, j].size
            grad[:, j] = g[start : start + size].reshape(w[:, j].shape)
            start += size
    return total, grads


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_group_lasso_penalty_and_subgradient_match_a_loop_over_features(norm: str) -> None:
    gen = torch.Generator().manual_seed(0)
    # different output sizes, a convolution-shaped weight, and one all-zero feature
    shapes = [(3, 5, 2), (4, 5, 2), (2, 5, 2)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    for w in weights:
        w[:, 2] = 0.0
    weights[1][0, 4, 1] = weights[0][0, 4, 0] = 9.0  # a tie for l_inf
    params = [w.clone().requires_grad_(True) for w in weights]
    reg = GroupLasso(tasks=TASKS, shapes=[shapes], norm=norm)  # type: ignore[arg-type]
    value = reg.penalty([params])
    value.backward()
    expected, grads = _naive_group_lasso([w.numpy() for w in weights], norm)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    for p, g in zip(params, grads, strict=True):
        assert p.grad is not None
        np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-12, atol=1e-15)
    assert all(float(p.grad[:, 2].abs().sum()) == 0.0 for p in params if p.grad is not None)
    diag = reg.diagnostics()["groups"][0]
    assert diag == {"features": 5, "active": 4, "norm": pytest.approx(expected)}
    norms = reg.inspect()["task_norms/0"]
    assert norms.shape == (3, 5)
    assert norms[1, 3].item() == pytest.approx(float(weights[1][:, 3].norm()), rel=1e-6)


def test_group_lasso_refuses_layers_with_different_inputs() -> None:
    with pytest.raises(ConfigError, match="input sizes"):
        GroupLasso(tasks=TASKS, shapes=[[(3, 5), (3, 6), (3, 5)]])


# -- task covariance (Zhang and Yeung 2010) -------------------------------------------------


def _naive_omega(w: np.ndarray, eps: float) -> np.ndarray:
    a = w.T @ w + eps * np.eye(w.shape[1])
    values, vectors = np.linalg.eigh(a)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    return root / np.trace(root)


def _mtrl_objective(w: np.ndarray, omega: np.ndarray, eps: float) -> float:
    inverse = np.linalg.inv(omega)
    return float(np.trace(w @ inverse @ w.T) + eps * np.trace(inverse))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_task_covariance_update_is_the_closed_form_and_minimises_the_objective(eps: float) -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(7, 3))
    omega = optimal_task_covariance(torch.from_numpy(w), eps).numpy()
    expected = _naive_omega(w, eps)
    np.testing.assert_allclose(omega, expected, rtol=1e-10, atol=1e-12)
    # the squared trace norm at the optimum (of W at eps = 0)
    best = _mtrl_objective(w, omega, eps)
    a = w.T @ w + eps * np.eye(3)
    assert best == pytest.approx(float(np.sqrt(np.linalg.eigvalsh(a)).sum()) ** 2, rel=1e-9)
    # no feasible covariance (positive definite, unit trace) does better
    for _ in range(200):
        other = _random_spd(3, rng) * rng.uniform(0.05, 5) + rng.uniform(0, 2) * omega
        other /= np.trace(other)
        assert _mtrl_objective(w, other, eps) >= best * (1 - 1e-12)
    for step in (1e-3, -1e-3):  # small moves inside the feasible set
        direction = rng.normal(size=(3, 3))
        direction = direction + direction.T
        direction -= np.trace(direction) / 3 * np.eye(3)
        assert _mtrl_objective(w, omega + step * direction, eps) > best


def test_task_covariance_penalty_gradient_and_learned_relations() -> None:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    other = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    # a and b identical, c the negative of a plus noise
    weights = [base, base.clone(), -base + 0.05 * other]
    reg = TaskCovariance(tasks=TASKS, shapes=[[(4, 6)] * 3], eps=1e-8)
    np.testing.assert_allclose(reg.omega.numpy(), np.eye(3) / 3)  # independent at first
    reg.update([weights])
    w = np.stack([x.numpy().ravel() for x in weights], axis=1)
    np.testing.assert_allclose(reg.omega.numpy(), _naive_omega(w, 1e-8), rtol=1e-8)
    corr = reg.correlation()
    assert corr[0, 1].item() == pytest.approx(1.0, abs=1e-3)  # sqrt(eps) keeps it below 1
    # Omega is the square root of the Gram matrix: its correlations are not the cosines
    assert corr[0, 2].item() < -0.9
    params = [x.clone().requires_grad_(True) for x in weights]
    value = reg.penalty([params])
    value.backward()
    inverse = np.linalg.inv(reg.omega.numpy())
    assert value.item() == pytest.approx(float(np.trace(w @ inverse @ w.T)), rel=1e-10)
    grad = 2 * w @ inverse  # d tr(W O^-1 W^T) / dW
    for t, p in enumerate(params):
        assert p.grad is not None
        np.testing.assert_allclose(p.grad.numpy().ravel(), grad[:, t], rtol=1e-8)
    diag = reg.diagnostics()
    json.dumps(diag)
    assert diag["correlation"]["a"]["b"] == corr[0, 1].item()


# -- tensor normal (Long et al.) -----------------------------------------------------------


def _unfold(t: np.ndarray, mode: int) -> np.ndarray:
    """Kolda's mode-n unfolding (column-major order of the remaining indices)."""
    return np.reshape(np.moveaxis(t, mode, 0), (t.shape[mode], -1), order="F")


def _nll(t: np.ndarray, s1: np.ndarray, s2: np.ndarray, s3: np.ndarray) -> float:
    d1, d2, k = t.shape
    v = t.reshape(-1, order="F")
    cov = np.kron(s3, np.kron(s2, s1))
    quad = float(v @ np.linalg.solve(cov, v))
    logdet = [np.linalg.slogdet(s)[1] for s in (s1, s2, s3)]
    return 0.5 * quad + 0.5 * (d2 * k * logdet[0] + d1 * k * logdet[1] + d1 * d2 * logdet[2])


def test_tensor_normal_quadratic_matches_the_kronecker_form() -> None:
    rng = np.random.default_rng(3)
    t = rng.normal(size=(3, 4, 2))
    sigmas = [_random_spd(n, rng) for n in (3, 4, 2)]
    value = tensor_normal_quadratic(torch.from_numpy(t), [torch.from_numpy(s) for s in sigmas])
    v = t.reshape(-1, order="F")
    cov = np.kron(sigmas[2], np.kron(sigmas[1], sigmas[0]))
    assert value.item() == pytest.approx(float(v @ np.linalg.solve(cov, v)), rel=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_flip_flop_is_the_papers_closed_form(eps: float) -> None:
    rng = np.random.default_rng(4)
    t = rng.normal(size=(3, 4, 2))
    s1, s2, s3 = (_random_spd(n, rng) for n in (3, 4, 2))
    new = flip_flop(torch.from_numpy(t), [torch.from_numpy(s) for s in (s1, s2, s3)], eps)
    d1, d2, k = t.shape
    e1 = _unfold(t, 0) @ np.linalg.inv(np.kron(s3, s2)) @ _unfold(t, 0).T / (d2 * k)
    e1 += eps * np.eye(d1)
    e2 = _unfold(t, 1) @ np.linalg.inv(np.kron(s3, e1)) @ _unfold(t, 1).T / (d1 * k)
    e2 += eps * np.eye(d2)
    e3 = _unfold(t, 2) @ np.linalg.inv(np.kron(e2, e1)) @ _unfold(t, 2).T / (d1 * d2)
    e3 += eps * np.eye(k)
    for got, want in zip(new, (e1, e2, e3), strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_each_flip_flop_update_minimises_the_likelihood_in_its_factor() -> None:
    rng = np.random.default_rng(5)
    t = rng.normal(size=(2, 3, 4))  # every unfolding has full row rank
    s1, s2, s3 = (_random_spd(n, rng) for n in (2, 3, 4))
    n1, n2, n3 = (
        s.numpy()
        for s in flip_flop(torch.from_numpy(t), [torch.from_numpy(x) for x in (s1, s2, s3)], 0.0)
    )
    # each update is the minimiser given the latest others: (n1 | s2, s3), (n2 | n1, s3), ...
    for factor, point in enumerate([[n1, s2, s3], [n1, n2, s3], [n1, n2, n3]]):
        best = point[factor]
        value = _nll(t, *point)
        n = best.shape[0]
        for _ in range(100):
            trial = list(point)
            trial[factor] = rng.uniform(0.2, 3) * best + 0.3 * _random_spd(n, rng) / n
            assert _nll(t, *trial) > value
        for step in (1e-4, -1e-4):
            direction = rng.normal(size=(n, n))
            trial = list(point)
            trial[factor] = best + step * (direction + direction.T)
            assert _nll(t, *trial) > value
    assert _nll(t, n1, n2, n3) < _nll(t, s1, s2, s3)


def test_tensor_normal_learns_the_task_relation_and_keeps_the_scale() -> None:
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    weights = [base, 0.9 * base + 0.1 * noise, -base]
    reg = TensorNormal(tasks=TASKS, shapes=[[(5, 8)] * 3], eps=1e-6)
    for _ in range(20):
        reg.update([weights])
    s1, s2, _ = reg.covariances(0)
    assert s1.trace().item() == pytest.approx(5.0) and s2.trace().item() == pytest.approx(8.0)
    corr = reg.correlation(0)
    # measured 0.87 (the learned feature covariances whiten the 40 weights, and with them
    # the noise) and -1.0
    assert corr[0, 1].item() > 0.8 and corr[0, 2].item() < -0.999
    json.dumps(reg.diagnostics())
    # the rescaling leaves the prior unchanged: one more sweep, raw and rescaled
    start = [c.clone() for c in reg.covariances(0)]
    t = torch.stack(weights, dim=2)
    raw = flip_flop(t, start, 1e-6)
    reg.update([weights])
    kron = [torch.kron(c[2], torch.kron(c[1], c[0])) for c in (raw, reg.covariances(0))]
    assert torch.allclose(kron[0], kron[1], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(raw[0], reg.covariances(0)[0])
    # at the likelihood's optimum the quadratic form is D1 D2 rank(T_(3)): 5 x 8 x 2 (c = -a)
    assert tensor_normal_quadratic(t, reg.covariances(0)).item() == pytest.approx(80, rel=1e-3)


def test_task_only_prior_keeps_the_feature_covariances_at_the_identity() -> None:
    weights = [torch.randn(3, 4, dtype=torch.float64) for _ in TASKS]
    reg = TensorNormal(tasks=TASKS, shapes=[[(3, 4)] * 3], eps=1e-3, feature_covariances=False)
    reg.update([weights])
    s1, s2, s3 = reg.covariances(0)
    assert torch.equal(s1, torch.eye(3, dtype=torch.float64))
    assert torch.equal(s2, torch.eye(4, dtype=torch.float64))
    w = np.stack([x.numpy().ravel() for x in weights], axis=1)
    np.testing.assert_allclose(s3.numpy(), w.T @ w / 12 + 1e-3 * np.eye(3), rtol=1e-10)


# -- attached to architectures --------------------------------------------------------------


def _model(arch: str = "hps", head: Any = mlp_head) -> Any:
    bundle = multidigits(n_train=8, n_val=4, n_test=4)
    torch.manual_seed(0)
    factory = ARCHITECTURES.get(arch)
    return factory(
        tasks=bundle.tasks,
        backbone=lambda: MLP(input_shape=bundle.input_shape, hidden=[12]),
        head=head,
    ), bundle


SPECS = [
    RegularizerSpec("group_lasso", 0.1),
    RegularizerSpec("task_covariance", 0.2, layers=[-1]),
    RegularizerSpec("tensor_normal", 0.3, {"eps": 0.01}, layers=[0, 1]),
]


@pytest.mark.parametrize("arch", ["hps", "single_task", "soft"])
def test_attaching_keeps_outputs_and_partition_and_touches_only_the_selected_weights(
    arch: str,
) -> None:
    model, bundle = _model(arch)
    x = torch.randn(3, *bundle.input_shape)
    before = {k: v.clone() for k, v in model(x).items()}
    names_before = [n for n, _ in model.named_parameters()]
    own_penalty = model.regularization()
    attach_regularizers(model, SPECS)
    assert isinstance(model, type(_model(arch)[0]))
    assert [n for n, _ in model.named_parameters()] == names_before
    after = model(x)
    assert all(torch.equal(before[t], after[t]) for t in before)
    check_parameter_partition(model)
    model.train()
    for key in ("group_lasso", "task_covariance", "tensor_normal"):
        model.zero_grad()
        reg = model.task_regularizers[key]
        layers = model._regularizer_inputs(key)
        (reg.penalty(layers)).backward()
        selected = {id(p) for p in model.regularizer_parameters(key)}
        assert len(selected) == len(layers) * 2
        for name, p in model.named_parameters():
            touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
            assert touched == (id(p) in selected), (key, name)
    # regularization(): the architecture's own term plus the weighted penalties
    model.zero_grad()
    total = model.regularization()
    assert total is not None
    expected = sum(
        w * model.task_regularizers[k].penalty(model._regularizer_inputs(k))
        for k, w in (("group_lasso", 0.1), ("task_covariance", 0.2), ("tensor_normal", 0.3))
    )
    if own_penalty is not None:  # soft sharing's own term, for the same weights
        expected = expected + own_penalty
    assert total.detach().item() == pytest.approx(float(expected.detach()), rel=1e-6)
    diagnostics = model.diagnostics()
    json.dumps(diagnostics)
    assert set(diagnostics["regularizers"]) == {"group_lasso", "task_covariance", "tensor_normal"}
    arrays = model.inspect(x)
    assert arrays["regularizers/task_covariance/covariance"].shape == (2, 2)


def test_the_covariances_are_updated_in_training_mode_only_and_saved() -> None:
    model, _ = _model()
    attach_regularizers(model, [RegularizerSpec("task_covariance", 1.0)])
    reg = model.task_regularizers["task_covariance"]
    model.eval()
    model.regularization()
    assert torch.equal(reg.omega, torch.eye(2, dtype=torch.float64) / 2)
    model.train()
    model.regularization()
    w = torch.stack(
        [p.detach().reshape(-1) for p in model.regularizer_parameters("task_covariance")], 1
    )
    assert torch.allclose(reg.omega, optimal_task_covariance(w, reg.eps))
    state = model.state_dict()
    assert "task_regularizers.task_covariance.omega" in state
    fresh, _ = _model()
    attach_regularizers(fresh, [RegularizerSpec("task_covariance", 1.0)])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.task_regularizers["task_covariance"].omega, reg.omega)


def test_selection_by_pattern_and_index() -> None:
    model, _ = _model()
    assert select_layers(model) == [["heads.left.0.weight", "heads.right.0.weight"]]
    assert (
        select_layers(model, "heads.{task}.2.*", [0, -1])
        == [["heads.left.2.weight", "heads.right.2.weight"]] * 2
    )
    with pytest.raises(ConfigError, match="out of range"):
        select_layers(model, None, [2])
    with pytest.raises(ConfigError, match="matches 'encoder"):
        select_layers(model, "encoder.*")


def test_drn_is_hard_sharing_with_the_prior_on_every_head_weight() -> None:
    drn, bundle = _model("drn")
    hps, _ = _model("hps")
    attach_regularizers(hps, [RegularizerSpec("tensor_normal", 1e-5, {"eps": 1e-3}, layers=[0, 1])])
    assert isinstance(drn, HardSharing)
    assert drn.state_dict().keys() == hps.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(drn.state_dict().values(), hps.state_dict().values(), strict=True)
    )
    drn.train(), hps.train()
    for _ in range(2):
        a, b = drn.regularization(), hps.regularization()
        assert a is not None and b is not None and torch.equal(a, b)
    with pytest.raises(ConfigError, match="several tasks"):
        ARCHITECTURES.get("drn")(
            tasks={"left": bundle.tasks["left"]},
            backbone=lambda: MLP(input_shape=bundle.input_shape, hidden=[4]),
            head=linear_head,
        )


def _config(**model: Any) -> Any:
    return load_config(
        {
            "data": {"name": "multidigits", "options": {"n_train": 8, "n_val": 4, "n_test": 4}},
            "model": {
                "architecture": "hps",
                "backbone": "mlp",
                "backbone_options": {"hidden": [8]},
                **model,
            },
        }
    )


def test_config_errors_name_the_key() -> None:
    bundle = multidigits(n_train=8, n_val=4, n_test=4)
    with pytest.raises(ConfigError, match=r"model.regularizers\[0\].name: expected the name"):
        check_component_options(_config(regularizers=[{"weight": 1.0}]))
    with pytest.raises(ConfigError, match="unknown regularizer 'group_lass'"):
        check_component_options(_config(regularizers=[{"name": "group_lass"}]))
    with pytest.raises(ConfigError, match=r"model.regularizers\[0\].options.norm"):
        check_component_options(
            _config(regularizers=[{"name": "group_lasso", "options": {"norm": "l3"}}])
        )
    with pytest.raises(ConfigError, match=r"model.regularizers\[0\].weight"):
        _config(regularizers=[{"name": "group_lasso", "weight": -1}])
    bad = _config(regularizers=[{"name": "task_covariance", "layers": [0]}], head="linear")
    # linear heads of 10 classes each: same shapes, accepted
    assert build_model(bad, bundle.tasks, bundle.input_shape).task_regularizers
    with pytest.raises(ConfigError, match=r"model.regularizers\[1\]: layer index 3"):
        build_model(
            _config(regularizers=[{"name": "group_lasso"}, {"name": "group_lasso", "layers": [3]}]),
            bundle.tasks,
            bundle.input_shape,
        )
    model = build_model(
        _config(regularizers=[{"name": "group_lasso"}, {"name": "group_lasso", "weight": 0}]),
        bundle.tasks,
        bundle.input_shape,
    )
    assert list(model.task_regularizers) == ["group_lasso", "group_lasso_2"]


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match="one shape"):
        TaskCovariance(tasks=TASKS, shapes=[[(3, 4), (3, 4), (2, 4)]])
    with pytest.raises(ConfigError, match="several tasks"):
        TensorNormal(tasks=["a"], shapes=[[(3, 4)]])


def test_gradient_of_the_attached_penalty_reaches_no_shared_parameter() -> None:
    model, _ = _model("hps", linear_head)
    attach_regularizers(model, SPECS[:2])
    model.train()
    penalty = model.regularization()
    assert penalty is not None
    penalty.backward()
    assert all(p.grad is None for p in model.shared_parameters())
    heads: list[nn.Parameter] = [p for t in model.task_names for p in model.task_parameters(t)]
    assert all(p.grad is not None for p in heads if p.dim() == 2)
    assert all(p.grad is None for p in heads if p.dim() == 1)


def test_the_config_key_round_trips_through_the_runs_config_file() -> None:
    from polytask.config import Config, from_dict, to_dict

    config = _config(
        regularizers=[{"name": "tensor_normal", "layers": [0, -1], "options": {"eps": 0.1}}]
    )
    again = from_dict(Config, to_dict(config))
    assert again == config
    (reg,) = again.model.regularizers
    assert (reg.name, reg.weight, reg.layers, reg.options) == (
        "tensor_normal",
        1e-3,
        [0, -1],
        {"eps": 0.1},
    )


# -- clustered multi-task learning (Jacob, Bach and Vert 2008) -----------------------------

CLUSTER_TASKS = ["a", "b", "c", "d", "e"]


def _clustered(clusters: int = 2) -> ClusteredTasks:
    shapes = [[(2, 3)] * len(CLUSTER_TASKS)]
    return ClusteredTasks(
        tasks=CLUSTER_TASKS,
        shapes=shapes,
        clusters=clusters,
        eps_mean=0.5,
        eps_between=1.0,
        eps_within=10.0,
    )


def _naive_cluster_penalty(w: np.ndarray, groups: list[list[int]], reg: ClusteredTasks) -> float:
    """The paper's non-convex penalty for known clusters, with loops over the clusters."""
    mean = w.mean(axis=1)
    total = reg.eps_mean * w.shape[1] * float(mean @ mean)
    for group in groups:
        centre = w[:, group].mean(axis=1)
        total += (1 / reg.beta) * len(group) * float((centre - mean) @ (centre - mean))
        total += (1 / reg.alpha) * sum(
            float((w[:, t] - centre) @ (w[:, t] - centre)) for t in group
        )
    return total


def _cluster_objective(w: np.ndarray, sigma: np.ndarray, reg: ClusteredTasks) -> float:
    mean = w.mean(axis=1)
    centred = w - mean[:, None]
    quad = float(np.trace(centred @ np.linalg.inv(sigma) @ centred.T))
    return reg.eps_mean * w.shape[1] * float(mean @ mean) + quad


def test_clustered_update_is_feasible_and_minimises_over_the_relaxed_set() -> None:
    rng = np.random.default_rng(7)
    reg = _clustered()
    w = rng.normal(size=(6, 5))
    sigma = optimal_cluster_covariance(torch.from_numpy(w), reg.alpha, reg.beta, reg.gamma).numpy()
    values = np.linalg.eigvalsh(sigma)
    assert values.min() >= reg.alpha - 1e-12 and values.max() <= reg.beta + 1e-12
    assert np.trace(sigma) == pytest.approx(reg.gamma, rel=1e-10)
    best = _cluster_objective(w, sigma, reg)
    for _ in range(300):  # random feasible points: random eigenbasis and eigenvalues
        q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
        lam = rng.uniform(reg.alpha, reg.beta, size=5)
        for _ in range(50):  # move the sum to gamma without leaving [alpha, beta]
            gap = reg.gamma - lam.sum()
            room = (reg.beta - lam) if gap > 0 else (lam - reg.alpha)
            lam = lam + np.sign(gap) * room * min(1.0, abs(gap) / max(room.sum(), 1e-300))
        assert lam.sum() == pytest.approx(reg.gamma, rel=1e-9)
        assert _cluster_objective(w, q @ np.diag(lam) @ q.T, reg) >= best * (1 - 1e-12)


def test_clustered_relaxation_is_below_the_penalty_of_the_true_clusters() -> None:
    rng = np.random.default_rng(8)
    reg = _clustered()
    centres = rng.normal(size=(6, 2)) * 3
    groups = [[0, 1], [2, 3, 4]]
    w = np.stack([centres[:, 0 if t in groups[0] else 1] for t in range(5)], axis=1)
    w = w + 0.1 * rng.normal(size=w.shape)
    # the true clusters' Sigma: beta on the r - 1 between directions, alpha elsewhere
    e = np.zeros((5, 2))
    for c, group in enumerate(groups):
        e[group, c] = 1
    m = e @ np.linalg.inv(e.T @ e) @ e.T
    u = np.full((5, 5), 1 / 5)
    true_sigma = reg.beta * (m - u) + reg.alpha * (np.eye(5) - m + u)
    assert np.trace(true_sigma) == pytest.approx(reg.gamma)
    naive = _naive_cluster_penalty(w, groups, reg)
    assert _cluster_objective(w, true_sigma, reg) == pytest.approx(naive, rel=1e-10)
    reg.update([[torch.from_numpy(w[:, t].reshape(2, 3)) for t in range(5)]])
    relaxed = _cluster_objective(w, reg.sigma.numpy(), reg)
    assert relaxed <= naive
    corr = reg.correlation()
    within = [corr[0, 1], corr[2, 3], corr[2, 4], corr[3, 4]]
    across = [corr[s, t] for s in groups[0] for t in groups[1]]
    assert min(within) > 0.5 and max(across) < -0.5  # measured: 0.54 to 0.73; -0.62 to -0.64
    json.dumps(reg.diagnostics())


def test_clustered_gradient_is_the_gradient_of_the_relaxed_penalty() -> None:
    """Danskin: with Sigma the minimiser for the current weights, the penalty's gradient at
    fixed Sigma equals the gradient of R(W) = min over Sigma (central differences)."""
    rng = np.random.default_rng(9)
    reg = _clustered()
    w = rng.normal(size=(6, 5))

    def relaxed(x: np.ndarray) -> float:
        sigma = optimal_cluster_covariance(torch.from_numpy(x), reg.alpha, reg.beta, reg.gamma)
        return _cluster_objective(x, sigma.numpy(), reg)

    weights = [torch.tensor(w[:, t].reshape(2, 3), requires_grad=True) for t in range(5)]
    reg.update([[x.detach() for x in weights]])
    reg.penalty([weights]).backward()
    h = 1e-6
    for i, t in [(0, 0), (3, 2), (5, 4), (2, 1)]:
        step = np.zeros_like(w)
        step[i, t] = h
        numeric = (relaxed(w + step) - relaxed(w - step)) / (2 * h)
        grad = weights[t].grad
        assert grad is not None
        assert grad.reshape(-1)[i].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_clustered_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="between 1 and the number of tasks"):
        _clustered(clusters=6)
    with pytest.raises(ConfigError, match="eps_within"):
        ClusteredTasks(tasks=TASKS, shapes=[[(2, 2)] * 3], eps_between=2.0, eps_within=1.0)
    one = _clustered(clusters=1)  # a single cluster: Sigma = alpha I, the plain spread
    one.update([[torch.randn(2, 3, dtype=torch.float64) for _ in CLUSTER_TASKS]])
    assert torch.allclose(one.sigma, one.alpha * torch.eye(5, dtype=torch.float64))


def test_task_covariance_step_is_a_gradient_step_on_the_squared_trace_norm() -> None:
    """With Omega updated first, the penalty's gradient is that of the objective minimised
    over Omega, (tr (W^T W + eps I)^{1/2})^2 (Danskin), differentiated here by autograd."""
    gen = torch.Generator().manual_seed(10)
    weights = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in TASKS]
    reg = TaskCovariance(tasks=TASKS, shapes=[[(3, 4)] * 3], eps=0.01)
    params = [w.clone().requires_grad_(True) for w in weights]
    reg.update([[p.detach() for p in params]])
    reg.penalty([params]).backward()
    direct = [w.clone().requires_grad_(True) for w in weights]
    columns = torch.stack([d.reshape(-1) for d in direct], dim=1)
    values = torch.linalg.eigvalsh(columns.T @ columns + 0.01 * torch.eye(3, dtype=torch.float64))
    (values.sqrt().sum() ** 2).backward()
    for p, d in zip(params, direct, strict=True):
        assert p.grad is not None and d.grad is not None
        torch.testing.assert_close(p.grad, d.grad, rtol=1e-9, atol=1e-12)


def test_an_architecture_that_changes_its_structure_is_refused() -> None:
    """fafs replaces parameters when it widens: the selected weights would go stale."""
    bundle = multidigits(n_train=8, n_val=4, n_test=4)
    config = _config(architecture="fafs", regularizers=[{"name": "group_lasso"}])
    with pytest.raises(ConfigError, match="changes its structure during training"):
        build_model(config, bundle.tasks, bundle.input_shape)
