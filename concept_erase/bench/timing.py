"""Step time measured fairly: every method set up once in one process, taking turns."""

from __future__ import annotations

from concept_erase import env  # noqa: F401

import copy
import statistics
import time
from pathlib import Path

import torch

from concept_erase.bench import stats
from concept_erase.bench.spec import BenchSpec, run_config



# ---------------------------------------------------------------- step-time probe (interleaved, one process)

def probe_timing(spec: BenchSpec, base, concept: str, log=print) -> list[dict]:
    """Time per step of every method entry, measured in one process, the methods taking turns.

    A run's own step times drift with the machine (about 20% between runs of the same method on
    the shared 2-core CPU used here), too much for ratios near 1. Here every method is set up once
    (each on its own copy of the model), then `rounds` rounds each run `steps` steps of every
    method, the order rotated every round; a first round is a warm-up and is not counted. Slow
    spells of the machine fall on all methods alike. Also timed: the part of a step spent making
    the forget batch (for negative guidance: the partial trajectory and the original model's
    prediction), which no method can avoid.
    """
    import tempfile

    from concept_erase.training.trainer import Trainer

    rounds, steps = spec.timing_rounds, spec.timing_steps
    entries = [(str(m.get("label", m["method"])), m) for m in spec.methods]
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="ce-timing-") as tmp:
        trainers = []
        for i, (label, overrides) in enumerate(entries):
            config = run_config(spec, overrides, concept, spec.seeds[0], Path(tmp) / str(i), progress=False)
            config.checkpoint_every = 0
            trainer = Trainer(config, pipe=copy.deepcopy(base))
            trainer._setup()
            clock = _Stopwatch(trainer.forget.batch)
            trainer.forget.batch = clock
            trainers.append((label, trainer, clock, _CheckClock(config) if config.stop_when_erased else None))
        times: dict[str, list[float]] = {label: [] for label, _ in entries}
        target_times: dict[str, list[float]] = {label: [] for label, _ in entries}
        backward: dict[str, list[int]] = {label: [] for label, _ in entries}
        for r in range(rounds + 1):
            shift = r % len(trainers)
            for label, trainer, clock, check in trainers[shift:] + trainers[:shift]:
                for s in range(steps):
                    clock.seconds = 0.0
                    t0 = time.perf_counter()
                    record = trainer._step(r * steps + s)
                    if cuda:
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    if r:  # round 0 warms up
                        times[label].append(dt)
                        target_times[label].append(clock.seconds)
                        backward[label].append(record["backward_passes"])
                if check is not None:
                    check.time(trainer, counted=r > 0)
            if r:
                log(f"    timing round {r}/{rounds}: " + ", ".join(
                    f"{label} {1000 * statistics.median(times[label][-steps:]):.0f} ms" for label, *_ in trainers))
        checks = {label: check.summary() for label, _, _, check in trainers if check is not None}
        del trainers
    out = []
    for label, overrides in entries:
        ts = sorted(times[label])
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        # The mean is the headline: the time a run takes per step, a trajectory pool's refreshes amortised
        # (cover whole refresh periods: rounds x steps a multiple of the period); quartiles give the spread.
        out.append({"label": label, "method": overrides["method"], "steps_timed": len(ts),
                    "mean_ms": 1000 * statistics.fmean(ts), "median_ms": 1000 * q[1],
                    "mean_ms_ci": [1000 * v for v in stats.mean_ci(ts)],
                    "q1_ms": 1000 * q[0], "q3_ms": 1000 * q[2],
                    "forget_batch_ms": 1000 * statistics.fmean(target_times[label]),
                    "backward_per_step": statistics.fmean(backward[label]), **checks.get(label, {})})
    return out


class _CheckClock:
    """Times the parts of an entry's erasure check (--stop-when-erased) in the probe's rounds, on the model as the
    entry's steps leave it: a chunk of concept images (what a check that fails on the concept side draws per
    chunk), the whole concept side in one call (a check of session 17 and before), the anchors in one call (a
    check of session 18) and a chunk of anchors (what a check draws of them per chunk since session 19). The report
    charges each run's checks with these, on the same machine and clock as its steps (`report.check_seconds`)."""

    def __init__(self, config):
        from concept_erase.methods.stopping import find_judge

        self.judge, self.steps = find_judge(config), int(config.check_inference_steps)
        self.seconds: dict[str, list[float]] = {"chunk": [], "concept": [], "anchors": [], "anchor_chunk": []}

    def time(self, trainer, counted: bool) -> None:
        from concept_erase.methods.stopping import ANCHOR_CHUNK, CONCEPT_CHUNK

        judge, pipe = self.judge, trainer.pipe
        parts = {"chunk": lambda: judge.still_shown(pipe, judge.concept_items[:CONCEPT_CHUNK], self.steps),
                 "concept": lambda: judge.still_shown(pipe, judge.concept_items, self.steps),
                 "anchors": lambda: judge.kept(pipe, judge.anchor_items, self.steps),
                 "anchor_chunk": lambda: judge.kept(pipe, judge.anchor_items[:ANCHOR_CHUNK], self.steps)}
        unet = trainer.ctx.denoiser
        unet.eval()
        try:
            for name, draw in parts.items():
                t0 = time.perf_counter()
                draw()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if counted:
                    self.seconds[name].append(time.perf_counter() - t0)
        finally:
            unet.train()

    def summary(self) -> dict:
        return {"check_inference_steps": self.steps,
                **{f"check_{name}_ms": 1000 * statistics.fmean(v) if v else None for name, v in self.seconds.items()}}


class _Stopwatch:
    """Wraps a function and adds up the wall time spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
