"""The forward processes the families train with, as pure functions: the DDPM noising of SD 1.x/2.x and SDXL
(`add_noise`, with the target of each prediction type) and rectified flow's of SD3 and FLUX.1 (`flow_noised`,
`flow_target`). Tensors in, tensors out, no model; computed in fp32 and returned in the latents' precision."""

from __future__ import annotations

import torch


def denoising_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                     alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """What a model of this prediction type should output for `sqrt(a) x0 + sqrt(1-a) n`.

    `alphas_cumprod_t` holds abar_t per sample (shape [batch]).
    """
    if prediction_type == "epsilon":
        return noise
    a = alphas_cumprod_t.float().reshape(-1, *([1] * (latents.dim() - 1)))
    if prediction_type == "v_prediction":
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(noise.dtype)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction type {prediction_type!r} (expected epsilon, v_prediction or sample)")


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """The forward process `sqrt(abar_t) x0 + sqrt(1 - abar_t) n`, per sample."""
    a = alphas_cumprod_t.float().reshape(-1, *([1] * (latents.dim() - 1)))
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def flow_noised(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow's forward process `(1 - s) x0 + s n`, per sample (SD3, FLUX.1); `sigma` has shape [batch]."""
    s = sigma.float().reshape(-1, *([1] * (latents.dim() - 1)))
    return ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity a flow-matching model should output for `(1 - s) x0 + s n`: `n - x0`, at every s."""
    return noise.float() - latents.float()
