"""The original model's predictions, without a second denoiser in memory.

Only the trained tensors differ from the original model, so a copy of just those is kept and the
original prediction is the same denoiser evaluated with `torch.func.functional_call` on that copy.
For LoRA, the original model is the denoiser with its adapter switched off.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call


class OriginalModel:
    def __init__(self, family, model: torch.nn.Module, trained: dict[str, torch.nn.Parameter], lora: bool,
                 dtype: torch.dtype | None = None):
        """`model` is the family's denoiser (a UNet or a transformer). `dtype` stores the copy in another precision (bf16: half the
        memory; only under a bf16 autocast, which casts Linear and convolution weights to bf16 anyway)."""
        self.family = family
        self.model = model
        self.lora = lora
        self.original = {} if lora else {n: p.detach().to(dtype=dtype or p.dtype, copy=True)
                                         for n, p in trained.items()}

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        if self.lora:
            with self.adapter_off():
                return self.family.predict(self.model, sample, timesteps, cond)
        args, kwargs = self.family.inputs(sample, timesteps, cond)
        return functional_call(self.model, self.original, args, kwargs, strict=False).sample

    @contextlib.contextmanager
    def adapter_off(self):
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.original.values())
