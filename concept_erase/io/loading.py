"""Load a Stable Diffusion pipeline from wherever a user keeps it, with errors a person can act on."""

from __future__ import annotations

from concept_erase import env  # noqa: F401

import json
import os
from pathlib import Path

import torch

from concept_erase.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def embedded_model_dir() -> Path:
    """The shipped digits model and its judge (built by scripts/build_digits_model.py)."""
    path = Path(__file__).resolve().parents[1] / "digits" / "model"
    if not (path / "pipeline" / "model_index.json").is_file():
        raise UserError(f"the embedded digits model is missing from {path}; rebuild it with "
                        "`python scripts/build_digits_model.py` or reinstall concept-erase")
    return path


def load_judge():
    """The digits judge shipped beside the embedded model."""
    from concept_erase.digits.judge import DigitsJudge

    return DigitsJudge.from_pretrained(str(embedded_model_dir() / "judge")).eval()


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or os.sep in source.rstrip(os.sep) and source.count("/") > 1
            or source.endswith((".safetensors",) + PICKLE_SUFFIXES))


def check_safetensors_file(path: Path) -> None:
    """Refuse a truncated or corrupted safetensors file before anything else reads it."""
    from safetensors import safe_open

    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"file holds {size} bytes, its header describes {8 + header_len + end}")
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupted: {err}); "
                        "copy it again or re-export it") from None


