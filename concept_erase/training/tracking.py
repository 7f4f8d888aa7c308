"""Following a run: Accelerate's trackers (TensorBoard, Weights & Biases) and sample images during training.

`--report-to tensorboard|wandb|all|none` hands Accelerate the trackers (`Accelerator(log_with=...)`,
`init_trackers`, `log`, `end_training`); nothing here writes an event file by hand. Per step it logs the
losses, lambda, the slack and the controller's other diagnostics, the erasure signal, the gradient norm and the step time,
as `metrics.jsonl` holds them. TensorBoard writes into OUTPUT/logs/ (`tensorboard --logdir OUTPUT/logs`);
a resumed run drops the events past its checkpoint (`purge_step`), as metrics.jsonl drops its lines.

`--sample-every N --sample-prompt P` draws each prompt with the model as it is, before training and every N
steps, into OUTPUT/samples/step-NNNNNN.png (a labelled row) and to the trackers: the concept fading, and
the anchors staying.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from concept_erase.evaluation.grids import labelled_grid
from concept_erase.evaluation.sample import generate
from concept_erase.io.atomic import atomic_path
from concept_erase.plugins import tracker_names

SAMPLE_SEED = 0  # every sample of a prompt starts from the same noise: the pictures differ by the training alone


def accelerator_kwargs(config, output: Path) -> dict:
    """What `Accelerator(...)` needs for the run's trackers."""
    names = tracker_names(config.report_to)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs"))}


def _hparams(config) -> dict:
    """The run's settings as tracker hyperparameters: scalars and strings only (lists joined)."""
    out = {}
    for k, v in config.to_dict().items():
        out[k] = " | ".join(map(str, v)) if isinstance(v, list) else v
    return out


def start(accelerator, config, output: Path, start_step: int) -> None:
    """Open the trackers in `output` (the run's folder, or its staging folder under --overwrite)."""
    if not tracker_names(config.report_to):
        return
    accelerator.project_configuration.set_directories(str(output))
    accelerator.project_configuration.logging_dir = str(output / "logs")
    init = {"tensorboard": {"purge_step": start_step + 1} if start_step else {},
            "wandb": {"name": Path(config.output).name, "dir": str(output / "logs")}}
    accelerator.init_trackers("erase", config=_hparams(config), init_kwargs=init)


def log_step(accelerator, config, record: dict) -> None:
    """One step's numbers (what metrics.jsonl holds), under train/."""
    if not tracker_names(config.report_to):
        return
    values = {f"train/{k}": float(v) for k, v in record.items()
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    accelerator.log(values, step=record["step"])


def log_images(accelerator, step: int, images: dict) -> None:
    """`images`: tag -> PIL image, to every tracker that takes images."""
    import numpy as np

    if not accelerator.is_main_process:
        return
    arrays = {tag: np.asarray(im.convert("RGB"))[None] for tag, im in images.items()}
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "tensorboard":
            tracker.log_images(arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images(arrays, step)


def finish(accelerator, config) -> None:
    """The trackers end (files closed, runs finished). Not `Accelerator.end_training`: it also destroys the
    process group, which the run's final checkpoint still gathers over on several processes."""
    if tracker_names(config.report_to):
        for tracker in getattr(accelerator, "trackers", []):
            tracker.finish()


@contextlib.contextmanager
def drawing(trainer):
    """The pipeline ready to draw with the model as it is trained: the encoders and the VAE back on the training
    device (the trainer parks them off the GPU), the denoiser in eval mode, under the run's autocast; all put
    back afterwards."""
    import torch

    acc, pipe, family = trainer.accelerator, trainer.pipe, trainer.family
    moved = [m for m in (*family.text_encoders(pipe), pipe.vae) if m.device != acc.device]
    for m in moved:
        m.to(acc.device)
    denoiser = trainer.ctx.denoiser
    was_training = denoiser.training
    denoiser.eval()
    try:
        with acc.autocast():
            yield pipe
    finally:
        denoiser.train(was_training)
        for m in moved:
            m.to("cpu")
        if moved and torch.cuda.is_available():
            torch.cuda.empty_cache()


class SampleImages:
    """The trainer's step hook for --sample-every: every prompt drawn with the model as it is (the same noise
    each time), before the first step and every N steps, to OUTPUT/samples/ and the trackers."""

    may_stop = False

    def __init__(self, config):
        self.every = int(config.sample_every)
        self.prompts = list(config.sample_prompts)
        self.steps = int(config.anchor_inference_steps)
        self.guidance = float(config.anchor_guidance)

    def start(self, trainer) -> None:
        if trainer.start_step == 0:
            self._draw(0, trainer)

    def __call__(self, done: int, trainer) -> bool:
        if done % self.every == 0:
            self._draw(done, trainer)
        return False

    def _draw(self, step: int, trainer) -> None:
        acc, pipe = trainer.accelerator, trainer.pipe
        # A sharded denoiser needs every process in each call; otherwise the main process draws alone.
        if not (trainer.sharded or acc.is_main_process):
            return
        t0 = time.perf_counter()
        with drawing(trainer):
            images = [generate(pipe, p, SAMPLE_SEED, steps=self.steps, guidance=self.guidance) for p in self.prompts]
        if not acc.is_main_process:
            return
        path = Path(trainer.output) / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = labelled_grid([images], column_heads=self.prompts, title=f"step {step} (seed {SAMPLE_SEED})")
        with atomic_path(path, suffix=".png") as tmp:
            grid.save(tmp, format="PNG")
        log_images(acc, step, {f"samples/{i}: {p}"[:120]: im for i, (p, im) in enumerate(zip(self.prompts, images))})
        trainer.log(f"samples at step {step}: {path} ({time.perf_counter() - t0:.1f} s)")
