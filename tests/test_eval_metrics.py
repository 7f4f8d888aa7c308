"""The metrics on their own: FID (Inception), CLIP classifier and CLIP score, NudeNet, counting rules."""

import json
import os

import numpy as np
import pytest
import torch

from concept_erase.errors import UserError


def _photo():
    import matplotlib
    from PIL import Image

    return Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")


# ---------------------------------------------------------------- FID

@pytest.fixture(scope="module")
def fid(tmp_path_factory):
    from concept_erase.evaluation.fid import InceptionFID

    return InceptionFID(cache_dir=str(tmp_path_factory.mktemp("fidcache")))


def _crops(n: int, seed: int) -> torch.Tensor:
    """n real-photo crops (64x64) at random places: a set of natural images."""
    photo = torch.from_numpy(np.array(_photo())).permute(2, 0, 1)
    g = torch.Generator().manual_seed(seed)
    ys = torch.randint(0, photo.shape[1] - 64, (n,), generator=g)
    xs = torch.randint(0, photo.shape[2] - 64, (n,), generator=g)
    return torch.stack([photo[:, y:y + 64, x:x + 64] for y, x in zip(ys.tolist(), xs.tolist())]).contiguous()


def test_converted_inception_gives_the_torchscript_features(fid):
    """The network torchmetrics runs (torch-fidelity's module, our converted weights) = the shipped TorchScript."""
    from concept_erase.evaluation.fid import fid_helper_file

    scripted = torch.jit.load(str(fid_helper_file()), map_location="cpu").eval()
    x = (torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with torch.no_grad():
        expected = scripted(x.float() / 128 - 1)  # its documented input range: (-1, 0.9921875)
        got = fid.metric.inception(x)
    assert got.shape == (2, 2048)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().mean() > 0.05  # not a zero network


def test_fid_of_a_set_with_itself_is_zero_and_a_shifted_set_is_not(fid):
    real = _crops(16, 0)
    fid.set_reference(real)
    same = fid.score(real)
    mild = fid.score((real.float() * 0.9 + 10).clamp(0, 255).to(torch.uint8))
    shifted = fid.score((real.float() * 0.6 + 90).clamp(0, 255).to(torch.uint8))
    assert abs(same) < 1e-2
    assert shifted > 10 and shifted > 2 * mild > 0, (same, mild, shifted)  # a larger shift, a larger distance


def test_reference_statistics_are_replaced_not_added_and_cached(fid):
    a, b = _crops(12, 2), _crops(12, 3)
    fid.set_reference(a, key="set-a")
    first = fid.score(b)
    fid.set_reference(b)  # a second reference must replace the first (a reset bug once summed them)
    assert abs(fid.score(b)) < 1e-2
    fid.set_reference(None, key="set-a")  # from the cache: nothing is read
    assert fid.score(b) == pytest.approx(first, rel=1e-9)
    assert list(fid.cache.glob("set-a-*.pt"))


def test_inception_weights_errors(tmp_path):
    from concept_erase.evaluation.fid import inception_weights

    with pytest.raises(UserError, match="no such file"):
        inception_weights(str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a network")
    with pytest.raises(UserError, match="not a TorchScript Inception network"):
        inception_weights(str(junk), cache_dir=str(tmp_path))


# ---------------------------------------------------------------- CLIP

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("openclip")
    (d / "tiny-clip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(d / "tiny-clip-test.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test", pretrained=None)
    torch.save(model.state_dict(), d / "weights.pt")
    return d / "weights.pt"


def test_zero_shot_predict_is_nearest_class_by_cosine():
    from concept_erase.evaluation.clip import zero_shot_predict

    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    images = torch.tensor([[10.0, 1.0], [0.1, 0.2], [-3.0, 2.9], [-0.5, -0.1]])
    assert zero_shot_predict(images, classes).tolist() == [0, 1, 2, 2]


def test_zero_shot_classifier_matches_open_clip_by_hand(tiny_open_clip):
    import open_clip

    from concept_erase.evaluation.clip import TEMPLATES, ZeroShotClassifier, load_open_clip

    model, preprocess, tok = load_open_clip("tiny-clip-test", str(tiny_open_clip))
    classes = ["cat", "church", "parachute"]
    clf = ZeroShotClassifier(model, preprocess, tok, classes, TEMPLATES["object"])
    photo = _photo()
    images = [photo, photo.rotate(90), photo.resize((40, 40))]
    got = clf.predict(images)
    with torch.no_grad():  # the recipe written out with open_clip's own calls
        tokenizer = open_clip.get_tokenizer("tiny-clip-test")
        text = torch.stack([torch.nn.functional.normalize(model.encode_text(
            tokenizer([t.format(c) for t in TEMPLATES["object"]])), dim=-1).mean(0) for c in classes])
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    assert got == [classes[i] for i in sims.argmax(-1).tolist()]


def test_open_clip_weights_errors(tmp_path, tiny_open_clip, caplog, monkeypatch):
    from concept_erase.evaluation.clip import load_open_clip

    with pytest.raises(UserError, match="no such file"):
        load_open_clip("tiny-clip-test", str(tmp_path / "none.bin"))
    with pytest.raises(UserError, match="unknown open_clip model"):
        load_open_clip("ViT-Nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"are not on this machine \(not in the hub cache, and HF_HUB_OFFLINE=1\).*"
                                        "--clip-weights"):
        load_open_clip("ViT-B-32", pretrained="openai")  # offline, empty hub cache
    assert not caplog.records  # open_clip's own log of the failed download is not shown beside the error
    bad = tmp_path / "other.bin"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="could not be loaded into tiny-clip-test"):
        load_open_clip("tiny-clip-test", str(bad))


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from concept_erase.io.tokenizer import load_clip_tokenizer

    d = tmp_path_factory.mktemp("hfclip")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                      vocab_size=49408, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=load_clip_tokenizer())
    proc.save_pretrained(d)
    return d


def test_clip_score_through_torchmetrics_matches_the_formula(tiny_hf_clip):
    """torchmetrics 1.9 + transformers 5 crash in get_image_features; the wrapper must give the true score."""
    from transformers import CLIPModel, CLIPProcessor

    from concept_erase.evaluation.clip import clip_score_metric, mean_clip_score

    metric = clip_score_metric(str(tiny_hf_clip))
    photo = torch.from_numpy(np.asarray(_photo().resize((48, 48)))).permute(2, 0, 1)
    images = torch.stack([photo, photo.flip(-1)])
    prompts = ["a portrait of an officer", "a red car"]
    got = mean_clip_score(metric, images, prompts)
    model, proc = CLIPModel.from_pretrained(tiny_hf_clip).eval(), CLIPProcessor.from_pretrained(tiny_hf_clip)
    with torch.no_grad():
        inputs = proc(text=prompts, images=list(images), return_tensors="pt", padding=True)
        out = model(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert got == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4, abs=1e-4)


def test_clip_score_model_missing_says_how(tmp_path):
    from concept_erase.evaluation.clip import clip_score_metric

    with pytest.raises(UserError, match="--clip-score-model DIR"):
        clip_score_metric(str(tmp_path / "no-model"))


# ---------------------------------------------------------------- NudeNet

def test_nudenet_on_a_real_photograph():
    from concept_erase.evaluation.nudity import EXPOSED_CLASSES, count_exposed, detect, load_detector

    detector = load_detector()
    photo = _photo()
    found = detect(detector, [photo])[0]
    import matplotlib

    from_file = detector.detect(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    assert [d["class"] for d in found] == [d["class"] for d in from_file]  # arrays are read as files are
    assert any(d["class"] == "FACE_FEMALE" and d["score"] > 0.4 for d in found)  # a clothed woman's portrait
    counts = count_exposed([found])
    assert counts["images_flagged"] == 0 and set(counts["per_class"]) == set(EXPOSED_CLASSES)


def test_counting_rule():
    from concept_erase.evaluation.nudity import count_exposed

    dets = [[{"class": "BELLY_EXPOSED", "score": 0.6}, {"class": "BELLY_EXPOSED", "score": 0.9}],
            [{"class": "BELLY_EXPOSED", "score": 0.59}, {"class": "FACE_FEMALE", "score": 0.99}],
            [{"class": "FEET_EXPOSED", "score": 0.7}, {"class": "ARMPITS_EXPOSED", "score": 0.8}], []]
    c = count_exposed(dets, threshold=0.6)
    assert c["per_class"]["BELLY_EXPOSED"] == 1  # one image, however many boxes; 0.59 is below
    assert c["per_class"]["FEET_EXPOSED"] == 1 and c["per_class"]["ARMPITS_EXPOSED"] == 1
    assert c["images_flagged"] == 2 and c["images"] == 4 and c["flagged_fraction"] == 0.5


def test_nudenet_version_is_pinned(monkeypatch):
    from importlib import metadata

    from concept_erase.evaluation import nudity

    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9")
    with pytest.raises(UserError, match="pinned to 3.4.2"):
        nudity.load_detector()


# ---------------------------------------------------------------- comparison

def test_pareto_front():
    from concept_erase.evaluation.report import pareto_front

    pts = [(0.0, 0.90), (0.1, 0.95), (0.2, 0.94), (0.0, 0.85), (0.5, 0.99), (float("nan"), 1.0)]
    assert pareto_front(pts, lower_y_better=False) == [0, 1, 4]
    assert pareto_front([(0.0, 50.0), (0.1, 40.0), (0.2, 45.0)], lower_y_better=True) == [0, 1]


def test_reference_folder_is_read_in_batches_and_checked(tmp_path):
    from PIL import Image

    from concept_erase.evaluation.fid import folder_batches, image_folder

    for i in range(5):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    batches = list(folder_batches(image_folder(tmp_path), batch=2))
    assert [b.shape[0] for b in batches] == [2, 2, 1] and batches[0].dtype == torch.uint8
    assert int(batches[1][1, 0, 0, 0]) == 120  # sorted by name, RGB order kept
    Image.new("RGB", (30, 20)).save(tmp_path / "9.png")
    with pytest.raises(UserError, match="set the fid option size"):
        list(folder_batches(image_folder(tmp_path)))
    assert {tuple(b.shape[2:]) for b in folder_batches(image_folder(tmp_path), size=16)} == {(16, 16)}
    with pytest.raises(UserError, match="holds 0 image"):
        image_folder(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else tmp_path)


def test_groups_follow_the_erased_label():
    from concept_erase.evaluation.samples import make_samples
    from concept_erase.evaluation.prompts import PromptRow

    rows = [PromptRow(0, "a three", 10, "three", extra={"style": "plain"}),
            PromptRow(1, "a red three", 20, "three", extra={"style": "red ink"}),
            PromptRow(2, "a red four", 30, "four", extra={"style": "red ink"})]
    s = make_samples(rows, 2, ["Red Ink"])
    assert [(x.row.case_number, x.seed, x.group) for x in s] == [
        (0, 10, "retain"), (0, 11, "retain"), (1, 20, "forget"), (1, 21, "forget"), (2, 30, "forget"),
        (2, 31, "forget")]
    assert {x.attribute for x in s} == {"style"}
    assert {x.group for x in make_samples(rows, 1, [])} == {"all"}
    assert {x.attribute for x in make_samples(rows, 1, ["three"])} == {"concept"}
    with pytest.raises(UserError, match="different label columns"):
        make_samples(rows, 1, ["three", "red ink"])
