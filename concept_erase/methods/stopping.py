"""`--stop-when-erased`: judge the model during training and stop at the first check at target.

A check generates images of the concepts and of the anchors with the model as it is, and asks a judge
what they show. The run stops at the first check where at most `--check-forget-at-most` (5%) of the
concept images still show the concept and the anchors' accuracy is at most `--check-retain-drop-at-most`
(3 points) below the model's own before training (measured once, at the start, with the same images).

Why 5% when the benchmark's target is 10%: a check judges few images (32 of the concept: one image is 3
points) and the run stops at the first check that falls under the bar, so the rate at the stop is the
lucky low of a noisy series. Measured on the digits benchmark with the bar at 10% (`BENCHMARKS.md`, issue
16): 3 of 18 runs stopped on checks of 6% and 9% and were judged at 10.9% to 14.1% on 64 images each. At
5% the forget side missed once in 18 runs; the longer erasure cost the retain side two more misses.

Checks run on the main process; the trainer agrees the decision across processes. Every check is a line
of OUTPUT/checks.jsonl (step 0: the model before training), with its own time: an erasure that stops early
is charged for its checks.

Judges are registered by name with the models they know. The embedded digits model has one (the
shipped digit and style classifier); other models have none yet, and the flag is refused for them
before anything runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from concept_erase.errors import UserError
from concept_erase.registry import Registry

JUDGES: Registry = Registry("judge", "--stop-when-erased")


class DigitsJudge:
    """The embedded digits model's judge: a concept caption is erased when its digit (for a plain
    caption) or its style (for a styled one) is no longer what the classifier sees; an anchor is kept
    when both its digit and its style are."""

    def __init__(self, config):
        from concept_erase.digits.world import DIGIT_NAMES, STYLES, caption

        known = {caption(d, s): (d, s) for d in range(len(DIGIT_NAMES)) for s in STYLES}
        unknown = [p for p in list(config.concepts) + list(config.anchors) if p not in known]
        if unknown:
            raise UserError(f"--stop-when-erased: the digits judge knows the digits' captions "
                            f"('{caption(7)}', '{caption(7, 'red ink')}'), not {unknown[0]!r}")
        self.styles = STYLES
        self.concepts = [known[p] + (p,) for p in config.concepts]
        self.anchors = [known[p] + (p,) for p in config.anchors]
        n = int(config.check_images)
        self.per_concept = max(2, math.ceil(n / len(self.concepts)))
        self.per_anchor = max(1, math.ceil(2 * n / max(1, len(self.anchors))))
        from concept_erase.io.loading import load_judge

        self.judge = load_judge()

    def __call__(self, pipe) -> dict:
        from concept_erase.digits.evaluate import generate_many

        wanted = ([(p, range(self.per_concept)) for *_, p in self.concepts]
                  + [(p, range(self.per_anchor)) for *_, p in self.anchors])
        made = generate_many(pipe, wanted, steps=25, guidance=4.0)
        hits_f = total_f = hits_r = total_r = 0
        for (d, s, _), images in zip(self.concepts, made):
            pd, ps = self.judge.predict(images)
            hits_f += int((pd == d).sum()) if s == "plain" else int((ps == self.styles.index(s)).sum())
            total_f += len(images)
        for (d, s, _), images in zip(self.anchors, made[len(self.concepts):]):
            pd, ps = self.judge.predict(images)
            hits_r += int(((pd == d) & (ps == self.styles.index(s))).sum())
            total_r += len(images)
        return {"forget_accuracy": hits_f / total_f, "retain_accuracy": hits_r / total_r if total_r else 1.0,
                "images": total_f + total_r}


def _digits_model(config) -> bool:
    """The embedded digits models (SD and flow-matching), by builtin name or by their folder."""
    from concept_erase.io.loading import EMBEDDED, embedded_model_dir

    if config.model in {f"builtin:{name}" for name in EMBEDDED}:
        return True
    for name in EMBEDDED:
        try:
            if Path(config.model).expanduser().resolve() == (embedded_model_dir(name) / "pipeline").resolve():
                return True
        except (OSError, UserError):
            continue
    return False


JUDGES.register("digits")((_digits_model, DigitsJudge))


def find_judge(config):
    """The judge for the run's model, or a one-line error naming the models that have one."""
    for name in JUDGES.names():
        applies, make = JUDGES.get(name)
        if applies(config):
            return make(config)
    raise UserError(f"--stop-when-erased needs a judge for the model, and {config.model!r} has none: only the "
                    "embedded digits models (builtin:digits, builtin:digits-flow) have one. Train for a fixed --steps and evaluate the "
                    "checkpoints with `concept-erase eval` instead")


