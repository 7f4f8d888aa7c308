"""The documentation as a newcomer meets it: the site builds strictly, every link reaches a file, every command line
names a real subcommand and real flags, and no tracked text tells the project's development history."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "benchmarks" / "scale.md", ROOT / "benchmarks" / "tuning-record.md",
         ROOT / "CHANGELOG.md", ROOT / "prompts" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]


def test_the_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a page missing from the navigation, or a nav entry without its page, fails."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file(page):
    """Links are read as GitHub reads them: relative to the page, an anchor after '#'."""
    broken = [t for t in relative_links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: links to nothing: {broken}"


def command_lines(text: str) -> list[str]:
    """Every `concept-erase SUBCOMMAND ...` in code (fenced blocks and inline spans), continuation lines joined and
    shell comments dropped."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    out = []
    for code in blocks + inline:
        for line in re.sub(r"\\\n\s*", " ", code).splitlines():
            line = re.sub(r"\s#.*$", "", line)
            out += [m.group(1).strip() for m in re.finditer(r"(?:^|[\s$(])concept-erase ([a-z][^|;&]*)", line)]
    return out


def test_every_command_line_in_the_docs_names_a_real_subcommand_and_real_flags():
    from concept_erase.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    commands = sub.choices
    wrong, seen = [], 0
    for page in PAGES:
        for line in command_lines(page.read_text(encoding="utf-8")):
            name = line.split()[0]
            if name not in commands:
                wrong.append(f"{page.name}: no subcommand {name!r} ({line[:100]!r})")
                continue
            seen += 1
            known = {s for a in commands[name]._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
                if flag not in known:
                    wrong.append(f"{page.name}: {name} has no {flag} ({line[:100]!r})")
    assert seen > 20  # the pages show the commands
    assert not wrong, "\n".join(wrong)


HISTORY = re.compile(r"\bsessions?\b|\bissues? ?#?\d+", re.I)
ISSUE_AT_END = re.compile(r"\bissues?\s*$", re.I)
ALLOWED = ('scope="session"', "get_session")  # pytest's and huggingface_hub's own names
NOT_TEXT = (".safetensors", ".png", ".bin", ".ckpt", "vocab.json", "merges.txt", "tokenizer.json", "spiece.model")


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are not known")
    return [ROOT / n for n in names if not n.endswith(NOT_TEXT) and (ROOT / n).is_file()]


def test_no_tracked_text_tells_the_development_history():
    """No trace of how the project was built (the word for a working stint, a tracker's numbers) in code, tests,
    recipes, help or docs: what changed between versions is in CHANGELOG.md, in users' terms."""
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            for allowed in ALLOWED:
                line = line.replace(allowed, "")
            # a tracker's number may start the next line of a wrapped sentence
            following = lines[n].lstrip(" \t#>*-") if n < len(lines) and ISSUE_AT_END.search(line) else ""
            if HISTORY.search(line) or HISTORY.search(f"issue {following}"[:40] if following else ""):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not found, "\n".join(found[:20])


def test_the_settings_page_is_made_from_the_declarations_and_follows_them(monkeypatch):
    """docs/settings.md holds the table `scripts/docs_settings.py` makes from EraseConfig's fields; a changed
    declaration makes the page out of date."""
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_settings", ROOT / "scripts" / "docs_settings.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, "run python scripts/docs_settings.py"
    page = (ROOT / "docs" / "settings.md").read_text()
    from concept_erase.config import EraseConfig

    for f in dataclasses.fields(EraseConfig):
        if "help" in f.metadata and not f.metadata.get("hidden"):
            assert f"`{f.name}`" in page, f.name
    lr = next(f for f in dataclasses.fields(EraseConfig) if f.name == "lr")
    monkeypatch.setattr(lr, "metadata", {**lr.metadata, "help": "a changed help text"})
    assert script.main(["--check"]) == 1
