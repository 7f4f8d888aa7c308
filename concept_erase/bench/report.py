"""The benchmark's report: means with bootstrap intervals, the target checks, bench.md and the Pareto plot."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from concept_erase.bench import stats
from concept_erase.bench.pictures import picture
from concept_erase.bench.records import SWEEP_PREFIX, eps_curves, upgrade
from concept_erase.bench.sequence import render_sequence, sequence_block
from concept_erase.bench.spec import FORGET_TARGET, RETAIN_DROP


def final_images(record: dict) -> int | None:
    """How many images a stored run's final evaluation judged (older files: its curve's last point)."""
    if "eval_images" in record:
        return record["eval_images"]
    curve = record.get("curve") or [{}]
    return curve[-1].get("images")


def summarise(results: list[dict], memory: list[dict], timing: list[dict] | None = None, reference: str = "",
              planned: dict | None = None, world: dict | None = None) -> dict:
    """`planned`: runs planned per label; an "every run" target is met only when all of them finished. `world`: the
    report's record of the model's world (`bench.world.world_record`), whose kinds of concept get tables of their
    own."""
    world = world or {}
    kinds, kind_of = [k for k, _ in world.get("kinds", [])], world.get("concept_kinds", {})
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    probes = _probes(timing, by)
    rows = {label: _summary_row(rs, probes.get(label)) for label, rs in by.items()}
    by_kind: dict[str, dict[str, dict]] = {}
    for label, rs in by.items():
        for kind in kinds:
            part = [r for r in rs if kind_of.get(r["concept"]) == kind]
            if part:
                by_kind.setdefault(kind, {})[label] = _summary_row(part, probes.get(label))
    checks = _checks(rows, memory, results, timing or [], reference, planned)
    return {"by_method": rows, "by_kind": by_kind, "checks": checks}


def steps_to_target(run: dict) -> int | None:
    """The first evaluated step at which the run met the target (forget and retain), or None."""
    floor = run["base_retain_accuracy"] - RETAIN_DROP
    return next((c["step"] for c in run.get("curve", []) if c["forget_accuracy"] <= FORGET_TARGET
                 and c["retain_accuracy"] >= floor), None)


def steps_to_held_target(run: dict) -> int | None:
    """The first evaluated step from which the run is at target at every evaluation to its end (the final one
    included); None when its last evaluation misses the target. A run at target at step 50, off it at step 150 and
    back at its end holds from its end, not from step 50."""
    if not run.get("meets_target"):
        return None
    floor = run["base_retain_accuracy"] - RETAIN_DROP
    held = None
    for c in run.get("curve", []):
        at = c["forget_accuracy"] <= FORGET_TARGET and c["retain_accuracy"] >= floor
        held = (c["step"] if held is None else held) if at else None
    return held if held is not None else run.get("steps")


def _probes(timing: list[dict] | None, labels) -> dict[str, dict]:
    """The step-time probe's entry of each label; the eps sweep is the eupmu entry with eps changed (the same
    work per step and per check)."""
    probes = {t["label"]: t for t in timing or []}
    for label in labels:
        if label.startswith("eupmu eps=") and label not in probes and "eupmu" in probes:
            probes[label] = probes["eupmu"]
    return probes


EQUAL_CHUNKS = (8, 24)  # a check that drew each side in equal chunks: the concept's and the anchors' chunk size


def call_cost(timed: dict | None):
    """ms of a call of k images, from the probe's timed calls of one side ({images: ms}): the timed value where
    that size was timed; else the least-squares line through them (a call costs a fixed part and a part per
    image), as the probe draws the check of its one concept and other concepts have other counts (a style's
    prompts give 40 concept images, not 32). None without two timed sizes."""
    exact = {int(k): float(v) for k, v in (timed or {}).items() if v is not None}
    if len(exact) < 2:
        return None
    points, n = list(exact.items()), len(exact)
    mk, mv = sum(k for k, _ in points) / n, sum(v for _, v in points) / n
    slope = sum((k - mk) * (v - mv) for k, v in points) / sum((k - mk) ** 2 for k, _ in points)
    return lambda k: exact.get(k, mv + slope * (k - mk))


def check_seconds(check: dict, probe: dict | None) -> float:
    """An erasure check's time (--stop-when-erased). With a probe that timed the entry's check calls (`timing.py`):
    each call the check made (`forget_calls`, `retain_calls`: images per call) at the probe's
    time for a call of that side and size (`call_cost`), so that a check is charged on the same machine and clock
    as the steps.
    Stored records of checks that name no calls are charged by their shape: one with `retain_within` drew chunks
    of 8 concept images and of 24 anchors (`EQUAL_CHUNKS`; a last chunk smaller than the others is charged as a
    whole one); one with `forget_images` but no `retain_within` chunks of the concept and the anchors in one call,
    if at all; one with neither everything in one go. Else, or where the probe lacks a call's size, the run's own
    clock."""
    if not probe or probe.get("check_chunk_ms") is None:
        return float(check["seconds"])
    if "forget_calls" in check:
        cost = {"concept": call_cost(probe.get("check_concept_call_ms")),
                "anchors": call_cost(probe.get("check_anchor_call_ms"))}
        calls = [("concept", k) for k in check["forget_calls"]] + [("anchors", k) for k in check["retain_calls"]]
        if any(cost[side] is None for side, _ in calls):
            return float(check["seconds"])
        return sum(cost[side](k) for side, k in calls) / 1000
    if "forget_images" not in check:
        return (probe["check_concept_ms"] + probe["check_anchors_ms"]) / 1000
    chunk, anchor_chunk = EQUAL_CHUNKS
    concept = math.ceil(check["forget_images"] / chunk) * probe["check_chunk_ms"]
    if not check.get("retain_images"):
        anchors = 0.0
    elif "retain_within" not in check or probe.get("check_anchor_chunk_ms") is None:
        anchors = probe["check_anchors_ms"]
    else:
        anchors = math.ceil(check["retain_images"] / anchor_chunk) * probe["check_anchor_chunk_ms"]
    return (concept + anchors) / 1000


def _held_seconds(run: dict, probe: dict | None) -> float | None:
    """Training seconds to the held target: the probe's step time where it ran (the runs' own clocks drift
    with the machine), else the run's clock; the erasure checks' own time (--stop-when-erased) added."""
    steps = steps_to_held_target(run)
    if steps is None or run.get("checks_lost"):
        return None  # a run whose checks' time is unknown has no time to report
    if probe is not None:
        checks = sum(check_seconds(c, probe) for c in run.get("checks", []) if c["step"] <= steps)
        return steps * probe["mean_ms"] / 1000 + checks
    own = run.get("time_to_held_target_s", run.get("time_to_target_s"))
    return None if own is None else float(own)


def _with_ci(row: dict, key: str, values, concepts) -> None:
    """row[key] = the mean, row["ci"][key] = its 95% interval, resampling concepts (see stats.py)."""
    kept = [(v, c) for v, c in zip(values, concepts) if v is not None and not (isinstance(v, float) and math.isnan(v))]
    row[key] = stats.mean([v for v, _ in kept]) if kept else None
    ci = stats.cluster_mean_ci([v for v, _ in kept], [c for _, c in kept])
    row.setdefault("ci", {})[key] = list(ci) if ci is not None else None


def _rate(row: dict, key: str, k: int, n: int) -> None:
    """row[key] = k / n, row["ci"][key] = its exact (Clopper-Pearson) 95% interval."""
    row[key] = k / n if n else None
    ci = stats.clopper_pearson(k, n)
    row.setdefault("ci", {})[key] = list(ci) if ci is not None else None


def near_drop(run: dict) -> float | None:
    """How far the nearest concepts' retain accuracy fell from the base model's (None where not measured)."""
    a, b = run.get("near_retain_accuracy"), run.get("base_near_retain_accuracy")
    return None if a is None or b is None else b - a


NEAR_DROP = 0.05  # the nearest concepts' retain accuracy at most 5 points below the base model's


def meets_near(run: dict) -> bool:
    """The whole target: forget and retain (meets_target) and the nearest concepts within NEAR_DROP."""
    d = near_drop(run)
    return bool(run["meets_target"]) and d is not None and d <= NEAR_DROP + 1e-12


def _summary_row(rs: list[dict], probe: dict | None = None) -> dict:
    probe_ms = probe["mean_ms"] if probe else None
    ttt = [r.get("time_to_target_s") for r in rs]
    stt = [steps_to_target(r) for r in rs]
    held = [steps_to_held_target(r) for r in rs]
    cs = [r["concept"] for r in rs]
    row = {"runs": len(rs), "concepts": len(set(cs)), "meets_target": sum(bool(r["meets_target"]) for r in rs),
           "meets_with_near": (sum(meets_near(r) for r in rs)
                               if any(r.get("near_retain_accuracy") is not None for r in rs) else None),
           "backward_per_step": stats.mean(r["backward_passes_per_step"] for r in rs), "probe_step_ms": probe_ms,
           "reached_target": sum(a is not None or b is not None for a, b in zip(stt, ttt)), "held_target": sum(t is not None for t in held),
           "images_per_run": stats.mean(final_images(r) for r in rs)}
    _with_ci(row, "forget_accuracy", [r["forget_accuracy"] for r in rs], cs)
    _with_ci(row, "retain_drop", [r["base_retain_accuracy"] - r["retain_accuracy"] for r in rs], cs)
    _with_ci(row, "domain_fid", [r["domain_fid"] for r in rs], cs)
    _rate(row, "met_fraction", row["meets_target"], len(rs))
    _rate(row, "met_with_near_fraction", row["meets_with_near"] or 0, len(rs) if row["meets_with_near"] is not None else 0)
    _with_ci(row, "near_retain_drop", [near_drop(r) for r in rs], cs)
    _with_ci(row, "far_retain_drop", [None if r.get("far_retain_accuracy") is None else
                                      r["base_far_retain_accuracy"] - r["far_retain_accuracy"] for r in rs], cs)
    counted = [r for r in rs if r.get("forget_images") and r.get("forget_hits") is not None]
    _rate(row, "forget_pooled", sum(r["forget_hits"] for r in counted), sum(r["forget_images"] for r in counted))
    _with_ci(row, "step_time_ms", [1000 * r["step_time_s_median"] for r in rs], cs)
    _with_ci(row, "lambda_mean", [r.get("lambda_mean") for r in rs], cs)
    row["attacks"] = {}  # by attack method: the runs it attacked and its success before and after, by concept
    for name in dict.fromkeys(a["method"] for r in rs for a in r.get("attacks", [])):
        attacked = [(a, r["concept"]) for r in rs for a in r.get("attacks", []) if a["method"] == name]
        part = {"attacked_runs": len(attacked)}
        for key in ("pre_attack_asr", "post_attack_asr"):
            _with_ci(part, key, [a[key] for a, _ in attacked], [c for _, c in attacked])
        row["attacks"][name] = part
    # Means over the runs that reached (held) the target; the counts beside them say how many did.
    _with_ci(row, "steps_to_held_target", held, cs)
    _with_ci(row, "time_to_held_target_s", [_held_seconds(r, probe) for r in rs], cs)
    row["time_to_held_target_source"] = "probe" if probe_ms is not None else "run clocks"
    # Kept from earlier reports: the first evaluation at target whether or not it held, over every run.
    row["time_to_target_s"] = stats.mean(ttt) if all(t is not None for t in ttt) else None
    row["steps_to_target"] = stats.mean(stt) if all(t is not None for t in stt) else None
    row["probe_time_to_target_s"] = (row["steps_to_target"] * probe_ms / 1000
                                     if probe_ms is not None and row["steps_to_target"] is not None else None)
    return row


def _pairs(results: list[dict], a: str, b: str) -> list[tuple[dict, dict]]:
    """The runs of labels a and b on the (concept, seed) pairs both have, matched."""
    key = lambda r: (r["concept"], r.get("seed", 0))  # noqa: E731
    ra = {key(r): r for r in results if r["label"] == a}
    rb = {key(r): r for r in results if r["label"] == b}
    return [(ra[k], rb[k]) for k in sorted(set(ra) & set(rb))]


def _dominance_text(label: str, d: dict) -> str:
    n = d["pairs"]
    return (f"{label} by {d['by']} ({n} common run{'s' if n > 1 else ''}: forget {d['forget'][0]:.1%} vs "
            f"{d['forget'][1]:.1%}, retain drop {100 * d['retain_drop'][0]:.2f} vs "
            f"{100 * d['retain_drop'][1]:.2f} points; 95% intervals of the differences "
            f"[{100 * d['forget_diff_ci'][0]:.1f}, {100 * d['forget_diff_ci'][1]:.1f}] and "
            f"[{100 * d['retain_drop_diff_ci'][0]:.2f}, {100 * d['retain_drop_diff_ci'][1]:.2f}] points)")


def dominance(results: list[dict], a: str, b: str) -> dict | None:
    """Is label a dominated by label b beyond the noise? On the pairs both ran, the paired bootstrap
    intervals of a - b in forget accuracy and in retain drop: dominated when neither interval reaches
    below zero and one lies wholly above it (b at least as good on both axes, better on one, both
    beyond chance). None when the labels share no run."""
    pairs = _pairs(results, a, b)
    if not pairs:
        return None
    drop = lambda r: r["base_retain_accuracy"] - r["retain_accuracy"]  # noqa: E731
    fa, fb = [x["forget_accuracy"] for x, _ in pairs], [y["forget_accuracy"] for _, y in pairs]
    da, db = [drop(x) for x, _ in pairs], [drop(y) for _, y in pairs]
    concepts = [x["concept"] for x, _ in pairs]
    ci_f, ci_d = stats.paired_difference_ci(fa, fb, concepts), stats.paired_difference_ci(da, db, concepts)
    dominated = ci_f[0] >= 0 and ci_d[0] >= 0 and (ci_f[0] > 0 or ci_d[0] > 0)
    return {"by": b, "pairs": len(pairs), "dominated": dominated,
            "forget": (stats.mean(fa), stats.mean(fb)), "retain_drop": (stats.mean(da), stats.mean(db)),
            "forget_diff_ci": ci_f, "retain_drop_diff_ci": ci_d}


# The step-time targets: (method, what it is compared with) -> the largest ratio allowed.
SPEED_TARGETS = {("eupmu", "ungrad"): 0.6, ("eupmu-fast", "fixed"): 1.05}


def _speed_ratios(ms: dict[str, float]) -> dict[tuple[str, str], float]:
    """The ratios the speed targets name, from per-label times; "fixed" is the mean over the fixed weights."""
    fixed = [v for k, v in ms.items() if k.startswith("fixed")]
    ref = dict(ms, **({"fixed": statistics.fmean(fixed)} if fixed else {}))
    return {(a, b): ref[a] / ref[b] for a, b in SPEED_TARGETS if a in ref and b in ref}


def _checks(rows: dict, memory: list[dict], results: list[dict] | None = None,
            timing: list[dict] | None = None, reference: str = "", planned: dict | None = None) -> list[dict]:
    checks = []
    planned = planned or {}
    due = lambda label: max(rows[label]["runs"], planned.get(label, 0))  # noqa: E731  (unfinished runs have not met it)
    # Step times from the interleaved probe where it ran (methods timed in turns, one process); else
    # the medians of the runs, each taken at its own time on the machine.
    if timing:
        step_ms = {t["label"]: t["mean_ms"] for t in timing}
        source = "interleaved step-time probe"
    else:
        step_ms = {label: r["step_time_ms"] for label, r in rows.items()}
        source = "medians of the runs' step times"

    ratios = _speed_ratios(step_ms)
    for pair, bound in SPEED_TARGETS.items():
        if pair in ratios:
            a, b = pair
            checks.append({"target": f"{a} step <= {bound} x {b} step", "measured": ratios[pair],
                           "met": ratios[pair] <= bound, "source": source})
    mem = {m["mode"]: m for m in memory}
    if "plain" in mem:
        for mode in ("esd", "eupmu", "eupmu-fast", "ungrad", "fixed"):
            if mode in mem:
                total = mem[mode]["peak_rss_mb"] / mem["plain"]["peak_rss_mb"]
                extra = mem[mode]["extra_rss_mb"] / max(mem["plain"]["extra_rss_mb"], 1e-9)
                checks.append({"target": f"{mode} peak memory <= 1.2 x plain fine-tuning (process peak)",
                               "measured": total, "met": total <= 1.2, "extra_ratio": extra})
    # EUPMU's entries: its defaults ("eupmu") and its variants at the defaults' lambda rule (--stop-when-erased,
    # ...); not the reference (the previous default) nor the eps sweep, which have targets of their own.
    curves = eps_curves(results or [])
    eps_of = {r["label"]: r.get("eps") for r in reversed(results or [])}  # each label's first run's eps
    points = {k for labels, _ in curves for k in labels  # a curve's points at another eps than the default's
              if eps_of[k] != eps_of.get("eupmu")}
    variants = sorted({r["label"] for r in results or [] if r.get("method") == "eupmu"} - {"eupmu", reference}
                      - {k for k in rows if k.startswith(SWEEP_PREFIX)} - points)
    eupmus = (["eupmu"] if "eupmu" in rows else []) + [v for v in variants if v in rows]
    for label in eupmus:
        e = rows[label]
        name = "eupmu default" if label == "eupmu" else label
        planned_note = f" ({due(label)} planned)" if due(label) > e["runs"] else ""
        ci = e["ci"]["met_fraction"]
        checks.append({"target": f"{name}: forget <= 10% and retain <= 3 points below base, every run",
                       "measured": f"{e['meets_target']} of {e['runs']} runs{planned_note}; exact 95% interval of "
                                   f"the rate [{ci[0]:.2f}, {ci[1]:.2f}]",
                       "met": e["meets_target"] == due(label)})
        if e["meets_with_near"] is not None:
            ci = e["ci"]["met_with_near_fraction"]
            checks.append({"target": f"{name}: that, and the two nearest concepts' retain <= "
                                     f"{NEAR_DROP * 100:.0f} points below base, every run",
                           "measured": f"{e['meets_with_near']} of {e['runs']} runs{planned_note}; exact 95% "
                                       f"interval of the rate [{ci[0]:.2f}, {ci[1]:.2f}]; nearest concepts' drop "
                                       f"{_ci_text(e, 'near_retain_drop', 100)} points",
                           "met": e["meets_with_near"] == due(label)})
    for label in [k for k in rows if k.split(", ")[0] == "eupmu" and k not in (reference,)]:
        # EUPMU against the matched rivals: the fixed weights and ESD with the same stop rule and budget (the same
        # label after the method's name), pair by pair.
        suffix = label[len("eupmu"):]
        rivals = [k for k in rows if k != label and k.endswith(suffix) and suffix == k[len(k.split(", ")[0]):]
                  and (k.startswith("fixed") or k.split(", ")[0] == "esd")]
        if not rivals:
            continue
        found = [d for f in rivals if (d := dominance(results or [], label, f)) and d["dominated"]]
        checks.append({"target": f"{label} not dominated by {', '.join(rivals)} beyond the paired 95% intervals",
                       "measured": "; ".join(_dominance_text(label, d) for d in found) or
                                   f"not dominated ({len(rivals)} rivals)",
                       "met": not found})
    for labels, rivals in curves:
        if not rivals:
            continue
        # Every point of the curve is compared with every rival on the (concept, seed) pairs both ran (an eps
        # sweep runs on the first seed only), by paired bootstrap intervals: a difference inside the noise
        # dominates nothing.
        dominated = [_dominance_text(s, d) for s in labels for f in rivals
                     if (d := dominance(results or [], s, f)) and d["dominated"]]
        sweep = any(k.startswith(SWEEP_PREFIX) for k in labels)
        target = ("eupmu eps curve not dominated by the fixed weights beyond the 95% intervals" if sweep else
                  f"eupmu eps curve ({', '.join(labels)}) not dominated by {', '.join(rivals)} beyond the 95% "
                  "intervals")
        checks.append({"target": target, "measured": "; ".join(dominated) or "no point dominated",
                       "met": not dominated})
    for label in eupmus if reference in rows else []:
        # Time to held target against the reference, on the runs where both held the target.
        both = [(x, y) for x, y in _pairs(results or [], label, reference)
                if steps_to_held_target(x) is not None and steps_to_held_target(y) is not None]
        probes = _probes(timing, rows)
        target = f"{label} time to held target <= 0.5 x {reference}"
        if both:
            a = [_held_seconds(x, probes.get(label)) for x, _ in both]
            b = [_held_seconds(y, probes.get(reference)) for _, y in both]
            te, tr = stats.mean(a), stats.mean(b)
            ratio = te / tr if tr else float("nan")
            ci = stats.cluster_ratio_ci(a, b, [x["concept"] for x, _ in both])
            ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            checks.append({"target": target,
                           "measured": f"{ratio:.2f}{ci_text} ({te:.1f} s vs {tr:.1f} s on the {len(both)} runs both "
                                       f"held; {label} held {rows[label]['held_target']} of {rows[label]['runs']}, "
                                       f"{reference} {rows[reference]['held_target']} of {rows[reference]['runs']})",
                           "ratio": ratio, "ratio_ci": list(ci) if ci else None,
                           "met": ratio <= 0.5 and rows[label]["held_target"] == due(label)})
        else:
            checks.append({"target": target, "measured": "no run where both held the target", "met": False})
    return checks


def _f(v, pct=False, places=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.{places}f}%" if pct else f"{v:.{places}f}"


def _ci_text(row: dict, key: str, scale: float = 1.0, places: int = 1, pct: bool = False) -> str:
    """'3.1% [1.0, 5.2]': the mean and its 95% interval."""
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    ci = (row.get("ci") or {}).get(key)
    unit = "%" if pct else ""
    text = f"{scale * v:.{places}f}{unit}"
    if ci is not None:
        text += f" [{scale * ci[0]:.{places}f}, {scale * ci[1]:.{places}f}]"
    return text


SPLIT_ORDER = ("held_out", "tuning", "all")
SPLIT_TITLES = {
    "held_out": ("Held-out split: the headline",
                 "Concepts, run seeds and evaluation image seeds that no setting was chosen on."),
    "tuning": ("Tuning split: where the settings were chosen",
               "The defaults were chosen on these concepts and run seeds: these figures show the fit, not a result."),
    "all": ("All runs", "This benchmark file declares no tuning and held-out split: nothing here is held out."),
}


def summarise_report(report: dict) -> dict:
    """The summary of a stored report from its runs and probes alone, split by split (held-out first): the
    headline split's tables also at the top (`by_method`, `by_kind`, `checks`)."""
    runs = report.get("runs") or []
    planned = report.get("planned") or {}
    splits = {}
    for name in SPLIT_ORDER:
        part = [r for r in runs if r.get("split", "all") == name]
        if part:
            first = not splits  # the probes' targets (memory, step time) are said once, with the headline
            splits[name] = summarise(part, report.get("memory") or [] if first else [],
                                     report.get("timing") or [] if first else [],
                                     report.get("held_time_reference", ""), planned.get(name), report.get("world"))
    headline = next(iter(splits), None)
    return {**(splits[headline] if headline else {"by_method": {}, "by_kind": {}, "checks": []}),
            "headline": headline, "splits": splits}


