"""--stop-when-erased: the check hook on its own (a judge that says what it is told), then the trainer
stopping on it, resuming a stopped run, and the digits judge on the embedded model."""

import json
import unittest.mock
from types import SimpleNamespace

import pytest

from concept_erase.digits.world import caption
from concept_erase.errors import UserError
from concept_erase.config import SIGNAL_LAMBDA_WINDOW
from concept_erase.methods.stopping import CheckSides, ErasureCheck, Hooks, SignalStop, stop_rule


class ScriptedSides:
    """Reports, for each check in turn (the first is the model before training), the forget and retain
    accuracy scripted for it: of its 25 concept images the first 25 x forget show the concept, of its 200
    anchor images the first 200 x retain are kept (with `lost_first`, the last). It counts the checks and the
    images it was asked to draw."""

    def __init__(self, forget, retain=None, lost_first=False):
        self.forget, self.retain = list(forget), list(retain or [1.0] * len(forget))
        self.lost_first = lost_first
        self.concept_items = [("concept", s) for s in range(25)]
        self.judged_as = {}  # each concept image is judged as its own prompt
        self.anchor_items = [("anchor", s) for s in range(200)]
        self.calls, self.drawn, self.steps = 0, [], set()
        self.sides: set = set()  # the sides the current check has begun drawing
        self.judge = SimpleNamespace(name="scripted")

    @property
    def group_of(self) -> dict:
        return self.judged_as  # a scripted concept is its own group

    @property
    def concept_blocks(self) -> list:
        return [self.concept_items]  # every check draws the same concept images

    def _begin(self, side, items):
        """A check begins where a side's first item is drawn again (a check draws each side at most once, in
        either order)."""
        if items[0] == (self.concept_items if side == "concept" else self.anchor_items)[0]:
            if side in self.sides or not self.sides:
                self.calls, self.sides = self.calls + 1, set()
            self.sides.add(side)

    def still_shown(self, pipe, items, steps):
        self._begin("concept", items)
        self.drawn.append(("concept", len(items)))
        self.steps.add(steps)
        shown = round(25 * self.forget[self.calls - 1])
        return [self.concept_items.index(item) < shown for item in items]

    def kept(self, pipe, items, steps):
        self._begin("anchors", items)
        self.drawn.append(("anchors", len(items)))
        kept = round(200 * self.retain[self.calls - 1])
        if self.lost_first:
            return [self.anchor_items.index(item) >= 200 - kept for item in items]
        return [self.anchor_items.index(item) < kept for item in items]


def _fake_trainer(**kw):
    """What a check reads of a trainer, with no model: the pipeline is the scripted judge's business."""
    import contextlib
    from types import SimpleNamespace

    unet = SimpleNamespace(training=True, eval=lambda: None, train=lambda mode=True: None)
    return SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True, device="cpu",
                                                       autocast=contextlib.nullcontext),
                           ctx=SimpleNamespace(denoiser=unet), family=SimpleNamespace(text_encoders=lambda pipe: []),
                           pipe=SimpleNamespace(vae=SimpleNamespace(device="cpu")), log=lambda message: None, **kw)


def _settings(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"check_every": 2, "check_forget_at_most": 0.05, "check_retain_drop_at_most": 0.03,
                              "check_inference_steps": 10, "check_confirm": 1, **kw})


def test_the_check_stops_at_the_first_check_at_target_and_logs_every_check(make_config, tmp_path):
    from concept_erase.export.delta import read_delta
    from concept_erase.training.trainer import erase

    # before training 100% / anchors 100%; step 2: 50%; step 4: concept gone but anchors 95% (> 3 points
    # lost): not yet; step 6: 5% and 98%: stop
    judge = ScriptedSides([1.0, 0.5, 0.0, 0.05], [1.0, 1.0, 0.95, 0.98])
    config = make_config(steps=10, checkpoint_every=4)
    path = erase(config, on_step=ErasureCheck(_settings(), sides=judge))
    run = tmp_path / "run"
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 2, 4, 6]
    assert [c.get("at_target") for c in checks] == [None, False, False, True]
    assert all(c["seconds"] >= 0 for c in checks)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    assert json.loads((run / "run.json").read_text())["stopped_at"] == 6
    assert int(read_delta(path)[1]["steps"]) == 6
    # resuming a run that stopped trains no further and judges nothing again
    again = ScriptedSides([])
    erase(make_config(steps=10, checkpoint_every=4, resume="latest"), on_step=ErasureCheck(_settings(), sides=again))
    assert again.calls == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("at_most, retain_drop, stops_at",
                         [(0.05, 0.03, 6), (0.10, 0.03, 4), (0.0, 0.03, None), (0.10, 0.01, 6), (0.10, 0.0, None)])
