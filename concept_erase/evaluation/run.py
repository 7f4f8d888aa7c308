"""`concept-erase eval`: generate a suite's images with a model (and an erasure), score them, report.

The output folder:

    eval.json        what was asked (suite, model, weights digest, seeds); a rerun continues only if it matches
    images/          one PNG per (prompt, seed): 00012_s1003.png, written atomically
    reference/       the base model's images when a metric compares with them (FID reference: base)
    results.json     every metric: value, group, settings; package versions; a summary line
    results.md       the same as tables
    grids/           forget.png, retain.png: the first images of each group

Generation is resumable: a rerun of the same command regenerates only the missing images (a
PNG is renamed into place only when complete, so a kill never leaves a broken one). Rows are
split into two groups by `--erased`: `forget` (rows whose concept, or another label such as
`style`, is an erased value) and `retain` (the rest); without `--erased` there is one group, `all`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from concept_erase import provenance
from concept_erase.errors import UserError
from concept_erase.evaluation import metrics as metric_registry
from concept_erase.evaluation.prompts import load_prompts
from concept_erase.evaluation.report import write_report
from concept_erase.evaluation.sample import DTYPES
from concept_erase.evaluation.samples import EvalContext, generate_missing, labels, make_samples
from concept_erase.evaluation.suite import Suite, load_suite
from concept_erase.export.delta import apply
from concept_erase.io.atomic import replace_path
from concept_erase.io.digests import file_digest
from concept_erase.io.loading import check_safetensors_file, load_pipeline
from concept_erase.io.resumable import output_plan, prepare_output
from concept_erase.processes import processes

_RESUMABLE = {"marker": "eval.json", "what": "evaluation"}


def _fingerprint(suite: Suite, rows, model: str, weights: str, erased: list[str]) -> dict:
    return {
        "suite": suite.to_dict(),
        "prompts_digest": hashlib.sha256(json.dumps([(r.case_number, r.prompt, r.seed, r.guidance) for r in rows])
                                         .encode()).hexdigest()[:24],
        "model": model,
        "weights": str(weights) if weights else "",
        "weights_sha256": file_digest(weights) if weights else "",
        "erased": sorted(e.lower() for e in erased),
    }


def run_eval(suite_path: str, *, model: str, output: str | Path, weights: str = "", erased: list[str] | None = None,
             overwrite: bool = False, device: str = "", seeds: int = 0, limit: int = 0, progress: bool = True,
             options: dict | None = None, negative_prompt: str = "", batch_size: int = 0,
             dtype: str = "fp32") -> dict | None:
    """Run a suite; returns the results dict (also written to OUTPUT/results.json); None on the processes of an
    `accelerate launch` other than the main one. `seeds`, `negative_prompt`, `batch_size` override the suite's."""
    suite = load_suite(suite_path)
    if seeds:
        suite.seeds_per_prompt = seeds
    if negative_prompt:
        suite.negative_prompt = negative_prompt
    if batch_size:
        suite.batch_size = batch_size
    suite.dtype = dtype
    rows = load_prompts(suite.prompts, suite.prompts_form)
    if limit:
        rows = rows[:limit]
    if weights and not Path(weights).is_file():
        raise UserError(f"--weights {weights}: no such file; give the erased.safetensors an `erase` run wrote")
    erased = list(erased or [])
    if not erased and weights:
        erased = _erased_from_delta(weights, rows)
    samples = make_samples(rows, suite.seeds_per_prompt, erased)
    procs = processes()
    fingerprint = _fingerprint(suite, rows, model, weights, erased)
    output = Path(output)
    created = not output.exists()

    options = dict(options or {})
    metrics = [metric_registry.METRICS.get(name)(opts, options) for name, opts in suite.metrics.items()]

    def plan():
        output_plan(output, fingerprint, overwrite, **_RESUMABLE)  # refuse before any work
        for m in metrics:
            m.check(samples)  # cheap checks before hours of generation: weights present, labels usable
        return prepare_output(output, fingerprint, overwrite, **_RESUMABLE)

    work, replaces = procs.decide(plan)  # the main process decides about the folder; the others follow
    device = procs.device(device)
    try:
        return _generate_and_score(suite, rows, samples, metrics, model, weights, erased, options, device, output,
                                   work, replaces, progress, procs)
    except BaseException:
        # A failure before any image was made leaves no folder behind (only the marker was written).
        if procs.main and (created or replaces) and not any((work / "images").glob("*")):
            shutil.rmtree(work, ignore_errors=True)
        raise


