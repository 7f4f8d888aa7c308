"""Which UNet weights an erasure trains; everything else is frozen with requires_grad_(False)."""

from __future__ import annotations

import torch

from concept_erase.errors import UserError

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _in_subset(name: str, subset: str) -> bool:
    if subset == "full":
        return True
    if subset == "xattn":  # ESD-x: the cross-attention layers, where text enters the image
        return ".attn2." in name
    if subset == "xattn-kv":  # the projections of the text embedding only (as UCE and MACE edit)
        return ".attn2.to_k." in name or ".attn2.to_v." in name
    if subset == "selfattn":
        return ".attn1." in name
    if subset == "noxattn":  # ESD-u: all but cross-attention, time embedding and output layers
        return not (".attn2." in name or name.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")))
    raise UserError(f"unknown subset {subset!r} for --train")


def select_trainable(unet: torch.nn.Module, subset: str, *, lora_rank: int = 4,
                     lora_alpha: float = 4.0) -> dict[str, torch.nn.Parameter]:
    """Freeze the UNet, unfreeze the chosen subset (or attach LoRA), return {name: parameter}."""
    unet.requires_grad_(False)
    if subset == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
        trained = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        for p in trained.values():
            p.requires_grad_(True)
            p.data = p.data.float()
    else:
        trained = {n: p for n, p in unet.named_parameters() if _in_subset(n, subset)}
        for p in trained.values():
            p.requires_grad_(True)
    if not trained:
        raise UserError(f"--train {subset} selects no weight of this UNet; choose another subset")
    return trained
