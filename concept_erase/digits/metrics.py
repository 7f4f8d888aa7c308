"""The digits world's metrics for `concept-erase eval`: the shipped judge's digit and style accuracy (`judge`) and
the Fréchet distance in its feature space against real held-out renderings (`domain_fid`). They register into
`evaluation.metrics.METRICS` when that table is first read, and judge only the embedded digits models' images."""

from __future__ import annotations

import torch

from concept_erase.digits.evaluate import DOMAIN_FID_NOTE, domain_fid
from concept_erase.digits.judge import judge_input, load_network
from concept_erase.digits.world import DIGIT_NAMES, STYLES, build
from concept_erase.errors import UserError
from concept_erase.evaluation.metrics import METRICS, Metric, accuracy_value
from concept_erase.evaluation.samples import Sample, labels
from concept_erase.io.loading import embedded_model_of


def _digits_labels(samples: list[Sample]) -> None:
    for s in samples:
        lab = labels(s.row)
        if lab["concept"] not in DIGIT_NAMES or lab.get("style") not in STYLES:
            raise UserError(f"the judge reads the digits world only: case {s.row.case_number} has concept "
                            f"{lab['concept']!r} and style {lab.get('style')!r} (use prompts/digits.csv)")


def _digits_only(metric: str, pipe) -> None:
    world = embedded_model_of(pipe)
    if world is None or world.judge != "digits":
        raise UserError(f"the {metric!r} metric judges images of the embedded digits models (builtin:digits, "
                        "builtin:digits-flow); this model is not one of them: use a suite with clip, fid or nudity")


class DigitsMetric(Metric):
    """A metric of the digits world: its prompts must name a digit and a style, its model be a digits model."""

    def check(self, samples):
        _digits_labels(samples)

    def check_model(self, pipe):
        _digits_only(self.name, pipe)


@METRICS.register("judge")
class JudgeAccuracy(DigitsMetric):
    """The embedded model's judge: digit and style heads (98.7% / 99.3% on held-out real renderings)."""

    name = "judge"
    help = "the digits models' own classifier: digit and style accuracy per group (builtin:digits, builtin:digits-flow)"

    def score(self, ctx):
        judge = load_network()
        out = []
        for group in ctx.groups:
            _, samples, images = ctx.select(group)
            pd, ps = judge.predict(judge_input(images))
            digits = [DIGIT_NAMES[i] for i in pd.tolist()]
            styles = [STYLES[i] for i in ps.tolist()]
            d = accuracy_value(digits, [s.row.concept for s in samples])
            st = accuracy_value(styles, [labels(s.row)["style"] for s in samples])
            main = st if ctx.attribute == "style" else d
            out.append(self.record(group, {"accuracy": main["accuracy"], "digit_accuracy": d["accuracy"],
                                           "style_accuracy": st["accuracy"], "images": len(samples),
                                           "per_class": main["per_class"]},
                                   {"judge": "concept_erase/digits/model/judge", "attribute": ctx.attribute,
                                    "accuracy_of": "style head" if ctx.attribute == "style" else "digit head"}))
        return out


@METRICS.register("domain_fid")
class DomainFID(DigitsMetric):
    """Fréchet distance of the judge's 128-d features against real held-out renderings of the same labels."""

    name = "domain_fid"
    help = "FID in the digits judge's feature space against real held-out digits (the digits models)"

    def score(self, ctx):
        judge = load_network()
        test = build("test")
        out = []
        for group in ctx.base_groups:  # a distance between sets: the groups whole, not their tiers' few images
            _, samples, images = ctx.select(group)
            wanted = {(DIGIT_NAMES.index(s.row.concept), STYLES.index(labels(s.row)["style"])) for s in samples}
            keep = torch.tensor([(int(d), int(st)) in wanted for d, st in zip(test.digits, test.styles)])
            real = test.images[keep]
            value = domain_fid(judge, judge_input(images), real) if len(images) > 1 else float("nan")
            out.append(self.record(group, {"domain_fid": value, "images": len(images), "reference_images": len(real)},
                                   {"note": DOMAIN_FID_NOTE, "reference": "real held-out renderings of the same labels"}))
        return out
