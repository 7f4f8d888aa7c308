"""Peak memory per method, each in a fresh process, against a plain fine-tuning step of the same subset.

Run as `python -m concept_erase.bench.memory --probe MODE --recipe FILE --steps N` (the benchmark does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from concept_erase.bench.world import world_of
from concept_erase.config import build_config, is_edit, load_yaml, settings_for
from concept_erase.errors import UserError
from concept_erase.families.base import family_of
from concept_erase.io.loading import load_pipeline, training_resolution
from concept_erase.training.subsets import select_trainable
from concept_erase.training.trainer import erase

# ---------------------------------------------------------------- peak memory probe (its own process)

def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def probe_memory(recipe: str, mode: str, steps: int, concept: str = "", prompts: tuple | None = None) -> dict:
    """Peak memory of `steps` training steps of `mode` (a method, or 'plain' fine-tuning), measured
    from just before training (after the model is loaded) in this process, erasing `concept` of the recipe's model's
    world; `prompts`: (concepts, anchors) in place of `concept`'s. A trained run also gives its median step time."""
    concepts, anchors = prompts or world_of(load_yaml(recipe).get("model") or "", recipe).prompts(concept)
    out = tempfile.mkdtemp(prefix="ce-probe-")
    if is_edit(mode):  # a closed-form edit: the recipe's prompts, the edit's one solve
        settings = settings_for(load_yaml(recipe), mode)
        settings.update(concepts=concepts, anchors=anchors, output=out, overwrite=True, progress=False, method=mode)
    else:
        settings = load_yaml(recipe)
        settings.update(concepts=concepts, anchors=anchors, output=out, overwrite=True, progress=False, steps=steps,
                        checkpoint_every=0, method=mode if mode != "plain" else "fixed",
                        stop_when_erased=False)  # the steps' memory; a check's images are not training
    config = build_config(settings, {}, source=recipe)
    pipe = load_pipeline(config.model)
    cuda = torch.cuda.is_available()
    if cuda:
        pipe.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    have_hwm_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM, the peak resident size, to the current size
    except OSError:
        have_hwm_reset = False
    base_kb = _rss_kb("VmRSS")
    base_cuda = torch.cuda.memory_allocated() if cuda else 0
    if mode == "plain":
        _plain_finetune(pipe, config, steps)
    else:
        erase(config, pipe=pipe)
    peak_kb = _rss_kb("VmHWM")
    out_dict = {"mode": mode, "steps": steps, "baseline_rss_mb": base_kb / 1024, "peak_rss_mb": peak_kb / 1024,
                "extra_rss_mb": (peak_kb - base_kb) / 1024, "hwm_reset": have_hwm_reset, "concepts": len(concepts)}
    metrics = Path(out) / "metrics.jsonl"
    if mode != "plain" and not is_edit(mode) and metrics.is_file():
        times = [json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines()]
        out_dict["step_time_s_median"] = statistics.median(times[1:] or times)  # the first step warms up
    if cuda:
        out_dict.update(baseline_cuda_mb=base_cuda / 2**20, peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20)
    return out_dict


def _plain_finetune(pipe, config, steps: int) -> None:
    """A plain denoising fine-tuning step of the same denoiser subset and the same number of training
    samples per step (forget batch + retain batch), through the model's family: the memory yardstick."""
    family = family_of(pipe)
    model = family.denoiser(pipe)
    device = model.device
    trained = select_trainable(model, config.train, family, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha)
    params = list(trained.values())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    resolution = training_resolution(pipe, config.resolution)
    with torch.no_grad():
        cond = family.encode(pipe, config.anchors[:1], device, resolution)
    n = config.batch_size + config.retain_batch_size
    schedule = family.schedule(pipe)
    shape = (n, *family.latent_shape(pipe, resolution))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        x0 = torch.randn(shape, generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = schedule.sample_timesteps(n, g).to(device)
        prediction = family.predict(model, schedule.noised(x0, noise, t), t, cond.repeat(n))
        loss = torch.nn.functional.mse_loss(prediction.float(), schedule.target(x0, noise, t).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def memory_table(recipe: Path, modes: list[str], steps: int, concept: str) -> list[dict]:
    """Each mode's `probe_memory`, each in a fresh process (a peak of its own)."""
    out = []
    for mode in modes:
        cmd = [sys.executable, "-m", "concept_erase.bench.memory", "--probe", mode, "--recipe", str(recipe),
               "--steps", str(steps), "--concept", concept]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise UserError(f"the memory probe for {mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def _probe_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--probe", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concept", required=True)
    a = p.parse_args(argv)
    print(json.dumps(probe_memory(a.recipe, a.probe, a.steps, a.concept)))
    return 0


if __name__ == "__main__":
    from concept_erase.env import apply_cli_defaults

    apply_cli_defaults()  # a command of its own: the command line's settings, before the Hub is imported
    sys.exit(_probe_main(sys.argv[1:]))
