"""The SDXL family on a tiny SDXL pipeline built from configs (two CLIP text encoders, the second with a
projection; a UNet with text-time conditioning): every method, the subsets, the original model's
predictions, the exports read back by diffusers' own SDXL readers, bf16 from a cold cache."""

import copy

import pytest
import torch

from concept_erase.training.trainer import Trainer, erase

from helpers import assert_only_adapter_trained, assert_original_is_the_frozen_copy, changed, metrics, snapshot


@pytest.fixture(scope="module")
def xl_pipe():
    from concept_erase.io.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline()


@pytest.fixture()
def xl(xl_pipe):
    return copy.deepcopy(xl_pipe)


@pytest.fixture(scope="module")
def xl_dir(xl_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-xl") / "pipe"
    xl_pipe.save_pretrained(str(path))
    return path


@pytest.fixture()
def xl_config(make_config, xl_dir):
    def make(**overrides):
        return make_config(**{"model": str(xl_dir), **overrides})
    return make


def _subset(pipe, subset):
    from concept_erase.families.sdxl import StableDiffusionXL
    from concept_erase.training.subsets import select_trainable

    return set(select_trainable(copy.deepcopy(pipe.unet), subset, StableDiffusionXL()))


def test_the_family_is_found_and_encodes_two_encoders_pooled_and_time_ids(xl):
    from concept_erase.families.base import family_of

    family = family_of(xl)
    assert family.name == "sdxl"
    cond = family.encode(xl, ["a cat", ""], "cpu", 32)
    c = cond.tensors
    # the penultimate hidden states of both encoders, concatenated: 32 + 48 wide; the pooled one from the second
    assert c["encoder_hidden_states"].shape == (2, 77, 80) and c["text_embeds"].shape == (2, 48)
    assert c["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    # what diffusers' pipeline itself encodes
    emb, _, pooled, _ = xl.encode_prompt(["a cat"], device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
    torch.testing.assert_close(c["encoder_hidden_states"][:1], emb.float())
    torch.testing.assert_close(c["text_embeds"][:1], pooled.float())
    # the empty prompt is zeros where the model forces them, as the pipeline's guidance uses
    assert xl.config.force_zeros_for_empty_prompt and not c["encoder_hidden_states"][1].any()


@pytest.mark.parametrize("method", ["eupmu", "eupmu-fast", "ungrad", "fixed", "esd"])
def test_each_method_trains_only_cross_attention(method, xl, xl_config):
    cfg = xl_config(method=method, lambda_init=0.5)
    before = {n: snapshot(m) for n, m in (("unet", xl.unet), ("te", xl.text_encoder), ("te2", xl.text_encoder_2))}
    path = erase(cfg, pipe=xl)
    assert changed(before["unet"], xl.unet) == _subset(xl, "xattn")
    assert not changed(before["te"], xl.text_encoder) and not changed(before["te2"], xl.text_encoder_2)
    assert [r["step"] for r in metrics(cfg.output)] == [1, 2, 3] and path.is_file()


@pytest.mark.parametrize("subset", ["xattn-kv", "noxattn", "selfattn", "full"])
def test_subsets_change_exactly_what_they_name(subset, xl, xl_config):
    before = snapshot(xl.unet)
    erase(xl_config(method="fixed", train=subset, steps=2), pipe=xl)
    assert changed(before, xl.unet) == _subset(xl, subset)


def test_lora_trains_only_the_adapter(xl, xl_config):
    before = snapshot(xl.unet)
    Trainer(xl_config(method="eupmu", train="lora", steps=2), pipe=xl).run()
    assert_only_adapter_trained(before, xl.unet.state_dict(), {"to_q", "to_k", "to_v", "0"})  # "0": to_out.0


@pytest.mark.parametrize("train", ["xattn", "lora"])
def test_original_predictions_are_bit_exact_against_a_frozen_copy(train, xl, xl_config):
    trainer = Trainer(xl_config(method="fixed", train=train, steps=2, lr=1e-1), pipe=xl)
    assert_original_is_the_frozen_copy(trainer, copy.deepcopy(xl.unet), torch.tensor([10, 700]))


def test_exports_read_back_with_diffusers_sdxl_readers(xl_pipe, xl_config, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from concept_erase.export.delta import apply
    from concept_erase.export.formats import export_diffusers, export_lora

    cfg = xl_config(method="eupmu", steps=2, lr=1e-2)
    delta = erase(cfg)
    trained = StableDiffusionXLPipeline.from_pretrained(str(cfg.model))
    apply(trained, delta)
    folder = export_diffusers(delta, tmp_path / "pipe")
    loaded = StableDiffusionXLPipeline.from_pretrained(str(folder))
    for name, tensor in trained.unet.state_dict().items():
        assert torch.equal(tensor, loaded.unet.state_dict()[name]), name
    summary = export_lora(delta, tmp_path / "lora", rank=8)
    base = StableDiffusionXLPipeline.from_pretrained(str(cfg.model))
    base.load_lora_weights(str(tmp_path / "lora"), weight_name=summary["file"])  # diffusers' own SDXL reader
    assert summary["output_change_kept"] > 0.5
    # the default form is kohya's with SDXL's original-layout names, read whole where users load it
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "lora" / summary["file"]))
    assert summary["form"] == "kohya" and all(k.startswith("lora_unet_input_blocks_") or
                                              k.startswith(("lora_unet_middle_block_", "lora_unet_output_blocks_"))
                                              for k in keys)
    for program in ("ComfyUI", "A1111", "kohya sd-scripts", "diffusers"):
        r = summary["programs"][program]
        assert r["tensors"] == r["of"] and r["output_change_kept"] == summary["output_change_kept"], program


def test_bf16_from_a_cold_cache(xl, xl_config, cache_dir):
    assert not cache_dir.exists()
    cfg = xl_config(method="eupmu", steps=2, mixed_precision="bf16")
    erase(cfg, pipe=xl)
    rows = metrics(cfg.output)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss_forget"])) for r in rows)
    assert any(cache_dir.iterdir())  # the anchor latents were generated, not found


def test_a_pipeline_no_family_handles_is_named(tmp_path):
    import json

    from concept_erase.errors import UserError
    from concept_erase.io.loading import load_pipeline

    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="KandinskyPipeline, which no family.*StableDiffusionXLPipeline"):
        load_pipeline(str(folder))


def test_single_file_is_sgm_layout_read_back_by_from_single_file(xl_dir, xl_config, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from concept_erase.export.delta import apply
    from concept_erase.export.formats import export_single_file
    from concept_erase.io.loading import load_pipeline

    delta = erase(xl_config(method="eupmu", steps=2, lr=1e-2))
    path = export_single_file(delta, tmp_path / "erased-xl.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert "conditioner.embedders.1.model.text_projection" in keys and "model.diffusion_model.label_emb.0.0.weight" in keys
    expected = StableDiffusionXLPipeline.from_pretrained(str(xl_dir))
    apply(expected, delta)
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(xl_dir))  # diffusers' own reader
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(expected, part).state_dict(), getattr(loaded, part).state_dict()
        for name, tensor in want.items():
            if not name.endswith("position_ids"):
                assert torch.equal(tensor, got[name]), f"{part}.{name}"
    # and the toolkit's own loader finds the family from the file's keys
    assert type(load_pipeline(str(path), model_config=str(xl_dir))).__name__ == "StableDiffusionXLPipeline"


def test_a_delta_is_refused_by_a_model_of_another_family(xl_config, tiny_dir):
    from diffusers import StableDiffusionPipeline

    from concept_erase.errors import UserError
    from concept_erase.export.delta import apply

    delta = erase(xl_config(method="eupmu", steps=1))
    sd = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    with pytest.raises(UserError, match="made for the sdxl family.*StableDiffusionPipeline"):
        apply(sd, delta)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing changed
@pytest.fixture()
def good_xl_run(xl_dir, cache_dir, tmp_path):
    from concept_erase.cli import main

    from test_cli import base_args

    run = tmp_path / "run"
    assert main(base_args(xl_dir, run, cache_dir)) == 0
    return run


def _refused(capsys, argv, message, run):
    from concept_erase.cli import main

    from test_bad_inputs import assert_refused
    from test_cli import tree

    before = tree(run)
    code = main(argv)
    assert_refused(code, capsys.readouterr().err, message, run, before)


def test_bad_family_inputs_leave_a_good_run_alone(good_xl_run, xl_dir, xl_pipe, cache_dir, tmp_path, capsys,
                                                  monkeypatch):
    import json

    from concept_erase.families.sdxl import StableDiffusionXL
    from concept_erase.export.formats import export_single_file

    from test_cli import base_args

    def argv(model, *extra):
        args = base_args(model, good_xl_run, cache_dir) + ["--overwrite", *extra]
        return args

    # a pipeline class no family handles: named, with those that are handled
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    _refused(capsys, argv(other), "KandinskyPipeline, which no family of concept-erase handles", good_xl_run)
    # an SDXL single file offline without its configs: says to pass --model-config
    single = export_single_file(good_xl_run, tmp_path / "xl.safetensors")
    _refused(capsys, argv(single), "--model-config", good_xl_run)
    # a --train subset the family lacks (SDXL has all of SD's: take one away to see the path)
    monkeypatch.setattr(StableDiffusionXL, "subsets",
                        {k: v for k, v in StableDiffusionXL.subsets.items() if k != "selfattn"})
    _refused(capsys, argv(xl_dir, "--train", "selfattn"), "--train selfattn: the sdxl family has no such subset",
             good_xl_run)


def test_sample_and_eval_run_on_sdxl_with_the_same_flags(good_xl_run, xl_dir, tmp_path):
    from PIL import Image

    from concept_erase.cli import main

    weights = str(good_xl_run / "erased.safetensors")
    assert main(["sample", "--model", str(xl_dir), "--weights", weights, "--prompt", "van gogh", "--prompt", "a photo",
                 "--seeds", "0-1", "--inference-steps", "2", "--output", str(tmp_path / "samples")]) == 0
    assert Image.open(tmp_path / "samples" / "p00-s0000.png").size == (32, 32)  # the tiny SDXL's native side
    w, h = Image.open(tmp_path / "samples" / "grid.png").size  # 2 prompts x 2 seeds, labelled, cells of 128 px
    assert w > 2 * 128 and h > 2 * 128
    (tmp_path / "prompts.csv").write_text("case_number,prompt,seed,concept\n0,van gogh,0,van gogh\n1,a photo,1,\n")
    (tmp_path / "suite.yaml").write_text(f"name: xl\nprompts: {tmp_path / 'prompts.csv'}\nseeds_per_prompt: 2\n"
                                         "steps: 2\nguidance: 4.0\nbatch_size: 4\nmetrics:\n  nudity: {}\n")
    assert main(["eval", "--model", str(xl_dir), "--weights", weights, "--suite", str(tmp_path / "suite.yaml"),
                 "--output", str(tmp_path / "eval"), "--no-progress", "--cache-dir", str(tmp_path / "evalcache")]) == 0
    results = __import__("json").loads((tmp_path / "eval" / "results.json").read_text())
    names = {m["metric"] for m in results["metrics"]} if isinstance(results["metrics"], list) else set(results["metrics"])
    assert "nudity" in names, results["metrics"]


def test_v_prediction_sdxl_trains_on_v_targets(make_config):
    from concept_erase.families.base import family_of
    from concept_erase.io.tiny import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(prediction_type="v_prediction")
    schedule = family_of(pipe).schedule(pipe)
    assert schedule.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((2, 4, 16, 16), generator=g), torch.randn((2, 4, 16, 16), generator=g)
    t = torch.tensor([10, 900])
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(schedule.noised(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    cfg = make_config(model="builtin:tiny-xl-v", method="eupmu", steps=2)
    erase(cfg)
    assert all(torch.isfinite(torch.tensor(r["loss_forget"])) for r in metrics(cfg.output))
