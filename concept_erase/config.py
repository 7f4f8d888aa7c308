"""Run settings: one dataclass, a help string per field, checks in `__post_init__`.

Precedence: defaults < YAML file (`--config run.yaml`) < command-line flags. An unknown key in a
YAML file is an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

from concept_erase.errors import UserError
from concept_erase.image_seeds import CHECK_SEED_START, check_block
from concept_erase.options import IN_ANY, IN_DIR, IN_FILE, MAX_SEED, OUT_DIR, check_fields, flag_name, setting
from concept_erase.plugins import (EDITS, FORGET_OBJECTIVES, JUDGES, LAMBDA_CONTROLLERS, RETAIN_OBJECTIVES,
                                   check_trackers)
from concept_erase.variants import check_names as check_variant_names
from concept_erase.yaml_files import read_yaml

TRAINABLE_SUBSETS = ("xattn", "xattn-kv", "noxattn", "selfattn", "full", "lora")
RECIPES = Path(__file__).resolve().parent / "recipes"  # the shipped recipes and benchmark files


_f = setting
_r = partial(setting, resumable=True)  # a setting a resume may change (see `options.setting`)
SIGNAL_STOP = 0.15  # the erasure signal's stop level: calibrated on the digits models' tuning split (benchmarks/signal-study.md)
SIGNAL_LAMBDA_WINDOW = 3  # the signal stop waits for lambda at rest over this many steps (benchmarks/signal-study.md)


@dataclass
class EraseConfig:
    # what to erase, from what
    model: str = _r("", "the model (SD 1.x/2.x, SDXL, SD3, FLUX.1): a diffusers folder, a hub id, a single-file "
                        ".safetensors (or .ckpt with --allow-pickle), or a built-in one (builtin:digits, "
                        "builtin:digits-flow, builtin:tiny, ...)")
    concepts: list = _f([], "concept prompt(s) to erase, e.g. 'van gogh' (repeat --concept for several)",
                        flag="concept", nonempty=True, metavar="PROMPT")
    anchors: list = _f([], "anchor prompt(s) whose images must survive, e.g. 'a painting' (repeat --anchor)",
                       flag="anchor", nonempty=True, metavar="PROMPT")
    concept_file: str = _f("", "a text file of concepts to erase, one a line (# starts a comment), added to --concept: "
                               "many concepts in one run", path=IN_FILE)
    anchor_file: str = _f("", "a text file of anchor prompts, one a line, added to --anchor", path=IN_FILE)
    output: str = _r("", "run folder: checkpoints, metrics.jsonl, erased.safetensors", path=OUT_DIR)
    weights: str = _f("", "continue an earlier erasure of the same --model (its run folder or erased.safetensors): "
                          "start from its weights, keep its concepts erased and its anchors kept, and refer to the "
                          "base model as the original; the new delta holds the whole chain", path=IN_ANY)
    newest_share: float = _f(0.0, "with --weights: the share of the forget draws that this request's concepts take, "
                                  "the rest spread evenly over the chain's earlier concepts (0.5: half for the new "
                                  "concepts however long the chain); 0, the default: every concept of the chain an "
                                  "equal share", ge=0, le=0.95)
    # the method
    method: str = _f("eupmu", "how to erase: a trained method, named by how it weighs the retain loss (eupmu, "
                              "eupmu-fast, ungrad, fixed, esd), or uce, a closed-form edit of the layers that read "
                              "the text (seconds, no training)")
    train: str = _f("xattn", "what is trained: " + ", ".join(TRAINABLE_SUBSETS), choices=TRAINABLE_SUBSETS)
    forget_loss: str = _f("negative-guidance", "forget loss: negative-guidance or remap")
    retain_loss: str = _f("preservation", "retain loss on anchor latents: preservation (the target is the original "
                                          "model's prediction: 0 before training, it sees any drift) or denoising "
                                          "(the noise, as the anchors were trained on)")
    remap_to: list = _f([], "for --forget-loss remap: the prompt(s) each concept is remapped to",
                        flag="remap-to", nonempty=True, metavar="PROMPT")
    relative_to: list = _f([], "for --forget-loss negative-guidance: erase each concept relative to this prompt "
                               "instead of the empty one (one for all, or one per --concept), e.g. the caption "
                               "without the style: the target becomes e(ref) - eta * (e(concept) - e(ref))",
                           flag="relative-to", metavar="PROMPT")
    concept_variants: list = _f([], "draw each concept and each anchor inside prompt templates too, not only bare: "
                                    "auto (the model's own: the style phrases on the digits models, general "
                                    "templates on any other), general, none, a template ('a painting of {}'), or a "
                                    "text file of templates (repeat to combine; default none)",
                                flag="concept-variants", nonempty=True, metavar="auto|general|none|TEMPLATE|FILE")
    uce_regularization: float = _f(0.5, "for --method uce: how strongly the edited weights stay near the original "
                                        "ones (UCE's lambda; the concepts and kept prompts weigh 1 and "
                                        "--uce-preserve-weight each)", gt=0, le=1_000_000)
    uce_preserve_weight: float = _f(1.0, "for --method uce: the weight of each kept prompt (the anchors) keeping its "
                                         "output, against 1 for each concept moving to its guide", ge=0, le=1_000_000)
    uce_tokens: str = _f("tail", "for --method uce: which of a prompt's tokens the edit maps: tail (its last word "
                                 "and every token after it, the end and padding tokens that a causal text encoder "
                                 "fills from the whole prompt: UCE's published code) or last (the last word's alone: "
                                 "the authors' later scripts)", choices=("tail", "last"))
    eta: float = _f(1.0, "negative-guidance scale: the target is e0 - eta * (ec - e0)", ge=0, le=1000)
    lambda_update: str = _f("normalised", "eupmu's lambda rule: normalised (the slack's running mean over its "
                                          "running scale: lambda moves by at most about beta_t per step whatever "
                                          "the losses' scale and the learning rate) or paper (the paper's literal "
                                          "rule: beta in lambda per unit slack, to be set for each model and lr)",
                            choices=("paper", "normalised"))
    eps: float = _f(0.0, "tolerance: the retain loss may rise per step by at most the fraction eps of its value "
                         "(eupmu normalised), lr * eps (eupmu paper), or <g_r, g_u> may be as low as -eps (ungrad)",
                    ge=0)
    beta: float = _f(1.0, "step size of the lambda update (eupmu); normalised rule: lambda per step at most "
                          "(about), calibrated on the digits; paper rule: per unit slack, set it per model", ge=0)
    slack_decay: float = _f(0.99, "eupmu normalised: decay of the running mean square the slack is divided by "
                                 "(0: each slack is divided by its own size, a sign; near 1: a long memory)",
                            ge=0, lt=1)
    slack_momentum: float = _f(0.9, "eupmu normalised: decay of the running mean of the slack that moves lambda "
                                    "(0: this step's slack alone; 0.9: about the last ten, which damps the noise "
                                    "of a single probe tuple)", ge=0, lt=1)
    beta_schedule: str = _f("cuberoot", "beta_t schedule: cuberoot (beta / (t+1)^(1/3), as the paper's analysis) or constant",
                            choices=("cuberoot", "constant"))
    lambda_max: float = _f(100.0, "upper bound D on lambda (eupmu)", gt=0)
    lambda_init: float = _f(0.0, "initial lambda (eupmu), or the constant lambda (fixed)", ge=0, aliases=("--lambda",))
    slack_probe: str = _f("held-out", "eupmu, eupmu-fast: the retain tuple whose loss before and after the step "
                                      "gives the slack: held-out (a tuple outside the step's gradient: unbiased) or "
                                      "batch (the step's own retain tuple, biased toward a small lambda)",
                          choices=("held-out", "batch"))
    # optimisation
    steps: int = _r(400, "optimizer steps", ge=1, le=10**8)
    lr: float = _f(1e-5, "learning rate (also the step size alpha_t in the EUPMU slack)", gt=0, le=1000)
    optimizer: str = _f("adamw", "adamw; adamw8bit (bitsandbytes' 8-bit AdamW states, CUDA only: a quarter of "
                                 "AdamW's optimizer memory); or sgd (plain gradient steps, no momentum: the step the "
                                 "paper's constraint and UNGrad's closed-form lambda are written for; needs a far larger --lr)",
                        choices=("adamw", "adamw8bit", "sgd"))
    weight_decay: float = _f(0.0, "weight decay (0: decay would move weights the losses never asked to move)", ge=0)
    max_grad_norm: float = _f(0.0, "clip the trained parameters' gradient norm after backward (0: off)", ge=0)
    batch_size: int = _f(1, "forget samples per micro-batch", ge=1, le=4096)
    retain_batch_size: int = _f(2, "retain samples per micro-batch (eupmu-fast carries half of them over)",
                                ge=0, le=4096)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", ge=1, le=4096)
    mixed_precision: str = _f("no", "no, fp16 or bf16 (autocast; frozen weights stored in that precision; trained "
                                    "weights, lambda and losses stay fp32). fp16 needs a CUDA GPU (its gradient scaler)",
                              choices=("no", "fp16", "bf16"))
    resolution: int = _f(0, "training image side in pixels (0: the model's native size); anchor images, concept "
                            "images and trajectories all follow it, e.g. 512 on a 1024 model to save memory",
                         ge=0, le=16384)
    gradient_checkpointing: bool = _r(False, "recompute the denoiser's activations in backward (the UNet's own "
                                             "gradient checkpointing): less memory, about a third more time per step")
    original_copy: str = _r("fp32", "how the trained subset's original values are kept for the original model's "
                                    "predictions: fp32 (exact) or bf16 (half the memory; exact for the Linear and "
                                    "convolution weights under --mixed-precision bf16, which casts them anyway)",
                            choices=("fp32", "bf16"))
    seed: int = _f(0, "seed of every random draw of the run", ge=0, le=MAX_SEED)
    lora_rank: int = _f(4, "LoRA rank (--train lora)", ge=1, le=4096)
    lora_alpha: float = _f(4.0, "LoRA alpha (--train lora)", gt=0)
    # negative-guidance trajectories
    sampling_steps: int = _f(50, "sampler steps (DDIM; Euler on SD3 and FLUX) of the trajectories the forget latents x_t are drawn from", ge=1, le=1000)
    start_guidance: float = _f(3.0, "classifier-free guidance when sampling the forget trajectory", ge=0, le=100)
    trajectory_model: str = _f("current", "which model samples x_t: current (ESD) or original",
                               choices=("current", "original"))
    trajectory_timesteps: int = _f(1, "forget samples taken from each fresh trajectory, at distinct timesteps: "
                                      "1 (ESD) samples --batch-size trajectories per step, r samples batch-size / r",
                                   ge=1, le=1000)
    trajectory_refresh: int = _f(10, "N: one full trajectory serves the next N steps (its latents at random timesteps); "
                                     "1: a fresh partial trajectory every step (ESD)",
                                 ge=1, le=10**8)
    # anchors
    retain_images: str = _f("", "folder of real anchor images with captions (metadata.jsonl or NAME.txt beside each image)",
                            path=IN_DIR)
    anchor_images_per_prompt: int = _f(4, "images the original model generates per anchor prompt when no --retain-images",
                                       ge=1, le=100000)
    concept_images_per_prompt: int = _f(4, "images generated per concept prompt (remap loss)", ge=1, le=100000)
    anchor_inference_steps: int = _f(30, "sampler steps when generating anchor images", ge=1, le=1000)
    anchor_guidance: float = _f(7.5, "guidance scale when generating anchor images", ge=0, le=100)
    cache_dir: str = _r("", "cache of generated anchor and concept latents (default: $CONCEPT_ERASE_CACHE, else ~/.cache/concept-erase)",
                        path=OUT_DIR)
    # bookkeeping
    stop_when_erased: bool = _r(False, "stop at the first check (every --check-every steps) at which the concept is "
                                       "erased, by --stop-judge: the model's own judge where it has one "
                                       "(builtin:digits), else the erasure signal (any model)")
    stop_judge: str = _r("auto", "with --stop-when-erased: what decides that the concept is erased. signal: the "
                                 "erasure signal's moving average at most --stop-signal-at-most (no image drawn, any "
                                 "model); clip: CLIP zero-shot over the concepts and anchors (--clip-model, "
                                 "--clip-weights); nudity: NudeNet (the anchors are not judged); a built-in model's own "
                                 "judge by its name (digits: the digits models'); auto: the model's own judge where it "
                                 "has one, else signal")
    stop_signal_at_most: float = _r(SIGNAL_STOP, "with --stop-judge signal: the erasure signal's moving average at "
                                                 "which the concept counts as erased (1: the original model, -eta: "
                                                 "the forget loss's target); calibrated on the digits models' tuning "
                                                 "split (BENCHMARKS.md)", ge=-1000, lt=1)
    stop_lambda_window: int = _r(SIGNAL_LAMBDA_WINDOW, "with --stop-judge signal: stop only where lambda is no "
                                                       "higher than it was this many steps before, i.e. the steps "
                                                       "keep the anchors' constraint (a rising lambda means they are "
                                                       "being pushed away); 0: the signal alone. Chosen on the digits "
                                                       "models' tuning split (BENCHMARKS.md)", ge=0, le=10**6)
    clip_model: str = _r("ViT-L-14", "with --stop-judge clip: the open_clip model")
    clip_weights: str = _r("", "with --stop-judge clip: a local open_clip weights file for --clip-model (default: "
                               "the hub cache's openai weights)", path=IN_FILE)
    check_every: int = _r(10, "with --stop-when-erased: steps between erasure checks (a check that fails on the "
                              "concept side draws 8 images)", ge=1, le=10**8)
    check_forget_at_most: float = _r(0.05, "with --stop-when-erased: the share of a check's concept images that may "
                                           "still show the concept for the run to stop; half the benchmark's 10% "
                                           "target, a margin for a check's few images and for stopping at the "
                                           "first check that happens to fall under it", ge=0, le=1)
    check_retain_drop_at_most: float = _r(0.015, "with --stop-when-erased: how far the anchors' accuracy at a check "
                                                 "may be below the model's own before training for the run to stop "
                                                 "(0.015: 1.5 points, half the benchmark's 3-point target: at 3 points "
                                                 "a run checked every 10 steps stopped on a lucky check, benchmarks/tuning-record.md)",
                                           ge=0, le=1)
    check_inference_steps: int = _r(10, "with --stop-when-erased: sampler steps of a check's images (on the digits "
                                        "model the judge's verdicts at 10 steps match those at 25)", ge=1, le=1000)
    check_images: int = _r(32, "with --stop-when-erased: concept images per check (the anchors get twice as "
                                "many, spread over their prompts)", ge=2, le=100000)
    check_images_per_concept: int = _r(8, "with --stop-when-erased and several concepts: the fewest images of each "
                                          "concept in a check, each concept held to the bar on its own (at 8 and "
                                          "the 5% bar a concept still drawn in 20% of its images passes a check "
                                          "with probability 0.17; at 4, 0.41); a check draws --check-images or "
                                          "this many per concept, whichever is more", ge=1, le=100000)
    check_confirm: int = _r(1, "with --stop-when-erased: how many checks in a row must find the concept erased "
                               "before the run stops (1: the first). Each of them draws the concept's images from "
                               "its own seeds, so a run stops on N x the images of one check, not on one lucky "
                               "draw among many checks", ge=1, le=100)
    check_seed_start: int = _r(CHECK_SEED_START, "with --stop-when-erased: the first image seed a check draws (a "
                                                 "check draws fewer than 2 x --check-images seeds from here on, or "
                                                 "--check-images-per-concept where that is more, and each of "
                                                 "--check-confirm checks in a row its own such block); "
                                                 "evaluations judge seeds 0 and up, so a run is never graded on "
                                                 "the images that stopped it", ge=0, le=MAX_SEED - 200000)
    hold_erasure_at: float = _f(None, "stop pushing the erasure past this erasure-signal level: a forget "
                                      "sample whose prediction guides toward the concept at most this much adds no "
                                      "loss (at 0 on the digits model the anchors' constraint then pulled the "
                                      "concept back, BENCHMARKS.md); default: always push", ge=-1000, lt=1)
    signal_half_life: float = _f(10.0, "half-life in steps of the erasure signal's moving average (the signal: the "
                                       "trained model's guidance toward the concept, 1 before training and -eta "
                                       "at the forget loss's target; logged every step as erasure_signal)",
                                 gt=0, le=10**6)
    report_to: str = _r("none", "follow the run in a tracker, through Accelerate: tensorboard (OUTPUT/logs), wandb, all "
                                "or none; per step the losses, lambda, the slack, the gradient norm and the step time",
                        choices=("none", "tensorboard", "wandb", "all"))
    sample_every: int = _r(0, "draw each --sample-prompt before training and every N steps into OUTPUT/samples/ "
                              "and the trackers (0: never)", ge=0, le=10**8)
    sample_prompts: list = _r([], "a prompt to draw every --sample-every steps (repeat), e.g. the concept and an "
                                  "anchor", flag="sample-prompt", nonempty=True, metavar="PROMPT")
    checkpoint_every: int = _r(100, "save a checkpoint every N steps (0: only at the end)", ge=0)
    checkpoints_total_limit: int = _r(2, "keep at most this many checkpoints while training, and only the last once "
                                            "the run has finished (0: keep all). At SD 1.5 scale one checkpoint of "
                                            "--train full holds about 10 GB, xattn 0.5 GB", ge=0)
    resume: str = _r("", "resume from 'latest' or a checkpoint folder")
    overwrite: bool = _r(False, "replace an output folder that already holds a run")
    allow_pickle: bool = _r(False, "allow loading a pickled .ckpt (it can run code)")
    model_config: str = _r("", "for a single-file checkpoint: a diffusers folder (or hub id) with the model's configs")
    progress: bool = _r(True, "show a progress bar")

    def __post_init__(self):
        if isinstance(self.concepts, str):
            self.concepts = [self.concepts]
        if isinstance(self.anchors, str):
            self.anchors = [self.anchors]
        if isinstance(self.remap_to, str):
            self.remap_to = [self.remap_to]
        if isinstance(self.relative_to, str):
            self.relative_to = [self.relative_to]
        if isinstance(self.sample_prompts, str):
            self.sample_prompts = [self.sample_prompts]
        if isinstance(self.concept_variants, str):
            self.concept_variants = [self.concept_variants]
        # the files' prompts join the lists, which the run records; the file fields are then spent
        if self.concept_file:
            read = read_prompt_file(self.concept_file, "--concept-file")
            self.concepts, self.concept_file = [*self.concepts, *read], ""
        if self.anchor_file:
            read = read_prompt_file(self.anchor_file, "--anchor-file")
            self.anchors, self.anchor_file = [*self.anchors, *read], ""
        for flag, values in (("--concept", self.concepts), ("--anchor", self.anchors)):
            seen = set()
            for value in values:
                if value.strip().lower() in seen:
                    raise UserError(f"{flag} {value!r} is given twice (from the flags or a file); give each once")
                seen.add(value.strip().lower())
        check_method(self.method)
        FORGET_OBJECTIVES.get(self.forget_loss)
        RETAIN_OBJECTIVES.get(self.retain_loss)
        check_fields(self)
        check_trackers(self.report_to)
        if self.sample_every and not self.sample_prompts:
            raise UserError(f"--sample-every {self.sample_every} needs something to draw: add --sample-prompt "
                            "'the concept' (repeat it, e.g. for an anchor too)")
        if self.sample_prompts and not self.sample_every:
            raise UserError("--sample-prompt is drawn every --sample-every N steps; add --sample-every N")
        if self.sample_every > self.steps:
            raise UserError(f"--sample-every {self.sample_every} is more than --steps {self.steps}: nothing would be "
                            f"drawn during training; give --sample-every {self.steps} or less")
        if self.original_copy == "bf16" and self.mixed_precision != "bf16":
            raise UserError("--original-copy bf16 needs --mixed-precision bf16 (its autocast casts the copy; "
                            "in fp32 the copy would round the original model's weights)")
        if self.lambda_init > self.lambda_max:
            raise UserError(f"--lambda-init {self.lambda_init} is above --lambda-max {self.lambda_max}; "
                            "lower it or raise --lambda-max")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --output and --overwrite replaces it: give one of them")
        if self.resume not in ("", "latest") and not (Path(self.resume) / "state.json").is_file():
            raise UserError(f"--resume {self.resume}: no checkpoint there (no state.json); give a checkpoint "
                            "folder (OUTPUT/checkpoints/step-N) or 'latest'")
        if is_edit(self.method):
            self._check_edit()
        elif self._edit_only():
            raise UserError(f"{self._edit_only()} applies to a closed-form edit (--method uce) only; drop it")
        elif self.remap_to and self.forget_loss != "remap":
            raise UserError("--remap-to applies to --forget-loss remap only; add --forget-loss remap or drop --remap-to")
        same = {c.strip().lower() for c in self.concepts} & {a.strip().lower() for a in self.anchors}
        if same:
            raise UserError(f"{sorted(same)[0]!r} is both a concept to erase and an anchor to keep; "
                            "an anchor must be something else the model should still draw")
        self._check_guides()
        if self.method == "eupmu-fast" and self.retain_batch_size < 2:
            raise UserError("--method eupmu-fast carries half of the retain batch into the next step; "
                            "use --retain-batch-size 2 or more")
        if keeps_anchors(self.method) and self.retain_batch_size < 1:
            raise UserError(f"--method {self.method} needs a retain batch; use --retain-batch-size 1 or more")
        if self.trajectory_timesteps > 1:
            if self.trajectory_refresh > 1:
                raise UserError("--trajectory-timesteps applies to fresh trajectories (--trajectory-refresh 1); "
                                "a pool already serves many timesteps")
            if self.batch_size % self.trajectory_timesteps or self.trajectory_timesteps > self.sampling_steps:
                raise UserError(f"--trajectory-timesteps {self.trajectory_timesteps} must divide --batch-size "
                                f"{self.batch_size} and be at most --sampling-steps {self.sampling_steps}")
        if self.relative_to and len(self.relative_to) not in (1, len(self.concepts)):
            raise UserError("give one --relative-to for all concepts, or one per --concept")
        if self.relative_to and self.forget_loss != "negative-guidance":
            raise UserError("--relative-to applies to --forget-loss negative-guidance only")
        if self.forget_loss == "remap" and self.remap_to and len(self.remap_to) not in (1, len(self.concepts)):
            raise UserError("give one --remap-to for all concepts, or one per --concept")
        check_variant_names(self.concept_variants)
        if self.stop_when_erased:
            self._check_stop()
        if self.hold_erasure_at is not None:
            if self.forget_loss != "negative-guidance":
                raise UserError("--hold-erasure-at holds the negative-guidance forget loss's erasure signal, which "
                                f"--forget-loss {self.forget_loss} has not; drop it or use negative-guidance")
            if not -self.eta < self.hold_erasure_at:
                raise UserError(f"--hold-erasure-at {self.hold_erasure_at} is out of range: the forget loss's target "
                                f"is the signal level -eta = {-self.eta:g}, so a level at or under it holds nothing")

    def _check_guides(self) -> None:
        """A concept remapped to itself, or erased relative to itself, would erase nothing: refused."""
        for flag, guides in (("--remap-to", self.remap_to), ("--relative-to", self.relative_to)):
            if not guides or len(guides) not in (1, len(self.concepts)):
                continue  # the counts are checked with the forget loss
            for concept, guide in zip(self.concepts, guides * len(self.concepts) if len(guides) == 1 else guides):
                if concept.strip().lower() == guide.strip().lower():
                    raise UserError(f"{flag} {guide!r} is the concept itself, so nothing would be erased; give a "
                                    f"prompt without the concept (e.g. an anchor) or drop {flag}")

    def _edit_only(self) -> str:
        """The flag of an edit-only setting given to a trained method, else ''."""
        for f in dataclasses.fields(self):
            if f.name.startswith("uce_") and getattr(self, f.name) != f.default:
                return flag_name(f)
        return ""

    def _check_edit(self) -> None:
        """A closed-form edit takes no training setting: one given is refused, not silently ignored."""
        given = [flag_name(f) for f in dataclasses.fields(self) if f.name not in EDIT_SETTINGS and getattr(self, f.name)
                 != (f.default_factory() if f.default is dataclasses.MISSING else f.default)]
        if given:
            listed = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
            raise UserError(f"--method {self.method} is a closed-form edit: it does not train, so {listed} "
                            f"{'does' if len(given) == 1 else 'do'} not apply; drop {listed} (the edit takes "
                            f"{EDIT_FLAGS})")
        if len(self.remap_to) not in (0, 1, len(self.concepts)):
            raise UserError(f"--method {self.method}: give one --remap-to for all concepts, or one per --concept")

    def _check_stop(self) -> None:
        if self.stop_judge not in ("auto", "signal") and self.stop_judge not in JUDGES:
            raise UserError(f"--stop-judge {self.stop_judge!r} is not a judge; give --stop-judge auto, signal or one of "
                            f"{', '.join(JUDGES.names())}")
        if self.check_every > self.steps:
            raise UserError(f"--stop-when-erased checks every {self.check_every} steps, more than the run's "
                            f"--steps {self.steps}: no check would run; give --check-every {self.steps} or less, "
                            "or raise --steps")
        last = self.check_seed_start + self.check_confirm * check_block(self.check_images,
                                                                         self.check_images_per_concept) - 1
        if last > MAX_SEED:
            raise UserError(f"--check-seed-start {self.check_seed_start} leaves no room for the seeds of "
                            f"--check-confirm {self.check_confirm} checks (up to seed {last}, past {MAX_SEED}); "
                            "give a smaller --check-seed-start")
        if self.stop_judge == "signal" or self.stop_judge == "auto":
            if self.forget_loss != "negative-guidance":
                if self.stop_judge == "signal":
                    raise UserError("--stop-judge signal reads the negative-guidance forget loss's concept "
                                    f"direction, which --forget-loss {self.forget_loss} has not; name an image judge "
                                    "(--stop-judge clip, nudity or the model's own)")
            elif not -self.eta < self.stop_signal_at_most < 1:
                raise UserError(f"--stop-signal-at-most {self.stop_signal_at_most} is out of range: the erasure "
                                f"signal goes from 1 (the original model) to -eta = {-self.eta:g} (the forget "
                                f"loss's target), so the stop must lie between them")

    def check_runnable(self) -> None:
        """Checks that need the whole picture (a config file may fill what flags leave out), and every field's
        declaration again: a setting changed after construction (`cfg.steps = -3`) is caught before any work."""
        check_fields(self)
        if not self.model:
            raise UserError("no model given; pass --model PATH_OR_HUB_ID (or builtin:tiny to try the toolkit)")
        if not self.concepts:
            raise UserError("no concept to erase; pass --concept 'the concept' (repeat it for several)")
        if not self.output:
            raise UserError("no output folder; pass --output runs/NAME")
        if keeps_anchors(self.method) and not self.anchors and not self.retain_images and not self.weights:
            raise UserError(missing_anchors(self.method))  # a chain's anchors are counted when it is read
        if self.forget_loss == "remap" and not self.remap_to:
            raise UserError("--forget-loss remap needs --remap-to 'the prompt to remap to'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


# What a closed-form edit reads of the settings (--remap-to names each concept's guide; seed is recorded only)
EDIT_SETTINGS = frozenset({"model", "concepts", "anchors", "concept_file", "anchor_file", "output", "method",
                           "remap_to", "concept_variants", "mixed_precision", "seed", "cache_dir", "overwrite",
                           "allow_pickle", "model_config", "progress", "uce_regularization", "uce_preserve_weight",
                           "uce_tokens"})
EDIT_FLAGS = ("--model, --concept, --anchor (kept), --concept-file, --anchor-file, --remap-to (the guide), "
              "--concept-variants, --uce-regularization, --uce-preserve-weight, --uce-tokens, --output")


def settings_for(settings: dict, method: str | None = None) -> dict:
    """A recipe's settings as a run of `method` (default: the settings' own) reads them: a closed-form edit takes
    its model, prompts and edit settings, none of the recipe's training settings (which it would refuse)."""
    method = method or settings.get("method", "eupmu")
    if not is_edit(method):
        return dict(settings)
    return {k: v for k, v in settings.items() if k.replace("-", "_") in EDIT_SETTINGS}


