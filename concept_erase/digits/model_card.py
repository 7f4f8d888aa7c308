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


def write_flow_model_card(path: Path, report: dict) -> None:
    """The card of the flow-matching digits model (`builtin:digits-flow`)."""
    q, t, s = report["base_generations"], report["transformer"], report["settings"]
    per_digit = " · ".join(f"{d} {q['per_digit'][d]:.0%}" for d in DIGIT_NAMES)
    quick = "\n> **Smoke build (`--quick`)**: too few steps; quality below is not the shipped model's.\n" if s["quick"] else ""
    text = f"""# digits-flow: the flow-matching digits model of concept-erase
{quick}
A small text-to-image model in the exact diffusers Stable Diffusion 3 format (`StableDiffusion3Pipeline`:
`SD3Transformer2DModel`, `AutoencoderKL`, two `CLIPTextModelWithProjection` and a `T5EncoderModel`,
`FlowMatchEulerDiscreteScheduler`), trained on the same real data as the embedded SD model
(`builtin:digits`), so that erasure from a flow-matching transformer runs, and is judged, on a 2-core
CPU. Load it with `concept_erase.load_pipeline("builtin:digits-flow")` or
`StableDiffusion3Pipeline.from_pretrained("<this folder>/pipeline")`; outside concept-erase pass
`max_sequence_length={s['text_tokens']}` to the pipeline (it was trained with T5 reading {s['text_tokens']} tokens).

## Data
The digits world of the embedded model: scikit-learn's 1,797 real 8x8 handwritten digit scans,
upsampled to 32x32, each rendered in five styles (plain, red ink, blue ink, inverted, bold), captioned
as `a handwritten digit seven in red ink`. The same fixed fifth of the scans is held out.

## Training (seed {s['seed']}, {s['threads']} CPU threads, torch {s['torch']}, {report['build_seconds']} s in all)
- VAE: the embedded SD model's (trained on the same renderings), reused as it is; `shift_factor` 0.
- Text encoders: two 2-layer CLIP text transformers (width 16, projections 16) and a 2-layer T5 encoder
  (width 32), seeded and frozen, stored in fp16: fixed feature maps of the real CLIP BPE tokens (no T5
  vocabulary can be had offline: T5 reads the CLIP tokens). Each tokenizer reads {s['text_tokens']} tokens.
- Transformer: `SD3Transformer2DModel`, 4 joint blocks, width 64 (4 heads of 16), patch 1 on 4x8x8
  latents, {t['parameters']:,} parameters. Flow matching: x_s = (1 - s) x0 + s n, velocity target
  n - x0, s logit-normal (as diffusers' SD3 training script draws it), scheduler shift 1.0. {t['steps']}
  steps at batch {t['batch']}, AdamW 1e-3 with cosine decay, 10% caption dropout, EMA 0.999 (the
  shipped weights), {t['seconds']} s.
- Rebuild: `python scripts/build_digits_flow_model.py` (deterministic for the same machine and thread count).

## The judge
The embedded model's (`digits/model/judge`): a CNN with a digit head and a style head.

## Measured quality of the base model
The judge on the base model's generations: every (digit, style) prompt, {q['seeds']} seeds each
({q['images']} images), flow-matching Euler {q['steps']} steps, guidance {q['guidance']}:
- prompted digit recognised: **{q['digit_accuracy']:.1%}** (bar: 85%)
- prompted style recognised: **{q['style_accuracy']:.1%}** (bar: 85%)
- per digit: {per_digit}

Figures from `build_report.json`, written by the build that produced these weights.
"""
    path.write_text(text, encoding="utf-8")
