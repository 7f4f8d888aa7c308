"""A careless user loses nothing and never sees a traceback (the worst findings of a careless-user pass, each tested):
an interrupted or failing `erase --overwrite` keeps the old run, a second writer is refused, meaningless
settings and ordinary mistakes get one line and exit 2, outputs get ordinary modes, and hints are true."""

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from concept_erase.cli import build_parser, main

from test_cli import base_args, tree

REPO = Path(__file__).resolve().parent.parent


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("concept-erase:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def good_run(tiny_dir, tmp_path, cache_dir):
    """A finished run with a user's file beside it (samples a user made)."""
    run = tmp_path / "run"
    assert main(base_args(tiny_dir, run, cache_dir)) == 0
    (run / "samples").mkdir()
    (run / "samples" / "mine.txt").write_text("the user's own file")
    return run


def _stop_at_step(monkeypatch, exc):
    from concept_erase.training import trainer

    real = trainer.Trainer._step

    def step(self, i):
        if i == 1:
            raise exc
        return real(self, i)

    monkeypatch.setattr(trainer.Trainer, "_step", step)


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130), (RuntimeError("boom"), 1), (MemoryError(), 1)],
                         ids=["ctrl-c", "crash", "out-of-memory"])
def test_a_failed_overwrite_keeps_the_old_run(good_run, tiny_dir, cache_dir, monkeypatch, capsys, exc, code):
    before = tree(good_run)
    _stop_at_step(monkeypatch, exc)
    got = main(base_args(tiny_dir, good_run, cache_dir) + ["--overwrite", "--seed", "7"])
    err = capsys.readouterr().err
    assert got == code, err
    line = one_line(err)
    assert tree(good_run) == before, "the old run changed"
    assert not (good_run / ".incoming").exists()
    if code == 130:
        assert "previous run" in line and "unchanged" in line and "--resume" not in line, line


def test_a_finished_overwrite_replaces_the_run_and_keeps_the_users_files(good_run, tiny_dir, cache_dir, capsys):
    old = (good_run / "erased.safetensors").read_bytes()
    assert main(base_args(tiny_dir, good_run, cache_dir) + ["--overwrite", "--seed", "7"]) == 0
    assert (good_run / "erased.safetensors").read_bytes() != old
    assert (good_run / "samples" / "mine.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in good_run.iterdir()) == ["checkpoints", "erased.safetensors", "metrics.jsonl",
                                                           "run.json", "samples"]


def _old_and_new_runs(out):
    """A run in `out` (with a check log, tracker logs, a sample grid and a user's file in samples/) and a
    finished replacement run in out/.incoming without a check log."""
    for folder, text in ((out, "old"), (out / ".incoming", "new")):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "logs").mkdir()
        (folder / "samples").mkdir()
        for name in ("erased.safetensors", "run.json", "metrics.jsonl", "logs/events", f"samples/step-0000{text}.png"):
            (folder / name).write_text(text)
    (out / "checks.jsonl").write_text("old")
    (out / "samples" / "mine.txt").write_text("the user's")


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


NEW_RUN = {"erased.safetensors": "new", "run.json": "new", "metrics.jsonl": "new", "logs/events": "new",
           "samples/step-0000new.png": "new", "samples/mine.txt": "the user's"}


def test_a_replacement_replaces_everything_the_old_run_wrote(tmp_path):
    """No check log, tracker log or sample grid of the old run is left to pass for the new run's (found when
    the benchmark read one run's check log for every later run of the same output)."""
    from concept_erase.training.run_folder import swap_in

    out = tmp_path / "run"
    _old_and_new_runs(out)
    swap_in(out)
    assert _files(out) == NEW_RUN


@pytest.mark.parametrize("moved_in", [0, 1], ids=["cut-while-moving-the-old-run-aside", "cut-while-moving-in"])
def test_a_swap_cut_short_is_completed_at_the_next_start(tmp_path, moved_in):
    """A crash between the renames of a swap: the new run (complete when the swap began) is carried forward."""
    from concept_erase.training.run_folder import ASIDE, finish_swap, run_entries, swap_in

    out = tmp_path / "run"
    _old_and_new_runs(out)
    (out / ".replaced").mkdir()
    if moved_in:  # the old run all aside, then one new file put in place
        for name in run_entries(out):
            os.renames(out / name, out / ".replaced" / name)
        (out / ".replaced" / ASIDE).touch()
        os.replace(out / ".incoming" / "erased.safetensors", out / "erased.safetensors")
    else:  # one old file moved aside
        os.replace(out / "erased.safetensors", out / ".replaced" / "erased.safetensors")
    finish_swap(out)
    assert _files(out) == NEW_RUN
    assert not (out / ".incoming").exists() and not (out / ".replaced").exists()
    # and an unfinished replacement (training stopped, no swap begun) is removed, the run left alone
    (out / ".incoming").mkdir()
    (out / ".incoming" / "metrics.jsonl").write_text("partial")
    finish_swap(out)
    assert _files(out) == NEW_RUN
    with pytest.raises(RuntimeError, match="no finished replacement"):
        swap_in(out)  # nothing finished incoming: the run is never moved aside
    assert _files(out) == NEW_RUN


