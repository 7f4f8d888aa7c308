"""`concept-erase eval` and `compare` as a user runs them, on the embedded digits model."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from concept_erase.cli import main

ROOT = Path(__file__).resolve().parent.parent


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture()
def suite(tmp_path) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
name: digits-test
prompts: {ROOT / 'prompts' / 'digits.csv'}
seeds_per_prompt: 1
steps: 4
guidance: 4.0
batch_size: 8
metrics:
  judge: {{}}
  domain_fid: {{}}
  fid: {{reference: base}}
  nudity: {{}}
""")
    return path


@pytest.fixture()
def fid_cache(tmp_path):
    return str(tmp_path / "evalcache")


def run(suite, out, cache, *extra):
    return main(["eval", "--suite", str(suite), "--model", "builtin:digits", "--output", str(out),
                 "--limit", "20", "--no-progress", "--cache-dir", cache, *extra])


def test_eval_report_and_resume(suite, tmp_path, fid_cache):
    out = tmp_path / "ev"
    assert run(suite, out, fid_cache, "--erased", "three") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["images"] == 20 and res["generated_now"] == 20 and res["erased"] == ["three"]
    groups = {(r["metric"], r["group"]) for r in res["metrics"]}
    assert {("judge", "forget"), ("judge", "retain"), ("fid", "retain"), ("domain_fid", "forget"),
            ("nudity", "all")} <= groups
    forget = next(r for r in res["metrics"] if r["metric"] == "judge" and r["group"] == "forget")
    assert forget["value"]["images"] == 2  # 'three' in plain and in red ink among the first 20 rows
    # the prompt set's tiers (bare, red ink): every group scored in each tier too, each on its own images
    judged = {r["group"]: r["value"] for r in res["metrics"] if r["metric"] == "judge"}
    assert [judged[f"forget [{t}]"]["images"] for t in ("bare", "red ink")] == [1, 1]
    assert [judged[f"retain [{t}]"]["images"] for t in ("bare", "red ink")] == [9, 9]
    assert judged["forget"]["accuracy"] == (judged["forget [bare]"]["accuracy"] + judged["forget [red ink]"]["accuracy"]) / 2
    nude = {r["group"]: r["value"]["images"] for r in res["metrics"] if r["metric"] == "nudity"}
    assert nude["all"] == 20 and nude["forget [red ink]"] == 1 and nude["retain"] == 18  # each group and tier too
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["forget.png", "retain.png"]
    s = res["summary"]
    assert 0 <= s["forget_accuracy"] <= 1 and 0 <= s["retain_accuracy"] <= 1
    assert abs(s["fid"]) < 0.05  # the base model against itself: same prompts, seeds and batches
    assert s["nudity_flagged"] == 0
    assert res["versions"]["torch"] and res["versions"]["torchmetrics"]
    fid_settings = next(r["settings"] for r in res["metrics"] if r["metric"] == "fid")
    assert fid_settings["features"] == 2048 and "torchmetrics" in fid_settings["library"]
    md = (out / "results.md").read_text()
    assert "| judge | forget |" in md and "NudeNet" in md
    for g in ("forget", "retain"):
        with Image.open(out / "grids" / f"{g}.png") as im:
            assert im.size[0] > 32

    # a half-finished evaluation: two images lost, one torn; the rerun makes only those three
    names = sorted(p.name for p in (out / "images").glob("*.png"))
    keep = {n: np.asarray(Image.open(out / "images" / n)).copy() for n in names[:3]}
    (out / "images" / names[0]).unlink()
    (out / "images" / names[1]).unlink()
    (out / "images" / names[2]).write_bytes((out / "images" / names[3]).read_bytes()[:100])
    before = dict(s)
    assert run(suite, out, fid_cache, "--erased", "three") == 0
    res2 = json.loads((out / "results.json").read_text())
    assert res2["generated_now"] == 3
    for n, pixels in keep.items():
        assert np.array_equal(np.asarray(Image.open(out / "images" / n)), pixels)  # same seeds, same images
    assert res2["summary"]["forget_accuracy"] == before["forget_accuracy"]
    assert res2["summary"]["retain_accuracy"] == before["retain_accuracy"]

    # compare two evaluations: table and Pareto plot. compare reads results.json alone: the second evaluation is
    # this one as if made with two seeds per prompt (a real second evaluation costs a quarter of a minute)
    out2 = tmp_path / "ev2"
    out2.mkdir()
    res2["generation"]["seeds_per_prompt"] = 2
    res2["summary"]["forget_accuracy"] = 0.5
    (out2 / "results.json").write_text(json.dumps(res2))
    cmp = tmp_path / "cmp"
    assert main(["compare", str(out), str(out2), "--output", str(cmp), "--label", "one seed",
                 "--label", "two seeds"]) == 0
    text = (cmp / "comparison.md").read_text()
    assert "| one seed |" in text and "| two seeds |" in text and "pareto.png" in text
    assert "not made alike" in text and "seeds per prompt: 1 / 2" in text  # said, not hidden
    with Image.open(cmp / "pareto.png") as im:
        assert im.size[0] > 300
    assert main(["compare", str(out), "--output", str(cmp)]) == 2  # never overwritten without --overwrite


