"""The delta file an erasure writes, and apply().

`erased.safetensors` holds only the tensors the erasure changed (the trained subset's new values,
or the LoRA weights), plus metadata: the base model, its digest, the method, the concepts and
every setting. `apply()` checks names, shapes and the base model before it touches a pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from concept_erase.errors import UserError
from concept_erase.families.base import FAMILIES, family_of
from concept_erase.io.atomic import atomic_path
from concept_erase.io.digests import tensor_digest
from concept_erase.io.loading import check_safetensors_file

FORMAT = "concept-erase-delta"
FORMAT_VERSION = "1"
# Rounding fp32 weights to bf16 moves each value by up to 2^-9 relative, unbiased: the sum and the
# sum of squares of n values move by about 2^-9 / sqrt(n) relative. Six times that passes the same
# base in another dtype; two different models differ by far more.
ROUNDING_SIGMAS = 6 * 2.0 ** -8


def lora_base_names(trained_names) -> list[str]:
    """Names of the plain-UNet weights that LoRA adapters sit on."""
    out = set()
    for n in trained_names:
        module = n.split(".lora_", 1)[0]
        out.add(f"{module}.weight")
    return sorted(out)


def _stats(t: torch.Tensor) -> list[float]:
    t = t.detach().double()
    return [float(t.sum()), float((t * t).sum()), t.numel()]


def base_fingerprint(unet, trained: dict, *, lora: bool, digest: str) -> dict:
    """Identify the base model: a digest of the whole UNet, and sum / sum of squares of each replaced
    tensor (to recognise the same base loaded in another dtype)."""
    state = unet.state_dict()
    if lora:
        names = lora_base_names(trained)
        stats = {n: _stats(state[n.replace(".weight", ".base_layer.weight")]) for n in names}
    else:
        stats = {n: _stats(state[n]) for n in trained}
    dtype = str(next(iter(trained.values())).dtype).replace("torch.", "")
    return {"digest": digest, "stats": stats, "dtype": dtype}


def _lora_state(unet, state: dict | None = None) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(unet, state_dict=state).items()}


def join_lora(first: dict[str, torch.Tensor], first_lora: dict, second: dict[str, torch.Tensor],
              second_lora: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Two LoRA adapters on the same modules as one whose update is exactly their sum: per module the down
    projections stacked (rank r1 + r2) and the up projections side by side, each scaled by its adapter's
    alpha / r, so that the joined adapter's own scale is 1 (alpha = rank). Returns (tensors, lora metadata)."""
    if set(first) != set(second) or first_lora["targets"] != second_lora["targets"]:
        raise UserError("the two LoRA adapters of a chain sit on different modules; they cannot be joined")
    scales = [float(m["alpha"]) / int(m["r"]) for m in (first_lora, second_lora)]
    out = {}
    for name in first:
        a, b = first[name].float(), second[name].float()
        if ".lora_A." in name:
            out[name] = torch.cat([a, b], dim=0)  # [r, in, ...]: the rows of each adapter's down projection
        elif ".lora_B." in name:
            out[name] = torch.cat([a * scales[0], b * scales[1]], dim=1)  # [out, r, ...]
        else:
            raise UserError(f"the chain's LoRA holds {name!r}, neither a down nor an up projection; it cannot be "
                            "joined")
    rank = int(first_lora["r"]) + int(second_lora["r"])
    return {k: v.contiguous() for k, v in out.items()}, {"r": rank, "alpha": float(rank),
                                                         "targets": list(first_lora["targets"])}


def save_delta(path: str | Path, unet, trained: dict, *, config, fingerprint: dict, steps: int,
               lambda_final: float, family, whole: bool = False, edit: str | None = None,
               chain: list | None = None, joined: tuple[dict, dict] | None = None) -> None:
    """`trained`: {name: parameter}; with `whole`, {name: the whole fp32 CPU tensor} gathered from a
    sharded run (the module's own state is sharded then and is not read). `edit`: for a closed-form edit, the
    subset it changed (the config's `train` is training's). `joined`: a LoRA chain's previous adapters and their
    metadata, written joined with this run's into one adapter (`join_lora`)."""
    from safetensors.torch import save_file

    lora = edit is None and config.train == "lora"
    if lora:
        tensors = _lora_state(unet, trained if whole else None)
    else:
        tensors = {n: p.detach().float().cpu().contiguous() for n, p in trained.items()}
    settings = config.to_dict()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "lora" if lora else "weights",
        "base_model": settings["model"],
        "base_model_digest": fingerprint["digest"],
        "base_stats": json.dumps(fingerprint["stats"]),
        "base_dtype": fingerprint["dtype"],
        "family": family.name,
        "method": config.method,
        "concepts": json.dumps(config.concepts),
        "anchors": json.dumps(config.anchors),
        "train": edit or config.train,
        **({"edit": "closed-form"} if edit else {}),
        **({"chain": json.dumps(chain)} if chain else {}),  # --weights: every request of the chain, in order
        "steps": str(steps),
        "lambda_final": repr(float(lambda_final)),
        "settings": json.dumps(settings, sort_keys=True),
    }
    if lora:
        lora_meta = {"r": config.lora_rank, "alpha": config.lora_alpha, "targets": list(family.lora_targets)}
        if joined is not None:
            tensors, lora_meta = join_lora(joined[0], joined[1], tensors, lora_meta)
        meta["lora"] = json.dumps(lora_meta)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def delta_file(path: str | Path) -> Path:
    """The erased weights a `--weights` value names: a run folder names its `erased.safetensors`."""
    path = Path(path)
    return path / "erased.safetensors" if path.is_dir() else path


