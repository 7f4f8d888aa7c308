"""The key forms a LoRA file is written in, and which one each family gets by default.

- `kohya`: one file, `lora_unet_<module path, dots as underscores>.lora_down.weight`, `.lora_up.weight` and
  `.alpha`: the form ComfyUI, AUTOMATIC1111 (A1111, Forge) and kohya's sd-scripts read, and diffusers'
  `load_lora_weights` too. Module paths follow what kohya's own trainer names: diffusers' UNet paths for
  SD 1.x/2.x (`lora_unet_down_blocks_0_attentions_0_proj_in`), the original (SGM) layout for SDXL
  (`lora_unet_input_blocks_4_1_proj_in`). It has no biases. The default for SD 1.x/2.x and SDXL.
- `diffusers`: the PEFT keys `save_lora_weights` writes (`unet.<path>.lora_A.weight`,
  `transformer.<path>.lora_B.weight`, changed biases as `lora_B.bias`). diffusers reads it; ComfyUI reads it
  for SD3 and FLUX but drops `lora_B.bias`; for SD and SDXL ComfyUI and A1111 read nothing of it. The
  default (and the only form) for SD3 and FLUX.

Which tensors of a file each program applies is `concept_erase.export.loaders`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from concept_erase.io.single_file import ldm_unet_name

KOHYA_FILE = "erased_lora_kohya.safetensors"  # one file, as the models/Lora and models/loras folders take them
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # the name save_lora_weights gives its file
FORMS = ("kohya", "diffusers")
KOHYA_TENSORS = ("lora_down.weight", "lora_up.weight", "alpha")


def default_form(family) -> str:
    return "kohya" if family.kohya_lora else "diffusers"


def weights_file(form: str) -> str:
    return KOHYA_FILE if form == "kohya" else DIFFUSERS_FILE


def kohya_module(family_name: str, module: str, unet_config) -> str:
    """The kohya name of a diffusers UNet module: its diffusers path for SD, its original-layout path for SDXL
    (kohya's SDXL trainer builds the UNet in that layout, and its scripts find modules by those names)."""
    if family_name == "sdxl":
        module = ldm_unet_name(module, unet_config)
    return "lora_unet_" + module.replace(".", "_")


def kohya_from_peft(state: dict, name_of) -> tuple[dict, list]:
    """PEFT-form LoRA tensors (`<module>.lora_A.weight`, `.lora_B.weight`) in kohya's form, module names given by
    `name_of(module)`. The scale is already in lora_up, so alpha is the rank (alpha / rank = 1). kohya's form has
    no bias: the changed biases are returned as left out.

    Every module gets the same rank (a factor of lower rank is padded with zeros), as kohya's own files have:
    diffusers' kohya reader drops per-module alphas of the mid block when they differ (found by the test)."""
    out, dropped = {}, []
    rank = max((v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")), default=0)
    for key, value in state.items():
        module, _, leaf = key.partition(".lora_")
        name = name_of(module)
        if leaf == "A.weight":
            pad = value.new_zeros((rank - value.shape[0], *value.shape[1:]))
            out[f"{name}.lora_down.weight"] = torch.cat([value, pad]).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(rank))
        elif leaf == "B.weight":
            pad = value.new_zeros((value.shape[0], rank - value.shape[1], *value.shape[2:]))
            out[f"{name}.lora_up.weight"] = torch.cat([value, pad], dim=1).contiguous()
        elif leaf == "B.bias":
            if bool(value.abs().max() > 0):
                dropped.append(f"{module}.bias")
        else:
            raise ValueError(f"not a PEFT LoRA tensor: {key}")
    return out, dropped


def kohya_metadata(family_name: str, unet_config, rank: int, meta: dict) -> dict[str, str]:
    """The `ss_*` fields kohya's scripts and A1111's LoRA browser read, and what was erased. SD 2.x is told
    from SD 1.x by its text width (1024, OpenCLIP ViT-H, against CLIP ViT-L's 768)."""
    v2 = family_name == "sd" and unet_config["cross_attention_dim"] == 1024
    version = "sdxl_base_v1-0" if family_name == "sdxl" else "sd_v2" if v2 else "sd_v1"
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "ss_base_model_version": version, "ss_v2": str(v2),
            "concept_erase_concepts": meta.get("concepts", ""), "concept_erase_method": meta.get("method", "")}


def write_lora(folder, peft_state: dict, *, form: str, family, unet_config, meta: dict) -> tuple[Path, list]:
    """Write PEFT-form LoRA tensors (`<module>.lora_A.weight`, ...) into `folder` in `form`; returns the file
    written and the changed biases the form could not hold."""
    folder = Path(folder)
    if form == "kohya":
        from safetensors.torch import save_file

        kohya, biases = kohya_from_peft(peft_state, lambda m: kohya_module(family.name, m, unet_config))
        rank = max((v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight")), default=0)
        save_file(kohya, str(folder / KOHYA_FILE), metadata=kohya_metadata(family.name, unet_config, rank, meta))
        return folder / KOHYA_FILE, biases
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    pipeline_class = getattr(diffusers, family.pipeline_classes[0])  # its save_lora_weights names the keys
    pipeline_class.save_lora_weights(str(folder), **{family.lora_layers_argument:
                                                     convert_state_dict_to_diffusers(peft_state)},
                                     safe_serialization=True)
    return folder / DIFFUSERS_FILE, []
