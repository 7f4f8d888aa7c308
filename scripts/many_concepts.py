"""Erase many concepts in one run on the digits model, and judge every one of them afterwards.

The digits world draws 50 captions (ten digits in five styles). A run erases the first N of the 45 captions of
nine digits (digit by digit: zero plain, zero in red ink, ... nine in bold) and keeps every caption it does not
erase, each of them an anchor (the kept digit's five at least: "one" by default). After the run, every caption is
drawn on evaluation image seeds that no check of the run saw (from 100,000; the checks draw from 1,000,000) and
judged by the digits judge: an erased caption counts as still drawn where the judge names both its digit and its
style, a kept one as kept likewise. The base model is judged on the same seeds.

    python scripts/many_concepts.py --counts 10,45 --output runs/many-concepts    # report.md, results.json
    python scripts/many_concepts.py --report benchmarks/many-concepts.json       # its .md again, from the data

A quality check of many-concept erasure, not a benchmark: one run per count, one seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from concept_erase import provenance  # noqa: E402
from concept_erase.bench.stats import clopper_pearson  # noqa: E402
from concept_erase.config import build_config, load_yaml  # noqa: E402
from concept_erase.digits.evaluate import generate_many  # noqa: E402
from concept_erase.digits.judge import load_network  # noqa: E402
from concept_erase.digits.world import DIGIT_NAMES, STYLES, caption  # noqa: E402
from concept_erase.export.delta import apply  # noqa: E402
from concept_erase.image_seeds import seed_range  # noqa: E402
from concept_erase.io.atomic import write_json, write_text  # noqa: E402
from concept_erase.io.loading import load_pipeline  # noqa: E402
from concept_erase.training.trainer import erase  # noqa: E402

RECIPE = ROOT / "pipelines" / "digits-erase.yaml"
EVAL_SEED_START = 100_000  # the held-out evaluation's image seeds (bench-heldout.yaml)


def captions(keep: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(the 45 erasable (digit, style) pairs in order, the kept digit's five)."""
    k = DIGIT_NAMES.index(keep)
    erasable = [(d, s) for d in range(10) if d != k for s in STYLES]
    return erasable, [(k, s) for s in STYLES]


def judge_all(pipe, judge, pairs, seeds: int, steps: int, guidance: float) -> dict:
    """Per (digit, style): how many of its images the judge names as that digit in that style."""
    made = generate_many(pipe, [(caption(d, s), seed_range(EVAL_SEED_START, seeds)) for d, s in pairs],
                         steps=steps, guidance=guidance)
    out = {}
    for (d, s), images in zip(pairs, made):
        pd, ps = judge.predict(images)
        out[caption(d, s)] = int(((pd == d) & (ps == STYLES.index(s))).sum())
    return out


def rate(hits: int, n: int) -> dict:
    return {"hits": hits, "images": n, "rate": hits / n, "ci": clopper_pearson(hits, n)}