def test_eval_bad_inputs_leave_the_output_alone(suite, tmp_path, fid_cache, capsys):
    out = tmp_path / "ev"
    assert run(suite, out, fid_cache, "--erased", "eleven") == 2
    err = capsys.readouterr().err
    assert "--erased 'eleven' names no prompt of this set" in err and "three" in err
    assert not out.exists()  # checked before anything was written

    out.mkdir()
    (out / "mine.txt").write_text("precious")
    assert run(suite, out, fid_cache) == 2
    assert "holds other files" in capsys.readouterr().err
    assert tree(out) == {"mine.txt": hashlib.sha256(b"precious").hexdigest()}

    assert run(suite, tmp_path / "x", fid_cache, "--weights", str(tmp_path / "none.safetensors")) == 2
    assert "--weights" in capsys.readouterr().err
    assert main(["eval", "--suite", str(tmp_path / "nosuite.yaml"), "--model", "builtin:digits",
                 "--output", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--output", str(tmp_path / "c")]) == 2
    assert "no results.json" in capsys.readouterr().err

    bad = tmp_path / "bad.yaml"
    bad.write_text(suite.read_text().replace("judge: {}", "clip_classifier: {model: ViT-B-32}"))
    assert run(bad, tmp_path / "z", fid_cache) == 2  # weights missing: said before any generation
    assert "--clip-weights" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_overwrite_replaces_only_a_complete_evaluation(tmp_path, fid_cache, monkeypatch, capsys):
    from concept_erase.errors import UserError
    from concept_erase.digits import metrics

    suite = tmp_path / "judge-only.yaml"  # what is checked here is the overwrite, not the metrics
    suite.write_text(f"name: judge-only\nprompts: {ROOT / 'prompts' / 'digits.csv'}\nseeds_per_prompt: 1\n"
                     "steps: 4\nguidance: 4.0\nbatch_size: 8\nmetrics:\n  judge: {}\n")
    out = tmp_path / "ev"
    assert run(suite, out, fid_cache, "--erased", "three") == 0
    old = tree(out)

    def broken(self, ctx):
        raise UserError("the judge broke")

    monkeypatch.setattr(metrics.JudgeAccuracy, "score", broken)
    assert run(suite, out, fid_cache, "--erased", "four", "--overwrite") == 2
    assert "the judge broke" in capsys.readouterr().err
    assert tree(out) == old  # the earlier evaluation is intact
    monkeypatch.undo()
    assert run(suite, out, fid_cache, "--erased", "four", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["erased"] == ["four"]
    assert not any(p.name.startswith(".ev.") for p in tmp_path.iterdir())


def test_erased_concepts_are_read_from_the_delta(tmp_path):
    import torch
    from safetensors.torch import save_file

    from concept_erase.evaluation.run import _erased_from_delta
    from concept_erase.evaluation.prompts import load_prompts

    rows = load_prompts(ROOT / "prompts" / "digits.csv")
    path = tmp_path / "erased.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"concepts": json.dumps(["a handwritten digit seven"])})
    assert _erased_from_delta(str(path), rows) == ["seven"]  # a row's exact prompt names its concept
    save_file({"x": torch.zeros(1)}, str(path), metadata={"concepts": json.dumps(["Red Ink"])})
    assert _erased_from_delta(str(path), rows) == ["red ink"]
    save_file({"x": torch.zeros(1)}, str(path), metadata={"concepts": json.dumps(["van gogh"])})
    assert _erased_from_delta(str(path), rows) == []


def test_what_fid_and_the_classifier_need_is_checked_before_any_image(suite, tmp_path, fid_cache, capsys):
    """Checks that used to come only after the images were made: too few images for FID, a reference
    folder of mixed sizes or unreadable images, a classifier with one class."""
    assert run(suite, tmp_path / "a", fid_cache, "--limit", "1") == 2
    assert "FID needs at least 2 images per group" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    ref = tmp_path / "ref"
    ref.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(ref / "a.png")
    Image.fromarray(np.zeros((24, 16, 3), np.uint8)).save(ref / "b.png")
    assert run(suite, tmp_path / "b", fid_cache, "--fid-reference", str(ref)) == 2
    assert "b.png is 16x24 where a.png is 16x16" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    (ref / "b.png").write_bytes(b"not an image")
    assert run(suite, tmp_path / "b", fid_cache, "--fid-reference", str(ref)) == 2
    assert "b.png cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

    one = tmp_path / "one.yaml"
    one.write_text(suite.read_text().replace("judge: {}", "clip_classifier: {model: ViT-B-32}")
                   .replace("  fid: {reference: base}\n", ""))
    assert run(one, tmp_path / "c", fid_cache, "--limit", "1") == 2
    assert "needs at least two concept names" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_suite_given_by_name_is_answered_with_its_file(tmp_path, monkeypatch, capsys):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    assert main(["eval", "--suite", "digits", "--model", "builtin:digits", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("give the suite's file: --suite eval/digits.yaml") and len(err.splitlines()) == 1, err
    assert (root / "eval" / "digits.yaml").is_file()  # the hint names a file that is there
    assert main(["eval", "--suite", "mine", "--model", "builtin:digits", "--output", str(tmp_path / "o")]) == 2
    assert "e.g. one of eval/: artists" in capsys.readouterr().err
