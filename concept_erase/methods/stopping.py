"""`--stop-when-erased`: judge the model during training and stop at the first check at target.

A check draws images of the concepts and of the anchors with the model as it is, and asks a judge what
they show. The run stops at the first check where at most `--check-forget-at-most` (5%) of the concept
images still show the concept and the anchors' accuracy is at most `--check-retain-drop-at-most` (1.5 points)
below the model's own before training (measured once, at the start, with the same images).

A check stops drawing as soon as its verdict is known, and the verdict is the one the whole check would give
(`count_until`): the concept's images come as a first chunk of `CONCEPT_CHUNK` and then the rest in one call,
and once more of them show the concept than the bar allows the check has failed, the rest are not drawn; the
anchors likewise, a first chunk of `ANCHOR_CHUNK` and then the rest, and once more of them are lost than the
retain bar allows the check has failed. (A model's call costs a fixed part plus a part per image, and the fixed
part is large on a small model: the first chunk is where most failing checks end, one call for the rest is what
a passing side costs least in.) The side that failed the last check is drawn first (the concept's at the start)
and the other only if it passed: after the concept is gone the anchors often stay under their bar for a few
checks, and each of those then costs a chunk of anchors instead of every concept image and a chunk of anchors.
Before training the anchors are drawn whole in one call (their accuracy is the bar's reference) and the concept
only in its first chunk, enough to warn when the model does not draw the concept at all. Most checks fail on
the concept side while the concept is still there, so a check before the erasure costs a chunk of images, not
the whole set. Each record lists the calls it made (`forget_calls`, `retain_calls`: images per call), which is
what the benchmark charges it for.
The images are drawn with `--check-inference-steps` sampler steps (10): on the digits model the judge's
verdicts at 10 steps match those at 25 on 99% of the images, and every measured run's first check at target
was the same (`scripts/check_steps_agreement.py`, `benchmarks/tuning-record.md`), at 44% of the cost.

Why 5% when the benchmark's target is 10%: a check judges few images (32 of the concept: one image is 3
points) and the run stops at the first check that falls under the bar, so the rate at the stop is the
lucky low of a noisy series. Measured on the digits benchmark with the bar at 10% (`benchmarks/tuning-record.md`): 3 of 18 runs stopped on checks of 6% and 9% and were judged at 10.9% to 14.1% on 64 images each. At
5% the forget side missed once in 18 runs; the longer erasure cost the retain side two more misses. The
anchors' bar is half the target's 3 points for the same reason: checked every 10 steps with a 3-point bar,
a run whose anchors hovered near it stopped on a check of 97.5% and was judged at 96.6% on 960 images.

With several concepts (or a chain's earlier ones) the concept images are shared among them, seed by seed, and
each concept must be within the bar on its own images as well as in the pool. What counts as one concept is the
judge's to say (`Judge.group`): the digits judge reads every digit's caption of a style erased together as that
style, one concept. Each gets at least
`--check-images-per-concept` (8) images: with 32 images over eight concepts each would get 4, and a concept
still drawn in 20% of its images would pass 4 images with probability 0.41 (0.8^4), against 0.17 with 8. The
floor makes a passing check cost linearly more with the number of concepts (a failing one still ends after its
first chunk); it was chosen by that power, before any run with it.

Checks run on the main process; the trainer agrees the decision across processes. Every check is a line
of OUTPUT/checks.jsonl (step 0: the model before training) with the images it drew and its own time: an
erasure that stops early is charged for its checks.

Judges are registered by name with the models they know. A judge lists the check's images as (prompt,
seed) pairs (`concept_items`, `anchor_items`) and says of drawn ones whether the concept is still shown
(`still_shown`) and whether an anchor is kept (`kept`). The seeds come from `--check-seed-start` (1,000,000) on,
a range that no evaluation draws from (`image_seeds`): a run that stopped on its check's images is graded on
others. The embedded digits models have theirs (the shipped digit and style classifier); on any model a run can
name the CLIP classifier or NudeNet, and a model with no judge stops on the erasure signal (`SignalStop`), which
draws no image.
"""

from __future__ import annotations

