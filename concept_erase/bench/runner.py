"""`concept-erase bench`: EUPMU against EUPMU-fast, UNGrad, fixed weights, ESD and UCE on a built-in model.

Every run uses the same recipe (subset, batch sizes, steps, learning rate) and differs only in
the method that combines the forget and retain losses. Per run it measures, with the judge of the
model's world (`bench/world.py`): forget accuracy (the erased concept is still drawn), retain
accuracy (the anchors' concepts still drawn right), the domain FID of the retained prompts
against their real held-out renderings, wall time per
step, backward passes per step, and (every `evaluation.every` steps) the curve that gives the
training time to reach the target: forget accuracy at most 10% with retain accuracy at most 3
points below the base model's. A separate probe runs each method, and a plain fine-tuning step
of the same UNet subset, in a fresh process and reads its peak memory.

Each finished run is stored in OUTPUT/runs/ID.json, so a rerun of the same command continues.
Results: OUTPUT/bench.json, OUTPUT/bench.md, OUTPUT/pareto.png.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import statistics
import time
from pathlib import Path

from concept_erase import provenance
from concept_erase.attacks.run import run_attack
from concept_erase.bench.memory import memory_table
from concept_erase.bench.pictures import attack_plot, pareto_plot
from concept_erase.bench.records import RECORD_SCHEMA, upgrade
from concept_erase.bench.report import final_images, render, summarise_report
from concept_erase.bench.sequence import bench_sequences
from concept_erase.bench.spec import (FORGET_TARGET, RETAIN_DROP, SHIPPED_BENCH, BenchSpec, load_bench, plan,
                                      run_config, run_settings, split_of)
from concept_erase.bench.timing import probe_timing
from concept_erase.bench.world import Judging, world_record
from concept_erase.errors import UserError
from concept_erase.export.delta import apply
from concept_erase.io.atomic import write_json, write_text
from concept_erase.io.loading import load_pipeline
from concept_erase.training.trainer import erase

# ---------------------------------------------------------------- one run

def _run_id(label: str, concept: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in f"{label}__{concept}__s{seed}")
    return safe


def run_one(spec: BenchSpec, base, judging: Judging, base_eval: dict, *, label: str, overrides: dict, concept: str,
            seed: int, workdir: Path, progress: bool) -> dict:
    config = run_config(spec, overrides, concept, seed, workdir / "run", progress)
    target_retain = base_eval["retain_accuracy"] - RETAIN_DROP
    curve: list[dict] = []

    def on_step(done: int, trainer) -> None:
        if spec.eval_every and done % spec.eval_every == 0 and done < config.steps:
            trainer.ctx.denoiser.eval()
            r = judging(trainer.pipe, fid=False)
            trainer.ctx.denoiser.train()
            curve.append({"step": done, **r})

    t0 = time.perf_counter()
    erase(config, pipe=copy.deepcopy(base), on_step=on_step)
    wall = time.perf_counter() - t0
    run_dir = workdir / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [r["step_time_s"] for r in records]
    done = len(records)  # fewer than config.steps when --stop-when-erased stopped the run
    checks = _read_checks(run_dir)

    erased = apply(copy.deepcopy(base), run_dir / "erased.safetensors")
    final = judging(erased, final=True)
    tiers = with_plain(final, judging.tiers(erased)) if spec.eval_tiers and spec.world.has_tiers(concept) else None
    attacks = [attack_run(spec, a, concept, run_dir / "erased.safetensors", workdir / f"attack-{a['method']}")
               for a in spec.attacks]
    curve = [c for c in curve if c["step"] < done]
    curve.append({"step": done, **{k: final[k] for k in ("forget_accuracy", "retain_accuracy", "images")}})
    cumulative = dict(zip((r["step"] for r in records), _cumsum(step_seconds)))
    meets = final["forget_accuracy"] <= FORGET_TARGET and final["retain_accuracy"] >= target_retain
    first = next((c["step"] for c in curve if c["forget_accuracy"] <= FORGET_TARGET
                  and c["retain_accuracy"] >= target_retain), None)
    # The erasure's own checks during training (--stop-when-erased) are part of its cost.
    check_seconds = lambda step: sum(c["seconds"] for c in checks if c["step"] <= step)  # noqa: E731
    time_to_target = None if first is None else cumulative[first] + check_seconds(first)
    k = config.gradient_accumulation_steps
    near = {f"{side}_{key}": final.get(f"{side}_{key}") for side in ("near", "far")
            for key in ("retain_accuracy", "retain_hits", "retain_images")}
    base_near = {f"base_{side}_retain_accuracy": base_eval.get(f"{side}_retain_accuracy") for side in ("near", "far")}
    return {
        "schema": RECORD_SCHEMA, "commit": provenance.commit(), "split": split_of(spec, concept).name,
        "label": label, "concept": concept, "seed": seed, **run_settings(config),
        "evaluation_seed_start": judging.seed_start,
        "forget_accuracy": final["forget_accuracy"], "retain_accuracy": final["retain_accuracy"],
        "forget_hits": final["forget_hits"], "retain_hits": final["retain_hits"], "retain_images": final["retain_images"],
        "nearest": final.get("nearest", []), **near, **base_near,
        "domain_fid": final["domain_fid"], "eval_images": final["images"], "forget_images": final["forget_images"],
        "base_forget_accuracy": base_eval["forget_accuracy"], "base_retain_accuracy": base_eval["retain_accuracy"],
        "base_domain_fid": base_eval["domain_fid"],
        "meets_target": meets, "steps": done,
        "step_time_s_median": statistics.median(step_seconds),
        "step_time_s_mean": statistics.fmean(step_seconds),
        "backward_passes_per_step": statistics.fmean(r.get("backward_passes", float("nan")) for r in records) / k,
        "lambda_final": records[-1]["lambda"], "lambda_mean": statistics.fmean(r["lambda"] for r in records),
        "train_seconds": sum(step_seconds), "check_seconds": check_seconds(done), "wall_seconds": wall,
        "time_to_target_s": time_to_target,
        # held: the first evaluation at target counts only if the run is still at target at its end
        "steps_to_held_target": first if meets else None,
        "time_to_held_target_s": time_to_target if meets else None,
        "delta_bytes": (run_dir / "erased.safetensors").stat().st_size,
        "curve": curve, "checks": checks, **({"attacks": attacks} if attacks else {}),
        **({"tiers": tiers, "base_tiers": base_eval["tiers"],
            "trained_styles": spec.world.trained_tiers(config.concept_variants)} if tiers else {}),
    }


def with_plain(evaluation: dict, tiers: dict) -> dict:
    """The tiers of a concept's evaluation with its bare prompts' first, as "plain" (the evaluation's own counts)."""
    keys = ("forget_hits", "forget_images", "forget_accuracy", "retain_hits", "retain_images", "retain_accuracy",
            "near_retain_hits", "near_retain_images", "near_retain_accuracy")
    plain = {k: evaluation[k] for k in keys if evaluation.get(k) is not None}
    return {"plain": plain, **tiers}


def attack_run(spec: BenchSpec, a: dict, concept: str, weights: Path, output: Path) -> dict:
    """One of the benchmark's attacks (`a`, from `spec.attacks`) on one run's erasure (`concept-erase attack`, the
    model's judge): the attack success rate before and after, on the concept's first prompts."""
    settings = {k: a[k] for k in ("iterations", "timesteps", "tokens") if k in a}
    r = run_attack(model=spec.model, weights=str(weights), concept=concept, attack=a["method"], output=output,
                   prompts=a["prompts"], **settings,
                   steps=spec.eval_steps, guidance=spec.eval_guidance, overwrite=True, progress=False)
    return {"method": a["method"], "prompts": r["prompts"], "pre_attack_asr": r["pre_attack_asr"],
            "post_attack_asr": r["post_attack_asr"], "seconds": r["seconds"],
            **({"attack_prompts_asr": r["attack_prompts_asr"]} if r.get("attack_prompts_asr") is not None else {}),
            "adversarial_prompts": [p.get("adversarial_prompt") for p in r["per_prompt"]]}


def _read_checks(run_dir: Path) -> list[dict]:
    """The erasure checks a --stop-when-erased run made (checks.jsonl), else none."""
    path = run_dir / "checks.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cumsum(xs):
    total = 0.0
    for x in xs:
        total += x
        yield total


# ---------------------------------------------------------------- the whole benchmark

def import_runs(sources: list, spec: BenchSpec, runs: list, output: Path, log) -> None:
    """--runs-from: the finished runs of other bench.json files join OUTPUT/runs, so a benchmark split across
    machines (or over runs on machines that keep nothing) is reported whole. A run already in OUTPUT/runs is
    kept; a stored run whose settings differ from what this file plans under its label is left out, said."""
    planned = {_run_id(label, concept, seed): (overrides, concept, seed) for label, overrides, concept, seed in runs}
    settings: dict = {}
    read = [(source, *_read_bench_json(source)) for source in sources]  # every source checked before anything is made
    (output / "runs").mkdir(parents=True, exist_ok=True)
    for source, report, records in read:
        added = kept = 0
        differ, unplanned = [], 0
        for record in records:
            run_id = _run_id(record["label"], record["concept"], record["seed"])
            if run_id not in planned:
                unplanned += 1
                continue
            if run_id not in settings:
                settings[run_id] = run_settings(run_config(spec, *planned[run_id], Path("unused"), False))
            stored = {k: record[k] for k in settings[run_id] if k in record}
            if any(stored[k] != settings[run_id][k] for k in stored):
                differ.append(f"{record['label']} on {record['concept']!r} seed {record['seed']}")
                continue
            path = output / "runs" / f"{run_id}.json"
            if path.is_file():
                kept += 1
            else:
                write_json(path, record)
                added += 1
        for part in ("memory", "timing"):  # the probes, when this output has none of its own
            if report.get(part) and not (output / f"{part}.json").is_file():
                write_json(output / f"{part}.json", report[part])
        log(f"--runs-from {source}: {added} run(s) added to {output / 'runs'}, {kept} already there kept"
            + (f", {unplanned} not planned by this benchmark file left out" if unplanned else ""))
        if differ:
            log(f"    left out, their settings differ from this file's entry of the same label: {'; '.join(differ)}")


def _read_bench_json(source) -> tuple[dict, list]:
    """A --runs-from file: (the report, its run records in the current shape), or a one-line error naming it."""
    try:
        report = json.loads(Path(source).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--runs-from {source}: not a readable bench.json ({err})") from None
    records = report.get("runs") if isinstance(report, dict) else None
    if not isinstance(records, list):
        raise UserError(f"--runs-from {source}: holds no list of runs; give a bench.json that "
                        "`concept-erase bench` wrote")
    records = [upgrade(r, f"--runs-from {source}, run {i + 1}") for i, r in enumerate(records)]
    for part in ("memory", "timing"):
        rows = report.get(part) or []
        if not isinstance(rows, list) or not all(isinstance(x, dict) for x in rows):
            raise UserError(f"--runs-from {source}: its {part!r} is not a table (a list of rows); give a "
                            "bench.json that `concept-erase bench` wrote")
    return report, records


def read_record(path: Path) -> dict:
    """A stored run, checked and in the current shape (`records.upgrade`), or a one-line error naming the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable run record ({err}); delete it and the benchmark runs it again") from None
    return upgrade(raw, str(path))


def _narrow(spec: BenchSpec, overrides: dict) -> None:
    """--concepts and --seeds: in a file without splits they replace its concepts and seeds; in a file with splits
    they pick some of each split's (a concept or seed the file does not name is refused), so that the split each
    run belongs to, and its evaluation seeds, stay the file's."""
    for c in overrides.get("concepts", []):
        error = spec.world.concept_error(c)
        if error:
            raise UserError(f"--concepts: {error}")
    if spec.splits and spec.splits[0].name != "all":
        for key in ("concepts", "seeds"):
            if key not in overrides:
                continue
            known = {x for sp in spec.splits for x in getattr(sp, key)}
            unknown = [x for x in overrides[key] if x not in known]
            if unknown:
                raise UserError(f"--{key}: {unknown[0]!r} is in no split of {spec.source}; pick from "
                                f"{', '.join(map(str, sorted(known, key=str)))}")
            for sp in spec.splits:
                setattr(sp, key, [x for x in getattr(sp, key) if x in overrides[key]])
        spec.splits = [sp for sp in spec.splits if sp.concepts and sp.seeds]
        if not spec.splits:
            raise UserError(f"--concepts and --seeds leave no run of {spec.source}: no split has both")
        spec.concepts = [c for sp in spec.splits for c in sp.concepts]
        spec.seeds = sorted({x for sp in spec.splits for x in sp.seeds})
        return
    for key, value in overrides.items():
        setattr(spec, key, value)
    spec.splits[0].concepts, spec.splits[0].seeds = spec.concepts, spec.seeds


def run_bench(config_path: str, output: str | Path, *, progress: bool = True, only: list[str] | None = None,
              overrides: dict | None = None, report_only: bool = False, runs_from: list | None = None,
              command: str = "", log=None) -> dict:
    if log is None:
        def log(message: str) -> None:
            print(message, flush=True)
    config_path = config_path or SHIPPED_BENCH  # found wherever the command runs, not only in a clone
    spec = load_bench(config_path)
    _narrow(spec, overrides or {})
    output = Path(output)
    runs = plan(spec)
    if only:
        runs = [r for r in runs if r[0] in only]
        if not runs:
            raise UserError(f"--only {', '.join(only)} names no run of {config_path}")
    if spec.sequential:
        return _bench_sequential(spec, output, only, report_only, runs_from, overrides or {}, progress, command, log)
    if runs_from:
        import_runs(runs_from, spec, plan(spec), output, log)  # every planned run, --only or not
    if report_only:
        if not (output / "runs").is_dir():
            raise UserError(f"no finished run in {output / 'runs'} to report")
        return _bench(spec, runs, output, None, progress, only, report_only, command, log)
    made = [f for f in (output / "runs", output) if not f.exists()]
    (output / "runs").mkdir(parents=True, exist_ok=True)
    try:
        base = load_pipeline(spec.model)
        base.set_progress_bar_config(disable=True)
        return _bench(spec, runs, output, base, progress, only, report_only, command, log)
    finally:  # the scratch run goes; folders this call made go too if nothing finished into them
        shutil.rmtree(output / "work", ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _bench_sequential(spec: BenchSpec, output: Path, only, report_only: bool, runs_from, overrides: dict,
                      progress: bool, command: str, log) -> dict:
    """A sequential file (`bench/sequence.py`): each split's concepts erased one request after another."""
    if "concepts" in overrides or runs_from:
        raise UserError("a sequential benchmark erases each split's concepts in the file's order: --concepts and "
                        "--runs-from do not apply; give --seeds or --only")
    if report_only:
        return bench_sequences(spec, output, None, only=only, report_only=True, command=command, log=log)
    output.mkdir(parents=True, exist_ok=True)
    base = load_pipeline(spec.model)
    base.set_progress_bar_config(disable=True)
    return bench_sequences(spec, output, base, only=only, progress=progress, command=command, log=log)


def _bench(spec: BenchSpec, runs: list, output: Path, base, progress: bool, only, report_only: bool, command: str,
           log) -> dict:
    results, judgings, base_evals = [], {}, {}
    started = time.time()
    final_seeds = spec.eval_final_seeds or spec.eval_seeds
    for i, (label, overrides, concept, seed) in enumerate(runs):
        path = output / "runs" / f"{_run_id(label, concept, seed)}.json"
        wanted = spec.world.judged_images(concept, final_seeds)
        if path.is_file():
            record = read_record(path)
            start = split_of(spec, concept).evaluation_seed_start
            tiered = record.get("tiers") or not (spec.eval_tiers and spec.world.has_tiers(concept))
            if report_only or (final_images(record) == wanted and record["evaluation_seed_start"] == start
                               and tiered):
                results.append(record)
                continue
            log(f"[{i + 1}/{len(runs)}] {label} on {concept!r} (seed {seed}) was judged on {final_images(record)} "
                f"images from seed {record['evaluation_seed_start']}, this file asks for {wanted} from seed {start}: "
                "run again")
        if report_only:
            continue
        if concept not in judgings:
            start = split_of(spec, concept).evaluation_seed_start
            judging = spec.world.judging(concept, spec.eval_seeds, spec.eval_steps, spec.eval_guidance, final_seeds,
                                         seed_start=start)
            base_file = output / "runs" / f"base__{concept.replace(' ', '_')}.json"
            stored = json.loads(base_file.read_text()) if base_file.is_file() else {}
            if stored.get("images") == wanted and stored.get("seed_start", 0) == start and stored.get("nearest"):
                judging.nearest = stored["nearest"]
                base_evals[concept] = stored
            else:
                base_evals[concept] = judging(base, final=True, find_nearest=True)
                write_json(base_file, base_evals[concept])
            if spec.eval_tiers and spec.world.has_tiers(concept) and not base_evals[concept].get("tiers"):
                base_evals[concept]["tiers"] = with_plain(base_evals[concept], judging.tiers(base))
                write_json(base_file, base_evals[concept])
            judgings[concept] = judging
        log(f"[{i + 1}/{len(runs)}] {label} erasing {concept!r} (seed {seed})")
        work = output / "work"
        record = run_one(spec, base, judgings[concept], base_evals[concept], label=label, overrides=overrides,
                         concept=concept, seed=seed, workdir=work, progress=progress)
        write_json(path, record)
        results.append(record)
        log(f"    forget {record['forget_accuracy']:.1%}  retain {record['retain_accuracy']:.1%} "
            f"(base {record['base_retain_accuracy']:.1%})  domain FID {record['domain_fid']:.1f}  "
            f"{record['step_time_s_median'] * 1000:.0f} ms/step")
    memory_file = output / "memory.json"
    if spec.memory_probe_steps and not memory_file.is_file() and not report_only:
        modes = ["plain"] + sorted({m["method"] for m in spec.methods})
        log(f"memory probe: {', '.join(modes)} ({spec.memory_probe_steps} steps each, a fresh process each)")
        write_json(memory_file, memory_table(spec.recipe, modes, spec.memory_probe_steps,
                                                spec.concepts[0]))
    memory = json.loads(memory_file.read_text()) if memory_file.is_file() else []
    timing_file = output / "timing.json"
    if spec.timing_rounds and not timing_file.is_file() and not report_only and not only:
        log(f"step-time probe: {len(spec.methods)} methods in turn, {spec.timing_rounds} rounds of "
            f"{spec.timing_steps} steps each, on {spec.concepts[0]!r}")
        write_json(timing_file, probe_timing(spec, base, spec.concepts[0], log=log))
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else []
    if not results:
        raise UserError(f"no finished run in {output / 'runs'} to report")
    planned: dict = {}
    for label, _, concept, _ in runs:
        by_label = planned.setdefault(split_of(spec, concept).name, {})
        by_label[label] = by_label.get(label, 0) + 1
    command = command or f"concept-erase bench --config {spec.source} --output {output}"
    report = {"config": spec.source, "command": command, "commit": provenance.commit(), "date": provenance.now(),
              "machine": provenance.machine(), "versions": provenance.versions(), "model": spec.model,
              "world": world_record(spec.world, [r["concept"] for r in results]),
              "seconds": round(time.time() - started, 1),
              "runs_planned": len(runs), "runs_finished": len(results), "planned": planned,
              "held_time_reference": spec.held_time_reference,
              "targets": {"forget_at_most": FORGET_TARGET, "retain_drop_at_most": RETAIN_DROP},
              "memory": memory, "timing": timing, "runs": results}
    report["summary"] = summarise_report(report)
    write_json(output / "bench.json", report)
    pareto_plot(results, output / "pareto.png", report["summary"]["headline"])
    attack_plot(results, output / "attack.png")
    write_text(output / "bench.md", render(report))
    return report
