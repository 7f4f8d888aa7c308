"""Evaluation suites: which prompts, how many seeds, how to sample, which metrics (a YAML file in eval/).

    name: imagenette
    prompts: ../prompts/imagenette.csv   # relative to this file
    prompts_form: auto                   # project | i2p | coco | auto
    seeds_per_prompt: 10
    steps: 50
    guidance: 7.5                        # a row's own guidance wins
    batch_size: 8
    negative_prompt: ""                  # optional: of every image
    metrics:
      clip_classifier: {model: ViT-L-14, pretrained: openai, templates: object}
      clip_score: {model: openai/clip-vit-large-patch14}
      fid: {reference: base}             # base: the model without the erasure, same prompts and seeds
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from concept_erase.yaml_files import read_yaml, whole_number
from concept_erase.errors import UserError

METRIC_OPTIONS = {
    "judge": set(),
    "domain_fid": set(),
    "clip_classifier": {"model", "pretrained", "weights", "templates", "attribute"},
    "style": {"model", "pretrained", "weights", "attribute"},
    "clip_score": {"model"},
    "fid": {"reference", "size", "weights"},
    "nudity": {"threshold"},
    "attack": {"attack", "prompts", "iterations", "timesteps", "tokens", "judge"},
}


@dataclass
class Suite:
    name: str
    prompts: Path
    prompts_form: str = "auto"
    seeds_per_prompt: int = 1
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 4
    metrics: dict = field(default_factory=dict)
    source: str = ""
    negative_prompt: str = ""  # of every image (the evaluated and the reference ones)
    dtype: str = "fp32"  # the pipeline's precision (`eval --dtype`)

    def to_dict(self) -> dict:
        return {"name": self.name, "prompts": str(self.prompts), "prompts_form": self.prompts_form,
                "seeds_per_prompt": self.seeds_per_prompt, "steps": self.steps, "guidance": self.guidance,
                "batch_size": self.batch_size, "metrics": self.metrics,
                **({"negative_prompt": self.negative_prompt} if self.negative_prompt else {}),
                **({"dtype": self.dtype} if self.dtype != "fp32" else {})}


def parse_suite(raw, source: str, base_dir: Path) -> Suite:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: an evaluation suite is a mapping (name:, prompts:, metrics:), "
                        f"not a {type(raw).__name__}")
    known = {"name", "prompts", "prompts_form", "seeds_per_prompt", "steps", "guidance", "batch_size", "metrics",
             "negative_prompt"}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r}; a suite has {', '.join(sorted(known))}")
    prompts = raw.get("prompts")
    if not isinstance(prompts, str) or not prompts:
        raise UserError(f"{source}: prompts must name a CSV file (relative to the suite file)")
    form = raw.get("prompts_form", "auto")
    if form not in ("auto", "project", "i2p", "coco"):
        raise UserError(f"{source}: prompts_form must be auto, project, i2p or coco, not {form!r}")
    guidance = raw.get("guidance", 7.5)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise UserError(f"{source}: guidance must be a finite number, 0 or more, not {guidance!r}")
    metrics = raw.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise UserError(f"{source}: metrics must map metric names to their options, e.g. metrics: {{fid: {{}}}}; "
                        f"metrics are {', '.join(METRIC_OPTIONS)}")
    clean = {}
    for name, options in metrics.items():
        if name not in METRIC_OPTIONS:
            raise UserError(f"{source}: unknown metric {name!r}; choose from {', '.join(METRIC_OPTIONS)}")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise UserError(f"{source}: the options of {name} must be a mapping, not {options!r}")
        bad = sorted(set(map(str, options)) - METRIC_OPTIONS[name])
        if bad:
            allowed = ", ".join(sorted(METRIC_OPTIONS[name])) or "none"
            raise UserError(f"{source}: {name} has no option {bad[0]!r} (options: {allowed})")
        for k, v in options.items():
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise UserError(f"{source}: {name}.{k} must be a string or a number, not {v!r}")
        clean[name] = dict(options)
    negative = raw.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise UserError(f"{source}: negative_prompt must be a string, not {negative!r}")
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name:
        raise UserError(f"{source}: name must be a string")
    return Suite(name=name, prompts=(base_dir / prompts).resolve() if not Path(prompts).is_absolute() else Path(prompts),
                 prompts_form=form, seeds_per_prompt=whole_number(raw, "seeds_per_prompt", 1, source, 1),
                 steps=whole_number(raw, "steps", 50, source, 1), guidance=float(guidance),
                 batch_size=whole_number(raw, "batch_size", 4, source, 1), metrics=clean, source=source,
                 negative_prompt=negative)


def load_suite(path: str | Path) -> Suite:

    path = Path(path)
    builtin = Path(__file__).resolve().parents[2] / "eval" / f"{path}.yaml"
    if not path.is_file() and not path.suffix and builtin.is_file():
        path = builtin
    raw = read_yaml(path, "evaluation suite", "give a YAML file such as eval/digits.yaml")
    return parse_suite(raw, str(path), path.parent)
