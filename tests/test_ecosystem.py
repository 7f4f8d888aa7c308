"""The tools people already use: trackers, model cards, LoRA forms, labelled pictures, run.json."""

import json
import re

import pytest

from concept_erase.cli import main


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {folder}"
    scalars, images = {}, {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["images"]:
            images.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    return scalars, images


def test_tensorboard_follows_a_run_with_its_samples(make_config, tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image

    from concept_erase.training.trainer import erase

    config = make_config(steps=3, report_to="tensorboard", sample_every=2, sample_prompts=["van gogh", "a photo"])
    erase(config)
    run = tmp_path / "run"
    scalars, images = _events(run / "logs")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_forget", "loss_retain", "lambda", "grad_norm", "step_time_s", "erasure_signal",
                "erasure_signal_avg"):
        logged = sorted(scalars[f"train/{key}"])
        assert [s for s, _ in logged] == [1, 2, 3], key
        assert [v for _, v in logged] == pytest.approx([m[key] for m in metrics], rel=1e-5), key
    assert any("slack" in tag for tag in scalars), sorted(scalars)
    # the samples: before training and at step 2 (3 is not a multiple of 2), each prompt its own picture
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000000.png", "step-000002.png"]
    assert len(images) == 2 and all(sorted(steps) == [0, 2] for steps in images.values()), images
    grid = Image.open(run / "samples" / "step-000002.png")
    assert grid.width >= 2 * 128  # two prompts, each cell at least 128 px
    # run.json says how, with what and where the run was made
    made = json.loads((run / "run.json").read_text())
    assert made["command"] and made["versions"]["torch"] and made["versions"]["diffusers"]
    assert made["started"] <= made["finished"] and "logical CPUs" in made["machine"]


@pytest.mark.parametrize("flags, message", [
    (["--report-to", "mlflowx"], "--report-to"),
    (["--sample-every", "5"], "--sample-prompt"),
    (["--sample-prompt", "a cat"], "--sample-every"),
    (["--sample-every", "5000", "--sample-prompt", "a cat", "--steps", "10"], "give --sample-every 10 or less"),
])
def test_tracker_flags_are_checked_at_the_door(flags, message, tmp_path, capsys):
    code = main(["erase", "--model", "builtin:tiny", "--concept", "a cat", "--anchor", "a dog",
                 "--output", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_missing_tracker_package_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard",
                                                                                      "tensorboardX") else real(name, *a))
    for tracker, package in (("wandb", "wandb"), ("tensorboard", "tensorboard"), ("all", "")):
        code = main(["erase", "--model", "builtin:tiny", "--concept", "a cat", "--anchor", "a dog",
                     "--output", str(tmp_path / "run"), "--report-to", tracker])
        err = capsys.readouterr().err
        assert code == 2 and "not installed" in err and package in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flag", [["--lora-format", "kohya"], ["--rank", "8"], ["--exact-svd"], ["--no-lora-bias"]])
@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_lora_settings_need_a_lora_export(fmt, flag, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    out = tmp_path / ("out.safetensors" if fmt == "single-file" else "out")
    code = main(["export", str(tmp_path / "run"), "--format", fmt, *flag, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag[0]} shapes a LoRA; add --format lora" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    from concept_erase.config import EraseConfig
    from concept_erase.training.trainer import erase

    out = tmp_path_factory.mktemp("runs") / "run"
    erase(EraseConfig(model=str(tiny_dir), concepts=["van gogh"], anchors=["a photo"], output=str(out), steps=2,
                      sampling_steps=4, anchor_inference_steps=2, anchor_images_per_prompt=1, progress=False,
                      cache_dir=str(tmp_path_factory.mktemp("cache")), checkpoint_every=0, lr=1e-2))
    return out


def _fake_eval(folder, weights):
    """What `concept-erase eval` leaves: results.json and grids/ (the card reads nothing else)."""
    from PIL import Image

    (folder / "grids").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(folder / "grids" / "forget.png")
    (folder / "results.json").write_text(json.dumps({
        "suite": "digits", "model": "m", "weights": str(weights),
        "summary": {"forget_accuracy": 0.125, "retain_accuracy": 0.97},
        "metrics": [{"metric": "judge", "group": "forget", "value": {"accuracy": 0.125, "images": 16},
                     "settings": {}}]}))
    return folder


def test_every_export_writes_a_hub_model_card(tiny_run, tmp_path, capsys):
    from huggingface_hub import ModelCard

    evaluation = _fake_eval(tmp_path / "eval", tiny_run / "erased.safetensors")
    assert main(["export", str(tiny_run), "--format", "diffusers", "--output", str(tmp_path / "pipe"),
                 "--eval", str(evaluation)]) == 0
    card = ModelCard.load(tmp_path / "pipe" / "README.md")
    assert card.data.library_name == "diffusers" and "concept-erasure" in card.data.tags
    assert card.data.base_model is None  # a local base is no Hub id: named in the text instead
    assert "van gogh" in card.text and "eupmu" in card.text and "xattn" in card.text
    assert "| prompt variants (each concept and anchor also drawn inside) | none: the bare prompts only |" in card.text
    assert "| forget_accuracy | 0.125 |" in card.text and "(eval/forget.png)" in card.text
    assert (tmp_path / "pipe" / "eval" / "forget.png").is_file()
    assert "warning" not in capsys.readouterr().err  # the evaluation is of these weights
    # a single file gets its card beside it; an evaluation of other weights is said
    other = _fake_eval(tmp_path / "eval2", tmp_path / "other.safetensors")
    assert main(["export", str(tiny_run), "--format", "single-file", "--output", str(tmp_path / "erased.safetensors"),
                 "--eval", str(other)]) == 0
    assert "warning" in capsys.readouterr().err
    text = (tmp_path / "erased.md").read_text()
    assert text.startswith("---\n") and "from_single_file(\"erased.safetensors\")" in text


def test_a_lora_export_says_what_each_program_applies_and_how_to_keep_it_all(tiny_run, tmp_path, capsys):
    """The default LoRA of an SD run: kohya's form, one line per program with the share of the erasure it
    applies, the way to the whole erasure where a share is under 99%, and the same table in the model card."""
    assert main(["export", str(tiny_run), "--format", "lora", "--rank", "1", "--output", str(tmp_path / "lora")]) == 0
    out = capsys.readouterr().out
    assert "kohya form written to" in out and "erased_lora_kohya.safetensors" in out and "models/loras" in out
    for program in ("ComfyUI", "A1111", "kohya sd-scripts", "diffusers"):
        assert re.search(rf"^  {program}: \d+\.\d% \(\d+ of \d+ tensors read\)$", out, re.M), (program, out)
    assert "raise --rank" in out and "--format single-file" in out and "--train lora" in out  # rank 1 loses some
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "## Where it loads" in card and "| ComfyUI | `models/loras` |" in card
    # a rank no trained matrix has: one line, exit 2, nothing written
    code = main(["export", str(tiny_run), "--format", "lora", "--rank", "4096", "--output", str(tmp_path / "big")])
    err = capsys.readouterr().err
    assert code == 2 and "--rank 4096 is more than" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "big").exists()


def test_card_front_matter_names_a_hub_base_and_its_licence():
    from concept_erase.export.model_card import base_license, card_text

    meta = {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "family": "sdxl", "concepts": '["a cat"]',
            "anchors": '["a dog"]', "method": "eupmu", "train": "xattn", "steps": "400", "lambda_final": "0.5",
            "base_model_digest": "ab" * 32, "settings": "{}"}
    text = card_text(meta, fmt="lora", weight_name="x.safetensors")
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0" in text and "license: openrail++" in text
    assert base_license("someone/unknown-model") is None and base_license("builtin:digits") == "apache-2.0"
    # a FLUX single file is the transformer alone: the card loads it with the base's other parts, and says where
    flux = card_text({**meta, "family": "flux", "base_model": "black-forest-labs/FLUX.1-dev"}, fmt="single-file",
                     weight_name="flux1-erased.safetensors")
    assert 'FluxTransformer2DModel.from_single_file("flux1-erased.safetensors"' in flux
    assert "FluxPipeline.from_pretrained(\"black-forest-labs/FLUX.1-dev\", transformer=transformer)" in flux
    assert "models/unet" in flux


def test_push_to_hub_without_network_or_token_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    args = ["export", str(tiny_run), "--format", "lora", "--output", str(tmp_path / "lora"), "--push-to-hub", "me/x"]
    assert main(args) == 2  # the tests run offline (HF_HUB_OFFLINE=1)
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "lora").exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no Hub token" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "lora").exists()
    # with a token but no network: the export is kept and the message says how to upload it later
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")

    def unreachable(*a, **k):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "upload failed" in err and "hf upload me/x" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "lora" / "README.md").is_file()


