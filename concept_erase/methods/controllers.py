"""Lambda controllers: how much the retain loss weighs in each step.

The trainer asks a controller three things, none specific to a method:
  * `gradients`: "joint" (one backward pass of `forget + lambda * retain`) or "separate"
    (one backward pass per loss, then `from_gradients` combines them);
  * `probe`: where the retain loss after the step comes from, for a loss-value update:
    "none", "after-step" (one extra no-grad forward of the SAME retain tuple) or "carried"
    (the previous step's retain tuple rides along in this step's retain batch);
  * `uses_retain`: whether a retain batch is needed at all.

The update rules themselves are the pure functions `eupmu_update` (the paper's), `relative_slack` with
`normalised_slack` (free of the losses' scale) and `ungrad_lambda`.
Lambda, loss values and the slack are Python floats (fp64), never bf16.
"""

from __future__ import annotations

import math
from concept_erase.plugins import LAMBDA_CONTROLLERS


def eupmu_slack(retain_before: float, retain_after: float, step_size: float, eps: float) -> float:
    """delta_t = (l_r(theta_t) - l_r(theta_{t+1})) / alpha_t + eps_t.

    Negative when the retain loss rose by more than `alpha_t * eps_t` in this step.
    """
    if step_size <= 0:
        raise ValueError("the step size alpha_t must be positive")
    return (retain_before - retain_after) / step_size + eps


def eupmu_update(lam: float, retain_before: float, retain_after: float, *, step_size: float, eps: float,
                 beta: float, lambda_max: float) -> float:
    """One EUPMU multiplier step: lambda_{t+1} = clip(lambda_t - beta_t * delta_t, 0, D)."""
    return lambda_step(lam, beta * eupmu_slack(retain_before, retain_after, step_size, eps), lambda_max)


def lambda_step(lam: float, move: float, lambda_max: float) -> float:
    """lambda - move, clipped to [0, D]: the multiplier step both EUPMU rules share."""
    return min(max(lam - move, 0.0), lambda_max)


def relative_slack(retain_before: float, retain_after: float, step_size: float, eps: float) -> float:
    """The slack with a tolerance relative to the retain loss: delta_t = (l_r(theta_t) - l_r(theta_{t+1})
    + eps * l_r(theta_t)) / alpha_t, negative when this step raised the retain loss by more than the
    fraction eps of its value. Scaling the retain loss scales the slack by the same factor."""
    if step_size <= 0:
        raise ValueError("the step size alpha_t must be positive")
    return (retain_before - retain_after + eps * abs(retain_before)) / step_size


def normalised_slack(slack: float, mean_square: float, seen: int, decay: float, *, mean: float = 0.0,
                     momentum: float = 0.0) -> tuple[float, float, float]:
    """The slack, averaged over recent steps, divided by a running estimate of its own scale.

    mean: an exponential moving average of the slack (decay `momentum`; 0 keeps only this step's);
    scale: the root of an exponential moving average of the squared slack (decay `decay`). Both are
    bias-corrected over the `seen` earlier values, like Adam's two moments. Returns the normalised
    slack, the new mean and the new mean square. A positive factor does not move the slack's zero, so
    the fixed point is the paper's; multiplying every slack by c leaves the result unchanged, so neither
    the loss scale nor the learning rate sets the speed of lambda. The average damps the step-to-step
    noise of a single probe tuple, which otherwise swings lambda by about beta every step.
    With momentum == decay the result is at most 1 in size (Jensen); with momentum 0 at most
    1 / sqrt(1 - decay).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError("the decay of the slack's scale must be in [0, 1)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError("the slack's momentum must be in [0, 1)")
    mean = momentum * mean + (1.0 - momentum) * slack
    mean_square = decay * mean_square + (1.0 - decay) * slack * slack
    corrected = mean_square / (1.0 - decay ** (seen + 1))
    average = mean / (1.0 - momentum ** (seen + 1))
    return (average / math.sqrt(corrected) if corrected > 0.0 else 0.0), mean, mean_square


def ungrad_lambda(dot_ru: float, retain_norm_sq: float, eps: float) -> float:
    """Closed-form multiplier of explicit gradient surgery: max(0, -(<g_r, g_u> + eps) / ||g_r||^2).

    Zero when the two gradients do not conflict beyond the tolerance; zero too when g_r vanishes
    (the constraint cannot bind).
    """
    if retain_norm_sq <= 0.0:
        return 0.0
    return max(0.0, -(dot_ru + eps) / retain_norm_sq)


def beta_at(step: int, beta: float, schedule: str) -> float:
    """beta_t. "cuberoot" decays like t^(-1/3), the ratio to a constant alpha the paper's analysis asks for."""
    if schedule == "constant":
        return beta
    if schedule == "cuberoot":
        return beta / math.pow(step + 1, 1.0 / 3.0)
    raise ValueError(f"unknown beta schedule {schedule!r}")


