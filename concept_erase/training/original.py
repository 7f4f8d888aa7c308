"""The original model's predictions, without a second denoiser in memory.

Only the trained tensors differ from the original model, so a copy of just those is kept and the
original prediction is the same denoiser evaluated with `torch.func.functional_call` on that copy.
For LoRA, the original model is the denoiser with its adapter switched off.

Under FSDP2 (`shard`) the trained tensors are DTensors whose slices FSDP gathers itself before each
block runs, so `functional_call`'s swap of the module's attributes would be overridden by that gather
and the "original" prediction would silently be the current one. There each process keeps the
original values of its own slices and writes them into the slices for the call, then writes the
current values back (both copies exact: the current values are saved in their own precision).
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call

from concept_erase.training.sharding import distribute_like, is_sharded


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
        self.sharded: dict[str, torch.Tensor] = {}  # {name: sharded parameter} once `shard` was called
        self.frozen_adapters: list[torch.nn.Parameter] | None = None  # LoRA: adapters not trained (`adapter_off`)

    def shard(self, trained: dict[str, torch.Tensor]) -> None:
        """The trained tensors are sharded now: keep the original values of this process's slices."""
        if self.lora or not any(is_sharded(p) for p in trained.values()):
            return
        for n, p in trained.items():  # this process's rows of each whole original (FSDP2 shards dim 0)
            whole = self.original[n]
            self.original[n] = distribute_like(whole.float(), p).to_local().to(whole.dtype)
        self.sharded = dict(trained)

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        if self.lora:
            with self.adapter_off():
                return self.family.predict(self.model, sample, timesteps, cond)
        args, kwargs = self.family.inputs(sample, timesteps, cond)
        if self.sharded:
            with self._original_slices():
                return self.model(*args, **kwargs).sample
        return functional_call(self.model, self.original, args, kwargs, strict=False).sample

    @contextlib.contextmanager
    def _original_slices(self):
        saved = {}
        self._reshard()  # a unit left gathered (FSDP keeps the root's) would not see the swap
        for n, p in self.sharded.items():
            mine = p.detach().to_local()
            saved[n] = mine.clone()
            mine.copy_(self.original[n])
        try:
            yield
        finally:
            for n, p in self.sharded.items():
                p.detach().to_local().copy_(saved[n])
            self._reshard()  # ... nor, afterwards, the current values

    def _reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @contextlib.contextmanager
    def adapter_off(self):
        """Every adapter off: the base model. peft marks every active adapter trainable when they come back on, so
        a frozen one (a LoRA chain's earlier requests) is frozen again."""
        if self.frozen_adapters is None:
            self.frozen_adapters = [p for n, p in self.model.named_parameters() if "lora_" in n and not p.requires_grad]
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()
            for p in self.frozen_adapters:
                p.requires_grad_(False)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.original.values())