def is_edit(method: str) -> bool:
    return method in EDITS


def read_prompt_file(path: str, flag: str) -> list[str]:
    """The prompts of a text file, one a line; blank lines and lines starting with # are skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{flag} {path}: no such file; give a text file with one prompt a line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{flag} {path} is not a text file; give one prompt a line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{flag} {path} holds no prompt; write one a line")
    return prompts


def _weights_file(weights: str) -> str:
    """The file a --weights value names (a run folder names its erased.safetensors), resolved."""
    if not weights:
        return ""
    from concept_erase.export.delta import delta_file

    return os.path.realpath(delta_file(Path(weights).expanduser()))


def keeps_anchors(method: str) -> bool:
    """Whether the method trains with a retain side, which anchors (or retain images) must fill."""
    return not is_edit(method) and _controller(method).uses_retain


def check_method(name: str) -> None:
    """A known method: a lambda controller (trained) or a closed-form edit; else one line naming them all."""
    if name not in LAMBDA_CONTROLLERS and not is_edit(name):
        raise UserError(f"unknown method {name!r} for --method; choose one of: "
                        f"{', '.join(LAMBDA_CONTROLLERS.names() + EDITS.names())}")


def _controller(name: str):
    return LAMBDA_CONTROLLERS.get(name)


# YAML keys may use dashes or underscores; these read better in a file.
ALIASES = {"concept": "concepts", "anchor": "anchors", "lambda": "lambda_init", "sample_prompt": "sample_prompts"}


def normalise_keys(raw: dict, source: str) -> dict:
    known = set(EraseConfig.field_names())
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise UserError(f"{source}: key {key!r} is not a name")
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in known:
            raise UserError(f"{source}: unknown setting {key!r}; see `concept-erase erase --help` for the settings")
        out[name] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    raw = read_yaml(path, "config file", "fix it or start from a file in pipelines/")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping of settings (key: value), not a {type(raw).__name__}")
    return normalise_keys(raw, str(path))


def _coerce(name: str, value: Any, source: str) -> Any:
    default = next(f for f in dataclasses.fields(EraseConfig) if f.name == name)
    kind = type(default.default) if default.default is not dataclasses.MISSING else list
    if kind is list:
        if isinstance(value, (str, int, float)):
            return [str(value)]
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            return [str(v) for v in value]
        raise UserError(f"{source}: {name} must be a list of strings")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {name} must be true or false, not {value!r}")
    if kind is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or int(value) != value):
            raise UserError(f"{source}: {name} must be a whole number, not {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool):
            raise UserError(f"{source}: {name} must be a number, not {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{source}: {name} must be a number, not {value!r}") from None
        if not math.isfinite(number):
            raise UserError(f"{source}: {name} must be a finite number, not {value!r}")
        return number
    if kind is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{source}: {name} must be a string, not {value!r}")
        return str(value)
    return value


# Settings read only by --stop-when-erased: given while the run does not stop when erased, they change nothing.
STOP_SETTINGS = ("stop_judge", "stop_signal_at_most", "stop_lambda_window", "clip_model", "clip_weights",
                 "check_every", "check_forget_at_most", "check_retain_drop_at_most", "check_inference_steps",
                 "check_images", "check_images_per_concept", "check_confirm", "check_seed_start")


def missing_anchors(method: str, chain: str = "") -> str:
    """The refusal of a run with nothing to keep."""
    return (f"--method {method} keeps what anchors show{chain}; pass --anchor 'a prompt' (repeat it) or "
            "--retain-images FOLDER")


def inert_flags(config: EraseConfig, given) -> list[str]:
    """The command-line flags in `given` that this run's other settings make do nothing (a recipe's values are
    not counted: one recipe serves runs with and without the stop, or every request of a chain), each with why,
    for a one-line note each."""
    notes = []
    if not config.stop_when_erased:
        notes += [f"--{name.replace('_', '-')} did nothing in this run: it is read by --stop-when-erased, which was off"
                  for name in STOP_SETTINGS if name in given]
    if "newest_share" in given and not config.weights:
        notes.append("--newest-share did nothing in this run: it shares the draws of a chain (--weights "
                     "PREVIOUS_RUN), and this run continues none")
    return notes


def build_config(file_settings: Optional[dict] = None, overrides: Optional[dict] = None,
                 source: str = "config") -> EraseConfig:
    """defaults < file settings < overrides (command-line flags that were given)."""
    merged: dict[str, Any] = {}
    for src, settings in ((source, file_settings or {}), ("command line", overrides or {})):
        for name, value in settings.items():
            merged[name] = _coerce(name, value, src)
    return EraseConfig(**merged)


def config_json(config: EraseConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def resume_differences(saved: dict, config: EraseConfig) -> tuple[list, dict]:
    """A checkpoint's settings (`saved`, as `config_json` wrote them) against a resume's: (refused, changed).
    `refused` lists (flag, checkpoint's value, now) for the settings that change what a step trains; `changed` maps
    each resumable setting (`options.setting`'s `resumable`) that differs to {"checkpoint": ..., "now": ...}.
    A setting the checkpoint does not name (written by an older version) is not compared, nor those of the
    invocation itself (--resume, --overwrite, --progress)."""
    now = json.loads(config_json(config))
    refused, changed = [], {}
    for f in dataclasses.fields(EraseConfig):
        if f.name in ("resume", "overwrite", "progress") or f.name not in saved or saved[f.name] == now.get(f.name):
            continue
        if f.name == "weights" and _weights_file(saved[f.name]) == _weights_file(now.get(f.name)):
            continue  # the same previous run, named by its folder or its file
        if f.metadata.get("resumable"):
            changed[f.name] = {"checkpoint": saved[f.name], "now": now.get(f.name)}
        else:
            refused.append((flag_name(f), saved[f.name], now.get(f.name)))
    return refused, changed
