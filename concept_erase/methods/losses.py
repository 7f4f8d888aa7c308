"""The losses of concept erasure, as pure functions: tensors in, tensors out, no model.

Every loss is a mean squared error in the model's own output space (epsilon, v or sample
prediction), computed in fp32 whatever precision the forward pass ran in: a retain-loss change
per step is ~1e-4, below bf16's resolution.
"""

from __future__ import annotations

import torch


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample of a batch, in fp32: shape [batch]."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def negative_guidance_target(uncond: torch.Tensor, cond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's target `e0 - eta * (ec - e0)`: the original model's prediction steered AWAY from the concept.

    The weights (1 + eta, -eta) sum to one, so the combination is exact in epsilon, v and sample
    space alike: for a fixed x_t, each is an affine function of the others.
    """
    uncond = uncond.float()
    return uncond - eta * (cond.float() - uncond)


def guidance_projection(prediction: torch.Tensor, origin: torch.Tensor,
                        direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, `<p - e0, d>` and `||d||^2`, in fp32: how far the trained model's prediction `p` still
    goes from the original's reference prediction `e0` along the original's concept direction
    `d = ec - e0`. Their ratio is 1 for the original model (p = ec) and -eta at negative guidance's
    target (p = e0 - eta d); `erasure_signal` pools them over a batch."""
    if not prediction.shape == origin.shape == direction.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)}, origin {tuple(origin.shape)} and direction "
                         f"{tuple(direction.shape)} differ in shape")
    d = direction.float().flatten(1)
    return ((prediction.float() - origin.float()).flatten(1) * d).sum(dim=1), d.pow(2).sum(dim=1)


def erasure_signal(along: torch.Tensor, norm_sq: torch.Tensor) -> float | None:
    """The batch's guidance projection, `sum <p - e0, d> / sum ||d||^2` (samples weighted by how strongly
    the original model guides toward the concept there); None when the concept gives no direction."""
    total = float(norm_sq.sum())
    return float(along.sum()) / total if total > 0 else None


def still_guided(along: torch.Tensor, norm_sq: torch.Tensor, level: float) -> torch.Tensor:
    """Per sample, whether its guidance projection `along / norm_sq` is still above `level` (a sample with no
    concept direction is not). The forget loss of a held erasure counts only these samples."""
    return along > level * norm_sq


def surgery_products(g_u: list, g_r: list, scale: float = 1.0) -> tuple[float, float]:
    """<g_r, g_u> and ||g_r||^2 of the true (unscaled) gradients, in fp64, over the trained subset.

    `g_u` and `g_r` hold the gradients as backward left them, each multiplied by `scale`; a missing
    gradient (None) counts as zeros.
    """
    dot, norm_sq = 0.0, 0.0
    for a, b in zip(g_u, g_r):
        if b is None:
            continue
        bd = b.double()
        norm_sq += float(torch.sum(bd * bd))
        if a is not None:
            dot += float(torch.sum(a.double() * bd))
    return dot / scale**2, norm_sq / scale**2
