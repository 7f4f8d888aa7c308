"""The command line as a user meets it: one-line errors, exit codes, nothing written on failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from concept_erase.cli import main
from concept_erase.config import build_config, load_yaml
from concept_erase.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict:
    """Every file under path with its bytes: to show that nothing changed."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def base_args(tiny_dir, out, cache_dir):
    return ["erase", "--model", str(tiny_dir), "--concept", "van gogh", "--anchor", "a photo", "--output", str(out),
            "--steps", "2", "--sampling-steps", "3", "--anchor-inference-steps", "2", "--anchor-images-per-prompt", "2",
            "--cache-dir", str(cache_dir), "--no-progress", "--checkpoint-every", "0"]


@pytest.mark.parametrize("change,message", [
    ({"--model": "/nonexistent/sd"}, "does not exist"),
    ({"--method": "magic"}, "unknown method 'magic'"),
    ({"--train": "everything"}, "--train 'everything' is not one of"),
    ({"--steps": "0"}, "--steps must be 1 to"),
    ({"--eps": "-0.1"}, "--eps must be at least 0"),
    ({"--forget-loss": "nope"}, "unknown forget loss"),
    ({"--mixed-precision": "fp8"}, "--mixed-precision"),
    ({"--steps": "many"}, "is not a whole number"),
])
def test_bad_erase_inputs_give_one_line_and_write_nothing(change, message, capsys, tiny_dir, tmp_path, cache_dir):
    out = tmp_path / "run"
    argv = base_args(tiny_dir, out, cache_dir)
    for flag, value in change.items():
        argv[argv.index(flag) + 1] if flag in argv else None
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_folder_that_is_no_pipeline(capsys, tmp_path, cache_dir):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, *base_args(tmp_path / "empty", tmp_path / "run", cache_dir))
    assert code == 2 and "not a diffusers pipeline" in err


def test_pickled_checkpoint_needs_allow_pickle(capsys, tmp_path, cache_dir):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    code, err = run_cli(capsys, *base_args(ckpt, tmp_path / "run", cache_dir))
    assert code == 2 and "--allow-pickle" in err


def test_truncated_single_file_is_refused(capsys, tmp_path, cache_dir):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    code, err = run_cli(capsys, *base_args(bad, tmp_path / "run", cache_dir))
    assert code == 2 and "truncated or corrupted" in err


def test_existing_run_is_not_overwritten(capsys, tiny_dir, tmp_path, cache_dir):
    out = tmp_path / "run"
    assert run_cli(capsys, *base_args(tiny_dir, out, cache_dir))[0] == 0
    before = tree(out)
    code, err = run_cli(capsys, *base_args(tiny_dir, out, cache_dir))
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert tree(out) == before
    code, _ = run_cli(capsys, *base_args(tiny_dir, out, cache_dir), "--overwrite")
    assert code == 0


def test_export_and_sample_from_the_command_line(capsys, tiny_dir, tmp_path, cache_dir):
    out = tmp_path / "run"
    assert run_cli(capsys, *base_args(tiny_dir, out, cache_dir))[0] == 0
    assert main(["export", str(out), "--format", "diffusers", "--output", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    code = main(["sample", "--model", str(tiny_dir), "--weights", str(out / "erased.safetensors"), "--prompt",
                 "van gogh", "--seeds", "0-1", "--inference-steps", "2", "--output", str(tmp_path / "grid")])
    assert code == 0
    index = json.loads((tmp_path / "grid" / "images.json").read_text())
    assert [i["seed"] for i in index["images"]] == [0, 1]
    assert (tmp_path / "grid" / "grid.png").is_file()
    code, err = run_cli(capsys, "sample", "--model", str(tiny_dir), "--prompt", "x", "--seeds", "3-1", "--output",
                        str(tmp_path / "g2"))
    assert code == 2 and "backwards" in err and not (tmp_path / "g2").exists()


def test_yaml_config_with_flag_override(tmp_path, tiny_dir, cache_dir, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny_dir), "concept": ["van gogh"], "anchors": ["a photo"],
                                   "steps": 5, "lambda": 0.7, "method": "fixed", "sampling-steps": 3,
                                   "anchor_inference_steps": 2, "anchor_images_per_prompt": 2,
                                   "cache_dir": str(cache_dir), "progress": False, "checkpoint_every": 0}))
    out = tmp_path / "run"
    assert main(["erase", "--config", str(cfg), "--steps", "2", "--output", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())["config"]
    assert run["steps"] == 2 and run["lambda_init"] == 0.7 and run["method"] == "fixed"


def test_yaml_unknown_key_and_bad_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nsteps: 3\nlearning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rate'"):
        load_yaml(bad)
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(bad)
    with pytest.raises(UserError, match="whole number"):
        build_config({"steps": 2.5})
    with pytest.raises(UserError, match="true or false"):
        build_config({"overwrite": "yes"})


def test_real_process_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "concept_erase", "erase", "--model", str(tmp_path / "missing"),
                           "--concept", "x", "--anchor", "y", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("concept-erase: error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "concept_erase", "--debug", "erase", "--model",
                           str(tmp_path / "missing"), "--concept", "x", "--anchor", "y", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_hub_id_offline_says_how_to_proceed(capsys, tmp_path, cache_dir):
    code, err = run_cli(capsys, *base_args("someone/no-such-model", tmp_path / "run", cache_dir))
    assert code == 2 and "HF_HUB_OFFLINE=1" in err and "local diffusers folder" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [None, "erase", "demo", "export", "sample", "eval", "bench", "compare"])
def test_every_help_page_prints(capsys, command):
    """`--help` of each command prints its flags (a literal % in a help text once broke argparse's formatting)."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "usage: concept-erase" in out and "--debug" in out
    if command == "erase":
        assert "half the benchmark's 10% target" in out  # a literal %, shown as written