def test_a_second_writer_is_refused_with_the_holders_pid(tiny_dir, tmp_path, cache_dir, capsys):
    from concept_erase.io.atomic import output_lock

    out = tmp_path / "run"
    with output_lock(out):
        assert main(base_args(tiny_dir, out, cache_dir)) == 2
    line = one_line(capsys.readouterr().err)
    assert f"process {os.getpid()}" in line and "being written" in line
    assert not out.exists(), "the refused process wrote something"
    assert not (tmp_path / ".run.lock").exists(), "the lock file outlived its holder"


def test_the_python_api_takes_the_same_lock(tiny_dir, tmp_path, cache_dir):
    """`concept_erase.erase` (not only the command) refuses an output another writer holds."""
    import concept_erase
    from concept_erase.io.atomic import output_lock
    from concept_erase.config import build_config
    from concept_erase.errors import UserError

    out = tmp_path / "run"
    flags = vars(build_parser().parse_args(base_args(tiny_dir, out, cache_dir)))
    config = build_config({}, {k: v for k, v in flags.items() if k not in ("command", "config", "debug")})
    with output_lock(out):
        with pytest.raises(UserError, match=f"being written by process {os.getpid()}"):
            concept_erase.erase(config)
    assert not out.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    from concept_erase.io.atomic import output_lock
    from concept_erase.errors import UserError

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom concept_erase.io.atomic import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"process {holder.pid}"):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said = []
    with output_lock(out, log=said.append):
        pass
    assert said and f"process {holder.pid}" in said[0] and "no longer running" in said[0]


def test_two_concurrent_erase_processes_one_is_refused(tiny_dir, tmp_path, cache_dir):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "concept_erase"] + base_args(tiny_dir, out, cache_dir)
    argv[argv.index("--steps") + 1] = "6"
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    refused = next(err for c, err in results if c == 2)
    winner = next(p.pid for p, (c, _) in zip(procs, results) if c == 0)
    assert f"being written by process {winner}" in one_line(refused)
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # one writer: no interleaved lines


MEANINGLESS = [
    (["--concept", ""], "--concept is empty"),
    (["--concept", "   "], "--concept is empty"),
    (["--anchor", "Van Gogh"], "both a concept to erase and an anchor"),
    (["--remap-to", "a cat"], "--remap-to applies to --forget-loss remap only"),
    (["--relative-to", "van gogh"], "--relative-to 'van gogh' is the concept itself"),
    (["--forget-loss", "remap", "--remap-to", "Van Gogh "], "--remap-to 'Van Gogh ' is the concept itself"),
    (["--resume", "latest", "--overwrite"], "give one of them"),
    (["--seed", str(2**64)], "--seed must be 0 to 2^63 - 1"),
    (["--lr", "nan"], "finite"),
    (["--eps", "inf"], "finite"),
    (["--lambda-init", "200"], "above --lambda-max"),
    (["--device-typo", "x"], "unrecognized arguments"),
    (["--sampling-steps", "5000"], "--sampling-steps must be 1 to 1000"),
    (["--resume", "/no/such/checkpoint"], "no checkpoint there"),
    (["--output", "{file}/sub"], "is a file, so nothing can be created under it"),
]


@pytest.mark.parametrize("extra,message", MEANINGLESS, ids=[m for _, m in MEANINGLESS])
def test_meaningless_erase_settings_are_refused_at_the_door(tiny_dir, tmp_path, cache_dir, capsys, extra, message):
    (tmp_path / "afile").write_text("x")
    argv = base_args(tiny_dir, tmp_path / "run", cache_dir) + [e.replace("{file}", str(tmp_path / "afile"))
                                                                 for e in extra]
    if extra[0] == "--concept":  # replace the concept, not add one
        i = argv.index("--concept")
        del argv[i:i + 2]
    assert main(argv) == 2
    assert message in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_step_count_beyond_the_scheduler_is_refused_after_load(tiny_dir, tmp_path, cache_dir, capsys):
    from diffusers import DDIMScheduler

    model = tmp_path / "short"
    import shutil

    shutil.copytree(tiny_dir, model)
    sched = DDIMScheduler.from_pretrained(str(model / "scheduler"))
    DDIMScheduler.from_config({**sched.config, "num_train_timesteps": 100}).save_pretrained(str(model / "scheduler"))
    argv = base_args(model, tmp_path / "run", cache_dir)
    argv[argv.index("--sampling-steps") + 1] = "200"
    assert main(argv) == 2
    assert "--sampling-steps 200 is more than this model's scheduler has timesteps (100)" in one_line(
        capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
    assert main(["sample", "--model", str(model), "--prompt", "x", "--inference-steps", "150", "--output",
                 str(tmp_path / "s")]) == 2
    assert "--inference-steps 150 is more than" in one_line(capsys.readouterr().err)


def test_a_long_prompt_is_said_to_be_cut(tiny_dir, tmp_path, cache_dir, capsys):
    argv = base_args(tiny_dir, tmp_path / "run", cache_dir)
    argv[argv.index("--concept") + 1] = "van gogh " * 1000
    argv[argv.index("--steps") + 1] = "1"
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "tokens; the text encoder reads the first 77" in out.out + out.err


def test_resume_with_nothing_to_resume_says_so(tiny_dir, tmp_path, cache_dir, capsys):
    argv = base_args(tiny_dir, tmp_path / "run", cache_dir) + ["--resume", "latest"]
    argv[argv.index("--steps") + 1] = "1"
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "starting from step 0" in out.out + out.err


def test_the_next_command_is_shell_quoted(tiny_dir, tmp_path, cache_dir, capsys):
    out = tmp_path / "my runs" / "it's here"
    argv = base_args(tiny_dir, out, cache_dir)
    argv[argv.index("--steps") + 1] = "1"
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("next: "))
    words = shlex.split(line[len("next: "):])
    assert words[words.index("--weights") + 1] == str(out / "erased.safetensors")
    assert words[words.index("--prompt") + 1] == "van gogh"
    assert words[words.index("--output") + 1] == str(out) + "-samples"