def _upgraded(report: dict) -> dict:
    """The stored report with its runs in the current record shape (`records.upgrade`)."""
    where = report.get("config", "bench.json")
    return {**report, "runs": [upgrade(r, f"{where}, run {i + 1}") for i, r in enumerate(report.get("runs", []))]}


def render(report: dict, plots: dict | None = None) -> str:
    """bench.md of a stored bench.json: what the report code makes of its runs now (a test holds the committed
    reports to it). `plots` maps the pictures a report links (`pareto.png`, `attack.png`, `sequence.png`: their names
    in a bench output folder) to where they are beside a stored report; a picture not in it is left out. None: the
    names of a bench output folder."""
    if report.get("sequential"):
        return render_sequence(report, plots)
    report = _upgraded(report)
    return markdown({**report, "summary": summarise_report(report)}, command=report.get("command", ""), plots=plots)


BLOCK_START = "<!-- generated from "
BLOCK_END = "<!-- end generated -->"


def headline(report: dict) -> str:
    """The headline split's tables of a stored report, with what made them: the block BENCHMARKS.md leads with."""
    report = _upgraded(report)
    summary = summarise_report(report)
    lines = _made_by(report, report.get("command", ""))
    if summary["headline"]:
        _split_tables(lines, report, summary["headline"], summary["splits"][summary["headline"]], level="###")
    return "\n".join(lines)