def read_delta(path: str | Path, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a delta file or run folder; with tensors=False the metadata alone is read."""
    from safetensors import safe_open

    path = delta_file(path)
    if not path.is_file():
        raise UserError(f"no erased weights at {path}; pass a run folder or its erased.safetensors")
    check_safetensors_file(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        values = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is a safetensors file but not a concept-erase delta (no '{FORMAT}' metadata)")
    version = meta.get("format_version", "")
    if not version.isdigit() or int(version) > int(FORMAT_VERSION):
        raise UserError(f"{path}: delta format version {version!r} is not one this version reads (1 to "
                        f"{FORMAT_VERSION}); upgrade concept-erase, or erase again with this one")
    bad = next((name for name, t in values.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad!r} holds NaN or infinite values; the file is damaged (or the run "
                        "diverged): restore it, or erase again")
    return values, meta


def delta_family(meta: dict):
    """The family a delta was made for (deltas written before families existed are SD's)."""
    return FAMILIES.get(meta.get("family", "sd"))()


def check_base(unet, tensors: dict, meta: dict, *, allow_other_base: bool) -> None:
    """Refuse a delta made from another base model unless told otherwise."""
    if allow_other_base:
        return
    if tensor_digest(unet.state_dict()) == meta["base_model_digest"]:
        return
    stats = json.loads(meta["base_stats"])
    state = unet.state_dict()
    for name, (s, sq, n) in stats.items():
        if name not in state or state[name].numel() != n:
            break
        cs, csq, _ = _stats(state[name])
        tol = ROUNDING_SIGMAS / n ** 0.5
        if abs(cs - s) > tol * (sq * n) ** 0.5 or abs(csq - sq) > tol * sq:
            break
    else:
        return  # the same weights in another dtype or on another device
    raise UserError(f"this delta was made from another base model ({meta.get('base_model')}, digest "
                    f"{meta['base_model_digest'][:12]}); apply it to that model, or pass --allow-other-base "
                    "(allow_other_base=True) if you know they match")


def _check_names(expected: dict[str, torch.Size], tensors: dict[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise UserError(f"the delta holds {len(unexpected)} tensor(s) this model does not have, e.g. "
                        f"{unexpected[0]!r}; it was made for another architecture")
    if what == "lora" and missing:
        raise UserError(f"the LoRA delta lacks {len(missing)} tensor(s), e.g. {missing[0]!r}; it is incomplete")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name]):
            raise UserError(f"tensor {name!r} has shape {tuple(t.shape)} in the delta but {tuple(expected[name])} "
                            "in the model; it was made for another architecture")


@torch.no_grad()
def apply(pipe, path: str | Path, *, allow_other_base: bool = False):
    """Apply an erased delta to a pipeline in place (LoRA deltas are merged); returns the pipeline."""
    tensors, meta = read_delta(path)
    family = family_of(pipe)
    made_for = delta_family(meta).name
    if made_for != family.name:
        raise UserError(f"this delta was made for the {made_for} family and the model is a {type(pipe).__name__} "
                        f"({family.name}); apply it to the model it was made from")
    unet = family.denoiser(pipe)
    check_base(unet, tensors, meta, allow_other_base=allow_other_base)
    if meta["kind"] == "weights":
        params = dict(unet.named_parameters())
        _check_names({n: p.shape for n, p in params.items()}, tensors, "weights")
        for name, t in tensors.items():
            params[name].copy_(t.to(params[name].device, params[name].dtype))
    elif meta["kind"] == "lora":
        merge_lora(unet, tensors, json.loads(meta["lora"]))
    else:
        raise UserError(f"{path}: unknown delta kind {meta['kind']!r}; upgrade concept-erase")
    return pipe


def merge_lora(unet, tensors: dict, lora: dict) -> None:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import set_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), target_modules=lora["targets"]),
                     adapter_name="concept_erase")
    from peft.utils import get_peft_model_state_dict

    expected = {k: v.shape for k, v in get_peft_model_state_dict(unet, adapter_name="concept_erase").items()}
    try:
        _check_names(expected, tensors, "lora")
        set_peft_model_state_dict(unet, {k: v.to(unet.dtype) for k, v in tensors.items()}, adapter_name="concept_erase")
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge(adapter_names=["concept_erase"])
    finally:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(unet)
        unet._hf_peft_config_loaded = False
        if hasattr(unet, "peft_config"):
            del unet.peft_config
