"""A tiny Stable Diffusion pipeline built from configs, with seeded random weights.

It has the exact structure of SD 1.x (UNet2DConditionModel with cross-attention, AutoencoderKL,
CLIPTextModel with the real CLIP tokenizer, a DDIM scheduler) at a size that runs in seconds on a
CPU. Tests use it; `--model builtin:tiny` uses it until the embedded default model ships. Its
weights are random: what it draws is noise.
"""

from __future__ import annotations

import torch

from concept_erase.io.tokenizer import load_clip_tokenizer


def build_tiny_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", image_size: int = 32,
                        cross_attention_dim: int = 32, open_clip: bool = False):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=image_size,
    )
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cross_attention_dim,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu" if open_clip else "quick_gelu",  # OpenCLIP's text encoder (SD 2.x) or OpenAI's (SD 1.x)
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", image_size: int = 32):
    """A tiny SDXL pipeline (as diffusers' own SDXL tests build one): two CLIP text encoders, the second
    with a projection (the pooled embedding), their penultimate hidden states concatenated (32 + 48 wide),
    and a UNet with `addition_embed_type="text_time"` that takes the pooled embedding and six time ids.
    The encoders differ in width and activation as SDXL's do (CLIP ViT-L, quick GELU; OpenCLIP bigG,
    GELU): diffusers' single-file reader tells them apart by width."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 48,  # six time ids x 8 + the pooled embedding
        cross_attention_dim=32 + 48,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=image_size,
    )
    config = dict(vocab_size=49408, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config, hidden_size=32, projection_dim=32, hidden_act="quick_gelu"))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_size=48, projection_dim=48,
                                                                hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    tokenizer = load_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_t5(width: int):
    """A tiny T5 encoder read with the CLIP BPE tokenizer (no T5 vocabulary can be had offline; the
    pipelines only ask the tokenizer for ids, padded to a length)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=49408, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=49407,
                                   eos_token_id=49407, decoder_start_token_id=0))


def _tiny_flow_vae(image_size: int, latent_channels: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
                         latent_channels=latent_channels, layers_per_block=1, norm_num_groups=8,
                         sample_size=image_size, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def build_tiny_flux_pipeline(seed: int = 0, *, image_size: int = 32, guidance_embeds: bool = True, t5: bool = True):
    """A tiny FLUX.1 pipeline (as diffusers' own FLUX tests build one): a CLIP text encoder for the pooled
    embedding (32 wide), a T5 encoder for the tokens (48 wide), a transformer of two joint blocks and one
    single block on packed latents (4 latent channels: 16 per token), FLUX.1-dev's guidance input
    (`guidance_embeds`; False gives schnell's form) and its resolution-shifted flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=[4, 4, 8])
    vae = _tiny_flow_vae(image_size, 4, seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                                hidden_act="quick_gelu", projection_dim=32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = _tiny_t5(48) if t5 else None
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    tokenizer = load_clip_tokenizer()
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer if t5 else None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3_pipeline(seed: int = 0, *, image_size: int = 32, t5: bool = True):
    """A tiny SD3 pipeline (as diffusers' own SD3 tests build one): two CLIP text encoders with projections
    (32 and 48 wide: the pooled embedding is 80 wide), a T5 encoder 80 wide (the CLIPs' concatenated
    states are padded to its width), a transformer of two joint blocks, flow matching with shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=image_size // 2, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=80, pooled_projection_dim=80, out_channels=4,
                                        pos_embed_max_size=image_size // 2)
    vae = _tiny_flow_vae(image_size, 4, seed + 1)
    config = dict(vocab_size=49408, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_size=32, projection_dim=32,
                                                              hidden_act="quick_gelu"))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_size=48, projection_dim=48,
                                                                hidden_act="gelu"))
    torch.manual_seed(seed + 4)
    text_encoder_3 = _tiny_t5(80) if t5 else None
    tokenizer = load_clip_tokenizer()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
                                    tokenizer_3=tokenizer if t5 else None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe
