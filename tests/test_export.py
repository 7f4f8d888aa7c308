"""erased.safetensors, apply(), and the diffusers and LoRA exports round-trip into fresh pipelines."""

import copy
import json

import pytest
import torch

from concept_erase import apply
from concept_erase.errors import UserError
from concept_erase.export.delta import read_delta
from concept_erase.export.formats import export_diffusers, export_lora
from concept_erase.training.trainer import erase

from helpers import unet_out, unet_probe


def _run(tiny_pipe, tmp_path_factory, cache_dir, tiny_dir, name, **settings):
    from concept_erase.config import EraseConfig

    pipe = copy.deepcopy(tiny_pipe)
    out = tmp_path_factory.mktemp("runs") / name
    cfg = EraseConfig(model=str(tiny_dir), concepts=["van gogh"], anchors=["a photo"], output=str(out), steps=2,
                      sampling_steps=4, anchor_inference_steps=2, anchor_images_per_prompt=2, cache_dir=str(cache_dir),
                      progress=False, checkpoint_every=0, lr=1e-2, **settings)
    erase(cfg, pipe=pipe)
    return out, pipe


@pytest.fixture(scope="module")
def xattn_run(tiny_pipe, tmp_path_factory, tiny_dir):
    return _run(tiny_pipe, tmp_path_factory, tmp_path_factory.mktemp("cache"), tiny_dir, "x", method="fixed", lambda_init=1.0)


@pytest.fixture(scope="module")
def lora_run(tiny_pipe, tmp_path_factory, tiny_dir):
    return _run(tiny_pipe, tmp_path_factory, tmp_path_factory.mktemp("cache"), tiny_dir, "l", method="eupmu", train="lora", lora_rank=2,
                lora_alpha=4.0)


def test_delta_holds_only_changed_tensors_with_metadata(xattn_run, tiny_pipe):
    out, _ = xattn_run
    tensors, meta = read_delta(out / "erased.safetensors")
    assert set(tensors) == {n for n, _ in tiny_pipe.unet.named_parameters() if ".attn2." in n}
    assert meta["method"] == "fixed" and json.loads(meta["concepts"]) == ["van gogh"] and meta["steps"] == "2"
    assert json.loads(meta["settings"])["lambda_init"] == 1.0
    assert len(meta["base_model_digest"]) == 64


def test_apply_reproduces_the_trained_model(xattn_run, tiny_pipe):
    out, trained = xattn_run
    probe = unet_probe(tiny_pipe.unet)
    fresh = copy.deepcopy(tiny_pipe)
    assert not torch.equal(unet_out(fresh.unet, probe), unet_out(trained.unet, probe))
    apply(fresh, out / "erased.safetensors")
    assert torch.equal(unet_out(fresh.unet, probe), unet_out(trained.unet, probe))


def test_apply_accepts_the_same_base_in_another_dtype(xattn_run, tiny_pipe):
    out, _ = xattn_run
    half = copy.deepcopy(tiny_pipe).to(torch.bfloat16)
    apply(half, out)
    assert half.unet.dtype == torch.bfloat16


