"""Clean latents the losses noise: anchor images (retain) and concept images (remap).

Made once per run and never per step: real images with captions are VAE-encoded, or the original
model generates images for the prompts. Generated latents are cached on disk, keyed by a hash of
the model and every setting that shaped them, so a second run on the same model skips generation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class LatentBank:
    latents: torch.Tensor  # [N, C, h, w], in the UNet's (scaled) latent space
    prompt_index: torch.Tensor  # [N] which prompt each latent belongs to
    embeddings: torch.Tensor  # [N, L, D] the text embedding of each latent's caption
    prompts: list


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp32 values: the same for the same weights whatever device."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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

    latents = []
    for path in paths:
        try:
            image = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError):
            raise UserError(f"{path} is not a readable image") from None
        image = TF.center_crop(TF.resize(image, resolution), resolution)
        x = TF.to_tensor(image).unsqueeze(0).to(device, pipe.vae.dtype) * 2 - 1
        latents.append(pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor)
    return torch.cat(latents).float()


@torch.no_grad()
def generate_latents(pipe, prompts: list[str], per_prompt: int, *, steps: int, guidance: float, seed: int,
                     device, progress: bool) -> torch.Tensor:
    """The original model's images for each prompt, as latents (never decoded: the VAE is not needed)."""
    from tqdm.auto import tqdm

    out = []
    for i, prompt in enumerate(tqdm(prompts, desc="generating anchor images", disable=not progress, leave=False)):
        gen = torch.Generator("cpu").manual_seed(seed * 100003 + i)
        shape = (per_prompt, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        start = torch.randn(shape, generator=gen).to(device, pipe.unet.dtype)
        images = pipe(prompt, num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                      latents=start, output_type="latent").images
        out.append(images.float())
    return torch.cat(out)


def build_bank(pipe, prompts: list[str], per_prompt: int, *, embed, config, base_digest: str, device,
               cache_dir: Path, role: str) -> LatentBank:
    from .atomic import atomic_path
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps({
        "base": base_digest, "prompts": prompts, "n": per_prompt, "steps": config.anchor_inference_steps,
        "guidance": config.anchor_guidance, "seed": config.seed, "role": role,
        "scheduler": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "size": pipe.unet.config.sample_size,
    }, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir / f"{role}-{key}.safetensors"
    latents = None
    if path.is_file():
        try:
            latents = load_file(str(path))["latents"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is regenerated
            latents = None
    if latents is None:
        latents = generate_latents(pipe, prompts, per_prompt, steps=config.anchor_inference_steps,
                                   guidance=config.anchor_guidance, seed=config.seed, device=device,
                                   progress=config.progress)
        try:
            with atomic_path(path) as tmp:
                save_file({"latents": latents.cpu().contiguous()}, str(tmp))
        except UserError:
            pass  # a cache that cannot be written only costs time
    index = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    emb = embed(prompts)
    return LatentBank(latents.to(device), index.to(device), emb[index.to(emb.device)], list(prompts))


def build_caption_bank(pipe, folder: str, *, embed, device, resolution: int) -> LatentBank:
    pairs = read_caption_folder(folder)
    captions = sorted({c for _, c in pairs})
    index = torch.tensor([captions.index(c) for _, c in pairs])
    latents = encode_images(pipe, [p for p, _ in pairs], resolution, device)
    emb = embed(captions)
    return LatentBank(latents, index.to(device), emb[index.to(emb.device)], captions)
