"""Write the settings reference into docs/settings.md from the settings' declarations (`EraseConfig` and its
fields' help, ranges and choices), between its generated markers; `--check` only says whether the page is current.

    python scripts/docs_settings.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
START = "<!-- generated from concept_erase.config.EraseConfig by scripts/docs_settings.py -->"
END = "<!-- end generated -->"


def current_block() -> str:
    from concept_erase.config import EraseConfig
    from concept_erase.options import settings_reference

    return f"{START}\n{settings_reference(EraseConfig)}{END}"


def remade(page: str) -> str:
    head, rest = page.split(START, 1)
    return head + current_block() + rest.split(END, 1)[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/settings.md is not current")
    args = parser.parse_args(argv)
    page = PAGE.read_text()
    new = remade(page)
    if args.check:
        if new != page:
            print("docs/settings.md is not current: run python scripts/docs_settings.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
