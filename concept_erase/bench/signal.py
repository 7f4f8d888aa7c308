"""The erasure signal against the digits judge: rank correlations, the stop level's calibration, a table, a plot.

A study (`scripts/signal_study.py`) stores, for runs with no stop, an evaluation every few steps: the judge's
forget and retain accuracy and the signal's moving average at that step. Each evaluation step is where a check of
`--stop-judge signal` at the same cadence would have looked. For a candidate level, a run "stops" at the first
evaluation after step 0 whose signal is at most the level; the level is good for the run when the judge's forget
accuracy there is within the target. The calibrated level is the highest on a grid that is good for every run of
the tuning split: the earliest stop that erased every tuning run. It is then checked on held-out concepts and seeds
by the benchmark, never on the runs that chose it.

The signal reads the concept only. For the anchors the stop also waits, by default, until lambda is at rest: no
higher than it was `window` steps before (`methods/signal.LambdaTrail`). The study's runs store lambda every step,
so each window is tried on the same runs: a run is at target where it stops when its forget accuracy is within
10% and its retain accuracy at most 3 points under its step-0 value. The window chosen is the one with the most
runs at target over both models (the smallest on a tie: the earliest stops).
"""

from __future__ import annotations

import json
from pathlib import Path

from concept_erase.bench.stats import clopper_pearson, cluster_spearman_ci, spearman
from concept_erase.config import SIGNAL_STOP

FORGET_TARGET = 0.10
LEVELS = [round(0.6 - 0.05 * i, 2) for i in range(17)]  # 0.6, 0.55, ..., -0.2
RETAIN_DROP_TARGET = 0.03
WINDOWS = [0, 2, 3, 5, 8, 10, 15, 20]
FACTORS = [1, 1.25, 1.5, 2]  # a stop that goes on to this multiple of the step where the signal first said erased
CONFIRMS = [1, 2, 3]  # a stop at the N-th check in a row that says erased (--check-confirm)


def read_study(paths) -> tuple[list[dict], dict[tuple, list[dict]]]:
    """(header lines, evaluations by run: (recipe, concept, seed) -> evaluations in step order)."""
    headers, runs = [], {}
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("kind") == "study":
                headers.append(row)
            elif row.get("kind") == "evaluation":
                runs.setdefault((row["recipe"], row["concept"], row["seed"]), []).append(row)
    return headers, {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}


def read_series(paths) -> dict[tuple, dict]:
    """The per-step series of each run (`erasure_signal`, `loss_forget`, `loss_retain`, `lambda`; index i is step
    i + 1), by (recipe, concept, seed)."""
    out = {}
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("kind") == "run":
                out[(row["recipe"], row["concept"], row["seed"])] = row["series"]
    return out


def lambda_at_rest(lam: list[float], step: int, window: int) -> bool:
    """What `LambdaTrail.at_rest` says at the check after `step` steps: lambda no higher than `window` steps before
    (unknown, so not at rest, before that many steps; window 0: always)."""
    if window == 0:
        return True
    return step - 1 - window >= 0 and lam[step - 1] <= lam[step - 1 - window]


def window_stop_at(evals: list[dict], lam: list[float], level: float, window: int,
                   confirm: int = 1) -> dict | None:
    """The evaluation at which a signal stop at `level` that waits for lambda at rest over `window` steps ends the
    run, at the `confirm`-th evaluation in a row that says so (None: it never does)."""
    in_a_row = 0
    for e in evals:
        if e["step"] <= 0:
            continue
        erased = e["signal"] is not None and e["signal"] <= level and lambda_at_rest(lam, e["step"], window)
        in_a_row = in_a_row + 1 if erased else 0
        if in_a_row >= confirm:
            return e
    return None


def stops_summary(runs: dict, stops: dict) -> dict:
    """How a stop rule does over the runs, from where it stops each (`stops`: run -> evaluation, None where it never
    does): how many stop, how many are at target where they stop (forget within 10%, retain at most 3 points under
    the run's step-0 value), the stop steps, the worst retain drop and the mean forget where they stop."""
    stopped = {k: s for k, s in stops.items() if s is not None}
    drops = {k: runs_base(runs, k) - s["retain_accuracy"] for k, s in stopped.items()}
    met = sum(1 for k, s in stopped.items()
              if s["forget_accuracy"] <= FORGET_TARGET and drops[k] <= RETAIN_DROP_TARGET + 1e-9)
    return {"runs": len(runs), "stopped": len(stopped), "at_target": met,
            "at_target_ci": clopper_pearson(met, len(runs)), "stop_steps": sorted(s["step"] for s in stopped.values()),
            "worst_drop": max(drops.values(), default=None),
            "mean_forget": (sum(s["forget_accuracy"] for s in stopped.values()) / len(stopped)) if stopped else None}


