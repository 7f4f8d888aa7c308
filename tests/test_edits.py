"""Closed-form edits (UCE): the formula against least squares, the rows it maps, the run it writes, what it refuses."""

from __future__ import annotations

import json

import pytest
import torch

from concept_erase.methods.edits import closed_form_weight, guide_prompt, token_rows


def _lstsq_weight(w0, c, g, k, reg, pw):
    """The same objective solved another way: one stacked least-squares problem in W^T."""
    d = w0.shape[1]
    lhs = torch.cat([reg ** 0.5 * torch.eye(d, dtype=torch.float64), c, pw ** 0.5 * k])
    rhs = torch.cat([reg ** 0.5 * w0.T, g @ w0.T, pw ** 0.5 * (k @ w0.T)])
    return torch.linalg.lstsq(lhs, rhs).solution.T


@pytest.mark.parametrize("reg, pw", [(0.5, 1.0), (0.1, 10.0), (2.0, 0.0)])
def test_the_closed_form_is_the_least_squares_solution(reg, pw):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    c, g = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    k = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    w = closed_form_weight(w0, c, g, k, regularization=reg, preserve_weight=pw)
    assert torch.allclose(w, _lstsq_weight(w0, c, g, k, reg, pw), atol=1e-10)


def test_the_edit_moves_the_concept_to_its_guide_and_keeps_what_is_kept():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    c, g = torch.randn(1, 8, generator=gen, dtype=torch.float64), torch.randn(1, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    w = closed_form_weight(w0, c, g, k, regularization=1e-3, preserve_weight=1.0)
    before = (c @ w0.T - g @ w0.T).norm()
    assert (c @ w.T - g @ w0.T).norm() < 0.01 * before  # the concept's output is now the guide's
    assert (k @ w.T - k @ w0.T).norm() < 0.01 * (k @ w0.T).norm()  # the kept prompts' outputs barely moved
    with pytest.raises(ValueError, match="regularization"):
        closed_form_weight(w0, c, g, k, regularization=0.0, preserve_weight=1.0)


def test_rows_pair_from_the_last_word_to_the_end():
    seq = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)  # two prompts, six tokens, width 1
    spans = [[(3, 6)], [(1, 6)]]  # the last word at token 3 and at token 1
    assert token_rows(seq, 0, spans[0], (1, spans[1])).flatten().tolist() == [3.0, 4.0, 5.0]
    assert token_rows(seq, 1, spans[1], (0, spans[0])).flatten().tolist() == [7.0, 8.0, 9.0]  # as many, aligned
    assert token_rows(seq, 1, spans[1]).flatten().tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert token_rows(seq, 0, spans[0], tokens="last").flatten().tolist() == [3.0]
    two_streams = [(3, 4), (5, 6)]  # e.g. CLIP's then T5's tokens, each from its own last word
    assert token_rows(seq, 0, two_streams).flatten().tolist() == [3.0, 5.0]
    pooled = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert token_rows(pooled, 1, spans[1]).tolist() == [[3.0, 4.0]]