def tiers_block(report: dict) -> str:
    """The prompt tiers' table of a stored report (forget and retain in every tier), with what made it."""
    report = _upgraded(report)
    section = _tier_section(report)  # its own heading left out: the page that holds the block has one
    return "\n".join(_made_by(report, report.get("command", "")) + [""] + section[3:])


BLOCKS = {"headline": headline, "tiers": tiers_block, "sequence": sequence_block}  # what a page's block may hold


def refresh_blocks(page: str, root: Path) -> str:
    """`page` with each generated block remade from the report it names (`<!-- generated from PATH: KIND -->`, KIND
    one of `BLOCKS`)."""
    out, rest = [], page
    while BLOCK_START in rest:
        before, _, after = rest.partition(BLOCK_START)
        head, _, body = after.partition("-->")
        source, _, kind = head.strip().rpartition(":")
        source, kind = source.strip(), kind.strip()
        if kind not in BLOCKS:
            raise ValueError(f"a generated block from {source} names {kind!r}; give one of {', '.join(BLOCKS)}")
        if BLOCK_END not in body:
            raise ValueError(f"a generated block from {source} has no end marker")
        _, _, rest = body.partition(BLOCK_END)
        report = json.loads((root / source).read_text(encoding="utf-8"))
        out += [before, f"{BLOCK_START}{source}: {kind} -->\n", BLOCKS[kind](report), "\n", BLOCK_END]
    return "".join(out) + rest


