"""Judges: what a model's images show. One interface and one table of judges by name, read by the stop check
(`methods/stopping`), the attacks (`attacks/run`) and the benchmark.

A judge is made for the concepts of a run (prompts or names it knows) and, where it can tell them, the anchors:
  * `shown(images, concept)`: per image a `Seen`: does it still show the concept, what the judge saw, and a
    score where it has one. `concept`: which of the run's concepts the images were drawn for, one for all or one
    per image (default: its first);
  * `kept(images, prompts)`: per anchor image, is it what its prompt asks (judges with `judges_anchors` only);
  * `prompts(n)`: (prompt, seed) pairs it proposes to attack the concept with;
  * `settings()`: what a record says of it.
`check()` runs when it is made, before any model is loaded or image drawn: a concept it does not know, missing
weights or a missing package end there in one line. Its models load on first use, or at `load()`.

Images are PIL images or one float tensor [N, 3, H, W] in [0, 1] (`to_tensor`, `to_pil` convert).
`guidance`: the classifier-free guidance its verdicts are meant for, where the judge has one (the digits judge:
the scale its accuracy was measured at); None: the run's anchor guidance.

Judges plug in by name (`JUDGES`): `clip` and `nudity` here, and the built-in models' own judges from their
packages (`embedded.WORLD_PACKAGES`), registered when the table is first read (the table is in `plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from concept_erase.errors import UserError
from concept_erase.plugins import JUDGES


@dataclass(frozen=True)
class Seen:
    """A judge's verdict on one image: `shown`, the concept is still there; `label`, what it saw; `score`, its
    confidence where it has one."""

    shown: bool
    label: str = ""
    score: float | None = None


class Judge:
    name = ""
    judges_anchors = False
    guidance: float | None = None

    def __init__(self, concepts, anchors=(), options: dict | None = None):
        self.concepts = list(dict.fromkeys(str(c).strip() for c in concepts))
        self.anchors = list(dict.fromkeys(anchors))
        self.options = dict(options or {})
        if not self.concepts:
            raise UserError(f"the {self.name} judge needs the concept it judges")
        self.check()

    @property
    def concept(self) -> str:
        return self.concepts[0]

    def check(self) -> None:
        """Cheap checks before any model is loaded: the concepts are ones this judge knows, its weights exist."""

    def load(self) -> None:
        """Load its models now rather than on first use (a stop check does, before training starts)."""

    def shown(self, images, concept: str | list[str] | None = None) -> list[Seen]:
        raise NotImplementedError

    def group(self, concept: str) -> str:
        """What a check holds to its bar (and gives its floor of images) for this concept: the concept itself; a judge
        may join several into one (the digits judge: every digit's caption of a style erased whole is the style)."""
        return concept

    def per_image(self, concept, n: int) -> list[str]:
        """`concept` as one per image (default: the first concept)."""
        if concept is None or isinstance(concept, str):
            return [concept or self.concept] * n
        if len(concept) != n:
            raise ValueError(f"{len(concept)} concepts for {n} images")
        return list(concept)

    def kept(self, images, prompts: list[str]) -> list[bool]:
        raise UserError(f"the {self.name} judge cannot tell whether an anchor image is what its prompt asks")

    def prompts(self, n: int) -> list[tuple[str, int]]:
        raise UserError(f"the {self.name} judge proposes no prompts for {self.concept!r}; give --prompt-file CSV")

    def settings(self) -> dict:
        return {"judge": self.name}


def make_judge(name: str, concepts, anchors=(), options: dict | None = None, flag: str = "--judge") -> Judge:
    """The judge `name`, checked (a one-line UserError that names `flag` when there is none by that name)."""
    return JUDGES.get(name, flag)(concepts, anchors, options)


def to_tensor(images) -> torch.Tensor:
    """Float images [N, 3, H, W] in [0, 1]: a tensor as it is, PIL images through their 8-bit values."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if not len(images):
        return torch.empty(0, 3, 0, 0)
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float() / 255


def to_pil(images) -> list:
    """PIL images: a float tensor in [0, 1] rounded to 8 bits as diffusers' pipelines round their output."""
    if not isinstance(images, torch.Tensor):
        return list(images)
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]
