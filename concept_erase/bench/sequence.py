"""The sequential benchmark (`sequential: true` in a benchmark file): each method erases a split's concepts one
request after another (`erase --weights PREVIOUS_RUN`), in the order the split lists them, once per run seed. After
every request the chained model is judged on every concept of the world's chain kind at once (`BenchWorld.
chain_judging`): each erased concept's forget accuracy, the retain accuracy of the concepts never erased, and the
domain FID of their images. The base model is judged the same way once, on the same image seeds.

A request's run is kept (`OUTPUT/sequences/LABEL__sSEED/NN-CONCEPT/`): the next request continues from it, and a
benchmark cut short continues from the last finished request.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

from concept_erase import provenance
from concept_erase.bench.pictures import picture
from concept_erase.bench.spec import FORGET_TARGET, BenchSpec, run_config, run_settings
from concept_erase.bench.stats import clopper_pearson, mean_ci
from concept_erase.bench.world import ChainJudging, world_record
from concept_erase.errors import UserError
from concept_erase.export.delta import apply
from concept_erase.io.atomic import atomic_path, write_json, write_text
from concept_erase.training.trainer import erase

SEQUENCE_RETAIN_DROP = 0.05  # the sequential target: the never-erased concepts within 5 points of the base
SEQUENCE_SCHEMA = 1


def sequence_id(label: str, seed: int) -> str:
    return f"{label.replace(' ', '_').replace(',', '').replace('=', '')}__s{seed}"


def settings_differ(stored: dict, settings: dict) -> list[str]:
    """The settings a stored request was made with that differ from this run's. A setting the stored request does
    not name did not exist when it was made: it differs where this run sets it (not None)."""
    return [key for key in settings if stored.get(key) != settings[key] and (key in stored or settings[key] is not None)]


def run_sequence(spec: BenchSpec, base, judging: ChainJudging, base_images: list, *, label: str,
                 overrides: dict, concepts: list[str], seed: int, split: str, output: Path, progress: bool,
                 log) -> list[dict]:
    """Erase `concepts` one request after another; one record per request (kept ones are read, not rerun). The base
    model's images (`base_images`, `ChainJudging.draw`) give its figures on the same concepts."""
    folder = output / "sequences" / sequence_id(label, seed)
    records, previous, redo = [], None, False
    for k, concept in enumerate(concepts, 1):
        run_dir = folder / f"{k:02d}-{concept}"
        record_file = run_dir / "record.json"
        config = run_config(spec, overrides, concept, seed, run_dir, progress)
        settings = run_settings(config, chained=k > 1)
        if not redo and record_file.is_file() and (run_dir / "erased.safetensors").is_file():
            kept = json.loads(record_file.read_text())
            differ = settings_differ(kept.get("settings", settings), settings)
            if not differ:
                records.append(kept)
                previous = run_dir
                continue
            log(f"    request {k} of {label} (seed {seed}) was made with other settings ({', '.join(differ)}): it and "
                "every later request are made again")
        redo = True  # a request made (again): the later ones must continue this one, not what was there
        log(f"    request {k}/{len(concepts)}: {label} erasing {concept!r} (seed {seed})"
            + (f" after {', '.join(repr(c) for c in concepts[:k - 1])}" if k > 1 else ""))
        if previous is not None:
            config = dataclasses.replace(config, weights=str(previous))
        t0 = time.perf_counter()
        erase(config, pipe=copy.deepcopy(base))
        wall = time.perf_counter() - t0
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        erased = concepts[:k]
        r = judging.score(judging.draw(apply(copy.deepcopy(base), run_dir / "erased.safetensors")), erased)
        b = judging.score(base_images, erased)
        base_side = {"base_retain_accuracy": b["retain_accuracy"], "base_forget_by_concept": b["forget_by_concept"],
                     "base_domain_fid": b["domain_fid"]}
        record = {"schema": SEQUENCE_SCHEMA, "commit": provenance.commit(), "split": split, "label": label,
                  "method": config.method, "seed": seed, "request": k, "concept": concept, "chain": erased,
                  "settings": settings, **r,
                  **base_side, "steps": len(steps),
                  "train_seconds": sum(s.get("step_time_s", 0.0) for s in steps), "wall_seconds": wall,
                  "delta_bytes": (run_dir / "erased.safetensors").stat().st_size}
        record["meets_target"] = bool(
            max(r["forget_by_concept"].values()) <= FORGET_TARGET
            and (r["retain_accuracy"] is None
                 or r["retain_accuracy"] >= base_side["base_retain_accuracy"] - SEQUENCE_RETAIN_DROP))
        write_json(record_file, record)
        records.append(record)
        kept = "none left" if r["retain_accuracy"] is None else \
            f"{r['retain_accuracy']:.1%} (base {base_side['base_retain_accuracy']:.1%})"
        forgot = ", ".join(f"{c} {a:.0%}" for c, a in r["forget_by_concept"].items())
        log(f"      forget: {forgot}; never erased: {kept}")
        previous = run_dir
    return records