def test_the_check_stops_only_under_its_bars(at_most, retain_drop, stops_at):
    """--check-forget-at-most: checks of 12%, 8%, 4% (after the model's own 100%): the default 5% stops at the
    third, 10% at the second, 0% never. --check-retain-drop-at-most: the anchors at 97.5%, 99%, 99% of the
    model's own 100%: a 1-point bar passes the second check by, a 0-point bar every check."""
    check = ErasureCheck(_settings(check_forget_at_most=at_most, check_retain_drop_at_most=retain_drop),
                         sides=ScriptedSides([1.0, 0.12, 0.08, 0.04], [1.0, 1.0, 0.975, 0.99]))
    check.baseline = {"retain_accuracy": 1.0}
    check._write = lambda trainer, record: None
    trainer = _fake_trainer()
    check.sides.calls = 1  # the model before training was judged at the start
    stopped = next((step for step in (2, 4, 6) if check(step, trainer)), None)
    assert stopped == stops_at


def test_a_resumed_run_keeps_its_measurement_before_training(make_config, tmp_path):
    from concept_erase.training.trainer import erase

    first = ScriptedSides([0.2, 0.8])  # before training (5 of the first 8 images) and step 2: not at target
    erase(make_config(steps=2), on_step=ErasureCheck(_settings(), sides=first))
    run = tmp_path / "run"
    with open(run / "checks.jsonl", "a") as f:  # a check past the checkpoint, as a crash would leave it
        f.write(json.dumps({"step": 3, "forget_accuracy": 0.0, "retain_accuracy": 1.0}) + "\n")
    later = ScriptedSides([0.0])
    erase(make_config(steps=8, resume="latest"), on_step=ErasureCheck(_settings(), sides=later))
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 2, 4] and later.calls == 1  # step 0 not judged again
    assert checks[0]["forget_accuracy"] == 5 / 8 and checks[-1]["at_target"]


def test_an_overwritten_run_has_its_own_checks(make_config, tmp_path):
    """--overwrite: the check log is the new run's (the old run's was left in place, and the benchmark read
    its first run's checks for every later run of the same output)."""
    from concept_erase.training.trainer import erase

    erase(make_config(steps=4), on_step=ErasureCheck(_settings(), sides=ScriptedSides([1.0, 0.9, 0.8])))
    erase(make_config(steps=4, overwrite=True), on_step=ErasureCheck(_settings(), sides=ScriptedSides([0.12, 0.0])))
    run = tmp_path / "run"
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines()]
    assert [(c["step"], c["forget_accuracy"]) for c in checks] == [(0, 3 / 8), (2, 0.0)]
    assert json.loads((run / "run.json").read_text())["stopped_at"] == 2


def test_hooks_all_run_and_any_stops():
    seen = []
    both = Hooks(lambda d, t: seen.append(("a", d)), None, lambda d, t: seen.append(("b", d)) or d == 3)
    assert not both(2, None) and both(3, None)
    assert seen == [("a", 2), ("b", 2), ("a", 3), ("b", 3)] and not both.may_stop


def test_a_model_without_a_judge_stops_on_the_signal_and_a_named_judge_must_fit():
    from concept_erase.config import EraseConfig

    def config(**kw):
        return EraseConfig(**{"model": "builtin:tiny", "concepts": ["x"], "stop_when_erased": True, **kw})

    assert isinstance(stop_rule(config()), SignalStop)
    assert isinstance(stop_rule(config(model="builtin:digits", stop_judge="signal")), SignalStop)
    assert isinstance(stop_rule(config(model="builtin:digits", concepts=[caption(3)])), ErasureCheck)
    with pytest.raises(UserError, match="has no judge of its own"):
        stop_rule(config(forget_loss="remap", remap_to=["y"]))
    with pytest.raises(UserError, match="knows the digits' captions"):
        stop_rule(config(model="builtin:digits", concepts=["a cat"]))
    with pytest.raises(UserError, match="knows the digits' captions"):
        stop_rule(config(stop_judge="digits", concepts=["a cat"]))


def test_the_digits_judge_sees_the_embedded_models_digits_and_styles():
    from concept_erase.digits.world import caption
    from concept_erase.io.loading import load_pipeline
    from concept_erase.judges import make_judge

    pipe = load_pipeline("builtin:digits")
    pipe.set_progress_bar_config(disable=True)
    start = 5000
    concepts, anchors = [caption(3), caption(5, "red ink")], [caption(1), caption(7, "bold")]
    sides = CheckSides(SimpleNamespace(concepts=concepts, anchors=anchors, check_images=4, check_seed_start=start,
                                       check_images_per_concept=1, anchor_guidance=7.5, check_confirm=1, weights=""), make_judge("digits", concepts, anchors))
    assert sides.guidance == 4.0  # the judge's own guidance, not the run's
    # two images per concept, seed by seed across the concepts, from the check's first seed on; the anchors get twice
    # the concepts' share, seed by seed too (a first chunk sees every anchor)
    assert sides.concept_items == [(caption(3), start), (caption(5, "red ink"), start), (caption(3), start + 1),
                                   (caption(5, "red ink"), start + 1)]
    assert sides.anchor_items == [(p, s) for s in range(start, start + 4) for p in (caption(1), caption(7, "bold"))]
    shown = sides.still_shown(pipe, sides.concept_items, 10)
    kept = sides.kept(pipe, sides.anchor_items, 10)
    # the model draws what it is asked: the concepts are there (not erased), the anchors are right
    assert sum(shown) >= 3 and sum(kept) >= 6 and len(shown) == 4 and len(kept) == 8
    # a chunk of one image (a check's last chunk can be one) is drawn and judged on its own
    assert sum(sides.still_shown(pipe, [(caption(3), start)], 10)) == 1


