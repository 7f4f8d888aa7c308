"""A real process killed with SIGKILL mid-run, then resumed, ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def erase_cmd(tiny_dir, cache_dir, out, *extra):
    return [sys.executable, "-m", "concept_erase", "erase", "--model", str(tiny_dir), "--concept", "van gogh",
            "--anchor", "a photo", "--output", str(out), "--steps", "8", "--sampling-steps", "3",
            "--anchor-inference-steps", "2", "--anchor-images-per-prompt", "2", "--cache-dir", str(cache_dir),
            "--no-progress", "--checkpoint-every", "2", "--checkpoints-total-limit", "0", "--lambda", "1.0",
            "--beta", "0.01", "--lr", "1e-2", "--method", "eupmu-fast", *extra]


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_dir, cache_dir, tmp_path):
    """Runs killed after step 3 and after step 5 (between checkpoints) resume to the uninterrupted run's
    lambda path and weights. The three runs go side by side, one thread each, as do the two resumes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    straight = tmp_path / "straight"
    reference = subprocess.Popen(erase_cmd(tiny_dir, cache_dir, straight), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    kills = {3: tmp_path / "crashed-3", 5: tmp_path / "crashed-5"}
    procs = {k: subprocess.Popen(erase_cmd(tiny_dir, cache_dir, out), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL) for k, out in kills.items()}
    deadline = time.time() + 300
    while procs and time.time() < deadline:
        for kill_after, proc in list(procs.items()):
            if steps_done(kills[kill_after]) >= kill_after or proc.poll() is not None:
                assert proc.poll() is None, f"the run ended before it could be killed after step {kill_after}"
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                del procs[kill_after]
        time.sleep(0.02)
    assert not procs, "a run was not killed in time"
    assert reference.wait(timeout=300) == 0
    for out in kills.values():
        assert not (out / "erased.safetensors").exists()

    resumes = [subprocess.Popen(erase_cmd(tiny_dir, cache_dir, out, "--resume", "latest"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for out in kills.values()]
    for proc in resumes:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    from safetensors.torch import load_file

    a = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    wa = load_file(str(straight / "erased.safetensors"))
    for crashed in kills.values():
        b = [json.loads(l) for l in (crashed / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in b] == list(range(1, 9))
        for ra, rb in zip(a, b):
            assert ra["lambda"] == pytest.approx(rb["lambda"], rel=1e-6, abs=1e-9)
        wb = load_file(str(crashed / "erased.safetensors"))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def test_a_damaged_latest_checkpoint_is_skipped(tiny_dir, cache_dir, tmp_path, capsys):
    from concept_erase.cli import main

    out = tmp_path / "run"
    argv = erase_cmd(tiny_dir, cache_dir, out)[3:]  # in this process: nothing here is killed
    argv[argv.index("--steps") + 1] = "4"
    assert main(argv) == 0
    latest = out / "checkpoints" / "step-00000004" / "trained.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # torn
    (out / "erased.safetensors").unlink()
    argv[argv.index("--steps") + 1] = "6"
    capsys.readouterr()
    assert main(argv + ["--resume", "latest"]) == 0
    said = "".join(capsys.readouterr())
    assert "skipping damaged checkpoint" in said
    assert "resumed from" in said and "step-00000002" in said
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_usable(tiny_dir, cache_dir, tmp_path):
    marker = tmp_path / "saving"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SLOW_SAVE_STEP="4",
               SLOW_SAVE_MARKER=str(marker))
    out = tmp_path / "run"
    cmd = erase_cmd(tiny_dir, cache_dir, out)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_slow_save.py"), *cmd[3:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the save never started"
    os.kill(proc.pid, signal.SIGKILL)  # mid-save: weights and optimizer written, state.json not
    proc.wait()
    root = out / "checkpoints"
    assert not (root / "step-00000004").exists()
    assert list(root.glob(".step-00000004*.tmp"))  # the half-written save, under a temporary name
    assert (root / "step-00000002" / "state.json").is_file()

    proc = subprocess.run(cmd + ["--resume", "latest"], env=dict(env, SLOW_SAVE_STEP="-1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stderr + proc.stdout
    assert "resumed from" in said and "step-00000002" in said and "removing the unfinished checkpoint save" in said
    assert not list(root.glob(".step-*.tmp"))
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
