"""Does an erasure check see the same thing at fewer sampler steps? During digits erasures, judge the check's
images (`--stop-when-erased`'s, the same prompts and seeds) at several sampler step counts every few steps, and
report how often the judge's verdicts agree, per image and per check, and the first step each would stop at.
It chose `--check-inference-steps 10` (benchmarks/tuning-record.md), and kept it against 5 (`--sampler-steps 5,10,25`:
5 steps stopped 2 of 6 runs earlier than 25 would have). Out of the test suite: about 4 minutes per run of 100
steps on one CPU thread (9 with three step counts).

Each run is the benchmark's default entry (the shipped digits recipe, the concept's prompts as `concept-erase
bench` builds them) trained without stopping for `--steps`. Usage:
    python scripts/check_steps_agreement.py --output runs/agreement --runs seven:0,one:0,eight:2,red_ink:1,bold:0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="seven:0,one:0,eight:2,red_ink:1,bold:0",
                        help="CONCEPT:SEED,... (a style with _ for its space)")
    parser.add_argument("--sampler-steps", default="10,25", help="the step counts compared; the last is the reference")
    parser.add_argument("--steps", type=int, default=120, help="training steps per run")
    parser.add_argument("--every", type=int, default=10, help="judge every N steps")
    parser.add_argument("--output", required=True, help="folder for the runs and agreement.json")
    args = parser.parse_args(argv)

    from concept_erase.bench.spec import load_bench, run_config
    from concept_erase.io.loading import load_pipeline
    from concept_erase.methods.stopping import check_sides
    from concept_erase.training.trainer import erase

    counts = [int(s) for s in args.sampler_steps.split(",")]
    reference = counts[-1]
    spec = load_bench(str(Path(__file__).resolve().parents[1] / "pipelines" / "bench-defaults.yaml"))
    base = load_pipeline("builtin:digits")
    base.set_progress_bar_config(disable=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"sampler_steps": counts, "runs": []}
    for item in args.runs.split(","):
        concept, seed = item.rsplit(":", 1)
        concept = concept.replace("_", " ")
        config = run_config(spec, {"method": "eupmu", "stop_when_erased": False, "steps": args.steps}, concept,
                            int(seed), out / f"{concept.replace(' ', '_')}-s{seed}", False)
        judge = check_sides(config, "digits")
        checks = []
        # the bar's reference: the model's own anchor accuracy before training, at each step count
        own = {n: sum(k) / len(k) for n in counts for k in [judge.kept(base, judge.anchor_items, n)]}

        def hook(done, trainer):
            if done % args.every:
                return False
            unet = trainer.ctx.denoiser
            unet.eval()
            record = {"step": done}
            for n in counts:
                t0 = time.perf_counter()
                shown = judge.still_shown(trainer.pipe, judge.concept_items, n)
                kept = judge.kept(trainer.pipe, judge.anchor_items, n)
                record[str(n)] = {"shown": shown, "kept": kept, "seconds": time.perf_counter() - t0,
                                  "at_target": sum(shown) / len(shown) <= config.check_forget_at_most
                                  and sum(kept) / len(kept) >= own[n] - config.check_retain_drop_at_most}
            unet.train()
            checks.append(record)
            print(f"{concept} s{seed} step {done}: " + ", ".join(
                f"{n} steps: concept {sum(record[str(n)]['shown']) / len(record[str(n)]['shown']):.0%} anchors "
                f"{sum(record[str(n)]['kept']) / len(record[str(n)]['kept']):.0%} ({record[str(n)]['seconds']:.1f} s)"
                for n in counts), flush=True)
            return False

        erase(config, pipe=copy.deepcopy(base), on_step=hook)
        first = {n: next((c["step"] for c in checks if c[str(n)]["at_target"]), None) for n in counts}
        report["runs"].append({"concept": concept, "seed": int(seed), "first_at_target": first, "checks": checks})

    summary = {}
    for n in counts[:-1]:
        pairs = [(c[str(n)], c[str(reference)]) for r in report["runs"] for c in r["checks"]]
        same = lambda key: sum(x == y for a, b in pairs for x, y in zip(a[key], b[key]))  # noqa: E731
        total = lambda key: sum(len(a[key]) for a, _ in pairs)  # noqa: E731
        summary[n] = {"concept_images_agree": f"{same('shown')}/{total('shown')}",
                      "anchor_images_agree": f"{same('kept')}/{total('kept')}",
                      "checks_agree": f"{sum(a['at_target'] == b['at_target'] for a, b in pairs)}/{len(pairs)}",
                      "same_first_step": f"{sum(r['first_at_target'][n] == r['first_at_target'][reference] for r in report['runs'])}/{len(report['runs'])}",
                      "seconds_ratio": sum(a["seconds"] for a, _ in pairs) / sum(b["seconds"] for _, b in pairs)}
    report["summary"] = {f"{n} vs {reference} steps": s for n, s in summary.items()}
    (out / "agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    print("first check at target: " + "; ".join(f"{r['concept']} s{r['seed']}: {r['first_at_target']}"
                                               for r in report["runs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
