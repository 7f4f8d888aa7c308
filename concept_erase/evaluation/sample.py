"""Generate images with a model, optionally with an erased delta applied: seeds fixed per prompt."""

from __future__ import annotations

from concept_erase import env  # noqa: F401

import json
import re
import sys
from pathlib import Path

import torch

from concept_erase.io.atomic import atomic_dir, refuse_existing
from concept_erase.errors import UserError
from concept_erase.options import MAX_SEED


def parse_seeds(text: str) -> list[int]:
    """'0-7' -> 0..7, '1,4,9' -> [1, 4, 9], '3' -> [3]."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part, flags=re.ASCII)
        if not m:
            raise UserError(f"--seeds {text!r}: write a range like 0-7, a list like 1,4,9, or one number")
        if max(len(m.group(1)), len(m.group(2) or "")) > 19:
            raise UserError(f"--seeds {text!r}: a seed must be from 0 to 2^63 - 1")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UserError(f"--seeds {text!r}: the range {part} runs backwards")
        if hi > MAX_SEED:
            raise UserError(f"--seeds {text!r}: a seed must be from 0 to 2^63 - 1")
        if len(seeds) + hi - lo + 1 > 100_000:
            raise UserError(f"--seeds {text!r}: more than 100,000 seeds; give a shorter range")
        seeds.extend(range(lo, hi + 1))
    return seeds


def image_grid(images: list, rows: int):
    from PIL import Image

    cols = (len(images) + rows - 1) // rows
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


@torch.no_grad()
def generate(pipe, prompt: str, seed: int, *, steps: int, guidance: float, **prompts: str):
    """One image of `prompt` from the seed's own noise; `prompts` may give the pipeline's other encoders
    their own text (`prompt_2`, `prompt_3`)."""
    from concept_erase.families.base import family_of

    family = family_of(pipe)
    resolution = family.native_resolution(pipe)
    latents = family.initial_noise(pipe, [seed], resolution).to(pipe.device, family.denoiser(pipe).dtype)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents, **prompts,
                **family.generation_kwargs(pipe, resolution)).images[0]


def sample(model: str, prompts: list[str], seeds: list[int], output: str | Path, *, weights: str = "",
           steps: int = 30, guidance: float = 7.5, overwrite: bool = False, allow_other_base: bool = False,
           allow_pickle: bool = False, model_config: str = "", device: str = "") -> Path:
    from concept_erase.io.export import apply
    from concept_erase.io.loading import check_schedule_steps, load_pipeline, warn_long_prompts

    if not prompts:
        raise UserError("no prompt given; pass --prompt 'a painting by van gogh' (repeat it for several)")
    output = Path(output)
    refuse_existing(output, overwrite)
    pipe = load_pipeline(model, allow_pickle=allow_pickle, model_config=model_config)
    check_schedule_steps(pipe.scheduler, steps=steps)
    warn_long_prompts(pipe.tokenizer, prompts, lambda m: print(m, file=sys.stderr))
    if weights:
        apply(pipe, weights, allow_other_base=allow_other_base)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with atomic_dir(output, overwrite=overwrite) as tmp:
        rows, index = [], []
        for p, prompt in enumerate(prompts):
            row = []
            for seed in seeds:
                image = generate(pipe, prompt, seed, steps=steps, guidance=guidance)
                name = f"p{p:02d}-s{seed:04d}.png"
                image.save(tmp / name)
                row.append(image)
                index.append({"file": name, "prompt": prompt, "seed": seed})
            rows.extend(row)
        image_grid(rows, len(prompts)).save(tmp / "grid.png")
        (tmp / "images.json").write_text(json.dumps({"model": model, "weights": weights, "steps": steps,
                                                     "guidance": guidance, "images": index}, indent=2),
                                         encoding="utf-8")
    return output
