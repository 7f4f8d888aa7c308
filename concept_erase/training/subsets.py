"""Which denoiser weights an erasure trains; everything else is frozen with requires_grad_(False).
The named subsets and LoRA's target modules are the model family's (`families/`)."""

from __future__ import annotations

import torch

from concept_erase.errors import UserError
from concept_erase.families.sd import StableDiffusion


def select_trainable(unet: torch.nn.Module, subset: str, family=None, *, lora_rank: int = 4,
                     lora_alpha: float = 4.0) -> dict[str, torch.nn.Parameter]:
    """Freeze the denoiser, unfreeze the family's named subset (or attach LoRA to the family's target
    modules), return {name: parameter}. Without a family: SD's (a UNet of SD's layout)."""
    if family is None:
        family = StableDiffusion()
    unet.requires_grad_(False)
    if subset == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                    target_modules=list(family.lora_targets)))
        trained = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        for p in trained.values():
            p.requires_grad_(True)
            p.data = p.data.float()
    else:
        names = family.subset_names(unet, subset)
        trained = {n: p for n, p in unet.named_parameters() if n in names}
        for p in trained.values():
            p.requires_grad_(True)
    if not trained:
        raise UserError(f"--train {subset} selects no weight of this model; choose another subset")
    return trained