def one_run(count: int, args, base: dict, judge, output: Path) -> dict:
    erasable, kept = captions(args.keep)
    erased, others = erasable[:count], erasable[count:] + kept
    settings = load_yaml(RECIPE)
    settings.update(concepts=[caption(d, s) for d, s in erased], anchors=[caption(d, s) for d, s in others],
                    output=str(output / f"run-{count}"), overwrite=True, seed=args.seed, method=args.method,
                    progress=False, steps=args.steps,
                    **({"check_every": args.check_every} if args.check_every else {}))
    config = build_config(settings, {}, source=str(RECIPE))
    started = time.time()
    run = Path(erase(config)).parent  # erase gives the erased weights; the run folder holds them
    seconds = time.time() - started
    state = json.loads((run / "run.json").read_text())
    pipe = apply(load_pipeline("builtin:digits"), run / "erased.safetensors")
    after = judge_all(pipe, judge, erasable + kept, args.seeds, args.inference_steps, args.guidance)
    names_e, names_k = [caption(*p) for p in erased], [caption(*p) for p in others]
    per = {n: after[n] / args.seeds for n in names_e}
    at = sum(v <= 0.10 for v in per.values())
    checks = [json.loads(line) for line in (run / "checks.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "checks.jsonl").is_file() else []
    return {
        "count": count, "erased": names_e, "seconds": round(seconds, 1), "after": after,
        "steps": json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"],
        "stopped_at": state.get("stopped_at"), "stop_reason": state.get("stop_reason"),
        "forget": rate(sum(after[n] for n in names_e), args.seeds * len(names_e)),
        "forget_base": rate(sum(base[n] for n in names_e), args.seeds * len(names_e)),
        "concepts_at_most_10pct": {"count": at, "of": len(names_e), "ci": clopper_pearson(at, len(names_e))},
        "worst": sorted(per.items(), key=lambda kv: -kv[1])[:5],
        "kept": rate(sum(after[n] for n in names_k), args.seeds * len(names_k)),
        "kept_base": rate(sum(base[n] for n in names_k), args.seeds * len(names_k)),
        "kept_digit": rate(sum(after[caption(*p)] for p in kept), args.seeds * len(kept)),
        "kept_digit_base": rate(sum(base[caption(*p)] for p in kept), args.seeds * len(kept)),
        "last_check": checks[-1] if checks else None,
    }


def pct(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]"


def report(result: dict) -> str:
    lines = ["# Many concepts in one run (digits model)", "",
             f"Made by `{result['command']}` at commit `{result['commit']}` on {result['date']}.", "",
             f"Machine: {result['machine']}.", "",
             f"Recipe `pipelines/digits-erase.yaml` ({result['method']}, the erasure check on), run seed "
             f"{result['seed']}, budget {result['steps']} steps. Kept: every caption not erased, each an anchor (the "
             f"digit {result['keep']} in every style at least). Judged on {result['seeds']} images per caption from image seed "
             f"{EVAL_SEED_START:,}: a caption counts as drawn where the judge names its digit and its style. "
             "Rates with exact (Clopper-Pearson) 95% intervals.", "",
             "| concepts | steps (stopped?) | train s | forget (base) | concepts at forget <= 10% | kept captions "
             "(base) | the digit kept in every style (base) | most drawn erased captions |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        c = r["concepts_at_most_10pct"]
        worst = ", ".join(f"{n.removeprefix('a handwritten digit ')} {100 * v:.0f}%" for n, v in r["worst"][:3])
        stop = f"stopped at {r['stopped_at']}" if r["stopped_at"] else "budget"
        lines.append(f"| {r['count']} | {r['steps']} ({stop}) | {r['seconds']:.0f} | {pct(r['forget'])} "
                     f"({pct(r['forget_base'])}) | {c['count']}/{c['of']} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}] | "
                     f"{pct(r['kept'])} ({pct(r['kept_base'])}) | {pct(r['kept_digit'])} ({pct(r['kept_digit_base'])}) | "
                     f"{worst} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="5,45", help="how many captions each run erases, comma-separated (1-45)")
    parser.add_argument("--keep", default="one", choices=DIGIT_NAMES, help="the digit kept in every style")
    parser.add_argument("--method", default="eupmu")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=400, help="the budget")
    parser.add_argument("--check-every", type=int, default=None, help="the erasure check's cadence (default: the recipe's)")
    parser.add_argument("--seeds", type=int, default=16, help="evaluation images per caption")
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--output", type=Path, help="the folder of the runs, results.json and report.md")
    parser.add_argument("--report", type=Path, help="write the report of a results JSON beside it (NAME.md) and stop")
    args = parser.parse_args(argv)
    if args.report:
        write_text(args.report.with_suffix(".md"), report(json.loads(args.report.read_text())))
        return 0
    if not args.output:
        parser.error("give --output (a folder for the runs), or --report RESULTS.json")
    counts = [int(c) for c in args.counts.split(",")]
    if any(not 1 <= c <= 45 for c in counts):
        parser.error("a count is 1 to 45: the digits world has 50 captions, and the kept digit's five stay")
    args.output.mkdir(parents=True, exist_ok=True)
    judge = load_network()
    erasable, kept = captions(args.keep)
    base = judge_all(load_pipeline("builtin:digits"), judge, erasable + kept, args.seeds, args.inference_steps,
                     args.guidance)
    result = {"command": "python scripts/many_concepts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": provenance.commit(), "date": provenance.now(), "machine": provenance.machine(),
              "method": args.method, "seed": args.seed, "steps": args.steps, "keep": args.keep,
              "seeds": args.seeds, "base": base, "runs": []}
    for count in counts:
        result["runs"].append(one_run(count, args, base, judge, args.output))
        write_json(args.output / "results.json", result)
        write_text(args.output / "report.md", report(result))
        r = result["runs"][-1]
        print(f"{count} concepts: forget {pct(r['forget'])}, kept {pct(r['kept'])}, {r['steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