class ErasureCheck:
    """The trainer's step hook for --stop-when-erased: True at the first check at target."""

    may_stop = True

    def __init__(self, config, judge=None):
        self.every = int(config.check_every)
        self.forget_at_most = float(config.check_forget_at_most)
        self.retain_drop_at_most = float(config.check_retain_drop_at_most)
        self.judge = judge if judge is not None else find_judge(config)
        self.baseline: dict | None = None

    def _log_path(self, trainer) -> Path:
        return Path(trainer.output) / "checks.jsonl"

    def _judge(self, trainer) -> dict:
        unet = trainer.ctx.denoiser
        was_training = unet.training
        unet.eval()
        t0 = time.perf_counter()
        try:
            result = self.judge(trainer.pipe)
        finally:
            unet.train(was_training)
        result["seconds"] = time.perf_counter() - t0
        return result

    def _write(self, trainer, record: dict) -> None:
        with open(self._log_path(trainer), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def start(self, trainer) -> None:
        """Before the first step: the model's own accuracy, or the one a resumed run measured."""
        if not trainer.accelerator.is_main_process:
            return
        path = self._log_path(trainer)
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a crash
                if record.get("step", math.inf) <= trainer.start_step:
                    kept.append(record)
        base = next((r for r in kept if r.get("step") == 0), None)
        if base is None and trainer.start_step > 0:
            raise UserError("--stop-when-erased: this run was started without it (its checks.jsonl has no "
                            "measurement of the model before training); resume without the flag, or start "
                            "again with --overwrite")
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        if base is None:
            base = {"step": 0, **self._judge(trainer)}
            self._write(trainer, base)
            trainer.log(f"erasure check before training: concept {base['forget_accuracy']:.0%}, "
                        f"anchors {base['retain_accuracy']:.0%} ({base['images']} images, {base['seconds']:.1f} s)")
        self.baseline = base

    def __call__(self, done: int, trainer) -> bool:
        if done % self.every or not trainer.accelerator.is_main_process:
            return False
        r = {"step": done, **self._judge(trainer)}
        floor = self.baseline["retain_accuracy"] - self.retain_drop_at_most
        r["at_target"] = r["forget_accuracy"] <= self.forget_at_most and r["retain_accuracy"] >= floor
        self._write(trainer, r)
        trainer.log(f"erasure check at step {done}: concept {r['forget_accuracy']:.0%}, anchors "
                    f"{r['retain_accuracy']:.0%} (before training {self.baseline['retain_accuracy']:.0%})"
                    + ("; erased: stopping" if r["at_target"] else ""))
        return r["at_target"]


class Hooks:
    """Several step hooks as one: each runs; the run stops if any asks to."""

    def __init__(self, *hooks):
        self.hooks = [h for h in hooks if h is not None]
        self.may_stop = any(getattr(h, "may_stop", False) for h in self.hooks)

    def start(self, trainer) -> None:
        for h in self.hooks:
            if hasattr(h, "start"):
                h.start(trainer)

    def __call__(self, done: int, trainer) -> bool:
        return any([bool(h(done, trainer)) for h in self.hooks])  # a list: every hook runs
