"""How the judge-free erasure signal relates to what the digits judge sees, along runs with no stop.

For each concept and run seed, an erasure of the digits world runs for --steps with no stop; every --every
steps the model as it is is judged (forget and retain accuracy, `digits.benchmark.Judging`, on image seeds from
--evaluation-seed-start) and the trainer's signal, retain loss and lambda at that step are stored beside the
verdict. One JSON line per evaluation goes to --output (appended, so a study can be split over processes and
continued); `scripts/signal_report.py` turns the lines into the rank correlations, the threshold and the plot.

    python scripts/signal_study.py --recipe digits-erase.yaml --concepts three seven --seeds 0 1 2 \
        --evaluation-seed-start 0 --steps 150 --every 10 --output benchmarks/signal-study.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="digits-erase.yaml", help="a recipe of concept_erase/recipes, or a path")
    ap.add_argument("--concepts", nargs="+", required=True, help="digits world concepts (three, red ink, ...)")
    ap.add_argument("--seeds", nargs="+", type=int, required=True, help="run seeds")
    ap.add_argument("--evaluation-seed-start", type=int, required=True, help="first image seed the judge draws")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seeds-per-prompt", type=int, default=16, help="images per prompt of each evaluation")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings over the recipe's (YAML values)")
    ap.add_argument("--label", default="", help="a name for this set of runs in the output")
    ap.add_argument("--workdir", default="runs/signal-study")
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)

    import yaml

    from concept_erase import provenance
    from concept_erase.digits.benchmark import Judging, concept_prompts, erase_relative_to
    from concept_erase.config import RECIPES, build_config, load_yaml
    from concept_erase.io.loading import load_pipeline
    from concept_erase.training.trainer import erase

    recipe = Path(args.recipe) if Path(args.recipe).is_file() else RECIPES / args.recipe
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "study", "commit": provenance.commit(), "date": provenance.now(),
                            "machine": provenance.machine(), "command": provenance.command_line()}) + "\n")
    base = None
    for concept in args.concepts:
        judging = Judging(concept, args.seeds_per_prompt, 25, 4.0, seed_start=args.evaluation_seed_start)
        for seed in args.seeds:
            settings = load_yaml(recipe)
            base = base or load_pipeline(settings.get("model", "builtin:digits"))
            concepts, anchors = concept_prompts(concept)
            settings.update(concepts=concepts, anchors=anchors, relative_to=erase_relative_to(concept),
                            output=str(Path(args.workdir) / f"{concept}-s{seed}"), overwrite=True, progress=False,
                            seed=seed, steps=args.steps, stop_when_erased=False, checkpoint_every=0, **extra)
            config = build_config(settings, {}, source=str(recipe))
            rows = []

            def judge(done, trainer, rows=rows, config=config, judging=judging, concept=concept, seed=seed):
                if done % args.every:
                    return False
                trainer.ctx.denoiser.eval()
                r = judging(trainer.pipe, fid=False)
                trainer.ctx.denoiser.train()
                rows.append({"label": args.label, "recipe": recipe.name, "concept": concept, "seed": seed,
                             "step": done, "forget_accuracy": r["forget_accuracy"],
                             "retain_accuracy": r["retain_accuracy"], "signal": trainer.signal.value,
                             "evaluation_seed_start": args.evaluation_seed_start, "settings": extra})
                return False

            pipe = copy.deepcopy(base)
            t0 = time.perf_counter()
            base_eval = judging(pipe, fid=False)
            rows.append({"label": args.label, "recipe": recipe.name, "concept": concept, "seed": seed, "step": 0,
                         "forget_accuracy": base_eval["forget_accuracy"],
                         "retain_accuracy": base_eval["retain_accuracy"], "signal": 1.0,
                         "evaluation_seed_start": args.evaluation_seed_start, "settings": extra})
            erase(config, pipe=pipe, on_step=judge)
            metrics = [json.loads(x) for x in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
            by_step = {m["step"]: m for m in metrics}
            for r in rows:
                m = by_step.get(r["step"], {})
                r.update(loss_retain=m.get("loss_retain"), loss_forget=m.get("loss_forget"), lam=m.get("lambda"),
                         signal_step=m.get("erasure_signal"), commit=provenance.commit())
            series = {k: [m.get(k) for m in metrics] for k in ("erasure_signal", "loss_forget", "loss_retain", "lambda")}
            run = {"kind": "run", "label": args.label, "recipe": recipe.name, "concept": concept, "seed": seed,
                   "settings": extra, "commit": provenance.commit(), "series": series}
            with open(out, "a", encoding="utf-8") as f:
                f.writelines(json.dumps({"kind": "evaluation", **r}) + "\n" for r in rows)
                f.write(json.dumps(run) + "\n")
            print(f"{concept} seed {seed}: {len(rows)} evaluations in {time.perf_counter() - t0:.0f} s; "
                  + " ".join(f"{r['step']}:{r['forget_accuracy']:.2f}/{r['signal']:.2f}" for r in rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