def test_a_check_with_prompt_variants_draws_them_and_judges_each_as_its_concept():
    """A run trained on the digit in red ink is checked on it too: the red three is drawn, and the digits judge asks
    whether it shows a three (the digit), not whether it is red (what the red caption alone would mean to it). The
    anchors are checked bare, on as many images as without variants."""
    from concept_erase.digits.world import STYLE_TEMPLATES, caption, takes_style
    from concept_erase.io.loading import load_pipeline
    from concept_erase.judges import make_judge
    from concept_erase.variants import expand

    pipe = load_pipeline("builtin:digits")
    pipe.set_progress_bar_config(disable=True)
    concepts, anchors = [caption(3)], [caption(1)]
    red = tuple(t for t in STYLE_TEMPLATES if t.tier == "red ink")
    config = SimpleNamespace(concepts=concepts, anchors=anchors, check_images=2, check_seed_start=7000,
                             check_images_per_concept=1, anchor_guidance=7.5, check_confirm=1, weights="")
    sides = CheckSides(config, make_judge("digits", concepts, anchors),
                       (expand(concepts, red, takes_style), expand(anchors, red, takes_style)))
    assert sides.concept_items == [(caption(3), 7000), (caption(3, "red ink"), 7000)]
    assert [p for p, _ in sides.anchor_items] == [caption(1)] * 4  # the bare anchors, as many as without variants
    # the judge reads the red three's digit: a red one (the digit erased, the colour kept) is not the concept shown
    assert sides.judged_as[caption(3, "red ink")] == caption(3)
    assert sides.still_shown(pipe, sides.concept_items, 10) == [True, True]
    # a red one judged as the three is not shown (judged by its own red caption it would be: it is red)
    sides.judged_as[caption(1, "red ink")] = caption(3)
    assert sides.still_shown(pipe, [(caption(1, "red ink"), 7000)], 10) == [False]


def test_every_concept_gets_its_floor_of_check_images_and_the_check_seeds_cover_them():
    """Eight concepts in a check of 32 would get 4 images each; the floor gives each 8, seed by seed across the
    concepts. A concept's variants share its floor. The seeds an evaluation must avoid cover the floor's."""
    from concept_erase.methods.stopping import check_seeds
    from concept_erase.variants import SLOT, Template, expand

    judge = SimpleNamespace(guidance=None, judges_anchors=True, group=str)
    concepts = [f"c{i}" for i in range(8)]
    config = SimpleNamespace(anchor_guidance=7.5, check_images=32, check_seed_start=50, concepts=concepts,
                             anchors=["a1", "a2"], check_images_per_concept=8, stop_when_erased=True,
                             stop_judge="digits", weights="", check_confirm=1)
    sides = CheckSides(config, judge)
    assert len(sides.concept_items) == 64
    assert sides.concept_items[:9] == [(c, 50) for c in concepts] + [("c0", 51)]
    for c in concepts:
        assert [s for p, s in sides.concept_items if p == c] == list(range(50, 58))
    assert len(sides.anchor_items) == 64  # twice --check-images, spread over the anchors: not raised by the floor
    # one concept: the floor is below --check-images, nothing changes
    one = CheckSides(SimpleNamespace(**{**vars(config), "concepts": ["c0"]}), judge)
    assert one.concept_items == [("c0", s) for s in range(50, 82)]
    few = SimpleNamespace(**{**vars(config), "concepts": ["c0"], "check_images": 2})  # one concept: no floor
    assert len(CheckSides(few, judge).concept_items) == 2 and check_seeds(few) == range(50, 54)
    # a concept in four variants: its floor of 8 is 2 per variant, and 32 images over 8 prompts already give 4 each
    variants = (expand(["c0", "c1"], (Template(f"{SLOT} in red", "red"), Template(f"{SLOT} in blue", "blue"),
                                      Template(f"{SLOT}, bold", "bold"))), expand(["a1"], ()))
    two = CheckSides(SimpleNamespace(**{**vars(config), "concepts": ["c0", "c1"]}), judge, variants)
    assert len(two.concept_items) == 32
    many = CheckSides(SimpleNamespace(**{**vars(config), "concepts": ["c0", "c1"], "check_images": 4}), judge, variants)
    assert {p: sum(1 for q, _ in many.concept_items if many.judged_as[q] == p) for p in ("c0", "c1")} == \
        {"c0": 8, "c1": 8}
    # the digits judge joins every digit's caption of a style into the style: one concept, its ten captions sharing the
    # floor (4 images each from the 32, as without it); nine of them are nine concepts of 8 images each
    from concept_erase.digits.world import caption
    from concept_erase.judges import make_judge

    red = [caption(d, "red ink") for d in range(10)]
    whole = CheckSides(SimpleNamespace(**{**vars(config), "concepts": red}), make_judge("digits", red, [caption(1)]))
    assert len(whole.concept_items) == 40 and set(whole.group_of.values()) == {"red ink"}
    part = CheckSides(SimpleNamespace(**{**vars(config), "concepts": red[:9]}),
                      make_judge("digits", red[:9], [caption(9, "red ink")]))
    assert len(part.concept_items) == 72 and len(set(part.group_of.values())) == 9
    # an evaluation must avoid every seed a check may draw, the floor's too
    assert check_seeds(SimpleNamespace(**{**vars(config), "check_images": 2, "check_images_per_concept": 20})) == \
        range(50, 70)
    # with --check-confirm 3 the concept comes from three blocks of 64 seeds each (twice --check-images), and an
    # evaluation must avoid all three; the anchors keep the first block's
    three = CheckSides(SimpleNamespace(**{**vars(config), "check_confirm": 3}), judge)
    assert [sorted({s for _, s in b}) for b in three.concept_blocks] == [list(range(50 + 64 * b, 58 + 64 * b))
                                                                         for b in range(3)]
    assert three.anchor_items == sides.anchor_items and check_seeds(three_config := SimpleNamespace(
        **{**vars(config), "check_confirm": 3})) == range(50, 50 + 3 * 64)
    assert all(s in check_seeds(three_config) for b in three.concept_blocks for _, s in b)


