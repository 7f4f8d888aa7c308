"""--stop-when-erased: the check hook on its own (a judge that says what it is told), then the trainer
stopping on it, resuming a stopped run, and the digits judge on the embedded model."""

import json

import pytest

from concept_erase.errors import UserError
from concept_erase.methods.stopping import ErasureCheck, Hooks, find_judge


class ScriptedJudge:
    """Reports the forget accuracy scripted for each call (the first is the model before training)."""

    def __init__(self, forget, retain=None):
        self.forget, self.retain, self.calls = list(forget), list(retain or [1.0] * len(forget)), 0

    def __call__(self, pipe):
        i = self.calls
        self.calls += 1
        return {"forget_accuracy": self.forget[i], "retain_accuracy": self.retain[i], "images": 8}


def _settings(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"check_every": 2, "check_forget_at_most": 0.05, "check_retain_drop_at_most": 0.03, **kw})


def test_the_check_stops_at_the_first_check_at_target_and_logs_every_check(make_config, tmp_path):
    from concept_erase.io.export import read_delta
    from concept_erase.training.trainer import erase

    # before training 100% / anchors 100%; step 2: 50%; step 4: concept gone but anchors 95% (> 3 points
    # lost): not yet; step 6: 5% and 98%: stop
    judge = ScriptedJudge([1.0, 0.5, 0.0, 0.05], [1.0, 1.0, 0.95, 0.98])
    config = make_config(steps=10, checkpoint_every=4)
    path = erase(config, on_step=ErasureCheck(_settings(), judge=judge))
    run = tmp_path / "run"
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 2, 4, 6]
    assert [c.get("at_target") for c in checks] == [None, False, False, True]
    assert all(c["seconds"] >= 0 for c in checks)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    assert json.loads((run / "run.json").read_text())["stopped_at"] == 6
    assert int(read_delta(path)[1]["steps"]) == 6
    # resuming a run that stopped trains no further and judges nothing again
    again = ScriptedJudge([])
    erase(make_config(steps=10, checkpoint_every=4, resume="latest"), on_step=ErasureCheck(_settings(), judge=again))
    assert again.calls == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("at_most, retain_drop, stops_at",
                         [(0.05, 0.03, 6), (0.10, 0.03, 4), (0.0, 0.03, None), (0.10, 0.01, 6), (0.10, 0.0, None)])
def test_the_check_stops_only_under_its_bars(at_most, retain_drop, stops_at):
    """--check-forget-at-most: checks of 12%, 8%, 4% (after the model's own 100%): the default 5% stops at the
    third, 10% at the second, 0% never. --check-retain-drop-at-most: the anchors at 97.5%, 99%, 99% of the
    model's own 100%: a 1-point bar passes the second check by, a 0-point bar every check."""
    from types import SimpleNamespace

    check = ErasureCheck(_settings(check_forget_at_most=at_most, check_retain_drop_at_most=retain_drop),
                         judge=ScriptedJudge([1.0, 0.12, 0.08, 0.04], [1.0, 1.0, 0.975, 0.99]))
    check.baseline = {"retain_accuracy": 1.0}
    check._write = lambda trainer, record: None
    unet = SimpleNamespace(training=True, eval=lambda: None, train=lambda mode=True: None)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(is_main_process=True), ctx=SimpleNamespace(denoiser=unet),
                              pipe=None, log=lambda message: None)
    check.judge.calls = 1  # the model before training was judged at the start
    stopped = next((step for step in (2, 4, 6) if check(step, trainer)), None)
    assert stopped == stops_at


def test_a_resumed_run_keeps_its_measurement_before_training(make_config, tmp_path):
    from concept_erase.training.trainer import erase

    first = ScriptedJudge([0.9, 0.8])  # before training and step 2: not at target
    erase(make_config(steps=2), on_step=ErasureCheck(_settings(), judge=first))
    run = tmp_path / "run"
    with open(run / "checks.jsonl", "a") as f:  # a check past the checkpoint, as a crash would leave it
        f.write(json.dumps({"step": 3, "forget_accuracy": 0.0, "retain_accuracy": 1.0}) + "\n")
    later = ScriptedJudge([0.0])
    erase(make_config(steps=8, resume="latest"), on_step=ErasureCheck(_settings(), judge=later))
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines()]
    assert [c["step"] for c in checks] == [0, 2, 4] and later.calls == 1  # step 0 not judged again
    assert checks[0]["forget_accuracy"] == 0.9 and checks[-1]["at_target"]


def test_an_overwritten_run_has_its_own_checks(make_config, tmp_path):
    """--overwrite: the check log is the new run's (the old run's was left in place, and the benchmark read
    its first run's checks for every later run of the same output)."""
    from concept_erase.training.trainer import erase

    erase(make_config(steps=4), on_step=ErasureCheck(_settings(), judge=ScriptedJudge([1.0, 0.9, 0.8])))
    erase(make_config(steps=4, overwrite=True), on_step=ErasureCheck(_settings(), judge=ScriptedJudge([0.7, 0.0])))
    run = tmp_path / "run"
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines()]
    assert [(c["step"], c["forget_accuracy"]) for c in checks] == [(0, 0.7), (2, 0.0)]
    assert json.loads((run / "run.json").read_text())["stopped_at"] == 2


def test_hooks_all_run_and_any_stops():
    seen = []
    both = Hooks(lambda d, t: seen.append(("a", d)), None, lambda d, t: seen.append(("b", d)) or d == 3)
    assert not both(2, None) and both(3, None)
    assert seen == [("a", 2), ("b", 2), ("a", 3), ("b", 3)] and not both.may_stop


def test_only_the_digits_model_has_a_judge():
    from types import SimpleNamespace

    with pytest.raises(UserError, match="needs a judge for the model"):
        find_judge(SimpleNamespace(model="builtin:tiny", concepts=["x"], anchors=[], check_images=8))
    with pytest.raises(UserError, match="knows the digits' captions"):
        find_judge(SimpleNamespace(model="builtin:digits", concepts=["a cat"], anchors=[], check_images=8))


def test_the_digits_judge_sees_the_embedded_models_digits_and_styles():
    from types import SimpleNamespace

    from concept_erase.digits.world import caption
    from concept_erase.io.loading import load_pipeline

    pipe = load_pipeline("builtin:digits")
    pipe.set_progress_bar_config(disable=True)
    judge = find_judge(SimpleNamespace(model="builtin:digits", concepts=[caption(3), caption(5, "red ink")],
                                       anchors=[caption(1), caption(7, "bold")], check_images=4))
    r = judge(pipe)
    # the model draws what it is asked: the concepts are there (not erased), the anchors are right
    assert r["forget_accuracy"] >= 0.75 and r["retain_accuracy"] >= 0.75 and r["images"] == 2 * 2 + 2 * 4
