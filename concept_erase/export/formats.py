"""The exports of a delta: a diffusers pipeline folder, LoRA weights (factored where the run trained weights) and a
single original-layout file, each checked by reading it back."""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from concept_erase.errors import UserError
from concept_erase.export.delta import apply, check_base, delta_family, lora_base_names, merge_lora, read_delta
from concept_erase.export.loaders import coverage, layout_of
from concept_erase.export.lora_forms import FORMS, default_form, write_lora
from concept_erase.families.base import family_of
from concept_erase.io.atomic import atomic_dir, atomic_path, refuse_existing
from concept_erase.io.loading import load_pipeline


def _base_pipeline(meta: dict, model: str | None, allow_pickle: bool, model_config: str):
    settings = json.loads(meta["settings"])
    return load_pipeline(model or meta["base_model"], allow_pickle=allow_pickle,
                         model_config=model_config or settings.get("model_config", ""))


def export_diffusers(delta: str | Path, output: str | Path, *, model: str | None = None, overwrite: bool = False,
                     allow_other_base: bool = False, allow_pickle: bool = False, model_config: str = "") -> Path:
    """A complete pipeline folder with the erasure applied: the model's own pipeline class
    (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`) loads it with `from_pretrained`."""
    output = Path(output)
    refuse_existing(output, overwrite)
    _, meta = read_delta(delta)
    pipe = _base_pipeline(meta, model, allow_pickle, model_config)
    apply(pipe, delta, allow_other_base=allow_other_base)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        pipe.save_pretrained(str(tmp))
        (tmp / "concept_erase.json").write_text(json.dumps(
            {k: meta[k] for k in ("base_model", "base_model_digest", "method", "concepts", "train", "steps")},
            indent=2), encoding="utf-8")
    return output


# Above this many rows and columns a matrix is factored by randomized SVD (torch.svd_lowrank); the exact
# SVD of every delta of an SD 1.5 xattn run took 6 to 8 minutes on 2 CPU cores, the randomized one about
# 0.1 s per matrix. The rank-k error it reaches is measured against the exact one in the tests and in
# scripts/scale_check.py; --exact-svd forces the exact factorisation.
LOWRANK_MIN_SIDE = 256
LOWRANK_OVERSAMPLE = 16
LOWRANK_POWER_ITERATIONS = 6


