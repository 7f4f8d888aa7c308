"""A run's folder: what a run writes there, the refusal of an output that would destroy a run, and the
replacement of a run by a new one (`--overwrite`) that never loses the old run before the new one is whole.

The new run is built in OUTPUT/.incoming while the old one stays in place. When it is finished, `swap_in`
moves everything the old run wrote (`run_entries`) into OUTPUT/.replaced, marks that half done, and moves the
new run's entries into OUTPUT; each half is a series of renames that `finish_swap` completes after a crash.
A user's own files beside the run stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from concept_erase import provenance
from concept_erase.errors import Interrupted, UserError
from concept_erase.io.atomic import write_json
from concept_erase.io.digests import tensor_digest
from concept_erase.training.checkpoints import nothing_to_resume

RUN_MARKERS = ("metrics.jsonl", "erased.safetensors", "checkpoints", "run.json")
# What else a run may write in its folder: --stop-when-erased's checks, the trackers' logs, --sample-every's
# grids. `--overwrite` replaces all of it with the run; a user's own files beside the run stay.
RUN_PRODUCTS = ("checks.jsonl", "logs")
SAMPLE_GRIDS = "samples/step-*.png"

STAGING, REPLACED = ".incoming", ".replaced"  # inside the output: the replacement run, the run it replaces


def check_output(output: Path, *, overwrite: bool, resume: str, resumable: bool = True) -> bool:
    """Refuse an output that would destroy a run; True when it holds one to replace. Writes nothing. `resumable`:
    whether this run could continue one (a closed-form edit cannot), so that the refusal offers only what works."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file; choose a folder path")
    holds_run = output.is_dir() and any((output / m).exists() for m in RUN_MARKERS)
    has_checkpoint = any((p / "state.json").is_file() for p in (output / "checkpoints").glob("step-*"))
    if holds_run and not resume and not overwrite:
        resume_hint = "pass --resume latest to continue it, " if resumable and has_checkpoint else "pass "
        raise UserError(f"{output} already holds a run; {resume_hint}--overwrite to replace it, or choose another "
                        "--output")
    if resume == "latest" and (output / "erased.safetensors").is_file() and not has_checkpoint:
        raise UserError(nothing_to_resume(output))
    return holds_run and not resume


def run_entries(folder: Path) -> list[str]:
    """What a run wrote in `folder` (paths relative to it): what a replacement run replaces."""
    names = [m for m in RUN_MARKERS + RUN_PRODUCTS if (folder / m).exists()]
    return names + sorted(p.relative_to(folder).as_posix() for p in folder.glob(SAMPLE_GRIDS))


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


ASIDE = "moved-aside"  # in OUTPUT/.replaced once the old run is wholly there: the swap's second half may begin


def _complete_swap(output: Path) -> None:
    """The two halves of a swap, each resumable: the old run's entries into OUTPUT/.replaced (then the
    marker), the new run's from OUTPUT/.incoming into OUTPUT; then both folders go."""
    incoming, replaced = output / STAGING, output / REPLACED
    replaced.mkdir(exist_ok=True)
    if not (replaced / ASIDE).exists():  # the old run is not wholly aside yet: nothing new is in place
        for name in run_entries(output):
            _move(output / name, replaced / name)
        (replaced / ASIDE).touch()
    for name in run_entries(incoming):
        _move(incoming / name, output / name)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(incoming, ignore_errors=True)


def finish_swap(output: Path, log=None) -> None:
    """Complete a replacement that was stopped half-way through `swap_in` (the new run was whole
    when the swap began, so it is carried forward), and remove a replacement that never finished."""
    incoming, replaced = output / STAGING, output / REPLACED
    if replaced.is_dir():
        _complete_swap(output)
        if log:
            log(f"completed the replacement of the run in {output} that an earlier --overwrite had begun")
    elif incoming.is_dir():
        shutil.rmtree(incoming, ignore_errors=True)
        if log:
            log(f"removed an unfinished replacement run from {output} (an earlier --overwrite that stopped)")


def swap_in(output: Path) -> None:
    """Put the finished replacement run (OUTPUT/.incoming) in place of the run in OUTPUT: everything the
    old run wrote (`run_entries`) goes, so no check, log or sample grid of it is left to pass for the new
    run's. Files of the user's beside the run (their own files in samples/, notes) stay. Each move is a
    rename; `finish_swap` completes a swap that a crash interrupted."""
    if not (output / STAGING / "erased.safetensors").is_file():
        raise RuntimeError(f"no finished replacement run in {output / STAGING}; the run in {output} was left as it is")
    _complete_swap(output)


def make_run_folder(output: Path, *, replace: bool) -> None:
    """Create the run folder once set-up has succeeded (a failed set-up leaves no folder behind).
    With `replace`, the new run goes to OUTPUT/.incoming and the old run is left as it is."""
    if replace:
        shutil.rmtree(output / STAGING, ignore_errors=True)
        (output / STAGING).mkdir(parents=True)
    output.mkdir(parents=True, exist_ok=True)


def record_ranks(t, whole: dict | None) -> None:
    """Write what each process ended with into run.json: every rank must hold the same lambda and weights
    (`whole`: the sharded weights gathered whole; None when not sharded)."""
    from accelerate.utils import gather_object

    mine = {"rank": t.accelerator.process_index, "lambda_history": t.lambda_history,
            "weights_digest": tensor_digest(whole if whole is not None else t.trained)}
    ranks = gather_object([mine])
    if t.accelerator.is_main_process:
        run = json.loads((t.output / "run.json").read_text())
        run["ranks"] = ranks
        run["finished"] = provenance.now()
        if t.stopped_at:
            run["stopped_at"] = t.stopped_at
            run["stop_reason"] = t.stop_reason
        write_json(t.output / "run.json", run)

def last_good(t) -> str:
    """What survives a failure now, and what to do: for messages."""
    if getattr(t, "replacing", False):
        return (f"the previous run in {t.final_output} is unchanged (the unfinished replacement was removed); "
                "run the same command again to replace it.")
    output = getattr(t, "output", None)
    root = output / "checkpoints" if output else None
    kept = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) \
        if root and root.is_dir() else []
    if kept:
        return f"the last good checkpoint, {kept[-1]}, is intact (continue with --resume latest)."
    if output and output.is_dir():
        return "no checkpoint had been written yet (--resume latest starts it again from step 0)."
    return "nothing was written."

@contextlib.contextmanager
def unfinished_run_discarded(t):
    """Around a run: on any failure the unfinished replacement (OUTPUT/.incoming) goes and the previous run stays;
    Ctrl-C ends in one line that says what survives."""
    try:
        yield
    except KeyboardInterrupt:
        discard_replacement(t)
        raise Interrupted(last_good(t)) from None
    except BaseException:
        discard_replacement(t)
        raise


def discard_replacement(t) -> None:
    if getattr(t, "replacing", False) and getattr(t, "accelerator", None) is not None \
            and t.accelerator.is_main_process:
        shutil.rmtree(t.final_output / STAGING, ignore_errors=True)