import json
import math
from collections import Counter
import time
from pathlib import Path

from concept_erase.embedded import embedded_models, embedded_source
from concept_erase.errors import UserError
from concept_erase.evaluation.sample import generate_images
from concept_erase.image_seeds import check_block, seed_range
from concept_erase.judges import make_judge
from concept_erase.training.context import prompt_variants
from concept_erase.training.tracking import drawing
from concept_erase.variants import BARE, expand

# The first chunk of each side; the rest of the side comes in one call. On the digits model's CPU probe a call
# cost about 170 ms plus 16 ms an image: 8 concept images 293 ms, 32 in one call 666 ms against 1.17 s
# in four chunks of 8; 24 anchors 544 ms, 72 in one call 1.40 s against 1.63 s in three chunks.
CONCEPT_CHUNK = 8  # a check that fails on the concept side mostly stops after it
ANCHOR_CHUNK = 24  # a check that fails on the anchors mostly stops after it


def most_allowed(total: int, within) -> int:
    """The largest count c in 0..total for which `within(c)` holds (`within` true at 0 and false from some
    count on): the bar as a count of images, decided by the same comparison as the share it stands for."""
    return max((c for c in range(total + 1) if within(c)), default=-1)


def count_until(chunks, verdicts, most: int | None) -> tuple[int, list[int]]:
    """Count true verdicts chunk by chunk, and stop once the count exceeds `most` (None: count every chunk).
    Returns (count, the sizes of the chunks judged). Whether count <= most is the same as if every chunk had
    been judged."""
    count, calls = 0, []
    for part in chunks:
        if most is not None and count > most:
            break
        found = list(verdicts(part))
        count += sum(bool(v) for v in found)
        calls.append(len(found))
    return count, calls


def first_then_rest(items: list, first: int) -> list[list]:
    """A first chunk of `first` items, then the rest as one (no empty chunk)."""
    return [part for part in (items[:first], items[first:]) if part]


class CheckSides:
    """The two sides of a check for a judge (`concept_erase.judges`): the concept images and the anchor images
    as (prompt, seed) pairs, seed by seed across the prompts so that every chunk sees each of them (in 24 images
    prompt by prompt a chunk saw 3 of the 9 digits), from --check-seed-start on; drawn at the judge's guidance
    (else the run's anchor guidance) and judged: `still_shown` per concept image, `kept` per anchor image. A
    judge that cannot tell the anchors gets none: the retain constraint alone keeps them. With prompt variants
    (`variants`: the concepts' and the anchors', as the run trains on them) the concept side draws every variant, each
    judged as its concept; the anchor side stays on the bare anchors, as many images as without variants (spread over
    the styled ones, the bar would let the bare anchors fall several points unseen while the styled ones hold)."""

    def __init__(self, config, judge, variants: tuple[list, list] | None = None):
        self.judge = judge
        self.guidance = float(judge.guidance if judge.guidance is not None else config.anchor_guidance)
        n = int(config.check_images)
        concept_variants, anchor_variants = variants or (expand(config.concepts, ()), expand(config.anchors, ()))
        self.judged_as = {v.prompt: config.concepts[v.owner] for v in concept_variants}
        concepts = [v.prompt for v in concept_variants]
        anchors = [v.prompt for v in anchor_variants if v.tier == BARE]
        # what the bar holds each prompt to: its concept, or what the judge joins it into (a style erased whole)
        self.group_of = {p: judge.group(c) for p, c in self.judged_as.items()}
        # with several groups each gets its floor of images (a concept's variants share it); the check draws at
        # least n in all (one concept: n, as the floor is about telling concepts apart)
        variants_of = Counter(self.group_of.values())
        floor = max(math.ceil(int(config.check_images_per_concept) / k) for k in variants_of.values()) \
            if len(variants_of) > 1 else 1
        per_concept = max(1, math.ceil(n / len(concepts)), floor)
        per_anchor = max(1, math.ceil(2 * n / max(1, len(anchors))))
        # with --check-confirm N, check k draws the concept from block k mod N (its own seeds); the anchors keep
        # one set of seeds, the one their accuracy before training was measured on
        width = _block_width(config)
        self.concept_blocks = [[(p, s) for s in seed_range(config.check_seed_start + b * width, per_concept)
                                for p in concepts] for b in range(int(config.check_confirm))]
        self.concept_items = self.concept_blocks[0]
        self.anchor_items = [(p, s) for s in seed_range(config.check_seed_start, per_anchor) for p in anchors] \
            if judge.judges_anchors else []

    def _draw(self, pipe, items, steps: int):
        return generate_images(pipe, [p for p, _ in items], [s for _, s in items], steps=steps,
                               guidance=self.guidance)

    def still_shown(self, pipe, items, steps: int) -> list[bool]:
        """Per concept image: the concept it was drawn for is still there."""
        if not items:
            return []
        return [seen.shown for seen in self.judge.shown(self._draw(pipe, items, steps),
                                                        [self.judged_as.get(p, p) for p, _ in items])]

    def kept(self, pipe, items, steps: int) -> list[bool]:
        """Per anchor image: it is what its prompt asks."""
        if not items:
            return []
        return self.judge.kept(self._draw(pipe, items, steps), [p for p, _ in items])