@pytest.mark.parametrize("command,hint", [("eval", "run the same command again to continue"),
                                          ("sample", "nothing was written")])
def test_ctrl_c_names_only_what_the_command_has(monkeypatch, tmp_path, capsys, command, hint):
    from concept_erase import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"_{command}", interrupted)
    argv = {"eval": ["eval", "--suite", "x", "--model", "m", "--output", str(tmp_path / "o")],
            "sample": ["sample", "--model", "m", "--prompt", "p", "--output", str(tmp_path / "o")]}[command]
    assert main(argv) == 130
    line = one_line(capsys.readouterr().err)
    assert hint in line and "--resume" not in line


def test_exports_are_readable_by_other_users(tiny_dir, tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    argv = base_args(tiny_dir, run, cache_dir)
    argv[argv.index("--steps") + 1] = "1"
    assert main(argv) == 0
    old = os.umask(0o022)
    try:
        assert main(["export", str(run), "--format", "diffusers", "--output", str(tmp_path / "pipe")]) == 0
    finally:
        os.umask(old)
    from concept_erase.io.atomic import _UMASK

    for p in [tmp_path / "pipe", *(tmp_path / "pipe").rglob("*")]:
        mode = p.stat().st_mode & 0o777
        want = (0o777 if p.is_dir() else 0o666) & ~_UMASK
        assert mode & 0o044 == want & 0o044, f"{p} has mode {oct(mode)}"


def test_the_tokenizer_leaves_no_folder_behind(tmp_path, monkeypatch):
    import tempfile

    from concept_erase.io import tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    tokenizer._loaded.cache_clear()
    tok = tokenizer.load_clip_tokenizer()
    assert len(tok) == 49408 and tok("a cat").input_ids == [49406, 320, 2368, 49407]
    assert list(tmp_path.iterdir()) == []
    tok.add_tokens(["<mine>"])  # a copy per caller: another caller does not see it
    assert len(tokenizer.load_clip_tokenizer()) == 49408


def test_lora_export_takes_allow_other_base(tiny_dir, tmp_path, cache_dir, capsys):
    import torch

    run = tmp_path / "run"
    argv = base_args(tiny_dir, run, cache_dir)
    argv[argv.index("--steps") + 1] = "1"
    assert main(argv) == 0
    other = tmp_path / "other"
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        next(p for n, p in pipe.unet.named_parameters() if "attn2.to_k" in n).add_(1.0)
    pipe.save_pretrained(str(other))
    capsys.readouterr()
    base = ["export", str(run), "--format", "lora", "--rank", "2", "--model", str(other)]
    assert main(base + ["--output", str(tmp_path / "l1")]) == 2
    assert "--allow-other-base" in one_line(capsys.readouterr().err)
    assert main(base + ["--output", str(tmp_path / "l2"), "--allow-other-base"]) == 0
    assert (tmp_path / "l2").is_dir()


def test_a_failed_eval_leaves_no_empty_folder(tmp_path, capsys):
    suite = REPO / "eval" / "digits.yaml"
    out = tmp_path / "ev"
    assert main(["eval", "--suite", str(suite), "--model", str(tmp_path / "no-model"), "--output", str(out),
                 "--limit", "1", "--seeds-per-prompt", "1"]) == 2
    one_line(capsys.readouterr().err)
    assert not out.exists()


def test_crash_hints_name_only_flags_the_command_has():
    from concept_erase.cli import crash_line

    assert "--gradient-checkpointing" in crash_line(MemoryError(), "erase")
    for command in ("sample", "eval", "export", "demo", "bench"):
        assert "--gradient-checkpointing" not in crash_line(MemoryError(), command)
    full = RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 3364086464 vs 3364086356")
    assert "disk is probably full" in crash_line(full, "erase")


def test_a_path_the_system_cannot_take_is_bad_input(tmp_path, capsys):
    long = str(tmp_path / ("é" * 300))
    assert main(["sample", "--model", long, "--prompt", "x", "--output", str(tmp_path / "o")]) == 2
    assert "cannot use" in one_line(capsys.readouterr().err)
    assert main(["compare", long, "--output", str(tmp_path / "c")]) == 2
    assert "not a usable path" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