def load_pipeline(source: str, *, allow_pickle: bool = False, model_config: str = "",
                  torch_dtype: torch.dtype = torch.float32):
    """A pipeline of a family concept-erase handles (`families/`: SD 1.x/2.x, SDXL) from a diffusers
    folder, a hub id, a single file or a built-in model (`builtin:digits`, `builtin:tiny`, ...). The
    family comes from `model_index.json` (a single file: from `--model-config`'s, else its keys)."""
    quiet_hub_progress()
    if not source:
        raise UserError("no model given; pass --model PATH_OR_HUB_ID")
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name == "tiny":
            from concept_erase.io.tiny import build_tiny_pipeline

            return build_tiny_pipeline().to(torch_dtype)
        if name == "tiny-v":
            from concept_erase.io.tiny import build_tiny_pipeline

            return build_tiny_pipeline(prediction_type="v_prediction").to(torch_dtype)
        if name in ("tiny-xl", "tiny-xl-v"):
            from concept_erase.io.tiny import build_tiny_sdxl_pipeline

            kind = "v_prediction" if name.endswith("-v") else "epsilon"
            return build_tiny_sdxl_pipeline(prediction_type=kind).to(torch_dtype)
        if name == "digits":
            return load_pipeline(str(embedded_model_dir() / "pipeline"), torch_dtype=torch_dtype)
        raise UserError(f"unknown built-in model {source!r}; the built-in models are builtin:digits, "
                        "builtin:tiny, builtin:tiny-v, builtin:tiny-xl and builtin:tiny-xl-v")

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is a folder but not a diffusers pipeline (it has no model_index.json); "
                            "pass the folder that holds model_index.json, or a single .safetensors checkpoint")
        pipeline_class, kwargs = _pipeline_class(_class_name(path / "model_index.json"))
        try:
            pipe = pipeline_class.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise UserError(f"could not load the pipeline in {path}: {_first_line(err)}") from None
        return _checked(pipe, source, torch_dtype)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(f"{path} is a pickled checkpoint, and loading it can run arbitrary code; "
                            "convert it to .safetensors, or pass --allow-pickle if you trust its source")
        if suffix == ".safetensors":
            check_safetensors_file(path)
        elif suffix not in PICKLE_SUFFIXES:
            raise UserError(f"{path} is neither a diffusers folder nor a .safetensors/.ckpt checkpoint")
        pipeline_class, single = _pipeline_class(_single_file_class(path, model_config))
        if model_config:
            single["config"] = model_config
        try:
            pipe = pipeline_class.from_single_file(str(path), **single)
        except Exception as err:  # noqa: BLE001 - diffusers raises many kinds here
            hint = "" if model_config else (" Offline, a single-file checkpoint needs its configs: pass "
                                            "--model-config with a diffusers folder of the same architecture.")
            raise UserError(f"could not load the single-file checkpoint {path}: {_first_line(err)}.{hint}") from None
        return _checked(pipe, source, torch_dtype)
    if _looks_like_path(source):
        raise UserError(f"model path {source} does not exist; check the path")
    try:
        from diffusers import DiffusionPipeline

        pipeline_class, kwargs = _pipeline_class(DiffusionPipeline.load_config(source)["_class_name"])
        pipe = pipeline_class.from_pretrained(source, **kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = (" The hub is off (HF_HUB_OFFLINE=1): pass a local diffusers folder, or set HF_HUB_OFFLINE=0 "
                "on a machine with network." if offline else "")
        raise UserError(f"could not load model {source!r}: it is not a local path and loading it from the hub "
                        f"failed ({_first_line(err)}).{hint}") from None
    return _checked(pipe, source, torch_dtype)


def _class_name(model_index: Path) -> str:
    try:
        return str(json.loads(model_index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{model_index} is not a diffusers model index (no _class_name); the folder is damaged or "
                        "not a pipeline") from None


def _single_file_class(path: Path, model_config: str) -> str:
    """A single file's pipeline class: its --model-config folder's, else told by its keys (SDXL's
    checkpoints hold `conditioner.embedders.*`, SD's `cond_stage_model.*`)."""
    if model_config and (Path(model_config) / "model_index.json").is_file():
        return _class_name(Path(model_config) / "model_index.json")
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if any(k.startswith("conditioner.embedders.") for k in f.keys()):
                return "StableDiffusionXLPipeline"
    return "StableDiffusionPipeline"


def _pipeline_class(class_name: str):
    """(diffusers pipeline class, from_pretrained keyword arguments) for a family's pipeline class, or the
    one-line error of a class no family handles."""
    import diffusers

    from concept_erase.families.base import family_for_class

    family = family_for_class(class_name)
    return getattr(diffusers, class_name), dict(family.load_kwargs)


def quiet_hub_progress() -> None:
    """Loading and saving bars of diffusers and transformers say nothing a user needs."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message, without its closing period (the caller's sentence goes on)."""
    text = str(err).strip().splitlines()
    return text[0][:300].rstrip(".") if text else type(err).__name__


def _checked(pipe, source: str, torch_dtype: torch.dtype = torch.float32):
    from concept_erase.families.base import family_of

    family = family_of(pipe)
    for part in family.required_parts:
        if getattr(pipe, part, None) is None:
            raise UserError(f"{source} has no {part}; concept-erase needs a complete {type(pipe).__name__}")
    pipe.set_progress_bar_config(disable=True)
    parts = (family.denoiser(pipe), pipe.vae, *family.text_encoders(pipe))
    if any(p.dtype != torch_dtype for m in parts for p in m.parameters()):  # .to() warns even when nothing changes
        pipe.to(torch_dtype)
    return pipe


def training_resolution(pipe, requested: int) -> int:
    """The image side a run trains at: `requested`, or the model's native size when 0.

    The VAE divides the side by its scale factor, and the UNet halves the latent once per down block
    but the last; a side that does not divide evenly cannot go through both.
    """
    scale = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * scale
    if not requested:
        return native
    step = scale * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    if requested % step:
        lower, upper = max(step, requested - requested % step), requested - requested % step + step
        raise UserError(f"--resolution {requested}: this model needs a multiple of {step} pixels (its VAE divides "
                        f"by {scale}, its UNet by {step // scale}); try {lower} or {upper} (native: {native})")
    return requested


def check_schedule_steps(scheduler, **named: int) -> None:
    """Refuse a number of denoising steps the model's scheduler cannot take (more than it has timesteps).
    `named` maps a flag name (dashes as underscores) to its value."""
    limit = int(getattr(scheduler.config, "num_train_timesteps", 1000))
    for name, n in named.items():
        if n > limit:
            raise UserError(f"--{name.replace('_', '-')} {n} is more than this model's scheduler has timesteps "
                            f"({limit}); use at most {limit}")


def warn_long_prompts(tokenizer, prompts, log) -> None:
    """Say when a prompt is longer than the text encoder reads: it is cut, silently otherwise."""
    limit = getattr(tokenizer, "model_max_length", 77)
    for prompt in dict.fromkeys(prompts):
        n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if n > limit:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            log(f"warning: the prompt {short!r} is {n} tokens; the text encoder reads the first {limit}, "
                "the rest is cut")