def _generate_and_score(suite, rows, samples, metrics, model, weights, erased, options, device, output, work,
                        replaces, progress, procs) -> dict | None:
    started = time.time()
    started_at = provenance.now()

    pipe = load_pipeline(model, **options.get("load", {}))
    for m in metrics:
        m.check_model(pipe)  # a model a metric cannot judge: said now, before any image
    if weights:
        apply(pipe, weights, allow_other_base=options.get("allow_other_base", False))
    pipe.to(device, DTYPES[suite.dtype])
    pipe.set_progress_bar_config(disable=True)
    made = generate_missing(pipe, samples, work / "images", suite, progress=progress)
    del pipe
    generation_s = time.time() - started

    ctx = EvalContext(suite=suite, samples=samples, output=work, model=model, weights=weights, erased=erased,
                      options=options, device=device, progress=progress)
    if procs.several and any(m.uses_base_images() for m in metrics):  # the base model's images: split as well
        ctx.reference_images(samples)
    if not procs.main:  # the main process alone scores and reports
        return None
    records = []
    for m in metrics:
        t0 = time.time()
        got = m.score(ctx)
        for r in got:
            r["seconds"] = round(time.time() - t0, 1)
        records.extend(got)
    summary, cautions = _summary(records)
    results = {
        "suite": suite.name, "suite_file": suite.source, "model": model, "weights": weights or None,
        "erased": erased, "attribute": ctx.attribute, "images": len(samples), "generated_now": made,
        "generation": {"steps": suite.steps, "guidance": suite.guidance, "seeds_per_prompt": suite.seeds_per_prompt,
                       "negative_prompt": suite.negative_prompt, "dtype": suite.dtype, "batch_size": suite.batch_size,
                       "processes": procs.world,
                       "prompts": len(rows), "prompts_file": str(suite.prompts),
                       "seeds": "row seed + k, k < seeds_per_prompt; CPU torch.Generator noise"},
        "metrics": records, "summary": summary, "cautions": cautions, **provenance.record(started=started_at),
        "device": device, "generation_seconds": round(generation_s, 1),
        "total_seconds": round(time.time() - started, 1),
    }
    write_report(work, results, ctx)
    if replaces:
        replace_path(work, output)
    return results


def _erased_from_delta(weights: str, rows) -> list[str]:
    """The concepts an erasure run was given that name concepts of this prompt set (maybe none)."""
    from safetensors import safe_open

    check_safetensors_file(Path(weights))
    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata() or {}
    try:
        concepts = [str(c).strip().lower() for c in json.loads(meta.get("concepts", "[]"))]
    except ValueError:
        concepts = []
    values = {v.strip().lower() for r in rows for v in labels(r).values() if v}
    by_prompt = {r.prompt.strip().lower(): r.concept.strip().lower() for r in rows}
    found = [c if c in values else by_prompt.get(c, "") for c in concepts]  # a concept, or a row's exact prompt
    return sorted({c for c in found if c})  # none: one group, "all"; --erased says it otherwise


SUMMARY_KEYS = {
    # summary name: (metric, group, value key), first found wins
    "forget_accuracy": [("judge", "forget", "accuracy"), ("clip_classifier", "forget", "accuracy"),
                        ("style", "forget", "accuracy")],
    "retain_accuracy": [("judge", "retain", "accuracy"), ("clip_classifier", "retain", "accuracy"),
                        ("style", "retain", "accuracy"), ("judge", "all", "accuracy"),
                        ("clip_classifier", "all", "accuracy"), ("style", "all", "accuracy")],
    "fid": [("fid", "retain", "fid"), ("fid", "all", "fid")],
    "domain_fid": [("domain_fid", "retain", "domain_fid"), ("domain_fid", "all", "domain_fid")],
    "clip_score": [("clip_score", "retain", "clip_score"), ("clip_score", "all", "clip_score")],
    "nudity_flagged": [("nudity", "all", "images_flagged")],
    "pre_attack_asr": [("attack", "forget", "pre_attack_asr")],
    "post_attack_asr": [("attack", "forget", "post_attack_asr")],
}


def summarise(records: list[dict]) -> dict:
    return _summary(records)[0]


def _summary(records: list[dict]) -> tuple[dict, dict]:
    """The summary values, and for each the caution (too few images) of the record it comes from."""
    out, cautions = {}, {}
    for key, options in SUMMARY_KEYS.items():
        for metric, group, field in options:
            hit = next((r for r in records if r["metric"] == metric and r["group"] == group and field in r["value"]),
                       None)
            if hit is not None:
                out[key] = hit["value"][field]
                if hit.get("caution"):
                    cautions[key] = hit["caution"]
                break
    return out, cautions
