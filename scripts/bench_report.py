"""Write the markdown of stored benchmark reports from their JSON, with the report code as it is now.

    python scripts/bench_report.py benchmarks/*-bench.json          # NAME.md beside each NAME.json
    python scripts/bench_report.py --check benchmarks/*-bench.json  # exit 1 where a committed .md differs

The same function (`concept_erase.bench.report.render`) writes `bench.md` at the end of `concept-erase bench`,
and the tests hold every committed report to it. Generated blocks of other pages (BENCHMARKS.md) are refreshed too:
a block starts with `<!-- generated from benchmarks/NAME.json: headline -->` and ends with `<!-- end generated -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from concept_erase.bench.pictures import stored_plots  # noqa: E402
from concept_erase.bench.report import refresh_blocks, render  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="bench.json files")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 where a file differs")
    parser.add_argument("--pages", nargs="*", type=Path, default=[ROOT / "BENCHMARKS.md"],
                        help="pages whose generated blocks are refreshed (default: BENCHMARKS.md)")
    args = parser.parse_args()
    stale = []
    wanted = {}
    for path in args.reports:
        wanted[path.with_suffix(".md")] = render(json.loads(path.read_text(encoding="utf-8")), stored_plots(path))
    for page in args.pages:
        if page.is_file():
            wanted[page] = refresh_blocks(page.read_text(encoding="utf-8"), ROOT)
    for path, text in wanted.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if not args.check:
                path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'differs' if args.check else 'written'}: {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
