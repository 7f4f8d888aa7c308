"""The digits world, the shipped model and judge, and the demo end to end."""

import json

import pytest
import torch

from concept_erase.digits import world as digits
from concept_erase.digits.evaluate import domain_fid
from concept_erase.digits.judge import load_network
from concept_erase.io.loading import embedded_model_dir, load_pipeline


def test_captions():
    assert digits.caption(7) == "a handwritten digit seven"
    assert digits.caption(7, "red ink") == "a handwritten digit seven in red ink"
    assert digits.caption(0, "inverted") == "a handwritten digit zero in white on black"


def test_split_is_fixed_disjoint_and_a_fifth():
    train, held = digits.split_indices(1797)
    again = digits.split_indices(1797)
    assert torch.equal(train, again[0]) and torch.equal(held, again[1])
    assert not set(train.tolist()) & set(held.tolist())
    assert len(train) + len(held) == 1797 and len(held) == round(1797 * 0.2)


def test_renderings_look_like_their_style():
    scans, _ = digits.load_scans()
    maps = digits.ink(scans[:4])
    plain, red = digits.render(maps, "plain"), digits.render(maps, "red ink")
    inverted, bold = digits.render(maps, "inverted"), digits.render(maps, "bold")
    assert plain[:, :, 0, 0].min() > 0.95 and inverted[:, :, 0, 0].max() < 0.05  # paper vs black
    stroke = maps[:, 0] > 0.8
    r, g = red[:, 0][stroke].mean(), red[:, 1][stroke].mean()
    assert r > g + 0.5  # red strokes
    assert (1 - bold).sum() > (1 - plain).sum() * 1.2  # more ink
    data = digits.build("test")
    assert data.images.shape[1:] == (3, 32, 32) and len(set(data.styles.tolist())) == 5


def test_shipped_judge_meets_its_bar_on_held_out_digits():
    judge = load_network()
    test = digits.build("test")
    pred_digit, pred_style = judge.predict(test.images)
    assert float((pred_digit == test.digits).float().mean()) >= 0.97
    assert float((pred_style == test.styles).float().mean()) >= 0.9


def test_shipped_model_is_a_stable_diffusion_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline("builtin:digits")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor >= 32
    folder = embedded_model_dir("digits")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 30 * 2**20
    card = (folder / "README.md").read_text()
    assert "Measured quality" in card and "not** the standard Inception FID" in card


def test_domain_fid_separates_sets():
    judge = load_network()
    test = digits.build("test")
    a = test.images[test.styles == 0][:150]
    b = test.images[test.styles == 0][150:300]
    same = domain_fid(judge, a, a)
    similar = domain_fid(judge, a, b)
    shifted = domain_fid(judge, a, test.images[test.styles == 3][:150])  # inverted renderings
    assert abs(same) < 1e-3
    assert shifted > 5 * similar and shifted > 1.0


def test_demo_end_to_end_on_the_shipped_model(tmp_path):
    from concept_erase.digits.demo import run_demo

    # a recipe that stops at the first erasure check at target: a bar every model passes, checked every 2 steps
    report = run_demo(tmp_path / "demo", digit="three", seeds=2, steps=5, progress=False,
                      overrides={"steps": 4, "anchor_images_per_prompt": 2, "anchor_inference_steps": 4, "sampling_steps": 4,
                                 "cache_dir": str(tmp_path / "cache"), "stop_when_erased": True, "check_every": 2,
                                 "check_images": 2, "check_forget_at_most": 1.0, "check_retain_drop_at_most": 1.0})
    for name in ("report.json", "report.md", "grid.png", "grid-styles.png", "run/erased.safetensors",
                 "run/metrics.jsonl"):
        assert (tmp_path / "demo" / name).is_file(), name
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["before"]["per_digit"].keys() == saved["after"]["per_digit"].keys()
    assert set(saved["checks"]) == {"forget_accuracy_at_most_10pct", "retain_within_5_points_of_base"}
    # the same figures in every style, the bare caption's equal to the headline's; the run trained on none of them
    assert list(saved["after"]["tiers"]) == digits.STYLES and saved["trained_styles"] == ["plain"]
    assert saved["after"]["tiers"]["plain"]["forget_accuracy"] == saved["after"]["forget_accuracy"]
    assert saved["passed_every_style"] == all(saved["tier_checks"].values())
    assert "| red ink (in red ink) | no |" in (tmp_path / "demo" / "report.md").read_text()
    assert "not the standard Inception FID" in (tmp_path / "demo" / "report.md").read_text()
    assert (report["steps"], report["steps_planned"], report["stopped_when_erased"]) == (2, 4, True)
    # judged on image seeds 0-1; the checks drew theirs from 1,000,000 on, and the report says so
    assert report["evaluation"]["image_seeds"] == "seeds 0-1"
    assert report["evaluation"]["check_image_seeds"] == "seeds 1000000-1000003"
    assert "the run's erasure checks drew image seeds 1000000-1000003" in (tmp_path / "demo" / "report.md").read_text()
    assert "2 of at most 4 steps, stopped at the first erasure check at target (" in (tmp_path / "demo" / "report.md").read_text()


