"""What the benchmark erases from the digits world and how a run is judged: forget and retain accuracy
and the domain FID, from the shipped judge."""

from __future__ import annotations

from concept_erase import env  # noqa: F401


import torch

from concept_erase.digits.world import DIGIT_NAMES, STYLES, caption



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


def judged_images(concept: str, seeds: int) -> int:
    return sum(n for part in judged_items(concept, seeds) for _, _, n in part)


class Judging:
    """Forget and retain accuracy (and the domain FID) of a pipeline for one erased concept.

    `seeds` images per prompt for the evaluations during training (the curve), `final_seeds` for the
    base model's and each run's final evaluation, the figures the report's means are taken over.
    """

    def __init__(self, concept: str, seeds: int, steps: int, guidance: float, final_seeds: int | None = None):
        from concept_erase.digits.world import build
        from concept_erase.io.loading import load_judge

        self.concept, self.steps, self.guidance = concept, steps, guidance
        self.seeds, self.final_seeds = seeds, final_seeds or seeds
        self.judge = load_judge()
        test = build("test")
        wanted = {(d, STYLES.index(s)) for d, s, _ in self.items(1)[1]}
        keep = torch.tensor([(int(a), int(b)) in wanted for a, b in zip(test.digits, test.styles)])
        self.real = test.images[keep]

    def items(self, seeds: int) -> tuple[list, list]:
        return judged_items(self.concept, seeds)

    def images(self, final: bool) -> int:
        """How many images one evaluation generates."""
        return judged_images(self.concept, self.final_seeds if final else self.seeds)

    @torch.no_grad()
    def __call__(self, pipe, *, fid: bool = True, final: bool = False) -> dict:
        from concept_erase.digits.evaluate import domain_fid, generate_many

        forget_items, retain_items = self.items(self.final_seeds if final else self.seeds)
        every = forget_items + retain_items
        made = generate_many(pipe, [(caption(d, s), range(n)) for d, s, n in every], steps=self.steps, guidance=self.guidance)
        judged = []
        for (d, s, _), images in zip(every, made):
            pd, ps = self.judge.predict(images)
            judged.append((d, STYLES.index(s), images, pd, ps))
        forget, retain = judged[:len(forget_items)], judged[len(forget_items):]
        if self.concept in DIGIT_NAMES:
            f_hits = sum(int((pd == d).sum()) for d, _, _, pd, _ in forget)
            r_hits = sum(int((pd == d).sum()) for d, _, _, pd, _ in retain)
        else:
            f_hits = sum(int((ps == s).sum()) for _, s, _, _, ps in forget)
            r_hits = sum(int(((pd == d) & (ps == s)).sum()) for d, s, _, pd, ps in retain)
        n_f = sum(len(x[2]) for x in forget)
        n_r = sum(len(x[2]) for x in retain)
        result = {"forget_accuracy": f_hits / n_f, "retain_accuracy": r_hits / n_r, "images": n_f + n_r,
                  "forget_images": n_f}
        if fid:
            result["domain_fid"] = domain_fid(self.judge, torch.cat([x[2] for x in retain]), self.real)
        return result
