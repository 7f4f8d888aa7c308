"""Step time measured fairly: every method set up once in one process, taking turns."""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from concept_erase.bench import stats
from concept_erase.bench.report import EQUAL_CHUNKS
from concept_erase.bench.spec import BenchSpec, run_config
from concept_erase.config import is_edit
from concept_erase.methods.stopping import ANCHOR_CHUNK, CONCEPT_CHUNK, check_sides, judge_name
from concept_erase.training.trainer import Trainer

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
    rounds, steps = spec.timing_rounds, spec.timing_steps

    # a closed-form edit has no step to time: its whole time is in its run record
    entries = [(str(m.get("label", m["method"])), m) for m in spec.methods if not is_edit(m["method"])]
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
            draws = config.stop_when_erased and judge_name(config) != "signal"  # a signal check draws nothing
            trainers.append((label, trainer, clock, _CheckClock(config) if draws else None))
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
    """Times the calls an entry's erasure check (--stop-when-erased) makes, in the probe's rounds, on the model as
    the entry's steps leave it: every call the current check makes (a side's first chunk, the rest of it, the
    anchors whole before training), and the calls of the stored records that name no calls (a check that drew
    chunks of 8 concept images and of 24 anchors, one that drew the anchors in one call, one that drew the
    concept side in one call too). Timed by images per call and side; the report
    charges each run's checks with these, on the same machine and clock as its steps (`report.check_seconds`)."""

    def __init__(self, config):
        self.judge, self.steps = check_sides(config, judge_name(config)), int(config.check_inference_steps)
        n, m = len(self.judge.concept_items), len(self.judge.anchor_items)
        chunk, anchor_chunk = EQUAL_CHUNKS
        # (side, images per call): the first `k` items of the side, or its last `k` (the rest after a first chunk)
        calls = {("concept", CONCEPT_CHUNK): "head", ("concept", n - CONCEPT_CHUNK): "tail", ("concept", n): "head",
                 ("anchors", ANCHOR_CHUNK): "head", ("anchors", m - ANCHOR_CHUNK): "tail", ("anchors", m): "head",
                 ("concept", chunk): "head", ("anchors", anchor_chunk): "head"}
        self.calls = {call: where for call, where in calls.items() if 0 < call[1] <= (n if call[0] == "concept" else m)}
        self.seconds: dict[tuple[str, int], list[float]] = {call: [] for call in self.calls}

    def time(self, trainer, counted: bool) -> None:
        judge, pipe = self.judge, trainer.pipe
        unet = trainer.ctx.denoiser
        unet.eval()
        try:
            for (side, k), where in self.calls.items():
                items = judge.concept_items if side == "concept" else judge.anchor_items
                part = items[:k] if where == "head" else items[len(items) - k:]
                draw = judge.still_shown if side == "concept" else judge.kept
                t0 = time.perf_counter()
                draw(pipe, part, self.steps)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if counted:
                    self.seconds[(side, k)].append(time.perf_counter() - t0)
        finally:
            unet.train()

    def summary(self) -> dict:
        """{check_concept_call_ms: {images: ms}, check_anchor_call_ms: {...}} and, for the stored records that
        name no calls, the times under the names they are charged by (a chunk, the concept whole, the anchors whole, an
        anchor chunk)."""
        ms = {call: 1000 * statistics.fmean(v) if v else None for call, v in self.seconds.items()}
        n, m = len(self.judge.concept_items), len(self.judge.anchor_items)
        chunk, anchor_chunk = EQUAL_CHUNKS
        return {"check_inference_steps": self.steps,
                "check_concept_call_ms": {str(k): v for (side, k), v in sorted(ms.items()) if side == "concept"},
                "check_anchor_call_ms": {str(k): v for (side, k), v in sorted(ms.items()) if side == "anchors"},
                "check_chunk_ms": ms.get(("concept", chunk)), "check_concept_ms": ms.get(("concept", n)),
                "check_anchors_ms": ms.get(("anchors", m)), "check_anchor_chunk_ms": ms.get(("anchors", anchor_chunk))}


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
