"""Stable Diffusion 3 and 3.5: three text encoders (two CLIPs, their penultimate states concatenated and
padded to T5's width, then T5's tokens after them; the pooled embedding is both CLIPs' projections), an
MM-DiT (`SD3Transformer2DModel`) that predicts the flow-matching velocity, `FlowMatchEulerDiscreteScheduler`
with the model's shift (3.0 for SD3 and 3.5).

T5 reads 256 tokens (the pipeline's default), or the T5 tokenizer's `model_max_length` where that is
less, at training and at sampling alike. Prompts are encoded by the pipeline's own `encode_prompt`, so a
model without T5 (`text_encoder_3=None`,
SD3's documented way to save memory) gets the zeros the pipeline itself uses in T5's place. The
unconditional prompt is the empty prompt's encoding, as the pipeline's classifier-free guidance uses.
"""

from __future__ import annotations

from concept_erase.families.base import FAMILIES, Cond
from concept_erase.families.flow import TransformerFamily


@FAMILIES.register("sd3")
class StableDiffusion3(TransformerFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    denoiser_class = "SD3Transformer2DModel"
    t5_tokenizer, t5_default = "tokenizer_3", 256  # StableDiffusion3Pipeline's default
    required_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    def subset_names(self, model, subset: str) -> set[str]:
        """As the family's, less what no output depends on: SD3's last joint block discards its text stream
        (`context_pre_only`), so its `attn.add_q_proj` (the text's queries) feeds nothing and never trains."""
        names = super().subset_names(model, subset)
        dead = {f"transformer_blocks.{i}.attn.add_q_proj.{leaf}" for i, block in enumerate(model.transformer_blocks)
                if block.context_pre_only for leaf in ("weight", "bias")}
        return names - dead

    def token_streams(self, pipe) -> list[tuple]:
        """CLIP's tokens (both CLIP encoders, side by side), then T5's where the pipeline has it."""
        clip = pipe.tokenizer_max_length
        streams = [(pipe.tokenizer, 0, clip)]
        if pipe.text_encoder_3 is not None:
            streams.append((pipe.tokenizer_3, clip, self.t5_length(pipe)))
        return streams

    def text_encoders(self, pipe):
        return [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]

    def native_resolution(self, pipe) -> int:
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor

    def resolution_step(self, pipe) -> int:
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def max_resolution(self, pipe) -> int | None:
        # SD3's learned position table covers pos_embed_max_size patches a side
        config = pipe.transformer.config
        size = config.get("pos_embed_max_size")
        return size * config.patch_size * pipe.vae_scale_factor if size else None

    def latent_shape(self, pipe, resolution: int) -> tuple[int, ...]:
        side = resolution // pipe.vae_scale_factor
        return (pipe.transformer.config.in_channels, side, side)

    def encode(self, pipe, prompts: list[str], device, resolution: int) -> Cond:
        prompts = list(prompts)
        emb, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                               num_images_per_prompt=1, do_classifier_free_guidance=False,
                                               max_sequence_length=self.t5_length(pipe))
        return Cond(encoder_hidden_states=emb.float(), pooled_projections=pooled.float())

    def inputs(self, x, t, cond):
        c = cond.tensors
        return (), {"hidden_states": x, "timestep": t, "encoder_hidden_states": c["encoder_hidden_states"],
                    "pooled_projections": c["pooled_projections"]}