def test_a_count_stopped_early_gives_the_whole_counts_verdict():
    """count_until stops drawing once the bar is exceeded; on every sequence of verdicts, chunk size and bar, the
    verdict (count <= most) is the one of counting everything, and it never judges more than it must."""
    import itertools

    from concept_erase.methods.stopping import count_until

    def chunked(items, size):
        return [items[i:i + size] for i in range(0, len(items), size)]

    for n in range(0, 9):
        for verdicts in itertools.product([False, True], repeat=n):
            for size in (1, 3, 8):
                for most in range(n + 1):
                    asked = []

                    def judge(part):
                        asked.append(len(part))
                        return [verdicts[i] for i in part]

                    count, calls = count_until(chunked(list(range(n)), size), judge, most)
                    judged = sum(calls)
                    assert (count <= most) == (sum(verdicts) <= most)
                    assert calls == asked and count == sum(verdicts[:judged])
                    # it stopped at the first chunk that took the count over the bar, or drew everything
                    over = next((i for i in range(n) if sum(verdicts[:i + 1]) > most), None)
                    assert judged == (n if over is None else min(n, (over // size + 1) * size))
    assert count_until(chunked(list(range(5)), 2), lambda part: [True] * len(part), None) == (5, [2, 2, 1])


def test_a_side_is_a_first_chunk_then_the_rest():
    from concept_erase.methods.stopping import first_then_rest

    items = list(range(10))
    assert first_then_rest(items, 3) == [[0, 1, 2], list(range(3, 10))]
    assert first_then_rest(items, 10) == [items] and first_then_rest(items, 12) == [items]
    assert first_then_rest([], 3) == []


@pytest.mark.parametrize("total, at_most", [(32, 0.05), (25, 0.04), (20, 0.05), (3, 0.5), (7, 0.0), (10, 1.0)])
def test_the_bar_as_a_count_is_the_share_compared_as_before(total, at_most):
    from concept_erase.methods.stopping import most_allowed

    most = most_allowed(total, lambda c: c / total <= at_most)
    assert all((c <= most) == (c / total <= at_most) for c in range(total + 1))


def test_a_check_draws_only_what_its_verdict_needs(tmp_path):
    """Before training: the concept's first chunk (enough to tell whether the model draws it), the anchors whole in
    one call. A check while the concept is still drawn: the concept's first chunk only, no anchor. A check where
    the concept is gone but the anchors are not kept (their losses come first): the concept's first chunk and
    then its rest, then the anchors until more are lost than the bar allows (6 of 200 at 97%: the first chunk). A
    check at target: every image, each side as a first chunk and the rest (the anchors first, as they failed the
    check before). Every image at --check-inference-steps; every record lists its calls."""
    from concept_erase.methods.stopping import ANCHOR_CHUNK, CONCEPT_CHUNK

    judge = ScriptedSides([1.0, 0.6, 0.04, 0.04], [1.0, 1.0, 0.9, 0.975], lost_first=True)
    check = ErasureCheck(_settings(check_inference_steps=7), sides=judge)
    trainer = _fake_trainer(output=tmp_path, start_step=0)
    concept_whole = [("concept", CONCEPT_CHUNK), ("concept", 25 - CONCEPT_CHUNK)]
    anchors_whole = [("anchors", ANCHOR_CHUNK), ("anchors", 200 - ANCHOR_CHUNK)]
    check.start(trainer)
    assert judge.drawn == [("concept", CONCEPT_CHUNK), ("anchors", 200)]
    judge.drawn.clear()
    assert not check(2, trainer) and judge.drawn == [("concept", CONCEPT_CHUNK)]
    judge.drawn.clear()
    assert not check(4, trainer) and judge.drawn == concept_whole + [("anchors", ANCHOR_CHUNK)]
    judge.drawn.clear()
    assert check(6, trainer) and judge.drawn == anchors_whole + concept_whole  # the side that failed goes first
    assert judge.steps == {7}
    records = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert [(r["forget_images"], r["retain_images"], r["images"]) for r in records] == [
        (CONCEPT_CHUNK, 200, CONCEPT_CHUNK + 200), (CONCEPT_CHUNK, 0, CONCEPT_CHUNK),
        (25, ANCHOR_CHUNK, 25 + ANCHOR_CHUNK), (25, 200, 225)]
    assert [(r["forget_calls"], r["retain_calls"]) for r in records] == [
        ([CONCEPT_CHUNK], [200]), ([CONCEPT_CHUNK], []), ([CONCEPT_CHUNK, 25 - CONCEPT_CHUNK], [ANCHOR_CHUNK]),
        ([CONCEPT_CHUNK, 25 - CONCEPT_CHUNK], [ANCHOR_CHUNK, 200 - ANCHOR_CHUNK])]
    assert records[1]["retain_accuracy"] is None and records[1]["forget_accuracy"] == 1.0
    assert records[2]["retain_accuracy"] == 4 / ANCHOR_CHUNK and not records[2]["retain_within"] and not records[2]["at_target"]
    assert records[3]["forget_accuracy"] == 0.04 and records[3]["retain_accuracy"] == 0.975 and records[3]["at_target"]


def test_the_side_that_failed_last_is_drawn_first(tmp_path):
    """After a check that failed on the anchors the next draws the anchors first, and stops there if they fail
    again (no concept image); once they pass, the concept side follows, and a failure there puts it first again.
    Every verdict is the one of drawing both sides; a resumed run takes the order up from its checks.jsonl."""
    from types import SimpleNamespace

    from concept_erase.methods.stopping import ANCHOR_CHUNK

    # before training; the concept gone but the anchors at 90% (their losses first); the same; the anchors
    # back, the concept at 60%; the same; both within
    judge = ScriptedSides([1.0, 0.0, 0.0, 0.6, 0.6, 0.0], [1.0, 0.9, 0.9, 1.0, 1.0, 1.0], lost_first=True)
    check = ErasureCheck(_settings(), sides=judge)
    trainer = _fake_trainer(output=tmp_path, start_step=0)
    seen = []
    for step in (0, 2, 4, 6, 8, 10):
        judge.drawn.clear()
        stopped = check.start(trainer) if step == 0 else check(step, trainer)
        sides = [side for side, _ in judge.drawn]
        seen.append((sides[0], sides.count("concept"), sides.count("anchors")))
        if step == 4:  # a run resumed here goes on with the anchors first, as it would have
            again = ErasureCheck(_settings(), sides=judge)
            again.start(SimpleNamespace(**{**vars(trainer), "start_step": 4}))
            assert again.failed_last == check.failed_last == "anchors"
    assert stopped
    assert seen == [("concept", 1, 1),   # before training: the concept's first chunk; the anchors in one call
                    ("concept", 2, 1),   # the concept gone (first chunk and rest); the anchors fail in their first
                    ("anchors", 0, 1),   # the anchors first: they fail again, no concept image drawn
                    ("anchors", 1, 2),   # the anchors pass (first chunk and rest), then the concept fails in its first
                    ("concept", 1, 0),   # the concept first again
                    ("concept", 2, 2)]   # both within: the run stops
    records = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert [r["at_target"] for r in records[1:]] == [False, False, False, False, True]
    assert records[2]["forget_accuracy"] is None and records[2]["forget_images"] == 0
    assert records[2]["retain_images"] == ANCHOR_CHUNK and not records[2]["retain_within"]


def test_the_signal_starts_at_one_falls_as_the_concept_is_erased_and_is_logged_every_step(make_config, tmp_path):
    from concept_erase.training.trainer import erase

    erase(make_config(steps=30, lr=3e-3))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the first step's prediction is the original model's own: its projection on its own direction is 1
    assert rows[0]["erasure_signal"] == pytest.approx(1.0, abs=1e-4)
    assert all(r["erasure_signal"] is not None and r["erasure_signal_avg"] is not None for r in rows)
    assert rows[-1]["erasure_signal_avg"] < 0.9 * rows[0]["erasure_signal_avg"]


def test_the_signal_stops_a_run_and_a_resumed_run_reads_the_same_signal_and_stops_at_the_same_step(
        make_config, tmp_path):
    from concept_erase.errors import Interrupted
    from concept_erase.training.trainer import erase

    run = tmp_path / "run"
    settings = dict(steps=24, lr=3e-3, checkpoint_every=4, checkpoints_total_limit=0, signal_half_life=3)
    erase(make_config(**settings))
    whole = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    avg = {r["step"]: r["erasure_signal_avg"] for r in whole}
    lam = {r["step"]: r["lambda"] for r in whole}
    # a level the average crosses after the first checkpoint: the run must stop at the first check under it where
    # lambda is no higher than --stop-lambda-window steps before (the trail is restored from the checkpoint)
    window = SIGNAL_LAMBDA_WINDOW
    level = max(avg[s] for s in range(9, 13))
    stop = next(s for s in range(window + 1, 25, 2) if avg[s] <= level and lam[s] <= lam[s - window])
    assert 8 < stop < 24
    run = tmp_path / "stopping"
    stopping = dict(settings, stop_when_erased=True, stop_judge="signal", stop_signal_at_most=level, check_every=2,
                    output=str(run))

    class Crash:
        def __call__(self, done, trainer):
            if done == 7:
                raise KeyboardInterrupt
            return False

    with pytest.raises(Interrupted):
        erase(make_config(**stopping), on_step=Crash())
    erase(make_config(**stopping, resume="latest"))
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["erasure_signal_avg"] for r in resumed] == pytest.approx([avg[s] for s in range(1, stop + 1)], abs=1e-6)
    info = json.loads((run / "run.json").read_text())
    assert info["stopped_at"] == stop and "erasure signal" in info["stop_reason"]
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == list(range(2, stop + 1, 2)) and checks[-1]["at_target"]


def test_a_held_erasure_stops_pushing_where_an_unheld_one_goes_on(make_config, tmp_path):
    """With --hold-erasure-at, the forget samples already at or under the level add no loss: the signal stops
    falling far short of where the same run without it goes (the optimizer's momentum carries it somewhat under
    the level)."""
    from concept_erase.training.trainer import erase

    def run(name, **kw):
        erase(make_config(steps=40, lr=3e-3, output=str(tmp_path / name), **kw))
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    pushed, held = run("pushed"), run("held", hold_erasure_at=0.6)
    assert "held_share" not in pushed[-1] and max(r["held_share"] for r in held) > 0.5
    assert held[-1]["erasure_signal_avg"] > pushed[-1]["erasure_signal_avg"] + 0.2


@pytest.mark.parametrize("extra,message", [
    (["--stop-judge", "digits"], "knows the digits' captions"),
    (["--stop-judge", "clip", "--clip-model", "ViT-B-32", "--clip-weights", "{bogus}"], "could not be loaded"),
    (["--stop-judge", "clip", "--clip-weights", "{missing}"], "does not exist"),
    (["--stop-signal-at-most", "1.5"], "--stop-signal-at-most"),
    (["--stop-signal-at-most", "-1"], "out of range"),
    (["--check-every", "5"], "no check would run"),
    (["--forget-loss", "remap", "--remap-to", "a photo"], "has no judge of its own"),
])
def test_a_stop_that_cannot_work_is_refused_in_one_line_and_the_output_is_untouched(
        extra, message, tiny_dir, cache_dir, tmp_path, capsys):
    from concept_erase.cli import main
    from test_cli import base_args, tree

    out = tmp_path / "run"
    assert main(base_args(tiny_dir, out, cache_dir)) == 0
    before = tree(out)
    bogus = tmp_path / "bogus.bin"
    bogus.write_bytes(b"not a checkpoint")
    extra = [a.format(bogus=bogus, missing=tmp_path / "missing.bin") for a in extra]
    capsys.readouterr()
    code = main(base_args(tiny_dir, out, cache_dir) + ["--overwrite", "--stop-when-erased", "--check-every", "1",
                                                       "--eta", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert tree(out) == before


def test_the_clip_judge_counts_a_concept_image_by_its_nearest_prompt_and_keeps_an_anchor_only_as_itself():
    from concept_erase.judges import make_judge

    concepts = ["Van Gogh", "a painting in the style of Van Gogh"]
    judge = make_judge("clip", concepts, ["a painting", "a photo of a city street"])
    judge._zero_shot = SimpleNamespace(predict=lambda images: list(images))  # an "image" is what CLIP would see
    judge_input = ["a painting in the style of Van Gogh", "a painting", "Van Gogh"]
    with unittest.mock.patch("concept_erase.judges.clip.to_pil", lambda images: images):
        assert [s.shown for s in judge.shown(judge_input)] == [True, False, True]
        assert judge.kept(["a painting", "Van Gogh", "a photo of a city street"],
                          ["a painting", "a painting", "a painting"]) == [True, False, False]
    assert judge.judges_anchors and judge.classes == concepts + ["a painting", "a photo of a city street"]
    with pytest.raises(UserError, match="needs the classes to choose among"):
        make_judge("clip", concepts)  # neither --classes nor anchors: nothing to tell the concept from

    config = SimpleNamespace(anchor_guidance=7.5, check_images=4, check_seed_start=10, concepts=["c1", "c2"],
                             anchors=["a1", "a2", "a3", "a4"], check_images_per_concept=1, check_confirm=1, weights="")
    both = CheckSides(config, SimpleNamespace(guidance=None, judges_anchors=True, group=str))
    concept_only = CheckSides(config, SimpleNamespace(guidance=None, judges_anchors=False, group=str))  # as NudeNet's
    assert both.guidance == 7.5  # no guidance of the judge's own: the run's anchor guidance
    assert both.concept_items == [("c1", 10), ("c2", 10), ("c1", 11), ("c2", 11)]
    assert both.anchor_items == [(a, s) for s in (10, 11) for a in ("a1", "a2", "a3", "a4")]
    assert concept_only.anchor_items == [] and concept_only.kept(None, [], 10) == []


def test_lambda_is_at_rest_when_no_higher_than_window_steps_before_and_its_trail_survives_a_checkpoint():
    from concept_erase.methods.signal import LambdaTrail

    trail = LambdaTrail(3)
    for lam in (1.0, 2.0, 3.0):
        trail.update(lam)
        assert trail.change() is None and not trail.at_rest()  # fewer than window + 1 values: not known yet
    trail.update(3.5)
    assert trail.change() == pytest.approx(2.5) and not trail.at_rest()  # 3.5 against 1.0: rising
    trail.update(2.0)
    assert trail.change() == pytest.approx(0.0) and trail.at_rest()  # 2.0 against 2.0: no higher
    copy = LambdaTrail(3)
    copy.load_state_dict(json.loads(json.dumps(trail.state_dict())))
    for t in (trail, copy):
        t.update(4.0)
    assert copy.change() == trail.change() == pytest.approx(1.0)  # 4.0 against 3.0
    assert LambdaTrail(0).at_rest()  # window 0: the signal alone
    with pytest.raises(ValueError):
        LambdaTrail(-1)


def test_the_signal_stop_waits_while_lambda_rises_and_says_so(tmp_path):
    from types import SimpleNamespace

    from concept_erase.methods.signal import LambdaTrail

    logged = []
    trainer = SimpleNamespace(signal=SimpleNamespace(value=0.05), lambda_trail=LambdaTrail(2), output=tmp_path,
                              accelerator=SimpleNamespace(is_main_process=True), start_step=0, log=logged.append)
    stop = SignalStop(SimpleNamespace(check_every=1, stop_signal_at_most=0.15, stop_lambda_window=2, check_confirm=1))
    stop.start(trainer)
    verdicts = []
    for lam in (1.0, 1.5, 2.0, 2.2, 1.9):  # rises, then falls under where it was two steps before (2.0)
        trainer.lambda_trail.update(lam)
        verdicts.append(stop(len(verdicts) + 1, trainer))
    assert verdicts == [False, False, False, False, True]
    assert "lambda has no history yet" in logged[0] and "rose by 1 over the last 2 steps" in logged[2]
    assert "no higher than 2 steps before" in stop.reason
    checks = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()]
    assert [c["at_target"] for c in checks] == verdicts and checks[-1]["lambda_change"] == pytest.approx(-0.1)
    trainer.signal.value = 0.5  # lambda at rest but the concept still guided: no stop
    trainer.lambda_trail.update(1.0)
    assert not stop(6, trainer)


class BlockSides:
    """A concept side in seed blocks of 8 images and no anchors (a judge that cannot tell them): each check shows the
    concept in as many of its images as the script says, and the blocks each check drew are noted."""

    def __init__(self, blocks: int, shown: list[int]):
        self.concept_blocks = [[("c", 100 * b + s) for s in range(8)] for b in range(blocks)]
        self.concept_items, self.anchor_items = self.concept_blocks[0], []
        self.judged_as, self.group_of, self.judge = {}, {}, SimpleNamespace(name="scripted")
        self.shown, self.drawn = list(shown), []

    def still_shown(self, pipe, items, steps):
        self.drawn.append(self.concept_blocks.index(items))
        k = self.shown.pop(0)
        return [i < k for i in range(len(items))]


@pytest.mark.parametrize("confirm, stops_at", [(1, 2), (2, 8), (3, None)])
def test_a_run_stops_after_check_confirm_checks_at_target_in_a_row_each_on_its_own_seeds(tmp_path, confirm, stops_at):
    """--check-confirm N: a check at target (0 of 8 images) at steps 2, 6, 8; 3 images at 4 and 10. One check in a
    row stops at 2, two at 8 (6 and 8), three never. Check k draws seed block k mod N; a resumed run counts the
    checks in a row it had made."""
    from concept_erase.methods.stopping import in_a_row

    sides = BlockSides(confirm, [0, 3, 0, 0, 3])
    check = ErasureCheck(_settings(check_confirm=confirm), sides=sides)
    check.baseline = {"retain_accuracy": 1.0}
    written = []
    check._write = lambda trainer, record: written.append(record)
    trainer = _fake_trainer(output=tmp_path)
    stopped = next((step for step in (2, 4, 6, 8, 10) if check(step, trainer)), None)
    assert stopped == stops_at
    assert sides.drawn == [(step // 2) % confirm for step in (2, 4, 6, 8, 10)][:len(sides.drawn)]
    seeds = [{s for _, s in block} for block in sides.concept_blocks]
    assert all(not a & b for i, a in enumerate(seeds) for b in seeds[i + 1:])  # each block its own seeds
    assert [r["at_target"] for r in written] == [True, False, True, True, False][:len(written)]
    marks = [{"step": 0}] + [{"step": 2 * i + 2, "at_target": t} for i, t in enumerate((True, False, True, True))]
    assert in_a_row(marks) == 2 and in_a_row(marks[:3]) == 0 and in_a_row([{"step": 0, "at_target": True}]) == 0
    if confirm == 2:
        assert "at target on 2 checks in a row" in check.reason and written[3]["in_a_row"] == 2
        # resumed after the check at step 6: the one check in a row it had counts, so step 8 stops it
        (tmp_path / "checks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"step": 0}] + written[:3]))
        again = ErasureCheck(_settings(check_confirm=2), sides=BlockSides(2, [0]))
        again.start(_fake_trainer(output=tmp_path, start_step=6))
        assert again.in_a_row == 1 and again(8, trainer)


def test_the_signal_stop_waits_for_check_confirm_signals_in_a_row_and_a_resumed_run_counts_them(tmp_path):
    from concept_erase.methods.signal import LambdaTrail

    trainer = SimpleNamespace(signal=SimpleNamespace(value=0.05), lambda_trail=LambdaTrail(0), output=tmp_path,
                              accelerator=SimpleNamespace(is_main_process=True), start_step=0, log=lambda m: None)
    config = SimpleNamespace(check_every=1, stop_signal_at_most=0.15, stop_lambda_window=0, check_confirm=2)
    stop = SignalStop(config)
    stop.start(trainer)
    assert [stop(1, trainer), stop(2, trainer)] == [False, True] and "on 2 checks in a row" in stop.reason
    trainer.start_step = 1  # resumed after step 1: its one signal at target counts
    again = SignalStop(config)
    again.start(trainer)
    assert again.in_a_row == 1 and again(2, trainer)


def test_a_check_of_several_concepts_says_which_are_still_drawn(tmp_path):
    """Per-concept progress: the record holds each concept's share of the images drawn for it, and the log names
    the concepts still drawn, the most drawn first."""
    judge = ScriptedSides([1.0, 1.0], [1.0, 1.0])
    judge.concept_items = [(c, s) for s in range(5) for c in ("a cat", "a dog", "a fox")]
    judge.judged_as = {"a cat": "cat", "a dog": "dog", "a fox": "fox"}
    judge.still_shown = lambda pipe, items, steps: [p == "a cat" or (p == "a dog" and s < 2) for p, s in items]
    check = ErasureCheck(_settings(check_forget_at_most=0.5), sides=judge)
    lines = []
    trainer = _fake_trainer(output=tmp_path, start_step=0)
    trainer.log = lines.append
    check.start(trainer)
    check(2, trainer)
    record = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()][-1]
    assert record["forget_by_concept"] == {"cat": 1.0, "dog": 0.4, "fox": 0.0}
    assert "(still drawn: 'cat' 100%, 'dog' 40%)" in lines[-1], lines[-1]


def test_with_several_concepts_each_is_held_to_the_bar_on_its_own_images(tmp_path):
    """Seven concepts of five images each, the newest still drawn in one of its five: 1 of 35 passes the pooled 5%
    bar, but not that concept's own (0 of 5 allowed). Once it is gone too, the check stops; one concept alone is
    judged as before."""
    judge = ScriptedSides([1.0, 1.0], [1.0, 1.0])
    names = ["zero", "two", "four", "five", "six", "nine", "three"]
    judge.concept_items = [(c, s) for s in range(5) for c in names]
    judge.judged_as = {c: c for c in names}
    still = {"three"}
    judge.still_shown = lambda pipe, items, steps: [p in still and s == 0 for p, s in items]
    check = ErasureCheck(_settings(check_forget_at_most=0.05, check_retain_drop_at_most=1.0), sides=judge)
    lines = []
    trainer = _fake_trainer(output=tmp_path, start_step=0)
    trainer.log = lines.append
    check.start(trainer)
    assert not check(2, trainer)
    record = [json.loads(line) for line in (tmp_path / "checks.jsonl").read_text().splitlines()][-1]
    assert record["forget_accuracy"] == 1 / 35 and record["forget_over_bar"] == ["three"]
    assert "1 concept(s) over the bar on their own images" in lines[-1] and "'three' 20%" in lines[-1]
    still.clear()
    assert check(4, trainer)
    alone = ScriptedSides([1.0, 1.0], [1.0, 1.0])
    alone.concept_items = [("three", s) for s in range(35)]
    alone.judged_as = {"three": "three"}
    alone.still_shown = lambda pipe, items, steps: [s == 0 for p, s in items]
    single = ErasureCheck(_settings(check_forget_at_most=0.05, check_retain_drop_at_most=1.0), sides=alone)
    (tmp_path / "one").mkdir()
    other = _fake_trainer(output=tmp_path / "one", start_step=0)
    single.start(other)
    assert single(2, other)  # 1 of 35, one concept: within the bar


def test_the_digits_judge_counts_a_digit_in_a_style_only_where_both_are_there():
    """A concept that is a digit in a style (the red zero) is still shown by a red zero, not by a red two or a plain
    zero: the images' digit and style heads are scripted."""
    import torch

    from concept_erase.digits.world import STYLES, caption
    from concept_erase.judges import make_judge

    judge = make_judge("digits", [caption(0, "red ink")], [caption(1)])
    red = STYLES.index("red ink")
    judge.heads = lambda images: (torch.tensor([0, 2, 0]), torch.tensor([red, red, STYLES.index("plain")]))
    assert [v.shown for v in judge.shown([None] * 3)] == [True, False, False]
    assert judge.prompts(2) == [(caption(0, "red ink"), 0), (caption(0, "red ink"), 1)]
    # every digit's red caption erased is the style erased (the benchmark's "red ink"): a red two drawn for the red
    # zero still shows it, as the style head says and as the benchmark's evaluation counts a style
    style = make_judge("digits", [caption(d, "red ink") for d in range(10)], [caption(1)])
    style.heads = judge.heads
    assert [v.shown for v in style.shown([None] * 3, caption(0, "red ink"))] == [True, True, False]