def bench_sequences(spec: BenchSpec, output: Path, base, *, only=None, report_only: bool = False,
                    progress: bool = True, command: str = "", log=print) -> dict:
    """Every (split, seed, method entry)'s sequence, then the report: `bench.json`, `bench.md`, `sequence.png`."""
    started, records, planned = time.time(), [], 0
    for split in spec.splits:
        judging = base_images = None
        for seed in split.seeds:
            for m in spec.methods:
                label = str(m.get("label", m["method"]))
                if only and label not in only:
                    continue
                planned += len(split.concepts)
                folder = output / "sequences" / sequence_id(label, seed)
                if report_only:
                    records += [json.loads(f.read_text()) for f in sorted(folder.glob("*/record.json"))]
                    continue
                if judging is None:
                    judging = spec.world.chain_judging(spec.eval_final_seeds or spec.eval_seeds, spec.eval_steps,
                                                       spec.eval_guidance, split.evaluation_seed_start)
                    base_images = judging.draw(base)
                log(f"{split.name}, seed {seed}: {label} erases {', '.join(split.concepts)} one after another")
                records += run_sequence(spec, base, judging, base_images, label=label, overrides=dict(m),
                                        concepts=list(split.concepts), seed=seed, split=split.name, output=output,
                                        progress=progress, log=log)
    if not records:
        raise UserError(f"no finished request in {output / 'sequences'} to report")
    report = {"config": spec.source, "sequential": True, "model": spec.model,
              "world": world_record(spec.world, [r["concept"] for r in records]),
              "command": command or f"concept-erase bench --config {spec.source} --output {output}",
              "commit": provenance.commit(), "date": provenance.now(), "machine": provenance.machine(),
              "versions": provenance.versions(), "seconds": round(time.time() - started, 1),
              "requests_planned": planned, "requests_finished": len(records),
              "targets": {"forget_at_most": FORGET_TARGET, "retain_drop_at_most": SEQUENCE_RETAIN_DROP},
              "runs": records, "plot": "sequence.png"}
    report["summary"] = {"checks": sequence_checks(records)}
    write_json(output / "bench.json", report)
    sequence_plot(records, output / "sequence.png")
    write_text(output / "bench.md", render_sequence(report))
    return report


