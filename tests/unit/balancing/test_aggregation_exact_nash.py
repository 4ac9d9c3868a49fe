"""Nash-MTL's state and failure handling, and the methods through the gradient engine."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_aggregation_exact import family, nash_residual, weights_of
from torch import Tensor, nn

from polytask.balancing.aggregation import MGDA, AlignedMTL, NashMTL, NashMTLNotConverged, UPGrad
from polytask.balancing.aggregation.nash_mtl import bargaining_solution
from polytask.balancing.base import BackwardContext
from polytask.balancing.gradient import GramianWeighting
from polytask.errors import CheckpointError, PolytaskError, TrainingDiverged

TASKS = ["a", "b", "c"]


def hard_gramian(eps: float = 1e-3) -> Tensor:
    """Three gradients whose positive combination is nearly zero: alpha is huge and far from
    the solver's starting point."""
    g = torch.Generator().manual_seed(5)
    j = torch.randn(3, 8, generator=g, dtype=torch.float64)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    j = j - (w @ j) / w.sum() + eps * torch.randn(3, 8, generator=g, dtype=torch.float64)
    return j @ j.T


def test_non_convergence_warns_and_keeps_the_previous_weights() -> None:
    easy = family("ordinary", 3)
    method = NashMTL(TASKS)
    previous = method.weights_from_gramian(easy @ easy.T)
    assert nash_residual(easy @ easy.T, previous) <= 1e-10
    method.max_iter = 1
    with pytest.warns(RuntimeWarning, match=r"did not converge at call 2: residual .* > tol"):
        kept = method.weights_from_gramian(hard_gramian())
    torch.testing.assert_close(kept, previous)


def test_non_convergence_raises_when_asked() -> None:
    method = NashMTL(TASKS, max_iter=1, on_failure="raise")
    with pytest.raises(NashMTLNotConverged, match="max_iter=1") as info:
        method.weights_from_gramian(hard_gramian())
    assert isinstance(info.value, TrainingDiverged) and isinstance(info.value, PolytaskError)
    assert info.value.exit_code == 3
    # with enough Newton steps the same Gramian is solved
    g = hard_gramian()
    assert nash_residual(g, NashMTL(TASKS).weights_from_gramian(g)) <= 1e-10


def test_first_failure_falls_back_to_the_starting_point() -> None:
    with pytest.warns(RuntimeWarning, match="Keeping the previous weights"):
        alpha = NashMTL(TASKS, max_iter=1).weights_from_gramian(hard_gramian())
    assert bool(torch.isfinite(alpha).all()) and bool((alpha > 0).all())


def test_no_solution_is_reported_not_hidden() -> None:
    """Opposite gradients: no alpha > 0 satisfies the condition."""
    j = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        alpha = NashMTL(TASKS[:2]).weights_from_gramian(j @ j.T)
    assert bool(torch.isfinite(alpha).all())


def test_ill_conditioned_solutions_stop_at_the_rounding_bound() -> None:
    """Nearly Pareto-stationary gradients: alpha ~ 1/eps and the residual cannot get below
    the rounding error of alpha_i (G alpha)_i, which the solver recognises instead of
    reporting a failure."""
    for eps in (1e-4, 1e-6):
        g = hard_gramian(eps)
        method = NashMTL(TASKS, on_failure="raise")
        alpha = method.weights_from_gramian(g)
        assert method.last_iterations < 60
        rounding = 3 * torch.finfo(torch.float64).eps * float((alpha * (g.abs() @ alpha)).max())
        assert nash_residual(g, alpha) <= max(1e-10, 16 * rounding)


def test_warm_start_converges_in_few_steps_to_the_same_solution() -> None:
    method = NashMTL(TASKS)
    g0 = torch.Generator().manual_seed(2)
    j = torch.randn(3, 10, generator=g0, dtype=torch.float64)
    for _ in range(5):
        j = j + 0.01 * torch.randn(3, 10, generator=g0, dtype=torch.float64)
        g = j @ j.T
        alpha = method.weights_from_gramian(g)
        assert method.last_iterations <= 3
        assert nash_residual(g, alpha) <= 1e-10
        cold = NashMTL(TASKS).weights_from_gramian(g)
        torch.testing.assert_close(alpha, cold, rtol=1e-9, atol=0)


def test_bargaining_solution_newton_steps_stay_positive_and_converge() -> None:
    j = family("conflicting", 6)
    n = j.norm(dim=1)
    c = (j @ j.T) / (n[:, None] * n[None, :])
    start = torch.full((6,), 1e-3, dtype=torch.float64)  # far from the solution
    beta, residual, bound, steps = bargaining_solution(c, start, 100, 1e-12)
    assert residual <= max(1e-12, bound) and steps < 100
    assert bool((beta > 0).all())


