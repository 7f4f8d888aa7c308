#!/usr/bin/env python
"""Rebuild the embedded default model and its judge from scratch, on the CPU, deterministically.

    python scripts/build_digits_model.py                 # writes concept_erase/digits/model/
    python scripts/build_digits_model.py --quick --out /tmp/d   # a fast smoke build (poor quality)

Data: scikit-learn's real handwritten digits (1,797 scans), each rendered in five styles (plain,
red ink, blue ink, inverted, bold); a fixed fifth of the scans is held out for the judge's test.
Stages: the judge (CNN, digit and style heads), the VAE (AutoencoderKL), a frozen seeded CLIP text
encoder with the real CLIP tokenizer, the UNet (UNet2DConditionModel, epsilon prediction, 10%
caption dropout for classifier-free guidance, EMA). Then the base model's generations are judged
and the model card is written with what was measured. Same seed, same machine and thread count:
the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from concept_erase.digits import world as digits  # noqa: E402
from concept_erase.digits.judge import DigitsClassifier  # noqa: E402

SEED = 20261123


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(opt, total: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def batches(n: int, size: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - size + 1, size):
            yield perm[i : i + size]


def train_step(model, loss, opt, sched, ema: dict, step: int) -> None:
    """One step of the model builds: backward, gradient norm clipped to 1, AdamW, the lr schedule, then the
    EMA of the weights (decay warming up to 0.999)."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for n, p in model.named_parameters():
            ema[n].lerp_(p.detach(), 1 - decay)


@torch.no_grad()
def load_ema(model, ema: dict) -> None:
    for n, p in model.named_parameters():
        p.copy_(ema[n])


def train_judge(train: digits.DigitsData, test: digits.DigitsData, epochs: int) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(SEED)
    judge = DigitsClassifier()
    gen = torch.Generator().manual_seed(SEED)
    steps = epochs * (len(train.images) // 128)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = cosine_lr(opt, steps, 50)
    it = batches(len(train.images), 128, gen)
    for step in range(steps):
        b = next(it)
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()  # generations are not centred exactly
        x = torch.roll(train.images[b], shifts=shift, dims=(2, 3))
        d, s = judge(x)
        loss = F.cross_entropy(d, train.digits[b]) + F.cross_entropy(s, train.styles[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    judge.eval()
    pd, ps = judge.predict(test.images)
    plain = test.styles == 0
    metrics = {"heldout_digit_accuracy": float((pd == test.digits).float().mean()),
               "heldout_digit_accuracy_plain": float((pd[plain] == test.digits[plain]).float().mean()),
               "heldout_style_accuracy": float((ps == test.styles).float().mean()),
               "heldout_images": len(test.images), "steps": steps}
    return judge, metrics


def train_vae(train: digits.DigitsData, test: digits.DigitsData, steps: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=digits.IMAGE_SIZE)
    gen = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = cosine_lr(opt, steps, 50)
    it = batches(len(train.images), 64, gen)
    for step in range(steps):
        x = train.images[next(it)] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(f"  vae step {step + 1}/{steps} loss {loss.item():.5f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(train.images[i : i + 256] * 2 - 1).latent_dist.mean
                           for i in range(0, len(train.images), 256)])
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        xt = test.images[:512] * 2 - 1
        rec = vae.decode(vae.encode(xt).latent_dist.mean).sample
        metrics = {"heldout_reconstruction_mse": float(F.mse_loss(rec, xt)), "scaling_factor": scaling, "steps": steps}
    return vae, means * scaling, metrics


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED + 2)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config).eval()


@torch.no_grad()
def encode(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(latents: torch.Tensor, caption_index: torch.Tensor, embeddings: torch.Tensor, steps: int,
               batch: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(SEED + 3)
    unet = UNet2DConditionModel(
        sample_size=latents.shape[-1], in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=embeddings.shape[-1],
        attention_head_dim=4, norm_num_groups=8)
    ema = {n: p.detach().clone() for n, p in unet.named_parameters()}
    noise_sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000)
    abar = noise_sched.alphas_cumprod
    gen = torch.Generator().manual_seed(SEED + 3)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = cosine_lr(opt, steps, 200)
    it = batches(len(latents), batch, gen)
    uncond = len(embeddings) - 1  # the last embedding is the empty prompt
    t0 = time.time()
    for step in range(steps):
        b = next(it)
        x0 = latents[b]
        cap = caption_index[b].clone()
        cap[torch.rand(len(b), generator=gen) < 0.1] = uncond
        t = torch.randint(0, 1000, (len(b),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=embeddings[cap]).sample, noise)
        train_step(unet, loss, opt, sched, ema, step)
        if (step + 1) % 500 == 0:
            log(f"  unet step {step + 1}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1):.3f} s/step)")
    load_ema(unet, ema)
    return unet.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "concept_erase" / "digits" / "model"))
    ap.add_argument("--quick", action="store_true", help="tiny step counts: a smoke build, not the shipped model")
    ap.add_argument("--unet-steps", type=int, default=8000)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--judge-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.unet_steps, args.vae_steps, args.judge_epochs = 200, 100, 1
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from concept_erase.io.atomic import atomic_dir
    from concept_erase.digits.evaluate import judge_generations
    from concept_erase.digits.model_card import write_model_card
    from concept_erase.io.tokenizer import load_clip_tokenizer

    started = time.time()
    train, test = digits.build("train"), digits.build("test")
    log(f"data: {len(train.images)} training and {len(test.images)} held-out renderings")

    judge, judge_metrics = train_judge(train, test, args.judge_epochs)
    log(f"judge: {judge_metrics}")
    vae, latents, vae_metrics = train_vae(train, test, args.vae_steps)
    log(f"vae: {vae_metrics}")

    tokenizer = load_clip_tokenizer()
    text_encoder = build_text_encoder()
    captions = sorted(set(train.captions()))
    embeddings = torch.cat([encode(text_encoder, tokenizer, captions), encode(text_encoder, tokenizer, [""])])
    caption_index = torch.tensor([captions.index(c) for c in train.captions()])
    unet = train_unet(latents, caption_index, embeddings, args.unet_steps, batch=64)

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    log("judging the base model's generations")
    quality = judge_generations(pipe, judge, seeds=range(16), steps=25, guidance=4.0)
    log(f"quality: digit {quality['digit_accuracy']:.3f}, style {quality['style_accuracy']:.3f}")

    out = Path(args.out)
    with atomic_dir(out, overwrite=True) as tmp:
        pipe.save_pretrained(str(tmp / "pipeline"))
        judge.save_pretrained(str(tmp / "judge"))
        settings = {"seed": SEED, "unet_steps": args.unet_steps, "vae_steps": args.vae_steps,
                    "judge_epochs": args.judge_epochs, "threads": args.threads, "quick": args.quick,
                    "torch": torch.__version__}
        report = {"judge": judge_metrics, "vae": vae_metrics, "base_generations": quality, "settings": settings,
                  "build_seconds": round(time.time() - started)}
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_model_card(tmp / "README.md", report)
    log(f"wrote {out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
