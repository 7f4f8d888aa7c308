"""Write a pipeline as one original-layout checkpoint, as A1111, ComfyUI and civitai use: the LDM
layout of SD 1.x/2.x and the SGM layout of SDXL (`conditioner.embedders.N`).

diffusers reads these files (`from_single_file`) but has no writer. The key mapping below is the
inverse of diffusers' own converters, derived from the model's config so it holds for any depth;
every file is checked by running diffusers' converters on it before it is written: a mapping
error cannot produce a silently wrong checkpoint.
"""

from __future__ import annotations

from concept_erase import env  # noqa: F401

import re

import torch

from concept_erase.errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's first text encoder (CLIP ViT-L)
SGM_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's second (OpenCLIP ViT-bigG, with its projection)

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    # SDXL's text-time embedding (pooled text + time ids)
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def ldm_unet_name(key: str, config) -> str:
    """The original (LDM / SGM) name of one diffusers UNet weight or module, from the UNet's config alone
    (layers per block, and which up blocks have attention): the same for a whole state dict or one key."""
    per = config["layers_per_block"] + 1
    module, _, leaf = key.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{leaf}"
    if key in _UNET_FIXED:  # a module name without its leaf
        return _UNET_FIXED[key]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * per + j
        return f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..+)?", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op{m[2] or ''}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * per + j
        return f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..+)?", key):
        i = int(m[1])
        with_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{i * per + per - 1}.{2 if with_attention else 1}.conv{m[2] or ''}"
    raise UserError(f"UNet weight {key!r} has no place in the original checkpoint layout; "
                    "export this model with --format diffusers")


def unet_to_ldm(state: dict, config) -> dict:
    return {ldm_unet_name(key, config): value for key, value in state.items()}


_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def vae_to_ldm(state: dict, config) -> dict:
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"(encoder)\.down_blocks\.(\d+)\.resnets\.", r"\1.down.\2.block.", new)
        new = re.sub(r"(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if ".mid_block.attentions.0." in new:
            head, rest = new.split(".mid_block.attentions.0.")
            for d, o in _VAE_ATTN:
                if rest.startswith(d + "."):
                    rest = o + rest[len(d):]
                    break
            new = f"{head}.mid.attn_1.{rest}"
            if value.dim() == 2:  # the original layout stores these projections as 1x1 convolutions
                value = value[:, :, None, None]
        out[new] = value
    return out


def _is_open_clip(text_encoder) -> bool:
    """SD 2.x's text encoder is OpenCLIP's (GELU), SD 1.x's OpenAI's CLIP (quick GELU): their original
    checkpoints store them in different layouts."""
    return getattr(text_encoder.config, "hidden_act", "quick_gelu") == "gelu"


_OPEN_CLIP_NAMES = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
_OPEN_CLIP_FIXED = {"embeddings.position_embedding.weight": "positional_embedding",
                    "embeddings.token_embedding.weight": "token_embedding.weight",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def clip_to_open_clip(state: dict) -> dict:
    """transformers' CLIPTextModel weights in OpenCLIP's layout (cond_stage_model.model.*): the inverse
    of diffusers' `convert_open_clip_checkpoint`, with q, k and v fused into one in_proj."""
    state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":  # SDXL's second encoder: OpenCLIP stores x @ P, not P x
            out["text_projection"] = value.T.contiguous()
            continue
        if key in _OPEN_CLIP_FIXED:
            out[_OPEN_CLIP_FIXED[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if not m:
            raise UserError(f"text encoder weight {key!r} has no place in the OpenCLIP checkpoint layout; "
                            "export with --format diffusers")
        layer, rest = m.groups()
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            if qkv.group(1) == "q":  # written once, for all three
                parts = [state[f"encoder.layers.{layer}.self_attn.{x}_proj.{qkv.group(2)}"] for x in "qkv"]
                out[f"transformer.resblocks.{layer}.attn.in_proj_{qkv.group(2)}"] = torch.cat(parts, 0)
            continue
        for name, ldm in _OPEN_CLIP_NAMES:
            if rest.startswith(name + "."):
                out[f"transformer.resblocks.{layer}.{ldm}{rest[len(name):]}"] = value
                break
        else:
            raise UserError(f"text encoder weight {key!r} has no place in the OpenCLIP checkpoint layout; "
                            "export with --format diffusers")
    return out


def _clip_state(text_encoder) -> dict:
    # the original layouts name CLIP's weights text_model.* (transformers 5 drops that prefix in memory)
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_encoder.state_dict().items()}


def _unet_and_vae(pipe) -> dict[str, torch.Tensor]:
    tensors = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    tensors.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    return tensors


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """SD 1.x/2.x in the LDM layout."""
    tensors = _unet_and_vae(pipe)
    if _is_open_clip(pipe.text_encoder):
        tensors.update({OPEN_CLIP_PREFIX + k: v for k, v in clip_to_open_clip(pipe.text_encoder.state_dict()).items()})
    else:
        tensors.update({CLIP_PREFIX + k: v for k, v in _clip_state(pipe.text_encoder).items()})
    _verify(pipe, tensors)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def pipeline_to_sgm(pipe) -> dict[str, torch.Tensor]:
    """SDXL in the SGM layout of its original checkpoints: the UNet and VAE as SD's, the first text encoder
    in transformers' CLIP layout under conditioner.embedders.0.transformer, the second in OpenCLIP's
    under conditioner.embedders.1.model (q, k, v fused, the projection transposed)."""
    if pipe.text_encoder is None:
        raise UserError("this SDXL pipeline has no first text encoder (a refiner?); the single-file layout "
                        "written here is SDXL base's: export with --format diffusers")
    tensors = _unet_and_vae(pipe)
    tensors.update({SGM_CLIP_PREFIX + k: v for k, v in _clip_state(pipe.text_encoder).items()})
    tensors.update({SGM_OPEN_CLIP_PREFIX + k: v
                    for k, v in clip_to_open_clip(pipe.text_encoder_2.state_dict()).items()})
    _verify(pipe, tensors, sgm=True)
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _verify(pipe, tensors: dict, *, sgm: bool = False) -> None:
    """Run diffusers' own readers on the mapping: every weight must come back under its name."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    parts = [("UNet", pipe.unet, convert_ldm_unet_checkpoint(tensors, dict(pipe.unet.config))),
             ("VAE", pipe.vae, convert_ldm_vae_checkpoint(tensors, dict(pipe.vae.config)))]
    if sgm:
        parts += [("text encoder", pipe.text_encoder, convert_ldm_clip_checkpoint(tensors)),
                  ("second text encoder", pipe.text_encoder_2,
                   convert_open_clip_checkpoint(pipe.text_encoder_2, tensors, prefix=SGM_OPEN_CLIP_PREFIX))]
    else:
        parts.append(("text encoder", pipe.text_encoder,
                      convert_open_clip_checkpoint(pipe.text_encoder, tensors) if _is_open_clip(pipe.text_encoder)
                      else convert_ldm_clip_checkpoint(tensors)))
    for name, module, back in parts:
        state = module.state_dict()
        if "text encoder" in name:
            state = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                     for k, v in state.items()}
        missing = [k for k in state if k not in back and not k.endswith("position_ids")]
        wrong = [k for k in state if k in back and tuple(back[k].reshape(state[k].shape).shape) != tuple(state[k].shape)
                 or k in back and not torch.equal(back[k].reshape(state[k].shape), state[k])]
        if missing or wrong:
            raise UserError(f"this {name} cannot be written in the original single-file layout "
                            f"({(missing + wrong)[0]!r} does not round-trip); export with --format diffusers")
