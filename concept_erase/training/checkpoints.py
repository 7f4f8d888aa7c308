"""A run's checkpoints on disk: which one a resume reads (`find_checkpoint`: the latest whole one, damaged ones
skipped with a message), the metrics a resumed run keeps, and the message when there is nothing to resume. The
trainer writes and reads their contents (`Trainer._save_checkpoint`, `Trainer._resume`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from concept_erase.errors import UserError
from concept_erase.io.atomic import atomic_path


def find_checkpoint(output: Path, resume: str, log) -> Path | None:
    """The checkpoint to resume from: `latest` skips damaged ones, with a message."""
    if resume != "latest":
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise UserError(f"--resume {resume}: no checkpoint there (no state.json)")
        return path
    root = output / "checkpoints"
    if root.is_dir():  # a save killed half-way leaves its temporary folder: never a checkpoint, removed
        for stale in root.glob(".step-*.tmp"):
            log(f"removing the unfinished checkpoint save {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
    candidates = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    for path in candidates:
        if path.name.endswith(".tmp") or not path.is_dir():
            continue
        try:
            json.loads((path / "state.json").read_text())
            from concept_erase.io.loading import check_safetensors_file

            check_safetensors_file(path / "trained.safetensors")
            for part in ("optimizer.pt", "rank-0.safetensors"):
                if not (path / part).is_file():
                    raise UserError(f"no {part}")
            return path
        except (OSError, ValueError, UserError) as err:
            log(f"skipping damaged checkpoint {path}: {str(err)[:200]}")
    return None


def nothing_to_resume(output: Path) -> str:
    return (f"--resume latest: {output} holds a finished run and no checkpoint to continue it from; it is left as it "
            "is. Pass --overwrite (without --resume) to replace it, or choose another --output")


def truncate_metrics(path: Path, step: int) -> None:
    """After a resume from `step`, drop the lines a crashed run wrote past it."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line from a crash
    with atomic_path(path) as tmp:
        tmp.write_text("".join(l + "\n" for l in keep), encoding="utf-8")
