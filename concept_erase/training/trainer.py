"""The erasure trainer: Accelerate, one loop, no method-specific branch.

What a step does is read off the plug-ins: the model family encodes prompts and calls the denoiser,
the forget and retain objectives build regression batches, the lambda controller says how the two
losses combine (one joint backward pass, or one per loss with a closed-form lambda) and names the
probe (`probes.py`) that reads the retain loss before and after the step.
"""

from __future__ import annotations

from concept_erase import env

import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from concept_erase.io.atomic import atomic_dir, write_json
from concept_erase.io.digests import tensor_digest
from concept_erase.training.banks import LatentBank, build_bank, build_caption_bank
from concept_erase.training.checkpoints import find_checkpoint, nothing_to_resume, truncate_metrics
from concept_erase.training.run_folder import STAGING, check_output, finish_swap, make_run_folder, swap_in
from concept_erase.config import EraseConfig, config_json
from concept_erase.methods.controllers import LAMBDA_CONTROLLERS
from concept_erase.errors import TrainingDiverged, UserError
from concept_erase.io.loading import check_schedule_steps, is_digits_model, training_resolution, warn_long_prompts
from concept_erase.training.sharding import (any_sharded, full, load_optimizer_state, load_whole, local,
                                             optimizer_state, sum_over_processes, whole_state)
from concept_erase.training.hardware import (check_device, describe_device, duration, estimate_step_seconds,
                                             make_optimizer, no_cudnn_attention)
from concept_erase.methods.losses import erasure_signal, guidance_projection, per_sample_mse, still_guided
from concept_erase.methods.signal import LambdaTrail, SignalMeter
from concept_erase.methods.objectives import FORGET_OBJECTIVES, RETAIN_OBJECTIVES, RegressionBatch
from concept_erase.training.original import OriginalModel
from concept_erase.training.probes import PROBES
from concept_erase.training.subsets import select_trainable
from concept_erase import processes, provenance
from concept_erase.training import tracking
from concept_erase.families.base import Cond, family_of


def step_generator(seed: int, step: int, rank: int, micro: int, stream: int = 0) -> torch.Generator:
    """Every random draw of a step comes from here: the same on any device, and after a resume.

    The stream is named by all of its coordinates (see `seeds`): no two (step, rank, micro-batch,
    stream) share draws, whatever the number of ranks and micro-batches.
    """
    from concept_erase.training.seeds import generator

    return generator(seed, step, rank, micro, stream)