def summarise(records: list[dict]) -> list[dict]:
    """Per (split, label, request): the runs' pooled forget and retain with exact intervals, the retain drop and the
    domain FID with intervals over the run seeds, and the runs at target."""
    rows = []
    order = {label: i for i, label in enumerate(dict.fromkeys(r["label"] for r in records))}
    keys = sorted({(r["split"], r["label"], r["request"]) for r in records}, key=lambda k: (k[0], order[k[1]], k[2]))
    for split, label, k in keys:
        part = [r for r in records if (r["split"], r["label"], r["request"]) == (split, label, k)]
        f_hits, f_n = sum(r["forget_hits"] for r in part), sum(r["forget_images"] for r in part)
        kept = [r for r in part if r["retain_accuracy"] is not None]
        r_hits, r_n = sum(r["retain_hits"] for r in kept), sum(r["retain_images"] for r in kept)
        drops = [100 * (r["base_retain_accuracy"] - r["retain_accuracy"]) for r in kept]
        fids = [r["domain_fid"] for r in kept]
        worst = [max(r["forget_by_concept"].values()) for r in part]
        at = sum(r["meets_target"] for r in part)
        rows.append({"split": split, "label": label, "request": k, "concept": part[0]["concept"], "runs": len(part),
                     "forget": f_hits / f_n, "forget_ci": clopper_pearson(f_hits, f_n),
                     "worst_forget": sum(worst) / len(worst), "worst_forget_ci": mean_ci(worst),
                     "retain": r_hits / r_n if r_n else None,
                     "retain_ci": clopper_pearson(r_hits, r_n) if r_n else None,
                     "retain_drop": sum(drops) / len(drops) if drops else None, "retain_drop_ci": mean_ci(drops),
                     "domain_fid": sum(fids) / len(fids) if fids else None, "domain_fid_ci": mean_ci(fids),
                     "base_domain_fid": part[0]["base_domain_fid"], "at_target": at,
                     "at_target_ci": clopper_pearson(at, len(part)), "never_erased": part[0]["never_erased"],
                     "steps": sum(r["steps"] for r in part) / len(part)})
    return rows


def sequence_checks(records: list[dict]) -> list[dict]:
    """Per method, on the held-out split (else the only one run): after its last request, every run at target."""
    split = "held_out" if any(r["split"] == "held_out" for r in records) else records[0]["split"]
    checks = []
    for label in dict.fromkeys(r["label"] for r in records if r["split"] == split):
        part = [r for r in records if r["split"] == split and r["label"] == label]
        last = max(r["request"] for r in part)
        final = [r for r in part if r["request"] == last]
        at = sum(r["meets_target"] for r in final)
        checks.append({"target": f"{label}, after {last} requests ({split}): every erased concept at forget <= "
                                 f"{FORGET_TARGET:.0%}, the never-erased within {SEQUENCE_RETAIN_DROP * 100:.0f} "
                                 "points of the base, every run",
                       "measured": f"{at} of {len(final)} runs", "met": at == len(final)})
    return checks


def _ci(ci, scale: float = 1.0, places: int = 1) -> str:
    return "" if not ci else f" [{ci[0] * scale:.{places}f}, {ci[1] * scale:.{places}f}]"


def render_sequence(report: dict, plots: dict | None = None) -> str:
    """bench.md of a sequential benchmark (see `report.render` for `plots`)."""
    lines = [f"# Sequential benchmark: {Path(report['config']).name}", "", sequence_block(report)]
    lines += picture("retain of the never-erased concepts and forget of the erased ones, by request", "sequence.png",
                     plots) + [""]
    return "\n".join(lines)


