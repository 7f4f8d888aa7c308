"""Write a pipeline as one original-layout checkpoint, as A1111, ComfyUI and civitai use: the LDM
layout of SD 1.x/2.x and the SGM layout of SDXL (`conditioner.embedders.N`), the whole pipeline; for SD3
and FLUX.1 the transformer alone, in the layout Stability AI and Black Forest Labs publish it (ComfyUI's
models/unet; the text encoders and VAE are the base model's own).

diffusers reads these files (`from_single_file`) but has no writer. The key mapping below is the
inverse of diffusers' own converters, derived from the model's config so it holds for any depth;
every file is checked by running diffusers' converters on it before it is written: a mapping
error cannot produce a silently wrong checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


# ------------------------------------------------------- SD3 and FLUX.1: the publishers' transformer layouts
FLUX_WIDTH = 3072  # diffusers' reader of BFL files assumes FLUX.1's width (and an MLP four times it)


@dataclass(frozen=True)
class TransformerLayout:
    """How a publisher names a diffusers transformer's modules: renames outside the blocks, per kind of block its
    original prefix, renames and fused projections (concatenated along the output, in order), and which original
    modules store an AdaLayerNorm's (shift, scale) where diffusers has (scale, shift)."""

    top: dict
    blocks: dict  # diffusers block prefix -> (original block prefix, renames, fused)
    swapped: tuple = ()  # original modules whose two halves are swapped
    scale_norms: tuple = ()  # diffusers module endings whose weight the original calls `scale` (FLUX's RMSNorm)


FLUX_LAYOUT = TransformerLayout(
    top={"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
         "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
         "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
         "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
         "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
         "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
         "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
         "norm_out.linear": "final_layer.adaLN_modulation.1"},
    blocks={
        "transformer_blocks": ("double_blocks", {
            "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
            "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
            "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
            "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
            "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
            "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"},
            {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
        "single_transformer_blocks": ("single_blocks", {
            "norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
            "proj_out": "linear2"},
            {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}),
    },
    swapped=("final_layer.adaLN_modulation.1",),
    scale_norms=("norm_q", "norm_k", "norm_added_q", "norm_added_k"),
)

SD3_LAYOUT = TransformerLayout(
    top={"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
         "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
         "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
         "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
         "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"},
    blocks={"transformer_blocks": ("joint_blocks", {
        "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
        "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
        "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
        "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
        "attn2.to_out.0": "x_block.attn2.proj",
        "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
        "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
        "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"},
        {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")})},
    swapped=("final_layer.adaLN_modulation.1",),
)


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift), the originals' (shift, scale): one swap either way."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_original(state: dict, layout: TransformerLayout, what: str) -> dict:
    """A diffusers transformer's weights in a publisher's layout: the inverse of diffusers' converter."""
    out, fused_parts = {}, {}

    def refuse(key):
        raise UserError(f"{what} weight {key!r} has no place in the original single-file layout; "
                        "export with --format diffusers")

    for key, value in state.items():
        if key == "pos_embed.pos_embed":  # SD3's fixed position table is a bare tensor there
            out["pos_embed"] = value
            continue
        module, _, leaf = key.rpartition(".")
        leaf = "scale" if module.endswith(layout.scale_norms) and layout.scale_norms else leaf
        if module in layout.top:
            out[f"{layout.top[module]}.{leaf}"] = value
            continue
        m = re.fullmatch(r"([a-z_]+)\.(\d+)\.(.+)", module)
        if not m or m[1] not in layout.blocks:
            refuse(key)
        prefix, renames, fused = layout.blocks[m[1]]
        if m[3] in renames:
            out[f"{prefix}.{m[2]}.{renames[m[3]]}.{leaf}"] = value
            continue
        target = next((t for t, parts in fused.items() if m[3] in parts), None) or refuse(key)
        fused_parts.setdefault((f"{prefix}.{m[2]}.{target}.{leaf}", fused[target]), {})[m[3]] = value
    for (name, order), parts in fused_parts.items():
        missing = [p for p in order if p not in parts]
        if missing:
            raise UserError(f"{name}: the {what} transformer lacks {missing[0]}, which the original layout stores "
                            "fused with it; export with --format diffusers")
        out[name] = torch.cat([parts[p] for p in order], dim=0)
    return {k: _swap_halves(v) if k.rpartition(".")[0] in layout.swapped else v for k, v in out.items()}


def transformer_single_file(family_name: str, transformer) -> dict[str, torch.Tensor]:
    """The denoiser alone in its publisher's layout, Black Forest Labs' for FLUX.1 (flux1-dev.safetensors) and
    Stability AI's MMDiT for SD3 (what ComfyUI's models/unet and diffusers' `from_single_file` read), checked by
    diffusers' own reader before it is returned: every weight must come back under its name, equal."""
    from diffusers.loaders.single_file_utils import (convert_flux_transformer_checkpoint_to_diffusers,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    config, state = transformer.config, transformer.state_dict()
    if family_name == "flux":
        width = config["num_attention_heads"] * config["attention_head_dim"]
        if width != FLUX_WIDTH:
            raise UserError(f"this FLUX transformer is {width} wide; Black Forest Labs' single-file layout is read by "
                            f"diffusers only at FLUX.1's width ({FLUX_WIDTH}): export with --format diffusers")
        tensors = transformer_to_original(state, FLUX_LAYOUT, "FLUX")
        back = convert_flux_transformer_checkpoint_to_diffusers(dict(tensors))
    else:
        tensors = transformer_to_original(state, SD3_LAYOUT, "SD3")
        last = f"joint_blocks.{config['num_layers'] - 1}.context_block.adaLN_modulation.1"
        tensors.update({k: _swap_halves(v) for k, v in tensors.items() if k.rpartition(".")[0] == last})
        back = convert_sd3_transformer_checkpoint_to_diffusers(dict(tensors))
    wrong = sorted(k for k in state if k not in back or not torch.equal(back[k], state[k]))
    extra = sorted(set(back) - set(state))
    if wrong or extra:
        raise UserError(f"this transformer cannot be written in the original single-file layout "
                        f"({(wrong + extra)[0]!r} does not round-trip); export with --format diffusers")
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
