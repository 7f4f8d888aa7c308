"""The erasure signal: how far the trained model still guides toward the concept, read from the forget batch.

The negative-guidance forget batch already holds, for each noised latent, the original model's reference
prediction e0 and its concept prediction ec; the trainer runs the trained model on it for the loss. The
signal is the trained prediction's projection on the original's concept direction,
`sum <e_theta(c) - e0, ec - e0> / sum ||ec - e0||^2` over the batch (`losses.guidance_projection`): 1 for
the original model, -eta at the forget loss's target, with no extra model call. One batch is a few samples
at random timesteps, so the step's value is noisy; `SignalMeter` keeps its exponential moving average, the
value a judge-free stop reads (`stopping.SignalStop`) and the progress bar shows.
"""

from __future__ import annotations

import math


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