def test_a_variant_is_guided_by_the_same_template():
    assert guide_prompt("{}", "a dog") == "a dog"
    assert guide_prompt("a photo of {}", "a dog") == "a photo of a dog"
    assert guide_prompt("{} in red ink", "") == "in red ink"
    assert guide_prompt("{}, in black and white", "") == "in black and white"


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-xl", "builtin:tiny-sd3", "builtin:tiny-flux"])
def test_uce_is_an_ordinary_run_on_every_family(model, tmp_path):
    """The edit writes a run that apply reads: only the layers that read the text change, the concept's rows now
    give (nearly) its guide's output, and the kept prompt's rows keep theirs."""
    from concept_erase.config import EraseConfig
    from concept_erase.families.base import family_of
    from concept_erase.export.delta import apply, read_delta
    from concept_erase.io.loading import load_pipeline
    from concept_erase.methods.edits import UCE
    from concept_erase.training.trainer import erase

    out = tmp_path / "run"
    config = EraseConfig(model=model, concepts=["van gogh"], anchors=["a photo of a dog"], output=str(out),
                         method="uce", progress=False, uce_regularization=0.01)
    erase(config)
    tensors, meta = read_delta(out)
    base = load_pipeline(model)
    family = family_of(base)
    layers = family.edit_layers(family.denoiser(base))
    assert layers and set(tensors) == {f"{n}.weight" for n in layers}
    assert meta["method"] == "uce" and meta["train"] == family.edit_subset and meta["edit"] == "closed-form"
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["backward_passes"] == 0
    assert json.loads((out / "run.json").read_text())["edit"]["layers"] == len(layers)

    edited = apply(load_pipeline(model), out)
    pairs = [("van gogh", "")]
    prompts = ["van gogh", "", "a photo of a dog"]
    cond, spans = family.text_tokens(base, prompts, "cpu")
    index = {p: i for i, p in enumerate(prompts)}
    before, after = dict(family.denoiser(base).named_modules()), dict(family.denoiser(edited).named_modules())
    for name, source in layers.items():
        c, g, k = UCE(config).rows(cond[source].float(), index, spans, pairs, ["a photo of a dog"])
        w0, w = before[name].weight.detach(), after[name].weight.detach()
        # many more rows than a tiny model's text width: the least-squares fit is close, not exact
        assert (c @ w.T - g @ w0.T).norm() < 0.3 * (c @ w0.T - g @ w0.T).norm(), name
        assert (k @ w.T - k @ w0.T).norm() < 0.1 * (k @ w0.T).norm(), name


def test_the_model_card_of_an_edit_names_the_edit_not_training(tmp_path):
    from concept_erase.export.model_card import card_text

    meta = {"format": "concept-erase-delta", "family": "sd", "base_model": "builtin:tiny", "method": "uce",
            "concepts": json.dumps(["van gogh"]), "anchors": json.dumps(["a photo"]), "train": "xattn-kv", "edit": "closed-form",
            "steps": "1", "lambda_final": "0.0", "base_model_digest": "0" * 64,
            "settings": json.dumps({"remap_to": ["a painting"], "uce_regularization": 0.5, "lr": 1e-5, "steps": 400})}
    text = card_text(meta, fmt="diffusers")
    assert "closed-form edit" in text and "| edited subset | xattn-kv |" in text
    assert "| uce_regularization | 0.5 |" in text and "| lr |" not in text and "optimizer steps" not in text


def test_a_recipe_read_for_an_edit_keeps_its_model_and_prompts_only():
    """The demo, the benchmark and the scale check run UCE on training recipes: their training settings are left out,
    which the edit would refuse, and a trained method reads the recipe whole."""
    from concept_erase.config import EraseConfig, settings_for

    recipe = {"model": "builtin:digits", "method": "eupmu", "steps": 400, "lr": 6e-4, "stop-when-erased": True,
              "anchors": ["a"], "concept_variants": ["auto"]}
    assert settings_for(recipe, "uce") == {"model": "builtin:digits", "method": "eupmu", "anchors": ["a"],
                                           "concept_variants": ["auto"]}
    assert settings_for(recipe) == recipe
    EraseConfig(**{**settings_for({k.replace("-", "_"): v for k, v in recipe.items()}, "uce"), "method": "uce"})


def test_an_edit_that_would_guide_a_concept_to_itself_is_refused():
    from concept_erase.config import EraseConfig
    from concept_erase.errors import UserError

    with pytest.raises(UserError, match="--remap-to 'A Cat' is the concept itself"):
        EraseConfig(model="builtin:tiny", method="uce", concepts=["a dog", "a cat"], anchors=["a bird"],
                    remap_to=["a fox", "A Cat"], output="out")
    EraseConfig(model="builtin:tiny", method="uce", concepts=["a dog", "a cat"], anchors=["a bird"],
                remap_to=["a cat", "a dog"], output="out")  # each to the other: a guide, not itself
