"""A run's set-up, in the order the trainer takes it (`Trainer._setup`): each step reads and sets the trainer's
fields, and a failure in any of them leaves no run folder behind.

1. `open_accelerator`: Accelerate in the run's precision, the device and precision checked, the output's state
   (a replacement half done is finished, an output that would destroy a run refused).
2. `load_model`: the pipeline, its family and training size; settings checked against the model; the frozen parts
   cast to the run's precision on the CPU; the base model's digest.
3. `freeze`: every weight frozen but the trained subset, the base fingerprint, the frozen weights in half
   precision under mixed precision, the model on the device, the objectives' context.
4. `objectives`: the lambda controller, the forget and retain objectives (prompts encoded and anchor latents made
   here, once); the encoders' memory given back.
5. `prepare`: the optimizer and Accelerate (FSDP2 shards the trained tensors), the probe, the signal's meters.
6. `open_run`: the run folder (a replacement goes to OUTPUT/.incoming), then the resume.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from concept_erase import processes
from concept_erase.config import is_edit
from concept_erase.embedded import embedded_models
from concept_erase.errors import UserError
from concept_erase.export.delta import base_fingerprint
from concept_erase.families.base import family_of
from concept_erase.io.digests import tensor_digest
from concept_erase.io.loading import (cast, check_concept_read, check_schedule_steps, embedded_model_of, load_pipeline,
                                      peek_family, training_resolution, warn_long_prompts)
from concept_erase.methods.controllers import LAMBDA_CONTROLLERS
from concept_erase.methods.objectives import FORGET_OBJECTIVES, RETAIN_OBJECTIVES
from concept_erase.methods.signal import LambdaTrail, SignalMeter
from concept_erase.methods.stopping import judge_name
from concept_erase.training import tracking
from concept_erase.training.chain import add_previous_adapter, check_family_and_base, put_in, touched
from concept_erase.training.checkpoints import resume
from concept_erase.training.context import ErasureContext, prompt_variants
from concept_erase.training.hardware import (check_device, describe_device, duration, estimate_step_seconds,
                                             make_optimizer)
from concept_erase.training.probes import PROBES
from concept_erase.training.run_folder import STAGING, check_output, finish_swap, make_run_folder
from concept_erase.training.sharding import any_sharded, init_fsdp_while_trainable
from concept_erase.training.subsets import select_trainable

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(config, family) -> None:
    """Refuse a precision the model family cannot train in (known before loading, where that is cheap)."""
    if family is not None and config.mixed_precision == "fp16" and family.fp16_refusal:
        raise UserError(f"--mixed-precision fp16: {family.fp16_refusal}")


def open_accelerator(t) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = t.config
    # Several runs in one process (a benchmark, a notebook) may differ in precision; the process
    # group (PartialState) is kept.
    AcceleratorState._reset_state()
    t.accelerator = acc = Accelerator(mixed_precision=cfg.mixed_precision,
                                      **tracking.accelerator_kwargs(cfg, Path(cfg.output)))
    if acc.num_processes > 1:
        processes.close_at_exit()
    named = peek_family(cfg.model, cfg.model_config)
    if t.pipe is not None and named is not None and named.name != family_of(t.pipe).name:
        raise UserError(f"the pipeline given to erase() is a {type(t.pipe).__name__} ({family_of(t.pipe).name} family) "
                        f"but model {cfg.model!r}, which the run's record names, is a {named.name} model; give that "
                        "model's pipeline, or set model to the one the pipeline was loaded from")
    check_precision(cfg, family_of(t.pipe) if t.pipe is not None else named)
    check_device(cfg, acc.device)
    t.final_output = t.output = Path(cfg.output)
    if acc.is_main_process:
        finish_swap(t.output, t.log)
    acc.wait_for_everyone()
    t.replacing = check_output(t.output, overwrite=cfg.overwrite, resume=cfg.resume,
                               resumable=not is_edit(cfg.method))


def load_model(t) -> None:
    cfg = t.config
    t.load_started = time.perf_counter()
    if t.pipe is None:
        t.pipe = load_pipeline(cfg.model, allow_pickle=cfg.allow_pickle, model_config=cfg.model_config)
    pipe = t.pipe
    t.family = family = family_of(pipe)
    check_precision(cfg, family)
    unet = family.denoiser(pipe)
    t.resolution = training_resolution(pipe, cfg.resolution)
    if cfg.stop_when_erased:
        name, world = judge_name(cfg), embedded_model_of(pipe)
        own = [m.name for m in embedded_models() if m.judge == name]
        if own and (world is None or world.judge != name):
            raise UserError(f"--stop-judge {name} judges images of {' and '.join(f'builtin:{n}' for n in own)} only; "
                            "this model is not one of them: use --stop-judge signal (any model) or clip")
    check_schedule_steps(pipe.scheduler, sampling_steps=cfg.sampling_steps,
                         anchor_inference_steps=cfg.anchor_inference_steps,
                         **({"check_inference_steps": cfg.check_inference_steps} if cfg.stop_when_erased else {}))
    if t.previous is not None:  # --weights: the chain began on this very model

        check_family_and_base(t.previous, family, unet)
    t.variants = prompt_variants(cfg, embedded_model_of(pipe))
    check_concept_read(pipe.tokenizer, t.variants[0], cfg.concepts)
    warn_long_prompts(pipe.tokenizer, [*cfg.concepts, *cfg.anchors, *cfg.remap_to, *cfg.relative_to,
                                       *(v.prompt for side in t.variants for v in side)], t.log)
    if cfg.gradient_checkpointing and not getattr(unet, "_supports_gradient_checkpointing", False):
        raise UserError(f"--gradient-checkpointing: this model's {type(unet).__name__} has no gradient "
                        "checkpointing; run without the flag (or lower --resolution to save memory)")
    pipe.set_progress_bar_config(disable=True)
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    # Everything is cast on the CPU first and moved to the device once in its final precision: a
    # 12B FLUX transformer moved in fp32 would take 48 GB of the GPU before being halved.
    cast(pipe.vae, weight_dtype)
    for encoder in family.text_encoders(pipe):
        cast(encoder, weight_dtype)
    cast(unet, torch.float32)
    t.base_digest = tensor_digest(unet.state_dict())


def freeze(t) -> None:
    """Freeze all but the chosen subset and keep only its original values. Under mixed precision the frozen
    weights are stored in half precision too (as diffusers' LoRA scripts do); the trained ones stay fp32."""
    cfg, acc, pipe, family = t.config, t.accelerator, t.pipe, t.family
    unet = family.denoiser(pipe)

    t.trained = select_trainable(unet, cfg.train, family, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha)
    add_previous_adapter(unet, t.previous)  # a LoRA chain: the previous adapters, frozen beside the trained one
    # with --weights, the original model and the fingerprint cover every tensor the chain changes, at base values
    base = touched(unet, t.trained, t.previous)
    t.fingerprint = base_fingerprint(unet, base, lora=cfg.train == "lora", digest=t.base_digest)
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    if weight_dtype != torch.float32:
        trained_ids = {id(p) for p in t.trained.values()}
        for p in unet.parameters():
            if id(p) not in trained_ids:
                p.data = p.data.to(weight_dtype)
    pipe.to(acc.device)
    t.log(describe_device(acc.device, cfg.mixed_precision, unet, time.perf_counter() - t.load_started))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    t.ctx = ErasureContext(cfg, pipe, family, acc, base, t.base_digest, t.resolution, log=t.log,
                           variants=t.variants, earlier=len(t.previous.concepts) if t.previous is not None else 0)
    put_in(unet, t.previous)  # the previous run's weights: where this one starts (the original copy is taken)
    estimate_cost(t)


def objectives(t) -> None:
    """The controller and the objectives: prompts are encoded and anchor latents made here, once."""
    cfg, acc, pipe = t.config, t.accelerator, t.pipe
    t.controller = LAMBDA_CONTROLLERS.get(cfg.method)(cfg)
    t.forget = FORGET_OBJECTIVES.get(cfg.forget_loss)(t.ctx)
    t.retain = RETAIN_OBJECTIVES.get(cfg.retain_loss)(t.ctx) if t.controller.uses_retain else None
    # The encoders are done: give their memory back to training.
    if acc.device.type != "cpu":
        for encoder in t.family.text_encoders(pipe):
            encoder.to("cpu")
        pipe.vae.to("cpu")
        torch.cuda.empty_cache()


def prepare(t) -> None:
    """The optimizer and Accelerate; under FSDP2 the trained parameters are replaced by sharded ones (same names,
    same module). Then what each step reads: the probe, lambda's history and trail, the signal's meter."""
    cfg, acc = t.config, t.accelerator
    unet = t.family.denoiser(t.pipe)
    params = list(t.trained.values())
    t.optimizer = make_optimizer(cfg, params)
    t.model, t.optimizer = acc.prepare(unet, t.optimizer)
    t.sharded = any_sharded(unet.parameters())
    if t.sharded and t.previous is not None:
        raise UserError("--weights does not work with FSDP yet (the chain's tensors outside the trained subset are not "
                        "gathered); continue the chain without FSDP")
    if t.sharded:
        named = dict(unet.named_parameters())
        t.trained = {n: named[n] for n in t.trained}
        params = list(t.trained.values())
        t.ctx.original_model.shard(t.trained)
        t.ctx.sharded = True
        init_fsdp_while_trainable(unet)

        if cfg.stop_when_erased and judge_name(cfg) != "signal":
            raise UserError(f"--stop-judge {judge_name(cfg)} does not work with FSDP yet (its checks generate on "
                            "the main process alone, and a sharded model needs every process for each call); "
                            "use --stop-judge signal, or run without FSDP")
    t.params = params
    # where the controller's lambda update reads the retain loss before and after each step
    t.probe = PROBES.get(t.controller.probe)(cfg, t.retain, lambda batch: t._forward(batch))
    t.lambda_history = []
    t.signal = SignalMeter(cfg.signal_half_life)
    t.lambda_trail = LambdaTrail(cfg.stop_lambda_window)
    t.start_step = 0
    t.changed_on_resume = {}  # resumable settings a resume changed: {name: {checkpoint, now}}
    t.stopped_at = None
    t.stop_reason = ""


def open_run(t) -> None:
    """The run folder, made once the set-up has succeeded; a replacement run goes to OUTPUT/.incoming while the old
    run stays whole. Then the resume, if asked."""
    acc = t.accelerator
    if acc.is_main_process:
        make_run_folder(t.output, replace=t.replacing)
    if t.replacing:
        t.output = t.final_output / STAGING
    acc.wait_for_everyone()
    if t.config.resume:
        resume(t)


STEPS = (open_accelerator, load_model, freeze, objectives, prepare, open_run)


@torch.no_grad()
def estimate_cost(t) -> None:
    """Time one denoiser call at the training size and say what set-up and a step will roughly cost."""
    cfg, acc = t.config, t.accelerator
    n = 2
    x = torch.zeros((n, *t.ctx.latent_shape), device=acc.device)
    steps = torch.full((n,), 500, device=acc.device, dtype=torch.long)
    emb = t.ctx.embed([""]).repeat(n)
    # The first call pays for kernel selection (CUDA) or primitive creation (CPU): it is timed again
    # on a GPU, and on a CPU when it was short enough for that one-off cost to dominate it.
    for _ in range(2):
        t0 = time.perf_counter()
        t.ctx.current(x, steps, emb)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if acc.device.type != "cuda" and seconds > 2.0:
            break
    per_sample = seconds / n
    step = estimate_step_seconds(per_sample, cfg)
    anchors = per_sample * 2 * cfg.anchor_images_per_prompt * cfg.anchor_inference_steps * len(t.ctx.anchor_variants)
    t.log(f"first {type(t.ctx.denoiser).__name__} call ({n} samples at {t.resolution} px): {seconds:.2f} s. Rough "
          "estimate: " + ("" if cfg.retain_images else f"anchor images {duration(anchors)} unless cached, ")
          + f"one step {duration(step)}, {cfg.steps} steps {duration(step * cfg.steps)}")
