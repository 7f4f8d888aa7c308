"""Clean latents the losses noise: anchor images (retain) and concept images (remap).

Made once per run and never per step: real images with captions are VAE-encoded, or the original
model generates images for the prompts. Generated latents are cached on disk, keyed by a hash of
the model and every setting that shaped them, so a second run on the same model skips generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from concept_erase.errors import UserError
from concept_erase.families.base import Cond, family_of
from concept_erase.io.atomic import atomic_path
from concept_erase.processes import processes
from concept_erase.training.seeds import generator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LatentBank:
    latents: torch.Tensor  # [N, C, h, w], in the UNet's (scaled) latent space
    prompt_index: torch.Tensor  # [N] which prompt each latent belongs to
    cond: Cond  # the conditioning of each latent's caption (families.base.Cond)
    prompts: list


def read_caption_folder(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, caption) pairs from `metadata.jsonl` (diffusers ImageFolder form) or NAME.txt files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--retain-images {folder} is not a folder")
    pairs: list[tuple[Path, str]] = []
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, text = folder / row["file_name"], str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{meta} line {lineno}: expected {{\"file_name\": ..., \"text\": ...}}") from None
            if not image.is_file():
                raise UserError(f"{meta} line {lineno}: image {image} does not exist")
            pairs.append((image, text))
    else:
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                raise UserError(f"{image} has no caption: add {caption.name} beside it, or a metadata.jsonl "
                                "with file_name and text per line")
            pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise UserError(f"--retain-images {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


@torch.no_grad()
def encode_images(pipe, paths: list[Path], resolution: int, device) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    family = family_of(pipe)
    latents = []
    for path in paths:
        try:
            image = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError):
            raise UserError(f"{path} is not a readable image") from None
        image = TF.center_crop(TF.resize(image, resolution), resolution)
        x = TF.to_tensor(image).unsqueeze(0).to(device, pipe.vae.dtype) * 2 - 1
        latents.append(family.image_latents(pipe, x))
    return torch.cat(latents).float()


@torch.no_grad()
def generate_latents(pipe, prompts: list[str], per_prompt: int, *, steps: int, guidance: float, seed: int,
                     device, progress: bool, resolution: int, autocast=None, role: str = "anchor",
                     on_prompt=None, indices: list[int] | None = None) -> torch.Tensor:
    """The original model's images for each prompt, as latents (never decoded: the VAE is not needed).

    `autocast` (a context-manager factory, e.g. `accelerator.autocast`) runs the pipeline in the
    run's precision: under bf16/fp16 the frozen weights are stored in half precision, and a call
    outside autocast would meet fp32 latents with them. `on_prompt(i, seconds)` hears of each prompt.
    `indices`: the prompts' places in the whole list (their seeds), when this is a share of it.
    """
    from tqdm.auto import tqdm

    family = family_of(pipe)
    out = []
    places = list(range(len(prompts))) if indices is None else list(indices)
    for i, prompt in zip(places, tqdm(prompts, desc=f"generating {role} images", disable=not progress, leave=False)):
        t0 = time.perf_counter()
        gen = generator(seed, i, 1 if role == "anchor" else 2)  # (run seed, prompt, which bank)
        shape = (per_prompt, *family.latent_shape(pipe, resolution))
        start = torch.randn(shape, generator=gen).to(device, torch.float32)
        with (autocast() if autocast is not None else contextlib.nullcontext()):
            images = pipe(prompt, num_images_per_prompt=per_prompt, num_inference_steps=steps,
                          guidance_scale=guidance, latents=start, output_type="latent",
                          **family.generation_kwargs(pipe, resolution)).images
        out.append(images.float())
        if on_prompt is not None:
            on_prompt(i, time.perf_counter() - t0)
    if not out:  # a process of a launch with no prompt of its own (fewer prompts than processes)
        return torch.empty((0, *family.latent_shape(pipe, resolution)))
    return torch.cat(out)


CACHE_VERSION = 2  # 2: collision-free seeds, precision and resolution in the key


def bank_key(*, base_digest: str, prompts: list[str], per_prompt: int, config, role: str, scheduler_config,
             resolution: int) -> str:
    """The cache key of generated latents: everything that changes the images."""
    return hashlib.sha256(json.dumps({
        "version": CACHE_VERSION, "base": base_digest, "prompts": prompts, "n": per_prompt,
        "steps": config.anchor_inference_steps, "guidance": config.anchor_guidance, "seed": config.seed,
        "role": role, "scheduler": {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        "resolution": resolution, "precision": config.mixed_precision,
    }, sort_keys=True, default=str).encode()).hexdigest()[:24]


def build_bank(pipe, prompts: list[str], per_prompt: int, *, embed, config, base_digest: str, device,
               cache_dir: Path, role: str, resolution: int, autocast=None, on_prompt=None) -> LatentBank:
    from safetensors.torch import load_file, save_file

    key = bank_key(base_digest=base_digest, prompts=prompts, per_prompt=per_prompt, config=config, role=role,
                   scheduler_config=pipe.scheduler.config, resolution=resolution)
    path = cache_dir / f"{role}-{key}.safetensors"
    procs = processes()
    read: dict = {}

    def cached() -> bool:
        read["latents"] = _cached_latents(path)
        return read["latents"] is not None

    # The main process says whether the cache holds the bank, so that every process takes the same path.
    latents = None
    if procs.decide(cached):
        latents = read.get("latents")
        if latents is None:  # another process of a launch: it reads what the main one found
            latents = load_file(str(path))["latents"]
    if latents is None:
        # Launched on several processes, each makes every world-th prompt's images (each prompt has its own seed:
        # the same latents as one process makes), and all gather them.
        mine = procs.share(list(range(len(prompts))))
        made = generate_latents(pipe, [prompts[i] for i in mine], per_prompt, steps=config.anchor_inference_steps,
                                guidance=config.anchor_guidance, seed=config.seed, device=device,
                                progress=config.progress and procs.main, resolution=resolution, autocast=autocast,
                                role=role, on_prompt=on_prompt, indices=mine)
        latents = procs.gather_rows(mine, made.cpu(), per_prompt, len(prompts)) if procs.several else made
        if procs.main:
            try:
                with atomic_path(path) as tmp:
                    save_file({"latents": latents.cpu().contiguous()}, str(tmp))
            except UserError:
                pass  # a cache that cannot be written only costs time
        procs.wait()
    index = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    return LatentBank(latents.to(device), index.to(device), embed(prompts)[index], list(prompts))


def _cached_latents(path: Path):
    """The cached latents at `path`, or None (absent or damaged: regenerated)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))["latents"]
    except Exception:  # noqa: BLE001 - a damaged cache entry is regenerated
        return None


def build_caption_bank(pipe, folder: str, *, embed, device, resolution: int) -> LatentBank:
    pairs = read_caption_folder(folder)
    captions = sorted({c for _, c in pairs})
    index = torch.tensor([captions.index(c) for _, c in pairs])
    latents = encode_images(pipe, [p for p, _ in pairs], resolution, device)
    return LatentBank(latents, index.to(device), embed(captions)[index], captions)