def window_summary(runs: dict, series: dict, level: float, window: int) -> dict:
    """How a signal stop at `level` waiting `window` steps for lambda at rest does over the runs."""
    stops = {k: window_stop_at(evals, series[k]["lambda"], level, window) for k, evals in runs.items()}
    return {"window": window, **stops_summary(runs, stops)}


def choose_window(models: dict[str, dict], series: dict, level: float, windows=WINDOWS) -> int:
    """The window with the most runs at target where they stop, over every model's runs; the smallest on a tie."""
    def met(window):
        return sum(window_summary(runs, series, level, window)["at_target"] for runs in models.values())

    return max(windows, key=lambda w: (met(w), -w))


def delayed_stop_at(evals: list[dict], lam: list[float], level: float, window: int, factor: float) -> dict | None:
    """The evaluation at which a stop that goes on after the signal first says erased (at step s, waiting `window`
    steps for lambda at rest) to the first evaluation at or after `factor` x s ends the run (None: it never does
    within the study's steps)."""
    first = window_stop_at(evals, lam, level, window)
    if first is None:
        return None
    return next((e for e in evals if e["step"] >= factor * first["step"] - 1e-9), None)


def delay_summary(runs: dict, series: dict, level: float, window: int, factor: float) -> dict:
    """How the delayed stop does over the runs: as `window_summary`, for a stop at `factor` x the first stop step."""
    stops = {k: delayed_stop_at(evals, series[k]["lambda"], level, window, factor) for k, evals in runs.items()}
    return {"factor": factor, **stops_summary(runs, stops)}


def confirm_summary(runs: dict, series: dict, level: float, window: int, confirm: int) -> dict:
    """How a stop at the `confirm`-th check in a row that says erased does over the runs (as `window_summary`)."""
    stops = {k: window_stop_at(evals, series[k]["lambda"], level, window, confirm) for k, evals in runs.items()}
    return {"confirm": confirm, **stops_summary(runs, stops)}


def stop_at(evals: list[dict], level: float) -> dict | None:
    """The evaluation at which a signal stop at `level` ends the run (None: it never does)."""
    return next((e for e in evals if e["step"] > 0 and e["signal"] is not None and e["signal"] <= level), None)


def level_summary(runs: dict, level: float, target: float = FORGET_TARGET) -> dict:
    """How a stop at `level` does over the runs: how many stop, how many of those are erased (forget within the
    target) where they stop, and the steps at which they stop."""
    stops = [stop_at(evals, level) for evals in runs.values()]
    stopped = [s for s in stops if s is not None]
    erased = sum(1 for s in stopped if s["forget_accuracy"] <= target)
    return {"level": level, "runs": len(stops), "stopped": len(stopped), "erased_at_stop": erased,
            "erased_ci": clopper_pearson(erased, len(stops)),
            "stop_steps": sorted(s["step"] for s in stopped),
            "retain_drop_at_stop": [round(runs_base(runs, k) - s["retain_accuracy"], 4)
                                    for k, s in zip(runs, stops) if s is not None]}


def runs_base(runs: dict, key) -> float:
    """The run's retain accuracy before training (its step-0 evaluation)."""
    return next(e["retain_accuracy"] for e in runs[key] if e["step"] == 0)


def mean_forget_at_stop(runs: dict, level: float) -> float | None:
    """The mean of the judge's forget accuracy where the runs that stop at `level` stop (None: none stops)."""
    stops = [s for s in (stop_at(evals, level) for evals in runs.values()) if s is not None]
    return sum(s["forget_accuracy"] for s in stops) / len(stops) if stops else None


def calibrate(models: dict[str, dict], levels=LEVELS, target: float = FORGET_TARGET) -> float | None:
    """The highest level at which, on every model, at least half the runs stop and the forget accuracy where they
    stop is within the target on average (None: no level of the grid). A single run's figure there is a few images
    of one step, too noisy to bar alone; the mean over runs is what the benchmark's target is about."""
    def good(level):
        for runs in models.values():
            stopped = level_summary(runs, level, target)["stopped"]
            mean = mean_forget_at_stop(runs, level)
            if 2 * stopped < len(runs) or mean is None or mean > target:
                return False
        return True

    found = [lv for lv in levels if good(lv)]
    return max(found) if found else None


def correlations(runs: dict) -> dict:
    """Spearman's rank correlation of the signal with the forget and the retain accuracy, over every evaluation
    after step 0, with intervals from resampling concepts whole."""
    points = [e for evals in runs.values() for e in evals if e["step"] > 0 and e["signal"] is not None]
    signal = [e["signal"] for e in points]
    concepts = [e["concept"] for e in points]
    out = {"points": len(points), "concepts": len(set(concepts)), "runs": len(runs)}
    for side in ("forget", "retain"):
        values = [e[f"{side}_accuracy"] for e in points]
        out[side] = {"rho": spearman(signal, values), "ci": cluster_spearman_ci(signal, values, concepts)}
    return out