def test_update_weights_every_reuses_alpha_for_the_same_tasks() -> None:
    method = NashMTL(TASKS, update_weights_every=3)
    grams = [family("ordinary", 3, seed) for seed in range(5)]
    grams = [j @ j.T for j in grams]
    first = method.weights_from_gramian(grams[0])
    torch.testing.assert_close(method.weights_from_gramian(grams[1]), first)
    torch.testing.assert_close(method.weights_from_gramian(grams[2]), first)
    fourth = method.weights_from_gramian(grams[3])
    assert nash_residual(grams[3], fourth) <= 1e-10
    # a different task set is solved even between updates
    j = family("ordinary", 2, 9)
    _, weights = method.aggregate(j.float(), ["a", "c"])
    assert nash_residual(j @ j.T, weights.double()) <= 1e-6


def test_subsets_of_tasks_update_their_own_alpha() -> None:
    method = NashMTL(TASKS)
    j = family("ordinary", 3)
    method.aggregate(j, TASKS)
    before = method.get_extra_state()["alpha"]
    method.aggregate(j[[0, 2]] * 2, ["a", "c"])
    after = method.get_extra_state()["alpha"]
    assert after["b"] == before["b"]
    assert after["a"] != before["a"]


def test_state_round_trips_through_a_weights_only_checkpoint() -> None:
    method = NashMTL(TASKS, update_weights_every=2)
    j = family("ordinary", 3)
    alpha = method.weights_from_gramian(j @ j.T)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = NashMTL(TASKS, update_weights_every=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    # the second call reuses alpha in both (same position in the update cycle)
    other = family("ordinary", 3, 4)
    torch.testing.assert_close(restored.weights_from_gramian(other @ other.T), alpha)
    torch.testing.assert_close(method.weights_from_gramian(other @ other.T), alpha)
    with pytest.raises(CheckpointError, match="nash_mtl balancer state"):
        restored.set_extra_state(["not", "a", "dict"])


def test_max_norm_clips_the_update() -> None:
    j = family("ordinary", 3)
    g = j @ j.T
    paper = NashMTL(TASKS).weights_from_gramian(g)
    assert math.isclose(float((paper @ j).norm()), math.sqrt(3), rel_tol=1e-9)
    clipped = NashMTL(TASKS, max_norm=0.5).weights_from_gramian(g)
    torch.testing.assert_close(clipped, paper * 0.5 / math.sqrt(3))


# --- through the engine ------------------------------------------------------------------


class Quadratic(nn.Module):
    """Shared parameters theta; task k's loss is |A_k theta - b_k|^2 / 2 + c_k."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.theta = nn.Parameter(torch.randn(6, generator=g))
        self.a = torch.randn(3, 4, 6, generator=g)
        self.b = torch.randn(3, 4, generator=g)

    def losses(self) -> dict[str, Tensor]:
        return {
            t: 0.5 * (self.a[k] @ self.theta - self.b[k]).square().sum() + 0.1 * (k + 1)
            for k, t in enumerate(TASKS)
        }

    def jacobian(self) -> Tensor:
        return torch.stack([self.a[k].T @ (self.a[k] @ self.theta - self.b[k]) for k in range(3)])


@pytest.mark.parametrize(
    "method",
    [MGDA(TASKS), MGDA(TASKS, normalization="loss+"), UPGrad(TASKS), AlignedMTL(TASKS)],
    ids=["mgda", "mgda-loss+", "upgrad", "aligned_mtl"],
)
def test_backward_applies_w_at_j_to_the_shared_parameters(method: GramianWeighting) -> None:
    model = Quadratic()
    losses = model.losses()
    j = model.jacobian().detach()
    if isinstance(method, MGDA) and method.normalization == "loss+":
        values = torch.stack([loss.detach() for loss in losses.values()]).double()
        w = method.weights_from_gramian(j.double() @ j.double().T, values)
    else:
        w = method.weights_from_gramian(j.double() @ j.double().T)
    weights = method.backward(losses, BackwardContext(shared_parameters=[model.theta]))
    assert model.theta.grad is not None
    torch.testing.assert_close(model.theta.grad, w.float() @ j, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([weights[t] for t in TASKS]), w.float())


def test_nash_mtl_names_the_training_step_when_it_fails() -> None:
    model = Quadratic()
    method = NashMTL(TASKS, max_iter=1, on_failure="raise")
    ctx = BackwardContext(shared_parameters=[model.theta], step=41)
    with pytest.raises(NashMTLNotConverged, match="at step 42"):
        method.backward(model.losses(), ctx)


def test_mgda_loss_normalization_takes_the_losses_of_the_step() -> None:
    model = Quadratic()
    losses = model.losses()
    method = MGDA(TASKS, normalization="loss")
    weights = method.backward(losses, BackwardContext(shared_parameters=[model.theta]))
    j = model.jacobian().detach().double()
    values = torch.stack([loss.detach() for loss in losses.values()]).double()
    expected = weights_of("mgda", j / values[:, None])
    torch.testing.assert_close(torch.stack([weights[t] for t in TASKS]), expected.float())
