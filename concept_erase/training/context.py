"""What the objectives may use during a run (`ErasureContext`): the model family, the denoiser and the original
model (no-grad), the noise schedule, each prompt's conditioning encoded once, and the latent banks."""

from __future__ import annotations

import torch

from concept_erase import env
from concept_erase.embedded import EmbeddedModel
from concept_erase.families.base import Cond
from concept_erase.training.banks import LatentBank, build_bank, build_caption_bank
from concept_erase.training.chain import draw_repeats
from concept_erase.training.hardware import duration
from concept_erase.training.original import OriginalModel
from concept_erase.variants import GENERAL, Variant, check_against_anchors, expand, resolve


def prompt_variants(config, world: EmbeddedModel | None = None) -> tuple[list[Variant], list[Variant]]:
    """(the concepts' variants, the anchors') that `--concept-variants` asks for, each prompt bare first: `auto` means
    the world's own templates on an embedded model (the style phrases on the digits models) and the general templates
    on any other. A variant that holds an anchor word for word is refused."""
    templates = resolve(config.concept_variants, world.templates if world and world.templates else GENERAL)
    applies = world.takes_template if world and world.templates else None
    concepts = expand(config.concepts, templates, applies)
    check_against_anchors(concepts, config.concepts, config.anchors)
    return concepts, expand(config.anchors, templates, applies)


class ErasureContext:
    """What objectives may use: the model family, the models (no-grad), the noise schedule, prompt
    conditionings, latent banks."""

    def __init__(self, config, pipe, family, accelerator, trained, base_digest: str, resolution: int,
                 log=print, variants: tuple[list[Variant], list[Variant]] | None = None, earlier: int = 0):
        self.config = config
        # The prompts the objectives draw: each concept and anchor bare, then inside its templates (--concept-variants)
        self.concept_variants, self.anchor_variants = variants or prompt_variants(config)
        # How often the forget side draws each concept per round: a chain's `earlier` concepts against the
        # request's own (--newest-share); every concept once by default
        self.concept_repeats = draw_repeats(len(config.concepts), earlier, config.newest_share)
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
                self._anchor_bank = self.latent_bank([v.prompt for v in self.anchor_variants],
                                                     cfg.anchor_images_per_prompt, role="anchor")
        return self._anchor_bank
