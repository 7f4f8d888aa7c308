"""A benchmark run's record: its schema number, the upgrade of older shapes, and the check on read.

Every record the benchmark writes carries `schema` (`RECORD_SCHEMA`) and the code's `commit`. A record is read
through `upgrade`, once, wherever it comes from (OUTPUT/runs, `--runs-from`): older shapes are brought to the
current one there, so the report has one code path, and a record that lacks what the report needs is refused
with the file's name.

Schemas:
- 1 (no `schema` field): no split, no near-concept figures, no commit.
- 2: `split` (tuning, held_out, or all in a file without splits), `commit`, `evaluation_seed_start`, the image
  counts behind each rate (`forget_hits`, `retain_hits`, `retain_images`), and the retain accuracy of the erased
  concept's nearest concepts apart from the rest (`nearest`, `near_retain_*`, `far_retain_*`).
- 3: what stopped the run (`stop_judge`: digits or signal; `stop_signal_at_most`) and `hold_erasure_at`. Older
  stopping runs were all stopped by the digits judge.
- 4: `stop_lambda_window`, the signal stop's wait for lambda at rest. Older signal stops read the signal alone (0).
- 5: `concept_variants`, the prompt templates a run trained on (`--concept-variants`). Older runs trained on the
  bare prompts ([]).
- 6: `delta_bytes`, the size of the run's `erased.safetensors` (the cost table's storage). Older runs did not
  record it (None).
- 7: `attacks`, a list: every attack a benchmark file names ran on the run (UnlearnDiffAtk, Ring-A-Bell, ...). Older
  runs held at most one, as `attack`.

A record may say `checks_lost` (why): its erasure checks were not kept, so its time to the held target is not
reported (its stop step and its evaluation stand).
"""

from __future__ import annotations

import math

from concept_erase.errors import UserError

RECORD_SCHEMA = 7

# What the report reads of every record, with the kind of value it must be.
REQUIRED = {"label": str, "concept": str, "seed": int, "forget_accuracy": float, "retain_accuracy": float,
            "base_retain_accuracy": float, "meets_target": bool}


def upgrade(record, where: str) -> dict:
    """The record in the current shape; a UserError naming `where` when it is not a benchmark run's record."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a run's record is a JSON object, not {type(record).__name__}")
    schema = record.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= RECORD_SCHEMA:
        raise UserError(f"{where}: record schema {schema!r} is not one this version reads (1 to {RECORD_SCHEMA}); "
                        "a newer concept-erase wrote it")
    for key, kind in REQUIRED.items():
        value = record.get(key)
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if kind is float else isinstance(value, kind) and not isinstance(value, bool))
        if not ok:
            raise UserError(f"{where}: the run's {key!r} is {value!r}, not a {kind.__name__}; the record is damaged "
                            "or was not written by `concept-erase bench`")
    out = dict(record)
    if schema < 2:
        out.setdefault("split", "all")
        out.setdefault("commit", None)
        out.setdefault("evaluation_seed_start", 0)
        out.setdefault("nearest", [])
        n_f = out.get("forget_images")
        if n_f and "forget_hits" not in out:
            out["forget_hits"] = round(out["forget_accuracy"] * n_f)
        n = out.get("eval_images")
        if n and n_f and "retain_images" not in out:
            out["retain_images"] = n - n_f
            out["retain_hits"] = round(out["retain_accuracy"] * (n - n_f))
    if schema < 3:  # before the stop had a judge to name: every stopping run's checks were the digits judge's
        out.setdefault("stop_judge", "digits" if out.get("stop_when_erased") else None)
        out.setdefault("stop_signal_at_most", None)
        out.setdefault("hold_erasure_at", None)
    if schema < 4:  # before the signal stop waited for lambda at rest: the signal alone
        out.setdefault("stop_lambda_window", 0 if out.get("stop_judge") == "signal" else None)
    if schema < 5:  # before prompt variants: the bare prompts
        out.setdefault("concept_variants", [])
    if schema < 6:  # before the cost table: the delta's size was not recorded
        out.setdefault("delta_bytes", None)
    if schema < 7:  # one attack at most, under its own key
        old = out.pop("attack", None)
        if old:
            out["attacks"] = [old]
    for side in ("near", "far"):
        for key in ("retain_accuracy", "retain_hits", "retain_images"):
            out.setdefault(f"{side}_{key}", None)
        out.setdefault(f"base_{side}_retain_accuracy", None)
    out["schema"] = RECORD_SCHEMA
    return out


# What makes two runs' settings the same erasure rule, eps and the method's weight aside: the stop rule, the budget,
# the step's settings. Runs of EUPMU alike in all of these but eps lie on one eps curve, and the fixed weights alike
# in them are that curve's rivals.
CURVE_SETTINGS = ("stop_when_erased", "stop_judge", "steps_planned", "lr", "sampling_steps", "retain_loss",
                  "lambda_update", "beta", "trajectory_model", "trajectory_refresh", "hold_erasure_at",
                  "concept_variants", "check_every", "check_forget_at_most", "check_retain_drop_at_most",
                  "check_inference_steps", "check_seed_start", "check_confirm")
SWEEP_PREFIX = "eupmu eps="  # the labels an `eps_sweep:` gives its runs (the eupmu entry with eps changed)


def eps_curves(results: list[dict]) -> list[tuple[list[str], list[str]]]:
    """(the labels of one eps curve in order of eps, the labels of its fixed-weight rivals). A curve is `eps_sweep:`'s
    labels with the "eupmu" entry's, the sweep's rivals every fixed weight; or EUPMU entries whose runs share every
    `CURVE_SETTINGS` value and differ in eps (e.g. "eupmu, 150 steps" and "eupmu, eps 0.1, 150 steps"), whose rivals
    are the fixed weights with the same settings. A curve has two points at least."""
    by: dict[str, dict] = {}
    for r in results:
        by.setdefault(r["label"], r)
    fixed = [k for k in by if k.startswith("fixed")]
    curves = []
    sweep = [k for k in by if k.startswith(SWEEP_PREFIX)]
    if sweep:
        points = (["eupmu"] if "eupmu" in by else []) + sweep
        curves.append((sorted(points, key=lambda k: by[k].get("eps") or 0.0), fixed))
    key = lambda r: tuple(repr(r.get(k)) for k in CURVE_SETTINGS)  # noqa: E731
    groups: dict[tuple, list[str]] = {}
    for label, r in by.items():
        if r.get("method") == "eupmu" and not label.startswith(SWEEP_PREFIX):
            groups.setdefault(key(r), []).append(label)
    for settings, labels in groups.items():
        if len({by[k].get("eps") for k in labels}) > 1 and not any(set(labels) <= set(c) for c, _ in curves):
            rivals = [k for k in fixed if by[k].get("method") == "fixed" and key(by[k]) == settings]
            curves.append((sorted(labels, key=lambda k: by[k].get("eps") or 0.0), rivals))
    return curves