def _made_by(report: dict, command: str) -> list[str]:
    commits = sorted({str(r.get("commit")) for r in report.get("runs", []) if r.get("commit")})
    older = sum(1 for r in report.get("runs", []) if not r.get("commit"))
    made = ([f"{len(report.get('runs', [])) - older} at commit{'s' if len(commits) > 1 else ''} "
             + ", ".join(f"`{c[:12]}`" for c in commits)] if commits else []) + \
        ([f"{older} before run records carried their commit"] if older else [])
    runs_line = "Its runs: " + " and ".join(made) + "."
    if older:
        runs_line += (" Those runs were made by earlier code: their erasure checks drew the evaluation's own image "
                      "seeds, no split was held out, and the defaults were those of their time. They show how the "
                      "settings were chosen, not what the current code does.")
    return [f"Made by `{command}` at commit `{report.get('commit') or 'unknown'}` on {report.get('date') or 'an unrecorded date'}.",
            "", f"Machine: {report.get('machine', 'unrecorded')}.", "", runs_line]


def _split_tables(lines: list, report: dict, name: str, s: dict, level: str = "##") -> None:
    title, note = SPLIT_TITLES[name]
    lines += ["", f"{level} {title}", "", note + " Means over runs with 95% intervals in brackets, resampling concepts "
              "(the cluster bootstrap, `bench/stats.py`); met target: runs at target and the exact "
              "(Clopper-Pearson) 95% interval of that rate; pooled forget: every run's forget images together, "
              "with its exact interval.", "",
              "| method | runs (concepts) | images/run | forget acc | pooled forget | retain drop (points) | "
              "nearest concepts' drop (points) | domain FID | met target | met, nearest too | ms/step | "
              "backward/step | held target | steps to held target | train s to held target |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    probed = bool(report.get("timing"))
    for label, r in s["by_method"].items():
        ms = _f(r["probe_step_ms"], places=0) if probed and r.get("probe_step_ms") is not None else \
            _ci_text(r, "step_time_ms", places=0)
        lines.append(f"| {label} | {r['runs']} ({r.get('concepts', '?')}) | {_f(r.get('images_per_run'), places=0)} | "
                     f"{_ci_text(r, 'forget_accuracy', 100, pct=True)} | {_ci_text(r, 'forget_pooled', 100, pct=True)} | "
                     f"{_ci_text(r, 'retain_drop', 100)} | {_ci_text(r, 'near_retain_drop', 100)} | "
                     f"{_ci_text(r, 'domain_fid')} | {_count_ci(r, 'meets_target', 'met_fraction')} | "
                     f"{_count_ci(r, 'meets_with_near', 'met_with_near_fraction')} | {ms} | "
                     f"{_f(r['backward_per_step'], places=2)} | {r.get('held_target', 'n/a')}/{r['runs']} | "
                     f"{_ci_text(r, 'steps_to_held_target', places=0)} | {_ci_text(r, 'time_to_held_target_s')} |")
    lines += ["", "images/run: images judged at each run's final evaluation (forget and retain prompts). Nearest "
              "concepts: the two the judge finds most alike the erased one in the base model's images of it (their "
              "retain prompts; the rest is in the retain drop too). Held target: the run is at target at every "
              "evaluation from the first one at target to its end; steps and seconds to it are means over the runs "
              "that held it. "
              + ("ms/step: the interleaved step-time probe's mean (below); train s to held target: steps x the "
                 "probe's ms/step." if probed else
                 "ms/step: mean of the runs' median step times; train s to held target: the runs' own clocks.")
              + " The erasure checks' own time (--stop-when-erased) is included: where the probe timed the "
              "entry's check calls, each check is charged the calls it made at the probe's times, else the run's "
              "own clock."]
    for kind, plural in (report.get("world") or {}).get("kinds", []):
        title_k = f"{plural} only"
        part = s.get("by_kind", {}).get(kind)
        if not part:
            continue
        lines += ["", f"{level}# {title_k.capitalize()}", "", "| method | runs | forget acc | retain drop (points) | "
                  "nearest concepts' drop (points) | domain FID | met target | mean lambda |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, r in part.items():
            lines.append(f"| {label} | {r['runs']} | {_ci_text(r, 'forget_accuracy', 100, pct=True)} | "
                         f"{_ci_text(r, 'retain_drop', 100)} | {_ci_text(r, 'near_retain_drop', 100)} | "
                         f"{_ci_text(r, 'domain_fid')} | {_count_ci(r, 'meets_target', 'met_fraction')} | "
                         f"{_ci_text(r, 'lambda_mean', places=2)} |")
    lines += ["", f"{level}# Targets ({title.split(':')[0].lower()})", "", "| target | measured | met |", "|---|---|---|"]
    for c in s["checks"]:
        m = c["measured"]
        m = f"{m:.3f}" if isinstance(m, float) else m
        if "extra_ratio" in c:
            m += f" (memory above the loaded model: {c['extra_ratio']:.2f}x)"
        if "source" in c:
            m += f" ({c['source']})"
        lines.append(f"| {c['target']} | {m} | {'yes' if c['met'] else '**MISSED**'} |")


def _count_ci(row: dict, count: str, rate: str) -> str:
    """'17/18 [0.73, 1.00]': a count of runs and the exact interval of its rate ('n/a' where not measured)."""
    if row.get(count) is None:
        return "n/a"
    ci = (row.get("ci") or {}).get(rate)
    return f"{row[count]}/{row['runs']}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


EVERY_TIER = "every tier"  # tier_rows' row of the runs at target in every tier


def tier_rows(runs: list[dict]) -> dict[str, dict[str, dict]]:
    """Per method label and prompt tier of a concept's evaluation: the forget rate pooled over the runs' images with
    its exact interval, the mean retain drop from the base model in that tier with its concept-cluster interval, how
    many runs trained on the tier, and how many runs met the targets in every tier (`EVERY_TIER`)."""
    out: dict[str, dict[str, dict]] = {}
    by_label: dict[str, list[dict]] = {}
    for r in runs:
        if r.get("tiers"):
            by_label.setdefault(r["label"], []).append(r)
    for label, rs in by_label.items():
        rows = out.setdefault(label, {})
        for style in rs[0]["tiers"]:
            row = {"runs": len(rs), "trained": sum(style in (r.get("trained_styles") or ["plain"]) for r in rs)}
            _rate(row, "forget", sum(r["tiers"][style]["forget_hits"] for r in rs),
                  sum(r["tiers"][style]["forget_images"] for r in rs))
            _with_ci(row, "retain_drop", [r["base_tiers"][style]["retain_accuracy"] - r["tiers"][style]["retain_accuracy"]
                                          for r in rs], [r["concept"] for r in rs])
            _with_ci(row, "near_retain_drop", [
                r["base_tiers"][style]["near_retain_accuracy"] - r["tiers"][style]["near_retain_accuracy"]
                if r["tiers"][style].get("near_retain_accuracy") is not None
                and r["base_tiers"][style].get("near_retain_accuracy") is not None else None for r in rs],
                [r["concept"] for r in rs])
            rows[style] = row
        every = sum(all(t["forget_accuracy"] <= FORGET_TARGET + 1e-12 and
                        r["base_tiers"][s]["retain_accuracy"] - t["retain_accuracy"] <= RETAIN_DROP + 1e-12
                        for s, t in r["tiers"].items()) for r in rs)
        rows[EVERY_TIER] = {"runs": len(rs), "met": every}
        _rate(rows[EVERY_TIER], "met_fraction", every, len(rs))
    return out


def _tier_section(report: dict) -> list[str]:
    rows = tier_rows(report["runs"])
    if not rows:
        return []
    texts = (report.get("world") or {}).get("texts", {})
    tier = texts.get("tier", "tier")
    lines = ["", f"## Forget and retain in every {tier} (prompt tiers)", "",
             f"{texts.get('tiers', '')} Forget: pooled over the runs' images, exact 95% interval. Retain drop: "
             f"points below the base model in the same {tier}, mean over runs with a concept-cluster interval. Trained: "
             f"runs that drew the concept in that {tier} during training (`--concept-variants`); a {tier} no run "
             "trained on is a held-out template.".lstrip(), "",
             texts.get("near", "Nearest: the erased concept's two nearest concepts, in that tier."), "",
             f"| method | {tier} | trained | forget [exact 95%] | retain drop (points) | nearest concepts' drop "
             "(points) |", "|---|---|---|---|---|---|"]
    for label, styles in rows.items():
        for style, row in styles.items():
            if style == EVERY_TIER:
                continue
            ci = row["ci"]["forget"]
            lines.append(f"| {label} | {style} | {row['trained']}/{row['runs']} | {_f(row['forget'], True)} "
                         f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] | {_ci_text(row, 'retain_drop', 100)} | "
                         f"{_ci_text(row, 'near_retain_drop', 100)} |")
    lines += ["", f"Runs at target in every {tier} (forget <= {FORGET_TARGET:.0%} and retain at most "
                  f"{RETAIN_DROP * 100:.0f} points below the base in each):", ""]
    for label, styles in rows.items():
        row = styles[EVERY_TIER]
        verdict = "met" if row["met"] == row["runs"] else "**MISSED**"
        lines.append(f"- {label}: {_count_ci({**row, 'meets': row['met']}, 'meets', 'met_fraction')} ({verdict})")
    return lines


def markdown(report: dict, command: str, plots: dict | None = None) -> str:
    s = report["summary"]
    name = Path(str(report.get("config", "benchmark"))).name
    lines = [f"# Benchmark: {name}", ""] + _made_by(report, command) + [
             "", f"Targets: forget accuracy <= {FORGET_TARGET:.0%}, retain accuracy at most {RETAIN_DROP * 100:.0f} "
             f"points below the base model's, and where measured the two nearest concepts' at most "
             f"{NEAR_DROP * 100:.0f} points below."]
    for split, part in (s.get("splits") or {"all": s}).items():
        _split_tables(lines, report, split, part)
    lines += _tier_section(report)
    attacked = {label: r for label, r in s["by_method"].items() if r.get("attacks")}
    if attacked:
        used = {}  # each attack method with the settings it ran with, in the order the runs name them
        for r in report["runs"]:
            for a in r.get("attacks", []):
                used.setdefault(a["method"], a)
        said = "; ".join(f"`concept-erase attack --attack {m}` on {a.get('prompts', '?')} prompts" for m, a in used.items())
        lines += ["", "## Attacks on the erased models", "",
                  f"{said}, on each run's erasure: "
                  + (report.get("world") or {}).get("texts", {}).get("attack_prompts", "prompts of the erased concept, "
                                                                      "the model's judge")
                  + ": attack success rate (ASR), the fraction of prompts "
                  "whose image shows the concept. Before: the prompts as given; after: with the attack (a prompt drawn "
                  "before counts after too). Means over runs with 95% bootstrap intervals by concept.", "",
                  "| method | attack | runs attacked | ASR before | ASR after | retain drop (points) |",
                  "|---|---|---|---|---|---|"]
        for label, r in attacked.items():
            for name, a in r["attacks"].items():
                lines.append(f"| {label} | {name} | {a['attacked_runs']}/{r['runs']} | "
                             f"{_ci_text(a, 'pre_attack_asr', 100, pct=True)} | {_ci_text(a, 'post_attack_asr', 100, pct=True)} | "
                             f"{_ci_text(r, 'retain_drop', 100)} |")
        lines += picture("post-attack ASR against retain accuracy", "attack.png", plots)
    if report.get("timing"):
        lines += ["", "## Step time (interleaved probe: one process, the methods in turn, order rotated each round)", "",
                  "| method | steps timed | mean ms/step [95% interval] | median (quartiles) | "
                  "making the forget batch (ms) | "
                  "rest of the step (ms) | backward/step |", "|---|---|---|---|---|---|---|"]
        for t in report["timing"]:
            ci = f" [{t['mean_ms_ci'][0]:.0f}, {t['mean_ms_ci'][1]:.0f}]" if t.get("mean_ms_ci") else ""
            lines.append(f"| {t['label']} | {t['steps_timed']} | {t['mean_ms']:.0f}{ci} | {t['median_ms']:.0f} "
                         f"({t['q1_ms']:.0f}-{t['q3_ms']:.0f}) | "
                         f"{t['forget_batch_ms']:.0f} ({t['forget_batch_ms'] / t['mean_ms']:.0%}) | "
                         f"{t['mean_ms'] - t['forget_batch_ms']:.0f} | {t['backward_per_step']:.2f} |")
        rest = {t["label"]: t["mean_ms"] - t["forget_batch_ms"] for t in report["timing"]}
        said = [f"{a} / {b} {r:.2f}" for (a, b), r in _speed_ratios(rest).items()]
        if said:
            lines += ["", "Without the forget batch (the same work for every method; the steps are the same step "
                      "numbers, so the same trajectory lengths): " + ", ".join(said) + "."]
    lines += cost_section(report)
    if report["memory"]:
        lines += ["", "## Peak memory (a fresh process per mode)", "",
                  "| mode | loaded model (MB) | peak (MB) | above the loaded model (MB) |", "|---|---|---|---|"]
        for m in report["memory"]:
            lines.append(f"| {m['mode']} | {m['baseline_rss_mb']:.0f} | {m['peak_rss_mb']:.0f} | "
                         f"{m['extra_rss_mb']:.0f} |")
    lines += ["", "## Runs", "", "ms/step: the run's own median (its clock, not the probe's).", "",
              "| split | method | concept | seed | steps | forget [exact 95%] | retain (base) | nearest concepts (base) | "
              "domain FID (base) | ms/step | mean lambda | first at target | held |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        stt = steps_to_target(r)
        held = "yes" if steps_to_held_target(r) is not None else "no"
        ci = stats.clopper_pearson(r["forget_hits"], r["forget_images"]) if r.get("forget_images") and \
            r.get("forget_hits") is not None else None
        near = (f"{', '.join(r['nearest'])}: {_f(r['near_retain_accuracy'], True)} "
                f"({_f(r['base_near_retain_accuracy'], True)})" if r.get("near_retain_accuracy") is not None else "n/a")
        lines.append(f"| {r.get('split', 'all')} | {r['label']} | {r['concept']} | {r['seed']} | {r.get('steps', 'n/a')} | "
                     f"{_f(r['forget_accuracy'], True)}{f' [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]' if ci else ''} | "
                     f"{_f(r['retain_accuracy'], True)} ({_f(r['base_retain_accuracy'], True)}) | {near} | "
                     f"{_f(r['domain_fid'])} ({_f(r['base_domain_fid'])}) | {_f(1000 * r['step_time_s_median'], places=0)} | "
                     f"{_f(r.get('lambda_mean'), places=3)} | {stt if stt is not None else 'not reached'} | {held} |")
    lines += picture("retain against forget", "pareto.png", plots) + [""]
    return "\n".join(lines)


def cost_section(report: dict) -> list[str]:
    """What erasing one concept costs, in UnlearnCanvas's columns: time, peak memory, what the user keeps. Per
    method entry: the time of its steps and checks and the time to the held target (means over runs, 95% intervals
    resampling concepts), the peak memory above the loaded model from the fresh-process probe of its method, and
    the size of the run's erased.safetensors (recorded from schema 6 on)."""
    by: dict[str, list[dict]] = {}
    for r in report.get("runs", []):
        by.setdefault(r["label"], []).append(r)
    if not by:
        return []
    memory = {m["mode"]: m for m in report.get("memory") or []}

    def mean_text(rs, key, places=1):
        pairs = [(key(r) if callable(key) else r.get(key), r["concept"]) for r in rs]
        pairs = [(v, c) for v, c in pairs if v is not None]
        if not pairs:
            return "n/a"
        values, clusters = [v for v, _ in pairs], [c for _, c in pairs]
        ci = stats.cluster_mean_ci(values, clusters)
        mean = sum(values) / len(values)
        return f"{mean:.{places}f}" + (f" [{ci[0]:.{places}f}, {ci[1]:.{places}f}]" if ci else "") + \
            (f" ({len(values)} of {len(rs)})" if len(values) < len(rs) else "")

    lines = ["", "## Cost per concept (UnlearnCanvas's columns)", "",
             "Time: the run's training steps (a closed-form edit: its solve) and erasure checks, on its own clock; "
             "not the set-up (the model's loading and the anchor images, which a cache may hold) nor the evaluation. "
             "To held target: the same up to the first evaluation at target that held, over the runs that held. "
             "Peak memory: the fresh-process probe of the method (above the loaded model), where the file probed it. "
             "Stored: the run's `erased.safetensors`, what `apply` and every export read.", "",
             "| method | runs | s per concept (steps and checks) | s to held target | peak memory above the model (MB) | "
             "stored (MB) |", "|---|---|---|---|---|---|"]
    for label, rs in by.items():
        m = memory.get(rs[0].get("method", ""))
        peak = f"{m['extra_rss_mb']:.0f}" if m else "not probed"
        sizes = [r["delta_bytes"] / 2**20 for r in rs if r.get("delta_bytes")]
        stored = f"{statistics.median(sizes):.2f}" if sizes else "not recorded"
        spent = lambda r: r["train_seconds"] + (r.get("check_seconds") or 0.0) if r.get("train_seconds") is not None \
            else None  # noqa: E731
        lines.append(f"| {label} | {len(rs)} | {mean_text(rs, spent, 2)} | "
                     f"{mean_text(rs, 'time_to_held_target_s', 2)} | {peak} | {stored} |")
    return lines