def test_export_diffusers_loads_with_from_pretrained(xattn_run, tmp_path, tiny_pipe):
    from diffusers import StableDiffusionPipeline

    out, trained = xattn_run
    folder = export_diffusers(out, tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(str(folder))
    probe = unet_probe(tiny_pipe.unet)
    assert torch.equal(unet_out(loaded.unet, probe), unet_out(trained.unet, probe))
    with pytest.raises(UserError, match="already exists"):
        export_diffusers(out, tmp_path / "pipe")


def test_lora_run_applies_and_exports_for_load_lora_weights(lora_run, tiny_pipe, tmp_path):
    out, trained = lora_run
    probe = unet_probe(tiny_pipe.unet)
    expected = unet_out(trained.unet, probe)
    assert not torch.allclose(expected, unet_out(tiny_pipe.unet, probe), atol=1e-6)
    merged = apply(copy.deepcopy(tiny_pipe), out)
    torch.testing.assert_close(unet_out(merged.unet, probe), expected, rtol=1e-4, atol=1e-5)
    assert not any("lora" in n for n in merged.unet.state_dict())  # merged: a plain UNet again

    for form in ("kohya", "diffusers"):
        summary = export_lora(out, tmp_path / form, lora_format=form)
        assert summary["output_change_kept"] > 0.999
        fresh = copy.deepcopy(tiny_pipe)
        fresh.load_lora_weights(str(tmp_path / form), weight_name=summary["file"])
        torch.testing.assert_close(unet_out(fresh.unet, probe), expected, rtol=1e-4, atol=1e-5)


def test_lora_factorisation_of_a_subset_run(xattn_run, tiny_pipe, tmp_path, tiny_dir):
    """At full rank the diffusers form, changed biases included (lora_B.bias), is the trained model again,
    read back by diffusers' own load_lora_weights."""
    out, trained = xattn_run
    tensors, _ = read_delta(out)
    assert any(n.endswith(".bias") and not torch.equal(t, tiny_pipe.unet.state_dict()[n]) for n, t in tensors.items())
    summary = export_lora(out, tmp_path / "lora", model=str(tiny_dir), rank=64, lora_format="diffusers")
    assert summary["max_relative_error"] < 1e-4 and summary["dropped"] == [] and summary["biases_carried"] > 0
    assert summary["output_change_kept"] > 0.999
    fresh = copy.deepcopy(tiny_pipe)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    probe = unet_probe(tiny_pipe.unet)
    torch.testing.assert_close(unet_out(fresh.unet, probe), unet_out(trained.unet, probe), rtol=1e-4, atol=1e-5)


def test_lora_at_low_rank_or_without_biases_reports_the_output_change_it_loses(xattn_run, tmp_path, tiny_dir):
    out, _ = xattn_run
    summary = export_lora(out, tmp_path / "lora", model=str(tiny_dir), rank=1, lora_format="diffusers")
    assert summary["max_relative_error"] > 0.01
    assert 0 < summary["output_change_kept"] < 0.999
    no_bias = export_lora(out, tmp_path / "lora-nb", model=str(tiny_dir), rank=64, lora_bias=False,
                          lora_format="diffusers")
    assert no_bias["dropped"] and all(n.endswith(".bias") for n in no_bias["dropped"])
    assert no_bias["output_change_kept"] < 0.999 and no_bias["biases_carried"] == 0


def test_kohya_lora_reads_back_through_diffusers_as_the_diffusers_form(xattn_run, lora_run, tiny_pipe, tmp_path,
                                                                       tiny_dir):
    """kohya's lora_unet_* form (A1111, ComfyUI), read by diffusers' own kohya converter, is the same LoRA as the
    diffusers form: the same UNet weights once fused, for a factored subset run and for a LoRA run."""
    from safetensors.torch import load_file

    from concept_erase.export.lora_forms import KOHYA_FILE

    for (out, _), name in ((xattn_run, "x"), (lora_run, "l")):
        summary = export_lora(out, tmp_path / f"{name}-kohya", model=str(tiny_dir), rank=64, lora_format="kohya")
        export_lora(out, tmp_path / f"{name}-diffusers", model=str(tiny_dir), rank=64, lora_bias=False,
                    lora_format="diffusers")
        kohya = load_file(str(tmp_path / f"{name}-kohya" / KOHYA_FILE))
        assert kohya and all(k.startswith("lora_unet_") for k in kohya)
        assert {k.split(".", 1)[1] for k in kohya} == {"lora_down.weight", "lora_up.weight", "alpha"}
        fused = []
        for form in ("kohya", "diffusers"):
            pipe = copy.deepcopy(tiny_pipe)
            pipe.load_lora_weights(str(tmp_path / f"{name}-{form}"))
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            fused.append(pipe.unet.state_dict())
        changed = [k for k in fused[0] if not torch.equal(fused[1][k], tiny_pipe.unet.state_dict()[k])]
        assert changed, "the diffusers form changed nothing"
        for k in fused[0]:
            torch.testing.assert_close(fused[0][k], fused[1][k], rtol=1e-5, atol=1e-6, msg=k)
        if name == "x":  # the subset run's changed biases cannot ride in kohya's form: said, not hidden
            assert summary["dropped"] and all(d.endswith(".bias") for d in summary["dropped"])


def test_lora_of_convolutions_and_what_no_lora_can_hold(tiny_pipe, tmp_path, tiny_dir):
    """--train noxattn changes convolutions (factored as conv LoRA) and normalisation weights (listed)."""
    from concept_erase.export.formats import lora_from_delta

    base = tiny_pipe.unet.state_dict()
    g = torch.Generator().manual_seed(0)
    names = ["conv_in.weight", "conv_in.bias", "down_blocks.0.resnets.0.norm1.weight",
             "down_blocks.0.resnets.0.conv1.weight"]
    tensors = {n: base[n] + 0.01 * torch.randn(base[n].shape, generator=g) for n in names}
    state, dropped, errs = lora_from_delta(tensors, base, rank=1000)
    assert dropped == ["down_blocks.0.resnets.0.norm1.weight"]
    assert state["conv_in.lora_A.weight"].dim() == 4 and state["conv_in.lora_B.weight"].shape[-2:] == (1, 1)
    assert "conv_in.lora_B.bias" in state and max(errs) < 1e-4
    a, b = state["down_blocks.0.resnets.0.conv1.lora_A.weight"], state["down_blocks.0.resnets.0.conv1.lora_B.weight"]
    rebuilt = (b.flatten(1) @ a.flatten(1)).reshape(base["down_blocks.0.resnets.0.conv1.weight"].shape)
    torch.testing.assert_close(rebuilt, tensors["down_blocks.0.resnets.0.conv1.weight"] -
                               base["down_blocks.0.resnets.0.conv1.weight"], rtol=1e-4, atol=1e-6)


def test_randomized_factorisation_is_within_tolerance_of_the_exact_one():
    from concept_erase.export.formats import factor_delta

    g = torch.Generator().manual_seed(0)
    low = torch.randn(640, 24, generator=g) @ torch.randn(24, 768, generator=g)  # a rank-24 change plus noise
    delta = low + 0.05 * torch.randn(640, 768, generator=g)
    for rank in (4, 16):
        _, _, exact = factor_delta(delta, rank, exact=True)
        b, a, fast = factor_delta(delta, rank)
        assert b.shape == (640, rank) and a.shape == (rank, 768)
        assert fast <= exact + 0.01, (rank, fast, exact)


def test_apply_refuses_another_base_model(xattn_run):
    from concept_erase.io.tiny import build_tiny_pipeline

    out, _ = xattn_run
    other = build_tiny_pipeline(seed=5)
    with pytest.raises(UserError, match="another base model"):
        apply(other, out)
    apply(other, out, allow_other_base=True)  # told otherwise: allowed


def test_apply_refuses_wrong_shapes(xattn_run):
    from concept_erase.io.tiny import build_tiny_pipeline

    out, _ = xattn_run
    other = build_tiny_pipeline(cross_attention_dim=16)
    with pytest.raises(UserError, match="shape"):
        apply(other, out, allow_other_base=True)


def test_apply_refuses_truncated_and_foreign_files(xattn_run, tmp_path, tiny_pipe):
    from safetensors.torch import save_file

    out, _ = xattn_run
    data = (out / "erased.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        apply(copy.deepcopy(tiny_pipe), bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="not a concept-erase delta"):
        apply(copy.deepcopy(tiny_pipe), foreign)


def test_apply_refuses_a_delta_with_a_tensor_the_model_lacks(xattn_run, tmp_path, tiny_pipe):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out, _ = xattn_run
    with safe_open(str(out / "erased.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name.replace("attn2", "attn9")] = tensors.pop(name)
    renamed = tmp_path / "renamed.safetensors"
    save_file(tensors, str(renamed), metadata=meta)
    fresh = copy.deepcopy(tiny_pipe)
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    with pytest.raises(UserError, match="this model does not have.*attn9"):
        apply(fresh, renamed)
    assert all(torch.equal(v, fresh.unet.state_dict()[k]) for k, v in before.items())  # untouched


def test_single_file_export_round_trips_through_from_single_file(xattn_run, tiny_pipe, tiny_dir, tmp_path):
    from concept_erase.export.formats import export_single_file
    from concept_erase.io.loading import load_pipeline

    out, trained = xattn_run
    path = export_single_file(out, tmp_path / "erased.safetensors")
    loaded = load_pipeline(str(path), model_config=str(tiny_dir))
    probe = unet_probe(tiny_pipe.unet)
    assert torch.equal(unet_out(loaded.unet, probe), unet_out(trained.unet, probe))
    ids = tiny_pipe.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(loaded.text_encoder(ids)[0], tiny_pipe.text_encoder(ids)[0])
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.vae.encode(x).latent_dist.mean, tiny_pipe.vae.encode(x).latent_dist.mean)


def test_an_sd2_shaped_pipeline_round_trips_through_the_open_clip_layout(tmp_path):
    """SD 2.x keeps its OpenCLIP text encoder as cond_stage_model.model.* with q, k, v fused: written so,
    and read back by diffusers' from_single_file into the same weights."""
    from safetensors.torch import save_file

    from concept_erase.io.loading import load_pipeline
    from concept_erase.io.single_file import pipeline_to_ldm
    from concept_erase.io.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(3, prediction_type="v_prediction", open_clip=True)
    pipe.save_pretrained(str(tmp_path / "sd2"))
    tensors = pipeline_to_ldm(pipe)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in tensors
    assert not any(k.startswith("cond_stage_model.transformer.") for k in tensors)
    save_file(tensors, str(tmp_path / "sd2.safetensors"))
    loaded = load_pipeline(str(tmp_path / "sd2.safetensors"), model_config=str(tmp_path / "sd2"))
    ids = pipe.tokenizer(["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(loaded.text_encoder(ids)[0], pipe.text_encoder(ids)[0])
    probe = unet_probe(pipe.unet)
    assert torch.equal(unet_out(loaded.unet, probe), unet_out(pipe.unet, probe))
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def test_erase_from_a_single_file_model(tiny_pipe, tiny_dir, tmp_path, make_config):
    from safetensors.torch import save_file

    from concept_erase.io.single_file import pipeline_to_ldm

    single = tmp_path / "base.safetensors"
    save_file(pipeline_to_ldm(tiny_pipe), str(single))
    cfg = make_config(model=str(single), model_config=str(tiny_dir), steps=2, method="fixed")
    path = erase(cfg)
    _, meta = read_delta(path)
    apply(copy.deepcopy(tiny_pipe), path)  # same base weights: the digest matches the folder's model
    assert meta["base_model"] == str(single)


def test_single_file_offline_without_configs_says_what_to_pass(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    from concept_erase.io.loading import load_pipeline
    from concept_erase.io.single_file import pipeline_to_ldm

    single = tmp_path / "base.safetensors"
    save_file(pipeline_to_ldm(tiny_pipe), str(single))
    with pytest.raises(UserError, match="--model-config"):
        load_pipeline(str(single))


def test_pickled_ckpt_loads_only_when_allowed(tiny_pipe, tiny_dir, tmp_path):
    from concept_erase.io.loading import load_pipeline
    from concept_erase.io.single_file import pipeline_to_ldm

    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(tiny_pipe)}, ckpt)
    with pytest.raises(UserError, match="--allow-pickle"):
        load_pipeline(str(ckpt), model_config=str(tiny_dir))
    loaded = load_pipeline(str(ckpt), model_config=str(tiny_dir), allow_pickle=True)
    probe = unet_probe(tiny_pipe.unet)
    assert torch.equal(unet_out(loaded.unet, probe), unet_out(tiny_pipe.unet, probe))
