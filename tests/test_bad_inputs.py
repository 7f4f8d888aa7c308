"""Every bad input of the core commands, met where it hurts most: the output path already holds a good
result, and the user even passed --overwrite. Each must give one line, exit code 2, and leave that
result byte for byte as it was."""

import pytest
import torch
from safetensors.torch import save_file

from concept_erase.cli import main

from test_cli import base_args, tree


def run_cli(capsys, argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_refused(code, err, message, out, before):
    assert code == 2, err
    assert message in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("concept-erase: error:") and "Traceback" not in err, err
    assert tree(out) == before, "the output path changed"


@pytest.fixture(scope="module")
def good(tiny_dir, tmp_path_factory):
    """A finished run, its export and a sample folder: the good results a bad input must not touch."""
    root = tmp_path_factory.mktemp("good")
    run = root / "run"
    assert main(base_args(tiny_dir, run, root / "image-cache")) == 0
    assert main(["export", str(run), "--format", "diffusers", "--output", str(root / "pipe")]) == 0
    assert main(["sample", "--model", str(tiny_dir), "--weights", str(run / "erased.safetensors"), "--prompt", "x",
                 "--seeds", "0", "--inference-steps", "2", "--output", str(root / "samples")]) == 0
    return root


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    (root / "empty").mkdir()
    (root / "model.ckpt").write_bytes(b"not really a pickle")
    (root / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (root / "empty.txt").write_text("# nothing but a comment\n")
    (root / "no-slot.txt").write_text("a painting in the style of van gogh\n")
    (root / "holds-anchor.txt").write_text("{} beside a photo\n")
    (root / "too-long.txt").write_text("a picture " + "with many more words " * 20 + "of {}\n")
    return root


ERASE_CASES = [
    ("model", "/nonexistent/sd", "does not exist"),
    ("model", "{bad}/empty", "not a diffusers pipeline"),
    ("model", "{bad}/model.ckpt", "--allow-pickle"),
    ("model", "{bad}/model.safetensors", "truncated or corrupted"),
    ("--method", "magic", "unknown method 'magic'"),
    ("--train", "everything", "--train 'everything' is not one of"),
    ("--steps", "0", "--steps must be 1 to"),
    ("--eps", "-0.1", "--eps must be at least 0"),
    ("--slack-probe", "sideways", "--slack-probe 'sideways' is not one of: held-out, batch"),
    ("--lambda-update", "adam", "--lambda-update 'adam' is not one of: paper, normalised"),
    ("--slack-decay", "1", "--slack-decay must be at least 0, below 1, not 1"),
    ("--slack-decay", "-0.5", "--slack-decay must be at least 0, below 1, not -0.5"),
    ("--slack-momentum", "1.5", "--slack-momentum must be at least 0, below 1, not 1.5"),
    ("--stop-when-erased", None, "no check would run"),
    ("--check-every", "0", "--check-every must be 1 to"),
    ("--check-inference-steps", "0", "--check-inference-steps must be 1 to"),
    ("--check-confirm", "0", "--check-confirm must be 1 to"),
    ("--concept-variants", "{bad}/empty.txt", "holds no template"),
    ("--concept-variants", "{bad}/model.safetensors", "is not a text file"),
    ("--concept-variants", "{bad}/no-slot.txt", "has no slot {} for the concept"),
    ("--concept-variants", "{bad}/holds-anchor.txt", "holds the anchor 'a photo' word for word"),
    ("--concept-variants", "{bad}/too-long.txt", "would leave the concept out"),
    ("--method", "uce", "--method uce is a closed-form edit: it does not train, so --steps, "),
    ("--uce-preserve-weight", "-1", "--uce-preserve-weight must be 0 to 1000000, not -1"),
    ("--uce-regularization", "0", "--uce-regularization must be above 0"),
    ("--uce-tokens", "first", "--uce-tokens 'first' is not one of: tail, last"),
]


@pytest.mark.parametrize("flag,value,message", ERASE_CASES)
def test_bad_erase_input_leaves_an_existing_run_alone_even_with_overwrite(flag, value, message, good, bad_models,
                                                                          tiny_dir, cache_dir, capsys):
    run = good / "run"
    before = tree(run)
    argv = base_args(tiny_dir, run, cache_dir) + ["--overwrite"]
    if flag == "model":
        argv[argv.index("--model") + 1] = value.format(bad=bad_models)
    else:
        argv += [flag] if value is None else [flag, value.format(bad=bad_models)]
    code, err = run_cli(capsys, argv)
    assert_refused(code, err, message, run, before)


@pytest.fixture(scope="module")
def bad_deltas(good, tmp_path_factory, tiny_pipe):
    """Deltas that must be refused: cut short, not ours, made from another base, of the wrong shapes."""
    from concept_erase.io.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("bad-deltas")
    data = (good / "run" / "erased.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"x": torch.zeros(2)}, str(root / "foreign.safetensors"))
    build_tiny_pipeline(seed=5).save_pretrained(str(root / "other-base"))
    build_tiny_pipeline(cross_attention_dim=16).save_pretrained(str(root / "other-shape"))
    return root


DELTA_CASES = [
    ("{bad}/cut.safetensors", None, [], "truncated or corrupted"),
    ("{bad}/foreign.safetensors", None, [], "not a concept-erase delta"),
    ("{good}/run/erased.safetensors", "{bad}/other-base", [], "another base model"),
    # told the base is fine, the shapes still have to match
    ("{good}/run/erased.safetensors", "{bad}/other-shape", ["--allow-other-base"], "shape"),
]


@pytest.mark.parametrize("weights,model,extra,message", DELTA_CASES)
def test_bad_delta_for_sample_leaves_the_output_alone(weights, model, extra, message, good, bad_deltas, tiny_dir, capsys):
    out = good / "samples"
    before = tree(out)
    model = model.format(bad=bad_deltas) if model else str(tiny_dir)
    code, err = run_cli(capsys, ["sample", "--model", model, "--weights", weights.format(bad=bad_deltas, good=good),
                                 "--prompt", "x", "--seeds", "0", "--inference-steps", "2", "--output", str(out),
                                 "--overwrite", *extra])
    assert_refused(code, err, message, out, before)


@pytest.mark.parametrize("weights,model,extra,message", DELTA_CASES)
def test_bad_delta_for_export_leaves_the_output_alone(weights, model, extra, message, good, bad_deltas, tiny_dir, capsys):
    out = good / "pipe"
    before = tree(out)
    model = model.format(bad=bad_deltas) if model else str(tiny_dir)
    code, err = run_cli(capsys, ["export", weights.format(bad=bad_deltas, good=good), "--model", model, "--format",
                                 "diffusers", "--output", str(out), "--overwrite", *extra])
    assert_refused(code, err, message, out, before)


def test_existing_outputs_need_overwrite(good, tiny_dir, capsys):
    for out, argv in [
        (good / "pipe", ["export", str(good / "run"), "--format", "diffusers", "--output", str(good / "pipe")]),
        (good / "samples", ["sample", "--model", str(tiny_dir), "--weights", str(good / "run"), "--prompt", "x",
                            "--seeds", "0", "--inference-steps", "2", "--output", str(good / "samples")]),
    ]:
        before = tree(out)
        code, err = run_cli(capsys, argv)
        assert_refused(code, err, "--overwrite", out, before)


def test_a_delta_from_another_base_is_applied_when_forced(good, bad_deltas, capsys, tmp_path):
    code, err = run_cli(capsys, ["sample", "--model", str(bad_deltas / "other-base"), "--weights", str(good / "run"),
                                 "--prompt", "x", "--seeds", "0", "--inference-steps", "2", "--output", str(tmp_path / "s"),
                                 "--allow-other-base"])
    assert code == 0, err
    assert (tmp_path / "s" / "grid.png").is_file()


def test_nan_from_the_command_line_exits_3_and_keeps_the_checkpoint(tiny_dir, cache_dir, tmp_path, capsys,
                                                                     monkeypatch):
    from concept_erase.training.trainer import Trainer

    real_losses = Trainer._losses

    def poisoned(self, batch, forget=None):  # from the third step on
        out, along, norm_sq = real_losses(self, batch, forget)
        return (out * float("nan") if len(self.lambda_history) >= 2 else out), along, norm_sq

    monkeypatch.setattr(Trainer, "_losses", poisoned)
    out = tmp_path / "run"
    argv = base_args(tiny_dir, out, cache_dir)
    argv[argv.index("--steps") + 1] = "4"
    argv[argv.index("--checkpoint-every") + 1] = "2"
    code, err = run_cli(capsys, argv)
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "NaN or Inf at step 3" in lines[0] and "step-00000002" in lines[0], err
    assert (out / "checkpoints" / "step-00000002" / "trained.safetensors").is_file()
    assert not (out / "erased.safetensors").exists()


@pytest.fixture(scope="module")
def good_attack(good, tiny_dir):
    """A finished attack (the tiny model, the digits judge, no attack: two quick drawings)."""
    out = good / "attack"
    assert main(["attack", "--model", str(tiny_dir), "--weights", str(good / "run"), "--concept", "three",
                 "--judge", "digits", "--attack", "none", "--prompts", "1", "--inference-steps", "2", "--output", str(out),
                 "--no-progress"]) == 0
    return out


ATTACK_CASES = [
    (["--attack", "magic"], None, "--attack 'magic' is not one of: unlearndiff, textual-inversion, ring-a-bell, none"),
    (["--tokens", "0"], None, "--tokens must be 1 to 70, not 0"),
    (["--judge", ""], None, "no judge for 'three' on this model: give --judge clip"),
    (["--concept", "church"], None, "the digits judge knows the digits"),
    (["--judge", "clip"], None, "the clip judge needs the classes"),
    ([], "{bad}/other-base", "another base model"),
]


@pytest.mark.parametrize("extra,model,message", ATTACK_CASES)
def test_bad_attack_input_leaves_the_output_alone(extra, model, message, good, good_attack, bad_deltas, tiny_dir,
                                                  capsys):
    before = tree(good_attack)
    argv = ["attack", "--model", model.format(bad=bad_deltas) if model else str(tiny_dir), "--weights",
            str(good / "run"), "--concept", "three", "--judge", "digits", "--attack", "unlearndiff", "--prompts", "1",
            "--inference-steps", "2", "--output", str(good_attack), "--overwrite", "--no-progress"]
    for i in range(0, len(extra), 2):  # a flag given again replaces the one above
        flag, value = extra[i], extra[i + 1]
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if "--judge" in extra and extra[extra.index("--judge") + 1] == "":
        j = argv.index("--judge")
        del argv[j:j + 2]
    code, err = run_cli(capsys, argv)
    assert_refused(code, err, message, good_attack, before)


def test_an_attack_into_an_output_that_holds_something_else_is_refused(good, good_attack, tiny_dir, capsys):
    for out, held in [(good / "samples", "other files"), (good_attack, "another attack")]:
        before = tree(out)
        code, err = run_cli(capsys, ["attack", "--model", str(tiny_dir), "--concept", "seven", "--judge", "digits",
                                     "--attack", "none", "--prompts", "1", "--inference-steps", "2", "--output", str(out)])
        assert_refused(code, err, f"holds {held}; choose another --output, or pass --overwrite", out, before)
