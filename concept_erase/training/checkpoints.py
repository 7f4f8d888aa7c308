"""A run's checkpoints: what one holds and how a run is resumed from it.

A checkpoint (`OUTPUT/checkpoints/step-N/`) holds the trained tensors, the optimizer's state, each process's own
tensors (a trajectory pool, a carried retain tuple) and `state.json`: the step, the lambda controller's state, the
erasure signal's average and lambda's recent trail, the probe's state, the base model's digest, the settings, and
whether the run had stopped. `save_checkpoint` writes one atomically (sharded weights gathered whole);
`find_checkpoint` picks the latest whole one (damaged ones skipped with a message); `resume` refuses a checkpoint
of another erasure (`check_same_run`: another base model, or a setting that changes what a step trains) and
restores everything, so a resumed run takes the uninterrupted run's steps exactly; the metrics past the step are
dropped (`truncate_metrics`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from concept_erase.config import config_json, resume_differences
from concept_erase.errors import UserError
from concept_erase.io.atomic import atomic_dir, atomic_path, write_json
from concept_erase.io.loading import check_safetensors_file
from concept_erase.training.sharding import load_optimizer_state, load_whole, optimizer_state, whole_state


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


def rank_state(t) -> dict[str, torch.Tensor]:
    """Tensors this rank needs for its next step (a trajectory pool, a carried retain tuple)."""
    extra = dict(t.forget.state_tensors())
    extra.update(t.probe.state()[0])
    return {k: v.detach().cpu().contiguous() for k, v in extra.items()}

def save_checkpoint(t, step: int, whole: dict | None = None) -> Path:
    """`whole`: the sharded trained weights already gathered (the run's end gathers them once for all)."""
    from accelerate.utils import gather_object

    acc = t.accelerator
    root = t.output / "checkpoints"
    path = root / f"step-{step:08d}"
    per_rank = gather_object([rank_state(t)]) if acc.num_processes > 1 else [rank_state(t)]
    # sharded weights and optimizer states are gathered whole: every process takes part
    if t.sharded and whole is None:
        whole = whole_state(t.trained)
    opt_state = optimizer_state(t.trained, t.optimizer.optimizer, t.sharded) \
        if t.sharded or acc.is_main_process else None
    if acc.is_main_process:
        from safetensors.torch import save_file

        with atomic_dir(path, overwrite=True) as tmp:
            save_file(whole if t.sharded else {n: p.detach().cpu().contiguous() for n, p in t.trained.items()},
                      str(tmp / "trained.safetensors"))
            torch.save(opt_state, tmp / "optimizer.pt")
            for rank, extra in enumerate(per_rank):
                save_file(extra, str(tmp / f"rank-{rank}.safetensors"))
            write_json(tmp / "state.json", {"step": step, "stopped_at": t.stopped_at,
                                            "stop_reason": t.stop_reason,
                                            "controller": t.controller.state_dict(),
                                            "signal": t.signal.state_dict(),
                                            "lambda_trail": t.lambda_trail.state_dict(),
                                            **t.probe.state()[1], "num_processes": acc.num_processes,
                                            "base_model_digest": t.base_digest,
                                            "changed_on_resume": t.changed_on_resume,
                                            "config": json.loads(config_json(t.config))})
        limit = t.config.checkpoints_total_limit
        if limit:
            kept = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in kept[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return path

def resume(t) -> None:
    from safetensors.torch import load_file

    path = find_checkpoint(t.output, t.config.resume, t.log)
    if path is None:
        if (t.final_output / "erased.safetensors").is_file():  # its checkpoints were all damaged
            raise UserError(nothing_to_resume(t.final_output))
        t.log(f"no usable checkpoint in {t.output / 'checkpoints'}; starting from step 0")
        if t.accelerator.is_main_process:
            truncate_metrics(t.output / "metrics.jsonl", 0)
        return
    state = json.loads((path / "state.json").read_text())
    check_same_run(t, path, state)
    weights = load_file(str(path / "trained.safetensors"))
    if set(weights) != set(t.trained):
        raise UserError(f"checkpoint {path} was made with another --train subset or model; "
                        "resume with the settings of that run")
    for n, p in t.trained.items():
        load_whole(p, weights[n])
    load_optimizer_state(t.trained, t.optimizer.optimizer if t.sharded else t.optimizer,
                         torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True), t.sharded)
    t.controller.load_state_dict(state["controller"])
    t.signal.load_state_dict(state.get("signal", {}))
    t.lambda_trail.load_state_dict(state.get("lambda_trail", {}))
    if state.get("num_processes", 1) != t.accelerator.num_processes:
        raise UserError(f"checkpoint {path} was written by {state.get('num_processes', 1)} process(es); "
                        f"resume it with the same number (now {t.accelerator.num_processes})")
    extra = load_file(str(path / f"rank-{t.accelerator.process_index}.safetensors"))
    t.forget.load_state_tensors(extra)
    t.probe.load_state(extra, state, t.accelerator.device)
    t.start_step = int(state["step"])
    t.stopped_at = state.get("stopped_at")
    t.stop_reason = state.get("stop_reason", "")
    turned_off = t.changed_on_resume.get("stop_when_erased", {}).get("now") is False
    if t.stopped_at is not None and turned_off:
        t.log(f"the run had stopped at step {t.stopped_at} ({t.stop_reason}); with the stop off it trains "
                 f"on to step {t.config.steps}")
        t.stopped_at, t.stop_reason = None, ""
    elif t.stopped_at is not None and t.config.steps > t.stopped_at:
        t.log(f"the run stopped at step {t.stopped_at}: {t.stop_reason}; it stays stopped and trains no "
                 f"further (resume with --no-stop-when-erased to train on to step {t.config.steps})")
    if t.accelerator.is_main_process:
        truncate_metrics(t.output / "metrics.jsonl", t.start_step)
    t.log(f"resumed from {path} at step {t.start_step}")

def check_same_run(t, path: Path, state: dict) -> None:
    """A resume continues the checkpoint's erasure: a setting that changes what a step trains, or another base
    model, is refused in one line; the resumable ones that changed are kept for the run's record."""
    digest = state.get("base_model_digest")
    if digest is not None and digest != t.base_digest:
        raise UserError(f"checkpoint {path} was made from another base model (digest {digest[:12]}, this one "
                        f"{t.base_digest[:12]}); resume it with the model it was made from")
    refused, changed = resume_differences(state.get("config", {}), t.config)
    if refused:
        refused.sort(key=lambda r: r[0] != "--weights")  # the chain a run continues decides its concepts: said first
        flag, then, now = refused[0]
        more = f" (and {len(refused) - 1} other setting(s))" if len(refused) > 1 else ""
        raise UserError(f"checkpoint {path} was made with {flag} {json.dumps(then)}, this resume asks for "
                        f"{json.dumps(now)}{more}; a resume continues the same erasure: resume with the checkpoint's "
                        "settings, or start a new run with another --output")
    t.changed_on_resume = {**state.get("changed_on_resume", {}), **{
        k: {"checkpoint": state.get("changed_on_resume", {}).get(k, v)["checkpoint"], "now": v["now"]}
        for k, v in changed.items()}}
    if changed:
        t.log("resumed with other " + ", ".join(f"{k} ({json.dumps(v['checkpoint'])} -> {json.dumps(v['now'])})"
                                                   for k, v in changed.items()))
