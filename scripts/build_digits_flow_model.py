#!/usr/bin/env python
"""Build the flow-matching digits model (`builtin:digits-flow`) on the CPU, deterministically.

    python scripts/build_digits_flow_model.py                      # writes concept_erase/digits/model-flow/
    python scripts/build_digits_flow_model.py --quick --out /tmp/f # a fast smoke build (poor quality)

The same world as the embedded SD model (`build_digits_model.py`): scikit-learn's real handwritten
digits in five renderings, the same captions, the same held-out fifth. It is an SD3-structured
pipeline (`StableDiffusion3Pipeline`): two CLIP text encoders with projections (16 wide each) and a T5
encoder (32 wide), all
seeded and frozen (fixed feature maps of the real CLIP BPE tokens; no T5 vocabulary can be had
offline, so T5 reads the CLIP tokens too), the embedded model's VAE (trained on the same renderings;
its weights are reused, not retrained), and an `SD3Transformer2DModel` trained here by flow matching:
x_s = (1 - s) x0 + s n, velocity target n - x0, s drawn as the family's schedule draws it (the
logit-normal of diffusers' SD3 training script), 10% caption dropout for classifier-free guidance, EMA.
The tokenizers read 16 tokens (the captions are at most 12), T5 too (`max_sequence_length` 16): the
text sequence is 32 tokens instead of SD3's 333, which makes training and erasure affordable on a CPU.
The judge is the embedded model's (`digits/model/judge`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from build_digits_model import SEED, batches, cosine_lr, load_ema, log, train_step  # noqa: E402  (the SD build's)
from concept_erase.digits import world as digits  # noqa: E402

TEXT_TOKENS = 16  # what each tokenizer reads: every caption of the digits world fits (at most 12 tokens)


def build_pipeline():
    """The untrained pipeline: frozen seeded encoders, the embedded model's VAE, a fresh transformer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from concept_erase.io.loading import embedded_model_dir
    from concept_erase.io.tokenizer import load_clip_tokenizer

    vae = AutoencoderKL.from_pretrained(str(embedded_model_dir("digits") / "pipeline" / "vae"))
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline decodes latents / scaling + shift
    clip = dict(vocab_size=49408, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                projection_dim=16)
    torch.manual_seed(SEED + 10)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_act="quick_gelu")).eval()
    torch.manual_seed(SEED + 11)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_act="gelu")).eval()
    torch.manual_seed(SEED + 12)
    text_encoder_3 = T5EncoderModel(T5Config(vocab_size=49408, d_model=32, d_kv=8, d_ff=128, num_layers=2,
                                             num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                             pad_token_id=49407, eos_token_id=49407, decoder_start_token_id=0)).eval()
    torch.manual_seed(SEED + 13)
    side = digits.IMAGE_SIZE // (2 ** (len(vae.config.block_out_channels) - 1))
    transformer = SD3Transformer2DModel(sample_size=side, patch_size=1, in_channels=vae.config.latent_channels,
                                        out_channels=vae.config.latent_channels, num_layers=4, attention_head_dim=16,
                                        num_attention_heads=4, caption_projection_dim=64, joint_attention_dim=32,
                                        pooled_projection_dim=32, pos_embed_max_size=side)
    tokenizer = load_clip_tokenizer(TEXT_TOKENS)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer,
                                    transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    from concept_erase.families.base import family_of

    family = family_of(pipe)
    return torch.cat([family.image_latents(pipe, images[i:i + 256] * 2 - 1) for i in range(0, len(images), 256)])


def train_transformer(pipe, latents: torch.Tensor, caption_index: torch.Tensor, captions: list[str], steps: int,
                      batch: int) -> dict:
    """Flow matching through the family's own schedule and denoiser call: the code erasure runs."""
    from concept_erase.families.base import family_of

    family = family_of(pipe)
    model = pipe.transformer
    with torch.no_grad():
        cond = family.encode(pipe, captions + [""], "cpu", digits.IMAGE_SIZE)
    uncond = len(captions)  # the last conditioning is the empty prompt
    schedule = family.schedule(pipe)
    ema = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(SEED + 14)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = cosine_lr(opt, steps, 200)
    it = batches(len(latents), batch, gen)
    model.train()
    t0 = time.time()
    for step in range(steps):
        b = next(it)
        x0 = latents[b]
        cap = caption_index[b].clone()
        cap[torch.rand(len(b), generator=gen) < 0.1] = uncond
        t = schedule.sample_timesteps(len(b), gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = F.mse_loss(family.predict(model, schedule.noised(x0, noise, t), t, cond[cap]),
                          schedule.target(x0, noise, t))
        train_step(model, loss, opt, sched, ema, step)
        if (step + 1) % 250 == 0:
            log(f"  transformer step {step + 1}/{steps} loss {loss.item():.4f} "
                f"({(time.time() - t0) / (step + 1):.3f} s/step)")
    load_ema(model, ema)
    model.eval()
    return {"steps": steps, "batch": batch, "seconds": round(time.time() - t0),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "concept_erase" / "digits" / "model-flow"))
    ap.add_argument("--quick", action="store_true", help="tiny step counts: a smoke build, not the shipped model")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.steps = 100
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from concept_erase.digits.evaluate import judge_generations
    from concept_erase.digits.model_card import write_flow_model_card
    from concept_erase.io.atomic import atomic_dir
    from concept_erase.digits.judge import load_network
    from concept_erase.io.tokenizer import write_clip_tokenizer

    started = time.time()
    train = digits.build("train")
    log(f"data: {len(train.images)} training renderings")
    pipe = build_pipeline()
    latents = encode_latents(pipe, train.images)
    captions = sorted(set(train.captions()))
    caption_index = torch.tensor([captions.index(c) for c in train.captions()])
    training = train_transformer(pipe, latents, caption_index, captions, args.steps, args.batch)
    log(f"transformer: {training}")
    log("judging the base model's generations")
    quality = judge_generations(pipe, load_network(), seeds=range(16), steps=25, guidance=4.0)
    log(f"quality: digit {quality['digit_accuracy']:.3f}, style {quality['style_accuracy']:.3f}")
    out = Path(args.out)
    with atomic_dir(out, overwrite=True) as tmp:
        # the frozen text encoders are rounded to fp16 (the model's definition) and stored in fp32, the dtype of the
        # rest, so that a plain DiffusionPipeline.from_pretrained of the folder runs as it is
        for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            part.to(torch.float16).to(torch.float32)
        pipe.save_pretrained(str(tmp / "pipeline"))
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # the CLIP BPE files (vocab.json, merges.txt),
            shutil.rmtree(tmp / "pipeline" / name)                 # the same bytes in all three: git keeps one copy
            write_clip_tokenizer(tmp / "pipeline" / name, TEXT_TOKENS)
        settings = {"seed": SEED, "steps": args.steps, "batch": args.batch, "threads": args.threads,
                    "quick": args.quick, "text_tokens": TEXT_TOKENS, "torch": torch.__version__}
        report = {"transformer": training, "base_generations": quality, "settings": settings,
                  "build_seconds": round(time.time() - started)}
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_flow_model_card(tmp / "README.md", report)
    log(f"wrote {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