def test_grids_carry_their_labels():
    """A labelled grid has its text where the labels go (dark pixels in the head and label bands) and the images
    scaled up to be seen; without labels those bands do not exist."""
    import numpy as np
    from PIL import Image

    from concept_erase.evaluation.grids import labelled_grid

    cell = [[Image.new("RGB", (32, 32), (200, 200, 255))] * 2] * 2
    bare = labelled_grid(cell)
    grid = labelled_grid(cell, column_heads=["before", "after"], row_labels=["a cat", "a dog"], title="erased: cat")
    assert bare.size[0] >= 2 * 128 and grid.size[0] > bare.size[0] and grid.size[1] > bare.size[1]
    pixels = np.asarray(grid.convert("L"))
    label_w = grid.size[0] - bare.size[0]
    head_h = grid.size[1] - bare.size[1]
    assert (pixels[:head_h] < 100).any(), "no text above the images"
    assert (pixels[head_h:, :label_w] < 100).any(), "no text left of the images"
    assert not (np.asarray(bare.convert("L")) < 100).any()


def test_help_names_every_metric_and_shows_no_internal_object(capsys):
    import re

    from concept_erase.cli import COMMANDS
    from concept_erase.evaluation.suite import METRIC_OPTIONS

    for command in COMMANDS:
        with pytest.raises(SystemExit) as stop:
            main([command, "--help"])
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert not re.search(r"object at 0x|<[\w.]+ object|_MISSING", text), (command, text)
        if command == "eval":
            metrics = text[text.index("metrics ("):]
            assert all(re.search(rf"^  {name}\s", metrics, flags=re.M) for name in METRIC_OPTIONS), metrics
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and re.match(r"concept-erase \S+", capsys.readouterr().out)


