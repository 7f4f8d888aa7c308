"""Which tensors of a LoRA file each program a user loads it in will apply, by the key rules those programs
document and the files they read follow:

- ComfyUI (`LoraLoader`, files in `models/loras`): for SD and SDXL it names every UNet module four ways:
  `lora_unet_` + the original (LDM/SGM) path with underscores, `lora_unet_` + the diffusers path with
  underscores, `diffusion_model.` + the original path, and the diffusers path (bare or under `unet.`) with
  each attention projection spelled `processor.to_q` and `to_out.0` as `to_out`. For SD3 and FLUX it names
  them `transformer.` + the diffusers path. Per module it reads kohya's `lora_up`/`lora_down`/`lora_mid`,
  PEFT's `lora_A`/`lora_B` weights, diffusers' older `lora.up`/`lora.down`, `alpha`, and the whole
  differences `diff`/`diff_b`; not PEFT's `lora_B.bias`.
- AUTOMATIC1111 1.x and Forge (files in `models/Lora`), SD and SDXL only: a key is split at its first dot into
  the module name and the tensor. A name in SD 1.x's diffusers spelling is turned into the original layout by
  fixed block arithmetic (three entries per block, SD 1.x/2.x's); other `lora_unet_` names are read as
  original-layout paths. Tensors: `lora_up`/`lora_down`/`lora_mid` weights, `alpha`, `diff`, `diff_b`.
- kohya's sd-scripts (training from `--network_weights`, merging): only the Linear and convolution layers
  inside the attention, resnet, down- and upsampling blocks, named by kohya's module path (diffusers' for
  SD 1.x/2.x, the original layout's for SDXL); `lora_up`/`lora_down` weights and `alpha`.
- diffusers (`load_lora_weights`): by its own converters, called here.

Every rule is written from these conventions, not from the programs' code. Each answers, for a file's
tensor names and a model's layout, the set of names that program applies; `coverage` gives them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from concept_erase.export.lora_forms import kohya_module
from concept_erase.families.base import FAMILIES
from concept_erase.io.single_file import ldm_unet_name

# the tensors per module each program reads (module name, then one of these after a dot)
COMFYUI_TENSORS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
                   "lora.up.weight", "lora.down.weight", "lora_linear_layer.up.weight",
                   "lora_linear_layer.down.weight", "alpha", "diff", "diff_b")
COMFYUI_JOINED = ("_lora.up.weight", "_lora.down.weight")  # diffusers' oldest form: `<module>_lora.up.weight`
A1111_TENSORS = ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "diff", "diff_b")
KOHYA_TENSORS = ("lora_up.weight", "lora_down.weight", "alpha")
# the blocks kohya's LoRA network puts adapters in (its target classes), as diffusers names them
KOHYA_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
PROGRAMS = ("ComfyUI", "A1111", "kohya sd-scripts", "diffusers")


@dataclass
class Layout:
    """The denoiser's module names a loader matches against: diffusers paths of the modules that hold a weight,
    the family, the UNet's config, and the Linear / convolution layers inside kohya's target blocks."""

    family: str
    config: dict  # the denoiser's config (diffusers' FrozenDict: read by key and by attribute)
    modules: set[str]
    kohya_modules: set[str] = field(default_factory=set)

    @property
    def unet(self) -> bool:
        return self.family in ("sd", "sdxl")


def layout_of(family_name: str, denoiser: torch.nn.Module) -> Layout:
    """The layout of a denoiser (a real one, or one built on the meta device from a config)."""
    modules, kohya = set(), set()
    inside: list[str] = []
    for name, module in denoiser.named_modules():
        if type(module).__name__ in KOHYA_BLOCKS:
            inside.append(name + ".")
        if isinstance(getattr(module, "weight", None), torch.Tensor) and name:
            modules.add(name)
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(name.startswith(p) for p in inside):
                kohya.add(name)
    return Layout(family_name, denoiser.config, modules, kohya)


def _split(key: str, tensors: tuple[str, ...]) -> tuple[str, str] | None:
    for t in tensors:
        if key.endswith("." + t):
            return key[: -len(t) - 1], t
    return None


def _ldm(layout: Layout, module: str) -> str:
    return ldm_unet_name(module, layout.config)


def comfyui(keys, layout: Layout) -> set[str]:
    names: set[str] = set()
    for m in layout.modules:
        if layout.unet:
            ldm = _ldm(layout, m)
            processor = m.replace(".to_", ".processor.to_")
            processor = processor[:-2] if processor.endswith(".to_out.0") else processor
            names |= {"lora_unet_" + ldm.replace(".", "_"), "lora_unet_" + m.replace(".", "_"),
                      "diffusion_model." + ldm, processor, "unet." + processor}
        else:
            names.add("transformer." + m)
    read = set()
    for key in keys:
        split = _split(key, COMFYUI_TENSORS)
        module = split[0] if split else next((key[: -len(j)] for j in COMFYUI_JOINED if key.endswith(j)), None)
        if module in names:
            read.add(key)
    return read


def a1111_compvis(name: str) -> str:
    """A kohya module name in SD 1.x's diffusers spelling, in the original layout as A1111 turns it: the block
    arithmetic of SD 1.x/2.x (three entries per block, an attention in every up block but the first)."""
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
              "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}

    def suffix(kind, rest):
        return resnet.get(rest, rest) if kind == "resnets" else rest

    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
    ]
    for pattern, build in rules:
        if m := re.fullmatch(pattern, name):
            return build(m)
    return name


def a1111(keys, layout: Layout) -> set[str]:
    if not layout.unet:
        return set()
    names = {"diffusion_model_" + _ldm(layout, m).replace(".", "_") for m in layout.modules}
    read = set()
    for key in keys:
        name, _, tensor = key.partition(".")
        if tensor not in A1111_TENSORS:
            continue
        if a1111_compvis(name) in names or name.startswith("lora_unet_") and \
                name.replace("lora_unet_", "diffusion_model_", 1) in names:
            read.add(key)
    return read


def kohya_scripts(keys, layout: Layout) -> set[str]:
    if not layout.unet:
        return set()
    # kohya's trainer builds SD 1.x/2.x's UNet with diffusers' module names, SDXL's in the original layout
    names = {"lora_unet_" + (_ldm(layout, m) if layout.family == "sdxl" else m).replace(".", "_")
             for m in layout.kohya_modules}
    return {k for k in keys if (s := _split(k, KOHYA_TENSORS)) and s[0] in names}


def diffusers_reads(state: dict, layout: Layout) -> set[str]:
    """The file's tensors diffusers' `load_lora_weights` puts on a module of this layout: its own converters
    turn the file into PEFT keys; a file key is read when a module it becomes is in the layout. (For a file
    in kohya's form, each module's three tensors stand or fall together.)"""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    family = FAMILIES.get(layout.family)()
    pipeline = getattr(diffusers, family.pipeline_classes[0])
    kwargs = {"unet_config": layout.config} if layout.unet else {}
    converted = pipeline.lora_state_dict(dict(state), **kwargs)
    converted = converted[0] if isinstance(converted, tuple) else converted  # (state, alphas) on UNets
    prefix = "unet." if layout.unet else "transformer."
    peft = {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}
    if layout.unet:
        peft = convert_unet_state_dict_to_peft(peft)
    found = {_module_of(k) for k in peft} & layout.modules
    names = {prefix + m for m in found}
    if layout.unet:
        names |= {kohya_module(layout.family, m, layout.config) for m in found}
    return {key for key in state if _module_of(key) in names}


def _module_of(key: str) -> str:
    """The module a LoRA file's tensor belongs to: the key up to its first LoRA part."""
    m = re.match(r"(.+?)\.(lora_[AB]\.|lora\.(up|down)\.|lora_(up|down|mid)\.|alpha$|diff$|diff_b$)", key)
    return m[1] if m else key.rsplit(".", 1)[0]


RULES = {"ComfyUI": comfyui, "A1111": a1111, "kohya sd-scripts": kohya_scripts}


def programs_for(family_name: str) -> tuple[str, ...]:
    """The programs that run this family: A1111 1.x and kohya's SD scripts have no SD3 or FLUX."""
    return PROGRAMS if family_name in ("sd", "sdxl") else ("ComfyUI", "diffusers")


def coverage(state: dict, layout: Layout) -> dict[str, set[str]]:
    """For each program that runs this family, the names of the file's tensors it applies."""
    out = {}
    for program in programs_for(layout.family):
        out[program] = diffusers_reads(state, layout) if program == "diffusers" else RULES[program](state, layout)
    return out
