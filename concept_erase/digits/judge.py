"""The digits world's judge: a small CNN that names the digit and the style of a 32x32 image, and the judge
(`DigitsJudge`, registered as `digits`) that reads its verdicts for the stop check, the attacks and the benchmark.

The network is trained on the real renderings (train split) and shipped beside the embedded model. Its
penultimate features (128-d) give a *domain* FID between generated and real digits; that is not the standard
Inception FID, and every report says so.

What a concept is to the judge: a digit's name ("three") or plain caption is its digit head's verdict; a style's
name ("red ink") or a styled caption is its style head's. An anchor (a caption) is kept when both heads say what
its caption asks.
"""

from __future__ import annotations

import functools

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from concept_erase.digits.world import DIGIT_NAMES, STYLES, caption
from concept_erase.errors import UserError
from concept_erase.io.loading import embedded_model_dir
from concept_erase.judges import JUDGES, Judge, Seen, to_tensor


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2))


class DigitsClassifier(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, num_digits: int = 10, num_styles: int = 5, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width),
                                      nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.SiLU())
        self.digit_head = nn.Linear(feature_dim, num_digits)
        self.style_head = nn.Linear(feature_dim, num_styles)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [0, 1], [N, 3, 32, 32] -> [N, feature_dim]."""
        return self.features(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.embed(images)
        return self.digit_head(f), self.style_head(f)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        digits, styles = [], []
        for i in range(0, len(images), batch_size):
            d, s = self(images[i : i + batch_size].to(self.device, self.dtype))
            digits.append(d.argmax(1).cpu())
            styles.append(s.argmax(1).cpu())
        return torch.cat(digits), torch.cat(styles)


def load_network() -> DigitsClassifier:
    """The classifier shipped beside the embedded model."""
    return DigitsClassifier.from_pretrained(str(embedded_model_dir("digits") / "judge")).eval()


def judge_input(images) -> torch.Tensor:
    """What the classifier reads: float [N, 3, 32, 32] in [0, 1] (other sizes resized)."""
    x = to_tensor(images)
    if x.shape[-1] != 32 or x.shape[-2] != 32:
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x


CAPTIONS = {caption(d, s): (d, s) for d in range(len(DIGIT_NAMES)) for s in STYLES}


def _meaning(text: str) -> tuple[str, object] | None:
    """What a concept must not show: ("digit", d), ("style", s), or ("caption", (d, s)) for a digit in a style (the
    red zero: an image shows it where it is a zero in red ink; a red two or a plain zero does not); None: not the
    digits'. A plain caption is its digit."""
    t = text.strip()
    if t.lower() in DIGIT_NAMES:
        return "digit", DIGIT_NAMES.index(t.lower())
    if t.lower() in STYLES:
        return "style", STYLES.index(t.lower())
    if t in CAPTIONS:
        d, s = CAPTIONS[t]
        return ("digit", d) if s == "plain" else ("caption", (d, STYLES.index(s)))
    return None


@JUDGES.register("digits")
class DigitsJudge(Judge):
    name = "digits"
    judges_anchors = True
    guidance = 4.0  # the benchmark's and the demo's evaluation guidance

    def check(self):
        unknown = [c for c in self.concepts if _meaning(c) is None] + [a for a in self.anchors if a not in CAPTIONS]
        if unknown:
            raise UserError(f"the digits judge knows the digits' captions ('{caption(7)}', '{caption(7, 'red ink')}'), "
                            f"the digits ({', '.join(DIGIT_NAMES)}) and the styles ({', '.join(STYLES)}), "
                            f"not {unknown[0]!r}")

    def load(self):
        if not hasattr(self, "_network"):
            self._network = load_network()
        return self._network

    def heads(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's digit and style per image."""
        return self.load().predict(judge_input(images))

    @functools.cached_property
    def whole_styles(self) -> frozenset[int]:
        """The styles every digit's caption of which is among the concepts: erasing all ten is erasing the style (the
        benchmark's style concepts), judged on the style head as its evaluation judges it; a style some digit of
        which is kept (a red one among the anchors) is erased caption by caption."""
        named = {CAPTIONS[c] for c in self.concepts if c in CAPTIONS}
        return frozenset(STYLES.index(s) for s in STYLES[1:] if all((d, s) in named for d in range(len(DIGIT_NAMES))))

    def group(self, concept: str) -> str:
        meaning = _meaning(concept)
        if meaning and meaning[0] == "caption" and meaning[1][1] in self.whole_styles:
            return STYLES[meaning[1][1]]
        return concept

    def shown(self, images, concept=None):
        digits, styles = self.heads(images)
        whole = self.whole_styles
        out = []
        for c, d, s in zip(self.per_image(concept, len(digits)), digits.tolist(), styles.tolist()):
            head, wanted = _meaning(c)
            if head == "caption" and wanted[1] in whole:  # a caption of a style erased whole: the style
                head, wanted = "style", wanted[1]
            if head == "caption":
                out.append(Seen((d, s) == wanted, caption(d, STYLES[s])))
            else:
                seen = d if head == "digit" else s
                out.append(Seen(seen == wanted, (DIGIT_NAMES if head == "digit" else STYLES)[seen]))
        return out

    def kept(self, images, prompts):
        digits, styles = self.heads(images)
        return [d == CAPTIONS[p][0] and s == STYLES.index(CAPTIONS[p][1])
                for p, d, s in zip(prompts, digits.tolist(), styles.tolist())]

    def prompts(self, n):
        # the captions an erasure of the concept is given (bench, demo): a digit's plain caption, a style on each
        # digit in turn; seeds 0, 1, ...
        head, wanted = _meaning(self.concept)
        if head == "caption":
            return [(caption(wanted[0], STYLES[wanted[1]]), i) for i in range(n)]
        if head == "digit":
            return [(caption(wanted), i) for i in range(n)]
        return [(caption(i % len(DIGIT_NAMES), STYLES[wanted]), i) for i in range(n)]

    def settings(self):
        head, _ = _meaning(self.concept)
        return {"judge": "digits", "head": head, "weights": "concept_erase/digits/model/judge"}
