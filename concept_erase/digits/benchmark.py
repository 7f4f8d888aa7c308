"""The digits world as the benchmark reads it (`bench.world.BenchWorld`): what it erases (a digit or a style), the
prompts it trains on, and how a run is judged by the shipped judge: forget and retain accuracy, the nearest concepts,
the prompt tiers (a digit in every other style), the domain FID, and a chain of erased digits judged at once."""

from __future__ import annotations

import torch

from concept_erase.digits.evaluate import domain_fid, generate_many
from concept_erase.digits.judge import load_network
from concept_erase.digits.world import DIGIT_NAMES, STYLES, build, caption, trained_styles
from concept_erase.image_seeds import seed_range

# ---------------------------------------------------------------- what is erased, and how it is judged

def concept_prompts(concept: str) -> tuple[list[str], list[str]]:
    """(concept prompts, anchor prompts) for a digit or a style of the digits world."""
    if concept in DIGIT_NAMES:
        d = DIGIT_NAMES.index(concept)
        return [caption(d)], [caption(o) for o in range(10) if o != d]
    return ([caption(d, concept) for d in range(10)],
            [caption(d, s) for s in STYLES if s != concept for d in range(10)])


def erase_relative_to(concept: str) -> list[str]:
    """A style is erased relative to the same caption without it (negative guidance away from the style,
    not from the digit); a digit relative to the empty prompt, as ESD does."""
    return [] if concept in DIGIT_NAMES else [caption(d) for d in range(10)]


