"""SD-scale check: the toolkit on pipelines shaped like SD 1.5, SD 2.1 and SDXL, with random weights.

No download: the UNet is diffusers' own default UNet2DConditionModel config (SD 1.x's layout) with
SD 1.5's or SD 2.1's cross-attention settings, the VAE is SD's four-level AutoencoderKL, the text
encoder a CLIP text model of SD 1.5's size (768 wide, 12 layers) or SD 2.1's OpenCLIP-H size (1024
wide, 23 layers), and SD 2.1 is v-prediction. SDXL is SDXL base 1.0's configuration (a 2.6B UNet with
text-time conditioning, CLIP ViT-L and OpenCLIP bigG-sized text encoders, SD's VAE). Random weights
prove shapes, memory, formats and time per step, not image quality.

SD3 is SD3-medium's configuration without T5 (`sd3`); FLUX.1-dev's at full width with 1 joint + 2 single
blocks (`flux-1`) or 2 + 4 (`flux-2`): the difference is one nineteenth of the whole model's blocks, from
which its memory is extrapolated (the 12B model does not fit this machine).

On SDXL, SD3 and FLUX (`--models sdxl --resolution 256`) it runs the family's recipes
(`pipelines/{sdxl,sd3,flux}-*.yaml`) for 2 steps, every other method on xattn for one, a LoRA run, a
plain fine-tuning step of xattn and of LoRA, and every export. On SDXL it runs `pipelines/sdxl-style-vangogh.yaml` for 2 steps,
every other method on the same subset for one, a LoRA run, a plain fine-tuning step of xattn and of
LoRA, and every export.

On each model it runs every shipped `pipelines/sd15-*.yaml` recipe for 2 steps at --resolution 128
under bf16, then every other method and every other --train subset for one step each (full: two), and
a plain fine-tuning step of each subset as the memory yardstick, each in a process of its own. It
reports load, anchor-generation and step times, peak memory (the process's peak resident size above
its size once the model was loaded; through the steps, before the final save), checkpoint size on
disk, and exports every format, reading each back with diffusers' own readers. A run cut short
continues from OUTPUT/{kind}-partial.json; run folders are deleted once measured.

Stays out of CI (too heavy). Usage:
    python scripts/scale_check.py --output runs/scale [--models sd15,sd21]
To save time on a CPU, the recipes' sampling lengths are cut (trajectory
--sampling-steps 4, anchors --anchor-inference-steps 2 with 2 images per prompt); the rest of each
recipe is as shipped. Writes OUTPUT/scale.json and OUTPUT/scale.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CUT = {"sampling_steps": 4, "anchor_inference_steps": 2, "anchor_images_per_prompt": 2}
METHODS = ["eupmu", "eupmu-fast", "ungrad", "fixed", "esd"]
RESOLUTION = 128
SUBSETS = ["xattn", "xattn-kv", "noxattn", "selfattn", "full", "lora"]
ONLY: set[str] = set()  # --only: the measurements to make (labels); empty: all
EXPORTS = True  # --no-exports: skip them (the whole FLUX's exports would write 48 GB)


XL_KINDS = ("sdxl", "tiny-xl")
# FLUX.1-dev at full width with a few blocks (FLUX.1 has 19 joint and 38 single blocks: the whole 12B model
# does not fit this machine): flux-1 has 1 joint + 2 single, flux-2 has 2 + 4. The difference is the cost of
# one nineteenth of the model's blocks, from which the whole model is extrapolated.
FLUX_BLOCKS = {"flux-1": (1, 2), "flux-2": (2, 4), "flux": (19, 38)}  # flux: the whole model (a GPU's)
FLOW_TINY = ("tiny-flux", "tiny-sd3")


def _clip(width: int, layers: int, heads: int, act: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, hidden_act=act, projection_dim=width, max_position_embeddings=77,
                            vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _flow_vae(sample_size: int):
    """SD3's and FLUX.1's VAE: SD's four levels with 16 latent channels and a shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=sample_size, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609 if sample_size == 1024 else 0.1159,
                         scaling_factor=1.5305 if sample_size == 1024 else 0.3611)


