"""An output folder that a rerun of the same command continues, and that another run never clobbers.

`eval` and `attack` write a marker file (`eval.json`, `attack.json`) holding what was asked. A rerun
with the same request continues the folder (work already done is kept); a folder holding anything
else is refused without `--overwrite`; with it, the new output is built beside the old one
(`.NAME.new`) and swapped into place only when complete, so a crash never loses a good output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from concept_erase.errors import UserError
from concept_erase.io.atomic import write_json


def valid_png(path: Path) -> bool:
    """A PNG that opens: a file cut short by a kill is made again."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any unreadable file is regenerated
        return False


def _same(marker: Path, fingerprint: dict) -> bool:
    try:
        return json.loads(marker.read_text()) == json.loads(json.dumps(fingerprint))
    except (OSError, ValueError):
        return False


def output_plan(output: Path, fingerprint: dict, overwrite: bool, *, marker: str, what: str) -> str:
    """"new", "continue" (the same request, half done) or "replace"; refuses anything else. Writes nothing."""
    mark = output / marker
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; give a folder")
    if not output.exists() or not any(output.iterdir()):
        return "new"
    if _same(mark, fingerprint) and not overwrite:
        return "continue"
    if not overwrite:
        held = f"another {what}" if mark.is_file() else "other files"
        raise UserError(f"{output} holds {held}; choose another --output, or pass --overwrite to replace it "
                        f"(it is replaced only when the new {what} is complete)")
    return "replace"


def prepare_output(output: Path, fingerprint: dict, overwrite: bool, *, marker: str, what: str) -> tuple[Path, bool]:
    """The folder to work in and whether it replaces `output` at the end (`atomic.replace_path`)."""
    plan = output_plan(output, fingerprint, overwrite, marker=marker, what=what)
    if plan == "new":
        output.mkdir(parents=True, exist_ok=True)
        write_json(output / marker, fingerprint)
        return output, False
    if plan == "continue":
        return output, False
    work = output.parent / f".{output.name}.new"
    if work.exists() and not _same(work / marker, fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / marker, fingerprint)
    return work, True

