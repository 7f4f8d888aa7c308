"""What the erasure signal costs per training step, on an SD-1.5-shaped model with random weights.

One trainer, set up once with the shipped `pipelines/sd15-style-vangogh.yaml` (trajectory and anchor lengths cut as
`scripts/scale_check.py` cuts them, --resolution 128), takes each step twice: once with the signal as the trainer
computes it, once with the projection left out (the same batch otherwise), in alternating order so that a drift of
the machine's speed falls on both. Each step is timed by the wall clock and, on a CPU, by the process's own CPU time
(`time.process_time`), which other processes on the machine do not lengthen. The signal's cost is the geometric mean
of the pairs' ratios (with the signal / without), with a bootstrap interval over the pairs; on a CPU the CPU-time
ratio is the measure, the wall-clock one is reported beside it. Stays out of CI (minutes on a CPU).

    python scripts/signal_cost.py --pairs 10 [--model sd15|tiny] [--output benchmarks/signal-cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--model", default="sd15", choices=["sd15", "tiny"])
    ap.add_argument("--mixed-precision", default="", help="default: the recipe's bf16 on a GPU, no (fp32) on a CPU, "
                    "where bf16 is several times slower")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch

    from concept_erase import provenance
    from concept_erase.config import build_config, load_yaml
    from concept_erase.training.trainer import Trainer
    from scale_check import CUT, RESOLUTION, build

    work = Path(tempfile.mkdtemp(prefix="ce-signal-cost-"))
    model_dir = work / "model"
    build(args.model).save_pretrained(model_dir)
    settings = {**load_yaml(ROOT / "pipelines" / "sd15-style-vangogh.yaml"), **CUT, "model": str(model_dir),
                "output": str(work / "run"), "steps": args.pairs + 1, "resolution": RESOLUTION,
                "mixed_precision": args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no"),
                "cache_dir": str(work / "cache"),
                "progress": False, "checkpoint_every": 0, "stop_when_erased": False}  # the steps alone are timed
    trainer = Trainer(build_config(settings, {}, source="signal_cost"))
    trainer._setup()
    with_signal = Trainer._losses

    cuda = trainer.accelerator.device.type == "cuda"

    def timed(step: int, on: bool) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step."""
        trainer._losses = lambda b, f=None: with_signal(trainer, b, f if on else None)  # off: no projection
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer._step(step)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    # the projection's own work, on tensors of the forget batch's shape, timed alone: a bound that the step-time
    # ratio's noise cannot give
    from concept_erase.methods.losses import guidance_projection

    shape = (trainer.config.batch_size, *trainer.ctx.latent_shape)
    pred, e0, d = (torch.randn(shape, device=trainer.accelerator.device) for _ in range(3))
    reps = []
    for _ in range(200):
        t0 = time.perf_counter()
        guidance_projection(pred, e0, d)
        reps.append(time.perf_counter() - t0)
    projection_s = statistics.median(reps)

    timed(0, True)  # the first step pays for one-off set-up
    on, off = [], []
    for i in range(args.pairs):
        # both steps of a pair draw the same batch (the step's generator is seeded by its index): a step's time
        # depends on how deep its trajectory is sampled, which differs from step to step
        first = i % 2 == 0
        a = timed(1 + i, first)
        b = timed(1 + i, not first)
        (on if first else off).append(a)
        (off if first else on).append(b)
    rng = np.random.default_rng(0)
    resample = rng.integers(0, len(on), size=(4000, len(on)))

    def ratio(column: int) -> tuple[float, list[float]]:
        """The geometric mean of the pairs' ratios (with / without) and its bootstrap 95% interval over the pairs."""
        logs = np.log(np.asarray([a[column] for a in on]) / np.asarray([b[column] for b in off]))
        lo, hi = np.quantile(np.exp(logs[resample].mean(axis=1)), [0.025, 0.975])
        return float(np.exp(logs.mean())), [float(lo), float(hi)]

    wall, wall_ci = ratio(0)
    cpu, cpu_ci = ratio(1)
    measure = "wall" if cuda else "cpu"
    result = {"model": args.model, "pairs": args.pairs, "resolution": RESOLUTION,
              "mixed_precision": trainer.config.mixed_precision, "measure": measure,
              "median_step_s_with_signal": statistics.median(a[0] for a in on),
              "median_step_s_without": statistics.median(b[0] for b in off),
              "median_step_cpu_s_with_signal": statistics.median(a[1] for a in on),
              "median_step_cpu_s_without": statistics.median(b[1] for b in off),
              "ratio": cpu if measure == "cpu" else wall, "ratio_ci": cpu_ci if measure == "cpu" else wall_ci,
              "wall_ratio": wall, "wall_ratio_ci": wall_ci, "cpu_ratio": cpu, "cpu_ratio_ci": cpu_ci,
              "forget_batch_shape": list(shape), "projection_s": projection_s,
              "projection_share_of_step": projection_s / statistics.median(b[0] for b in off),
              "commit": provenance.commit(), "date": provenance.now(), "machine": provenance.machine(),
              "command": provenance.command_line()}
    print(json.dumps(result, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