def judged_items(concept: str, seeds: int) -> tuple[list, list]:
    """(forget, retain) as (digit, style, images) for `seeds` images per prompt: a digit is judged on its
    one caption and the other nine; a style on every digit in it (half as many images per prompt) and
    every digit in each other style (a quarter)."""
    if concept in DIGIT_NAMES:
        d = DIGIT_NAMES.index(concept)
        return [(d, "plain", seeds)], [(o, "plain", seeds) for o in range(10) if o != d]
    return ([(d, concept, max(2, seeds // 2)) for d in range(10)],
            [(d, s, max(2, seeds // 4)) for s in STYLES if s != concept for d in range(10)])


def tier_items(concept: str, seeds: int) -> dict[str, tuple[list, list]]:
    """The prompt tiers of a digit's evaluation: per style other than plain, (forget, retain) as (digit, style,
    images): the digit in that style on every seed, the other nine in it on a quarter of them (at least 2). A style
    concept has no tiers (the world draws one style per image)."""
    if concept not in DIGIT_NAMES:
        return {}
    d = DIGIT_NAMES.index(concept)
    return {s: ([(d, s, seeds)], [(o, s, max(2, seeds // 4)) for o in range(10) if o != d])
            for s in STYLES if s != "plain"}


def judged_images(concept: str, seeds: int) -> int:
    return sum(n for part in judged_items(concept, seeds) for _, _, n in part)


class Judging:
    """Forget and retain accuracy (and the domain FID) of a pipeline for one erased concept.

    `seeds` images per prompt for the evaluations during training (the curve), `final_seeds` for the
    base model's and each run's final evaluation, the figures the report's means are taken over.
    """

    def __init__(self, concept: str, seeds: int, steps: int, guidance: float, final_seeds: int | None = None,
                 seed_start: int = 0):
        self.concept, self.steps, self.guidance = concept, steps, guidance
        self.seeds, self.final_seeds = seeds, final_seeds or seeds
        self.seed_start = int(seed_start)  # the evaluation's image seeds: seed_start, seed_start + 1, ...
        self.nearest: list[str] = []  # the concepts whose retain accuracy is reported on its own
        self.judge = load_network()
        test = build("test")
        wanted = {(d, STYLES.index(s)) for d, s, _ in self.items(1)[1]}
        keep = torch.tensor([(int(a), int(b)) in wanted for a, b in zip(test.digits, test.styles)])
        self.real = test.images[keep]

    def items(self, seeds: int) -> tuple[list, list]:
        return judged_items(self.concept, seeds)

    def images(self, final: bool) -> int:
        """How many images one evaluation generates."""
        return judged_images(self.concept, self.final_seeds if final else self.seeds)

    def _draw(self, pipe, items) -> list:
        seeds = lambda n: seed_range(self.seed_start, n)  # noqa: E731
        return generate_many(pipe, [(caption(d, s), seeds(n)) for d, s, n in items], steps=self.steps,
                             guidance=self.guidance)

    @torch.no_grad()
    def _nearest(self, images: torch.Tensor, count: int = 2) -> list[str]:
        """The `count` concepts the judge finds most alike the erased one in the model's own images of it: for a
        digit, the digits with the highest mean probability on its images after itself; for a style, the styles
        likewise. Found on the base model once per concept (its final evaluation's forget images), so that
        "near" is a property of the model and the judge, not of a run."""
        logits_d, logits_s = self.judge(images.to(self.judge.device, self.judge.dtype))
        if self.concept in DIGIT_NAMES:
            p = torch.softmax(logits_d.float(), 1).mean(0)
            p[DIGIT_NAMES.index(self.concept)] = -1
            return [DIGIT_NAMES[i] for i in p.argsort(descending=True)[:count].tolist()]
        p = torch.softmax(logits_s.float(), 1).mean(0)
        p[STYLES.index(self.concept)] = -1
        return [STYLES[i] for i in p.argsort(descending=True)[:count].tolist()]

    def _is_near(self, digit: int, style: str) -> bool:
        """A retain prompt of one of the nearest concepts (a digit's plain caption; any digit in a near style)."""
        return (DIGIT_NAMES[digit] if self.concept in DIGIT_NAMES else style) in self.nearest

    @torch.no_grad()
    def tiers(self, pipe) -> dict[str, dict]:
        """Forget and retain counts in each style other than plain (`tier_items`, the final evaluation's seeds): a
        digit counts as drawn when the judge names it, whatever the style it sees."""
        parts = tier_items(self.concept, self.final_seeds)
        every = [item for forget, retain in parts.values() for item in forget + retain]
        made = iter(self._draw(pipe, every))
        out = {}
        for style, (forget, retain) in parts.items():
            counts = {}
            for side, items in (("forget", forget), ("retain", retain)):
                hits = n = near_hits = near_n = 0
                for d, s, _ in items:
                    images = next(made)
                    hit = int((self.judge.predict(images)[0] == d).sum())
                    hits, n = hits + hit, n + len(images)
                    if side == "retain" and self.nearest and self._is_near(d, s):
                        near_hits, near_n = near_hits + hit, near_n + len(images)
                counts.update({f"{side}_hits": hits, f"{side}_images": n, f"{side}_accuracy": hits / n})
                if near_n:  # the erased digit's nearest digits in this style (near-concept damage under the modifier)
                    counts.update({"near_retain_hits": near_hits, "near_retain_images": near_n,
                                   "near_retain_accuracy": near_hits / near_n})
            out[style] = counts
        return out

    @torch.no_grad()
    def __call__(self, pipe, *, fid: bool = True, final: bool = False, find_nearest: bool = False) -> dict:
        """The evaluation; with find_nearest (the base model's) the nearest concepts are first found from its
        forget images and kept for every later evaluation."""
        forget_items, retain_items = self.items(self.final_seeds if final else self.seeds)
        every = forget_items + retain_items
        made = self._draw(pipe, every)
        hits = []  # per prompt: (digit, style, images, hits)
        for i, ((d, s, _), images) in enumerate(zip(every, made)):
            pd, ps = self.judge.predict(images)
            if self.concept in DIGIT_NAMES:
                hit = int((pd == d).sum())
            elif i < len(forget_items):
                hit = int((ps == STYLES.index(s)).sum())
            else:
                hit = int(((pd == d) & (ps == STYLES.index(s))).sum())
            hits.append((d, s, images, hit))
        forget, retain = hits[:len(forget_items)], hits[len(forget_items):]
        if find_nearest:
            self.nearest = self._nearest(torch.cat([x[2] for x in forget]))
        n_f = sum(len(x[2]) for x in forget)
        n_r = sum(len(x[2]) for x in retain)
        f_hits, r_hits = sum(h for *_, h in forget), sum(h for *_, h in retain)
        result = {"forget_accuracy": f_hits / n_f, "retain_accuracy": r_hits / n_r, "images": n_f + n_r,
                  "forget_images": n_f, "forget_hits": f_hits, "retain_images": n_r, "retain_hits": r_hits,
                  "seed_start": self.seed_start}
        if self.nearest:
            near = [x for x in retain if self._is_near(x[0], x[1])]
            far = [x for x in retain if not self._is_near(x[0], x[1])]
            for name, part in (("near", near), ("far", far)):
                n = sum(len(x[2]) for x in part)
                result[f"{name}_retain_hits"] = sum(h for *_, h in part)
                result[f"{name}_retain_images"] = n
                result[f"{name}_retain_accuracy"] = result[f"{name}_retain_hits"] / n if n else None
            result["nearest"] = list(self.nearest)
        if fid:
            result["domain_fid"] = domain_fid(self.judge, torch.cat([x[2] for x in retain]), self.real)
        return result


class ChainJudging:
    """Every digit's plain caption on `seeds` image seeds from `seed_start`, judged at once: per digit the share the
    judge names as that digit, and the domain FID of any set of digits' images against the real test images of the
    same digits (the sequential benchmark's evaluation after each request)."""

    def __init__(self, seeds: int, steps: int, guidance: float, seed_start: int):
        self.seeds, self.steps, self.guidance = int(seeds), int(steps), float(guidance)
        self.seed_start = int(seed_start)
        self.judge = load_network()
        test = build("test")
        plain = test.styles == STYLES.index("plain")
        self.real = {d: test.images[plain & (test.digits == d)] for d in range(10)}

    @torch.no_grad()
    def draw(self, pipe) -> list[torch.Tensor]:
        """Every digit's caption on the evaluation's seeds: one tensor of images per digit."""
        return generate_many(pipe, [(caption(d), seed_range(self.seed_start, self.seeds)) for d in range(10)],
                             steps=self.steps, guidance=self.guidance)

    @torch.no_grad()
    def score(self, made: list[torch.Tensor], erased: list[str]) -> dict:
        """Forget accuracy of each erased digit, retain accuracy and domain FID of the digits never erased."""
        hits = [int((self.judge.predict(images)[0] == d).sum()) for d, images in enumerate(made)]
        gone = [DIGIT_NAMES.index(c) for c in erased]
        kept = [d for d in range(10) if d not in gone]
        n = self.seeds
        return {"forget_by_concept": {DIGIT_NAMES[d]: hits[d] / n for d in gone},
                "forget_hits": sum(hits[d] for d in gone), "forget_images": n * len(gone),
                "retain_hits": sum(hits[d] for d in kept), "retain_images": n * len(kept),
                "retain_accuracy": sum(hits[d] for d in kept) / (n * len(kept)) if kept else None,
                "domain_fid": domain_fid(self.judge, torch.cat([made[d] for d in kept]),
                                         torch.cat([self.real[d] for d in kept])) if kept else None,
                "never_erased": [DIGIT_NAMES[d] for d in kept], "seed_start": self.seed_start}


class DigitsBench:
    """The digits world for `concept-erase bench` (`bench.world.BenchWorld`)."""

    name = "digits"
    kinds = (("digit", "digits"), ("style", "styles"))
    chain_kind = "digit"  # a chain is judged on every digit's caption at once
    texts = {
        "tier": "style",
        "tiers": "A digit's final evaluation also draws it in each other style (its caption with the style's phrase, "
                 "every seed) and the other nine digits in that style (a quarter of the seeds, at least 2); a digit "
                 "counts as drawn when the judge names it.",
        "near": "Nearest: the erased digit's two nearest digits (found on the base model's plain images) in that "
                "style.",
        "attack_prompts": "prompts of the erased concept (a digit's plain caption at seeds 0, 1, ...; a style on each "
                          "digit in turn), the digits judge",
        "chain": "every digit's caption on the split's evaluation seeds, judged by the digits judge",
    }

    def kind(self, concept: str) -> str:
        return "digit" if concept in DIGIT_NAMES else "style"

    def concept_error(self, concept: str) -> str | None:
        if concept in DIGIT_NAMES or concept in STYLES[1:]:
            return None
        return f"{concept!r} is neither a digit ({', '.join(DIGIT_NAMES)}) nor a style ({', '.join(STYLES[1:])})"

    def prompts(self, concept: str) -> tuple[list[str], list[str]]:
        return concept_prompts(concept)

    def relative_to(self, concept: str) -> list[str]:
        return erase_relative_to(concept)

    def judging(self, concept: str, seeds: int, steps: int, guidance: float, final_seeds: int | None = None,
                seed_start: int = 0) -> Judging:
        return Judging(concept, seeds, steps, guidance, final_seeds, seed_start=seed_start)

    def judged_images(self, concept: str, seeds: int) -> int:
        return judged_images(concept, seeds)

    def has_tiers(self, concept: str) -> bool:
        return bool(tier_items(concept, 1))

    def trained_tiers(self, concept_variants: list[str]) -> list[str]:
        return trained_styles(concept_variants)

    def chain_judging(self, seeds: int, steps: int, guidance: float, seed_start: int) -> ChainJudging:
        return ChainJudging(seeds, steps, guidance, seed_start)


WORLD = DigitsBench()
