"""Digests: of a file's bytes, and of named tensors by their values (the same weights give the same digest on any
device)."""

from __future__ import annotations

import hashlib

import torch


def file_digest(path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp32 values: the same for the same weights whatever device."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():  # hashed in place (a copy through bytes would double the time on a 12B model)
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()
