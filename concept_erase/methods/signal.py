"""The erasure signal: how far the trained model still guides toward the concept, read from the forget batch.

The negative-guidance forget batch already holds, for each noised latent, the original model's reference
prediction e0 and its concept prediction ec; the trainer runs the trained model on it for the loss. The
signal is the trained prediction's projection on the original's concept direction,
`sum <e_theta(c) - e0, ec - e0> / sum ||ec - e0||^2` over the batch (`losses.guidance_projection`): 1 for
the original model, -eta at the forget loss's target, with no extra model call. One batch is a few samples
at random timesteps, so the step's value is noisy; `SignalMeter` keeps its exponential moving average, the
value a judge-free stop reads (`stopping.SignalStop`) and the progress bar shows.

The anchors have a judge-free read too: lambda rises exactly while the steps break the retain constraint (the
anchors' loss rose by more than the tolerance), so a lambda no higher than it was a few steps before says the
anchors are not being pushed away. `LambdaTrail` keeps those few values; the signal stop waits for it.
"""

from __future__ import annotations

import math
from collections import deque


class SignalMeter:
    """An exponential moving average of the per-step signal with a half-life in steps. Its state (the average
    and how many steps it has seen) goes into every checkpoint, so a resumed run reads the same values."""

    def __init__(self, half_life: float):
        if not half_life > 0:
            raise ValueError(f"half-life must be positive, not {half_life}")
        self.rate = 1.0 - 0.5 ** (1.0 / half_life)
        self.value: float | None = None
        self.seen = 0

    def update(self, x: float | None) -> float | None:
        """Take one step's value (None: the step gave none) and return the average."""
        if x is None or not math.isfinite(x):
            return self.value
        self.value = x if self.value is None else self.value + self.rate * (x - self.value)
        self.seen += 1
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.seen = state.get("value"), int(state.get("seen", 0))


class LambdaTrail:
    """The last `window + 1` values of lambda, one per step, and whether lambda is at rest: no higher now than
    `window` steps before. Window 0 is always at rest. Its state goes into every checkpoint."""

    def __init__(self, window: int):
        if window < 0:
            raise ValueError(f"the window must be at least 0, not {window}")
        self.window = int(window)
        self.values: deque[float] = deque(maxlen=self.window + 1)

    def update(self, lam: float) -> None:
        self.values.append(float(lam))

    def change(self) -> float | None:
        """lambda now minus lambda `window` steps before; None until that many steps were taken."""
        if len(self.values) <= self.window:
            return None
        return self.values[-1] - self.values[0]

    def at_rest(self) -> bool:
        if self.window == 0:
            return True
        change = self.change()
        return change is not None and change <= 0.0

    def state_dict(self) -> dict:
        return {"window": self.window, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = deque((float(v) for v in state.get("values", [])), maxlen=self.window + 1)