def factor_delta(delta_w: torch.Tensor, rank: int, *, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-`rank` factors (B [out, k], A [k, in]) of a 2-D weight difference, and the relative error
    ||delta - B A||_F / ||delta||_F actually reached (measured, not estimated)."""
    d = delta_w.float()
    k = min(rank, *d.shape)
    if exact or min(d.shape) < LOWRANK_MIN_SIDE or k + LOWRANK_OVERSAMPLE >= min(d.shape):
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        b, a = u[:, :k] * s[:k], vh[:k]
    else:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same factors on every export
        try:
            u, s, v = torch.svd_lowrank(d, q=k + LOWRANK_OVERSAMPLE, niter=LOWRANK_POWER_ITERATIONS)
        finally:
            torch.random.set_rng_state(gen_state)
        b, a = u[:, :k] * s[:k], v[:, :k].T
    total = float(d.norm())
    err = float((d - b @ a).norm()) / total if total > 0 else 0.0
    return b.contiguous(), a.contiguous(), err


def lora_from_delta(tensors: dict, base: dict, rank: int, *, exact: bool = False,
                    with_bias: bool = True) -> tuple[dict, list, list]:
    """PEFT-form LoRA tensors for a weight delta: Linear and convolution weight changes factored at
    `rank` (a convolution's A holds the kernel, its B is 1x1), each changed bias as `lora_B.bias`
    (PEFT's lora_bias, which diffusers' load_lora_weights reads). Returns (state, dropped, errors):
    the tensors no LoRA can carry (normalisation weights, embeddings; biases too without `with_bias`)
    and each factorisation's error. A LoRA with biases loads with `load_lora_weights` (diffusers 0.32 and
    later) but cannot be fused (`fuse_lora`) where a target layer has no bias of its own (SD's q/k/v)."""
    state, dropped, errs = {}, [], []
    by_module: dict[str, dict[str, str]] = {}
    for name in tensors:
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, {})[leaf] = name
    for module, leaves in sorted(by_module.items()):
        w_name = f"{module}.weight"
        base_w = base.get(w_name)
        if base_w is None or base_w.dim() not in (2, 4) or set(leaves) - {"weight", "bias"}:
            dropped += [n for n in leaves.values() if (tensors[n].float() - base[n].float()).abs().max() > 0]
            continue
        delta_w = (tensors[w_name].float() - base_w.float()) if "weight" in leaves else torch.zeros_like(base_w.float())
        flat = delta_w.reshape(delta_w.shape[0], -1)
        b, a, err = factor_delta(flat, rank, exact=exact)
        errs.append(err)
        if delta_w.dim() == 4:  # a convolution: A is a k-channel convolution with the kernel, B a 1x1 one
            a = a.reshape(a.shape[0], *delta_w.shape[1:])
            b = b.reshape(*b.shape, 1, 1)
        state[f"{module}.lora_A.weight"] = a.contiguous()
        state[f"{module}.lora_B.weight"] = b.contiguous()
        if "bias" in leaves:
            state[f"{module}.lora_B.bias"] = (tensors[leaves["bias"]].float() - base[leaves["bias"]].float()).contiguous()
    if with_bias and any(k.endswith("lora_B.bias") for k in state):
        # diffusers turns PEFT's lora_bias on for the whole adapter when one lora_B.bias is present: every
        # other LoRA module then needs one too (zeros), or it is left unloaded.
        for key in [k for k in state if k.endswith("lora_B.weight")]:
            state.setdefault(key[: -len("weight")] + "bias", torch.zeros(state[key].shape[0]))
    else:
        dropped += [leaves["bias"] for leaves in by_module.values() if "bias" in leaves
                    and f"{leaves['bias'].rpartition('.')[0]}.lora_B.bias" in state]
        state = {k: v for k, v in state.items() if not k.endswith("lora_B.bias")}
    return state, dropped, errs


@contextmanager
def _delta_applied(unet, tensors: dict, meta: dict):
    """The delta merged into the denoiser in place for the block, its weights put back after."""
    params = dict(unet.named_parameters())
    names = lora_base_names(tensors) if meta["kind"] == "lora" else list(tensors)
    saved = {n: params[n].detach().clone() for n in names}
    try:
        if meta["kind"] == "lora":
            merge_lora(unet, tensors, json.loads(meta["lora"]))
        else:
            for n, v in tensors.items():
                params[n].copy_(v.to(params[n].device, params[n].dtype))
        yield
    finally:
        params = dict(unet.named_parameters())
        for n, v in saved.items():
            params[n].copy_(v)


@torch.no_grad()
def output_change_kept(pipe, tensors: dict, meta: dict, files: dict[str, Path]) -> dict[str, float]:
    """For each LoRA file (name -> path), the share of the erasure's change in the denoiser's output that the file
    carries when diffusers' own `load_lora_weights` reads it: 1 - ||out_lora - out_delta|| / ||out_delta - out_base||,
    on the concept prompts at four timesteps (fixed noise), at the native size up to 512 px. The pipeline is left
    as it was."""
    family = family_of(pipe)
    unet = family.denoiser(pipe)
    prompts = (json.loads(meta["concepts"]) or [""])[:4]
    # at most 512 px: the share of a weight change a LoRA carries shows at any size, and SDXL's native
    # 1024 px would make this check four times the cost (tens of minutes on a CPU) for nothing more
    resolution = min(family.native_resolution(pipe), 512)  # 512: a multiple of every family's step
    cond = family.encode(pipe, prompts, unet.device, resolution)
    cond = cond[torch.arange(len(prompts)).repeat_interleave(4)].to(unet.device, unet.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((len(cond), *family.latent_shape(pipe, resolution)), generator=g).to(unet.device, unet.dtype)
    t = torch.tensor([100, 400, 700, 950] * len(prompts), device=unet.device)

    def out():
        return family.predict(unet, x, t, cond).float()

    base_out = out()
    with _delta_applied(unet, tensors, meta):
        delta_out = out()
    change = float((delta_out - base_out).norm())
    kept = {}
    for name, path in files.items():
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="check")
        try:
            lora_out = out()
        finally:
            pipe.delete_adapters("check")
        kept[name] = 1.0 - float((lora_out - delta_out).norm()) / change if change > 0 else 1.0
    return kept


def _largest_rank(tensors: dict, base: dict) -> int:
    """The largest rank a LoRA of this delta's matrices can have: the most of min(rows, columns) over them."""
    sides = [min(b.shape[0], b[0].numel()) for n in tensors if (b := base.get(n)) is not None
             and n.endswith(".weight") and b.dim() in (2, 4)]
    return max(sides, default=0)


def _programs(pipe, tensors: dict, meta: dict, path: Path, form: str, family) -> dict:
    """What each program that runs this family applies of the written file, and the share of the erasure's
    output change that is: measured through diffusers on the tensors that program reads."""
    from safetensors.torch import load_file

    written = load_file(str(path))
    read = coverage(written, layout_of(family.name, family.denoiser(pipe)))
    results = {p: {"tensors": len(r), "of": len(written)} for p, r in read.items()}
    with tempfile.TemporaryDirectory(prefix="ce-lora-check-") as scratch:
        files, same_as = {"whole file": path}, {}
        for program, keys in read.items():
            if keys == set(written):
                same_as[program] = "whole file"
            elif keys:
                from safetensors.torch import save_file

                part = Path(scratch) / program.replace(" ", "-") / path.name
                part.parent.mkdir()
                save_file({k: written[k] for k in sorted(keys)}, str(part))
                files[program] = part
                same_as[program] = program
        kept = output_change_kept(pipe, tensors, meta, files)
    for program in results:
        results[program]["output_change_kept"] = kept[same_as[program]] if program in same_as else 0.0
    return results


def export_lora(delta: str | Path, output: str | Path, *, model: str | None = None, rank: int = 16,
                overwrite: bool = False, allow_pickle: bool = False, model_config: str = "",
                exact_svd: bool = False, lora_bias: bool = True, allow_other_base: bool = False,
                lora_format: str = "") -> dict:
    """LoRA weights in the form the programs users load them in read: kohya's (ComfyUI, A1111, kohya's scripts
    and diffusers) by default for SD 1.x/2.x and SDXL, diffusers' for SD3 and FLUX (`concept_erase.export.lora_forms`).

    A LoRA run's adapter is written as it is. From a subset run, each changed Linear or convolution
    weight's difference is factored at `rank`, and changed biases ride along as `lora_B.bias` in the diffusers
    form (kohya's has none). Normalisation weights and embeddings cannot be LoRA: they are listed. For each
    program that runs the family, the tensors it applies are found by its key rules (`concept_erase.export.loaders`),
    and the share of the erasure's effect on the denoiser's output they keep is measured.
    """
    output = Path(output)
    refuse_existing(output, overwrite)
    tensors, meta = read_delta(delta)
    family = delta_family(meta)
    form = lora_format or default_form(family)
    if form not in FORMS:
        raise UserError(f"--lora-format {form}: choose one of {', '.join(FORMS)}")
    if form == "kohya" and not family.kohya_lora:
        raise UserError(f"--lora-format kohya is written for SD 1.x/2.x and SDXL, not {family.name}; its LoRA is "
                        "written in the diffusers form, which ComfyUI and diffusers read: drop --lora-format")
    pipe = _base_pipeline(meta, model, allow_pickle, model_config)
    unet = family_of(pipe).denoiser(pipe)
    check_base(unet, tensors, meta, allow_other_base=allow_other_base)
    summary: dict = {"kind": meta["kind"], "form": form}
    if meta["kind"] == "lora":
        lora = json.loads(meta["lora"])
        scale = float(lora["alpha"]) / int(lora["r"])  # folded into B: a loader then applies it at scale 1
        peft_state = {k: v * scale if ".lora_B." in k else v for k, v in tensors.items()}
        r = int(lora["r"])
    else:
        base = unet.state_dict()
        largest = _largest_rank(tensors, base)
        if largest and rank > largest:
            raise UserError(f"--rank {rank} is more than this run's matrices allow: the largest changed one has rank "
                            f"at most {largest}; choose --rank {largest} or less")
        peft_state, dropped, errs = lora_from_delta(tensors, base, rank, exact=exact_svd,
                                                    with_bias=lora_bias and form == "diffusers")
        if not any(k.endswith("lora_A.weight") for k in peft_state):
            raise UserError("no changed Linear or convolution weight in this delta can be written as LoRA; "
                            "export --format diffusers or single-file")
        summary.update({"rank": rank, "max_relative_error": max(errs), "dropped": dropped,
                        "biases_carried": sum(k.endswith("lora_B.bias") and bool(v.abs().max() > 0)
                                              for k, v in peft_state.items())})
        r = rank
    with atomic_dir(output, overwrite=overwrite) as tmp:
        path, biases = write_lora(tmp, peft_state, form=form, family=family, unet_config=unet.config, meta=meta)
        summary["dropped"] = sorted(set(summary.get("dropped", [])) | set(biases))
        summary["file"] = path.name
        summary["programs"] = _programs(pipe, tensors, meta, path, form, family)
        summary["output_change_kept"] = summary["programs"]["diffusers"]["output_change_kept"]
        (tmp / "concept_erase.json").write_text(json.dumps({"rank": r, "lora_format": form, **summary,
                                                            "base_model": meta["base_model"]}, indent=2),
                                                encoding="utf-8")
    return summary


def export_single_file(delta: str | Path, output: str | Path, *, model: str | None = None, overwrite: bool = False,
                       allow_other_base: bool = False, allow_pickle: bool = False, model_config: str = "") -> Path:
    """One original-layout .safetensors file (A1111 / ComfyUI), with the erasure applied: the LDM layout
    for SD 1.x/2.x, SGM's for SDXL."""
    from safetensors.torch import save_file

    output = Path(output)
    if output.suffix != ".safetensors":
        raise UserError(f"--output {output}: a single-file checkpoint is written as NAME.safetensors")
    refuse_existing(output, overwrite)
    _, meta = read_delta(delta)
    pipe = _base_pipeline(meta, model, allow_pickle, model_config)
    apply(pipe, delta, allow_other_base=allow_other_base)
    tensors = family_of(pipe).single_file(pipe)
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata={k: meta[k] for k in ("base_model", "base_model_digest", "method",
                                                                   "concepts", "train", "steps")})
    return output