def sequence_block(report: dict) -> str:
    """What made a sequential report, its table of requests and its targets: a page's generated block."""
    rows = summarise(report["runs"])
    commits = sorted({r["commit"][:12] for r in report["runs"]})
    lines = [f"Made by `{report['command']}` at commit `{report['commit']}` on {report['date']}.", "",
             f"Machine: {report['machine']}.", "",
             f"Its requests: {report['requests_finished']} of {report['requests_planned']} planned, made at commit(s) "
             f"{', '.join(f'`{c}`' for c in commits)}.", "",
             "Each method erases the split's concepts one request after another (`erase --weights PREVIOUS_RUN`), "
             "once per run seed. After every request the chained model draws "
             + (report.get("world") or {}).get("texts", {}).get("chain", "every concept a chain may erase")
             + ". Forget: the erased concepts' images the judge still names (pooled over the concepts erased so far "
             "and the seeds, exact 95% interval); worst: the most drawn erased concept, mean over seeds. Retain: the "
             "concepts never erased (pooled, exact interval); its drop is in points below the base model on the same "
             "concepts, mean over seeds with a bootstrap interval. Steps: the request's training steps, mean over "
             "seeds (a request that reaches the recipe's budget was not stopped by its check). Target per run: "
             f"every erased concept at forget <= {FORGET_TARGET:.0%} and the never-erased concepts within "
             f"{SEQUENCE_RETAIN_DROP * 100:.0f} points of the base.", "",
             "| split | method | request | concept | runs | steps | forget | worst erased concept | never erased | "
             "retain | retain drop (points) | domain FID (base) | at target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        retain = "none left" if r["retain"] is None else f"{r['retain']:.1%}{_ci(r['retain_ci'], 100)}"
        drop = "" if r["retain_drop"] is None else f"{r['retain_drop']:.1f}{_ci(r['retain_drop_ci'])}"
        fid = "" if r["domain_fid"] is None else \
            f"{r['domain_fid']:.1f}{_ci(r['domain_fid_ci'])} ({r['base_domain_fid']:.1f})"
        lines.append(f"| {r['split']} | {r['label']} | {r['request']} | {r['concept']} | {r['runs']} | "
                     f"{r['steps']:.0f} | "
                     f"{r['forget']:.1%}{_ci(r['forget_ci'], 100)} | {r['worst_forget']:.1%}"
                     f"{_ci(r['worst_forget_ci'], 100)} | {', '.join(r['never_erased'])} | {retain} | {drop} | {fid} | "
                     f"{r['at_target']}/{r['runs']}{_ci(r['at_target_ci'], 1, 2)} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {c['target']} | {c['measured']} | {'yes' if c['met'] else '**MISSED**'} |"
              for c in sequence_checks(report["runs"])]
    return "\n".join(lines)


def sequence_plot(records: list[dict], path: Path) -> None:
    """Retain accuracy of the never-erased concepts (points below the base), and the erased concepts' forget (pooled,
    and the most drawn one's), against the request: one colour per method, with the intervals of `summarise`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(records)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        part = [r for r in rows if r["label"] == label and r["retain_drop"] is not None]
        xs = [r["request"] for r in part]
        top.plot(xs, [r["retain_drop"] for r in part], marker="o", color=f"C{i}", label=label)
        top.fill_between(xs, [(r["retain_drop_ci"] or (r["retain_drop"],) * 2)[0] for r in part],
                         [(r["retain_drop_ci"] or (r["retain_drop"],) * 2)[1] for r in part], color=f"C{i}", alpha=0.15)
        every = [r for r in rows if r["label"] == label]
        bottom.errorbar([r["request"] for r in every], [100 * r["forget"] for r in every],
                        yerr=[[100 * (r["forget"] - r["forget_ci"][0]) for r in every],
                              [100 * (r["forget_ci"][1] - r["forget"]) for r in every]],
                        marker="o", color=f"C{i}", capsize=3, label=f"{label}: pooled")
        bottom.plot([r["request"] for r in every], [100 * r["worst_forget"] for r in every], marker="x",
                    linestyle=":", color=f"C{i}", label=f"{label}: the most drawn erased concept")
    top.axhline(100 * SEQUENCE_RETAIN_DROP, color="0.5", linestyle="--", linewidth=0.8)
    bottom.axhline(100 * FORGET_TARGET, color="0.5", linestyle="--", linewidth=0.8)
    top.set_ylabel("never-erased concepts:\nretain drop (points)")
    bottom.set_ylabel("erased concepts:\nforget accuracy (%)")
    bottom.set_xlabel("requests so far")
    top.legend(fontsize=8)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
