"""Stable Diffusion 1.x and 2.x: one CLIP (or OpenCLIP) text encoder, a UNet with cross-attention, a
DDPM noise schedule in epsilon or v-prediction. The negative-guidance trajectory is sampled with DDIM
built from the model's own scheduler config (its betas, its prediction type), as ESD does."""

from __future__ import annotations

import math

import torch

from concept_erase.families.base import FAMILIES, Cond, Family, NoiseSchedule
from concept_erase.families.noising import add_noise, denoising_target
from concept_erase.io.single_file import pipeline_to_ldm


class DDPMSchedule(NoiseSchedule):
    """`sqrt(abar_t) x0 + sqrt(1 - abar_t) n` at a timestep drawn uniformly from the model's training
    timesteps; the target in the model's prediction type (epsilon, v or sample)."""

    def __init__(self, scheduler_config):
        from diffusers import DDPMScheduler

        self.alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.float()
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")

    def __len__(self) -> int:
        return len(self.alphas_cumprod)

    def sample_timesteps(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.alphas_cumprod), (n,), generator=gen)

    def ordered(self, index: torch.Tensor) -> torch.Tensor:
        return index.long()  # DDPM's timestep t is the index: abar falls as t grows

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[t.cpu()].to(like.device)

    def noised(self, x0, noise, t):
        return add_noise(x0, noise, self._abar(t, x0))

    def target(self, x0, noise, t):
        return denoising_target(self.prediction_type, x0, noise, self._abar(t, x0))


class DDIMSampler:
    """DDIM on the model's own betas and prediction type; `step(output, i, x)` takes sampling step i."""

    def __init__(self, scheduler_config, steps: int):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps
        self.init_noise_sigma = self.scheduler.init_noise_sigma

    def step(self, output: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.scheduler.step(output, self.timesteps[i], x).prev_sample


def _xattn(name: str) -> bool:
    return ".attn2." in name


class UNetFamily(Family):
    """What SD and SDXL share: the UNet's attention subsets, DDPM noising and DDIM trajectories."""

    kohya_lora = True  # kohya's lora_unet_* keys: ComfyUI, A1111, kohya's scripts and diffusers read them
    single_file_layout = True  # the LDM layout (SD 1.x/2.x), SGM's (SDXL)

    subsets = {
        "full": lambda n: True,
        "xattn": _xattn,  # ESD-x: the cross-attention layers, where text enters the image
        "xattn-kv": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,  # the text projections (UCE, MACE)
        "selfattn": lambda n: ".attn1." in n,
        # ESD-u: all but cross-attention, the time embedding and the output layers
        "noxattn": lambda n: not (_xattn(n) or n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))),
    }
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    edit_subset = "xattn-kv"  # a closed-form edit changes the cross-attention's key and value projections

    def denoiser(self, pipe):
        return pipe.unet

    def edit_layers(self, model) -> dict[str, str]:
        """The cross-attention's key and value projections: they read the text encoder's tokens."""
        return {n: "encoder_hidden_states" for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and n.endswith((".attn2.to_k", ".attn2.to_v"))}

    def token_streams(self, pipe) -> list[tuple]:
        tokenizer = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
        return [(tokenizer, 0, tokenizer.model_max_length)]

    def native_resolution(self, pipe) -> int:
        return pipe.unet.config.sample_size * pipe.vae_scale_factor

    def latent_shape(self, pipe, resolution: int) -> tuple[int, ...]:
        side = resolution // pipe.vae_scale_factor
        return (pipe.unet.config.in_channels, side, side)

    def schedule(self, pipe) -> DDPMSchedule:
        return DDPMSchedule(pipe.scheduler.config)

    def resolution_step(self, pipe) -> int:
        # the VAE divides the side by its scale factor, the UNet halves it once per down block but the last; and
        # diffusers' SD and SDXL pipelines refuse a side that is not a multiple of 8, whatever the VAE
        return math.lcm(pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1), 8)

    def sampler(self, pipe, steps: int, resolution: int) -> "DDIMSampler":
        return DDIMSampler(pipe.scheduler.config, steps)


@FAMILIES.register("sd")
class StableDiffusion(UNetFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    required_parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

    def text_encoders(self, pipe):
        return [pipe.text_encoder]

    def encode(self, pipe, prompts: list[str], device, resolution: int) -> Cond:
        emb, _ = pipe.encode_prompt(list(prompts), device, 1, False)
        return Cond(encoder_hidden_states=emb.float())

    def inputs(self, x, t, cond):
        return (x, t), {"encoder_hidden_states": cond.tensors["encoder_hidden_states"]}

    def single_file(self, pipe):
        return pipeline_to_ldm(pipe)
