"""The tables of what plugs in by name, in the bottom layer: the settings check a name against them without
importing the code that fills them. Each table lists the modules that register its entries (`providers`); they are
imported the first time the table is read, so a name is known whether or not its module was imported before.

- `LAMBDA_CONTROLLERS` and `EDITS`: the trained methods (`methods/controllers.py`) and the closed-form edits
  (`methods/edits.py`); `--method` names one of either.
- `FORGET_OBJECTIVES` and `RETAIN_OBJECTIVES`: `--forget-loss` and `--retain-loss` (`methods/objectives.py`).
- `JUDGES`: what reads an image for a concept (`--stop-judge`, `attack --judge`): `clip` and `nudity` (`judges/`), and
  each built-in model's own from its world's package (`embedded.WORLD_PACKAGES`).
- `TRACKERS`: `--report-to`, with the packages each needs (`check_trackers`); `training/tracking.py` drives them.

The other tables live beside their only readers (metrics, attacks, families, embedded models)."""

from __future__ import annotations

import importlib.util

from concept_erase.embedded import WORLD_PACKAGES
from concept_erase.errors import UserError
from concept_erase.registry import Registry

LAMBDA_CONTROLLERS: Registry[type] = Registry("method", "--method", providers=("concept_erase.methods.controllers",))
EDITS: Registry = Registry("method", "--method", providers=("concept_erase.methods.edits",))
FORGET_OBJECTIVES: Registry[type] = Registry("forget loss", "--forget-loss",
                                             providers=("concept_erase.methods.objectives",))
RETAIN_OBJECTIVES: Registry[type] = Registry("retain loss", "--retain-loss",
                                             providers=("concept_erase.methods.objectives",))

JUDGES: Registry = Registry("judge", "--judge", providers=("concept_erase.judges.clip", "concept_erase.judges.nudity",
                                                        *(f"{w}.judge" for w in WORLD_PACKAGES)))

TRACKERS = ("none", "tensorboard", "wandb", "all")


def tracker_names(report_to: str) -> list[str]:
    return {"none": [], "all": ["tensorboard", "wandb"]}.get(report_to, [report_to])


def check_trackers(report_to: str, flag: str = "--report-to") -> None:
    """At the door: an unknown tracker or one whose package is missing is a one-line message."""
    if report_to not in TRACKERS:
        raise UserError(f"{flag} {report_to!r} is not a tracker; use one of: {', '.join(TRACKERS)}")
    for name in tracker_names(report_to):
        if name == "tensorboard" and not (importlib.util.find_spec("tensorboard")
                                          or importlib.util.find_spec("tensorboardX")):
            raise UserError(f"{flag} {report_to}: the tensorboard package is not installed; "
                            "pip install 'concept-erase[tensorboard]' (or tensorboard)")
        if name == "wandb" and not importlib.util.find_spec("wandb"):
            raise UserError(f"{flag} {report_to}: the wandb package is not installed; pip install wandb "
                            "(and `wandb login`, or WANDB_MODE=offline)")