def build_sd3():
    """An SD3-medium-shaped pipeline (its published configs: a 2B MM-DiT of 24 joint blocks, 1536 wide, CLIP
    ViT-L and OpenCLIP bigG-sized encoders). Without T5: T5-XXL (4.7B parameters, 19 GB in fp32) does not fit
    beside it here, and SD3 runs without it (`text_encoder_3=None`: the pipeline's zeros take T5's 256
    tokens), which is also what a user short of memory does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from concept_erase.io.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=192)
    tok = load_clip_tokenizer()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_flow_vae(1024),
        text_encoder=_clip(768, 12, 12, "quick_gelu", True), tokenizer=tok,
        text_encoder_2=_clip(1280, 32, 20, "gelu", True), tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None,
        transformer=transformer)


def build_flux(joint: int, single: int):
    """FLUX.1-dev's configuration at full width (3072, 24 heads of 128, guidance input, 64 packed channels)
    with `joint` joint and `single` single blocks; CLIP ViT-L for the pooled embedding; a T5 at XXL's width
    (4096) with 2 of its 24 layers (the prompts' embeddings are made once, before training: T5's size only
    moves the loaded model's baseline, not the training peak measured above it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from concept_erase.io.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=joint, num_single_layers=single,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=49407,
                                 eos_token_id=49407, decoder_start_token_id=0))
    tok = load_clip_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=_flow_vae(1024), text_encoder=_clip(768, 12, 12, "quick_gelu", False),
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok, transformer=transformer)