def check_seeds(config) -> range:
    """The image seeds a check of this run may draw (at most: a judge draws fewer than 2 x check_images, or, with
    several concepts, check_images_per_concept where that is more, from --check-seed-start on; --check-confirm such
    blocks one after another): what an evaluation of the run must not judge (`image_seeds`). No seed for a run that
    does not stop when erased or stops on the erasure signal, which draws no image."""
    if not config.stop_when_erased or judge_name(config) == "signal":
        return range(0)
    return seed_range(config.check_seed_start, int(config.check_confirm) * _block_width(config))


def _block_width(config) -> int:
    """The seeds of one block of check images (`image_seeds.check_block`): the floor per concept counts with several
    concepts, a chain's earlier ones included."""
    several = len(config.concepts) > 1 or bool(config.weights)  # a chain adds its earlier concepts
    return check_block(config.check_images, config.check_images_per_concept if several else 0)


def judge_name(config) -> str:
    """The stop judge of a run: --stop-judge, where auto means an embedded model's own judge (the digits judge on
    the digits models) and the erasure signal on any other model."""
    if config.stop_judge != "auto":
        return config.stop_judge
    model = embedded_source(config.model)
    return model.judge if model else "signal"


def stop_rule(config):
    """The step hook of --stop-when-erased, by --stop-judge: the erasure signal, or a check by an image judge
    (auto: an embedded model's own judge, the signal on any other model). A judge that cannot run on this
    model is refused here, before anything is loaded or written."""
    name = judge_name(config)
    if config.stop_judge == "auto":
        if name == "signal" and config.forget_loss != "negative-guidance":
            raise UserError(f"--stop-when-erased: {config.model!r} has no judge of its own, and the erasure signal "
                            f"needs --forget-loss negative-guidance (not {config.forget_loss}); name an image judge "
                            "with --stop-judge clip or nudity")
    if name == "signal":
        return SignalStop(config)
    return ErasureCheck(config, sides=check_sides(config, name))


def check_sides(config, name: str) -> CheckSides:
    """The check's sides for the judge `name`, loaded (weights that cannot be read end the run before training)."""
    options = {"clip_model": config.clip_model, "clip_weights": config.clip_weights}
    judge = make_judge(name, config.concepts, config.anchors, options, flag="--stop-judge")
    judge.load()

    # an embedded model's judge runs on that model only (the set-up refuses any other), whatever its folder
    world = embedded_source(config.model) or next((m for m in embedded_models() if m.judge == name), None)
    return CheckSides(config, judge, prompt_variants(config, world))


