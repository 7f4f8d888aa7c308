"""Forget and retain objectives: each builds a regression batch (inputs and a fixed target).

An objective does its no-grad work (sampling a trajectory, the original model's predictions,
noising cached latents) and hands the trainer a `RegressionBatch`; the trainer runs the model
being trained on it and takes the per-sample MSE. The trainer never learns which objective it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from concept_erase.families.base import Cond
from concept_erase.methods.losses import negative_guidance_target
from concept_erase.plugins import FORGET_OBJECTIVES, RETAIN_OBJECTIVES
from concept_erase.training.seeds import generator
from concept_erase.variants import SLOT

@dataclass
class RegressionBatch:
    """One tuple of the model's inputs and the output it should give: everything that makes a loss value."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    cond: Cond  # the prompts' conditioning, in the model family's form
    target: torch.Tensor
    # Where the target steers away from a concept: the original model's reference prediction e0 and its
    # concept direction ec - e0, from which the trainer reads the erasure signal (`losses.guidance_projection`)
    # at no extra model call. None for objectives that have no such direction.
    origin: torch.Tensor | None = None
    direction: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(batches: list["RegressionBatch"]) -> "RegressionBatch":
        """The batches' rows in order; a concept direction only if every batch has one."""
        guided = all(b.origin is not None for b in batches)
        return RegressionBatch(torch.cat([b.latents for b in batches]), torch.cat([b.timesteps for b in batches]),
                               Cond.cat(b.cond for b in batches), torch.cat([b.target for b in batches]),
                               torch.cat([b.origin for b in batches]) if guided else None,
                               torch.cat([b.direction for b in batches]) if guided else None)

    def slice(self, start: int, stop: int) -> "RegressionBatch":
        guided = self.origin is not None
        return RegressionBatch(self.latents[start:stop], self.timesteps[start:stop],
                               self.cond[start:stop], self.target[start:stop],
                               self.origin[start:stop] if guided else None,
                               self.direction[start:stop] if guided else None)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.latents": self.latents.contiguous(), f"{prefix}.timesteps": self.timesteps.contiguous(),
                f"{prefix}.target": self.target.contiguous(), **self.cond.state(f"{prefix}.cond")}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], prefix: str, device) -> "RegressionBatch":
        return RegressionBatch(tensors[f"{prefix}.latents"].to(device), tensors[f"{prefix}.timesteps"].to(device),
                               Cond.from_state(tensors, f"{prefix}.cond", device),
                               tensors[f"{prefix}.target"].to(device))


