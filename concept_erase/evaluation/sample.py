"""Generate images with a model, optionally with an erased delta applied: seeds fixed per prompt."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from concept_erase.errors import UserError
from concept_erase.evaluation.grids import labelled_grid
from concept_erase.export.delta import apply
from concept_erase.families.base import family_of
from concept_erase.io.atomic import atomic_dir, atomic_path, refuse_existing
from concept_erase.io.loading import check_schedule_steps, load_pipeline, warn_long_prompts
from concept_erase.options import MAX_SEED
from concept_erase.processes import processes


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


@torch.no_grad()
def generate(pipe, prompt: str, seed: int, *, steps: int, guidance: float, **prompts: str):
    """One image of `prompt` from the seed's own noise; `prompts` may give the pipeline's other encoders
    their own text (`prompt_2`, `prompt_3`) or a `negative_prompt`."""
    return generate_batch(pipe, [prompt], [seed], steps=steps, guidance=guidance, **prompts)[0]


@torch.no_grad()
def generate_batch(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                   negative_prompt: str = "", **others: str) -> list:
    """One image per (prompt, seed), in one pipeline call, each from its seed's own noise (the same image as
    alone, up to the summation order of a batch)."""
    family = family_of(pipe)
    resolution = family.native_resolution(pipe)
    latents = family.initial_noise(pipe, list(seeds), resolution).to(pipe.device, family.denoiser(pipe).dtype)
    extra = dict(others)
    if negative_prompt:
        extra["negative_prompt"] = [negative_prompt] * len(prompts)
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, latents=latents, **extra,
                **family.generation_kwargs(pipe, resolution)).images


def generate_images(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                    batch: int = 128) -> torch.Tensor:
    """Float images [N, 3, H, W] in [0, 1], one per (prompt, seed), in pipeline calls of up to `batch` images: the
    same images as one call each (each keeps its seed's starting noise) up to floating-point summation order; on a
    CPU, batches of ~100 small images cost a third less per image than the 4 to 16 of one prompt."""
    images = []
    for start in range(0, len(prompts), batch):
        out = generate_batch(pipe, list(prompts[start:start + batch]), [int(s) for s in seeds[start:start + batch]],
                             steps=steps, guidance=guidance, output_type="pt")
        images.append(out.float().cpu().clamp(0, 1))
    return torch.cat(images) if images else torch.empty(0)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sample(model: str, prompts: list[str], seeds: list[int], output: str | Path, *, weights: str = "",
           steps: int = 30, guidance: float = 7.5, overwrite: bool = False, allow_other_base: bool = False,
           allow_pickle: bool = False, model_config: str = "", device: str = "", negative_prompt: str = "",
           batch_size: int = 4, dtype: str = "fp32", progress: bool = True) -> Path | None:
    """Draw every (prompt, seed) into `output`: PNGs, images.json and a labelled grid.png. Launched on several
    processes (`accelerate launch`), each draws whole batches in turn; the main process writes the index and the
    grid. Returns the folder (None on the other processes)."""
    from tqdm.auto import tqdm

    if not prompts:
        raise UserError("no prompt given; pass --prompt 'a painting by van gogh' (repeat it for several)")
    procs = processes()
    output = Path(output)
    procs.decide(lambda: refuse_existing(output, overwrite))
    pipe = load_pipeline(model, allow_pickle=allow_pickle, model_config=model_config)
    check_schedule_steps(pipe.scheduler, inference_steps=steps)
    if negative_prompt and not family_of(pipe).uses_negative_prompt:
        raise UserError(f"--negative-prompt: {family_of(pipe).name} is sampled with one call per step, without "
                        "classifier-free guidance, so a negative prompt changes nothing; drop it")
    if procs.main:
        warn_long_prompts(pipe.tokenizer, prompts, lambda m: print(m, file=sys.stderr))
    if weights:
        apply(pipe, weights, allow_other_base=allow_other_base)
    pipe.to(procs.device(device), DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    wanted = [(p, prompt, seed) for p, prompt in enumerate(prompts) for seed in seeds]
    batches = [wanted[i:i + batch_size] for i in range(0, len(wanted), batch_size)]
    name = "p{:02d}-s{:04d}.png".format

    def draw(folder: Path) -> None:
        mine = procs.share(batches)
        bar = tqdm(total=sum(map(len, mine)), desc="sampling", unit="img", disable=not (progress and procs.main))
        for batch in mine:
            images = generate_batch(pipe, [t[1] for t in batch], [t[2] for t in batch], steps=steps,
                                    guidance=guidance, negative_prompt=negative_prompt)
            for (p, _, seed), image in zip(batch, images):
                with atomic_path(folder / name(p, seed), suffix=".png") as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(batch))
        bar.close()
        procs.wait()

    if not procs.main:
        draw(procs.decide(lambda: None))  # the main process's staging folder
        procs.wait()
        return None
    from PIL import Image

    with atomic_dir(output, overwrite=overwrite) as tmp:
        procs.decide(lambda: tmp)  # the other processes draw into the same staging folder
        draw(tmp)
        index = [{"file": name(p, seed), "prompt": prompt, "seed": seed} for p, prompt, seed in wanted]
        rows = [[Image.open(tmp / name(p, seed)).convert("RGB") for seed in seeds] for p in range(len(prompts))]
        labelled_grid(rows, row_labels=prompts, column_heads=[f"seed {s}" for s in seeds],
                      title=f"{model}" + (f" + {Path(weights).name}" if weights else "") +
                      f" | {steps} steps, guidance {guidance}" + (f", negative: {negative_prompt}" if negative_prompt
                                                                 else "")).save(tmp / "grid.png")
        (tmp / "images.json").write_text(json.dumps({
            "model": model, "weights": weights, "steps": steps, "guidance": guidance,
            "negative_prompt": negative_prompt, "dtype": dtype, "processes": procs.world, "images": index},
            indent=2), encoding="utf-8")
        procs.wait()
    return output
