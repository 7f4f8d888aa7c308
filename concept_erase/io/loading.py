"""Load a Stable Diffusion pipeline from wherever a user keeps it, with errors a person can act on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import concept_erase.io.tiny as tiny
from concept_erase.embedded import EMBEDDED, EmbeddedModel, embedded_models
from concept_erase.errors import UserError
from concept_erase.families.base import family_for_class, family_of

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def embedded_model_dir(name: str) -> Path:
    """A shipped model's folder (`pipeline/`, its card and build report), refused in one line where it is missing."""
    model = EMBEDDED.get(name)
    if not (model.pipeline / "model_index.json").is_file():
        raise UserError(f"the embedded model builtin:{name} is missing from {model.folder}; rebuild it with "
                        f"`{model.rebuild}` or reinstall concept-erase")
    return model.folder


def embedded_model_of(pipe) -> EmbeddedModel | None:
    """The shipped model whose denoiser the pipeline's is built as (every setting of its denoiser's config file, a
    copy of its folder included), or None: an embedded model's judge and domain FID mean something only on images
    of that model."""
    family = family_of(pipe)
    mine = json.loads(json.dumps(dict(family.denoiser(pipe).config), default=list))
    for model in embedded_models():
        path = model.pipeline / family.denoiser_name / "config.json"
        if path.is_file():
            theirs = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
            if all(mine.get(k) == v for k, v in theirs.items()):
                return model
    return None


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


# the tiny built-in models: name -> (builder in io/tiny.py, its arguments, the pipeline class)
BUILTINS = {
    "tiny": ("build_tiny_pipeline", {}, "StableDiffusionPipeline"),
    "tiny-v": ("build_tiny_pipeline", {"prediction_type": "v_prediction"}, "StableDiffusionPipeline"),
    "tiny-xl": ("build_tiny_sdxl_pipeline", {}, "StableDiffusionXLPipeline"),
    "tiny-xl-v": ("build_tiny_sdxl_pipeline", {"prediction_type": "v_prediction"}, "StableDiffusionXLPipeline"),
    "tiny-flux": ("build_tiny_flux_pipeline", {}, "FluxPipeline"),
    "tiny-sd3": ("build_tiny_sd3_pipeline", {}, "StableDiffusion3Pipeline"),
}


def peek_family(source: str, model_config: str = ""):
    """The family of a model without loading it, where that costs nothing (a built-in name, a folder's or
    --model-config's model_index.json); None where it would take loading (a hub id, a single file)."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name in EMBEDDED:
            source = str(EMBEDDED.get(name).pipeline)
        else:
            return family_for_class(BUILTINS[name][2]) if name in BUILTINS else None
    for folder in (Path(source).expanduser(), Path(model_config) if model_config else None):
        if folder is not None and (folder / "model_index.json").is_file():
            return family_for_class(_class_name(folder / "model_index.json"))
    return None


def load_pipeline(source: str, *, allow_pickle: bool = False, model_config: str = "",
                  torch_dtype: torch.dtype = torch.float32):
    """A pipeline of a family concept-erase handles (`families/`: SD 1.x/2.x, SDXL, SD3, FLUX.1) from a diffusers
    folder, a hub id, a single file or a built-in model (`builtin:digits`, `builtin:tiny`, ...). The
    family comes from `model_index.json` (a single file: from `--model-config`'s, else its keys)."""
    quiet_hub_progress()
    if not source:
        raise UserError("no model given; pass --model PATH_OR_HUB_ID")
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name in EMBEDDED:
            return load_pipeline(str(embedded_model_dir(name) / "pipeline"), torch_dtype=torch_dtype)
        if name not in BUILTINS:
            raise UserError(f"unknown built-in model {source!r}; the built-in models are "
                            + ", ".join(f"builtin:{n}" for n in [*EMBEDDED.names(), *BUILTINS]))

        builder, kwargs, _ = BUILTINS[name]
        pipe = getattr(tiny, builder)(**kwargs)
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):
                cast(part, torch_dtype)
        return pipe

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is a folder but not a diffusers pipeline (it has no model_index.json); "
                            "pass the folder that holds model_index.json, or a single .safetensors checkpoint")
        pipeline_class, kwargs = _pipeline_class(_class_name(path / "model_index.json"))
        _check_parts(path / "model_index.json", source)
        kwargs.update({k: None for k in left_out_parts(path)})
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
    _check_hub_reachable(source)
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


HUB_PROBE_SECONDS = 10


