"""The CLIP judge: open_clip zero-shot over a set of classes; an image shows the concept when a concept is the
class nearest to it.

Its classes are `--classes` with the templates of their kind (`evaluation/clip.TEMPLATES`, the attacks' use), or,
without them, the run's concept and anchor prompts themselves (the stop check's use): an anchor image is then
kept when its own prompt is nearest.
"""

from __future__ import annotations

from pathlib import Path

from concept_erase.errors import UserError
from concept_erase.evaluation.clip import TEMPLATES, ZeroShotClassifier, load_open_clip
from concept_erase.judges import JUDGES, Judge, Seen, to_pil


@JUDGES.register("clip")
class ClipJudge(Judge):
    name = "clip"

    def check(self):
        given = [c.strip() for c in self.options.get("classes", "").split(",") if c.strip()]
        if given:
            if self.concept.lower() not in {c.lower() for c in given}:
                given = [self.concept] + given
            if len(given) < 2:
                raise UserError("the clip judge needs at least one class besides the concept in --classes")
            self.classes, self.templates = given, self.options.get("templates", "object")
        elif self.anchors:  # the prompts themselves, each its own class
            self.classes = self.concepts + [a for a in self.anchors if a not in self.concepts]
            self.templates = None
            self.judges_anchors = True
        else:
            raise UserError("the clip judge needs the classes to choose among: --classes 'church,tench,parachute,...' "
                            "(the concept is added if missing), or anchors to tell the concept from "
                            "(--anchor 'a prompt', repeated)")
        weights = self.options.get("clip_weights", "")
        if weights and not Path(weights).is_file():
            raise UserError(f"--clip-weights {weights}: no such file; give open_clip weights for "
                            f"{self.options.get('clip_model', 'ViT-L-14')}")

    def _classifier(self):
        if not hasattr(self, "_zero_shot"):
            model, preprocess, tokenizer = load_open_clip(self.options.get("clip_model", "ViT-L-14"),
                                                          self.options.get("clip_weights", ""))
            templates = ["{}"] if self.templates is None else TEMPLATES[self.templates]
            self._zero_shot = ZeroShotClassifier(model, preprocess, tokenizer, self.classes, templates)
        return self._zero_shot

    def load(self) -> None:
        """Load CLIP now (a check loads its judge before training, so that missing weights end the run at once)."""
        self._classifier()

    def shown(self, images, concept=None):
        """With --classes: the image's concept is the nearest class; with the prompts as classes: any concept."""
        seen = self._classifier().predict(to_pil(images))
        if self.templates is None:
            wanted = {c.lower() for c in self.concepts}
            return [Seen(s.lower() in wanted, s) for s in seen]
        return [Seen(s.lower() == c.lower(), s) for s, c in zip(seen, self.per_image(concept, len(seen)))]

    def kept(self, images, prompts):
        return [seen == p for seen, p in zip(self._classifier().predict(to_pil(images)), prompts)]

    def prompts(self, n):
        templates = TEMPLATES[self.templates or "object"]
        return [(templates[i % len(templates)].format(self.concept).rstrip("."), i) for i in range(n)]

    def settings(self):
        return {"judge": "clip", "model": self.options.get("clip_model", "ViT-L-14"), "classes": self.classes,
                "templates": self.templates or "the prompts themselves"}