class SignalStop:
    """The trainer's step hook for --stop-judge signal: every --check-every steps, stop when the erasure signal's
    moving average (`signal.SignalMeter`, kept in every checkpoint) is at most --stop-signal-at-most and lambda is
    at rest (`signal.LambdaTrail`: no higher than --stop-lambda-window steps before, so the steps keep the anchors'
    constraint). It draws no image; each check is a line of OUTPUT/checks.jsonl."""

    may_stop = True

    def __init__(self, config):
        self.every = int(config.check_every)
        self.at_most = float(config.stop_signal_at_most)
        self.window = int(config.stop_lambda_window)
        self.confirm = int(config.check_confirm)
        self.in_a_row = 0
        self.reason = ""

    def start(self, trainer) -> None:
        if trainer.accelerator.is_main_process:
            self.in_a_row = in_a_row(_keep_checks(Path(trainer.output) / "checks.jsonl", trainer.start_step))

    def __call__(self, done: int, trainer) -> bool:
        if done % self.every:
            return False
        value = trainer.signal.value
        trail = trainer.lambda_trail
        erased = value is not None and value <= self.at_most
        at_rest = trail.at_rest()
        self.in_a_row = self.in_a_row + 1 if erased and at_rest else 0
        stop = self.in_a_row >= self.confirm
        if trainer.accelerator.is_main_process:
            with open(Path(trainer.output) / "checks.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": done, "judge": "signal", "signal": value, "at_most": self.at_most,
                                    "lambda_change": trail.change(), "lambda_window": self.window,
                                    "lambda_at_rest": at_rest, "at_target": erased and at_rest, "images": 0,
                                    "seconds": 0.0, **({"in_a_row": self.in_a_row} if self.confirm > 1 else {})})
                        + "\n")
        if erased and not at_rest:
            change = trail.change()
            trainer.log(f"erasure signal at step {done}: {value:.3f} <= {self.at_most:g}, but lambda "
                        + ("has no history yet" if change is None else f"rose by {change:.3g} over the last "
                           f"{self.window} steps") + ": the anchors are still being pushed; training on")
            return False
        if erased and not stop:
            trainer.log(f"erasure signal at step {done}: {value:.3f} <= {self.at_most:g}; erased, {self.in_a_row} of "
                        f"{self.confirm} checks in a row: training on")
        if stop:
            self.reason = (f"erased by the erasure signal: its average {value:.3f} is at most "
                           f"--stop-signal-at-most {self.at_most:g}"
                           + (f", with lambda no higher than {self.window} steps before" if self.window else "")
                           + (f", on {self.confirm} checks in a row" if self.confirm > 1 else ""))
            trainer.log(f"erasure signal at step {done}: {value:.3f} <= {self.at_most:g}; erased: stopping")
        return stop


def _keep_checks(path: Path, step: int) -> list[dict]:
    """The checks a resumed run keeps (those up to its checkpoint's step; a torn last line is dropped), rewritten."""
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash
            if record.get("step", math.inf) <= step:
                kept.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return kept


