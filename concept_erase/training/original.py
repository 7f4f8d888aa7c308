"""The original model's predictions, without a second UNet in memory.

Only the trained tensors differ from the original model, so a copy of just those is kept and the
original prediction is the same UNet evaluated with `torch.func.functional_call` on that copy.
For LoRA, the original model is the UNet with its adapter switched off.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call


class OriginalModel:
    def __init__(self, unet: torch.nn.Module, trained: dict[str, torch.nn.Parameter], lora: bool,
                 dtype: torch.dtype | None = None):
        """`dtype` stores the copy in another precision (bf16: half the memory; only under a bf16
        autocast, which casts Linear and convolution weights to bf16 anyway)."""
        self.unet = unet
        self.lora = lora
        self.original = {} if lora else {n: p.detach().to(dtype=dtype or p.dtype, copy=True)
                                         for n, p in trained.items()}

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        if self.lora:
            with self.adapter_off():
                return self.unet(sample, timesteps, encoder_hidden_states=embeddings).sample
        return functional_call(self.unet, self.original, (sample, timesteps),
                               {"encoder_hidden_states": embeddings}, strict=False).sample

    @contextlib.contextmanager
    def adapter_off(self):
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.original.values())
