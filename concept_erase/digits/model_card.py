"""The embedded model's card: what it was trained on, how, and what was measured."""

from __future__ import annotations

from pathlib import Path

from concept_erase.digits.world import DIGIT_NAMES, STYLE_WORDS, caption


def write_model_card(path: Path, report: dict) -> None:
    q, j, v, s = report["base_generations"], report["judge"], report["vae"], report["settings"]
    styles = "\n".join(f"| {name} | `{caption(7, name)}` |" for name in STYLE_WORDS)
    per_digit = " · ".join(f"{d} {q['per_digit'][d]:.0%}" for d in DIGIT_NAMES)
    quick = "\n> **Smoke build (`--quick`)**: too few steps; quality below is not the shipped model's.\n" if s["quick"] else ""
    text = f"""# digits-sd: the embedded default model of concept-erase
{quick}
A small text-to-image model in the exact diffusers Stable Diffusion format (`StableDiffusionPipeline`:
`UNet2DConditionModel`, `AutoencoderKL`, `CLIPTextModel` with the real CLIP BPE tokenizer, DDIM
scheduler), trained on real data, so that every code path of concept-erase runs on a 2-core CPU in
minutes. Load it with `concept_erase.load_pipeline("builtin:digits")` or
`StableDiffusionPipeline.from_pretrained("<this folder>/pipeline")`.

## Data
scikit-learn's handwritten digits (`sklearn.datasets.load_digits`): 1,797 real 8x8 scans, 10
classes, upsampled bicubically to 32x32. Every scan is rendered in each of five styles, so every
image carries one style (or none). A fixed fifth of the scans (seed 1234) is held out: the judge's
test set; neither model saw it.

| style | caption of a seven |
|---|---|
{styles}

Objects: the ten digits ({", ".join(DIGIT_NAMES)}).

## Training (seed {s['seed']}, {s['threads']} CPU threads, torch {s['torch']}, {report['build_seconds']} s in all)
- VAE: AutoencoderKL, 3 levels (16, 32, 32 channels), 4x8x8 latents, {v['steps']} steps of MSE + 1e-6 KL;
  scaling factor {v['scaling_factor']:.4f}; held-out reconstruction MSE {v['heldout_reconstruction_mse']:.5f} (images in [-1, 1]).
- Text encoder: a 2-layer CLIP text transformer (width 32), seeded and frozen: a fixed feature map
  of the real CLIP tokens, not trained.
- UNet: 2 levels (32, 64 channels), cross-attention in both, epsilon prediction, SD's scaled-linear
  betas, {s['unet_steps']} steps at batch 64, AdamW 1e-3 with cosine decay, 10% caption dropout
  (for classifier-free guidance), EMA 0.999 (the shipped weights).
- Rebuild: `python scripts/build_digits_model.py` (deterministic for the same machine and thread count).

## The judge (`judge/`)
A CNN with a digit head and a style head, trained on the training renderings ({j['steps']} steps).
Held-out accuracy: digit {j['heldout_digit_accuracy']:.2%} (plain style only: {j['heldout_digit_accuracy_plain']:.2%}),
style {j['heldout_style_accuracy']:.2%}, over {j['heldout_images']} held-out renderings. Its 128-d
penultimate features give the *domain FID* of the reports: **not** the standard Inception FID.

## Measured quality of the base model
The judge on the base model's generations: every (digit, style) prompt, {q['seeds']} seeds each
({q['images']} images), DDIM {q['steps']} steps, guidance {q['guidance']}:
- prompted digit recognised: **{q['digit_accuracy']:.1%}** (bar: 85%)
- prompted style recognised: **{q['style_accuracy']:.1%}** (bar: 85%)
- per digit: {per_digit}

Figures from `build_report.json`, written by the build that produced these weights.
"""
    path.write_text(text, encoding="utf-8")