def _check_hub_reachable(source: str) -> None:
    """With the Hub on, one short request first: without a network, the Hub's own retries take half a minute and
    end in an error about a missing model_index.json."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception as err:  # noqa: BLE001 - any failure to connect
        raise UserError(f"could not load model {source!r}: it is not a local path, and the Hub "
                        f"({constants.ENDPOINT}) could not be reached ({type(err).__name__}); pass a local diffusers "
                        "folder, or try again with a network") from None


def left_out_parts(folder: Path) -> list[str]:
    """The parts a diffusers folder leaves out on purpose (`[null, null]` in its model_index.json: SD3 saved
    without T5, SD without its safety checker). diffusers' from_pretrained refuses such a folder, one it saved
    itself, unless the parts its pipeline requires (SD3's T5) are passed as None; passing all of them is safe."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    return [k for k, v in index.items() if isinstance(v, list) and v and v[0] is None] if isinstance(index, dict) else []


def _class_name(model_index: Path) -> str:
    try:
        return str(json.loads(model_index.read_text())["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{model_index} is not a diffusers model index (no _class_name); the folder is damaged or "
                        "not a pipeline") from None


def _check_parts(model_index: Path, source: str) -> None:
    """Refuse a folder whose model index leaves out a part the family needs (diffusers' own error lists
    every expected part, on one long line)."""
    index = json.loads(model_index.read_text())
    family = family_for_class(str(index["_class_name"]))
    for part in family.required_parts:
        entry = index.get(part)
        if not entry or not isinstance(entry, list) or entry[0] is None:
            _missing_part(family, part, source, index["_class_name"])


def _missing_part(family, part: str, source: str, class_name: str):
    raise UserError(f"{source} has no {family.part_names.get(part, part)}; concept-erase needs a complete "
                    f"{class_name}: use the model's whole folder (or hub id)")


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

    family = family_for_class(class_name)
    return getattr(diffusers, class_name), dict(family.load_kwargs)


def cast(module, dtype):
    """`module` in `dtype`, cast only where a parameter differs. diffusers' models warn on every dtype cast ("should
    be kept in float32: []"), even when they keep no module in float32: that warning is left out there."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    if getattr(module, "_keep_in_fp32_modules", None):  # a model that does keep some: its warning stands
        return module.to(dtype=dtype)
    import diffusers.utils.logging as dlog

    log = dlog.get_logger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(dlog.ERROR)
    try:
        return module.to(dtype=dtype)
    finally:
        log.setLevel(level)


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
    family = family_of(pipe)
    for part in family.required_parts:
        if getattr(pipe, part, None) is None:
            _missing_part(family, part, source, type(pipe).__name__)
    pipe.set_progress_bar_config(disable=True)
    for part in (family.denoiser(pipe), pipe.vae, *family.text_encoders(pipe)):
        cast(part, torch_dtype)
    return pipe


def training_resolution(pipe, requested: int) -> int:
    """The image side a run trains at: `requested`, or the model's native size when 0.

    The VAE divides the side by its scale factor, and the denoiser divides the latent again (a UNet halves
    it once per down block but the last, a transformer cuts it into patches); a side that does not
    divide evenly cannot go through both.
    """
    family = family_of(pipe)
    scale = pipe.vae_scale_factor
    native = family.native_resolution(pipe)
    if not requested:
        return native
    step, largest = family.resolution_step(pipe), family.max_resolution(pipe)
    if largest is not None and requested > largest:
        raise UserError(f"--resolution {requested}: this model's position embedding holds at most {largest} pixels "
                        f"a side; use {largest - largest % step} or less (native: {native})")
    if requested % step:
        lower, upper = max(step, requested - requested % step), requested - requested % step + step
        fits = [side for side in (lower, upper) if largest is None or side <= largest]
        raise UserError(f"--resolution {requested}: this model needs a multiple of {step} pixels (its VAE divides "
                        f"by {scale}, its {type(family.denoiser(pipe)).__name__} by {step // scale}); try "
                        f"{' or '.join(map(str, fits))} (native: {native})")
    return requested


def check_schedule_steps(scheduler, **named: int) -> None:
    """Refuse a number of denoising steps the model's scheduler cannot take (more than it has timesteps).
    `named` maps a flag name (dashes as underscores) to its value."""
    limit = int(getattr(scheduler.config, "num_train_timesteps", 1000))
    for name, n in named.items():
        if n > limit:
            raise UserError(f"--{name.replace('_', '-')} {n} is more than this model's scheduler has timesteps "
                            f"({limit}); use at most {limit}")


def check_concept_read(tokenizer, variants, concepts: list[str]) -> None:
    """Refuse a prompt variant that pushes its concept past what the text encoder reads: the model would be
    trained on a prompt without the concept."""
    limit = getattr(tokenizer, "model_max_length", 77)

    def tokens(text: str) -> int:
        return len(tokenizer(text, truncation=False, verbose=False).input_ids)

    for v in variants:
        if v.through_owner(concepts[v.owner]) == concepts[v.owner]:
            continue  # the concept first: cut only where the concept itself is too long (warned about)
        n = tokens(v.through_owner(concepts[v.owner]))
        if n > limit and tokens(concepts[v.owner]) <= limit:
            raise UserError(f"the template {v.template!r} puts the concept {concepts[v.owner]!r} past the "
                            f"{limit} tokens the text encoder reads (it would end at token {n}), so the prompt "
                            "would leave the concept out; shorten the template's words before the {}")


def warn_long_prompts(tokenizer, prompts, log) -> None:
    """Say when a prompt is longer than the text encoder reads: it is cut, silently otherwise."""
    limit = getattr(tokenizer, "model_max_length", 77)
    for prompt in dict.fromkeys(prompts):
        n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if n > limit:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            log(f"warning: the prompt {short!r} is {n} tokens; the text encoder reads the first {limit}, "
                "the rest is cut")