def test_the_command_line_is_recorded_as_a_shell_takes_it_back(monkeypatch):
    import shlex
    import sys

    from concept_erase import provenance

    monkeypatch.setattr(sys, "argv", ["/venv/bin/concept-erase", "erase", "--concept", "van gogh", "--output", "it's"])
    line = provenance.command_line()
    assert line.startswith("concept-erase erase") and shlex.split(line)[3:] == ["van gogh", "--output", "it's"]


def test_compare_names_what_differs_between_evaluations():
    from concept_erase.evaluation.report import differences

    def made(**changes):
        g = {"prompts_file": "/x/digits.csv", "prompts": 50, "seeds_per_prompt": 8, "steps": 25, "guidance": 4.0}
        return {"suite": changes.pop("suite", "digits"), "generation": {**g, **changes}}

    assert differences([made(), made()]) == []
    said = differences([made(), made(steps=50, negative_prompt="blurry"), made(suite="coco")])
    assert said == ["suite: 'digits' / 'coco'", "sampler steps: 25 / 50", "negative prompt: '' / 'blurry'"]


def test_too_few_images_are_flagged():
    from concept_erase.evaluation.metrics import too_few

    assert "too few for an FID" in too_few("fid", 10) and too_few("fid", 10000) == ""
    assert "too few for a rate" in too_few("judge", 8) and too_few("judge", 400) == ""
    assert too_few("fid", None) == ""


@pytest.mark.parametrize("meta,offered", [({}, True), ({"edit": "closed-form"}, False), ({"chain": "[]"}, False)])
def test_a_lora_that_holds_less_than_the_erasure_offers_only_ways_that_work_for_its_run(meta, offered, capsys):
    """An edit cannot be retrained with --train lora, nor a chain continued as one: the hint leaves it out there."""
    import types

    from concept_erase.cli import _say_lora
    from concept_erase.families.base import FAMILIES

    summary = {"form": "kohya", "file": "x.safetensors", "rank": 16, "max_relative_error": 0.2,
               "programs": {"A1111": {"output_change_kept": 0.5, "tensors": 3, "of": 4}}}
    _say_lora(types.SimpleNamespace(output="out"), summary, FAMILIES.get("sd"), meta)
    out = capsys.readouterr().out
    assert "the whole erasure: export" in out and ("--train lora" in out) == offered, out