class LambdaController:
    """Base: a constant lambda. Subclasses change how it moves."""

    gradients = "joint"
    probe = "none"
    uses_retain = True
    backward_passes = 1

    def __init__(self, config):
        self.lam = float(config.lambda_init)
        self.step = 0

    def current(self) -> float:
        return self.lam

    def from_gradients(self, dot_ru: float, retain_norm_sq: float) -> float:
        raise NotImplementedError(f"{type(self).__name__} takes one backward pass; it has no gradient rule")

    def update(self, retain_before: float | None, retain_after: float | None, step_size: float) -> None:
        """Called once per optimizer step; the retain values are None when no paired probe exists."""
        self.step += 1

    def diagnostics(self) -> dict:
        """Extra per-step values for metrics.jsonl (e.g. the constraint's slack, to calibrate --beta)."""
        return {}

    def state_dict(self) -> dict:
        return {"lambda": self.lam, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lambda"])
        self.step = int(state["step"])


@LAMBDA_CONTROLLERS.register("fixed")
class FixedLambda(LambdaController):
    """forget + lambda * retain with a constant lambda (`--lambda`)."""


@LAMBDA_CONTROLLERS.register("esd")
class ForgetOnly(LambdaController):
    """ESD: the forget loss alone; no retain batch is built."""

    uses_retain = False

    def __init__(self, config):
        super().__init__(config)
        self.lam = 0.0


@LAMBDA_CONTROLLERS.register("eupmu")
class ImplicitSurgery(LambdaController):
    """EUPMU: one backward pass; lambda follows the constraint's slack, measured on a paired probe.

    `--lambda-update normalised` (the default) steps lambda by beta_t times the slack's running mean
    over its running scale, with the tolerance eps a fraction of the retain loss: the path of lambda is
    the same for any loss scale and learning rate. `--lambda-update paper` is the paper's literal rule,
    beta_t times the raw slack with eps in loss per unit learning rate, where beta must be set for each
    model.
    """

    probe = "after-step"

    def __init__(self, config):
        super().__init__(config)
        self.eps = float(config.eps)
        self.beta = float(config.beta)
        self.beta_schedule = config.beta_schedule
        self.lambda_max = float(config.lambda_max)
        self.rule = config.lambda_update
        self.decay = float(config.slack_decay)
        self.momentum = float(config.slack_momentum)
        self.mean = 0.0  # the running average of the slack (normalised rule)
        self.mean_square = 0.0  # the running average of the squared slack (normalised rule)
        self.pairs = 0  # slack values seen
        self.last_slack: float | None = None
        self.last_normalised: float | None = None

    def update(self, retain_before: float | None, retain_after: float | None, step_size: float) -> None:
        if retain_before is None or retain_after is None:  # eupmu-fast's first step has no pair yet
            self.step += 1
            return
        beta_t = beta_at(self.step, self.beta, self.beta_schedule)
        if self.rule == "paper":
            self.last_slack = eupmu_slack(retain_before, retain_after, step_size, self.eps)
            self.lam = eupmu_update(self.lam, retain_before, retain_after, step_size=step_size, eps=self.eps,
                                    beta=beta_t, lambda_max=self.lambda_max)
        else:
            self.last_slack = relative_slack(retain_before, retain_after, step_size, self.eps)
            self.last_normalised, self.mean, self.mean_square = normalised_slack(
                self.last_slack, self.mean_square, self.pairs, self.decay, mean=self.mean, momentum=self.momentum)
            self.lam = lambda_step(self.lam, beta_t * self.last_normalised, self.lambda_max)
        self.pairs += 1
        self.step += 1

    def diagnostics(self) -> dict:
        out = {"slack": self.last_slack}
        if self.rule != "paper":
            out["slack_normalised"] = self.last_normalised
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mean": self.mean, "mean_square": self.mean_square, "pairs": self.pairs}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mean = float(state.get("mean", 0.0))
        self.mean_square = float(state.get("mean_square", 0.0))
        self.pairs = int(state.get("pairs", self.step))


@LAMBDA_CONTROLLERS.register("eupmu-fast")
class ImplicitSurgeryFast(ImplicitSurgery):
    """EUPMU without the extra forward: the previous retain tuple is carried into the next batch."""

    probe = "carried"


@LAMBDA_CONTROLLERS.register("ungrad")
class ExplicitSurgery(LambdaController):
    """UNGrad: two backward passes, lambda in closed form from <g_r, g_u> and ||g_r||^2."""

    gradients = "separate"
    backward_passes = 2

    def __init__(self, config):
        super().__init__(config)
        self.eps = float(config.eps)
        self.lam = 0.0

    def from_gradients(self, dot_ru: float, retain_norm_sq: float) -> float:
        self.lam = ungrad_lambda(dot_ru, retain_norm_sq, self.eps)
        return self.lam
