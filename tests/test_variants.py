"""Prompt variants: templates read and checked, expanded evenly, and drawn by the objectives on both sides."""

import pytest
import torch

from concept_erase.errors import UserError
from concept_erase.variants import (BARE, GENERAL, GENERAL_HELD_OUT, Template, check_against_anchors, check_names,
                                    expand, read_templates, resolve, tiers)


def test_a_variants_file_gives_its_templates_in_tiers_skipping_comments_and_repeats(tmp_path):
    path = tmp_path / "variants.txt"
    path.write_text("# templates\n{} in red ink\n\n[prefix]\na photo of {}\n  a photo of {}  \n[long]\n{}, oil on canvas, soft light\n")
    found = read_templates(path)
    assert found == (Template("{} in red ink", "variant"), Template("a photo of {}", "prefix"),
                     Template("{}, oil on canvas, soft light", "long"))
    assert found[1].fill("van gogh") == "a photo of van gogh" and found[1].words == "a photo of"
    assert tiers(found) == [BARE, "variant", "prefix", "long"]


@pytest.mark.parametrize("content,message", [
    (b"", "holds no template"),
    (b"# only a comment\n\n[tier]\n", "holds no template"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not a text file"),
    (b"a photo of a cat\n", "has no slot {} for the concept"),
    (b"a photo of {concept}\n", r"has no slot \{\} for the concept \(write the slot as \{\} \)"),
    (b"{} next to {thing}\n", "has a slot other than {}"),
    (b"{}, \n", "adds no words to the concept"),
])
def test_a_bad_variants_file_is_refused_in_one_line_naming_the_line(tmp_path, content, message):
    path = tmp_path / "variants.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as caught:
        read_templates(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_names_resolve_and_none_stands_alone(tmp_path):
    own = (Template("{} in red ink", "red ink"),)
    assert resolve(["auto"], own) == own and resolve(["general"], own) == GENERAL and resolve(["none"], own) == ()
    path = tmp_path / "v.txt"
    path.write_text("a photo of {}\n{} in red ink\n")
    both = resolve(["auto", str(path)], own)
    assert [t.text for t in both] == ["{} in red ink", "a photo of {}"]  # the repeated text once, first tier kept
    check_names(["auto", str(path)])
    assert resolve(["{} in red ink", "a photo of {}"], ()) == (Template("{} in red ink", "variant"),
                                                                 Template("a photo of {}", "variant"))
    with pytest.raises(UserError, match="has a slot other than"):
        check_names(["{} by {artist}"])
    with pytest.raises(UserError, match="has no slot"):
        check_names(["a photo of {concept}"])
    with pytest.raises(UserError, match="give it alone"):
        check_names(["none", "auto"])
    with pytest.raises(UserError, match="no such file"):
        check_names([str(tmp_path / "missing.txt")])


def test_the_held_out_templates_share_no_template_with_the_trained_ones():
    assert not {t.text for t in GENERAL} & {t.text for t in GENERAL_HELD_OUT}
    assert {t.tier for t in GENERAL} == {t.tier for t in GENERAL_HELD_OUT}


def test_every_concept_gets_the_same_number_of_variants_bare_first():
    templates = (Template("a photo of {}", "prefix"), Template("{} in red ink", "red ink"))
    out = expand(["a cat", "a dog"], templates)
    assert [v.prompt for v in out[:2]] == ["a cat", "a dog"] and {v.tier for v in out[:2]} == {BARE}
    assert [sum(v.owner == i for v in out) for i in range(2)] == [3, 3]
    assert "a photo of a dog" in [v.prompt for v in out]
    skip = expand(["a cat", "a dog in red ink"], templates, applies=lambda p, t: "red ink" not in p)
    assert [v.prompt for v in skip if v.owner == 1] == ["a dog in red ink"]


def test_a_variant_that_holds_an_anchor_is_refused_but_a_bare_concept_that_holds_one_is_not():
    concepts = ["a handwritten digit zero in red ink"]
    check_against_anchors(expand(concepts, ()), concepts, ["a handwritten digit zero"])  # the style's own caption
    templates = (Template("{} beside a handwritten digit seven", "context"),)
    with pytest.raises(UserError, match="holds the anchor 'a handwritten digit seven' word for word"):
        check_against_anchors(expand(["a handwritten digit three"], templates), ["a handwritten digit three"],
                              ["a handwritten digit seven"])


def test_digit_captions_take_the_style_phrases_and_styled_ones_do_not():
    from concept_erase.digits.world import STYLE_TEMPLATES, caption, takes_style

    out = expand([caption(3), caption(0, "red ink")], STYLE_TEMPLATES, takes_style)
    assert sorted(v.prompt for v in out if v.owner == 0) == sorted(caption(3, s) for s in
                                                                   ("plain", "red ink", "blue ink", "inverted", "bold"))
    assert [v.prompt for v in out if v.owner == 1] == [caption(0, "red ink")]


def _trainer(pipe, make_config, **settings):
    from concept_erase.training.trainer import Trainer

    trainer = Trainer(make_config(**settings), pipe=pipe)
    trainer._setup()
    return trainer


def test_the_objectives_draw_the_concept_and_the_anchors_inside_the_templates(fresh_pipe, make_config, tmp_path):
    """The forget batch's prompts are the concept bare and in the template, both drawn; the anchor bank holds each
    anchor bare and in the template; and --relative-to's reference sits in the same template as the concept."""
    from concept_erase.training.trainer import step_generator

    path = tmp_path / "v.txt"
    path.write_text("{} in red ink\n")
    trainer = _trainer(fresh_pipe, make_config, concept_variants=[str(path)], eta=0.0, relative_to=["a painting"],
                       trajectory_refresh=1)
    ctx, forget = trainer.ctx, trainer.forget
    assert [v.prompt for v in ctx.concept_variants] == ["van gogh", "van gogh in red ink"]
    assert [v.prompt for v in ctx.anchor_variants] == ["a painting", "a photo", "a painting in red ink",
                                                       "a photo in red ink"]
    assert trainer.retain.bank.latents.shape[0] == 4 * 2  # four prompts, two images each
    conds = {prompt: ctx.embed([prompt]) for prompt in ("van gogh", "van gogh in red ink")}
    seen = set()
    for step in range(8):
        batch = forget.batch(step_generator(0, step, 0, 0), 2, step)
        for i in range(len(batch)):
            prompt = next(p for p, c in conds.items() if batch.cond[i] == c)
            seen.add(prompt)
            # eta 0: the target is the original's prediction for the reference inside the concept's template
            ref = "a painting in red ink" if prompt.endswith("red ink") else "a painting"
            with torch.no_grad():
                expected = ctx.original(batch.latents[i:i + 1], batch.timesteps[i:i + 1], ctx.embed([ref])).float()
            torch.testing.assert_close(batch.target[i:i + 1], expected)
    assert seen == set(conds)


def test_without_variants_the_objectives_draw_the_bare_prompts_only(fresh_pipe, make_config):
    trainer = _trainer(fresh_pipe, make_config)
    assert [v.prompt for v in trainer.ctx.concept_variants] == ["van gogh"]
    assert [v.prompt for v in trainer.ctx.anchor_variants] == ["a painting", "a photo"]


def test_a_template_that_pushes_the_concept_past_the_text_encoders_reach_is_refused(fresh_pipe, make_config, tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("a picture " + "with many more words " * 20 + "of {}\n")
    with pytest.raises(UserError, match="past the 77 tokens the text encoder reads"):
        _trainer(fresh_pipe, make_config, concept_variants=[str(path)])


def test_the_styles_a_run_trained_on_are_read_from_the_templates_words(tmp_path):
    from concept_erase.digits.world import trained_styles

    path = tmp_path / "v.txt"
    path.write_text("[mine]\n{} in white on black\na photo of {}\n")
    assert trained_styles([]) == trained_styles(["none"]) == ["plain"]
    assert trained_styles(["auto"]) == ["plain", "red ink", "blue ink", "inverted", "bold"]
    assert trained_styles([str(path)]) == ["plain", "inverted"]


def test_the_tier_table_pools_forget_by_style_and_counts_runs_at_target_in_every_style():
    from concept_erase.bench.report import tier_rows

    def tiers(forget_hits, retain):
        return {s: {"forget_hits": h, "forget_images": 10, "forget_accuracy": h / 10, "retain_accuracy": retain}
                for s, h in zip(("plain", "red ink"), forget_hits)}

    base = tiers((10, 10), 1.0)
    runs = [{"label": "a", "concept": "three", "tiers": tiers((0, 3), 0.99), "base_tiers": base,
             "trained_styles": ["plain"]},
            {"label": "a", "concept": "five", "tiers": tiers((1, 0), 0.9), "base_tiers": base,
             "trained_styles": ["plain", "red ink"]},
            {"label": "b", "concept": "three"}]  # no tiers: not in the table
    rows = tier_rows(runs)
    assert list(rows) == ["a"]
    assert rows["a"]["plain"]["forget"] == pytest.approx(0.05) and rows["a"]["red ink"]["forget"] == pytest.approx(0.15)
    assert rows["a"]["red ink"]["trained"] == 1 and rows["a"]["plain"]["trained"] == 2
    lo, hi = rows["a"]["red ink"]["ci"]["forget"]
    assert lo < 0.15 < hi
    # three: red ink at 30% misses; five: retain 10 points below the base misses
    assert rows["a"]["every tier"]["met"] == 0
    runs[0]["tiers"]["red ink"]["forget_accuracy"] = 0.1
    assert tier_rows(runs)["a"]["every tier"]["met"] == 1
