"""Models shipped inside the package (`--model builtin:NAME`), each with the judge that reads its images and the
prompt templates of its world. The package that ships one registers it here (`WORLD_PACKAGES`), so that loading,
stopping, the prompt variants and the benchmark need not know them by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from concept_erase.registry import Registry


@dataclass(frozen=True)
class EmbeddedModel:
    """`folder` holds `pipeline/` (a diffusers folder) beside the model's card; `rebuild`, the command that writes it
    again; `judge`, the name (in `judges.JUDGES`) of the judge that reads this model's images and no other's;
    `templates`, what `--concept-variants auto` means on this model, and `takes_template(prompt, template)`, which
    prompts a template applies to (None: every prompt); `drawing`, the sampler steps and guidance its images are
    drawn with where a command is not told (its evaluation suite's); `benchmark`, where given, returns the world
    `concept-erase bench` reads (`bench.world.BenchWorld`: its concepts, prompts and judging), imported on use."""

    name: str
    folder: Path
    rebuild: str
    judge: str
    templates: tuple = ()
    drawing: dict = field(default_factory=dict, compare=False)
    takes_template: Callable | None = field(default=None, compare=False)
    benchmark: Callable | None = field(default=None, compare=False)

    @property
    def pipeline(self) -> Path:
        return self.folder / "pipeline"


# The packages of the shipped models' worlds. Each registers, on import, its models (the package), the judge that
# reads their images (its `judge` module, in `judges.JUDGES`) and its evaluation metrics (its `metrics` module, in
# `evaluation.metrics.METRICS`): the one place that names them.
WORLD_PACKAGES = ("concept_erase.digits",)

EMBEDDED: Registry[EmbeddedModel] = Registry("built-in model", "--model", providers=WORLD_PACKAGES)


def register(model: EmbeddedModel) -> EmbeddedModel:
    return EMBEDDED.register(model.name)(model)


def embedded_model(name: str) -> EmbeddedModel | None:
    """The embedded model `name` (`builtin:` left off), or None."""
    return EMBEDDED.get(name) if name in EMBEDDED else None


def embedded_models() -> list[EmbeddedModel]:
    return [EMBEDDED.get(n) for n in EMBEDDED.names()]


def embedded_source(source: str) -> EmbeddedModel | None:
    """The embedded model a `--model` value names: `builtin:NAME`, or the path of its shipped pipeline folder."""
    if source.startswith("builtin:"):
        return embedded_model(source.split(":", 1)[1])
    try:
        path = Path(source).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((m for m in embedded_models() if m.pipeline.resolve() == path), None)
