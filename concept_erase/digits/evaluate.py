"""Judging generations of the digits world: digit and style accuracy, and a domain FID.

The domain FID is the Fréchet distance between the judge's 128-d penultimate features of two
image sets (torchmetrics' FrechetInceptionDistance with the judge as its feature network). It is
NOT the standard Inception FID and is not comparable with published FID figures.
"""

from __future__ import annotations

import torch
from torch import nn

from concept_erase.digits.world import DIGIT_NAMES, STYLES, caption
from concept_erase.evaluation.sample import generate_images

DOMAIN_FID_NOTE = ("domain FID: Fréchet distance of the digits judge's 128-d features, not the standard "
                   "Inception FID; comparable only with other domain FIDs of this model")


@torch.no_grad()
def generate(pipe, prompt: str, seeds, *, steps: int, guidance: float) -> torch.Tensor:
    """Images [len(seeds), 3, H, W] in [0, 1]; seed s always gives the same starting noise."""
    seeds = [int(s) for s in seeds]  # one pipeline call, as many images as seeds
    return generate_many(pipe, [(prompt, seeds)], steps=steps, guidance=guidance, batch=max(1, len(seeds)))[0]


@torch.no_grad()
def generate_many(pipe, requests: list[tuple[str, object]], *, steps: int, guidance: float,
                  batch: int = 128) -> list[torch.Tensor]:
    """Images for every (prompt, seeds), as one float tensor per request (`evaluation.sample.generate_images`)."""
    requests = [(p, [int(s) for s in seeds]) for p, seeds in requests]
    flat = [(p, s) for p, seeds in requests for s in seeds]
    every = generate_images(pipe, [p for p, _ in flat], [s for _, s in flat], steps=steps, guidance=guidance,
                            batch=batch)
    return list(every.split([len(seeds) for _, seeds in requests]))


class JudgeFeatures(nn.Module):
    """The judge's penultimate features, in the shape torchmetrics' FID expects of a feature network."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge
        self.num_features = judge.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.embed(images.float().to(self.judge.device)).double()


def domain_fid(judge, generated: torch.Tensor, real: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=True, input_img_size=(3, 32, 32),
                                   sync_on_compute=False)
    with torch.no_grad():
        fid.update(real, real=True)
        fid.update(generated, real=False)
        return float(fid.compute())


@torch.no_grad()
def judge_generations(pipe, judge, *, seeds=range(16), steps: int = 25, guidance: float = 4.0,
                      digit_list=range(10), styles=STYLES) -> dict:
    """Generate every (digit, style) prompt for each seed; the judge says what it sees."""
    rows, per_digit = [], {}
    correct_digit = correct_style = total = 0
    for style in styles:
        for d in digit_list:
            images = generate(pipe, caption(d, style), seeds, steps=steps, guidance=guidance)
            pd, ps = judge.predict(images)
            hit_d = int((pd == d).sum())
            hit_s = int((ps == STYLES.index(style)).sum())
            correct_digit += hit_d
            correct_style += hit_s
            total += len(images)
            per_digit.setdefault(DIGIT_NAMES[d], [0, 0])
            per_digit[DIGIT_NAMES[d]][0] += hit_d
            per_digit[DIGIT_NAMES[d]][1] += len(images)
            rows.append({"prompt": caption(d, style), "digit_accuracy": hit_d / len(images),
                         "style_accuracy": hit_s / len(images)})
    return {"digit_accuracy": correct_digit / total, "style_accuracy": correct_style / total,
            "per_digit": {k: v[0] / v[1] for k, v in per_digit.items()}, "images": total,
            "seeds": len(list(seeds)), "steps": steps, "guidance": guidance, "prompts": rows}