def build_sdxl():
    """An SDXL-base-1.0-shaped pipeline with seeded random weights (its published configs' numbers)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from concept_erase.io.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048)
    common = dict(max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **common))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    tok = load_clip_tokenizer()
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=scheduler)


def build(kind: str):
    """An SD-1.5-, SD-2.1- or SDXL-shaped pipeline with seeded random weights, from configs."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from concept_erase.io.tokenizer import load_clip_tokenizer

    torch.manual_seed(0)
    if kind == "tiny":  # a dry run of this script in a minute
        from concept_erase.io.tiny import build_tiny_pipeline

        return build_tiny_pipeline()
    if kind == "tiny-xl":
        from concept_erase.io.tiny import build_tiny_sdxl_pipeline

        return build_tiny_sdxl_pipeline()
    if kind == "sdxl":
        return build_sdxl()
    if kind == "sd3":
        return build_sd3()
    if kind in FLUX_BLOCKS:
        if kind == "flux":  # the whole 12B model is built and saved in bf16 (24 GB, as FLUX.1-dev ships)
            torch.set_default_dtype(torch.bfloat16)
            try:  # initialised on the GPU where there is one: minutes faster than 12B random draws on a CPU
                with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                    return build_flux(*FLUX_BLOCKS[kind]).to("cpu")
            finally:
                torch.set_default_dtype(torch.float32)
        return build_flux(*FLUX_BLOCKS[kind])
    if kind in FLOW_TINY:
        import concept_erase.io.tiny as tiny

        return getattr(tiny, f"build_{kind.replace('-', '_')}_pipeline")()
    if kind == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
        prediction = "epsilon"
    else:  # SD 2.1: linear projections, per-level head dims, OpenCLIP-H text encoder, v-prediction at 768
        unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
        text = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                              max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512)
        prediction = "v_prediction"
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512 if kind == "sd15" else 768)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=CLIPTextModel(text), tokenizer=load_clip_tokenizer(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def rss_kb(field: str) -> int:
    from concept_erase.bench.memory import _rss_kb  # the benchmark's memory probe reads the same fields

    return _rss_kb(field)


def reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return rss_kb("VmRSS")


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Timeline:
    """Collects the trainer's log lines with the time they came."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.lines: list[tuple[float, str]] = []

    def __call__(self, message: str) -> None:
        self.lines.append((time.perf_counter() - self.t0, message))
        if message.startswith("device:"):  # the model is loaded: what the run adds is measured from here
            self.rss_loaded = reset_peak()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.cuda_loaded = torch.cuda.memory_allocated()
        print(f"    {message}", flush=True)


def in_child(kind: str, *args, **kwargs) -> dict:
    """Run one measurement in a fresh process: its memory peak is its own, not inflated or hidden by what
    an earlier run in the same process left allocated."""
    import subprocess

    spec = json.dumps({"kind": kind, "args": [str(a) for a in args], "kwargs": kwargs})
    proc = subprocess.run([sys.executable, __file__, "--child", spec, "--resolution", str(RESOLUTION)],
                          stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    if proc.returncode:
        print("\n".join(lines[-1:]), flush=True)
        raise SystemExit(f"the {kind} measurement failed (exit {proc.returncode}); its output is above")
    return json.loads(lines[-1])


def child(spec: str) -> int:
    spec = json.loads(spec)
    args = spec["args"]
    if spec["kind"] == "run":
        result = run_one(Path(args[0]), json.loads(args[1]), Path(args[2]), Path(args[3]), args[4], **spec["kwargs"])
    elif spec["kind"] == "edit":
        result = edit_one(Path(args[0]), json.loads(args[1]), Path(args[2]), args[3])
    else:
        result = plain_one(Path(args[0]), args[1], args[2])
    print(json.dumps(result), flush=True)
    return 0


def _first_call(line: str) -> bool:
    """The trainer's line timing the first denoiser call ("first UNet2DConditionModel call (...)")."""
    return line.startswith("first ") and " call (" in line


def run_one(model_dir: Path, settings: dict, out: Path, cache: Path, label: str, steps: int = 2) -> dict:
    from concept_erase.config import build_config
    from concept_erase.training.trainer import Trainer

    # a recipe's erasure-signal check every step (it draws no image): the stop's code runs on every model
    settings = {**settings, **CUT, "model": str(model_dir), "output": str(out), "steps": steps, "resolution": RESOLUTION,
                "check_every": 1,
                "mixed_precision": "bf16", "cache_dir": str(cache), "progress": False, "overwrite": True,
                "checkpoint_every": 0}  # the final checkpoint only: the step peak is read before it
    cfg = build_config(settings, {}, source=label)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    timeline = Timeline()
    trainer.log = timeline
    stamps: list[float] = []
    step_peaks: list[int] = []  # the peak through each step, before the run's final save

    cuda_peaks: list[int] = []  # on a GPU: the allocator's peak since the model was loaded

    def on_step(done, tr):
        stamps.append(time.perf_counter())
        step_peaks.append(rss_kb("VmHWM"))
        if torch.cuda.is_available():
            cuda_peaks.append(torch.cuda.max_memory_allocated())

    trainer.on_step = on_step
    trainer.run()
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loaded = next((t for t, m in timeline.lines if m.startswith("device:")), None)
    first_call = next((t for t, m in timeline.lines if _first_call(m)), None)
    ckpt = sorted((out / "checkpoints").glob("step-*"))[-1]
    result = {"label": label, "method": cfg.method, "train": cfg.train, "total_s": round(total, 1),
              "load_s": round(loaded, 1) if loaded is not None else None,
              "setup_s": round(stamps[0] - t0 - rows[0]["step_time_s"], 1),
              "first_step_s": round(rows[0]["step_time_s"], 1), "second_step_s": round(rows[1]["step_time_s"], 1) if len(rows) > 1 else None,
              "peak_extra_mb": round((rss_kb("VmHWM") - timeline.rss_loaded) / 1024),
              "step_peak_extra_mb": round((step_peaks[-1] - timeline.rss_loaded) / 1024),
              "peak_mb": round(rss_kb("VmHWM") / 1024), "loaded_mb": round(timeline.rss_loaded / 1024),
              "checkpoint_mb": round(folder_bytes(ckpt) / 2**20),
              "delta_mb": round((out / "erased.safetensors").stat().st_size / 2**20, 1),
              "estimate": next((m for _, m in timeline.lines if _first_call(m)), ""),
              "first_call_at_s": round(first_call, 1) if first_call is not None else None,
              "trained_mb": round(sum(p.numel() for p in trainer.trained.values()) * 4 / 2**20)}
    if cuda_peaks:
        result.update(cuda_loaded_mb=round(timeline.cuda_loaded / 2**20), cuda_peak_mb=round(cuda_peaks[-1] / 2**20),
                      gpu=torch.cuda.get_device_name())
    del trainer
    gc.collect()
    return result


def edit_one(model_dir: Path, settings: dict, out: Path, label: str) -> dict:
    """A closed-form edit (--method uce): its time, its memory above the loaded model, the size of what it keeps."""
    from concept_erase.config import build_config, settings_for
    from concept_erase.training.edit_run import EditRun

    settings = settings_for(settings, "uce")
    settings.update(model=str(model_dir), output=str(out), method="uce", mixed_precision="bf16", progress=False,
                    overwrite=True)
    cfg = build_config(settings, {}, source=label)
    t0 = time.perf_counter()
    run = EditRun(cfg)
    timeline = Timeline()
    run.log = timeline
    run.run()
    total = time.perf_counter() - t0
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loaded = next((t for t, m in timeline.lines if m.startswith("device:")), None)
    extra = round((rss_kb("VmHWM") - timeline.rss_loaded) / 1024)
    delta = (out / "erased.safetensors").stat().st_size
    return {"label": label, "method": "uce", "train": run.family.edit_subset, "total_s": round(total, 1),
            "load_s": round(loaded, 1) if loaded is not None else None,
            "setup_s": round(total - (loaded or 0) - row["step_time_s"], 1), "first_step_s": round(row["step_time_s"], 1),
            "second_step_s": None, "peak_extra_mb": extra, "step_peak_extra_mb": extra,
            "peak_mb": round(rss_kb("VmHWM") / 1024), "loaded_mb": round(timeline.rss_loaded / 1024),
            "checkpoint_mb": 0, "delta_mb": round(delta / 2**20, 1), "trained_mb": round(delta / 2**20)}


def plain_one(model_dir: Path, subset: str, label: str) -> dict:
    """A plain denoising fine-tuning step of the same subset and batch, under bf16: the memory yardstick."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from concept_erase.io.loading import load_pipeline
    from concept_erase.training.subsets import select_trainable

    from concept_erase.families.base import family_of
    from concept_erase.io.digests import tensor_digest

    pipe = load_pipeline(str(model_dir))
    family = family_of(pipe)
    unet = family.denoiser(pipe)
    tensor_digest(unet.state_dict())  # as the trainer does before its "device:" line: the weights are read in
    device = "cuda" if torch.cuda.is_available() else "cpu"
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16")
    trained = select_trainable(unet, subset, family, lora_rank=8, lora_alpha=8)
    ids = {id(p) for p in trained.values()}
    for p in unet.parameters():
        if id(p) not in ids:
            p.data = p.data.to(torch.bfloat16)
    for encoder in family.text_encoders(pipe):
        encoder.to(torch.bfloat16)
    pipe.to(device)
    n = 3  # forget batch 1 + retain batch 2, as the recipes
    with torch.no_grad(), acc.autocast():
        cond = family.encode(pipe, ["a painting"], device, RESOLUTION).repeat(n)
    if device == "cuda":  # as the trainer does once the prompts are encoded
        for encoder in family.text_encoders(pipe):
            encoder.to("cpu")
        pipe.vae.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base = reset_peak()  # measured from the loaded model in its training precision, as the runs are
    opt = torch.optim.AdamW(list(trained.values()), lr=1e-5)
    schedule = family.schedule(pipe)
    shape = (n, *family.latent_shape(pipe, RESOLUTION))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    from concept_erase.training.hardware import no_cudnn_attention

    with no_cudnn_attention():  # as the trainer trains (cuDNN's attention backward failed on an H200: README)
        for _ in range(2):
            x0 = torch.randn(shape, generator=g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = schedule.sample_timesteps(n, g).to(device)
            with acc.autocast():
                pred = family.predict(unet, schedule.noised(x0, noise, t), t, cond)
            torch.nn.functional.mse_loss(pred.float(), schedule.target(x0, noise, t).float()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    out = {"label": label, "method": "plain", "train": subset, "total_s": round(time.perf_counter() - t0, 1),
           "peak_extra_mb": round((rss_kb("VmHWM") - base) / 1024), "peak_mb": round(rss_kb("VmHWM") / 1024),
           "loaded_mb": round(base / 1024), "trained_mb": round(sum(p.numel() for p in trained.values()) * 4 / 2**20)}
    if device == "cuda":
        out.update(cuda_loaded_mb=round(cuda_base / 2**20), cuda_peak_mb=round(torch.cuda.max_memory_allocated() / 2**20))
    del pipe, unet, opt, trained
    gc.collect()
    return out


def check_exports(kind: str, model_dir: Path, run: Path, lora_run: Path, work: Path) -> list[dict]:
    """Every export of an xattn run (and the LoRA run's), read back with diffusers' own readers."""
    import diffusers

    from concept_erase.errors import UserError
    from concept_erase.export.delta import read_delta
    from concept_erase.export.formats import export_diffusers, export_lora, export_single_file
    from concept_erase.io.loading import left_out_parts

    from concept_erase.families.base import family_for_class

    name = json.loads((model_dir / "model_index.json").read_text())["_class_name"]
    pipeline_class = getattr(diffusers, name)  # StableDiffusionPipeline, StableDiffusionXLPipeline, ...
    part = family_for_class(name).denoiser_name  # unet or transformer

    from safetensors import safe_open

    # the base denoiser's tensors read one at a time: SDXL's whole fp32 UNet (10 GB) beside a loaded pipeline
    # (14 GB) would not fit this machine
    files = [safe_open(str(f), "pt") for f in sorted((model_dir / part).glob("*.safetensors"))]
    where = {k: f for f in files for k in f.keys()}
    tensors, _ = read_delta(run)
    out = []

    def differing(state: dict) -> set:
        return {n for n, v in state.items() if n in where and not torch.equal(v.float(), where[n].get_tensor(n).float())}

    t0 = time.perf_counter()
    folder = export_diffusers(run, work / "diffusers", overwrite=True)
    # read as a user would, passing the parts the folder leaves out (SD3 without T5) as None
    back = getattr(pipeline_class.from_pretrained(str(folder), **{k: None for k in left_out_parts(folder)}),
                   part).state_dict()
    diff = differing(back)
    out.append({"format": "diffusers", "seconds": round(time.perf_counter() - t0, 1), "mb": round(folder_bytes(folder) / 2**20),
                "reader": f"{name}.from_pretrained", "only_trained_differ": diff == set(tensors),
                "differing": len(diff), "trained": len(tensors)})
    shutil.rmtree(folder)
    t0 = time.perf_counter()
    try:
        path = export_single_file(run, work / "single.safetensors", overwrite=True)
        back = getattr(pipeline_class.from_single_file(str(path), config=str(model_dir)), part).state_dict()
        diff = differing(back)
        out.append({"format": "single-file", "seconds": round(time.perf_counter() - t0, 1),
                    "mb": round(path.stat().st_size / 2**20), "reader": f"{name}.from_single_file",
                    "only_trained_differ": diff == set(tensors), "differing": len(diff), "trained": len(tensors)})
        path.unlink()
    except UserError as err:
        out.append({"format": "single-file", "refused": str(err)})
    for name, source in (("lora (factored xattn run)", run), ("lora (LoRA run)", lora_run)):
        t0 = time.perf_counter()
        summary = export_lora(source, work / "lora", overwrite=True)
        pipe = pipeline_class.from_pretrained(str(model_dir), **{k: None for k in left_out_parts(model_dir)})
        pipe.load_lora_weights(str(work / "lora"), weight_name=summary["file"])
        out.append({"format": name, "seconds": round(time.perf_counter() - t0, 1),
                    "mb": round(folder_bytes(work / "lora") / 2**20, 1), "reader": "load_lora_weights",
                    **{k: v for k, v in summary.items() if k != "dropped"}, "dropped": len(summary.get("dropped", []))})
        del pipe
        shutil.rmtree(work / "lora")
    return out


def _progress(root: Path, kind: str, rows: list) -> None:
    """Each finished run is written at once: a check cut short keeps what it measured."""
    (root / f"{kind}-partial.json").write_text(json.dumps(rows, indent=2))
    print(f"    result: {json.dumps(rows[-1])}", flush=True)


def check_model(kind: str, root: Path) -> dict:
    print(f"== {kind}: building the pipeline from configs", flush=True)
    t0 = time.perf_counter()
    model_dir = root / f"{kind}-model"
    if not (model_dir / "model_index.json").is_file():
        pipe = build(kind)
        pipe.save_pretrained(str(model_dir))
        del pipe
        gc.collect()
    built = time.perf_counter() - t0
    from concept_erase.config import load_yaml

    cache = root / f"{kind}-cache"
    partial = root / f"{kind}-partial.json"
    done = {r["label"]: r for r in json.loads(partial.read_text())} if partial.is_file() else {}
    if done:
        print(f"== {kind}: continuing; {len(done)} measurement(s) already in {partial}", flush=True)
    results: list = []
    from concept_erase.families.base import family_for_class

    family = family_for_class(json.loads((model_dir / "model_index.json").read_text())["_class_name"]).name
    xl = family != "sd"  # the larger families: the attention subsets and LoRA only
    prefix = {"sd": "sd15"}.get(family, family)  # the recipes' file names: pipelines/{prefix}-*.yaml
    # the exports read these two runs: an xattn run and a LoRA run
    xattn_run, lora_run = {"sd": ("sd15-style-vangogh", "sd15-object-church"),
                           "flux": ("eupmu-xattn", "flux-style-vangogh")}.get(family, (f"{prefix}-style-vangogh",
                                                                                    "eupmu-lora"))
    keep = {xattn_run, lora_run}

    def measure(label: str, settings: dict, folder: str, steps: int = 2, **extra) -> None:
        if ONLY and label not in ONLY:
            return
        if label in done and (label not in keep or (root / f"{kind}-{folder}").is_dir()):  # the exports read keep's
            results.append(done[label])
            return
        print(f"== {kind}: {label}", flush=True)
        out = root / f"{kind}-{folder}"
        results.append({**in_child("run", model_dir, json.dumps(settings), out, cache, label, steps=steps), **extra})
        if label not in keep:  # a full-UNet checkpoint is 10 GB: only the measurement is kept
            shutil.rmtree(out, ignore_errors=True)
        _progress(root, kind, results)

    recipes = sorted((ROOT / "pipelines").glob(f"{prefix}-*.yaml"))
    for recipe in recipes:
        settings = load_yaml(recipe)
        settings.pop("model", None)
        measure(recipe.stem, settings, recipe.stem, recipe=recipe.name)
    xattn = {**load_yaml(ROOT / "pipelines" / f"{prefix}-style-vangogh.yaml"), "train": "xattn"}
    xattn.pop("model", None)
    if family == "flux":  # its recipe trains LoRA: the xattn run the exports read is measured here
        measure(xattn_run, xattn, xattn_run, steps=2)
    for method in METHODS[1:]:
        measure(method, {**xattn, "method": method}, f"m-{method}", steps=1)
    if not ONLY or "uce" in ONLY:  # the closed-form edit: seconds, no step
        print(f"== {kind}: uce", flush=True)
        results.append(done.get("uce") or in_child("edit", model_dir, json.dumps(xattn), root / f"{kind}-uce", "uce"))
        shutil.rmtree(root / f"{kind}-uce", ignore_errors=True)
        _progress(root, kind, results)
    if xl:  # SDXL, SD3, FLUX: the attention subsets and LoRA (the full denoiser is 10 GB of fp32 and more here)
        if family != "flux":  # FLUX's LoRA run is its recipe's
            measure(lora_run, {**xattn, "train": "lora", "lr": 1e-4, "lora_rank": 8, "lora_alpha": 8}, lora_run,
                    steps=2)
    else:
        for subset in ("xattn-kv", "selfattn", "full"):
            # full: two steps, for the optimizer's states exist from the second step on (AdamW makes them
            # lazily in the first): only then does UNGrad's second gradient add to the peak.
            measure(f"eupmu {subset}", {**xattn, "train": subset}, f"s-{subset}", steps=2 if subset == "full" else 1)
        measure("ungrad full", {**xattn, "method": "ungrad", "train": "full"}, "ungrad-full", steps=2)
    for subset in (("xattn", "lora") if xl else SUBSETS):
        label = f"plain {subset}"
        if ONLY and label not in ONLY:
            continue
        if label in done:
            results.append(done[label])
            continue
        print(f"== {kind}: plain fine-tuning of {subset}", flush=True)
        results.append(in_child("plain", model_dir, subset, label))
        _progress(root, kind, results)
    runs = [r for r in results if r["method"] != "plain"]
    plains = [r for r in results if r["method"] == "plain"]
    exports = []
    if EXPORTS and all((root / f"{kind}-{label}").is_dir() for label in keep):
        print(f"== {kind}: exports", flush=True)
        exports = check_exports(kind, model_dir, root / f"{kind}-{xattn_run}", root / f"{kind}-{lora_run}",
                                root / f"{kind}-exports")
    for label in keep:
        shutil.rmtree(root / f"{kind}-{label}", ignore_errors=True)
    carried = round(sum(r.get("total_s", 0) for label, r in done.items()), 1)
    return {"model": kind, "build_s": round(built, 1), "runs": runs, "plain": plains, "exports": exports,
            "carried_over": len(done), "carried_s": carried}


def report(results: list[dict], command: str) -> str:
    runs = "; ".join(f"{r['model']}: `{r.get('command', command)}`, "
                     f"{(r.get('check_s', 0) + r.get('carried_s', 0)) / 60:.1f} min" for r in results)
    lines = ["# Scale check (random weights, SD-1.5, SD-2.1, SDXL, SD3 and FLUX.1 shapes)", "",
             f"Commands: {runs}; on {os.cpu_count()} CPU cores, torch {torch.__version__}, bf16 autocast, --resolution {RESOLUTION}, 2 steps per recipe, 1 per other method or subset; "
             "sampling cut to trajectory 4 / anchors 2 steps, 2 anchor images per prompt. Each run and each plain "
             "step in a process of its own; peak = the process's peak resident size (VmHWM) above its size once "
             "the model was loaded.", ""]
    for res in results:
        if res.get("carried_over"):
            lines += [f"{res['model']}: {res['carried_over']} measurements were carried over from an earlier "
                      f"invocation that stopped (their runs took {res['carried_s'] / 60:.1f} min, counted above "
                      "without their process start-up).", ""]
    for res in results:
        plain = {p["train"]: p for p in res["plain"]}
        lines += [f"## {res['model']}", "",
                  "| run | method | train | load s | set-up s (anchors incl.) | step 1 s | step 2 s | peak above loaded model MB | "
                  "peak through the steps MB | plain same subset MB | ratio | checkpoint MB | delta MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["runs"]:
            p = plain.get(r["train"], {})
            mine = r.get("step_peak_extra_mb", r["peak_extra_mb"])  # the plain step has no save to compare with
            ratio = f"{mine / p['peak_extra_mb']:.2f}" if p.get("peak_extra_mb") else "-"
            lines.append(f"| {r['label']} | {r['method']} | {r['train']} | {r['load_s']} | {r['setup_s']} | "
                         f"{r['first_step_s']} | {r['second_step_s'] or '-'} | {r['peak_extra_mb']} | "
                         f"{r.get('step_peak_extra_mb', '-')} | {p.get('peak_extra_mb', '-')} | "
                         f"{ratio} | {r['checkpoint_mb']} | {r['delta_mb']} |")
        full = {r["method"]: r for r in res["runs"] if r["train"] == "full"}
        if "eupmu" in full and "ungrad" in full and "step_peak_extra_mb" in full["eupmu"]:
            gap = full["ungrad"]["step_peak_extra_mb"] - full["eupmu"]["step_peak_extra_mb"]
            lines += ["", f"--train full, peak through both steps (before the final save): ungrad "
                          f"{full['ungrad']['step_peak_extra_mb']} MB, eupmu {full['eupmu']['step_peak_extra_mb']} MB"]
        if "eupmu" in full and "ungrad" in full:
            gap = full["ungrad"].get("step_peak_extra_mb", full["ungrad"]["peak_extra_mb"]) - \
                full["eupmu"].get("step_peak_extra_mb", full["eupmu"]["peak_extra_mb"])
            lines += ["", f"--train full: ungrad peak - eupmu peak = {gap} MB; one fp32 gradient vector of the subset = "
                          f"{full['eupmu']['trained_mb']} MB: {'met' if gap >= full['eupmu']['trained_mb'] else 'MISSED'}"]
        gpu = [r for r in res["runs"] + res["plain"] if "cuda_peak_mb" in r]
        if gpu:
            lines += ["", f"On the GPU ({gpu[0].get('gpu', 'CUDA')}): the allocator's figures (torch.cuda.memory_allocated "
                          "once the model is on the device in its training precision, max_memory_allocated from then "
                          "through set-up, anchors and the steps).", "",
                      "| run | method | train | step 1 s | step 2 s | model on the GPU MB | GPU peak MB | peak above model MB |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in gpu:
                lines.append(f"| {r['label']} | {r['method']} | {r['train']} | {r.get('first_step_s', r.get('total_s'))} | "
                             f"{r.get('second_step_s') or '-'} | {r['cuda_loaded_mb']} | {r['cuda_peak_mb']} | "
                             f"{r['cuda_peak_mb'] - r['cuda_loaded_mb']} |")
        lines += ["", "| export | read back by | seconds | MB | result |", "|---|---|---|---|---|"]
        for e in res["exports"]:
            if "refused" in e:
                lines.append(f"| {e['format']} | - | - | - | refused: {e['refused']} |")
                continue
            if "only_trained_differ" in e:
                what = (f"only the {e['trained']} trained tensors differ from the base" if e["only_trained_differ"]
                        else f"MISMATCH: {e['differing']} tensors differ, {e['trained']} trained")
            else:
                what = (f"carries {e['output_change_kept']:.1%} of the output change; weight error "
                        f"{e['max_relative_error']:.3g}; {e['biases_carried']} biases carried; {e['dropped']} dropped"
                        if "output_change_kept" in e else "the LoRA run's adapter as trained")
            lines.append(f"| {e['format']} | {e['reader']} | {e['seconds']} | {e['mb']} | {what} |")
        lines.append("")
    lines += flux_extrapolation(results)
    return "\n".join(lines)


def flux_extrapolation(results: list[dict]) -> list[str]:
    """The whole FLUX.1 (19 joint + 38 single blocks) from flux-1 (1 + 2) and flux-2 (2 + 4): memory grows by
    the same amount with each further joint block and its two single blocks, so the whole model's figure is
    flux-1's plus 18 times the difference. An extrapolation, stated as one."""
    by = {r["model"]: r for r in results}
    if not {"flux-1", "flux-2"} <= set(by):
        return []
    one = {r["label"]: r for r in by["flux-1"]["runs"] + by["flux-1"]["plain"]}
    two = {r["label"]: r for r in by["flux-2"]["runs"] + by["flux-2"]["plain"]}
    lines = ["## FLUX.1 whole model, extrapolated (not measured)", "",
             "From `flux-1` (1 joint + 2 single blocks) and `flux-2` (2 + 4) at FLUX.1-dev's width: whole = flux-1 + "
             "18 x (flux-2 - flux-1). The loaded size includes the 2-layer T5 stand-in (T5-XXL adds about 9.5 GB in "
             "bf16 on top, before training, unless its embeddings are precomputed).", "",
             "| run | train | loaded model MB (whole) | peak above loaded MB (whole) | per 1 joint + 2 single blocks MB |",
             "|---|---|---|---|---|"]
    for label, a in one.items():
        b = two.get(label)
        if not b or "loaded_mb" not in a or "loaded_mb" not in b:
            continue
        unit = b["peak_extra_mb"] - a["peak_extra_mb"]
        loaded = a["loaded_mb"] + 18 * (b["loaded_mb"] - a["loaded_mb"])
        lines.append(f"| {label} | {a['train']} | {loaded} | {a['peak_extra_mb'] + 18 * unit} | {unit} |")
    return lines + [""]


def main() -> int:
    global RESOLUTION, EXPORTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="runs/scale")
    parser.add_argument("--models", default="sd15,sd21",
                        help="sd15, sd21, sdxl, sd3, flux-1, flux-2 (FLUX.1-dev's width, 1+2 or 2+4 blocks), flux "
                             "(the whole 12B FLUX.1-dev shape: a GPU's; build and save take 24 GB), or "
                             "tiny / tiny-xl / tiny-sd3 / tiny-flux (dry runs of the script)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--report-only", action="store_true", help="rewrite scale.md from OUTPUT/scale.json")
    parser.add_argument("--only", default="", help="comma-separated measurement labels (recipe names, method "
                        "names, 'plain xattn', ...): make only these")
    parser.add_argument("--no-exports", action="store_true", help="skip the exports (they write the whole model)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    RESOLUTION = args.resolution
    ONLY.update(filter(None, args.only.split(",")))
    EXPORTS = not args.no_exports
    sys.path.insert(0, str(ROOT))
    if args.child:
        return child(args.child)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    command = "python scripts/scale_check.py " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    # scale.json keeps one entry per model shape: checking one shape leaves the others' figures in place
    saved = root / "scale.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []
    if not args.report_only:
        for kind in args.models.split(","):
            t0 = time.perf_counter()
            res = {**check_model(kind, root), "check_s": round(time.perf_counter() - t0, 1), "command": command}
            results = [r for r in results if r["model"] != kind] + [res]
            saved.write_text(json.dumps(results, indent=2))
    (root / "scale.md").write_text(report(results, command))
    print(f"report: {root / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
