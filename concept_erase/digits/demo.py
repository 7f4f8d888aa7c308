"""The demo: erase one digit from the embedded model with EUPMU, and measure before and after.

Forget accuracy: the judge still recognises the erased digit in its generations (lower is better).
Retain accuracy: the judge recognises each of the other nine digits in theirs (higher is better).
Domain FID: the other nine digits' generations against their real held-out renderings.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from concept_erase.config import RECIPES, build_config, is_edit, load_yaml, settings_for
from concept_erase.digits.evaluate import DOMAIN_FID_NOTE, domain_fid, generate_many
from concept_erase.digits.judge import load_network
from concept_erase.digits.world import DIGIT_NAMES, STYLE_WORDS, STYLES
from concept_erase.digits.world import build as build_digits
from concept_erase.digits.world import caption, trained_styles
from concept_erase.errors import UserError
from concept_erase.evaluation.grids import labelled_grid
from concept_erase.export.delta import apply
from concept_erase.families.base import family_of
from concept_erase.image_seeds import describe, seed_range
from concept_erase.io.atomic import atomic_dir, atomic_path, write_json, write_text
from concept_erase.io.loading import load_pipeline
from concept_erase.methods.stopping import check_seeds
from concept_erase.training.trainer import erase

FORGET_TARGET = 0.10  # forget accuracy at most 10%
RETAIN_DROP = 0.05  # retain accuracy at most 5 points below the base model's


def evaluate(pipe, judge, erased: int, seeds, *, steps: int, guidance: float,
             real_by_digit: dict) -> tuple[dict, torch.Tensor]:
    """Every digit in every style (the prompt tiers: the bare caption is the plain style), judged. The headline
    figures are the bare caption's; `tiers` holds each style's. The erased digit is drawn on every seed in every
    style, the other digits on every seed in plain and on a quarter of them (at least 2) in the other styles.
    Images: the plain ones [digit, seed, 3, H, W] and the erased digit's [style, seed, 3, H, W]."""
    seeds = list(seeds)
    few = seeds[:max(2, len(seeds) // 4)]
    others = [d for d in range(10) if d != erased]
    requests = [(caption(d, style), seeds if style == "plain" or d == erased else few)
                for style in STYLES for d in range(10)]
    drawn = generate_many(pipe, requests, steps=steps, guidance=guidance)
    tiers = {}
    for k, style in enumerate(STYLES):
        per_digit = {}
        for d in range(10):
            pred, _ = judge.predict(drawn[k * 10 + d])
            per_digit[DIGIT_NAMES[d]] = float((pred == d).float().mean())
        tiers[style] = {"forget_accuracy": per_digit[DIGIT_NAMES[erased]],
                        "retain_accuracy": sum(per_digit[DIGIT_NAMES[d]] for d in others) / len(others),
                        "per_digit": per_digit, "seeds": len(seeds), "other_digits_seeds": len(seeds if k == 0 else few)}
    plain = tiers["plain"]
    result = {
        "forget_accuracy": plain["forget_accuracy"],
        "retain_accuracy": plain["retain_accuracy"],
        "domain_fid": domain_fid(judge, torch.cat([drawn[d] for d in others]),
                                 torch.cat([real_by_digit[d] for d in others])),
        "per_digit": plain["per_digit"],
        "tiers": tiers,
    }
    return result, (torch.stack(drawn[:10]), torch.stack([drawn[k * 10 + erased] for k in range(len(STYLES))]))


def _grid(before: torch.Tensor, after: torch.Tensor, path: Path, title: str, row_labels: list[str],
          columns: int = 4) -> None:
    """One labelled row per entry of before/after [row, seed, 3, H, W]: its first `columns` seeds before the erasure,
    then the same seeds after."""
    from torchvision.transforms.functional import to_pil_image

    n = min(columns, before.shape[1])
    rows = [[to_pil_image(before[r, k]) for k in range(n)] + [to_pil_image(after[r, k]) for k in range(n)]
            for r in range(before.shape[0])]
    heads = [f"before, seed {k}" for k in range(n)] + [f"after, seed {k}" for k in range(n)]
    grid = labelled_grid(rows, column_heads=heads, row_labels=row_labels, title=title, cell=64, head_lines=2)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG")


def run_demo(output: str | Path, *, digit: str = "three", config_file: str | None = None, seeds: int = 16,
             steps: int = 25, guidance: float = 4.0, overwrite: bool = False, progress: bool = True,
             overrides: dict | None = None) -> dict:
    if digit not in DIGIT_NAMES:
        raise UserError(f"--digit {digit!r}: choose one of {', '.join(DIGIT_NAMES)}")
    erased = DIGIT_NAMES.index(digit)
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output} already exists; choose another --output or pass --overwrite")
    with atomic_dir(output, overwrite=True) as work:  # the previous demo output stays until this one is whole
        report = _run(output, work, digit, erased, config_file, seeds, steps, guidance, progress, overrides)
    return report


def _run(output: Path, work: Path, digit, erased, config_file, seeds, steps, guidance, progress, overrides) -> dict:
    started = time.time()
    recipe = Path(config_file) if config_file else RECIPES / "digits-erase.yaml"
    overrides = dict(overrides or {})
    settings = settings_for(load_yaml(recipe), overrides.get("method"))  # a closed-form edit: no training settings
    settings.update(concepts=[caption(erased)], anchors=[caption(d) for d in range(10) if d != erased],
                    output=str(work / "run"), overwrite=True, progress=progress)
    if "steps" in overrides and settings.get("stop_when_erased") and "check_every" not in overrides:
        # --steps shorter than the recipe's checks: the demo still checks, at the last step at least
        overrides["check_every"] = min(int(overrides["steps"]), int(settings.get("check_every", 10)))
    config = build_config(settings, overrides, source=str(recipe))

    seed_list = list(range(seeds))
    base = load_pipeline(config.model)
    judge = load_network()
    test = build_digits("test")
    plain = test.styles == 0
    real_by_digit = {d: test.images[plain & (test.digits == d)] for d in range(10)}

    before, before_images = evaluate(base, judge, erased, seed_list, steps=steps, guidance=guidance,
                                     real_by_digit=real_by_digit)
    t0 = time.time()
    delta = erase(config, pipe=copy.deepcopy(base))
    erase_seconds = time.time() - t0
    # fewer than config.steps where --stop-when-erased (the recipe's) stopped at a check at target
    done = len((work / "run" / "metrics.jsonl").read_text().splitlines())
    after_pipe = apply(copy.deepcopy(base), delta)
    after, after_images = evaluate(after_pipe, judge, erased, seed_list, steps=steps, guidance=guidance,
                                   real_by_digit=real_by_digit)

    checks = {
        "forget_accuracy_at_most_10pct": after["forget_accuracy"] <= FORGET_TARGET,
        "retain_within_5_points_of_base": after["retain_accuracy"] >= before["retain_accuracy"] - RETAIN_DROP,
    }
    # The same targets in every style: the digit under a modifier (prompt variants, docs/erasing.md)
    tier_checks = {
        "forget_at_most_10pct_in_every_style": all(t["forget_accuracy"] <= FORGET_TARGET
                                                   for t in after["tiers"].values()),
        "retain_within_5_points_in_every_style": all(
            after["tiers"][s]["retain_accuracy"] >= before["tiers"][s]["retain_accuracy"] - RETAIN_DROP for s in STYLES),
    }
    trained = trained_styles(config.concept_variants)
    report = {
        "model": config.model, "erased_digit": digit, "concept": config.concepts[0], "method": config.method,
        "train": family_of(base).edit_subset if is_edit(config.method) else config.train,
        "steps": done, "steps_planned": config.steps, "closed_form": is_edit(config.method),
        "stopped_when_erased": config.stop_when_erased and done < config.steps,
        "before": before, "after": after, "checks": checks, "passed": all(checks.values()),
        "tier_checks": tier_checks, "passed_every_style": all(tier_checks.values()),
        "concept_variants": list(config.concept_variants), "trained_styles": trained,
        "erase_seconds": round(erase_seconds, 1), "total_seconds": round(time.time() - started, 1),
        "evaluation": {"seeds": seeds, "image_seeds": describe(seed_range(0, seeds)),
                       "check_image_seeds": describe(check_seeds(config)) if config.stop_when_erased else None,
                       "sampling_steps": steps, "guidance": guidance,
                       "sampler": type(base.scheduler).__name__.replace("Scheduler", ""),
                       "judge": "shipped digits judge (digits/model/judge)", "domain_fid": DOMAIN_FID_NOTE},
        "erased_weights": str(output / "run" / delta.name), "settings": config.to_dict(),
    }
    report["settings"]["output"] = str(output / "run")
    write_json(work / "report.json", report)
    write_text(work / "report.md", _markdown(report))
    _grid(before_images[0], after_images[0], work / "grid.png",
          f"'{digit}' erased with {config.method}: prompt 'a handwritten digit N', same seeds before and after",
          [f"digit {name}" for name in DIGIT_NAMES])
    _grid(before_images[1], after_images[1], work / "grid-styles.png",
          f"'{digit}' erased with {config.method}: the digit in every style, same seeds before and after",
          [caption(erased, s).removeprefix("a handwritten ") for s in STYLES])
    return report


def _steps(r: dict) -> str:
    if r.get("closed_form"):
        return "one closed-form solve, no training steps"
    if r.get("stopped_when_erased"):
        return f"{r['steps']} of at most {r['steps_planned']} steps, stopped at the first erasure check at target"
    return f"{r['steps']} steps"


def _seeds_note(r: dict) -> str:
    """Which image seeds the figures come from, and that no check of the run drew them."""
    ev = r["evaluation"]
    if not ev.get("check_image_seeds"):
        return f" image {ev.get('image_seeds', 'seeds')}."
    return (f" image {ev['image_seeds']}; the run's erasure checks drew image {ev['check_image_seeds']}, so the run "
            "is judged on images that did not stop it.")


def _markdown(r: dict) -> str:
    b, a = r["before"], r["after"]
    rows = "\n".join(f"| {d} | {b['per_digit'][d]:.0%} | {a['per_digit'][d]:.0%} |" for d in DIGIT_NAMES)
    verdict = "PASSED" if r["passed"] else "MISSED"
    checks = "\n".join(f"- {k}: {'yes' if v else 'NO'}" for k, v in r["checks"].items())
    return f"""# Erasing the digit {r['erased_digit']} from the embedded model ({r.get('model', 'builtin:digits')})

Method `{r['method']}` on `{r['train']}`, {_steps(r)} ({r['erase_seconds']} s); whole demo {r['total_seconds']} s.

| metric | before | after |
|---|---|---|
| forget accuracy (judge recognises "{r['erased_digit']}"; lower is better) | {b['forget_accuracy']:.1%} | {a['forget_accuracy']:.1%} |
| retain accuracy (the other nine; higher is better) | {b['retain_accuracy']:.1%} | {a['retain_accuracy']:.1%} |
| domain FID, other nine vs real held-out (lower is better) | {b['domain_fid']:.2f} | {a['domain_fid']:.2f} |

Targets ({verdict}): forget accuracy at most 10%, retain accuracy at most 5 points below the base model.
{checks}

{_styles_section(r)}

Per digit (judge accuracy on {r['evaluation']['seeds']} seeds, {r['evaluation'].get('sampler', 'DDIM')} {r['evaluation']['sampling_steps']} steps,
guidance {r['evaluation']['guidance']}):{_seeds_note(r)}

| digit | before | after |
|---|---|---|
{rows}

Note: {r['evaluation']['domain_fid']}.

`grid.png`: one row per digit, labelled: its first four seeds before the erasure, then the same seeds after.
`grid-styles.png`: the erased digit in each style, the same seeds before and after.
"""


def _styles_section(r: dict) -> str:
    """Forget and retain in every style: the bare caption and four modifiers of it (prompt variants)."""
    b, a = r["before"].get("tiers"), r["after"].get("tiers")
    if not b:
        return ""
    trained = set(r.get("trained_styles") or ["plain"])
    rows = "\n".join(
        f"| {s}{'' if s == 'plain' else ' (' + STYLE_WORDS[s].strip() + ')'} | {'yes' if s in trained else 'no'} | "
        f"{b[s]['forget_accuracy']:.1%} | {a[s]['forget_accuracy']:.1%} | "
        f"{b[s]['retain_accuracy']:.1%} | {a[s]['retain_accuracy']:.1%} |" for s in STYLES)
    verdict = "PASSED" if r.get("passed_every_style") else "MISSED"
    checks = "\n".join(f"- {k}: {'yes' if v else 'NO'}" for k, v in r["tier_checks"].items())
    variants = ", ".join(r.get("concept_variants") or []) or "none"
    few = r["after"]["tiers"]["red ink"].get("other_digits_seeds")
    drawn = f"the erased digit on all {r['evaluation']['seeds']} seeds, the other digits on {few} in the four other styles"
    return f"""In every style (the erased digit's caption with a style phrase: {drawn}; trained with
--concept-variants {variants}):

| style | trained on | forget before | forget after | retain before | retain after |
|---|---|---|---|---|---|
{rows}

The same targets in every style ({verdict}):
{checks}"""
