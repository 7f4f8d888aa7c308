"""The trainer's sharded path (FSDP2): two real processes on the CPU, each holding a slice of every trained tensor.

Accelerate turns FSDP on only on CUDA, so `fsdp_cpu_launch.py` hands the trainer's prepare to Accelerate's own
FSDP2 preparation (the path `pipelines/accelerate-fsdp-*.yaml` takes on GPUs); torch's FSDP2 runs over gloo.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _launch(args, tmp_path, sharded: bool):
    from test_distributed import launch_cmd

    target = [str(ROOT / "tests" / "fsdp_cpu_launch.py")] if sharded else ["-m", "concept_erase"]
    cmd, env = launch_cmd(args, target, CE_FSDP_WRAP="FluxTransformerBlock,FluxSingleTransformerBlock")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sharded_run_matches_data_parallel_and_resumes_exactly(tmp_path):
    """xattn + UNGrad on the tiny FLUX: the original model's predictions come from each process's own slices
    (swapped in), the two inner products are summed over the slices, the optimizer state is gathered by
    name. The sharded run must take the same steps as plain data parallelism (same seeds, same batches),
    every rank must end with the same lambda and weights, and a resume from its mid-run checkpoint must
    land on the uninterrupted run exactly. (The trajectories end at a different random step on each
    process: the sharded denoiser is called as often on every process, or the run would hang.)"""
    from safetensors.torch import load_file

    common = ["erase", "--model", "builtin:tiny-flux", "--concept", "cat", "--anchor", "dog", "--anchor", "house",
              "--steps", "4", "--sampling-steps", "3", "--anchor-inference-steps", "2", "--anchor-images-per-prompt",
              "2", "--lr", "1e-2", "--train", "xattn", "--method", "ungrad", "--checkpoint-every", "2",
              "--retain-loss", "denoising",  # nonzero retain gradients from the first step: lambda moves
              "--checkpoints-total-limit", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    sharded, plain = tmp_path / "sharded", tmp_path / "plain"
    _launch([*common, "--output", str(sharded)], tmp_path, sharded=True)
    _launch([*common, "--output", str(plain)], tmp_path, sharded=False)
    run_s, run_p = (json.loads((d / "run.json").read_text()) for d in (sharded, plain))
    assert run_s["sharded"] is True and run_p["sharded"] is False  # the two paths really differ
    for run in (run_s, run_p):  # sharded or not, UNGrad's two ranks end with the same lambda and weights
        r0, r1 = run["ranks"]
        assert r0["lambda_history"] == r1["lambda_history"] and r0["weights_digest"] == r1["weights_digest"]
    a, b = _metrics(sharded), _metrics(plain)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss_forget", "loss_retain", "lambda", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), (key, x, y)
    assert len({round(r["lambda"], 6) for r in a}) > 1  # lambda moved: the agreement is not trivial
    ws, wp = load_file(str(sharded / "erased.safetensors")), load_file(str(plain / "erased.safetensors"))
    assert set(ws) == set(wp)
    for k in ws:
        torch.testing.assert_close(ws[k], wp[k], rtol=1e-4, atol=1e-6)

    resumed = tmp_path / "resumed"
    shutil.copytree(sharded, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    _launch([*common, "--output", str(resumed), "--resume", "latest"], tmp_path, sharded=True)
    wr = load_file(str(resumed / "erased.safetensors"))
    assert all(torch.equal(wr[k], ws[k]) for k in ws)
    assert [r["lambda"] for r in _metrics(resumed)] == [r["lambda"] for r in a]


def test_sharding_helpers_leave_plain_tensors_alone():
    from concept_erase.training.sharding import (any_sharded, full, load_optimizer_state, load_whole, local,
                                                 optimizer_state, whole_state)

    p = torch.nn.Parameter(torch.randn(3, 2))
    assert not any_sharded([p, None]) and local(p) is p and full(p) is p
    whole = whole_state({"w": p})
    assert whole["w"].dtype == torch.float32 and torch.equal(whole["w"], p.detach())
    load_whole(p, torch.zeros(3, 2))
    assert torch.equal(p.detach(), torch.zeros(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    state = optimizer_state({"w": p}, opt, sharded=False)
    assert state == opt.state_dict()  # the optimizer's own form, as checkpoints always had
    fresh = torch.optim.AdamW([p], lr=0.1)
    load_optimizer_state({"w": p}, fresh, state, sharded=False)
    assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    # a checkpoint of the other kind (sharded by name / torch's own form) is refused in one line, either way
    from concept_erase.errors import UserError

    with pytest.raises(UserError, match="sharded \\(FSDP\\) run; resume it under the same accelerate config"):
        load_optimizer_state({"w": p}, fresh, {"by_name": True, "state": {}, "param_groups": []}, sharded=False)
    with pytest.raises(UserError, match="run without FSDP; resume it without"):
        load_optimizer_state({"w": p}, fresh, state, sharded=True)
