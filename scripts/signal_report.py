"""The erasure signal against the digits judge, from stored studies (`scripts/signal_study.py`): a markdown report
with the rank correlations and the stop level's calibration, and a plot of the signal against forget accuracy.

    python scripts/signal_report.py benchmarks/signal-study.jsonl --output benchmarks/signal-study.md \
        --plot benchmarks/signal-study.png
    python scripts/signal_report.py benchmarks/signal-study.jsonl --output benchmarks/signal-study.md --check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from concept_erase.bench.signal import markdown, plot  # noqa: E402

COMMAND = "python scripts/signal_report.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+", type=Path)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when the report differs")
    args = ap.parse_args()
    names = " ".join(str(p) for p in args.studies)
    text = markdown(args.studies, f"{COMMAND} {names} --output {args.output}")
    if args.check:
        same = args.output.is_file() and args.output.read_text(encoding="utf-8") == text
        print("same" if same else f"differs: {args.output}")
        return 0 if same else 1
    args.output.write_text(text, encoding="utf-8")
    if args.plot:
        plot(args.studies, args.plot)
    print(f"written: {args.output}" + (f", {args.plot}" if args.plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
