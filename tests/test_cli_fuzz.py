"""Fuzz of the command line: every flag of every command, with wrong types, out-of-range numbers,
NaN/inf, empty, huge and unicode values. The output path of each command already holds a good result
and --overwrite is not given, so no value may run anything: each call must end with one line, exit
code 2 (bad input or an existing output, never 1: an unexpected failure is a hole in the checks),
no traceback, and the good result unchanged. The flags are read from the commands' declarations, so a
flag added later is fuzzed too."""

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concept_erase import options
from concept_erase.cli import main
from concept_erase.config import EraseConfig

from test_cli import base_args, tree

REPO = Path(__file__).resolve().parent.parent
COMMAND_OPTIONS = {"erase": EraseConfig, "export": options.ExportOptions, "sample": options.SampleOptions,
                   "eval": options.EvalOptions, "demo": options.DemoOptions, "bench": options.BenchOptions,
                   "compare": options.CompareOptions, "attack": options.AttackOptions}
NEVER = {"overwrite", "report_only", "resume"}  # flags that ask to change the output: not fuzzed here

NASTY = ["nan", "NaN", "inf", "-inf", "1e309", "-1", "0", "-0", "1.5", "", " ", "abc", "１２", "٣", "9" * 40,
         str(2**64), str(2**63), "-" + "9" * 25, "0x10", "1_000", "☃", "\u200b", "a\nb", "../..", "/", ".", "-",
         "--", "cuda:99", "builtin:nothing", "~", "é" * 300, "x" * 5000]
# An output flag given a valid new path would run the command: output flags get only unusable paths.
BAD_OUTPUTS = ["", "{held}/result.json/sub", "/proc/no/such/place", "a\x00b", "{held}/result.json"]
VALUES = st.one_of(st.sampled_from(NASTY), st.text(max_size=30),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), st.integers(-(2**70), 2**70).map(str))


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """Good outputs for every command: a finished run (erase's output), and a folder holding a result."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    assert main(base_args(tiny_dir, run, root / "cache")) == 0
    held = root / "held"
    held.mkdir()
    (held / "result.json").write_text('{"a good": "result"}')
    bench_cfg = str(REPO / "pipelines" / "bench-digits.yaml")
    bases = {
        "erase": base_args(tiny_dir, run, root / "cache"),
        "export": ["export", str(run), "--format", "diffusers", "--output", str(held)],
        "sample": ["sample", "--model", str(tiny_dir), "--prompt", "x", "--inference-steps", "2", "--output", str(held)],
        "eval": ["eval", "--suite", str(REPO / "eval" / "digits.yaml"), "--model", "builtin:digits", "--limit", "1",
                 "--output", str(held)],
        "demo": ["demo", "--output", str(held)],
        "bench": ["bench", "--report-only", "--config", bench_cfg, "--output", str(held)],
        "compare": ["compare", str(held), "--output", str(held)],
        "attack": ["attack", "--model", "builtin:digits", "--concept", "three", "--attack", "none", "--prompts", "1",
                   "--inference-steps", "2", "--output", str(held)],
    }
    return root, run, held, bases


def _flags(command):
    """(flag, kind): kind is "bool" (no value), "output" (only unusable paths) or "value"."""
    out = []
    for f in dataclasses.fields(COMMAND_OPTIONS[command]):
        if "help" not in f.metadata or f.name in NEVER or f.metadata.get("positional"):
            continue
        if options._kind(f) is bool:
            out.append((options.flag_name(f) if not f.default else f"--no-{options.flag_name(f)[2:]}", "bool"))
        else:
            out.append((options.flag_name(f), "output" if f.name == "output" else "value"))
    return out


def _values(kind):
    return {"bool": [None], "output": BAD_OUTPUTS, "value": NASTY}[kind]


@st.composite
def calls(draw):
    command = draw(st.sampled_from(sorted(COMMAND_OPTIONS)))
    flags = _flags(command)
    chosen = draw(st.lists(st.sampled_from(flags), min_size=1, max_size=3, unique=True))
    extra = []
    for flag, kind in chosen:
        if kind == "bool":
            extra += [flag]
        else:
            extra += [flag, draw(VALUES if kind == "value" else st.sampled_from(BAD_OUTPUTS))]
    return command, extra


def _check(world, capsys, command, extra):
    root, run, held, bases = world
    extra = [e.replace("{held}", str(held)) if e else e for e in extra]
    before = (tree(run), tree(held), sorted(p.name for p in root.iterdir()))
    code = main(bases[command] + extra)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("concept-erase:")]
    assert "Traceback" not in err, err
    assert code == 2, (command, extra, code, err)
    assert len(lines) == 1, (command, extra, err)
    assert (tree(run), tree(held), sorted(p.name for p in root.iterdir())) == before, \
        (command, extra, "a good output changed, or something was written")


def test_every_flag_is_fuzzed_somewhere():
    for command in COMMAND_OPTIONS:
        assert _flags(command), command


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(call=calls())
def test_fuzzed_flags_never_trace_back_nor_touch_a_good_output(world, capsys, monkeypatch, call):
    monkeypatch.chdir(world[0])  # relative paths land in the test's folder
    _check(world, capsys, *call)


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_each_flag_with_each_nasty_value(world, capsys, monkeypatch, command):
    """The table, in full: every flag of the command against every fixed nasty value."""
    monkeypatch.chdir(world[0])
    for flag, kind in _flags(command):
        for value in _values(kind):
            _check(world, capsys, command, [flag] if value is None else [flag, value])


POSITIONAL_BASES = {"export": ["--format", "diffusers", "--output", "{fresh}"],
                    "compare": ["--output", "{fresh}/report.md"]}


@pytest.mark.parametrize("command", sorted(POSITIONAL_BASES))
def test_each_positional_with_each_nasty_value(world, capsys, monkeypatch, tmp_path, command):
    """The positional arguments (export's RUN, compare's RESULTS) given nasty values, with an output that
    could be written: the command must refuse at the door and write nothing."""
    monkeypatch.chdir(world[0])
    for i, value in enumerate(NASTY + BAD_OUTPUTS):
        fresh = tmp_path / f"out{i}"
        args = [command, value.replace("{held}", str(world[2]))] + \
            [a.replace("{fresh}", str(fresh)) for a in POSITIONAL_BASES[command]]
        before = sorted(p.name for p in world[0].iterdir())
        code = main(args)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (args, err)
        assert code == 2, (args, code, err)
        assert len([x for x in err.splitlines() if x.startswith("concept-erase:")]) == 1, (args, err)
        assert not fresh.exists(), (args, "an output was written for bad input")
        assert sorted(p.name for p in world[0].iterdir()) == before, (args, "something was written")
