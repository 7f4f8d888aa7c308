"""An attack on the base digits models: does it find a concept where it was never erased?

    python scripts/base_attack.py --output benchmarks/rab-base            # runs, then writes rab-base.json and .md
    python scripts/base_attack.py --output benchmarks/rab-base --check    # exit 1 where the .md is not the JSON's

Ring-A-Bell by default (8 prompts per concept, 100 generations, the held-out digits of bench-heldout.yaml, both
digits models). The attacks' folders go to --work (a rerun continues them). `concept_erase.bench.base_attack` makes
the page from the JSON alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from concept_erase.bench.base_attack import markdown, measure  # noqa: E402
from concept_erase.io.atomic import write_json, write_text  # noqa: E402

HELD_OUT = "zero,two,four,five,six,nine"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, required=True, help="NAME: writes NAME.json and NAME.md")
    ap.add_argument("--models", default="builtin:digits,builtin:digits-flow")
    ap.add_argument("--concepts", default=HELD_OUT)
    ap.add_argument("--attack", default="ring-a-bell")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("runs/base-attack"))
    ap.add_argument("--note", default="", help="a sentence the page prints under what made it (e.g. where the "
                    "attacks' folders were made at other commits)")
    ap.add_argument("--check", action="store_true", help="run nothing; exit 1 where NAME.md is not made from NAME.json")
    args = ap.parse_args()
    stored, page = args.output.with_suffix(".json"), args.output.with_suffix(".md")
    if args.check:
        same = page.is_file() and page.read_text(encoding="utf-8") == markdown(json.loads(stored.read_text()))
        print("same" if same else f"differs: {page}")
        return 0 if same else 1
    command = "python scripts/base_attack.py " + shlex.join(sys.argv[1:])
    report = measure(args.models.split(","), args.concepts.split(","), args.attack, args.prompts, args.iterations,
                     args.work, command)
    if args.note:
        report["note"] = args.note
    write_json(stored, report)
    write_text(page, markdown(report))
    print(f"written: {stored}, {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