def by_model(runs: dict) -> dict[str, dict]:
    """The runs of each recipe (one per digits model)."""
    out: dict[str, dict] = {}
    for key, evals in runs.items():
        out.setdefault(key[0], {})[key] = evals
    return out


def _ci(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def markdown(paths, command: str, levels=LEVELS) -> str:
    headers, runs = read_study(paths)
    lines = ["# The erasure signal against the digits judge", ""]
    for h in headers:
        lines += [f"Made by `{h.get('command', '?')}` at commit `{h.get('commit') or 'unknown'}` on "
                  f"{h.get('date', '?')}; machine: {h.get('machine', '?')}.", ""]
    lines += [f"Report written by `{command}`.", "",
              "Each run erases one concept with no stop; every few steps the judge scores the model (forget and retain "
              "accuracy on the evaluation seeds) and the signal's moving average at that step is stored. Rank "
              "correlations pool every evaluation after step 0; intervals resample concepts whole (95%).", ""]
    both = {}
    for recipe, model_runs in sorted(by_model(runs).items()):
        c = correlations(model_runs)
        best = calibrate({recipe: model_runs}, levels)
        both[recipe] = model_runs
        lines += [f"## {recipe}: {c['runs']} runs, {c['concepts']} concepts, {c['points']} evaluations", "",
                  "| signal against | Spearman rho | 95% interval |", "|---|---|---|"]
        for side in ("forget", "retain"):
            rho = c[side]["rho"]
            lines.append(f"| {side} accuracy | {'-' if rho is None else f'{rho:.2f}'} | {_ci(c[side]['ci'])} |")
        lines += ["", f"Highest level at which at least half the runs stop, with a mean forget accuracy where they "
                      f"stop within {FORGET_TARGET:.0%}: {'none of the grid' if best is None else f'{best:g}'}.", ""]
        lines += _level_table(model_runs, levels)
    pooled = {k: v for r in both.values() for k, v in r.items()}
    if len(both) > 1:
        best = calibrate(both, levels)
        lines += ["## Both models together", "",
                  f"The calibrated stop level, the highest at which on each model at least half the runs stop with a "
                  f"mean forget accuracy where they stop within {FORGET_TARGET:.0%}: "
                  f"{'none of the grid' if best is None else f'{best:g}'}.", ""]
        lines += _level_table(pooled, levels)
    series = read_series(paths)
    if series and all(k in series for k in runs):
        level = calibrate(both, levels) if len(both) > 1 else calibrate(by_model(runs), levels)
        lines += _window_section(by_model(runs), series, SIGNAL_STOP if level is None else level)
        lines += _delay_section(by_model(runs), series, SIGNAL_STOP if level is None else level)
        lines += _confirm_section(by_model(runs), series, SIGNAL_STOP if level is None else level)
    return "\n".join(lines).rstrip() + "\n"


_STOPS_COLUMNS = ("| runs stopped | at target where stopped | exact 95% interval | mean forget where stopped | retain "
                  "drop at stop, worst | stop step, median (range) |")


def _window_section(models: dict[str, dict], series: dict, level: float) -> list[str]:
    chosen = choose_window(models, series, level)
    lines = ["## The anchors: waiting for lambda at rest", "",
             f"At stop level {level:g}, a stop that also waits until lambda is no higher than it was `window` steps "
             f"before (window 0: the signal alone). At target where it stops: forget accuracy within "
             f"{FORGET_TARGET:.0%} and retain accuracy at most {100 * RETAIN_DROP_TARGET:g} points under the run's "
             f"step-0 value. The window with the most runs at target over both models (the smallest on a tie): "
             f"**{chosen}**.", "",
             "| model | window " + _STOPS_COLUMNS,
             "|---|---|---|---|---|---|---|---|"]
    for recipe, runs in sorted(models.items()):
        lines += [_stops_row(recipe, f"{w}", window_summary(runs, series, level, w)) for w in WINDOWS]
    return lines + [""]


def _stops_row(recipe: str, setting: str, s: dict) -> str:
    steps = s["stop_steps"]
    where = "-" if not steps else f"{steps[len(steps) // 2]} ({steps[0]}-{steps[-1]})"
    worst, mean = s["worst_drop"], s["mean_forget"]
    return (f"| {recipe} | {setting} | {s['stopped']} of {s['runs']} | {s['at_target']} of {s['runs']} | "
            f"{_ci(s['at_target_ci'])} | {'-' if mean is None else f'{mean:.1%}'} | "
            f"{'-' if worst is None else f'{100 * worst:.1f} points'} | {where} |")


def _delay_section(models: dict[str, dict], series: dict, level: float) -> list[str]:
    window = choose_window(models, series, level)
    last = max(e["step"] for runs in models.values() for evals in runs.values() for e in evals)
    return _rule_section(
        models, "Going on after the signal says erased", "factor", FACTORS,
        lambda runs, f: delay_summary(runs, series, level, window, f),
        f"At stop level {level:g} and window {window}, a stop that goes on from the step s where the signal first says "
        f"erased to the first evaluation at or after factor x s (factor 1: the stop as it is). The images lag the "
        f"signal on some runs; going on is meant to let them follow. A run whose delayed stop falls after the study's "
        f"last evaluation (step {last}) counts as not stopped, and so not at target: the study cannot say where it "
        f"would be. Runs at target over both models, by factor: ")


def _confirm_section(models: dict[str, dict], series: dict, level: float) -> list[str]:
    window = choose_window(models, series, level)
    return _rule_section(
        models, "Several checks in a row", "checks in a row", CONFIRMS,
        lambda runs, n: confirm_summary(runs, series, level, window, n),
        f"At stop level {level:g} and window {window}, a stop at the N-th evaluation in a row (the study's "
        f"evaluations stand for the checks) at which the signal says erased and lambda is at rest "
        f"(`--check-confirm N`; 1: the stop as it is). Runs at target over both models, by N: ")


def _rule_section(models: dict[str, dict], heading: str, column: str, values: list, summary, intro: str) -> list[str]:
    """A section on one change to the stop rule: `summary(runs, value)` for each value (the first: the stop as it
    is), the runs at target over every model by value, and a table of each model's rows."""
    totals = {v: sum(summary(runs, v)["at_target"] for runs in models.values()) for v in values}
    best = max(values, key=lambda v: (totals[v], -v))
    lines = [f"## {heading}", "",
             intro + ", ".join(f"{v:g}: {totals[v]}" for v in values)
             + f"; the most at {best:g}" + (" (the stop as it is)." if best == values[0] else "."), "",
             f"| model | {column} " + _STOPS_COLUMNS,
             "|---|---|---|---|---|---|---|---|"]
    for recipe, runs in sorted(models.items()):
        lines += [_stops_row(recipe, f"{v:g}", summary(runs, v)) for v in values]
    return lines + [""]


def _level_table(runs: dict, levels) -> list[str]:
    rows = ["| stop level | runs stopped | mean forget where stopped | runs erased where stopped (forget <= 10%) | "
            "exact 95% interval | stop step, median (range) | retain drop at stop, worst |",
            "|---|---|---|---|---|---|---|"]
    for lv in levels:
        s = level_summary(runs, lv)
        steps = s["stop_steps"]
        where = "-" if not steps else f"{steps[len(steps) // 2]} ({steps[0]}-{steps[-1]})"
        worst = max(s["retain_drop_at_stop"], default=None)
        mean = mean_forget_at_stop(runs, lv)
        rows.append(f"| {lv:g} | {s['stopped']} of {s['runs']} | {'-' if mean is None else f'{mean:.1%}'} | "
                    f"{s['erased_at_stop']} of {s['runs']} | "
                    f"{_ci(s['erased_ci'])} | {where} | {'-' if worst is None else f'{100 * worst:.1f} points'} |")
    return rows + [""]


def plot(paths, path: Path) -> None:
    """Per model (columns): the signal against the judge's forget accuracy (top) and retain accuracy (bottom), one
    line per run along its training, the calibrated level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, runs = read_study(paths)
    models = sorted(by_model(runs).items())
    best = calibrate(dict(models))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.6), squeeze=False)
    for col, (recipe, model_runs) in enumerate(models):
        concepts = sorted({k[1] for k in model_runs})
        colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(concepts)}
        for row, side in enumerate(("forget", "retain")):
            ax = axes[row][col]
            for (_, concept, _), evals in model_runs.items():
                shown = [e for e in evals if e["signal"] is not None]
                ax.plot([e["signal"] for e in shown], [e[f"{side}_accuracy"] for e in shown], "-o", ms=3, lw=0.8,
                        alpha=0.7, color=colours[concept])
            for c in concepts:
                ax.plot([], [], "-o", ms=3, color=colours[c], label=c)
            if best is not None:
                ax.axvline(best, ls="--", color="k", lw=1, label=f"calibrated stop {best:g}")
            if side == "forget":
                ax.axhline(FORGET_TARGET, ls=":", color="grey", lw=1)
            ax.invert_xaxis()
            ax.set_xlabel("erasure signal (moving average; 1 = the original model)")
            ax.set_ylabel(f"{side} accuracy (digits judge)")
            ax.set_title(f"{recipe}: {side}", fontsize=10)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
