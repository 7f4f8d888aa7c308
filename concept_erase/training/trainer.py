"""The erasure trainer: Accelerate, one loop, no method-specific branch.

What a step does is read off the plug-ins: the model family encodes prompts and calls the denoiser,
the forget and retain objectives build regression batches, the lambda controller says how the two
losses combine (one joint backward pass, or one per loss with a closed-form lambda) and names the
probe (`probes.py`) that reads the retain loss before and after the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from concept_erase import processes, provenance
from concept_erase.config import EraseConfig, config_json, is_edit
from concept_erase.errors import TrainingDiverged, UserError
from concept_erase.export.delta import save_delta
from concept_erase.io.atomic import write_json, writer_lock
from concept_erase.methods.losses import (erasure_signal, guidance_projection, per_sample_mse, still_guided,
                                          surgery_products)
from concept_erase.methods.objectives import RegressionBatch
from concept_erase.methods.stopping import Hooks, stop_rule
from concept_erase.training import setup, tracking
from concept_erase.training.chain import chained_config, previous_lora, read_previous, request, touched
from concept_erase.training.checkpoints import save_checkpoint
from concept_erase.training.edit_run import EditRun
from concept_erase.training.hardware import grad_scale, no_cudnn_attention
from concept_erase.training.run_folder import last_good, record_ranks, swap_in, unfinished_run_discarded
from concept_erase.training.seeds import generator
from concept_erase.training.sharding import full, local, sum_over_processes, whole_state


def step_generator(seed: int, step: int, rank: int, micro: int, stream: int = 0) -> torch.Generator:
    """Every random draw of a step comes from here: the same on any device, and after a resume.

    The stream is named by all of its coordinates (see `seeds`): no two (step, rank, micro-batch,
    stream) share draws, whatever the number of ranks and micro-batches.
    """
    return generator(seed, step, rank, micro, stream)


class Trainer:
    def __init__(self, config: EraseConfig, pipe=None, on_step=None, previous=None, chain: list | None = None):
        """`on_step(steps_done, trainer)`, if given, runs after every step (outside the step's timing):
        a benchmark evaluates intermediate weights with it. A true return stops the run there (the
        processes agree when the hook says `may_stop`); a hook's `start(trainer)`, if it has one, runs
        before the first step."""
        config.check_runnable()
        self.config = config
        self.pipe = pipe
        self.on_step = on_step
        # --weights: the run it continues (`training/chain.py`) and the requests of the whole chain, in order
        self.previous, self.chain = previous, chain
        self.backward_passes = 0

    def _backward(self, loss) -> None:
        self.backward_passes += 1
        self.accelerator.backward(loss)

    # ---------------------------------------------------------------- set-up
    def _setup(self) -> None:
        """The set-up's steps, in order (`training/setup.py`)."""
        for step in setup.STEPS:
            step(self)

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(message)

    # ---------------------------------------------------------------- the step
    def _forward(self, batch: RegressionBatch) -> torch.Tensor:
        """The per-sample losses of a batch."""
        return self._losses(batch)[0]

    def _losses(self, batch: RegressionBatch, forget: RegressionBatch | None = None):
        """(per-sample losses, and for the batch's first rows, those of `forget` when it carries the concept
        direction, the guidance projection's two per-sample terms; else None, None)."""
        pred = self.family.predict(self.model, batch.latents, batch.timesteps, batch.cond)
        along = norm_sq = None
        if forget is not None and forget.origin is not None:
            with torch.no_grad():
                along, norm_sq = guidance_projection(pred[:len(forget)].detach(), forget.origin, forget.direction)
        return per_sample_mse(pred, batch.target), along, norm_sq

    def _forget_loss(self, losses: torch.Tensor, along, norm_sq, sums: dict) -> torch.Tensor:
        """The forget loss to descend, from its per-sample values; the step's signal terms and forget loss (every
        sample's, held or not) go into `sums`. With --hold-erasure-at, a sample whose projection is already at
        or under that level adds nothing: the erasure is held there, not pushed further."""
        sums["forget"] += losses.detach().mean()
        if along is None:
            return losses.mean()
        sums["along"] = sums["along"] + along.sum()
        sums["norm_sq"] = sums["norm_sq"] + norm_sq.sum()
        level = self.config.hold_erasure_at
        if level is None:
            return losses.mean()
        pushed = still_guided(along, norm_sq, level)
        sums["held"] = sums["held"] + (~pushed).float().mean()
        return (losses * pushed).mean()

    def _retain_batch(self, gen, step: int, micro: int) -> tuple[RegressionBatch, int]:
        """A retain batch, with the probe's tail (a carried tuple) after the fresh rows. Returns (batch, fresh)."""
        tail = self.probe.retain_tail(micro)
        fresh_n = self.config.retain_batch_size - (len(tail) if tail is not None else 0)
        fresh = self.retain.batch(gen, fresh_n, step)
        return (RegressionBatch.cat([fresh, tail]) if tail is not None else fresh), fresh_n

    def _forget_batch(self, gen, step: int, rank: int, micro: int):
        """The forget rows of one micro-batch. `slot` numbers it among every process's micro-batches of the step, so
        that the objective spreads its prompts evenly (`objectives.PromptOrder`)."""
        k = self.config.gradient_accumulation_steps
        slot = (rank * k + micro, self.accelerator.num_processes * k)
        return self.forget.batch(gen, self.config.batch_size, step, slot=slot)

    def _sync(self, micro: int):
        """No gradient all-reduce until the last micro-batch."""
        last = micro == self.config.gradient_accumulation_steps - 1
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def _joint_backward(self, step: int, rank: int, sums: dict) -> float:
        """forget + lambda * retain, one backward pass; the probe sees each retain batch."""
        cfg, k, lam = self.config, self.config.gradient_accumulation_steps, self.controller.current()
        for micro in range(k):
            gen = step_generator(cfg.seed, step, rank, micro)
            fb = self._forget_batch(gen, step, rank, micro)
            with self._sync(micro):
                if self.retain is not None:
                    # Both losses from one UNet call: the rows are independent (no batch statistics in
                    # the UNet), and one call on the joined batch costs about half of two calls on
                    # small batches (measured on the digits UNet: 185 ms against 342 ms, forward and
                    # backward). UNGrad cannot do this: it needs the two gradients apart.
                    rb, fresh_n = self._retain_batch(gen, step, micro)
                    both, along, norm_sq = self._losses(RegressionBatch.cat([fb, rb]), fb)  # forget rows first
                    per = both[len(fb):]
                    loss_r = per.mean()
                    loss = self._forget_loss(both[:len(fb)], along, norm_sq, sums) + lam * loss_r
                    sums["retain"] += loss_r.detach()
                    self.probe.observe(step, rank, micro, rb, per, fresh_n)
                else:
                    loss = self._forget_loss(*self._losses(fb, fb), sums)
                self._backward(loss / k)
        return lam

    def _separate_backward(self, step: int, rank: int, sums: dict) -> float:
        """One backward pass per loss; lambda in closed form from the two gradients (UNGrad)."""
        cfg, k, acc, ctl = self.config, self.config.gradient_accumulation_steps, self.accelerator, self.controller
        for micro in range(k):
            gen = step_generator(cfg.seed, step, rank, micro)
            fb = self._forget_batch(gen, step, rank, micro)
            with self._sync(micro):
                self._backward(self._forget_loss(*self._losses(fb, fb), sums) / k)
        # Hand g_u's buffers over (no copy), then let backward make g_r: two gradient vectors at the
        # peak, never three (the combined gradient is made in g_r's buffers, in place).
        g_u = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        for micro in range(k):
            gen = step_generator(cfg.seed, step, rank, micro, stream=1)
            rb, _ = self._retain_batch(gen, step, micro)
            with self._sync(micro):
                loss_r = self._forward(rb).mean()
                self._backward(loss_r / k)
            sums["retain"] += loss_r.detach()
        g_r = [p.grad for p in self.params]
        # Under fp16 both gradients carry the gradient scaler's factor S: <g_r, g_u> and ||g_r||^2 are
        # S^2 too large, and eps would act as eps / S^2. The closed form takes them unscaled.
        dot, norm_sq = surgery_products([None if g is None else local(g) for g in g_u],
                                        [None if g is None else local(g) for g in g_r], grad_scale(acc))
        if self.sharded:  # each process summed over its slices
            both = sum_over_processes(torch.tensor([dot, norm_sq], dtype=torch.float64, device=acc.device), True)
            dot, norm_sq = float(both[0]), float(both[1])
        lam = ctl.from_gradients(dot, norm_sq)
        for i, p in enumerate(self.params):
            a, g_u[i] = g_u[i], None  # each g_u buffer is released as soon as it is added
            if p.grad is None:
                p.grad = a  # g_r is zero here: the combination is g_u alone
            else:
                p.grad.mul_(lam)
                if a is not None:
                    p.grad.add_(a)
        del g_r
        return lam

    def _step(self, step: int) -> dict:
        cfg, acc, ctl = self.config, self.accelerator, self.controller
        k = cfg.gradient_accumulation_steps
        rank = acc.process_index
        backward_before = self.backward_passes
        sums = {"forget": 0.0, "retain": 0.0, "along": 0.0, "norm_sq": 0.0, "held": 0.0}
        probe = self.probe
        probe.begin_step()
        # The controller names the step's shape: one backward pass on forget + lambda * retain, or one per
        # loss with lambda from the two gradients.
        backward = {"joint": self._joint_backward, "separate": self._separate_backward}[ctl.gradients]
        lam = backward(step, rank, sums)

        if cfg.max_grad_norm > 0:  # clipping measures the norm (before clipping) already
            grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if cfg.max_grad_norm <= 0 or grad_norm is None:
            grad_norm = self._grad_norm()
        grad_norm = full(grad_norm)  # FSDP2's clipping returns the norm as a replicated DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        probe.after_step(step, rank)

        # All ranks reduce the same fp32 loss values, so every rank takes the same lambda step.
        def mean(xs):
            return sum(xs) / len(xs) if xs else 0.0

        values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=acc.device).reshape(())
                              for v in (sums["forget"] / k, sums["retain"] / k, mean(probe.before),
                                        mean(probe.after), grad_norm, sums["along"], sums["norm_sq"],
                                        sums["held"] / k)])
        loss_f, loss_r, before, after, gnorm, along, norm_sq, held = (
            float(v) for v in acc.reduce(values, reduction="mean").cpu())
        paired = bool(probe.after) and len(probe.after) == len(probe.before)
        ctl.update(before if paired else None, after if paired else None, cfg.lr)
        record = {"step": step + 1, "loss_forget": loss_f,
                  "loss_retain": loss_r if self.retain is not None else None,
                  "lambda": lam, "grad_norm": gnorm, "backward_passes": self.backward_passes - backward_before,
                  **ctl.diagnostics()}
        # the processes' means of the two sums: the same ratio as the sums over every process
        signal = erasure_signal(torch.tensor(along), torch.tensor(norm_sq))
        record["erasure_signal"] = signal
        record["erasure_signal_avg"] = self.signal.update(signal)
        if cfg.hold_erasure_at is not None:
            record["held_share"] = held  # the forget samples already at or under the hold level
        bad = [k2 for k2 in ("loss_forget", "loss_retain", "grad_norm") if record[k2] is not None
               and not math.isfinite(record[k2])]
        if not math.isfinite(ctl.current()):
            bad.append("lambda")
        if bad:
            raise TrainingDiverged(f"{' and '.join(bad)} became NaN or Inf at step {step + 1}; {last_good(self)} "
                                   "Lower --lr, or try --mixed-precision no.")
        return record

    def _agreed(self, stop: bool, may_stop: bool) -> bool:
        """Every process's view of a hook's stop: any one of them asking stops all (the hooks that may
        stop judge on the main process only)."""
        acc = self.accelerator
        if not may_stop or acc.num_processes == 1:
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    def _grad_norm(self) -> torch.Tensor:
        grads = [local(p.grad.detach()).float() for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.accelerator.device)
        squares = torch.stack([g.square().sum() for g in grads]).sum().reshape(1)
        return sum_over_processes(squares, self.sharded).sqrt().reshape(())

    # ---------------------------------------------------------------- the loop
    def run(self) -> Path:
        """Train, then write erased.safetensors. With --overwrite the new run is built in OUTPUT/.incoming
        and swapped in only once complete: any failure before that leaves the previous run as it was."""
        with unfinished_run_discarded(self), no_cudnn_attention():
            return self._run()

    def _run(self) -> Path:
        from tqdm.auto import tqdm

        self._setup()
        cfg, acc = self.config, self.accelerator
        metrics_path = self.output / "metrics.jsonl"
        if acc.is_main_process:
            write_json(self.output / "run.json", {"config": json.loads(config_json(cfg)),
                                                  "num_processes": acc.num_processes, "sharded": self.sharded,
                                                  "base_model_digest": self.base_digest,
                                                  "resumed_from_step": self.start_step,
                                                  "changed_on_resume": self.changed_on_resume, **provenance.record()})
        bar = tqdm(total=cfg.steps, initial=self.start_step, desc="erasing", disable=not (cfg.progress and acc.is_main_process),
                   dynamic_ncols=True)
        metrics = open(metrics_path, "a", encoding="utf-8") if acc.is_main_process else None
        tracking.start(acc, cfg, self.output, self.start_step)
        hook = self.on_step
        if hook is not None and hasattr(hook, "start"):
            hook.start(self)
        last = self.stopped_at or cfg.steps  # a resumed run that had stopped early stays stopped
        try:
            for step in range(self.start_step, last):
                t0 = time.perf_counter()
                try:
                    record = self._step(step)
                except RuntimeError as err:
                    if acc.num_processes > 1 and processes.peer_lost(err):
                        raise UserError(f"another process of this run stopped during step {step + 1} "
                                        f"({str(err).strip().splitlines()[0][:120]}); {last_good(self)}") from err
                    raise
                self.lambda_history.append(record["lambda"])
                self.lambda_trail.update(record["lambda"])
                if acc.device.type == "cuda":
                    torch.cuda.synchronize()
                record["step_time_s"] = time.perf_counter() - t0
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                tracking.log_step(acc, cfg, record)
                bar.update(1)
                bar.set_postfix(forget=f"{record['loss_forget']:.4f}",
                                retain="-" if record["loss_retain"] is None else f"{record['loss_retain']:.4f}",
                                lam=f"{record['lambda']:.3g}",
                                signal="-" if record["erasure_signal_avg"] is None
                                else f"{record['erasure_signal_avg']:.2f}")
                done = step + 1
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    save_checkpoint(self, done)
                if hook is not None and self._agreed(bool(hook(done, self)), getattr(hook, "may_stop", False)):
                    if done < last:  # a stop asked at the last step ends nothing early
                        self.stopped_at = last = done
                        self.stop_reason = getattr(hook, "reason", "") or "a step hook asked to stop"
                        self.log(f"stopped at step {done} of {cfg.steps}: {self.stop_reason}")
                    break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
            tracking.finish(acc, cfg)  # before an --overwrite swap moves the folder the trackers write in
        whole = whole_state(self.trained) if self.sharded else None  # gathered once, by every process
        final = save_checkpoint(self, last, whole)
        if acc.is_main_process and cfg.checkpoints_total_limit:  # a finished run keeps its last one only
            for old in (self.output / "checkpoints").glob("step-*"):
                if old != final and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        record_ranks(self, whole)
        path = self.output / "erased.safetensors"
        if acc.is_main_process:
            save_delta(path, self.ctx.denoiser, whole or touched(self.ctx.denoiser, self.trained, self.previous),
                       config=cfg, fingerprint=self.fingerprint, steps=last, lambda_final=self.controller.current(),
                       family=self.family, whole=whole is not None, chain=self.chain,
                       joined=previous_lora(self.previous))
        acc.wait_for_everyone()
        if self.replacing:
            if acc.is_main_process:
                swap_in(self.final_output)
            self.replacing = False
            self.output = self.final_output
            acc.wait_for_everyone()
        return self.output / "erased.safetensors"


def erase(config: EraseConfig, pipe=None, on_step=None) -> Path:
    """Erase the configured concepts; returns the path of `erased.safetensors`. One writer per output:
    a second process erasing into the same folder is refused (`atomic.writer_lock`)."""
    previous = read_previous(config)  # --weights: refused here, before the lock and the model, when it cannot be
    chain = None
    if previous is not None:
        chain = previous.chain() + [request(config.to_dict(), config.concepts)]
        config = chained_config(config, previous)  # the chain's concepts, kept erased; its anchors, kept
    if is_edit(config.method):  # a closed-form edit: one solve, no loop and no step hook

        with writer_lock(config.output, log=lambda m: print(m, file=sys.stderr)):
            return EditRun(config, pipe).run()
    hook = on_step
    if config.stop_when_erased:  # the judge is found (or refused) before the lock and the model
        hook = Hooks(hook, stop_rule(config))
    if config.sample_every:
        hook = Hooks(hook, tracking.SampleImages(config))
    with writer_lock(config.output, log=lambda m: print(m, file=sys.stderr)):
        return Trainer(config, pipe, on_step=hook, previous=previous, chain=chain).run()
