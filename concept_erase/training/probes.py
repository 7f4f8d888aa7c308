"""Where a loss-value lambda update reads the retain loss before and after a step.

A lambda controller names its probe (`LambdaController.probe`); the trainer asks the probe, at fixed
points of every step, for a tail to its retain batch, shows it each micro-batch's retain losses, and
calls it once more after the optimizer step. The trainer holds no branch on probe kinds.

- `none`: no slack is measured (fixed weights, ESD, UNGrad).
- `after-step` (EUPMU): the retain loss of a tuple at theta_t and again at theta_{t+1}. With
  `--slack-probe held-out` (the default) the tuple is outside the step's gradient; with `batch` it is
  the step's own retain batch. One extra no-grad forward per step.
- `carried` (EUPMU-fast): half of this step's retain tuple rides into the next step's retain batch, so
  its loss at theta_{t+1} comes out of the next step's forward: no extra call; the slack lags one step.
"""

from __future__ import annotations

from typing import Callable

import torch

from concept_erase.methods.objectives import RegressionBatch
from concept_erase.registry import Registry
from concept_erase.training.seeds import generator

PROBES: Registry[type] = Registry("slack probe", "--method")

Measured = tuple[RegressionBatch, torch.Tensor]  # a retain tuple and its loss at the weights it was measured at


class Probe:
    """No slack: nothing is measured."""

    def __init__(self, config, retain, forward: Callable[[RegressionBatch], torch.Tensor]):
        self.config = config
        self.retain = retain  # the retain objective (a bank of regression tuples); None for ESD
        self.forward = forward  # per-sample losses of the model being trained
        self.begin_step()

    def begin_step(self) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    def retain_tail(self, micro: int) -> RegressionBatch | None:
        """Tuples to append to this micro-batch's retain batch (trained on like the others)."""
        return None

    def observe(self, step: int, rank: int, micro: int, batch: RegressionBatch, per_sample: torch.Tensor,
                fresh: int) -> None:
        """A micro-batch's retain batch and its per-sample losses at theta_t (the first `fresh` rows are new)."""

    def after_step(self, step: int, rank: int) -> None:
        """Called once the optimizer has stepped: the weights are theta_{t+1}."""

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's tensors and the JSON a resume needs."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], state: dict, device) -> None:
        pass

    # ---------------------------------------------------------------- held-out tuples
    def held_out(self, step: int, rank: int, micro: int, n: int) -> RegressionBatch:
        """A retain tuple outside this step's gradient (its own random stream), to measure the slack on.

        The step's own retain batch would bias the slack: the step descends on that very batch, so its
        loss falls by more than the retain loss does, and lambda is held near 0 (measured: the mean
        lambda of the digits recipe is 0.37 with the batch, 2.1 with a held-out tuple).
        """
        return self.retain.batch(generator(self.config.seed, step, rank, micro, 2), n, step)

    def measured(self, step: int, rank: int, micro: int, n: int) -> Measured:
        """A held-out tuple and its loss at the current weights (no gradient)."""
        batch = self.held_out(step, rank, micro, n)
        with torch.no_grad():
            return batch, self.forward(batch).mean()


PROBES.register("none")(Probe)


@PROBES.register("after-step")
class AfterStep(Probe):
    def __init__(self, config, retain, forward):
        super().__init__(config, retain, forward)
        # the next step's held-out tuples with their loss at theta_{t+1}, measured in the same no-grad call
        # as this step's "after" values: {step: {micro: (tuple, loss)}}
        self.ready: dict[int, dict[int, Measured]] = {}

    def begin_step(self) -> None:
        super().begin_step()
        self.tuples: list[RegressionBatch] = []

    def observe(self, step, rank, micro, batch, per_sample, fresh):
        if self.config.slack_probe == "held-out":
            ready = self.ready.get(step, {}).get(micro)
            if ready is None:  # the first step, or the first after a resume
                ready = self.measured(step, rank, micro, self.config.retain_batch_size)
            self.tuples.append(ready[0])
            self.before.append(ready[1])
        else:
            self.tuples.append(batch)
            self.before.append(per_sample.detach().mean())

    def after_step(self, step, rank):
        cfg = self.config
        ahead = cfg.slack_probe == "held-out" and step + 1 < cfg.steps
        ready = {}
        for micro, tuple_ in enumerate(self.tuples):  # the same tuples, at theta_{t+1}
            # The next step's held-out tuple is measured at theta_{t+1} too: one call for both (rows are
            # independent; the tuple comes from its own per-step random stream). One call per micro-batch,
            # so no call is larger than twice the retain batch.
            nxt = self.held_out(step + 1, rank, micro, cfg.retain_batch_size) if ahead else None
            with torch.no_grad():
                per = self.forward(RegressionBatch.cat([tuple_, nxt]) if nxt is not None else tuple_)
            self.after.append(per[:len(tuple_)].mean())
            if nxt is not None:
                ready[micro] = (nxt, per[len(tuple_):].mean())
        self.ready = {step + 1: ready} if ready else {}


@PROBES.register("carried")
class Carried(Probe):
    def __init__(self, config, retain, forward):
        super().__init__(config, retain, forward)
        self.carry: dict[int, Measured] = {}  # per micro-batch: the tuple carried into the next step

    def begin_step(self) -> None:
        super().begin_step()
        self.next_carry: dict[int, Measured] = {}

    def retain_tail(self, micro):
        carried = self.carry.get(micro)
        return carried[0] if carried is not None else None

    def observe(self, step, rank, micro, batch, per_sample, fresh):
        if micro in self.carry:
            self.before.append(self.carry[micro][1])
            self.after.append(per_sample[fresh:].detach().mean())
        keep = self.config.retain_batch_size // 2
        if self.config.slack_probe == "held-out":  # measured now, trained on next step
            self.next_carry[micro] = self.measured(step, rank, micro, keep)
        else:
            self.next_carry[micro] = (batch.slice(0, keep), per_sample[:keep].detach().mean())

    def after_step(self, step, rank):
        self.carry = self.next_carry

    def state(self):
        tensors = {}
        for micro, (batch, before) in self.carry.items():
            tensors.update(batch.tensors(f"carry.{micro}"))
            tensors[f"carry.{micro}.before"] = before.detach().reshape(1)
        return tensors, {"carry": sorted(self.carry)}

    def load_state(self, tensors, state, device):
        self.carry = {int(m): (RegressionBatch.from_tensors(tensors, f"carry.{m}", device),
                               tensors[f"carry.{m}.before"].to(device).reshape(()))
                      for m in state.get("carry", [])}
