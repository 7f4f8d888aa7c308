"""What the benchmark needs from the world of the model it runs on, and where it finds it.

The benchmark erases concepts of a model whose images a judge can read: the concepts it may erase and their kinds,
each concept's training prompts, how a run is judged (forget, retain, nearest concepts, prompt tiers, domain FID),
and, for the sequential benchmark, how a chain of erased concepts is judged at once. An embedded model's package
supplies these (`EmbeddedModel.benchmark`); the benchmark names no world.
"""

from __future__ import annotations

from typing import Protocol

from concept_erase.embedded import embedded_models, embedded_source
from concept_erase.errors import UserError


class Judging(Protocol):
    """One concept's evaluation: `__call__(pipe, fid=, final=, find_nearest=)` gives forget and retain accuracy
    (hits and images), the nearest concepts' retain, the domain FID; `tiers(pipe)`, the same per prompt tier."""

    concept: str
    seed_start: int
    nearest: list

    def __call__(self, pipe, *, fid: bool = True, final: bool = False, find_nearest: bool = False) -> dict: ...

    def tiers(self, pipe) -> dict: ...


class ChainJudging(Protocol):
    """The sequential benchmark's evaluation: `draw(pipe)` the images of every concept a chain may erase, and
    `score(images, erased)` each erased concept's forget accuracy and the never-erased ones' retain and domain FID."""

    def draw(self, pipe) -> list: ...

    def score(self, made: list, erased: list[str]) -> dict: ...


class BenchWorld(Protocol):
    """A model's world as the benchmark reads it.

    `kinds`: (kind, plural title) of the concepts, e.g. ("object", "objects"); `kind(concept)` one of them;
    `concept_error(concept)` None for a concept the world has, else what it is not, with the ones it has;
    `prompts(concept)` (concept prompts, anchor prompts) and `relative_to(concept)` (what negative guidance erases
    toward; [] for the empty prompt); `judging(...)` a `Judging`; `judged_images(concept, seeds)` how many images a
    final evaluation judges; `has_tiers(concept)`; `trained_tiers(concept_variants)` the tiers a run trained on;
    `chain_kind` the kind a sequential benchmark erases and `chain_judging(...)` its `ChainJudging`; `texts` the
    report's words on how this world is judged (keys: tier, the name of a prompt tier; tiers, near,
    attack_prompts, chain)."""

    name: str
    kinds: tuple
    chain_kind: str
    texts: dict

    def kind(self, concept: str) -> str: ...

    def concept_error(self, concept: str) -> str | None: ...

    def prompts(self, concept: str) -> tuple[list[str], list[str]]: ...

    def relative_to(self, concept: str) -> list[str]: ...

    def judging(self, concept: str, seeds: int, steps: int, guidance: float, final_seeds: int | None = None,
                seed_start: int = 0) -> Judging: ...

    def judged_images(self, concept: str, seeds: int) -> int: ...

    def has_tiers(self, concept: str) -> bool: ...

    def trained_tiers(self, concept_variants: list[str]) -> list[str]: ...

    def chain_judging(self, seeds: int, steps: int, guidance: float, seed_start: int) -> ChainJudging: ...


def benchable_models() -> list[str]:
    """The `--model` values the benchmark runs on: the embedded models whose package gives a world."""
    return [f"builtin:{m.name}" for m in embedded_models() if m.benchmark is not None]


def world_of(model: str, where: str = "") -> BenchWorld:
    """The benchmark world of a recipe's model, or a one-line error that names the models that have one."""
    embedded = embedded_source(model)
    if embedded is None or embedded.benchmark is None:
        raise UserError(f"{where + ': ' if where else ''}the benchmark runs on a built-in model whose judge knows its "
                        f"world ({', '.join(benchable_models())}), not {model!r}; give a recipe with one of them")
    return embedded.benchmark()


def world_record(world: BenchWorld, concepts) -> dict:
    """What a report stores of the world its runs were judged in, so that it renders from its JSON alone: the kinds
    of concept, each run concept's kind, the chain kind and the sentences that say how a run is judged."""
    return {"name": world.name, "kinds": [list(k) for k in world.kinds], "chain_kind": world.chain_kind,
            "concept_kinds": {c: world.kind(c) for c in dict.fromkeys(concepts)}, "texts": dict(world.texts)}
