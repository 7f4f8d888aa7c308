"""Two real processes (CPU, gloo) through `accelerate launch`: every rank holds the same lambda and weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(args, target=("-m", "concept_erase"), **env_extra):
    """Two processes over gloo running `target` (a module or a script) with `args`."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_extra)
    # `--cpu --num_processes 2` silently runs ONE process; --multi_gpu with ACCELERATE_USE_CPU runs two over gloo.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *target, *args]
    return cmd, env


def launch(args, tmp_path):
    cmd, env = launch_cmd(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


@pytest.mark.parametrize("method", ["eupmu"])  # ungrad's two ranks: test_sharding's plain data-parallel run
def test_two_ranks_keep_identical_lambda_and_weights(method, tiny_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    proc = launch(["erase", "--model", str(tiny_dir), "--concept", "van gogh", "--anchor", "a photo", "--anchor",
                   "a painting", "--output", str(out), "--steps", "4", "--sampling-steps", "3", "--anchor-inference-steps", "2",
                   "--anchor-images-per-prompt", "2", "--cache-dir", str(cache_dir), "--no-progress",
                   "--checkpoint-every", "0", "--lambda", "1.0", "--beta", "0.01", "--lr", "1e-2",
                   "--method", method], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 2
    r0, r1 = sorted(run["ranks"], key=lambda r: r["rank"])
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["lambda_history"] == r1["lambda_history"]
    assert len(set(r0["lambda_history"])) > 1  # lambda did move: the equality is not trivial
    assert r0["weights_digest"] == r1["weights_digest"]
    if method == "eupmu":  # the anchor images were made half by each process: the same latents as one process makes
        import torch
        from safetensors.torch import load_file

        from concept_erase.io.loading import load_pipeline
        from concept_erase.training.banks import generate_latents

        (two,) = cache_dir.glob("anchor-*.safetensors")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:  # the run's settings: 2 images per prompt, 2 steps, guidance 7.5, seed 0, the model's 32 px
            one = generate_latents(load_pipeline(str(tiny_dir)), ["a photo", "a painting"], 2, steps=2, guidance=7.5,
                                   seed=0, device="cpu", progress=False, resolution=32)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, load_file(two)["latents"])


def _close_weights(a, b):
    from safetensors.torch import load_file
    import torch

    wa = load_file(str(a / "erased.safetensors"))
    wb = load_file(str(b / "erased.safetensors"))
    return all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


def _rank_pid(rank: int, marker: str) -> int | None:
    """The pid of the process with RANK=rank whose command line names `marker` (the run's output)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in cmdline and f"RANK={rank}".encode() in environ and "accelerate" not in cmdline.split()[0]:
            return int(entry.name)
    return None


def test_killing_one_rank_ends_the_run_with_a_message_and_resume_works(tiny_dir, cache_dir, tmp_path):
    """One rank killed mid-run: the run ends with a message; `--resume latest` on two processes continues exactly
    as an uninterrupted run (each rank's carried retain tuple is its own: eupmu-fast)."""
    import signal
    import time

    out = tmp_path / "run"
    args = ["erase", "--model", str(tiny_dir), "--concept", "van gogh", "--anchor", "a photo", "--output", str(out),
            "--steps", "12", "--sampling-steps", "3", "--anchor-inference-steps", "2", "--anchor-images-per-prompt",
            "2", "--cache-dir", str(cache_dir), "--no-progress", "--checkpoint-every", "2",
            "--checkpoints-total-limit", "0", "--lambda", "1.0", "--beta", "0.01", "--lr", "1e-2",
            "--method", "eupmu-fast", "--retain-batch-size", "2"]
    cmd, env = launch_cmd(args)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp_path)
        deadline = time.time() + 300
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and time.time() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        pid = _rank_pid(1, str(out))
        assert proc.poll() is None and pid is not None, "the run ended before a rank could be killed"
        os.kill(pid, signal.SIGKILL)
        code = proc.wait(timeout=180)
    said = log.read_text()
    assert code != 0
    assert "--resume latest" in said or "another process of this run stopped" in said, said[-3000:]
    assert not (out / "erased.safetensors").exists()

    proc = launch([*args, "--resume", "latest"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    ranks = json.loads((out / "run.json").read_text())["ranks"]
    assert ranks[0]["weights_digest"] == ranks[1]["weights_digest"]
    assert ranks[0]["lambda_history"] == ranks[1]["lambda_history"]

    whole = tmp_path / "uninterrupted"
    proc = launch([*[str(whole) if a == str(out) else a for a in args]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight = [json.loads(l) for l in (whole / "metrics.jsonl").read_text().splitlines()]
    assert len(set(r["lambda"] for r in straight)) > 1
    for ra, rb in zip(straight, resumed):
        assert ra["lambda"] == pytest.approx(rb["lambda"], rel=1e-6)
        assert ra["loss_retain"] == pytest.approx(rb["loss_retain"], rel=1e-5)
    straight_ranks = json.loads((whole / "run.json").read_text())["ranks"]
    assert straight_ranks[0]["weights_digest"] == ranks[0]["weights_digest"] or _close_weights(whole, out)


STOP_SCRIPT = '''
import sys
from concept_erase.config import EraseConfig
from concept_erase.training.trainer import erase


class RankZeroSaysStop:
    """A hook like --stop-when-erased's: it judges on the main process only and says stop at step 3."""
    may_stop = True

    def __call__(self, done, trainer):
        return trainer.accelerator.is_main_process and done == 3


model, out, cache = sys.argv[1:4]
erase(EraseConfig(model=model, concepts=["van gogh"], anchors=["a photo"], output=out, steps=8, sampling_steps=3,
                  anchor_inference_steps=2, anchor_images_per_prompt=2, cache_dir=cache, progress=False,
                  checkpoint_every=0, lr=1e-2), on_step=RankZeroSaysStop())
'''


def test_a_stop_asked_on_the_main_process_stops_every_rank_at_the_same_step(tiny_dir, cache_dir, tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    cmd, env = launch_cmd([])
    cmd = cmd[:cmd.index("-m")] + [str(script), str(tiny_dir), str(tmp_path / "run"), str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["stopped_at"] == 3
    r0, r1 = sorted(run["ranks"], key=lambda r: r["rank"])
    assert len(r0["lambda_history"]) == len(r1["lambda_history"]) == 3  # rank 1 stopped too, at step 3
    assert r0["weights_digest"] == r1["weights_digest"]


def test_two_process_eval_equals_one_process_eval(tiny_dir, tmp_path):
    """`accelerate launch` splits the generation (the evaluated images and the base model's reference images) over
    the processes in whole batches; the main process alone scores: the same images and numbers as one process."""
    import hashlib

    import torch

    from concept_erase.cli import main

    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: split\nprompts: {ROOT / 'prompts' / 'digits.csv'}\nseeds_per_prompt: 1\nsteps: 3\n"
                     "guidance: 4.0\nbatch_size: 2\nmetrics:\n  fid: {reference: base}\n")
    args = ["eval", "--suite", str(suite), "--model", str(tiny_dir), "--limit", "5", "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same summation order
    try:
        assert main([*args, "--output", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    proc = launch([*args, "--output", str(tmp_path / "two")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # one report, by the main process

    def digests(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for sub in ("images", "reference") for p in (folder / sub).glob("*.png")}

    one, two = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert len(one) == 10 and one == two
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r1["metrics"][0]["value"] == r2["metrics"][0]["value"] and r2["generated_now"] == 5
    assert not list((tmp_path / "two").rglob("*.tmp*"))  # nothing half-written left behind


def test_a_launched_process_shuts_its_process_group_down_at_exit(tmp_path):
    """processes.close_at_exit registers the shutdown once; at exit it destroys the group (here a one-process gloo
    group in a child process, which says at exit whether the group was still up)."""
    script = tmp_path / "group.py"
    script.write_text(
        "import atexit, sys\n"
        "import torch.distributed as dist\n"
        "from concept_erase import processes\n"
        "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
        "atexit.register(lambda: print('up at exit:', dist.is_initialized()))  # runs after the shutdown (LIFO)\n"
        "processes.close_at_exit(); processes.close_at_exit()\n"
        "print('registered once:', processes._close_registered)\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "registered once: True" in proc.stdout and "up at exit: False" in proc.stdout, proc.stdout


def test_a_launched_command_ends_with_its_group_down_its_output_flushed_and_its_code(tmp_path):
    """processes.leave: one of several launched processes (WORLD_SIZE > 1) destroys its group, flushes what it
    printed and exits with the command's code without the interpreter's teardown (an atexit handler never runs);
    a single process gets the code back."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, os, sys\n"
        "import torch.distributed as dist\n"
        "from concept_erase import processes\n"
        "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
        "atexit.register(lambda: print('teardown ran'))\n"
        "os.environ['WORLD_SIZE'] = '1'\n"
        "print('single gets', processes.leave(5))\n"
        "os.environ['WORLD_SIZE'] = '2'\n"
        "print('written', end='')  # no newline: only a flush brings it out\n"
        "processes.leave(3)\n"
        "print('not reached')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a launcher's pipe is
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert proc.stdout == "single gets 5\nwritten", proc.stdout
