"""Trace one erasure on the digits model: lambda, both losses and the slack every few steps, beside the
judge's forget and retain accuracy at evaluations during training. For calibrating a lambda rule, or
seeing why a run lost its erasure.

A run is one entry of the benchmark (the shipped digits recipe, the concept's prompts as `concept-erase
bench` builds them, the seed), with settings changed by KEY=VALUE (YAML values). Its run folder is kept.
Usage:
    python scripts/lambda_trace.py --concept seven --seed 1 --output runs/trace \\
        lambda_update=paper beta=5 slack_decay=0.9 slack_momentum=0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", default="seven", help="a digit by name, or a style (red ink, bold, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=25, help="evaluate the judge every N steps")
    parser.add_argument("--images", type=int, default=16, help="images per prompt at each evaluation")
    parser.add_argument("--window", type=int, default=20, help="steps per line of the trace")
    parser.add_argument("--output", required=True, help="folder for the run, trace.json and trace.md")
    parser.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="erase settings to change")
    args = parser.parse_args(argv)

    import yaml

    from concept_erase.digits.benchmark import Judging
    from concept_erase.bench.runner import run_one
    from concept_erase.bench.spec import SHIPPED_BENCH, load_bench
    from concept_erase.errors import UserError
    from concept_erase.io.loading import load_pipeline

    overrides = {"method": "eupmu"}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"lambda_trace: {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key.replace("-", "_")] = yaml.safe_load(value)
    out = Path(args.output)
    spec = load_bench(SHIPPED_BENCH)
    spec.attack = {**spec.attack, "prompts": 0}  # a trace of the erasure alone
    spec.eval_every, spec.eval_seeds, spec.eval_final_seeds = args.every, args.images, args.images
    try:
        base = load_pipeline("builtin:digits")
        base.set_progress_bar_config(disable=True)
        judging = Judging(args.concept, args.images, spec.eval_steps, spec.eval_guidance)
        result = run_one(spec, base, judging, judging(base), label="trace", overrides=overrides,
                               concept=args.concept, seed=args.seed, workdir=out, progress=False)
    except UserError as err:
        print(f"lambda_trace: {err}", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [f"# Lambda trace: {args.concept}, seed {args.seed}, {' '.join(args.settings) or 'defaults'}", "",
             "| steps | forget loss | retain loss | lambda mean | lambda max | slack mean | slack sd |",
             "|---|---|---|---|---|---|---|"]
    for i in range(0, len(records), args.window):
        w = records[i:i + args.window]
        slack = [r["slack"] for r in w if r.get("slack") is not None]
        lines.append(f"| {w[0]['step']}-{w[-1]['step']} | {statistics.fmean(r['loss_forget'] for r in w):.4f} | "
                     f"{statistics.fmean(r['loss_retain'] for r in w if r['loss_retain'] is not None):.4f} | "
                     f"{statistics.fmean(r['lambda'] for r in w):.2f} | {max(r['lambda'] for r in w):.2f} | "
                     + (f"{statistics.fmean(slack):.3g} | {statistics.pstdev(slack):.3g} |" if slack else "- | - |"))
    lines += ["", "| step | forget accuracy | retain accuracy |", "|---|---|---|"]
    lines += [f"| {c['step']} | {c['forget_accuracy']:.1%} | {c['retain_accuracy']:.1%} |" for c in result["curve"]]
    (out / "trace.json").write_text(json.dumps(result, indent=1))
    (out / "trace.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
