"""The digits world: real handwritten digits (scikit-learn's 1,797 8x8 scans) in five renderings.

This is the data of the embedded default model and of its judge. Objects are the ten digits;
styles are renderings of the same real strokes: plain black ink, red ink, blue ink, inverted
(white on black) and bold (dilated strokes). A fixed fifth of the scans is held out for the judge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from concept_erase.variants import Template, resolve

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STYLES = ["plain", "red ink", "blue ink", "inverted", "bold"]
STYLE_WORDS = {"plain": "", "red ink": " in red ink", "blue ink": " in blue ink",
               "inverted": " in white on black", "bold": " in bold strokes"}
# The style phrases as prompt variants (`concept_erase.variants`): a digit's caption inside each style.
STYLE_TEMPLATES = tuple(Template("{}" + words, style) for style, words in STYLE_WORDS.items() if words)
IMAGE_SIZE = 32
HOLDOUT_SEED = 1234
HOLDOUT_FRACTION = 0.2


def caption(digit: int, style: str = "plain") -> str:
    """'a handwritten digit seven', 'a handwritten digit seven in red ink'."""
    return f"a handwritten digit {DIGIT_NAMES[digit]}{STYLE_WORDS[style]}"


def takes_style(prompt: str, template: Template) -> bool:
    """Whether a style template applies to a prompt: not to one that already has a style (the world draws one
    style per image)."""
    styled = any(words and words.strip() in prompt for words in STYLE_WORDS.values())
    return not (styled and template.tier in STYLE_WORDS)


def trained_styles(concept_variants: list[str]) -> list[str]:
    """The styles a run with these --concept-variants trained a digit in (plain always): a style template's words
    among the templates they name, whatever the file or tier they came from."""
    texts = {t.text for t in resolve(concept_variants, STYLE_TEMPLATES)}
    return ["plain"] + [t.tier for t in STYLE_TEMPLATES if t.text in texts]


def load_scans() -> tuple[torch.Tensor, torch.Tensor]:
    """The real scans as ink intensity in [0, 1], shape [1797, 8, 8], and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def split_indices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of the scans: fixed forever by HOLDOUT_SEED."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    k = int(round(n * HOLDOUT_FRACTION))
    return perm[k:].sort().values, perm[:k].sort().values


def ink(scans: torch.Tensor) -> torch.Tensor:
    """8x8 intensities -> 32x32 ink maps in [0, 1] (smooth strokes from bicubic upsampling)."""
    x = F.interpolate(scans[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    return x.clamp(0, 1)


_INK_COLOURS = {"plain": (0.0, 0.0, 0.0), "red ink": (0.85, 0.05, 0.05), "blue ink": (0.05, 0.15, 0.85)}


def render(ink_maps: torch.Tensor, style: str) -> torch.Tensor:
    """Ink maps [N, 1, H, W] -> RGB images in [0, 1], [N, 3, H, W], in one style."""
    if style == "bold":
        ink_maps = F.max_pool2d(ink_maps, 3, stride=1, padding=1)
        style = "plain"
    if style == "inverted":
        return ink_maps.expand(-1, 3, -1, -1).clone()  # white strokes on black
    colour = torch.tensor(_INK_COLOURS[style]).view(1, 3, 1, 1)
    return (1 - ink_maps) * 1.0 + ink_maps * colour  # coloured strokes on white paper


@dataclass
class DigitsData:
    images: torch.Tensor  # [N, 3, 32, 32] in [0, 1]
    digits: torch.Tensor  # [N]
    styles: torch.Tensor  # [N] index into STYLES
    source: torch.Tensor  # [N] index of the scan it was rendered from

    def captions(self) -> list[str]:
        return [caption(int(d), STYLES[int(s)]) for d, s in zip(self.digits, self.styles)]


def build(split: str) -> DigitsData:
    """Every scan of the split rendered in every style: each image has one style (or none)."""
    scans, labels = load_scans()
    train, held = split_indices(len(scans))
    idx = {"train": train, "test": held}[split]
    maps = ink(scans[idx])
    parts = [render(maps, s) for s in STYLES]
    n = len(idx)
    return DigitsData(
        images=torch.cat(parts),
        digits=labels[idx].repeat(len(STYLES)),
        styles=torch.arange(len(STYLES)).repeat_interleave(n),
        source=idx.repeat(len(STYLES)),
    )