def _randn(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Draw on the CPU from the step's generator: the same numbers on every device and after a resume.
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(like.device, like.dtype)


def _randint(high: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, high, (size,), generator=gen)


ORDER_STREAM = 11  # the seed coordinate of the forget prompts' order (`PromptOrder`)


class PromptOrder:
    """Which prompt each forget draw takes when there are several (concepts, or a concept inside its templates).

    A run's forget draws are numbered over steps, then processes and micro-batches (`slot` of `slots`), then the
    rows of a call. Each aligned block of consecutive numbers holds every prompt `repeats[i]` times (once each by
    default), in an order drawn for that block from the run's seed, so the prompts are drawn in those proportions
    exactly (a uniform draw is balanced only on average). It keeps no state: a resumed run draws the same prompts."""

    def __init__(self, count: int, seed: int, repeats: list[int] | None = None):
        repeats = [1] * count if repeats is None else list(repeats)
        if len(repeats) != count or min(repeats, default=1) < 1:
            raise ValueError(f"one repeat of at least 1 per prompt ({count}), not {repeats}")
        self.pool = torch.repeat_interleave(torch.arange(count), torch.tensor(repeats, dtype=torch.long))
        self.count, self.seed = len(self.pool), seed
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, block: int) -> torch.Tensor:
        if block not in self._orders:
            if len(self._orders) > 64:
                self._orders.clear()
            order = torch.randperm(self.count, generator=generator(self.seed, block, ORDER_STREAM))
            self._orders[block] = self.pool[order]
        return self._orders[block]

    def picks(self, call: int, slot: tuple[int, int], n: int) -> torch.Tensor:
        """The prompts of the `n` rows of forget call number `call` (a step, or a trajectory pool) made by `slot`."""
        first = (call * slot[1] + slot[0]) * n
        return torch.stack([self._order(p // self.count)[p % self.count] for p in range(first, first + n)])


class Objective:
    """Base: an objective's state (tensors that must survive a resume) is empty by default."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


@FORGET_OBJECTIVES.register("negative-guidance")
class NegativeGuidance(Objective):
    """ESD: steer the concept's prediction to e0 - eta (ec - e0) of the ORIGINAL model.

    e0 is the prediction for the empty prompt, or for `--relative-to` (a style erased relative to
    the caption without it moves away from the style only, not from the whole caption).

    x_t lies on a trajectory sampled for the concept prompt by the family's sampler (DDIM for the UNet
    families, flow-matching Euler for the transformers), at guidance `--start-guidance`. With `trajectory_refresh` 1 a
    partial trajectory to a random step is sampled every step (ESD). With N > 1 one full
    trajectory is sampled and its intermediate latents serve the next N steps.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        cfg = ctx.config
        self.eta = cfg.eta
        self.guidance = cfg.start_guidance
        self.refresh = cfg.trajectory_refresh
        self.per_trajectory = cfg.trajectory_timesteps
        self.sampler = ctx.family.sampler(ctx.pipe, cfg.sampling_steps, ctx.resolution)
        self.timesteps = self.sampler.timesteps.clone()
        # One conditioning per prompt drawn: each concept bare and inside its templates (--concept-variants), the
        # same number of prompts for every concept, so a uniform draw is balanced across concepts.
        variants = ctx.concept_variants
        self.concepts = ctx.embed([v.prompt for v in variants])
        self.order = PromptOrder(len(variants), cfg.seed, [ctx.concept_repeats[v.owner] for v in variants])
        self.uncond = ctx.embed([""])
        # What the concept is erased relative to: the empty prompt (ESD), or one prompt per concept
        # (a style relative to the same caption without it), inside the same template as the concept.
        refs = cfg.relative_to * len(cfg.concepts) if len(cfg.relative_to) == 1 else cfg.relative_to
        self.reference = ctx.embed([v.template.replace(SLOT, refs[v.owner]) for v in variants]) if refs else None
        self.model_name = cfg.trajectory_model
        self.pool: dict[str, torch.Tensor] = {}

    def _sampling_model(self):
        return self.ctx.original if self.model_name == "original" else self.ctx.current

    @torch.no_grad()
    def _denoise(self, x: torch.Tensor, cond: Cond, start: int, stop: int, keep: list | None = None):
        model = self._sampling_model()
        uncond = self.uncond.repeat(len(cond))
        for i in range(start, self.ctx.lockstep(stop)):
            t = self.timesteps[i].repeat(x.shape[0]).to(x.device)
            out = self.ctx.family.guided(model, x, t, cond, uncond, self.guidance)
            if i >= stop:  # a call only to keep pace with the other processes (sharded runs)
                continue
            if keep is not None:
                keep.append(x)
            x = self.sampler.step(out, i, x)
        return x

    def _start_noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return _randn((n, *self.ctx.latent_shape), gen, self.ctx.template) * self.sampler.init_noise_sigma

    def _which(self, gen: torch.Generator, n: int, call: int, slot: tuple[int, int]) -> torch.Tensor:
        """The prompts of n rows. The uniform draw from the step's generator is always made: with one prompt it is the
        answer, and with several it keeps the step's later draws where they were, while `PromptOrder` picks."""
        which = _randint(len(self.concepts), n, gen)
        return which if len(self.concepts) == 1 else self.order.picks(call, slot, n)

    @torch.no_grad()
    def batch(self, gen: torch.Generator, n: int, step: int, slot: tuple[int, int] = (0, 1)) -> RegressionBatch:
        steps = len(self.timesteps)
        if self.refresh <= 1 and self.per_trajectory > 1:
            # n / r trajectories, each giving its latents at r distinct timesteps: one deeper sampling
            # pass instead of r shallower ones.
            r = self.per_trajectory
            which = self._which(gen, n // r, step, slot)
            picks = torch.randperm(steps, generator=gen)[:r]
            path: list = []  # path[i]: the latents before sampling step i; the last entry after them all
            end = self._denoise(self._start_noise(n // r, gen), self.concepts[which], 0, int(picks.max()), path)
            path.append(end)
            x = torch.cat([path[int(k)] for k in picks])
            which = which.repeat(r)
            cond = self.concepts[which]
            t = self.timesteps[picks.repeat_interleave(n // r)].to(x.device)
        elif self.refresh <= 1:
            which = self._which(gen, n, step, slot)
            cond = self.concepts[which]
            k = int(_randint(steps, 1, gen))
            x = self._denoise(self._start_noise(n, gen), cond, 0, k)
        else:
            if step % self.refresh == 0 or "latents" not in self.pool or self.pool["latents"].shape[1] != n:
                which = self._which(gen, n, step // self.refresh, slot)
                cond = self.concepts[which]
                keep: list = []
                self._denoise(self._start_noise(n, gen), cond, 0, steps, keep)
                self.pool = {"latents": torch.stack(keep), "which": which}
            which = self.pool["which"]
            cond = self.concepts[which]
            k = int(_randint(steps, 1, gen))
            x = self.pool["latents"][k]
        if self.refresh > 1 or self.per_trajectory == 1:
            t = self.timesteps[k].repeat(n).to(x.device)
        ref = self.reference[which] if self.reference is not None else self.uncond.repeat(len(cond))
        e = self.ctx.original(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([ref, cond]))
        e0, ec = e.float().chunk(2)
        return RegressionBatch(x, t, cond, negative_guidance_target(e0, ec, self.eta), origin=e0, direction=ec - e0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"forget_pool.{k}": v.contiguous() for k, v in self.pool.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        device = self.ctx.template.device
        self.pool = {k.split(".", 1)[1]: v.to(device) for k, v in tensors.items() if k.startswith("forget_pool.")}


class _NoisedBank(Objective):
    """Shared by the objectives that noise cached clean latents at a uniform random timestep."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.schedule = ctx.schedule

    def _noised(self, latents: torch.Tensor, gen: torch.Generator):
        n = latents.shape[0]
        t = self.schedule.sample_timesteps(n, gen).to(latents.device)
        noise = _randn(latents.shape, gen, latents)
        return self.schedule.noised(latents, noise, t), t, noise


@FORGET_OBJECTIVES.register("remap")
class Remap(_NoisedBank):
    """Pseudo-label: the concept's images should be denoised as if prompted with `--remap-to`.

    The target is the CURRENT model's no-grad prediction for the remap prompt on the same x_t.
    """

    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.config
        targets = cfg.remap_to if len(cfg.remap_to) == len(cfg.concepts) else cfg.remap_to * len(cfg.concepts)
        variants = ctx.concept_variants  # each concept bare and inside its templates, remapped inside the same one
        prompts = [v.prompt for v in variants]
        self.bank = ctx.latent_bank(prompts, cfg.concept_images_per_prompt, role="concept")
        self.cond = ctx.embed(prompts)
        self.remap = ctx.embed([v.template.replace(SLOT, targets[v.owner]) for v in variants])
        self.order = PromptOrder(len(prompts), cfg.seed, [ctx.concept_repeats[v.owner] for v in variants])
        self.by_prompt = [torch.nonzero(self.bank.prompt_index == k).flatten() for k in range(len(prompts))]

    @torch.no_grad()
    def batch(self, gen: torch.Generator, n: int, step: int, slot: tuple[int, int] = (0, 1)) -> RegressionBatch:
        idx = _randint(len(self.bank.latents), n, gen)
        if len(self.by_prompt) > 1:  # the prompt by `PromptOrder`, one of its images by the uniform draw
            idx = torch.stack([self.by_prompt[int(p)][int(i) % len(self.by_prompt[int(p)])]
                               for p, i in zip(self.order.picks(step, slot, n), idx)])
        x0 = self.bank.latents[idx]
        prompt = self.bank.prompt_index[idx]
        x_t, t, _ = self._noised(x0, gen)
        target = self.ctx.current(x_t, t, self.remap[prompt]).float()
        return RegressionBatch(x_t, t, self.cond[prompt], target)


@RETAIN_OBJECTIVES.register("denoising")
class Denoising(_NoisedBank):
    """The ordinary denoising loss on anchor latents, in the model's own prediction type."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.bank = ctx.anchor_bank()

    def _anchors(self, gen: torch.Generator, n: int):
        """n anchor latents, noised: (clean, noised, timesteps, noise, conditioning)."""
        idx = _randint(len(self.bank.latents), n, gen)
        x0 = self.bank.latents[idx]
        x_t, t, noise = self._noised(x0, gen)
        return x0, x_t, t, noise, self.bank.cond[idx]

    @torch.no_grad()
    def batch(self, gen: torch.Generator, n: int, step: int) -> RegressionBatch:
        x0, x_t, t, noise, cond = self._anchors(gen, n)
        return RegressionBatch(x_t, t, cond, self.schedule.target(x0, noise, t))


@RETAIN_OBJECTIVES.register("preservation")
class Preservation(Denoising):
    """The anchors drawn as the original model drew them: on a noised anchor latent, the ORIGINAL model's
    prediction for the anchor's prompt is the target (a distillation loss, as in the preservation terms of
    MACE and EraseAnything). It is 0 before training and grows with any change to what the model predicts
    for the anchors, where the denoising loss moves by a small part of its own size (most of it is the
    noise's variance, which no model removes); so the retain constraint of EUPMU sees the drift that
    makes the other digits come out wrong (`benchmarks/tuning-record.md`)."""

    @torch.no_grad()
    def batch(self, gen: torch.Generator, n: int, step: int) -> RegressionBatch:
        _, x_t, t, _, cond = self._anchors(gen, n)
        return RegressionBatch(x_t, t, cond, self.ctx.original(x_t, t, cond).float())
