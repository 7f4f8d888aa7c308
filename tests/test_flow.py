"""The flow-matching transformer families, FLUX.1 and SD3, on tiny pipelines built from configs (CLIP and T5
encoders from configs, the CLIP BPE tokenizer for both): the encoding and the trajectories against the
pipelines' own, every method, the subsets, the original model's predictions, the exports read back by
diffusers' FLUX and SD3 readers, bf16, sample and eval, and the bad inputs of these families."""

import copy
import json

import pytest
import torch

from concept_erase.training.trainer import Trainer, erase

from helpers import assert_only_adapter_trained, assert_original_is_the_frozen_copy, changed, metrics, snapshot

FAMILIES = ["flux", "sd3"]
PIPELINES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}


def _build(name, **kwargs):
    from concept_erase.io.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    return (build_tiny_flux_pipeline if name == "flux" else build_tiny_sd3_pipeline)(**kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def flow_pipe(request):
    return _build(request.param)


@pytest.fixture()
def flow(flow_pipe):
    return copy.deepcopy(flow_pipe)


@pytest.fixture(scope="module")
def flow_dir(flow_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flow") / "pipe"
    flow_pipe.save_pretrained(str(path))
    return path


@pytest.fixture()
def flow_config(make_config, flow_dir):
    def make(**overrides):
        return make_config(**{"model": str(flow_dir), **overrides})
    return make


def _family(pipe):
    from concept_erase.families.base import family_of

    return family_of(pipe)


def family_name(pipe) -> str:
    return _family(pipe).name


def _subset(pipe, subset):
    from concept_erase.training.subsets import select_trainable

    return set(select_trainable(copy.deepcopy(pipe.transformer), subset, _family(pipe)))


def test_the_family_is_found_and_encodes_as_the_pipeline_does(flow):
    family = _family(flow)
    cond = family.encode(flow, ["a cat", ""], "cpu", 32)
    c = cond.tensors
    if family.name == "flux":
        emb, pooled, _ = flow.encode_prompt(["a cat", ""], prompt_2=None, device="cpu", max_sequence_length=77)
        # T5's tokens (its tokenizer here reads 77) and CLIP's pooled embedding
        assert c["encoder_hidden_states"].shape == (2, 77, 48) and c["pooled_projections"].shape == (2, 32)
        # FLUX.1-dev's guidance input, the unconditional prompt's too: the pipeline's default 3.5
        assert c["guidance"].tolist() == [3.5, 3.5]
    else:
        emb, _, pooled, _ = flow.encode_prompt(["a cat", ""], None, None, device="cpu",
                                               do_classifier_free_guidance=False, max_sequence_length=77)
        # two CLIPs (32 + 48) padded to T5's 80, then T5's tokens (its tokenizer reads 77) after CLIP's 77;
        # the pooled embedding is both CLIPs' projections, 32 + 48
        assert c["encoder_hidden_states"].shape == (2, 77 + 77, 80) and c["pooled_projections"].shape == (2, 80)
        assert set(c) == {"encoder_hidden_states", "pooled_projections"}
    torch.testing.assert_close(c["encoder_hidden_states"], emb.float())
    torch.testing.assert_close(c["pooled_projections"], pooled.float())


def test_flow_matching_noising_target_and_timesteps(flow):
    family = _family(flow)
    schedule = family.schedule(flow)
    assert schedule.prediction_type == "flow"
    g = torch.Generator().manual_seed(0)
    shape = (3, *family.latent_shape(flow, 32))
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([1000.0, 500.0, 20.0])
    s = (t / 1000).view(-1, *[1] * (x0.dim() - 1))
    torch.testing.assert_close(schedule.noised(x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(schedule.target(x0, noise, t), noise - x0)
    # timesteps as diffusers' SD3/FLUX training scripts draw them: logit-normal u, an entry of the schedule
    draws = schedule.sample_timesteps(4000, torch.Generator().manual_seed(1))
    assert set(draws.tolist()) <= set(schedule.timesteps.tolist())
    assert 0.4 < float((draws / 1000).median()) < 0.8 and float((draws < 100).float().mean()) < 0.05


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_the_trajectory_sampler_walks_the_pipelines_own_path(flow, guidance):
    """Euler steps through `family.guided` and `family.sampler` land where the pipeline's own sampling does."""
    from concept_erase.families.base import Cond

    family, model = _family(flow), flow.transformer
    steps, res = 5, 32
    sampler = family.sampler(flow, steps, res)
    noise = family.initial_noise(flow, [7], res)
    want = flow("a red bird", latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", **family.generation_kwargs(flow, res)).images
    cond, uncond = family.encode(flow, ["a red bird"], "cpu", res), family.encode(flow, [""], "cpu", res)

    def predict(x, t, c: Cond):
        return family.predict(model, x, t, c)

    x = noise.clone()
    with torch.no_grad():
        for i in range(steps):
            x = sampler.step(family.guided(predict, x, sampler.timesteps[i].repeat(1), cond, uncond, guidance), i, x)
    torch.testing.assert_close(x, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["eupmu", "eupmu-fast", "ungrad", "fixed", "esd"])
def test_each_method_trains_only_the_text_attention(method, flow, flow_config):
    cfg = flow_config(method=method, lambda_init=0.5)
    encoders = [e for e in (flow.text_encoder, flow.text_encoder_2, getattr(flow, "text_encoder_3", None)) if e]
    before, before_te = snapshot(flow.transformer), [snapshot(e) for e in encoders]
    path = erase(cfg, pipe=flow)
    assert changed(before, flow.transformer) == _subset(flow, "xattn")
    assert all(n.startswith("transformer_blocks.") and any(k in n for k in ("add_q_proj", "add_k_proj", "add_v_proj",
                                                                            "to_add_out"))
               for n in _subset(flow, "xattn"))
    assert not any(changed(b, e) for b, e in zip(before_te, encoders))
    assert [r["step"] for r in metrics(cfg.output)] == [1, 2, 3] and path.is_file()


@pytest.mark.parametrize("subset", ["xattn-kv", "noxattn", "full"])
def test_subsets_change_exactly_what_they_name(subset, flow, flow_config):
    before = snapshot(flow.transformer)
    erase(flow_config(method="fixed", train=subset, steps=2), pipe=flow)
    assert changed(before, flow.transformer) == _subset(flow, subset)


def test_the_remap_forget_loss_runs_on_flow_matching(flow, flow_config):
    cfg = flow_config(method="eupmu", forget_loss="remap", remap_to=["a photo"], steps=2)
    erase(cfg, pipe=flow)
    assert all(torch.isfinite(torch.tensor(r["loss_forget"])) for r in metrics(cfg.output))


def test_lora_trains_only_the_adapter_on_the_text_projections(flow, flow_config):
    before = snapshot(flow.transformer)
    Trainer(flow_config(method="eupmu", train="lora", steps=2), pipe=flow).run()
    assert_only_adapter_trained(before, flow.transformer.state_dict(),
                                {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"})


@pytest.mark.parametrize("train", ["xattn", "lora"])
def test_original_predictions_are_bit_exact_against_a_frozen_copy(train, flow, flow_config):
    trainer = Trainer(flow_config(method="fixed", train=train, steps=2, lr=1e-1), pipe=flow)
    assert_original_is_the_frozen_copy(trainer, copy.deepcopy(flow.transformer), torch.tensor([10.0, 700.0]))


def test_exports_read_back_with_diffusers_readers(flow_pipe, flow_config, tmp_path):
    import diffusers

    from concept_erase.errors import UserError
    from concept_erase.export.delta import apply
    from concept_erase.export.formats import export_diffusers, export_lora, export_single_file

    pipeline_class = getattr(diffusers, PIPELINES[_family(flow_pipe).name])
    cfg = flow_config(method="eupmu", steps=2, lr=1e-2)
    delta = erase(cfg)
    trained = pipeline_class.from_pretrained(str(cfg.model))
    apply(trained, delta)
    folder = export_diffusers(delta, tmp_path / "pipe")
    loaded = pipeline_class.from_pretrained(str(folder))  # diffusers' own reader
    for name, tensor in trained.transformer.state_dict().items():
        assert torch.equal(tensor, loaded.transformer.state_dict()[name]), name
    summary = export_lora(delta, tmp_path / "lora", rank=8)
    base = pipeline_class.from_pretrained(str(cfg.model))
    base.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own FLUX / SD3 LoRA reader
    assert any("lora" in n for n in base.transformer.state_dict())
    assert summary["output_change_kept"] > 0.9 and summary["form"] == "diffusers"
    # ComfyUI applies the weights but not the biases (lora_B.bias): measured on what it reads, and lower
    comfy = summary["programs"]["ComfyUI"]
    assert comfy["tensors"] < comfy["of"] and comfy["output_change_kept"] < summary["output_change_kept"]
    assert set(summary["programs"]) == {"ComfyUI", "diffusers"}  # A1111 and kohya's SD scripts run no SD3 / FLUX
    # kohya's form is SD's and SDXL's: refused in one line, nothing written
    with pytest.raises(UserError, match="lora-format kohya is written for SD"):
        export_lora(delta, tmp_path / "kohya", rank=8, lora_format="kohya")
    assert not (tmp_path / "kohya").exists()
    # the transformer alone in its publisher's layout: SD3's read back by diffusers' reader, equal; the tiny FLUX is
    # not FLUX.1's width, which diffusers' reader of BFL files assumes: refused in one line, nothing written
    if family_name(flow_pipe) == "sd3":
        path = export_single_file(delta, tmp_path / "one.safetensors")
        back = diffusers.SD3Transformer2DModel.from_single_file(str(path), config=str(cfg.model), subfolder="transformer")
        for name, tensor in trained.transformer.state_dict().items():
            assert torch.equal(tensor, back.state_dict()[name]), name
    else:
        with pytest.raises(UserError, match="FLUX.1's width"):
            export_single_file(delta, tmp_path / "one.safetensors")
        assert not (tmp_path / "one.safetensors").exists()
    if family_name(flow_pipe) != "flux":  # the LoRA run's export: on FLUX, where LoRA is the recommended subset
        return
    # a LoRA run's adapter, written as it is
    lora_run = erase(flow_config(method="eupmu", train="lora", steps=2, output=str(tmp_path / "lora-run")))
    export_lora(lora_run, tmp_path / "lora2")
    pipeline_class.from_pretrained(str(cfg.model)).load_lora_weights(str(tmp_path / "lora2"))


def test_flux1_single_file_layout_round_trips_through_diffusers_reader_at_full_size():
    """FLUX.1-dev's whole transformer (19 + 38 blocks, on the meta device): every weight in Black Forest Labs' layout
    comes back from diffusers' own reader under its name and shape, and the file holds nothing else."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from concept_erase.io.single_file import FLUX_LAYOUT, transformer_to_original

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    state = model.state_dict()
    bfl = transformer_to_original(state, FLUX_LAYOUT, "FLUX")
    assert "double_blocks.18.img_attn.qkv.weight" in bfl and "single_blocks.37.linear1.weight" in bfl
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)


@pytest.mark.slow  # about 30 s: the file is 1 GB (FLUX.1's width); run with --runslow
def test_a_flux1_width_single_file_is_read_back_by_flux_pipeline_with_only_the_trained_tensors_changed(tmp_path):
    """Black Forest Labs' layout at FLUX.1's width (one block of each kind, bf16, random weights): the export of an
    erasure, read by `FluxPipeline.from_single_file` with the base's other parts, differs from the base exactly in
    the trained tensors, and equals the erased transformer."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import load_file

    from concept_erase.config import EraseConfig
    from concept_erase.families.base import family_of
    from concept_erase.export.delta import base_fingerprint, save_delta
    from concept_erase.export.formats import export_single_file
    from concept_erase.io.digests import tensor_digest

    with torch.device("meta"):
        wide = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    wide = wide.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in wide.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.bfloat16))
    pipe = _build("flux")
    pipe.register_modules(transformer=wide)
    pipe.save_pretrained(str(tmp_path / "base"))
    family = family_of(pipe)
    names = family.subset_names(wide, "xattn")
    digest = tensor_digest(wide.state_dict())
    trained = {n: p for n, p in wide.named_parameters() if n in names}
    fingerprint = base_fingerprint(wide, trained, lora=False, digest=digest)
    original = {k: v.clone() for k, v in wide.state_dict().items()}
    with torch.no_grad():
        for p in trained.values():
            p.add_(0.5)
    config = EraseConfig(model=str(tmp_path / "base"), concepts=["a cat"], anchors=["a dog"],
                         output=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    save_delta(tmp_path / "run" / "erased.safetensors", wide, trained, config=config, fingerprint=fingerprint, steps=1,
               lambda_final=1.0, family=family)
    path = export_single_file(tmp_path / "run", tmp_path / "flux1-erased.safetensors")
    assert "double_blocks.0.txt_attn.qkv.weight" in load_file(str(path))  # BFL's fused layout
    parts = {k: v for k, v in pipe.components.items() if k != "transformer"}  # the base's other parts
    read = FluxPipeline.from_single_file(str(path), config=str(tmp_path / "base"), torch_dtype=torch.bfloat16, **parts)
    erased = read.transformer.state_dict()
    assert {k for k in erased if not torch.equal(erased[k], original[k])} == names
    assert all(torch.equal(erased[k], wide.state_dict()[k]) for k in erased)


def test_bf16_from_a_cold_cache(flow, flow_config, cache_dir):
    assert not cache_dir.exists()
    cfg = flow_config(method="eupmu", steps=2, mixed_precision="bf16")
    erase(cfg, pipe=flow)
    rows = metrics(cfg.output)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss_forget"])) for r in rows)
    assert any(cache_dir.iterdir())  # the anchor latents were generated, not found


def test_flux_schnell_form_without_a_guidance_input_trains(make_config):
    pipe = _build("flux", guidance_embeds=False)
    cond = _family(pipe).encode(pipe, ["a cat"], "cpu", 32)
    assert "guidance" not in cond.tensors
    cfg = make_config(model="builtin:tiny-flux", method="eupmu", steps=2)
    erase(cfg, pipe=pipe)
    assert len(metrics(cfg.output)) == 2


def test_sample_and_eval_run_with_the_same_flags(flow_dir, flow_config, tmp_path):
    from PIL import Image

    from concept_erase.cli import main

    weights = str(erase(flow_config(method="eupmu", steps=1)))
    assert main(["sample", "--model", str(flow_dir), "--weights", weights, "--prompt", "van gogh", "--prompt", "a photo",
                 "--seeds", "0-1", "--inference-steps", "2", "--output", str(tmp_path / "samples")]) == 0
    assert Image.open(tmp_path / "samples" / "p00-s0000.png").size == (32, 32)  # the tiny models' native side
    (tmp_path / "prompts.csv").write_text("case_number,prompt,seed,concept\n0,van gogh,0,van gogh\n1,a photo,1,\n")
    (tmp_path / "suite.yaml").write_text(f"name: flow\nprompts: {tmp_path / 'prompts.csv'}\nseeds_per_prompt: 2\n"
                                         "steps: 2\nguidance: 4.0\nbatch_size: 4\nmetrics:\n  nudity: {}\n")
    assert main(["eval", "--model", str(flow_dir), "--weights", weights, "--suite", str(tmp_path / "suite.yaml"),
                 "--output", str(tmp_path / "eval"), "--no-progress", "--cache-dir", str(tmp_path / "evalcache")]) == 0
    results = __import__("json").loads((tmp_path / "eval" / "results.json").read_text())
    names = {m["metric"] for m in results["metrics"]} if isinstance(results["metrics"], list) else set(results["metrics"])
    assert "nudity" in names, results["metrics"]


def test_a_delta_is_refused_by_a_model_of_another_family(flow_config, tiny_dir):
    from diffusers import StableDiffusionPipeline

    from concept_erase.errors import UserError
    from concept_erase.export.delta import apply

    delta = erase(flow_config(method="eupmu", steps=1))
    with pytest.raises(UserError, match=r"made for the (flux|sd3) family.*StableDiffusionPipeline"):
        apply(StableDiffusionPipeline.from_pretrained(str(tiny_dir)), delta)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing changed
@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-dirs")
    _build("flux").save_pretrained(str(root / "flux"))
    _build("flux", t5=False).save_pretrained(str(root / "flux-no-t5"))
    return root


def test_bad_flux_inputs_leave_a_good_run_alone(flux_dirs, cache_dir, tmp_path, capsys):
    from concept_erase.cli import main

    from test_bad_inputs import assert_refused
    from test_cli import base_args, tree

    run = tmp_path / "run"
    assert main(base_args(flux_dirs / "flux", run, cache_dir)) == 0
    capsys.readouterr()

    def refused(model, message, *extra):
        before = tree(run)
        code = main(base_args(model, run, cache_dir) + ["--overwrite", *extra])
        assert_refused(code, capsys.readouterr().err, message, run, before)

    refused(flux_dirs / "flux-no-t5", "has no T5 text encoder (text_encoder_2)")
    refused(flux_dirs / "flux", "FLUX's activations overflow in fp16", "--mixed-precision", "fp16")
    refused(flux_dirs / "flux", "--train selfattn: the flux family has no such subset", "--train", "selfattn")
    # and a single file diffusers could not read back (BFL's layout at a width other than FLUX.1's)
    before = tree(tmp_path)
    code = main(["export", str(run), "--format", "single-file", "--output", str(tmp_path / "x.safetensors")])
    assert_refused(code, capsys.readouterr().err, "read by diffusers only at FLUX.1's width", tmp_path, before)


def test_a_negative_prompt_on_flux_is_refused_since_it_would_change_nothing(flux_dirs, tmp_path, capsys):
    from concept_erase.cli import main

    code = main(["sample", "--model", str(flux_dirs / "flux"), "--prompt", "a cat", "--negative-prompt", "blurry",
                 "--seeds", "0", "--inference-steps", "2", "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "changes nothing" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_t5_reads_the_pipelines_default_length_unless_its_tokenizer_says_less(flow):
    family = _family(flow)
    tokenizer = flow.tokenizer_2 if family.name == "flux" else flow.tokenizer_3
    default = 512 if family.name == "flux" else 256
    assert family.t5_length(flow) == 77  # the tiny models' T5 reads with the CLIP tokenizer (77)
    tokenizer.model_max_length = 4096  # a real T5 tokenizer's own limit is above the pipeline's
    assert family.t5_length(flow) == default
    assert family.generation_kwargs(flow, 32)["max_sequence_length"] == default


def test_the_flow_digits_builder_makes_an_sd3_pipeline_the_family_reads_with_32_text_tokens():
    """scripts/build_digits_flow_model.py's untrained pipeline: SD3's structure, the embedded model's VAE,
    T5 and both CLIPs reading 16 tokens (the text sequence the family encodes and the pipeline samples)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import build_digits_flow_model as build

    pipe = build.build_pipeline()
    family = _family(pipe)
    assert family.name == "sd3" and family.t5_length(pipe) == 16
    cond = family.encode(pipe, ["a handwritten digit seven in white on black"], "cpu", 32)
    assert cond.tensors["encoder_hidden_states"].shape == (1, 32, 32)
    assert family.native_resolution(pipe) == 32 and family.latent_shape(pipe, 32) == (4, 8, 8)


def test_a_missing_embedded_model_names_the_script_that_builds_it(monkeypatch, tmp_path, capsys):
    import dataclasses

    from concept_erase.cli import main
    from concept_erase.embedded import EMBEDDED

    moved = dataclasses.replace(EMBEDDED.get("digits-flow"), folder=tmp_path / "model-not-here")
    monkeypatch.setitem(EMBEDDED._items, "digits-flow", moved)
    code = main(["demo", "--model", "builtin:digits-flow", "--output", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == 2 and "python scripts/build_digits_flow_model.py" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("recipe,model", [("flux-style-vangogh.yaml", "builtin:tiny-flux"),
                                          ("sd3-style-vangogh.yaml", "builtin:tiny-sd3")])
def test_the_shipped_flux_and_sd3_recipes_run_on_tiny_models(recipe, model, tmp_path):
    """The recipes as shipped (LoRA with gradient checkpointing for FLUX, xattn for SD3, bf16), only their
    lengths cut and the model swapped for a tiny one of the same family."""
    from pathlib import Path

    from concept_erase.config import build_config, load_yaml

    path = Path(__file__).resolve().parents[1] / "pipelines" / recipe
    cuts = {"model": model, "resolution": 32, "steps": 1, "sampling_steps": 2, "anchor_inference_steps": 2,
            "anchor_images_per_prompt": 1, "output": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
            "progress": False, "checkpoint_every": 0, "check_every": 1}
    cfg = build_config(load_yaml(path), cuts, source=str(path))
    assert cfg.mixed_precision == "bf16" and cfg.train in ("lora", "xattn") and cfg.stop_when_erased
    erase(cfg)
    assert len(metrics(cfg.output)) == 1


def test_the_shipped_flux_chain_of_two_lora_requests_runs_and_writes_one_lora_that_applies(tmp_path):
    """flux-style-vangogh.yaml then flux-then-picasso.yaml, as shipped (LoRA, bf16, gradient checkpointing), lengths
    cut and the model swapped for a tiny FLUX: the second continues the first, and its delta is one LoRA of the
    summed rank that applies to the base as both requests together."""
    from pathlib import Path

    from concept_erase.config import build_config, load_yaml
    from concept_erase.export.delta import apply, read_delta
    from concept_erase.io.loading import load_pipeline

    root = Path(__file__).resolve().parents[1] / "pipelines"
    cuts = {"model": "builtin:tiny-flux", "resolution": 32, "steps": 1, "sampling_steps": 2,
            "anchor_inference_steps": 2, "anchor_images_per_prompt": 1, "cache_dir": str(tmp_path / "cache"),
            "progress": False, "checkpoint_every": 0, "check_every": 1}
    first = build_config(load_yaml(root / "flux-style-vangogh.yaml"), {**cuts, "output": str(tmp_path / "first")},
                         source="flux-style-vangogh.yaml")
    erase(first)
    second = build_config(load_yaml(root / "flux-then-picasso.yaml"),
                          {**cuts, "output": str(tmp_path / "second"), "weights": str(tmp_path / "first")},
                          source="flux-then-picasso.yaml")
    assert second.train == "lora" and second.mixed_precision == "bf16"
    erase(second)
    tensors, meta = read_delta(tmp_path / "second")
    assert meta["kind"] == "lora" and json.loads(meta["lora"])["r"] == first.lora_rank + second.lora_rank
    assert [r["concepts"][0] for r in json.loads(meta["chain"])] == ["Van Gogh", "Pablo Picasso"]
    pipe = apply(load_pipeline("builtin:tiny-flux"), tmp_path / "second")
    assert not any("lora" in n for n in pipe.transformer.state_dict())


def test_an_sd3_folder_saved_without_t5_loads_encodes_and_exports_a_card_whose_code_loads_it(tmp_path, make_config):
    """SD3 runs without T5 (the pipeline's zeros take T5's tokens), and a folder saved so has `[null, null]` for
    text_encoder_3 and tokenizer_3: diffusers' from_pretrained refuses it unless they are passed as None. The
    export's model card says so in its loading code, which runs as written."""
    import re

    from concept_erase.cli import main
    from concept_erase.io.loading import load_pipeline

    pipe = _build("sd3")
    pipe.register_modules(text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(tmp_path / "no-t5"))
    index = json.loads((tmp_path / "no-t5" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    back = load_pipeline(str(tmp_path / "no-t5"))
    assert back.text_encoder_3 is None and back.tokenizer_3 is None
    cond = _family(back).encode(back, ["a cat"], "cpu", 32)
    assert all(torch.isfinite(t).all() for t in cond.tensors.values())
    delta = erase(make_config(model=str(tmp_path / "no-t5"), steps=1))
    assert main(["export", str(delta.parent), "--format", "diffusers", "--output", str(tmp_path / "pipe")]) == 0
    folder = tmp_path / "pipe"
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    assert "text_encoder_3=None, tokenizer_3=None" in code and "feature_extractor" not in code
    scope: dict = {}
    exec(code.replace("<this repository>", str(folder)), scope)  # the card's code, as a reader runs it
    assert scope["pipe"].text_encoder_3 is None and scope["pipe"].transformer is not None
