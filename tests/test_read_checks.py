"""What a command reads is checked on read: deltas (format version, finite values), YAML (a key given twice),
settings (whole numbers; a change after construction is caught at erase())."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from concept_erase import apply
from concept_erase.config import EraseConfig, load_yaml
from concept_erase.errors import UserError
from concept_erase.training.trainer import erase


@pytest.fixture(scope="module")
def delta(tiny_pipe, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    erase(EraseConfig(model=str(tiny_dir), concepts=["van gogh"], anchors=["a photo"], output=str(out), steps=1,
                      sampling_steps=4, anchor_inference_steps=2, anchor_images_per_prompt=1, progress=False,
                      cache_dir=str(tmp_path_factory.mktemp("cache")), checkpoint_every=0),
          pipe=copy.deepcopy(tiny_pipe))
    return out / "erased.safetensors"


def _rewrite(src, dst, *, meta_update=None, poison=False):
    with safe_open(str(src), framework="pt") as fh:
        meta, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    meta.update(meta_update or {})
    if poison:
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_a_delta_holding_nan_is_refused_by_name(delta, tiny_pipe, tmp_path):
    bad = _rewrite(delta, tmp_path / "nan.safetensors", poison=True)
    with pytest.raises(UserError, match="holds NaN or infinite values"):
        apply(copy.deepcopy(tiny_pipe), bad)
    apply(copy.deepcopy(tiny_pipe), delta)  # the good one still applies


def test_a_delta_of_a_newer_format_is_refused(delta, tiny_pipe, tmp_path):
    newer = _rewrite(delta, tmp_path / "v99.safetensors", meta_update={"format_version": "99"})
    with pytest.raises(UserError, match="format version '99' is not one this version reads"):
        apply(copy.deepcopy(tiny_pipe), newer)


def test_a_yaml_key_given_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 40\nlr: 1.0e-4\nsteps: 4000\n")
    with pytest.raises(UserError, match=r"has the key 'steps' twice \(line 3\)"):
        load_yaml(path)


def test_a_whole_number_setting_refuses_a_fraction_and_a_later_change_is_caught_at_erase(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="--steps must be a whole number, not 2.5"):
        EraseConfig(model=str(tiny_dir), concepts=["x"], anchors=["y"], output=str(tmp_path / "r"), steps=2.5)
    cfg = EraseConfig(model=str(tiny_dir), concepts=["x"], anchors=["y"], output=str(tmp_path / "r"), steps=2)
    cfg.steps = -3
    with pytest.raises(UserError, match="--steps must be"):
        erase(cfg)
    assert not (tmp_path / "r").exists()


def test_a_recipes_boolean_can_be_turned_off_and_on_from_the_command_line(tmp_path, monkeypatch):
    """Flags beat the config file both ways: --no-stop-when-erased undoes a recipe's `stop_when_erased: true`,
    --progress undoes a file's `progress: false`; with neither flag the file's values hold."""
    from concept_erase import cli

    path = tmp_path / "run.yaml"
    path.write_text("stop_when_erased: true\nprogress: false\n")
    seen = []
    monkeypatch.setattr("concept_erase.training.trainer.erase", lambda config: seen.append(config) or "x")
    base = ["erase", "--config", str(path), "--model", "builtin:tiny", "--concept", "a", "--anchor", "b",
            "--output", str(tmp_path / "r")]
    assert cli.main(base) == 0 and seen[-1].stop_when_erased and not seen[-1].progress
    assert cli.main(base + ["--no-stop-when-erased", "--progress"]) == 0
    assert not seen[-1].stop_when_erased and seen[-1].progress


@pytest.mark.parametrize("build", ["build_tiny_pipeline", "build_tiny_sdxl_pipeline", "build_tiny_sd3_pipeline"])
def test_a_resolution_hint_names_sides_the_pipeline_then_draws(build):
    """The sides a refused --resolution suggests pass the check and the family's own diffusers pipeline draws at
    them (SD and SDXL pipelines want multiples of 8 whatever their VAE)."""
    import re

    from concept_erase.io import tiny
    from concept_erase.io.loading import training_resolution

    pipe = getattr(tiny, build)()
    with pytest.raises(UserError) as refused:
        training_resolution(pipe, 31)
    sides = [int(x) for x in re.findall(r"\d+", str(refused.value).split("try ")[1].split(" (")[0])]
    assert sides
    for side in sides:
        assert training_resolution(pipe, side) == side
        pipe(prompt="a", height=side, width=side, num_inference_steps=1, output_type="latent")
    largest = pipe.transformer.config.pos_embed_max_size * 2 if hasattr(pipe, "transformer") else None
    if largest:  # SD3's position table: a side beyond it is refused before any work, with one that fits
        with pytest.raises(UserError, match=f"holds at most {largest} pixels"):
            training_resolution(pipe, largest + 2)


def test_export_under_several_processes_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from concept_erase.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--format", "lora", "--output", str(tmp_path / "out")]) == 2
    assert "runs as one process" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_digits_judge_refuses_a_model_that_is_not_a_digits_model(tiny_dir, tmp_path, capsys):
    """As a stop judge and as an evaluation metric: said in one line once the model is loaded, before any image."""
    from concept_erase.cli import main
    from concept_erase.digits.world import caption

    code = main(["erase", "--model", str(tiny_dir), "--concept", caption(3), "--anchor", caption(7), "--steps", "2",
                 "--stop-when-erased", "--stop-judge", "digits", "--check-every", "1", "--output", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not one of them" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    from concept_erase.config import RECIPES

    suite = tmp_path / "suite.yaml"
    digits_csv = RECIPES.parents[1] / "prompts" / "digits.csv"
    suite.write_text(f"name: d\nprompts: {digits_csv}\nmetrics: {{judge: {{}}}}\nseeds_per_prompt: 1\nsteps: 2\n")
    code = main(["eval", "--suite", str(suite), "--model", str(tiny_dir), "--output", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'judge' metric judges images of the embedded digits models" in err, err
    assert not (tmp_path / "ev").exists()


def test_bench_runs_from_checks_every_source_before_making_anything(tmp_path, monkeypatch, capsys):
    """A bad --runs-from (here a folder, and a good file beside a damaged one) is refused before OUTPUT/runs exists."""
    import json

    from concept_erase.cli import main
    from concept_erase.config import RECIPES

    monkeypatch.chdir(tmp_path)
    config = str(RECIPES.parents[1] / "pipelines" / "bench-digits.yaml")
    assert main(["bench", "--report-only", "--config", config, "--output", "", "--runs-from", ""]) == 2
    assert "not a readable bench.json" in capsys.readouterr().err and sorted(tmp_path.iterdir()) == []
    (tmp_path / "good.json").write_text(json.dumps({"runs": []}))
    (tmp_path / "bad.json").write_text("{ truncated")
    code = main(["bench", "--report-only", "--config", config, "--output", str(tmp_path / "out"),
                 "--runs-from", str(tmp_path / "good.json"), "--runs-from", str(tmp_path / "bad.json")])
    assert code == 2 and "bad.json: not a readable bench.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_stop_flag_without_the_stop_is_said_in_one_line_and_the_run_goes_on(tmp_path, capsys):
    """--check-every given while --stop-when-erased is off changes nothing: one note, and the run as asked; so does
    --newest-share on a run that continues no chain. The same values from a recipe say nothing (one recipe serves
    runs with and without the stop, and every request of a chain)."""
    from concept_erase import cli

    base = ["erase", "--model", "builtin:tiny", "--concept", "a cat", "--anchor", "a dog", "--steps", "1",
            "--anchor-images-per-prompt", "1", "--anchor-inference-steps", "2", "--sampling-steps", "2", "--no-progress"]
    assert cli.main(base + ["--output", str(tmp_path / "a"), "--check-every", "5", "--stop-judge", "signal",
                            "--newest-share", "0.5"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "did nothing in this run" in line]
    assert len(notes) == 3 and "--check-every" in notes[1] and "--stop-judge" in notes[0], err
    assert "--newest-share did nothing in this run: it shares the draws of a chain (--weights" in notes[2], err
    recipe = tmp_path / "r.yaml"
    recipe.write_text("check_every: 5\nnewest_share: 0.5\n")
    assert cli.main(base + ["--output", str(tmp_path / "b"), "--config", str(recipe)]) == 0
    assert "did nothing" not in capsys.readouterr().err


def test_a_pipeline_given_to_erase_must_be_of_the_model_the_record_names(tmp_path):
    from concept_erase.io.loading import load_pipeline

    with pytest.raises(UserError, match=r"is a StableDiffusion3Pipeline \(sd3 family\) but model 'builtin:tiny'"):
        erase(EraseConfig(model="builtin:tiny", concepts=["van gogh"], anchors=["a photo"], output=str(tmp_path / "o"),
                          steps=1, progress=False), pipe=load_pipeline("builtin:tiny-sd3"))
    assert not (tmp_path / "o").exists()
