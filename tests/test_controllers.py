from types import SimpleNamespace

import pytest
import torch

from concept_erase.methods.controllers import (LAMBDA_CONTROLLERS, beta_at, eupmu_slack, eupmu_update, normalised_slack,
                                       relative_slack, ungrad_lambda)
from concept_erase.errors import UserError
from concept_erase.registry import Registry


def settings(**kw):
    base = dict(lambda_init=0.0, eps=0.0, beta=0.1, beta_schedule="constant", lambda_max=10.0, lambda_update="paper",
                slack_decay=0.9, slack_momentum=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_slack_is_negative_when_retain_rises_more_than_allowed():
    # alpha = 0.1, eps = 1: the retain loss may rise by 0.1 per step.
    assert eupmu_slack(1.0, 1.2, 0.1, 1.0) == pytest.approx(-1.0)  # rose 0.2 > 0.1
    assert eupmu_slack(1.0, 1.05, 0.1, 1.0) == pytest.approx(0.5)  # rose 0.05 < 0.1
    assert eupmu_slack(1.0, 0.9, 0.1, 0.0) == pytest.approx(1.0)  # fell


def test_eupmu_update_follows_the_formula_and_clips():
    # lambda - beta * ((before - after) / alpha + eps)
    assert eupmu_update(1.0, 1.0, 1.2, step_size=0.1, eps=1.0, beta=0.5, lambda_max=10) == pytest.approx(1.5)
    assert eupmu_update(1.0, 1.0, 0.5, step_size=0.1, eps=0.0, beta=0.5, lambda_max=10) == 0.0  # clipped at 0
    assert eupmu_update(1.0, 0.0, 100.0, step_size=0.1, eps=0.0, beta=0.5, lambda_max=3.0) == 3.0  # clipped at D
    with pytest.raises(ValueError):
        eupmu_slack(1.0, 1.0, 0.0, 0.0)


def test_ungrad_lambda_closed_form_by_hand():
    g_u = torch.tensor([1.0, 0.0])
    g_r = torch.tensor([-1.0, 1.0])
    dot, norm = float(g_u @ g_r), float(g_r @ g_r)  # -1, 2
    assert ungrad_lambda(dot, norm, 0.0) == pytest.approx(0.5)
    d = g_u + 0.5 * g_r  # the surgered direction is orthogonal to g_r: retain unchanged to first order
    assert float(d @ g_r) == pytest.approx(0.0)
    assert ungrad_lambda(dot, norm, 0.2) == pytest.approx(0.4)  # -(-1 + 0.2) / 2
    assert ungrad_lambda(1.0, 2.0, 0.0) == 0.0  # no conflict: pure unlearning
    assert ungrad_lambda(-1.0, 0.0, 0.0) == 0.0  # g_r vanished


def test_beta_schedule():
    assert beta_at(0, 0.3, "constant") == 0.3 and beta_at(7, 0.3, "constant") == 0.3
    assert beta_at(7, 0.3, "cuberoot") == pytest.approx(0.3 / 2.0)
    with pytest.raises(ValueError):
        beta_at(0, 1.0, "linear")


@pytest.mark.parametrize("rule,beta,momentum", [("paper", 0.05, 0.0), ("normalised", 0.01, 0.0),
                                               ("normalised", 0.01, 0.9)])
def test_eupmu_fixed_point_is_the_explicit_lambda(rule, beta, momentum):
    """On a linear forget loss and a quadratic retain loss, EUPMU's lambda (loss values only) settles at UNGrad's
    closed form, under the paper's rule and the normalised one alike."""
    # forget loss <g_u, theta> (constant gradient), retain loss ||theta||^2 / 2 (gradient theta)
    def retain(th):
        return 0.5 * float(th @ th)

    alpha, eps = 1e-3, 0.0
    ctl = LAMBDA_CONTROLLERS.get("eupmu")(settings(beta=beta, eps=eps, lambda_max=50.0, lambda_update=rule,
                                                   slack_momentum=momentum))
    theta = torch.tensor([0.0, 1.0])
    lams, targets = [], []
    for _ in range(4000):
        g_u = torch.tensor([-1.0, -0.5])
        g_r = theta.clone()
        targets.append(ungrad_lambda(float(g_u @ g_r), float(g_r @ g_r), eps))
        before = retain(theta)
        theta = theta - alpha * (g_u + ctl.current() * g_r)
        ctl.update(before, retain(theta), alpha)
        lams.append(ctl.current())
    tail = slice(3000, None)
    mean_lam = sum(lams[tail]) / len(lams[tail])
    mean_target = sum(targets[tail]) / len(targets[tail])
    assert mean_target > 0.1  # the constraint binds in this problem
    assert mean_lam == pytest.approx(mean_target, rel=0.05)


def _lambda_path(befores, afters, *, retain_scale=1.0, lr=1e-3, rule="normalised", eps=0.0, momentum=0.0):
    ctl = LAMBDA_CONTROLLERS.get("eupmu")(settings(lambda_update=rule, beta=0.2, eps=eps, beta_schedule="cuberoot",
                                                   lambda_max=5.0, slack_momentum=momentum))
    path = []
    for b, a in zip(befores, afters):
        ctl.update(b * retain_scale, a * retain_scale, lr)
        path.append(ctl.current())
    return path


def _loss_series(n=300, seed=0):
    """A retain loss that a step raises in the first third, leaves alone in the second and lowers in the last,
    with noise on every pair."""
    g = torch.Generator().manual_seed(seed)
    befores = (0.2 + 0.01 * torch.rand(n, generator=g, dtype=torch.float64)).tolist()
    drift = [-2e-3] * (n // 3) + [0.0] * (n // 3) + [1e-3] * (n - 2 * (n // 3))
    noise = (1e-3 * torch.randn(n, generator=g, dtype=torch.float64)).tolist()
    afters = [b - d + z for b, d, z in zip(befores, drift, noise)]
    return befores, afters


@pytest.mark.parametrize("eps,momentum", [(0.0, 0.0), (0.005, 0.0), (0.0, 0.9), (0.005, 0.9)])
def test_the_normalised_update_is_free_of_the_loss_scale_and_the_learning_rate(eps, momentum):
    befores, afters = _loss_series()
    reference = _lambda_path(befores, afters, eps=eps, momentum=momentum)
    assert max(reference) > 0.5 and reference[-1] < max(reference)  # lambda moved, up then down
    for kwargs in ({"retain_scale": 10.0}, {"retain_scale": 0.1}, {"lr": 1e-2}, {"retain_scale": 10.0, "lr": 1e-5}):
        assert _lambda_path(befores, afters, eps=eps, momentum=momentum, **kwargs) == pytest.approx(
            reference, rel=1e-9, abs=1e-12), kwargs
    # the paper's literal rule is not: the same series at another scale gives another path
    paper = _lambda_path(befores, afters, rule="paper")
    assert _lambda_path(befores, afters, rule="paper", retain_scale=10.0) != pytest.approx(paper, rel=1e-3)


def test_normalised_slack_by_hand():
    # the first slack is divided by its own size (bias-corrected): a sign
    value, _, ms = normalised_slack(-3.0, 0.0, 0, 0.9)
    assert value == pytest.approx(-1.0) and ms == pytest.approx(0.1 * 9.0)
    # the second: 3 / sqrt((0.9 * 0.9 + 0.1 * 9) / (1 - 0.81))
    value, _, _ = normalised_slack(3.0, ms, 1, 0.9)
    assert value == pytest.approx(3.0 / ((0.81 + 0.9) / 0.19) ** 0.5)
    assert normalised_slack(0.0, 0.0, 0, 0.9)[0] == 0.0  # no scale yet: no move
    assert normalised_slack(5.0, 0.0, 0, 0.0)[0] == pytest.approx(1.0)  # decay 0: a sign
    with pytest.raises(ValueError):
        normalised_slack(1.0, 0.0, 0, 1.0)
    with pytest.raises(ValueError):
        normalised_slack(1.0, 0.0, 0, 0.9, momentum=1.0)
    # with momentum 0.5 the second value is the bias-corrected mean (0.5 * (0.5 * -3) + 0.5 * 3) / (1 - 0.25) = 1
    # over the same scale as above
    value, mean, ms = normalised_slack(-3.0, 0.0, 0, 0.9, momentum=0.5)
    assert value == pytest.approx(-1.0) and mean == pytest.approx(-1.5)
    value, _, _ = normalised_slack(3.0, ms, 1, 0.9, mean=mean, momentum=0.5)
    assert value == pytest.approx(1.0 / ((0.81 + 0.9) / 0.19) ** 0.5)
    # the tolerance is a fraction of the retain loss: a rise of 1% of 2.0 is exactly eps = 0.01
    assert relative_slack(2.0, 2.02, 0.1, 0.01) == pytest.approx(0.0, abs=1e-12)
    assert relative_slack(2.0, 2.04, 0.1, 0.01) < 0 < relative_slack(2.0, 2.01, 0.1, 0.01)


def test_the_averaged_slack_damps_noise_and_never_steps_more_than_beta():
    """On pure noise (no drift) the averaged slack moves lambda far less than the raw one; with the mean and the
    scale averaged alike, no step exceeds beta."""
    g = torch.Generator().manual_seed(3)
    befores = [0.2] * 400
    afters = (0.2 + 1e-3 * torch.randn(400, generator=g, dtype=torch.float64)).tolist()
    moves = {}
    for momentum in (0.0, 0.9):
        ctl = LAMBDA_CONTROLLERS.get("eupmu")(settings(lambda_update="normalised", beta=0.5, lambda_max=1e9,
                                                       lambda_init=1e3, slack_decay=0.9, slack_momentum=momentum))
        path = [ctl.current()]
        for b, a in zip(befores, afters):
            ctl.update(b, a, 1e-3)
            path.append(ctl.current())
        steps = [abs(x - y) for x, y in zip(path, path[1:])]
        moves[momentum] = sum(steps) / len(steps)
        if momentum == 0.9:
            assert max(steps) <= 0.5 + 1e-12
    assert moves[0.9] < 0.5 * moves[0.0]


def test_the_normalised_state_round_trips():
    befores, afters = _loss_series(60)
    ctl = LAMBDA_CONTROLLERS.get("eupmu")(settings(lambda_update="normalised", slack_momentum=0.9))
    for b, a in zip(befores[:30], afters[:30]):
        ctl.update(b, a, 1e-3)
    other = LAMBDA_CONTROLLERS.get("eupmu")(settings(lambda_update="normalised", slack_momentum=0.9))
    other.load_state_dict(ctl.state_dict())
    for b, a in zip(befores[30:], afters[30:]):
        ctl.update(b, a, 1e-3)
        other.update(b, a, 1e-3)
        assert other.current() == ctl.current()


def test_controllers_are_registered_with_their_capabilities():
    assert set(LAMBDA_CONTROLLERS.names()) == {"eupmu", "eupmu-fast", "ungrad", "fixed", "esd"}
    flags = {n: (c.gradients, c.probe, c.uses_retain, c.backward_passes) for n, c in
             ((n, LAMBDA_CONTROLLERS.get(n)) for n in LAMBDA_CONTROLLERS.names())}
    assert flags["eupmu"] == ("joint", "after-step", True, 1)
    assert flags["eupmu-fast"] == ("joint", "carried", True, 1)
    assert flags["ungrad"] == ("separate", "none", True, 2)
    assert flags["fixed"] == ("joint", "none", True, 1)
    assert flags["esd"][2] is False


def test_fixed_keeps_lambda_and_state_round_trips():
    ctl = LAMBDA_CONTROLLERS.get("fixed")(settings(lambda_init=2.5))
    ctl.update(1.0, 5.0, 0.1)
    assert ctl.current() == 2.5
    eu = LAMBDA_CONTROLLERS.get("eupmu")(settings(lambda_init=1.0))
    eu.update(1.0, 1.5, 0.1)
    other = LAMBDA_CONTROLLERS.get("eupmu")(settings())
    other.load_state_dict(eu.state_dict())
    assert other.current() == eu.current() and other.step == eu.step == 1


def test_registry_rejects_duplicates_and_names_choices():
    reg = Registry("thing", "--thing")
    reg.register("a")(object)
    with pytest.raises(ValueError):
        reg.register("a")(object)
    with pytest.raises(UserError, match="choose one of: a"):
        reg.get("b")
