"""A resume continues the same erasure: settings that change what a step trains are refused in one line, the ones a
resume may change are recorded, and a finished run with nothing to resume is left as it is."""

import json

import pytest

from concept_erase.cli import main
from test_cli import base_args, tree


@pytest.fixture(scope="module")
def pristine(tiny_dir, tmp_path_factory):
    """A finished 2-step run with its last checkpoint, made once; each test works on its own copy."""
    out = tmp_path_factory.mktemp("pristine") / "run"
    argv = base_args(tiny_dir, out, tmp_path_factory.mktemp("cache"))
    argv[argv.index("--steps") + 1] = "2"
    assert main(argv) == 0
    assert any((out / "checkpoints").glob("step-*/state.json"))
    return out, argv


@pytest.fixture()
def finished(pristine, tmp_path):
    import shutil

    source, argv = pristine
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out, [str(out) if a == str(source) else a for a in argv]


@pytest.mark.parametrize("flag,value,named", [("--concept", "a bird", "--concept"), ("--lr", "0.5", "--lr"),
                                              ("--seed", "7", "--seed"), ("--method", "esd", "--method"),
                                              ("--mixed-precision", "bf16", "--mixed-precision")])
def test_a_resume_that_would_train_something_else_is_refused_and_changes_nothing(finished, flag, value, named, capsys):
    out, argv = finished
    args = list(argv)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    before = tree(out)
    capsys.readouterr()
    assert main(args + ["--steps", "4", "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"was made with {named}" in err and "another --output" in err, err
    assert tree(out) == before


def test_a_resume_may_go_on_for_more_steps_and_the_record_says_what_changed(finished, capsys):
    out, argv = finished
    args = list(argv)
    args[args.index("--steps") + 1] = "4"
    assert main(args + ["--resume", "latest", "--checkpoint-every", "1"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["steps"] == 4 and record["resumed_from_step"] == 2
    assert record["changed_on_resume"]["steps"] == {"checkpoint": 2, "now": 4}
    assert record["changed_on_resume"]["checkpoint_every"]["now"] == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resumed with other "))
    assert "steps (2 -> 4)" in line


def test_a_finished_run_without_checkpoints_is_not_restarted_in_place(finished, capsys):
    import shutil

    out, argv = finished
    shutil.rmtree(out / "checkpoints")
    before = tree(out)
    capsys.readouterr()
    assert main(argv + ["--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a finished run and no checkpoint" in err, err
    assert tree(out) == before


def test_a_finished_run_whose_checkpoints_are_all_damaged_is_not_restarted_in_place(finished, capsys):
    out, argv = finished
    for state in (out / "checkpoints").glob("step-*/state.json"):
        state.write_text("{ damaged")
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(argv + ["--resume", "latest"]) == 2
    assert "holds a finished run and no checkpoint" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "erased.safetensors").is_file()


def test_a_run_that_stopped_stays_stopped_and_says_so_unless_the_stop_is_turned_off(tiny_dir, tmp_path, cache_dir,
                                                                                    capsys):
    out = tmp_path / "run"
    argv = base_args(tiny_dir, out, cache_dir) + ["--stop-when-erased", "--stop-judge", "signal",
                                                 "--stop-signal-at-most", "0.999", "--stop-lambda-window", "0",
                                                 "--check-every", "1", "--checkpoint-every", "1", "--lr", "0.05"]
    argv[argv.index("--steps") + 1] = "3"
    assert main(argv) == 0
    stopped = json.loads((out / "run.json").read_text())["stopped_at"]
    assert stopped is not None and stopped < 3
    more = list(argv)
    more[more.index("--steps") + 1] = "5"
    capsys.readouterr()
    assert main(more + ["--resume", "latest"]) == 0
    assert "it stays stopped and trains no further (resume with --no-stop-when-erased" in capsys.readouterr().out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == stopped
    assert main(more + ["--resume", "latest", "--no-stop-when-erased"]) == 0
    assert "with the stop off it trains on to step 5" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    assert json.loads((out / "run.json").read_text())["changed_on_resume"]["stop_when_erased"] == \
        {"checkpoint": True, "now": False}
