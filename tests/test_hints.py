"""Every hint a refusal prints works: a command refused at the door is changed exactly as its one-line message says
(drop a flag, add or pass one with its value), and run again until it runs. A hint that leads to another error that
gives no way on, or back to the same error, fails the test."""

from __future__ import annotations

import argparse
import re
import shlex

import pytest

from concept_erase.cli import main

QUICK = ["--steps", "2", "--sampling-steps", "3", "--anchor-inference-steps", "2", "--anchor-images-per-prompt", "1",
         "--no-progress", "--checkpoint-every", "0"]
FLAG = r"--[a-z][\w-]*"
VALUE = r"'[^']*'|[\w./-]+"


def _without(argv: list, flag: str) -> list:
    """argv less `flag` and, where it takes one, its value."""
    i = argv.index(flag)
    takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
    return argv[:i] + argv[i + 2 if takes_value else i + 1:]


def _takes_value(command: str, flag: str) -> bool:
    """Whether `flag` of `command` reads a value (the parser's own declaration, not the hint's wording)."""
    from concept_erase.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    action = next(a for a in sub._actions if flag in a.option_strings)
    return action.nargs != 0


def _with(argv: list, flag: str, value: str | None) -> list:
    value = shlex.split(value)[0] if value and value.startswith("'") else value
    if not _takes_value(argv[0], flag):
        value = None
    if flag in argv:
        argv = _without(argv, flag)
    return argv + [flag] + ([value] if value is not None else [])


def follow(message: str, argv: list) -> list:
    """The command the refusal's hint describes: its first way on, read from the message's words."""
    hint = message.split("; ", 1)[1] if "; " in message else message
    dropped = re.search(rf"\bdrop (it\b|{FLAG}(?:, {FLAG})*(?: and {FLAG})?)", hint)
    added = re.search(rf"\b(?:add|pass|give(?: the suite's file:)?) ({FLAG})(?: ({VALUE}))?", hint)
    if added and (not dropped or added.start() < dropped.start()):
        return _with(argv, added.group(1), added.group(2))
    if dropped:
        flag = dropped.group(1)
        if flag == "it":  # the flag the message is about: the first one it names
            flag = re.search(rf"(?<![\w-])({FLAG})", message).group(1)
        for each in re.findall(FLAG, flag):
            argv = _without(argv, each)
        return argv
    raise AssertionError(f"no way on in: {message}")


def run_following_hints(argv: list, capsys, most: int = 12) -> list[str]:
    """Run `argv`, following each refusal's hint, until it runs; the refusals met on the way."""
    met = []
    for _ in range(most):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        if code == 0:
            return met
        assert code == 2 and len(err.splitlines()) == 1, err
        message = err.removeprefix("concept-erase: error: ")
        assert message not in met, f"the hint led back to the same refusal: {message}"
        met.append(message)
        argv = follow(message, argv)
    raise AssertionError(f"still refused after {most} hints: {met}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained run, and one erased without anchors (ESD), on the tiny model."""
    root = tmp_path_factory.mktemp("hints")
    made = {}
    for name, extra in (("trained", ["--anchor", "a photo", "--train", "xattn-kv"]),
                        ("bare", ["--method", "esd", "--train", "xattn-kv"])):
        assert main(["erase", "--model", "builtin:tiny", "--concept", "van gogh", "--output", str(root / name),
                     "--cache-dir", str(root / "cache"), *QUICK, *extra]) == 0
        made[name] = root / name
    return made


def _erase(tmp_path, *extra):
    return ["erase", "--model", "builtin:tiny", "--concept", "monet", "--output", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *QUICK, *extra]


CASES = {
    "an edit given training settings": lambda r, t: _erase(t, "--anchor", "a dog", "--method", "uce"),
    "a LoRA setting on another format": lambda r, t: ["export", str(r["trained"]), "--format", "diffusers", "--rank",
                                                      "4", "--exact-svd", "--output", str(t / "exp")],
    "a LoRA key form on a single file": lambda r, t: ["export", str(r["trained"]), "--format", "single-file",
                                                      "--lora-format", "kohya", "--output", str(t / "x.safetensors")],
    "an attack setting the attack ignores": lambda r, t: [
        "attack", "--model", "builtin:tiny", "--weights", str(r["trained"]), "--concept", "three", "--judge",
        "digits", "--attack", "ring-a-bell", "--timesteps", "3", "--pairs", str(t / "pairs.txt"), "--prompts", "1",
        "--iterations", "1", "--tokens", "3", "--inference-steps", "2", "--output", str(t / "atk"), "--no-progress"],
    "pairs with an attack that builds no concept vector": lambda r, t: [
        "attack", "--model", "builtin:tiny", "--concept", "three", "--judge", "digits", "--attack", "unlearndiff",
        "--pairs", str(t / "pairs.txt"), "--prompts", "1", "--iterations", "1", "--timesteps", "1",
        "--inference-steps", "2", "--output", str(t / "atk"), "--no-progress"],
    "a chain with nothing to keep": lambda r, t: _erase(t, "--weights", str(r["bare"])),
    "a chain that would train a LoRA": lambda r, t: _erase(t, "--anchor", "a dog", "--weights", str(r["trained"]),
                                                           "--train", "lora"),
    "a stop flag with a check beyond the steps": lambda r, t: _erase(t, "--anchor", "a dog", "--stop-when-erased",
                                                                     "--check-every", "50"),
    "an output that holds a run": lambda r, t: _erase(t, "--anchor", "a dog"),
    "an edit into a folder that holds one": lambda r, t: ["erase", "--model", "builtin:tiny", "--concept", "monet",
                                                         "--anchor", "a dog", "--method", "uce", "--output",
                                                         str(t / "out"), "--no-progress"],
    "a guide that is the concept itself": lambda r, t: _erase(t, "--anchor", "a dog", "--relative-to", "Monet"),
    "pictures less often than the run is long": lambda r, t: _erase(t, "--anchor", "a dog", "--sample-every", "5",
                                                                    "--sample-prompt", "monet"),
    "the private flag without a push": lambda r, t: ["export", str(r["trained"]), "--format", "diffusers",
                                                     "--private", "--output", str(t / "exp")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_following_a_refusals_hint_leads_to_a_command_that_runs(case, runs, tmp_path, capsys):
    (tmp_path / "pairs.txt").write_text("a three\ta\n")
    argv = CASES[case](runs, tmp_path)
    if case in ("an output that holds a run", "an edit into a folder that holds one"):
        assert main(argv) == 0  # the run the next command would write over
    met = run_following_hints(argv, capsys)
    assert met, "the case was not refused: it tests no hint"


def test_the_hint_reader_reads_each_form_and_fails_where_there_is_none():
    argv = ["export", "--a", "1", "--b", "--c", "2"]
    assert follow("--a does nothing here; drop it", argv) == ["export", "--b", "--c", "2"]
    assert follow("so --a and --c do not apply; drop --a and --c (it takes --d)", argv) == ["export", "--b"]
    assert follow("--b shapes a LoRA; add --format lora (not diffusers) or drop --b", argv) == \
        ["export", "--a", "1", "--b", "--c", "2", "--format", "lora"]
    assert follow("it holds a run; pass --overwrite to replace it", argv)[-1] == "--overwrite"  # takes no value
    assert follow("it keeps anchors; pass --anchor 'a prompt' (repeat it)", ["erase"]) == ["erase", "--anchor",
                                                                                            "a prompt"]
    with pytest.raises(AssertionError, match="no way on"):
        follow("something went wrong", argv)
