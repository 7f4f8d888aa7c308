"""The LoRA files the export writes, on the real SD 1.5, SDXL and FLUX.1 layouts (built on the meta device from
diffusers' configs, nothing downloaded), are read by the programs users load them in: ComfyUI, A1111, kohya's
scripts and diffusers, by the key rules of `concept_erase.export.loaders`. The rules themselves are checked on
files of the forms each program is known to read and to miss."""

import pytest
import torch
from safetensors.torch import load_file

from concept_erase.families.base import FAMILIES
from concept_erase.export.loaders import a1111_compvis, coverage, layout_of
from concept_erase.export.lora_forms import default_form, write_lora

SDXL = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def _real(name):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        if name == "sd15":  # diffusers' default UNet config is SD 1.x's but for the text width
            return "sd", UNet2DConditionModel(cross_attention_dim=768)
        if name == "sdxl":
            return "sdxl", UNet2DConditionModel(**SDXL)
        return "flux", FluxTransformer2DModel(guidance_embeds=True)  # the defaults are FLUX.1-dev's


@pytest.fixture(scope="module", params=["sd15", "sdxl", "flux1"])
def real(request):
    family_name, model = _real(request.param)
    return FAMILIES.get(family_name)(), model, layout_of(family_name, model)


def _peft_state(family, model, subset: str) -> dict:
    """Rank-1 PEFT-form LoRA tensors for every Linear and convolution a subset changes (as the export factors
    them: `<module>.lora_A.weight`, `.lora_B.weight`, a changed bias as `.lora_B.bias`)."""
    if subset == "lora":
        trained = {f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in family.lora_targets)}
    else:
        trained = family.subset_names(model, subset)
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or f"{name}.weight" not in trained:
            continue
        w = module.weight
        state[f"{name}.lora_A.weight"] = torch.zeros(1, *w.shape[1:])
        state[f"{name}.lora_B.weight"] = torch.ones(w.shape[0], 1, *([1, 1] if w.dim() == 4 else []))
        if module.bias is not None and f"{name}.bias" in trained and subset != "lora":
            state[f"{name}.lora_B.bias"] = torch.ones(w.shape[0])
    return state


def _kohya_blocks_only(family, subset):
    """Whether every layer a subset trains sits inside kohya's network (attention, resnet, down/upsampling)."""
    return subset in ("xattn", "xattn-kv", "selfattn", "lora")


@pytest.mark.parametrize("subset", ["xattn", "xattn-kv", "selfattn", "noxattn", "full", "lora"])
def test_every_default_export_is_read_where_users_load_it(real, subset, tmp_path):
    family, model, layout = real
    if subset != "lora" and subset not in family.subsets:
        pytest.skip(f"{family.name} has no {subset}")
    peft = _peft_state(family, model, subset)
    assert peft
    path, _ = write_lora(tmp_path, peft, form=default_form(family), family=family, unet_config=model.config, meta={})
    written = load_file(str(path))
    read = coverage(written, layout)
    everything = set(written)
    assert read["diffusers"] == everything
    if family.name == "flux":  # ComfyUI leaves the biases (lora_B.bias): the export measures and says what that costs
        assert read["ComfyUI"] == {k for k in everything if not k.endswith(".bias")}
        return
    assert read["ComfyUI"] == everything and read["A1111"] == everything
    if _kohya_blocks_only(family, subset):
        assert read["kohya sd-scripts"] == everything
    else:  # the layers outside kohya's network (conv_in/out, the time and text-time embeddings) and only those
        outside = {k for k in everything if k.split(".")[0].startswith(
            tuple("lora_unet_" + p for p in ("conv_in", "conv_out", "time_embedding", "input_blocks_0_0", "out_2",
                                               "time_embed", "label_emb")))}
        assert outside and read["kohya sd-scripts"] == everything - outside


def test_the_diffusers_form_is_not_read_by_comfyui_or_a1111_on_unets(tmp_path):
    """Why the default form is kohya's on SD and SDXL: the PEFT keys of save_lora_weights name attention
    projections as ComfyUI does not (`to_k`, not `processor.to_k`), and A1111 cuts every key at its first dot."""
    family_name, model = _real("sd15")
    family = FAMILIES.get(family_name)()
    layout = layout_of(family_name, model)
    path, _ = write_lora(tmp_path, _peft_state(family, model, "xattn"), form="diffusers", family=family,
                         unet_config=model.config, meta={})
    read = coverage(load_file(str(path)), layout)
    assert read["ComfyUI"] == set() and read["A1111"] == set() and read["kohya sd-scripts"] == set()
    assert read["diffusers"] == set(load_file(str(path)))


def test_sdxl_in_diffusers_names_misses_what_a1111_cannot_place():
    """A1111 turns diffusers-spelled names into the original layout by SD 1.x's block arithmetic: on SDXL the
    text-time embedding and the first up block's upsampler (an up block with attention) find no module."""
    family_name, model = _real("sdxl")
    layout = layout_of(family_name, model)
    keys = {f"lora_unet_{m.replace('.', '_')}.lora_down.weight" for m in
            ("add_embedding.linear_1", "up_blocks.0.upsamplers.0.conv", "down_blocks.1.attentions.0.proj_in")}
    from concept_erase.export.loaders import a1111

    assert a1111(keys, layout) == {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"}


def test_a1111_block_arithmetic_matches_the_sd15_layout():
    """On SD 1.5, A1111's fixed arithmetic and the original-layout names the exports use agree for every layer."""
    from concept_erase.io.single_file import ldm_unet_name

    _, model = _real("sd15")
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            want = "diffusion_model_" + ldm_unet_name(name, model.config).replace(".", "_")
            assert a1111_compvis("lora_unet_" + name.replace(".", "_")) == want, name
