from types import SimpleNamespace

import pytest
import torch

from concept_erase.controllers import (LAMBDA_CONTROLLERS, beta_at, eupmu_slack, eupmu_update, ungrad_lambda)
from concept_erase.errors import UserError
from concept_erase.registry import Registry


def settings(**kw):
    base = dict(lambda_init=0.0, eps=0.0, beta=0.1, beta_schedule="constant", lambda_max=10.0)
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


def test_eupmu_fixed_point_is_the_explicit_lambda():
    """On a linear forget loss and a quadratic retain loss, EUPMU's lambda (loss values only) settles at UNGrad's closed form."""
    # forget loss <g_u, theta> (constant gradient), retain loss ||theta||^2 / 2 (gradient theta)
    def retain(th):
        return 0.5 * float(th @ th)

    alpha, eps = 1e-3, 0.0
    ctl = LAMBDA_CONTROLLERS.get("eupmu")(settings(beta=0.05, eps=eps, lambda_max=50.0))
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