class ErasureContext:
    """What objectives may use: the model family, the models (no-grad), the noise schedule, prompt
    conditionings, latent banks."""

    def __init__(self, config: EraseConfig, pipe, family, accelerator, trained, base_digest: str, resolution: int,
                 log=print):
        self.config = config
        self.pipe = pipe
        self.family = family
        self.accelerator = accelerator
        self.device = accelerator.device
        self.denoiser = family.denoiser(pipe)
        self.resolution = resolution
        self.log = log
        copy_dtype = torch.bfloat16 if config.original_copy == "bf16" else None
        self.original_model = OriginalModel(family, self.denoiser, trained, lora=config.train == "lora", dtype=copy_dtype)
        self.schedule = family.schedule(pipe)
        self.prediction_type = self.schedule.prediction_type
        self.latent_shape = family.latent_shape(pipe, resolution)
        self.template = torch.empty(0, device=self.device, dtype=torch.float32)
        self.base_digest = base_digest
        self.sharded = False  # set by the trainer once the denoiser is prepared
        self._cond: dict[str, Cond] = {}
        self._anchor_bank: LatentBank | None = None
        self.cache_dir = env.cache_root(config.cache_dir)

    def lockstep(self, calls: int) -> int:
        """How many denoiser calls to make where this process needs `calls`: the same number on every process
        when the denoiser is sharded (FSDP gathers each block's weights in a collective at every call, so a
        process that stopped sooner would leave the others waiting, or pair their gathers wrongly). A
        trajectory cut at a random step per process runs on to the longest, the extra outputs unused."""
        if not self.sharded:
            return calls
        n = torch.tensor([calls], device=self.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        return int(n.item())

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> Cond:
        """The prompts' conditioning (one per prompt, in order), each prompt encoded once per run."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond]
        if missing:
            cond = self.family.encode(self.pipe, missing, self.device, self.resolution)
            for i, p in enumerate(missing):
                self._cond[p] = cond[i]
        return Cond.cat(self._cond[p] for p in prompts)

    @torch.no_grad()
    def current(self, x, t, cond: Cond):
        with self.accelerator.autocast():
            return self.family.predict(self.denoiser, x, t, cond)

    @torch.no_grad()
    def original(self, x, t, cond: Cond):
        with self.accelerator.autocast():
            return self.original_model(x, t, cond)

    def latent_bank(self, prompts: list[str], per_prompt: int, role: str) -> LatentBank:
        n = len(prompts)

        def heard(i, seconds):  # the first prompt tells what the whole bank will cost
            if i == 0 and n > 1:
                self.log(f"{role} images: first prompt took {seconds:.1f} s; the {n} prompts will take about "
                         f"{duration(seconds * n)} (cached afterwards)")

        return build_bank(self.pipe, list(prompts), per_prompt, embed=self.embed, config=self.config,
                          base_digest=self.base_digest, device=self.device, cache_dir=self.cache_dir, role=role,
                          resolution=self.resolution, autocast=self.accelerator.autocast, on_prompt=heard)

    def anchor_bank(self) -> LatentBank:
        if self._anchor_bank is None:
            cfg = self.config
            if cfg.retain_images:
                self._anchor_bank = build_caption_bank(self.pipe, cfg.retain_images, embed=self.embed,
                                                       device=self.device, resolution=self.resolution)
            else:
                self._anchor_bank = self.latent_bank(cfg.anchors, cfg.anchor_images_per_prompt, role="anchor")
        return self._anchor_bank


def check_precision(config: EraseConfig, family) -> None:
    """Refuse a precision the model family cannot train in (known before loading, where that is cheap)."""
    if family is not None and config.mixed_precision == "fp16" and family.fp16_refusal:
        raise UserError(f"--mixed-precision fp16: {family.fp16_refusal}")


class Trainer:
    def __init__(self, config: EraseConfig, pipe=None, on_step=None):
        """`on_step(steps_done, trainer)`, if given, runs after every step (outside the step's timing):
        a benchmark evaluates intermediate weights with it. A true return stops the run there (the
        processes agree when the hook says `may_stop`); a hook's `start(trainer)`, if it has one, runs
        before the first step."""
        config.check_runnable()
        self.config = config
        self.pipe = pipe
        self.on_step = on_step
        self.backward_passes = 0

    def _backward(self, loss) -> None:
        self.backward_passes += 1
        self.accelerator.backward(loss)

    # ---------------------------------------------------------------- set-up
    def _setup(self):
        from accelerate import Accelerator

        from accelerate.state import AcceleratorState

        cfg = self.config
        # Several runs in one process (a benchmark, a notebook) may differ in precision; the process
        # group (PartialState) is kept.
        AcceleratorState._reset_state()
        self.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision,
                                             **tracking.accelerator_kwargs(cfg, Path(cfg.output)))
        if acc.num_processes > 1:
            processes.close_at_exit()
        from concept_erase.io.loading import peek_family

        check_precision(cfg, family_of(self.pipe) if self.pipe is not None else peek_family(cfg.model, cfg.model_config))
        check_device(cfg, acc.device)
        self.final_output = self.output = Path(cfg.output)
        if acc.is_main_process:
            finish_swap(self.output, self.log)
        acc.wait_for_everyone()
        self.replacing = replace = check_output(self.output, overwrite=cfg.overwrite, resume=cfg.resume)

        # 1. Load the model; the frozen encoders in the run's precision.
        t_load = time.perf_counter()
        if self.pipe is None:
            from concept_erase.io.loading import load_pipeline

            self.pipe = load_pipeline(cfg.model, allow_pickle=cfg.allow_pickle, model_config=cfg.model_config)
        pipe = self.pipe
        self.family = family = family_of(pipe)
        check_precision(cfg, family)
        unet = family.denoiser(pipe)
        self.resolution = training_resolution(pipe, cfg.resolution)
        if cfg.stop_when_erased:
            from concept_erase.methods.stopping import judge_name

            if judge_name(cfg) == "digits" and not is_digits_model(pipe):
                raise UserError("--stop-judge digits judges images of the embedded digits models; this model is not "
                                "one of them: use --stop-judge signal (any model) or clip")
        check_schedule_steps(pipe.scheduler, sampling_steps=cfg.sampling_steps,
                             anchor_inference_steps=cfg.anchor_inference_steps,
                             **({"check_inference_steps": cfg.check_inference_steps} if cfg.stop_when_erased else {}))
        warn_long_prompts(pipe.tokenizer, [*cfg.concepts, *cfg.anchors, *cfg.remap_to, *cfg.relative_to], self.log)
        if cfg.gradient_checkpointing and not getattr(unet, "_supports_gradient_checkpointing", False):
            raise UserError(f"--gradient-checkpointing: this model's {type(unet).__name__} has no gradient "
                            "checkpointing; run without the flag (or lower --resolution to save memory)")
        pipe.set_progress_bar_config(disable=True)
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        # Everything is cast on the CPU first and moved to the device once in its final precision: a
        # 12B FLUX transformer moved in fp32 would take 48 GB of the GPU before being halved.
        pipe.vae.to(dtype=weight_dtype)
        for encoder in family.text_encoders(pipe):
            encoder.to(dtype=weight_dtype)
        unet.to(torch.float32)
        self.base_digest = tensor_digest(unet.state_dict())

        # 2. Freeze all but the chosen subset; keep only its original values. Under mixed precision
        #    the frozen UNet weights are stored in half precision too (as diffusers' LoRA scripts do);
        #    the trained ones stay fp32.
        self.trained = select_trainable(unet, cfg.train, family, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
        from concept_erase.io.export import base_fingerprint

        self.fingerprint = base_fingerprint(unet, self.trained, lora=cfg.train == "lora",
                                            digest=self.base_digest)
        if weight_dtype != torch.float32:
            trained_ids = {id(p) for p in self.trained.values()}
            for p in unet.parameters():
                if id(p) not in trained_ids:
                    p.data = p.data.to(weight_dtype)
        pipe.to(acc.device)
        self.log(describe_device(acc.device, cfg.mixed_precision, unet, time.perf_counter() - t_load))
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.ctx = ErasureContext(cfg, pipe, family, acc, self.trained, self.base_digest, self.resolution,
                                  log=self.log)
        self._estimate_cost()

        # 3. Objectives: prompts are encoded and anchor latents made here, once.
        self.controller = LAMBDA_CONTROLLERS.get(cfg.method)(cfg)
        self.forget = FORGET_OBJECTIVES.get(cfg.forget_loss)(self.ctx)
        self.retain = RETAIN_OBJECTIVES.get(cfg.retain_loss)(self.ctx) if self.controller.uses_retain else None
        # The encoders are done: give their memory back to training.
        if acc.device.type != "cpu":
            for encoder in family.text_encoders(pipe):
                encoder.to("cpu")
            pipe.vae.to("cpu")
            torch.cuda.empty_cache()

        # 4. Optimizer and Accelerate.
        params = list(self.trained.values())
        self.optimizer = make_optimizer(cfg, params)
        self.model, self.optimizer = acc.prepare(unet, self.optimizer)
        # Under FSDP2 the trained parameters are replaced by sharded ones (same names, same module).
        self.sharded = any_sharded(unet.parameters())
        if self.sharded:
            named = dict(unet.named_parameters())
            self.trained = {n: named[n] for n in self.trained}
            params = list(self.trained.values())
            self.ctx.original_model.shard(self.trained)
            self.ctx.sharded = True
            _init_fsdp_while_trainable(unet)
            from concept_erase.methods.stopping import judge_name

            if cfg.stop_when_erased and judge_name(cfg) != "signal":
                raise UserError(f"--stop-judge {judge_name(cfg)} does not work with FSDP yet (its checks generate on "
                                "the main process alone, and a sharded model needs every process for each call); "
                                "use --stop-judge signal, or run without FSDP")
        self.params = params
        # where the controller's lambda update reads the retain loss before and after each step
        self.probe = PROBES.get(self.controller.probe)(cfg, self.retain, lambda batch: self._forward(batch))
        self.lambda_history: list[float] = []
        self.signal = SignalMeter(cfg.signal_half_life)
        self.lambda_trail = LambdaTrail(cfg.stop_lambda_window)
        self.start_step = 0
        self.changed_on_resume: dict = {}  # resumable settings a resume changed: {name: {checkpoint, now}}
        self.stopped_at: int | None = None
        self.stop_reason = ""
        if acc.is_main_process:
            make_run_folder(self.output, replace=replace)
        if replace:  # the old run stays whole until the new one is complete
            self.output = self.final_output / STAGING
        acc.wait_for_everyone()
        if cfg.resume:
            self._resume()

    @torch.no_grad()
    def _estimate_cost(self) -> None:
        """Time one UNet call at the training size and say what set-up and a step will roughly cost."""
        cfg, acc = self.config, self.accelerator
        n = 2
        x = torch.zeros((n, *self.ctx.latent_shape), device=acc.device)
        t = torch.full((n,), 500, device=acc.device, dtype=torch.long)
        emb = self.ctx.embed([""]).repeat(n)
        # The first call pays for kernel selection (CUDA) or primitive creation (CPU): it is timed again
        # on a GPU, and on a CPU when it was short enough for that one-off cost to dominate it.
        for _ in range(2):
            t0 = time.perf_counter()
            self.ctx.current(x, t, emb)
            if acc.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if acc.device.type != "cuda" and seconds > 2.0:
                break
        per_sample = seconds / n
        step = estimate_step_seconds(per_sample, cfg)
        anchors = per_sample * 2 * cfg.anchor_images_per_prompt * cfg.anchor_inference_steps * len(cfg.anchors)
        self.log(f"first {type(self.ctx.denoiser).__name__} call ({n} samples at {self.resolution} px): {seconds:.2f} s. Rough estimate: "
                 + ("" if cfg.retain_images else f"anchor images {duration(anchors)} unless cached, ")
                 + f"one step {duration(step)}, {cfg.steps} steps {duration(step * cfg.steps)}")

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            tqdm.write(message)

    # ---------------------------------------------------------------- checkpoints
    def _rank_state(self) -> dict[str, torch.Tensor]:
        """Tensors this rank needs for its next step (a trajectory pool, a carried retain tuple)."""
        extra = dict(self.forget.state_tensors())
        extra.update(self.probe.state()[0])
        return {k: v.detach().cpu().contiguous() for k, v in extra.items()}

    def _save_checkpoint(self, step: int, whole: dict | None = None) -> Path:
        """`whole`: the sharded trained weights already gathered (the run's end gathers them once for all)."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        root = self.output / "checkpoints"
        path = root / f"step-{step:08d}"
        per_rank = gather_object([self._rank_state()]) if acc.num_processes > 1 else [self._rank_state()]
        # sharded weights and optimizer states are gathered whole: every process takes part
        if self.sharded and whole is None:
            whole = whole_state(self.trained)
        opt_state = optimizer_state(self.trained, self.optimizer.optimizer, self.sharded) \
            if self.sharded or acc.is_main_process else None
        if acc.is_main_process:
            from safetensors.torch import save_file

            with atomic_dir(path, overwrite=True) as tmp:
                save_file(whole if self.sharded else {n: p.detach().cpu().contiguous() for n, p in self.trained.items()},
                          str(tmp / "trained.safetensors"))
                torch.save(opt_state, tmp / "optimizer.pt")
                for rank, extra in enumerate(per_rank):
                    save_file(extra, str(tmp / f"rank-{rank}.safetensors"))
                write_json(tmp / "state.json", {"step": step, "stopped_at": self.stopped_at,
                                                "stop_reason": self.stop_reason,
                                                "controller": self.controller.state_dict(),
                                                "signal": self.signal.state_dict(),
                                                "lambda_trail": self.lambda_trail.state_dict(),
                                                **self.probe.state()[1], "num_processes": acc.num_processes,
                                                "base_model_digest": self.base_digest,
                                                "changed_on_resume": self.changed_on_resume,
                                                "config": json.loads(config_json(self.config))})
            limit = self.config.checkpoints_total_limit
            if limit:
                kept = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
                for old in kept[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def _resume(self) -> None:
        from safetensors.torch import load_file

        path = find_checkpoint(self.output, self.config.resume, self.log)
        if path is None:
            if (self.final_output / "erased.safetensors").is_file():  # its checkpoints were all damaged
                raise UserError(nothing_to_resume(self.final_output))
            self.log(f"no usable checkpoint in {self.output / 'checkpoints'}; starting from step 0")
            if self.accelerator.is_main_process:
                truncate_metrics(self.output / "metrics.jsonl", 0)
            return
        state = json.loads((path / "state.json").read_text())
        self._check_same_run(path, state)
        weights = load_file(str(path / "trained.safetensors"))
        if set(weights) != set(self.trained):
            raise UserError(f"checkpoint {path} was made with another --train subset or model; "
                            "resume with the settings of that run")
        for n, p in self.trained.items():
            load_whole(p, weights[n])
        load_optimizer_state(self.trained, self.optimizer.optimizer if self.sharded else self.optimizer,
                             torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True), self.sharded)
        self.controller.load_state_dict(state["controller"])
        self.signal.load_state_dict(state.get("signal", {}))
        self.lambda_trail.load_state_dict(state.get("lambda_trail", {}))
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            raise UserError(f"checkpoint {path} was written by {state.get('num_processes', 1)} process(es); "
                            f"resume it with the same number (now {self.accelerator.num_processes})")
        extra = load_file(str(path / f"rank-{self.accelerator.process_index}.safetensors"))
        self.forget.load_state_tensors(extra)
        self.probe.load_state(extra, state, self.accelerator.device)
        self.start_step = int(state["step"])
        self.stopped_at = state.get("stopped_at")
        self.stop_reason = state.get("stop_reason", "")
        turned_off = self.changed_on_resume.get("stop_when_erased", {}).get("now") is False
        if self.stopped_at is not None and turned_off:
            self.log(f"the run had stopped at step {self.stopped_at} ({self.stop_reason}); with the stop off it trains "
                     f"on to step {self.config.steps}")
            self.stopped_at, self.stop_reason = None, ""
        elif self.stopped_at is not None and self.config.steps > self.stopped_at:
            self.log(f"the run stopped at step {self.stopped_at}: {self.stop_reason}; it stays stopped and trains no "
                     f"further (resume with --no-stop-when-erased to train on to step {self.config.steps})")
        if self.accelerator.is_main_process:
            truncate_metrics(self.output / "metrics.jsonl", self.start_step)
        self.log(f"resumed from {path} at step {self.start_step}")

    def _check_same_run(self, path: Path, state: dict) -> None:
        """A resume continues the checkpoint's erasure: a setting that changes what a step trains, or another base
        model, is refused in one line; the resumable ones that changed are kept for the run's record."""
        from concept_erase.config import resume_differences

        digest = state.get("base_model_digest")
        if digest is not None and digest != self.base_digest:
            raise UserError(f"checkpoint {path} was made from another base model (digest {digest[:12]}, this one "
                            f"{self.base_digest[:12]}); resume it with the model it was made from")
        refused, changed = resume_differences(state.get("config", {}), self.config)
        if refused:
            flag, then, now = refused[0]
            more = f" (and {len(refused) - 1} other setting(s))" if len(refused) > 1 else ""
            raise UserError(f"checkpoint {path} was made with {flag} {json.dumps(then)}, this resume asks for "
                            f"{json.dumps(now)}{more}; a resume continues the same erasure: resume with the checkpoint's "
                            "settings, or start a new run with another --output")
        self.changed_on_resume = {**state.get("changed_on_resume", {}), **{
            k: {"checkpoint": state.get("changed_on_resume", {}).get(k, v)["checkpoint"], "now": v["now"]}
            for k, v in changed.items()}}
        if changed:
            self.log("resumed with other " + ", ".join(f"{k} ({json.dumps(v['checkpoint'])} -> {json.dumps(v['now'])})"
                                                       for k, v in changed.items()))

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

    def _sync(self, micro: int):
        """No gradient all-reduce until the last micro-batch."""
        last = micro == self.config.gradient_accumulation_steps - 1
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def _joint_backward(self, step: int, rank: int, sums: dict) -> float:
        """forget + lambda * retain, one backward pass; the probe sees each retain batch."""
        cfg, k, lam = self.config, self.config.gradient_accumulation_steps, self.controller.current()
        for micro in range(k):
            gen = step_generator(cfg.seed, step, rank, micro)
            fb = self.forget.batch(gen, cfg.batch_size, step)
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
            fb = self.forget.batch(gen, cfg.batch_size, step)
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
            raise TrainingDiverged(f"{' and '.join(bad)} became NaN or Inf at step {step + 1}; {self._last_good()} "
                                   "Lower --lr, or try --mixed-precision no.")
        return record

    def _record_ranks(self, whole: dict | None) -> None:
        """Write what each process ended with into run.json: every rank must hold the same lambda and weights
        (`whole`: the sharded weights gathered whole; None when not sharded)."""
        from accelerate.utils import gather_object

        mine = {"rank": self.accelerator.process_index, "lambda_history": self.lambda_history,
                "weights_digest": tensor_digest(whole if whole is not None else self.trained)}
        ranks = gather_object([mine])
        if self.accelerator.is_main_process:
            run = json.loads((self.output / "run.json").read_text())
            run["ranks"] = ranks
            run["finished"] = provenance.now()
            if self.stopped_at:
                run["stopped_at"] = self.stopped_at
                run["stop_reason"] = self.stop_reason
            write_json(self.output / "run.json", run)

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

    def _last_good(self) -> str:
        """What survives a failure now, and what to do: for messages."""
        if getattr(self, "replacing", False):
            return (f"the previous run in {self.final_output} is unchanged (the unfinished replacement was removed); "
                    "run the same command again to replace it.")
        output = getattr(self, "output", None)
        root = output / "checkpoints" if output else None
        kept = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) \
            if root and root.is_dir() else []
        if kept:
            return f"the last good checkpoint, {kept[-1]}, is intact (continue with --resume latest)."
        if output and output.is_dir():
            return "no checkpoint had been written yet (--resume latest starts it again from step 0)."
        return "nothing was written."

    def _discard_replacement(self) -> None:
        if getattr(self, "replacing", False) and getattr(self, "accelerator", None) is not None \
                and self.accelerator.is_main_process:
            shutil.rmtree(self.final_output / STAGING, ignore_errors=True)

    # ---------------------------------------------------------------- the loop
    def run(self) -> Path:
        """Train, then write erased.safetensors. With --overwrite the new run is built in OUTPUT/.incoming
        and swapped in only once complete: any failure before that leaves the previous run as it was."""
        from concept_erase.errors import Interrupted

        try:
            with no_cudnn_attention():
                return self._run()
        except KeyboardInterrupt:
            self._discard_replacement()
            raise Interrupted(self._last_good()) from None
        except BaseException:
            self._discard_replacement()
            raise

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
                    if acc.num_processes > 1 and _peer_lost(err):
                        raise UserError(f"another process of this run stopped during step {step + 1} "
                                        f"({str(err).strip().splitlines()[0][:120]}); {self._last_good()}") from err
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
                    self._save_checkpoint(done)
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
        final = self._save_checkpoint(last, whole)
        if acc.is_main_process and cfg.checkpoints_total_limit:  # a finished run keeps its last one only
            for old in (self.output / "checkpoints").glob("step-*"):
                if old != final and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        self._record_ranks(whole)
        path = self.output / "erased.safetensors"
        if acc.is_main_process:
            from concept_erase.io.export import save_delta

            save_delta(path, self.ctx.denoiser, whole or self.trained, config=cfg, fingerprint=self.fingerprint,
                       steps=last, lambda_final=self.controller.current(), family=self.family,
                       whole=whole is not None)
        acc.wait_for_everyone()
        if self.replacing:
            if acc.is_main_process:
                swap_in(self.final_output)
            self.replacing = False
            self.output = self.final_output
            acc.wait_for_everyone()
        return self.output / "erased.safetensors"


def _init_fsdp_while_trainable(model) -> None:
    """FSDP2 fixes each shard group's gradient precision at its first forward, from the parameters that
    require gradients then. The first forward of a LoRA run is the original model's, with the adapter
    off, and PEFT switches the adapter off by clearing its requires_grad: the groups then fixed no
    gradient precision, and the first backward failed ("attempting to assign a gradient with dtype
    BFloat16 to a tensor with grad_dtype Float", pytorch/pytorch#186998; seen on an H200, torch 2.11).
    Initialising FSDP's state now, while the trained parameters require gradients, fixes it."""
    state = getattr(model, "_get_fsdp_state", None)
    if state is not None:
        state()._lazy_init()


def grad_scale(accelerator) -> float:
    """The factor the loss was multiplied by before backward (fp16's gradient scaler), else 1."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def surgery_products(g_u: list, g_r: list, scale: float = 1.0) -> tuple[float, float]:
    """<g_r, g_u> and ||g_r||^2 of the true (unscaled) gradients, in fp64, over the trained subset.

    `g_u` and `g_r` hold the gradients as backward left them, each multiplied by `scale`; a missing
    gradient (None) counts as zeros.
    """
    dot, norm_sq = 0.0, 0.0
    for a, b in zip(g_u, g_r):
        if b is None:
            continue
        bd = b.double()
        norm_sq += float(torch.sum(bd * bd))
        if a is not None:
            dot += float(torch.sum(a.double() * bd))
    return dot / scale**2, norm_sq / scale**2


def _peer_lost(err: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo/NCCL say it in several ways)."""
    text = str(err).lower()
    return any(w in text for w in ("connection closed", "connection reset", "broken pipe", "peer", "timed out",
                                   "timeout", "nccl", "gloo"))


def erase(config: EraseConfig, pipe=None, on_step=None) -> Path:
    """Erase the configured concepts; returns the path of `erased.safetensors`. One writer per output:
    a second process erasing into the same folder is refused (`atomic.writer_lock`)."""
    from concept_erase.io.atomic import writer_lock

    from concept_erase.methods.stopping import Hooks, stop_rule

    hook = on_step
    if config.stop_when_erased:  # the judge is found (or refused) before the lock and the model
        hook = Hooks(hook, stop_rule(config))
    if config.sample_every:
        hook = Hooks(hook, tracking.SampleImages(config))
    with writer_lock(config.output, log=lambda m: print(m, file=sys.stderr)):
        return Trainer(config, pipe, on_step=hook).run()
