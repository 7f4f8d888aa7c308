"""Issue 20: the tools people already use. Trackers, model cards, kohya LoRA, labelled pictures, run.json."""

import json

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
    for key in ("loss_forget", "loss_retain", "lambda", "grad_norm", "step_time_s"):
        logged = sorted(scalars[f"train/{key}"])
        assert [s for s, _ in logged] == [1, 2, 3], key
        assert [v for _, v in logged] == pytest.approx([m[key] for m in metrics], rel=1e-5), key
    assert any("slack" in tag for tag in scalars), sorted(scalars)
    # the samples: before training and at step 2 (3 is not a multiple of 2), each prompt its own picture
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000000.png", "step-000002.png"]
    assert len(images) == 2 and all(sorted(steps) == [0, 2] for steps in images.values()), images
    grid = Image.open(run / "samples" / "step-000002.png")
    assert grid.width >= 2 * 128  # two prompts, each cell at least 128 px


@pytest.mark.parametrize("flags, message", [
    (["--report-to", "mlflowx"], "--report-to"),
    (["--sample-every", "5"], "--sample-prompt"),
    (["--sample-prompt", "a cat"], "--sample-every"),
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


def test_lora_format_needs_a_lora_export(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code = main(["export", str(tmp_path / "run"), "--format", "single-file", "--lora-format", "kohya",
                 "--output", str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "--format lora" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.safetensors").exists()
