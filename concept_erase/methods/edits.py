"""Closed-form edits: methods that change the weights once, by solving for them, instead of training.

UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024) edits the linear layers that read
the text encoder's output, so that each concept's embedding gives what the guide prompt's embedding gave before,
while the preserved prompts' embeddings keep their outputs. For one layer with weight W0 it solves

    min_W  lambda * ||W - W0||^2 + sum_i ||W c_i - W0 g_i||^2 + p * sum_j ||W k_j - W0 k_j||^2

over the concepts' embeddings c_i, their guides' g_i and the preserved prompts' k_j; the normal equations give

    W = (lambda W0 + sum_i W0 g_i c_i^T + p sum_j W0 k_j k_j^T) (lambda I + sum_i c_i c_i^T + p sum_j k_j k_j^T)^-1

(the paper's equation 7, with its erase scale 1). `closed_form_weight` is that formula, a pure function; `uce_edit`
finds the layers and embeddings through the model family. Choices, following the authors' current scripts:

- the embedding of a prompt is its last token before the end token (in each text stream that feeds the layer) and,
  for a layer that reads the pooled text embedding, that embedding;
- the guide is `--remap-to` (one for all concepts, or one per concept), else the empty prompt;
- the targets are W0 g_i without the layer's bias: the edited layer adds the same bias to every input, so a target
  that held it would count it twice (the authors' FLUX script takes the module's output, bias included);
- the preserved prompts are the run's anchors; with `--concept-variants` the concepts and anchors are drawn inside
  every template, each concept variant guided by the same template around its guide.
"""

from __future__ import annotations

import time

import torch

from concept_erase.plugins import EDITS


def closed_form_weight(w_old: torch.Tensor, concepts: torch.Tensor, guides: torch.Tensor, kept: torch.Tensor, *,
                       regularization: float, preserve_weight: float) -> torch.Tensor:
    """The weight that minimises `regularization * ||W - W0||^2 + sum ||W c - W0 g||^2 + preserve_weight *
    sum ||W k - W0 k||^2`. concepts and guides: (n, in) rows paired in order; kept: (m, in). Solved in float64
    (the matrix to invert is symmetric positive definite when the regularization is positive); returned in the
    dtype of `w_old`."""
    if regularization <= 0:
        raise ValueError("the regularization must be positive (it keeps the system invertible)")
    if concepts.shape != guides.shape:
        raise ValueError(f"concepts {tuple(concepts.shape)} and guides {tuple(guides.shape)} must pair row by row")
    w0 = w_old.detach().double()
    c, g, k = concepts.double(), guides.double(), kept.double()
    eye = torch.eye(w0.shape[1], dtype=torch.float64, device=w0.device)
    gram = regularization * eye + c.T @ c + preserve_weight * (k.T @ k)
    right = regularization * w0 + (w0 @ g.T) @ c + preserve_weight * (w0 @ k.T) @ k
    # W gram = right, and gram is symmetric: W^T = gram^-1 right^T
    return torch.linalg.solve(gram, right.T).T.to(w_old.dtype)


def guide_prompt(template_text: str, guide: str) -> str:
    """A concept variant's guide: the same template around the guide prompt (the bare guide for a bare concept;
    around the empty guide, the template's own words: '{} in red ink' -> 'in red ink')."""
    return " ".join(template_text.replace("{}", guide).split()).strip(" ,")


def token_rows(value: torch.Tensor, index: int, spans: list[tuple], partner: tuple | None = None,
               tokens: str = "tail") -> torch.Tensor:
    """The rows of prompt `index` in a conditioning tensor: a pooled embedding's one row; in a token sequence, per
    text stream, its last word's token ('last') or that token and every one after it to the stream's end ('tail':
    the end and padding tokens, which a causal encoder fills from the whole prompt). `partner`: (its index, its
    spans) when the rows pair with another prompt's, which then gives as many rows, aligned from the last word."""
    if value.dim() == 2:
        return value[index:index + 1]
    rows = []
    for s, (at, end) in enumerate(spans):
        other = partner[1][s][0] if partner is not None else at
        n = 1 if tokens == "last" else end - max(at, other)
        rows.append(value[index, at:at + n])
    return torch.cat(rows)


@EDITS.register("uce")
class UCE:
    """The closed-form cross-attention edit; `edit` returns {parameter name: new weight} and a summary."""

    def __init__(self, config):
        self.config = config

    def pairs(self, concept_variants) -> list[tuple[str, str]]:
        """(concept prompt, guide prompt) for each concept variant."""
        cfg = self.config
        guides = cfg.remap_to or [""]
        out = []
        for v in concept_variants:
            guide = guides[v.owner] if len(guides) > 1 else guides[0]
            out.append((v.prompt, guide_prompt(v.template, guide)))
        return out

    def rows(self, value, index, spans, pairs, kept) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the concepts' rows, their guides' rows, paired in order; the kept prompts' rows) of one conditioning
        tensor."""
        tokens = self.config.uce_tokens

        def of(p, partner=None):
            return token_rows(value, index[p], spans[index[p]],
                              None if partner is None else (index[partner], spans[index[partner]]), tokens)

        c = torch.cat([of(a, b) for a, b in pairs])
        g = torch.cat([of(b, a) for a, b in pairs])
        k = torch.cat([of(p) for p in kept]) if kept else c.new_zeros((0, c.shape[1]))
        return c, g, k

    @torch.no_grad()
    def edit(self, pipe, family, concept_variants, anchor_variants, device) -> tuple[dict, dict]:
        cfg = self.config
        t0 = time.perf_counter()
        pairs = self.pairs(concept_variants)
        kept = list(dict.fromkeys(v.prompt for v in anchor_variants))
        prompts = list(dict.fromkeys([p for pair in pairs for p in pair] + kept))
        index = {p: i for i, p in enumerate(prompts)}
        cond, spans = family.text_tokens(pipe, prompts, device)
        denoiser = family.denoiser(pipe)
        modules = dict(denoiser.named_modules())
        new, residual_before, residual_after = {}, 0.0, 0.0
        solved: dict[str, tuple] = {}  # per conditioning tensor: the (concept, guide, kept) rows
        for name, source in family.edit_layers(denoiser).items():
            if source not in solved:
                solved[source] = self.rows(cond[source].float().cpu(), index, spans, pairs, kept)
            c, g, k = solved[source]
            w_old = modules[name].weight
            w0 = w_old.detach().float().cpu()
            w = closed_form_weight(w0, c, g, k, regularization=cfg.uce_regularization,
                                   preserve_weight=cfg.uce_preserve_weight)
            target = g.double() @ w0.double().T
            residual_before += float((c.double() @ w0.double().T - target).square().sum())
            residual_after += float((c.double() @ w.double().T - target).square().sum())
            new[f"{name}.weight"] = w.to(w_old.device)
        summary = {"layers": len(new), "concept_prompts": len(pairs), "kept_prompts": len(kept),
                   # how far the concepts' outputs were from their guides', before and after (1 -> near 0)
                   "guide_residual": (residual_after / residual_before) ** 0.5 if residual_before > 0 else 0.0,
                   "seconds": time.perf_counter() - t0}
        return new, summary