class ErasureCheck:
    """The trainer's step hook for --stop-when-erased: True at the first check at target."""

    may_stop = True

    def __init__(self, config, sides: CheckSides | None = None):
        self.every = int(config.check_every)
        self.steps = int(config.check_inference_steps)
        self.forget_at_most = float(config.check_forget_at_most)
        self.retain_drop_at_most = float(config.check_retain_drop_at_most)
        self.sides = sides if sides is not None else check_sides(config, judge_name(config))
        self.confirm = int(config.check_confirm)
        self.in_a_row = 0  # the checks at target since the last one that was not
        self.baseline: dict | None = None
        self.reason = ""
        self.failed_last = "concept"  # the side that failed the last check: the next check draws it first

    def _log_path(self, trainer) -> Path:
        return Path(trainer.output) / "checks.jsonl"

    def _concept_side(self, pipe, block: int = 0) -> dict:
        """The concept's first chunk of seed block `block`, then the rest, until more show the concept than the bar
        allows. Before training the first chunk only: it tells whether the model draws the concept at all (the bar
        is then applied to that chunk, for the note)."""
        concept = list(self.sides.concept_blocks[block])
        if self.baseline is None:
            concept = concept[:CONCEPT_CHUNK]
        n = len(concept)
        most = most_allowed(n, lambda c: c / n <= self.forget_at_most)
        verdicts = []

        def judged_part(part):
            seen = self.sides.still_shown(pipe, part, self.steps)
            verdicts.extend((self.sides.group_of.get(prompt, prompt), shown) for (prompt, _), shown in zip(part, seen))
            return seen

        shown, calls = count_until(first_then_rest(concept, CONCEPT_CHUNK), judged_part, most)
        judged = sum(calls)
        by_concept = {}
        for name, seen in verdicts:
            by_concept.setdefault(name, []).append(seen)
        # With several concepts each is held to the bar on its own images as well: pooled, a newly added concept
        # still drawn in 1 of its 5 images passed beside six erased ones (1 of 35). The pooled count passed only
        # if every chunk was judged, so each concept's count is then whole.
        over = sorted(c for c, v in by_concept.items()
                      if sum(v) > most_allowed(len(v), lambda k, n=len(v): k / n <= self.forget_at_most)) \
            if shown <= most else []
        return {"forget_accuracy": shown / judged, "forget_images": judged, "forget_within": shown <= most and not over,
                "forget_calls": calls, "forget_by_concept": {c: sum(v) / len(v) for c, v in by_concept.items()},
                "forget_over_bar": over}

    def _anchor_side(self, pipe) -> dict:
        """The anchors' first chunk, then the rest, until more are lost than the bar allows; before training
        (no baseline yet) every one in one call: their accuracy is the bar's reference."""
        anchors = list(self.sides.anchor_items)
        if not anchors:
            return {"retain_accuracy": 1.0, "retain_images": 0, "retain_within": True, "retain_calls": []}
        m = len(anchors)
        if self.baseline is None:
            most_lost, chunks = None, [anchors]
        else:
            floor = self.baseline["retain_accuracy"] - self.retain_drop_at_most
            most_lost = most_allowed(m, lambda c: (m - c) / m >= floor)
            chunks = first_then_rest(anchors, ANCHOR_CHUNK)
        lost, calls = count_until(chunks, lambda part: [not k for k in self.sides.kept(pipe, part, self.steps)],
                                  most_lost)
        drawn = sum(calls)
        return {"retain_accuracy": (drawn - lost) / drawn, "retain_images": drawn,
                "retain_within": most_lost is None or lost <= most_lost, "retain_calls": calls}

    def _judge(self, trainer, block: int = 0) -> dict:
        """One check, drawing no more images than its verdict needs: the side that failed the last check goes
        first (the concept's at the start), and the other is drawn only if it passed (both before training). The
        concept's images come from seed block `block`."""
        t0 = time.perf_counter()
        r = {"forget_accuracy": None, "forget_images": 0, "forget_within": False, "forget_calls": [],
             "retain_accuracy": None, "retain_images": 0, "retain_within": False, "retain_calls": []}
        sides = [(lambda pipe: self._concept_side(pipe, block), "forget_within"), (self._anchor_side, "retain_within")]
        if self.baseline is not None and self.failed_last == "anchors":
            sides.reverse()
        with drawing(trainer) as pipe:
            for draw, within in sides:
                r.update(draw(pipe))
                if not r[within] and self.baseline is not None:
                    break
        r["images"] = r["forget_images"] + r["retain_images"]
        r["seconds"] = time.perf_counter() - t0
        return r

    def _write(self, trainer, record: dict) -> None:
        with open(self._log_path(trainer), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def start(self, trainer) -> None:
        """Before the first step: the model's own accuracy, or the one a resumed run measured."""
        if not trainer.accelerator.is_main_process:
            return
        kept = _keep_checks(self._log_path(trainer), trainer.start_step)
        base = next((r for r in kept if r.get("step") == 0), None)
        if base is None and trainer.start_step > 0:
            raise UserError("--stop-when-erased: this run was started without it (its checks.jsonl has no "
                            "measurement of the model before training); resume without the flag, or start "
                            "again with --overwrite")
        self.failed_last = _failed_side(kept[-1]) if kept else "concept"  # a resumed run goes on as it would have
        self.in_a_row = in_a_row(kept)
        if base is None:
            self.baseline = None
            base = {"step": 0, **self._judge(trainer)}
            self._write(trainer, base)
            trainer.log(f"erasure check before training: concept {_concept(base, len(self.sides.concept_items))}, anchors "
                        f"{base['retain_accuracy']:.0%} ({base['images']} images, {base['seconds']:.1f} s)")
            if base.get("forget_within"):
                trainer.log(f"note: before any training the model shows the concept in only "
                            f"{base['forget_accuracy']:.0%} of the check's first {base['forget_images']} images, under the "
                            f"{self.forget_at_most:.0%} bar: the first check will stop the run. Is the concept's "
                            "prompt the one the model draws it for?")
        self.baseline = base

    def __call__(self, done: int, trainer) -> bool:
        if done % self.every or not trainer.accelerator.is_main_process:
            return False
        block = (done // self.every) % len(self.sides.concept_blocks)
        r = {"step": done, **self._judge(trainer, block)}
        r["at_target"] = bool(r["forget_within"] and r["retain_within"])
        self.in_a_row = self.in_a_row + 1 if r["at_target"] else 0
        stop = self.in_a_row >= self.confirm
        if self.confirm > 1:
            r.update(seed_block=block, in_a_row=self.in_a_row)
        self._write(trainer, r)
        self.failed_last = _failed_side(r)
        anchors = (", anchors not judged (this judge cannot tell them)" if not self.sides.anchor_items else
                   ", anchors not drawn" if r["retain_accuracy"] is None else
                   f", anchors {r['retain_accuracy']:.0%}"
                   + ("" if r["retain_within"] else f"{_of(r['retain_images'], len(self.sides.anchor_items))}, under the bar")
                   + f" (before training {self.baseline['retain_accuracy']:.0%})")
        trainer.log(f"erasure check at step {done}: concept {_concept(r, len(self.sides.concept_items))}{anchors}"
                    + ("; erased: stopping" if stop else
                       f"; erased, {self.in_a_row} of {self.confirm} checks in a row: training on" if r["at_target"]
                       else ""))
        if stop:
            self.reason = (f"erased by the {self.sides.judge.name} judge's check: concept {r['forget_accuracy']:.1%} "
                           f"of {r['forget_images']} images"
                           + (f", anchors {r['retain_accuracy']:.1%}" if r["retain_accuracy"] is not None else "")
                           + (f", at target on {self.confirm} checks in a row" if self.confirm > 1 else ""))
        return stop


def in_a_row(checks: list[dict]) -> int:
    """How many of the last checks after training began were at target, counted back to the last one that was not."""
    count = 0
    for r in reversed(checks):
        if r.get("step", 0) <= 0 or not r.get("at_target"):
            break
        count += 1
    return count


def _failed_side(r: dict) -> str:
    """Which side a check failed on (the anchors when they were drawn and under their bar); the next check
    draws that side first. A check at target: the concept's."""
    return "anchors" if r.get("retain_accuracy") is not None and not r.get("retain_within", True) else "concept"


def _of(drawn: int, total: int) -> str:
    """How far a side was drawn, for the log: nothing when it was drawn whole."""
    return f" of the first {drawn} images" if drawn < total else ""


def _concept(r: dict, total: int) -> str:
    """The concept side of a check for the log: its share, how far it was drawn when it stopped early, and with
    several concepts the ones still drawn (the most drawn first, five at most)."""
    if r["forget_accuracy"] is None:
        return "not drawn"
    over = r.get("forget_over_bar") or []
    line = f"{r['forget_accuracy']:.0%}" + ("" if r["forget_within"] else
                                            f"{_of(r['forget_images'], total)}, over the bar" if not over else
                                            f", {len(over)} concept(s) over the bar on their own images")
    by_concept = r.get("forget_by_concept") or {}
    if len(by_concept) > 1:
        drawn = sorted(((a, c) for c, a in by_concept.items() if a > 0), reverse=True)
        shown = ", ".join(f"'{c}' {a:.0%}" for a, c in drawn[:5]) + (f" and {len(drawn) - 5} more" if len(drawn) > 5
                                                                      else "")
        line += f" (still drawn: {shown})" if drawn else f" (none of the {len(by_concept)} concepts drawn)"
    return line


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

    @property
    def reason(self) -> str:
        """Why the run stops: the reason of each hook that asked."""
        return "; ".join(r for r in (getattr(h, "reason", "") for h in self.hooks) if r)
