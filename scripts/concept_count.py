"""Memory and step time of one erasure run against the number of concepts it erases, on the digits model: the
first N of the forty styled digit captions ('a handwritten digit three in red ink', ...) as concepts, the ten plain
captions as anchors, the recipe's settings, N steps of training, each N in a fresh process (the benchmark's memory
probe, `concept_erase.bench.memory`). A measure of cost, not of erasure: the steps are few.

    python scripts/concept_count.py --counts 1,5,10,40 --steps 20 --output concept-count.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "digits-erase.yaml"


def prompts(count: int) -> tuple[list[str], list[str]]:
    from concept_erase.digits.world import STYLES, caption

    styled = [caption(d, s) for s in STYLES if s != "plain" for d in range(10)]
    if not 1 <= count <= len(styled):
        raise SystemExit(f"concept_count: a count is 1 to {len(styled)}, not {count}")
    return styled[:count], [caption(d) for d in range(10)]


def one(count: int, steps: int, method: str) -> dict:
    from concept_erase.bench.memory import probe_memory

    return probe_memory(str(RECIPE), method, steps, prompts=prompts(count))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,5,10,40", help="concept counts, comma-separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", default="eupmu")
    parser.add_argument("--output", type=Path, required=True, help="a JSON file of the rows")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the fresh process's own count
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.method)))
        return 0
    rows = []
    for count in [int(c) for c in args.counts.split(",")]:
        done = subprocess.run([sys.executable, __file__, "--one", str(count), "--steps", str(args.steps), "--method",
                               args.method, "--output", str(args.output)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
        if done.returncode:
            print(done.stderr.strip().splitlines()[-1:], file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{count:>3} concepts: peak {r['peak_rss_mb']:.0f} MB "
              f"(+{r['extra_rss_mb']:.0f} MB over the loaded model), "
              f"{1000 * r['step_time_s_median']:.0f} ms/step")
    args.output.write_text(json.dumps({"method": args.method, "steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
