"""Prompt sets: the project's CSV schema, and validating loaders for the field's I2P and COCO CSVs.

The project's schema (prompts/README.md): one row per prompt, columns

    case_number  a whole number, unique in the file (names the images: 00012_s3.png)
    prompt       the text given to the model
    seed         the first seed; an evaluation suite takes seeds seed, seed+1, ... seed+N-1
    concept      what the prompt shows: the class name, the artist, the digit ('church', 'van gogh')

Any further column is kept (`PromptRow.extra`), e.g. `style` in the digits set. The field's
forms are read as they are published:

- I2P (Schramowski et al.; the form ESD, SalUn and MACE evaluate nudity with): `prompt` and a
  seed column `evaluation_seed` or `sd_seed`, optional `evaluation_guidance`/`sd_guidance`,
  `case_number` or the row index, `categories` kept as the concept.
- COCO captions (the FID sets of ESD and others): a `prompt` or `caption` column, optional
  `evaluation_seed`/`seed`, `case_number` or `image_id`.

Every loader reads the whole file first and names the line of the first malformed row.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from concept_erase.errors import UserError
from concept_erase.io.atomic import write_text

SEED_MAX = 2**32 - 1
KINDS = ("project", "i2p", "coco", "auto")


@dataclass(frozen=True)
class PromptRow:
    case_number: int
    prompt: str
    seed: int
    concept: str = ""
    guidance: float | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row) pairs; line numbers count from 1 with the header as line 1."""
    if not path.is_file():
        raise UserError(f"prompt file {path} not found; give a CSV file (see prompts/README.md for the columns)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise UserError(f"{path} line {line}: not UTF-8 text; save the CSV as UTF-8") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise UserError(f"{path} line {line}: a NUL byte; this is not a text CSV file")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        for record in reader:
            rows.append((reader.line_num, record))
    except csv.Error as err:
        raise UserError(f"{path} line {reader.line_num}: malformed CSV ({err}); check the quotes on that line") from None
    rows = [(n, r) for n, r in rows if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path} is empty; a prompt CSV needs a header line and at least one prompt")
    header_line, header = rows[0]
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise UserError(f"{path} line {header_line}: the column {dup[0][:40]!r} appears twice in the header")
    if len(rows) == 1:
        raise UserError(f"{path} has a header but no prompt rows")
    out = []
    for line, record in rows[1:]:
        if len(record) != len(header):
            raise UserError(f"{path} line {line}: {len(record)} fields where the header has {len(header)}; "
                            "quote a prompt that contains a comma")
        out.append((line, dict(zip(header, (c.strip() for c in record)))))
    return header, out


def _int(value: str, name: str, where: str, *, low: int = 0, high: int | None = None) -> int:
    try:
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
        number = int(number)
    except (ValueError, OverflowError):
        raise UserError(f"{where}: {name} {value[:40]!r} is not a whole number") from None
    if number < low or (high is not None and number > high):
        raise UserError(f"{where}: {name} {number} is out of range ({low} to {high if high is not None else 'any'})")
    return number


def _float(value: str, name: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{where}: {name} {value[:40]!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise UserError(f"{where}: {name} {value[:40]!r} must be a finite number, 0 or more")
    return number


def _first(row: dict, names: tuple[str, ...]) -> tuple[str, str] | None:
    for n in names:
        if n in row and row[n] != "":
            return n, row[n]
    return None


def detect_kind(header: list[str]) -> str:
    cols = set(header)
    if {"case_number", "prompt", "seed", "concept"} <= cols:
        return "project"
    if "prompt" in cols and ({"evaluation_seed", "sd_seed"} & cols) and ({"categories", "inappropriate_percentage",
                                                                          "nudity_percentage"} & cols):
        return "i2p"
    if ("caption" in cols or "prompt" in cols) and ({"image_id", "coco_id"} & cols or "caption" in cols):
        return "coco"
    if "prompt" in cols and ({"evaluation_seed", "sd_seed"} & cols):
        return "i2p"
    shown = ", ".join(repr(h)[:40] for h in header[:8]) + (" ..." if len(header) > 8 else "")
    raise UserError("columns " + shown + " match none of the known prompt forms: the project's "
                    "(case_number, prompt, seed, concept), I2P (prompt, evaluation_seed or sd_seed, categories) or "
                    "COCO captions (caption or prompt, image_id); see prompts/README.md")


REQUIRED = {
    "project": ("case_number", "prompt", "seed", "concept"),
    "i2p": ("prompt",),
    "coco": (),
}


def load_prompts(path: str | Path, kind: str = "auto") -> list[PromptRow]:
    """Read and validate a prompt CSV; raise UserError naming the line of the first bad row."""
    path = Path(path)
    if kind not in KINDS:
        raise UserError(f"unknown prompt form {kind!r}; choose one of {', '.join(KINDS)}")
    header, rows = _read_rows(path)
    try:
        found = detect_kind(header) if kind == "auto" else kind
    except UserError as err:
        raise UserError(f"{path} line 1: {err}") from None
    missing = [c for c in REQUIRED[found] if c not in header]
    if found == "coco" and not {"prompt", "caption"} & set(header):
        missing.append("caption (or prompt)")
    if missing:
        raise UserError(f"{path} line 1: the {found} form needs the column(s) {', '.join(missing)}")
    known = {"case_number", "prompt", "caption", "seed", "evaluation_seed", "sd_seed", "concept", "categories",
             "guidance", "evaluation_guidance", "sd_guidance", "image_id"}
    out: list[PromptRow] = []
    seen: dict[int, int] = {}
    for index, (line, row) in enumerate(rows):
        where = f"{path} line {line}"
        text = row.get("prompt") or row.get("caption") or ""
        if not text:
            raise UserError(f"{where}: the prompt is empty")
        if found == "project":
            case = _int(row["case_number"], "case_number", where)
            seed = _int(row["seed"], "seed", where, high=SEED_MAX)
            concept = row["concept"]
        else:
            c = _first(row, ("case_number", "image_id"))
            case = _int(c[1], c[0], where) if c else index
            s = _first(row, ("evaluation_seed", "sd_seed", "seed"))
            seed = _int(s[1], s[0], where, high=SEED_MAX) if s else 0
            concept = row.get("concept") or row.get("categories", "")
        g = _first(row, ("guidance", "evaluation_guidance", "sd_guidance"))
        guidance = _float(g[1], g[0], where) if g else None
        if case in seen:
            raise UserError(f"{where}: case_number {case} already used on line {seen[case]}; case numbers name "
                            "the images and must be unique")
        seen[case] = line
        extra = {k: v for k, v in row.items() if k not in known}
        out.append(PromptRow(case, text, seed, concept, guidance, extra))
    return out


def write_prompts(path: str | Path, rows: list[PromptRow]) -> None:
    """Write rows in the project's schema (extra columns after the four required ones)."""
    extras = sorted({k for r in rows for k in r.extra})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_number", "prompt", "seed", "concept", *(["guidance"] if any(r.guidance is not None for r in rows)
                                                              else []), *extras])
    with_g = any(r.guidance is not None for r in rows)
    for r in rows:
        w.writerow([r.case_number, r.prompt, r.seed, r.concept, *([r.guidance if r.guidance is not None else ""]
                                                                  if with_g else []),
                    *(r.extra.get(k, "") for k in extras)])
    write_text(path, buf.getvalue())
