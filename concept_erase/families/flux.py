"""FLUX.1 (dev and schnell): a CLIP text encoder for the pooled embedding and T5 for the tokens, an MM-DiT
of joint blocks then single blocks (`FluxTransformer2DModel`) on packed latents (2x2 latent patches as
tokens, with position ids), `FlowMatchEulerDiscreteScheduler` shifted by the image's token count.

- Latents are kept packed, shape (tokens, 4 x latent channels), as `FluxPipeline` takes and returns them
  with `output_type="latent"`. Training images are square: the image position ids follow from the token
  count, the text position ids are zeros (as the pipeline's), neither is stored with the conditioning.
- Guidance: FLUX.1-dev is guidance-distilled (`guidance_embeds`): it takes the guidance scale as an input
  and is sampled with one call per step, not with classifier-free guidance. Every conditioning here
  carries the guidance 3.5 (`FluxPipeline`'s default), the unconditional one too: "unconditional" is
  the empty prompt at the same guidance, as EraseAnything++ takes it. The negative-guidance trajectory
  is sampled as the pipeline samples, one call per step with `--start-guidance` as the embedded guidance.
  FLUX.1-schnell has no guidance input: its trajectory is the conditional prediction alone.
- T5 reads 512 tokens (the pipeline's default and its limit), or the T5 tokenizer's `model_max_length`
  where that is less, padded: the same text sequence at training and at sampling.
- FLUX's activations overflow in fp16 (black images, NaN losses): it trains under bf16 or fp32 only.
"""

from __future__ import annotations

import math

import torch

from concept_erase.families.base import FAMILIES, Cond
from concept_erase.families.flow import EulerSampler, TransformerFamily

GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: the guidance every conditioning is encoded at


@FAMILIES.register("flux")
class Flux(TransformerFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    denoiser_class = "FluxTransformer2DModel"
    uses_negative_prompt = False  # guidance-distilled: one call per step, the guidance an input
    required_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    part_names = {"text_encoder_2": "T5 text encoder (text_encoder_2)", "tokenizer_2": "T5 tokenizer (tokenizer_2)"}
    t5_tokenizer, t5_default = "tokenizer_2", 512  # FluxPipeline's default and limit
    fp16_refusal = ("FLUX's activations overflow in fp16 (black images and NaN losses); use --mixed-precision "
                    "bf16 (or no)")

    def token_streams(self, pipe) -> list[tuple]:
        return [(pipe.tokenizer_2, 0, self.t5_length(pipe))]  # the tokens are T5's; CLIP gives the pooled embedding

    def text_encoders(self, pipe):
        return [pipe.text_encoder, pipe.text_encoder_2]

    def native_resolution(self, pipe) -> int:
        # the VAE records the size its images were trained at (1024 for FLUX.1); the pipeline's default
        # (default_sample_size x vae_scale_factor) is the same for FLUX.1 but not for smaller VAEs
        return int(pipe.vae.config.sample_size)

    def resolution_step(self, pipe) -> int:
        return pipe.vae_scale_factor * 2  # a latent side must be even: 2x2 patches are packed into tokens

    def latent_shape(self, pipe, resolution: int) -> tuple[int, ...]:
        side = resolution // pipe.vae_scale_factor
        return ((side // 2) ** 2, pipe.transformer.config.in_channels)

    def _guidance(self, pipe, n: int, value: float, device) -> dict:
        if not pipe.transformer.config.guidance_embeds:
            return {}
        return {"guidance": torch.full((n,), float(value), device=device)}

    def encode(self, pipe, prompts: list[str], device, resolution: int) -> Cond:
        prompts = list(prompts)
        emb, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                            max_sequence_length=self.t5_length(pipe))
        return Cond(encoder_hidden_states=emb.float(), pooled_projections=pooled.float(),
                    **self._guidance(pipe, len(prompts), GUIDANCE, emb.device))

    def inputs(self, x, t, cond):
        from diffusers import FluxPipeline

        c = cond.tensors
        side = math.isqrt(x.shape[1])
        img_ids = FluxPipeline._prepare_latent_image_ids(None, side, side, x.device, x.dtype)
        txt_ids = torch.zeros(c["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        return (), {"hidden_states": x, "timestep": t / 1000, "encoder_hidden_states": c["encoder_hidden_states"],
                    "pooled_projections": c["pooled_projections"], "guidance": c.get("guidance"),
                    "img_ids": img_ids, "txt_ids": txt_ids}

    def guided(self, model, x, t, cond, uncond, scale):
        if "guidance" in cond.tensors:
            cond = Cond(**{**cond.tensors, "guidance": torch.full_like(cond.tensors["guidance"], float(scale))})
        return model(x, t, cond).float()

    def sampler(self, pipe, steps: int, resolution: int) -> EulerSampler:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = pipe.scheduler.config
        tokens = self.latent_shape(pipe, resolution)[0]
        mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return EulerSampler(c, steps, mu=mu)

    @torch.no_grad()
    def image_latents(self, pipe, images: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        z = super().image_latents(pipe, images)
        return FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])