def test_shipped_flow_model_is_an_sd3_pipeline_of_at_most_20_mb_that_draws_the_prompted_digit():
    from diffusers import StableDiffusion3Pipeline

    from concept_erase.digits.evaluate import generate_many

    pipe = load_pipeline("builtin:digits-flow")
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.tokenizer_3.model_max_length == 16
    folder = embedded_model_dir("digits-flow")
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 20 * 2**20
    report = json.loads((folder / "build_report.json").read_text())
    assert min(report["base_generations"]["digit_accuracy"], report["base_generations"]["style_accuracy"]) >= 0.85
    assert "Measured quality" in (folder / "README.md").read_text()
    # and it draws what it is asked for now, not only when it was built: a few prompts, judged
    prompts = [(digits.caption(d, s), range(2)) for d, s in ((7, "red ink"), (2, "inverted"), (0, "plain"))]
    images = torch.cat(generate_many(pipe, prompts, steps=10, guidance=4.0))
    pd, ps = load_network().predict(images)
    assert pd.tolist() == [7, 7, 2, 2, 0, 0]
    assert ps.tolist() == [digits.STYLES.index(s) for s in ("red ink", "red ink", "inverted", "inverted", "plain", "plain")]


def test_demo_on_the_flow_model(tmp_path):
    """A short demo on builtin:digits-flow: the same recipe, the same report (the full demo meets the
    target: benchmarks/tuning-record.md)."""
    from concept_erase.digits.demo import run_demo

    report = run_demo(tmp_path / "demo", digit="seven", seeds=1, steps=5, progress=False,
                      overrides={"model": "builtin:digits-flow", "steps": 4, "anchor_images_per_prompt": 2,
                                 "anchor_inference_steps": 4, "sampling_steps": 4,
                                 "cache_dir": str(tmp_path / "cache")})
    assert report["model"] == "builtin:digits-flow" and report["evaluation"]["sampler"] == "FlowMatchEulerDiscrete"
    for name in ("report.json", "report.md", "grid.png", "run/erased.safetensors"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "(builtin:digits-flow)" in (tmp_path / "demo" / "report.md").read_text()


def test_erasing_a_digit_lowers_its_accuracy_on_seeds_the_run_never_saw(tmp_path):
    """EUPMU on the shipped model, the digits recipe's settings for a fixed 60 steps on trajectories of 10 sampler
    steps (no check: nothing drew or judged an image during the run), judged afterwards on 16 image seeds no
    part of the run used: "three" goes, the other digits stay."""
    import copy

    from concept_erase.digits.benchmark import Judging
    from concept_erase.config import RECIPES, build_config, load_yaml
    from concept_erase.digits.world import caption
    from concept_erase.export.delta import apply
    from concept_erase.training.trainer import erase

    base = load_pipeline("builtin:digits")
    base.set_progress_bar_config(disable=True)
    settings = {**load_yaml(RECIPES / "digits-erase.yaml"), "concepts": [caption(3)],
                "anchors": [caption(d) for d in range(10) if d != 3], "steps": 60, "stop_when_erased": False,
                "sampling_steps": 10, "anchor_inference_steps": 10,
                "output": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "progress": False,
                "anchor_images_per_prompt": 4, "checkpoint_every": 0}
    delta = erase(build_config(settings), pipe=copy.deepcopy(base))
    judging = Judging("three", seeds=16, steps=10, guidance=4.0, seed_start=500_000)
    before, after = judging(base, fid=False), judging(apply(copy.deepcopy(base), delta), fid=False)
    assert before["forget_accuracy"] >= 0.8 and before["retain_accuracy"] >= 0.9
    assert after["forget_accuracy"] <= 0.25, after  # 3 of 16 at most (at 40 steps: 5)
    assert after["retain_accuracy"] >= before["retain_accuracy"] - 0.1, after


@pytest.mark.parametrize("name", ["digits", "digits-flow"])
def test_a_shipped_model_runs_as_diffusers_loads_it(name):
    """The folder as a diffusers user loads it (`DiffusionPipeline.from_pretrained`, no dtype given) draws: one dtype
    throughout, fp16-rounded text encoders stored in fp32."""
    import torch
    from diffusers import DiffusionPipeline

    from concept_erase.io.loading import embedded_model_dir

    pipe = DiffusionPipeline.from_pretrained(str(embedded_model_dir(name) / "pipeline"))
    dtypes = {p.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()}
    assert dtypes == {torch.float32}
    image = pipe("a handwritten digit three", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape[1:3] == (32, 32)
