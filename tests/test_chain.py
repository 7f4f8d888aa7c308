"""Sequential erasure (`--weights PREVIOUS_RUN`): the chain starts from the previous weights, refers to the base
model as the original, keeps the earlier concepts erased, and writes one delta against the base."""

from __future__ import annotations

import json

import pytest
import torch

from concept_erase.cli import main

QUICK = ["--steps", "2", "--sampling-steps", "3", "--anchor-inference-steps", "2", "--anchor-images-per-prompt", "1",
         "--no-progress", "--checkpoint-every", "0"]


def _erase(tmp_path, name, *extra):
    out = tmp_path / name
    assert main(["erase", "--model", "builtin:tiny", "--output", str(out), "--cache-dir", str(tmp_path / "cache"),
                 *QUICK, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    return _erase(tmp_path_factory.mktemp("chain"), "a", "--concept", "van gogh", "--anchor", "a photo",
                  "--train", "xattn-kv")


def test_a_second_request_starts_from_the_first_and_refers_to_the_base(first, tmp_path):
    from concept_erase.config import EraseConfig
    from concept_erase.export.delta import apply, read_delta
    from concept_erase.io.loading import load_pipeline
    from concept_erase.training.trainer import erase

    before, _ = read_delta(first)
    base = load_pipeline("builtin:tiny").unet
    seen = {}

    class Look:
        def start(self, trainer):
            params = dict(trainer.ctx.denoiser.named_parameters())
            seen["starts_from_first"] = all(torch.equal(params[n].detach().cpu(), v) for n, v in before.items())
            x = torch.randn(1, *trainer.ctx.latent_shape, generator=torch.Generator().manual_seed(0))
            t, cond = torch.tensor([500]), trainer.ctx.embed(["monet"])
            seen["original_is_base"] = torch.allclose(trainer.ctx.original(x, t, cond),
                                                      trainer.family.predict(base, x, t, cond), atol=1e-6)
            seen["concepts"] = list(trainer.config.concepts)

        def __call__(self, done, trainer):
            return False

    out = tmp_path / "b"
    erase(EraseConfig(model="builtin:tiny", concepts=["monet"], anchors=["a dog"], output=str(out), weights=str(first),
                      train="selfattn", steps=2, sampling_steps=3, anchor_inference_steps=2, anchor_images_per_prompt=1,
                      progress=False, checkpoint_every=0, cache_dir=str(tmp_path / "cache")), on_step=Look())
    assert seen == {"starts_from_first": True, "original_is_base": True, "concepts": ["van gogh", "monet"]}
    after, meta = read_delta(out)
    assert set(before) < set(after)  # the first request's tensors and this one's
    assert all(torch.equal(after[n], v) for n, v in before.items())  # not trained here: kept as the first left them
    assert [r["concepts"] for r in json.loads(meta["chain"])] == [["van gogh"], ["monet"]]
    assert json.loads(meta["concepts"]) == ["van gogh", "monet"] and json.loads(meta["anchors"]) == ["a photo", "a dog"]
    unet = apply(load_pipeline("builtin:tiny"), out).unet.state_dict()
    assert all(torch.equal(unet[n], v) for n, v in after.items())  # one delta against the base holds the chain

    from concept_erase.export.model_card import card_text

    assert "1. van gogh (eupmu, 2 steps); 2. monet (eupmu, 2 steps)" in card_text(meta, fmt="diffusers")


@pytest.mark.parametrize("extra,message", [
    (["--concept", "Van Gogh"], "'Van Gogh' is already erased by"),
    (["--concept", "monet", "--train", "lora"], "--train lora cannot continue --weights"),
    (["--concept", "monet", "--model", "{other}"], "made from another base model"),
    (["--concept", "monet", "--model", "builtin:tiny-xl"], "was made for the sd family"),
])
def test_a_chain_that_cannot_continue_is_refused_in_one_line(first, extra, message, tmp_path, capsys):
    if "{other}" in extra:  # the same architecture, other weights
        from concept_erase.io.tiny import build_tiny_pipeline

        build_tiny_pipeline(seed=5).save_pretrained(str(tmp_path / "other"))
        extra = [e.format(other=tmp_path / "other") for e in extra]
    out = tmp_path / "b"
    argv = ["erase", "--model", "builtin:tiny", "--anchor", "a dog", "--weights", str(first), "--output", str(out),
            "--cache-dir", str(tmp_path / "cache"), *QUICK]
    for i in range(0, len(extra), 2):
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_chains_anchors_keep_a_request_that_names_none_and_a_chain_without_any_is_refused(first, tmp_path,
                                                                                                 capsys):
    from concept_erase.export.delta import read_delta

    out = _erase(tmp_path, "b", "--concept", "monet", "--weights", str(first))  # no --anchor: the chain's are kept
    assert json.loads(read_delta(out, tensors=False)[1]["anchors"]) == ["a photo"]
    bare = _erase(tmp_path, "bare", "--concept", "van gogh", "--method", "esd", "--train", "xattn-kv")
    code = main(["erase", "--model", "builtin:tiny", "--concept", "monet", "--weights", str(bare), "--output",
                 str(tmp_path / "c"), "--cache-dir", str(tmp_path / "cache"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "keeps what anchors show, and the chain of" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


def test_the_new_requests_concepts_take_the_share_of_the_draws_that_newest_share_gives(first, tmp_path):
    """After a one-concept run, a request of two concepts with --newest-share 0.5: the earlier concept takes half the
    forget draws and each new one a quarter, exactly in every round; by default each of the three a third."""
    from concept_erase.config import EraseConfig
    from concept_erase.training.trainer import erase

    def shares(out, **extra):
        seen = {}

        class Look:
            def start(self, trainer):
                order = trainer.forget.order
                picks = [int(p) for call in range(order.count) for p in order.picks(call, (0, 1), 1)]
                seen["repeats"] = trainer.ctx.concept_repeats
                seen["shares"] = [picks.count(i) / len(picks) for i in range(3)]

            def __call__(self, done, trainer):
                return False

        erase(EraseConfig(model="builtin:tiny", concepts=["monet", "a cat"], anchors=["a dog"], output=str(out),
                          weights=str(first), steps=1, sampling_steps=3, anchor_inference_steps=2,
                          anchor_images_per_prompt=1, progress=False, checkpoint_every=0,
                          cache_dir=str(tmp_path / "cache"), **extra), on_step=Look())
        return seen

    assert shares(tmp_path / "half", newest_share=0.5) == {"repeats": [2, 1, 1], "shares": [0.5, 0.25, 0.25]}
    assert shares(tmp_path / "even") == {"repeats": [1, 1, 1], "shares": [1 / 3, 1 / 3, 1 / 3]}


def test_the_draw_repeats_give_the_new_concepts_their_share_however_long_the_chain():
    from concept_erase.training.chain import draw_repeats

    for concepts, earlier, share in [(8, 7, 0.5), (8, 7, 0.3), (4, 2, 0.75), (10, 5, 0.5), (9, 1, 0.2)]:
        repeats = draw_repeats(concepts, earlier, share)
        new = sum(repeats[earlier:]) / sum(repeats)
        assert abs(new - share) < 1e-9, (concepts, earlier, share, repeats)
        assert len(set(repeats[:earlier])) == 1 and len(set(repeats[earlier:])) == 1  # each side evenly
    assert draw_repeats(8, 7, 0.0) == [1] * 8  # the default: every concept of the chain once
    assert draw_repeats(3, 0, 0.5) == [1] * 3  # nothing earlier: nothing to share
    assert draw_repeats(8, 7, 0.001) == [1] * 8  # under 1/128: read as 0, never a concept left undrawn


@pytest.mark.parametrize("extra,message", [
    (["--newest-share", "0.5", "--method", "uce"], "it does not train, so --weights, --newest-share"),
    (["--newest-share", "1"], "--newest-share"),
])
def test_a_newest_share_that_cannot_apply_is_refused_in_one_line(first, extra, message, tmp_path, capsys):
    out = tmp_path / "b"
    code = main(["erase", "--model", "builtin:tiny", "--concept", "monet", "--anchor", "a dog", "--output", str(out),
                 "--weights", str(first), *extra, *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_chained_run_resumed_without_its_weights_is_refused_naming_them(first, tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["erase", "--model", "builtin:tiny", "--concept", "monet", "--anchor", "a dog", "--output", str(out),
            "--cache-dir", str(tmp_path / "cache"), *QUICK, "--checkpoint-every", "1"]
    assert main(argv + ["--weights", str(first)]) == 0
    capsys.readouterr()
    assert main(argv + ["--resume", "latest", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert f'was made with --weights "{first}"' in err and len(err.strip().splitlines()) == 1, err
    # the same previous run named by its file, not its folder: the resume goes on
    assert main(argv + ["--weights", str(first / "erased.safetensors"), "--resume", "latest", "--steps", "3"]) == 0


def test_a_concept_file_and_an_anchor_file_join_the_flags_and_bad_ones_are_refused(tmp_path, capsys):
    from concept_erase.config import EraseConfig
    from concept_erase.errors import UserError

    (tmp_path / "concepts.txt").write_text("# artists\nvan gogh\n\nmonet\n  klimt  \n")
    (tmp_path / "anchors.txt").write_text("a photo\na dog\n")
    config = EraseConfig(model="builtin:tiny", concepts=["picasso"], concept_file=str(tmp_path / "concepts.txt"),
                         anchor_file=str(tmp_path / "anchors.txt"), output=str(tmp_path / "o"))
    assert config.concepts == ["picasso", "van gogh", "monet", "klimt"] and config.anchors == ["a photo", "a dog"]
    assert config.concept_file == "" and EraseConfig(**config.to_dict()).concepts == config.concepts  # read once
    (tmp_path / "twice.txt").write_text("monet\nMonet\n")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    for extra, message in ((["--concept-file", "{t}/twice.txt"], "--concept 'Monet' is given twice"),
                           (["--concept-file", "{t}/empty.txt"], "--concept-file {t}/empty.txt holds no prompt"),
                           (["--anchor-file", "{t}/none.txt"], "--anchor-file {t}/none.txt: no such file"),
                           (["--concept", "van gogh", "--concept-file", "{t}/concepts.txt"], "given twice")):
        code = main(["erase", "--model", "builtin:tiny", "--anchor", "a dog", "--output", str(tmp_path / "x"),
                     *[e.format(t=tmp_path) for e in extra]])
        err = capsys.readouterr().err
        assert code == 2 and message.format(t=tmp_path) in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="given twice"):
        EraseConfig(model="builtin:tiny", concepts=["a cat"], anchors=["a dog", "A Dog"], output="o")


def test_the_shipped_two_request_and_many_artists_recipes_run_on_tiny_models(tmp_path, monkeypatch):
    """sdxl-style-vangogh.yaml then sdxl-then-picasso.yaml (a chain of two), and sd15-artists.yaml (five artists from
    its prompt files), as shipped: only their lengths cut and the models swapped for tiny ones of the same family."""
    from pathlib import Path

    from concept_erase.config import build_config, load_yaml
    from concept_erase.export.delta import read_delta
    from concept_erase.training.trainer import erase

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipes name their prompt files from the repository root
    cuts = {"resolution": 32, "steps": 1, "sampling_steps": 2, "anchor_inference_steps": 2,
            "anchor_images_per_prompt": 1, "cache_dir": str(tmp_path / "cache"), "progress": False,
            "checkpoint_every": 0, "check_every": 1}

    def run(recipe: str, **extra):
        path = root / "pipelines" / recipe
        config = build_config(load_yaml(path), {**cuts, **extra}, source=str(path))
        erase(config)
        return config

    run("sdxl-style-vangogh.yaml", model="builtin:tiny-xl", output=str(tmp_path / "first"))
    second = run("sdxl-then-picasso.yaml", model="builtin:tiny-xl", weights=str(tmp_path / "first"),
                 output=str(tmp_path / "second"))
    meta = read_delta(second.output, tensors=False)[1]
    assert [r["concepts"][0] for r in json.loads(meta["chain"])] == ["Van Gogh", "Pablo Picasso"]
    artists = run("sd15-artists.yaml", model="builtin:tiny", output=str(tmp_path / "artists"))
    assert len(artists.concepts) == 5 and "a painting in the style of Rembrandt" in artists.anchors


def test_two_lora_adapters_join_into_one_whose_update_is_their_sum():
    """join_lora: per module the down projections stacked and the up projections side by side, each scaled by its
    alpha / r; the joined adapter (alpha = rank) changes a linear and a convolution exactly as the two together."""
    from concept_erase.export.delta import join_lora

    g = torch.Generator().manual_seed(0)

    def adapter(r):
        return {"m.lora_A.weight": torch.randn(r, 6, generator=g), "m.lora_B.weight": torch.randn(5, r, generator=g),
                "c.lora_A.weight": torch.randn(r, 3, 3, 3, generator=g),
                "c.lora_B.weight": torch.randn(4, r, 1, 1, generator=g)}

    def update(t, meta, module):
        a, b = t[f"{module}.lora_A.weight"], t[f"{module}.lora_B.weight"]
        scale = float(meta["alpha"]) / int(meta["r"])
        return scale * (b.flatten(1) @ a.flatten(1))

    first, first_meta = adapter(2), {"r": 2, "alpha": 4.0, "targets": ["m", "c"]}
    second, second_meta = adapter(3), {"r": 3, "alpha": 1.5, "targets": ["m", "c"]}
    joined, meta = join_lora(first, first_meta, second, second_meta)
    assert meta == {"r": 5, "alpha": 5.0, "targets": ["m", "c"]}
    assert joined["c.lora_A.weight"].shape == (5, 3, 3, 3) and joined["c.lora_B.weight"].shape == (4, 5, 1, 1)
    for module in ("m", "c"):
        assert torch.allclose(update(joined, meta, module),
                              update(first, first_meta, module) + update(second, second_meta, module), atol=1e-5)
    from concept_erase.errors import UserError

    with pytest.raises(UserError, match="different modules"):
        join_lora(first, first_meta, {k: v for k, v in second.items() if k.startswith("m")}, second_meta)


def test_a_lora_chain_trains_beside_the_previous_adapters_refers_to_the_base_and_writes_one_adapter(tmp_path):
    """A LoRA run continued by a LoRA run: the second starts from base + the first's adapters (frozen), its
    original model is the base, and its delta is one adapter of the summed rank that holds the first unchanged
    and applies as base + both. A LoRA run continued with a weight subset is refused in one line."""
    from concept_erase.config import EraseConfig
    from concept_erase.export.delta import apply, merge_lora, read_delta
    from concept_erase.io.loading import load_pipeline
    from concept_erase.training.trainer import erase

    first = _erase(tmp_path, "a", "--concept", "van gogh", "--anchor", "a photo", "--train", "lora", "--lora-rank", "2")
    before, first_meta = read_delta(first)
    base = load_pipeline("builtin:tiny").unet
    with_first = load_pipeline("builtin:tiny").unet
    merge_lora(with_first, before, json.loads(first_meta["lora"]))
    seen = {}

    class Look:
        def start(self, trainer):
            x = torch.randn(1, *trainer.ctx.latent_shape, generator=torch.Generator().manual_seed(0))
            t, cond = torch.tensor([500]), trainer.ctx.embed(["monet"])
            predict = trainer.family.predict
            with torch.no_grad():
                now = predict(trainer.ctx.denoiser, x, t, cond)
            seen["starts_from_first"] = torch.allclose(now, predict(with_first, x, t, cond), atol=1e-5)
            seen["original_is_base"] = torch.allclose(trainer.ctx.original(x, t, cond), predict(base, x, t, cond),
                                                      atol=1e-6)
            seen["trains_only_its_own"] = all(".default." in n for n in trainer.trained)
            seen["first_frozen"] = not any(p.requires_grad for n, p in trainer.ctx.denoiser.named_parameters()
                                           if ".chain." in n)

        def __call__(self, done, trainer):
            return False

    out = tmp_path / "b"
    erase(EraseConfig(model="builtin:tiny", concepts=["monet"], anchors=["a dog"], output=str(out), weights=str(first),
                      train="lora", lora_rank=3, lora_alpha=1.5, steps=2, sampling_steps=3, anchor_inference_steps=2,
                      anchor_images_per_prompt=1, progress=False, checkpoint_every=0, lr=1e-2,
                      cache_dir=str(tmp_path / "cache")), on_step=Look())
    assert seen == {"starts_from_first": True, "original_is_base": True, "trains_only_its_own": True,
                    "first_frozen": True}
    after, meta = read_delta(out)
    assert meta["kind"] == "lora" and json.loads(meta["lora"])["r"] == 5
    assert [r["concepts"] for r in json.loads(meta["chain"])] == [["van gogh"], ["monet"]]
    first_scale = float(json.loads(first_meta["lora"])["alpha"]) / 2
    for name, value in before.items():  # the first request's adapters, unchanged, in the first two ranks
        part = after[name][:2] if ".lora_A." in name else after[name][:, :2] / first_scale
        assert torch.allclose(part, value, atol=1e-6), name
    assert any(not torch.equal(after[n][2:], torch.zeros_like(after[n][2:])) for n in after if ".lora_A." in n)
    chained = apply(load_pipeline("builtin:tiny"), out).unet
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(1, 4, base.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moved = (chained(x, torch.tensor([10]), cond).sample - with_first(x, torch.tensor([10]), cond).sample).abs()
    assert moved.max() > 0  # the second request's adapter is in it too

    code = main(["erase", "--model", "builtin:tiny", "--concept", "monet", "--anchor", "a dog", "--weights", str(first),
                 "--output", str(tmp_path / "c"), "--cache-dir", str(tmp_path / "cache"), *QUICK, "--train", "xattn"])
    assert code == 2 and not (tmp_path / "c").exists()
