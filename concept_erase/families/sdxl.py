"""Stable Diffusion XL: two text encoders (their penultimate hidden states concatenated; the pooled
embedding from the second), six added time ids (original size, crop corner, target size), a UNet with
text-time conditioning, DDPM noising in epsilon or v-prediction.

Training, anchors and trajectories all use the time ids of a square, uncropped image at the training
resolution: (R, R, 0, 0, R, R). The negative-guidance trajectory is sampled with DDIM built from the
model's scheduler config (SDXL ships an Euler scheduler; DDIM on the same betas and prediction type
keeps the trajectory deterministic, as ESD's). The unconditional prompt is what the pipeline itself
uses for classifier-free guidance: zeros when the model says `force_zeros_for_empty_prompt` (SDXL base
does), else the empty prompt's encoding.
"""

from __future__ import annotations

import torch

from concept_erase.families.base import FAMILIES, Cond
from concept_erase.families.sd import UNetFamily
from concept_erase.io.single_file import pipeline_to_sgm


@FAMILIES.register("sdxl")
class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    required_parts = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")

    def text_encoders(self, pipe):
        return [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]

    def time_ids(self, pipe, resolution: int, n: int, device) -> torch.Tensor:
        size = (resolution, resolution)
        dim = pipe.text_encoder_2.config.projection_dim
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=dim)
        return ids.to(device).repeat(n, 1)

    def encode(self, pipe, prompts: list[str], device, resolution: int) -> Cond:
        prompts = list(prompts)
        emb, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        emb, pooled = emb.float(), pooled.float()
        if pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=emb.device)
            emb = torch.where(empty.view(-1, 1, 1), torch.zeros_like(emb), emb)
            pooled = torch.where(empty.view(-1, 1), torch.zeros_like(pooled), pooled)
        return Cond(encoder_hidden_states=emb, text_embeds=pooled,
                    time_ids=self.time_ids(pipe, resolution, len(prompts), emb.device))

    def inputs(self, x, t, cond):
        c = cond.tensors
        return (x, t), {"encoder_hidden_states": c["encoder_hidden_states"],
                        "added_cond_kwargs": {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}}

    def single_file(self, pipe):
        return pipeline_to_sgm(pipe)
