"""Hub model cards for exported erasures, and `export --push-to-hub`.

The card's front matter is huggingface_hub's `ModelCardData` (base_model, license, tags, library_name); the
text says what was erased, how, from what (the base's digest), how to load the export, and, with
`export --eval EVAL_DIR`, what `concept-erase eval` measured (its tables and grids). Pushing is
huggingface_hub's `create_repo` + `upload_folder`; without a network or a token the user gets one line.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from concept_erase.errors import UserError
from concept_erase.export.delta import delta_family
from concept_erase.io.atomic import write_text
from concept_erase.io.loading import left_out_parts

# Licences of the bases people erase from most, by hub id (the base's own card says it where it is at hand).
KNOWN_LICENSES = {
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "black-forest-labs/FLUX.1-schnell": "apache-2.0",
    "black-forest-labs/FLUX.1-dev": "other",  # the FLUX.1 [dev] non-commercial licence
    "stabilityai/stable-diffusion-3-medium-diffusers": "other",  # Stability AI community licence
    "stabilityai/stable-diffusion-3.5-medium": "other",
    "stabilityai/stable-diffusion-3.5-large": "other",
}
BUILTIN_LICENSE = "apache-2.0"  # the embedded models are this project's own
FAMILY_TAGS = {"sd": ["stable-diffusion"], "sdxl": ["stable-diffusion-xl"], "sd3": ["sd3"], "flux": ["flux"]}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(base: str) -> str | None:
    return base if HUB_ID.match(base) and not Path(base).expanduser().exists() else None


def _front_matter_license(readme: Path) -> str | None:
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"^---\s*\n(.*?)\n---", text, flags=re.S)
    found = m and re.search(r"^license:\s*['\"]?([\w.+-]+)", m.group(1), flags=re.M)
    return found.group(1) if found else None


def base_license(base: str) -> str | None:
    """The base model's licence where it is known: builtin models, the base folder's (or its parent's) card,
    the card in the hub cache, or the table above. None when it is not known."""
    if base.startswith("builtin:"):
        return BUILTIN_LICENSE
    path = Path(base).expanduser()
    if path.exists():
        for folder in (path if path.is_dir() else path.parent, (path if path.is_dir() else path.parent).parent):
            found = _front_matter_license(folder / "README.md")
            if found:
                return found
        return None
    if _hub_id(base):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
            if isinstance(cached, str):
                found = _front_matter_license(Path(cached))
                if found:
                    return found
        except Exception:  # noqa: BLE001 - a cache lookup never stops an export
            pass
    return KNOWN_LICENSES.get(base)


def read_eval(eval_dir: str) -> dict:
    p = Path(eval_dir)
    p = p / "results.json" if p.is_dir() else p
    try:
        results = json.loads(p.read_text(encoding="utf-8"))
        _ = results["summary"], results["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--eval {eval_dir}: no results.json of `concept-erase eval` there; give the --output folder "
                        "of a finished evaluation") from None
    results["_dir"] = str(p.parent)
    return results


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _none_arguments(folder, pipeline_class: str) -> str:
    """`, text_encoder_3=None, tokenizer_3=None` for a folder that leaves out parts its pipeline requires
    (SD3 saved without T5): diffusers' from_pretrained refuses it otherwise."""
    import diffusers

    optional = set(getattr(getattr(diffusers, pipeline_class, None), "_optional_components", []))
    return "".join(f", {k}=None" for k in left_out_parts(folder) if k not in optional) if folder else ""


def _loading(fmt: str, pipeline_class: str, repo: str, weight_name: str, base: str, folder=None,
             denoiser_class: str = "UNet2DConditionModel") -> str:
    if fmt == "diffusers":
        return (f"```python\nfrom diffusers import {pipeline_class}\n\n"
                f"pipe = {pipeline_class}.from_pretrained(\"{repo}\"{_none_arguments(folder, pipeline_class)})\n```")
    if fmt == "lora":
        local_base = base if not base.startswith("builtin:") and Path(base).is_dir() else None
        load_base = (f"from concept_erase import load_pipeline\n\npipe = load_pipeline(\"{base}\")\n"
                     if base.startswith("builtin:") else
                     f"from diffusers import {pipeline_class}\n\npipe = {pipeline_class}.from_pretrained(\"{base}\""
                     f"{_none_arguments(local_base, pipeline_class)})\n")
        return (f"```python\n{load_base}"
                f"pipe.load_lora_weights(\"{repo}\"" + (f", weight_name=\"{weight_name}\"" if weight_name else "")
                + ")\n```\n\n" + ("A1111 and ComfyUI: copy the .safetensors file into their LoRA folder."
                                  if weight_name else ""))
    if denoiser_class != "UNet2DConditionModel":  # SD3 and FLUX: the transformer alone, the rest from the base
        return (f"```python\nfrom diffusers import {pipeline_class}, {denoiser_class}\n\n"
                f"transformer = {denoiser_class}.from_single_file(\"{weight_name}\", config=\"{base}\", "
                "subfolder=\"transformer\")\n"
                f"pipe = {pipeline_class}.from_pretrained(\"{base}\", transformer=transformer)\n```\n\n"
                "ComfyUI: copy the file into `models/unet` (`models/diffusion_models`) and load it with the base "
                "model's text encoders and VAE.")
    return (f"```python\nfrom diffusers import {pipeline_class}\n\n"
            f"pipe = {pipeline_class}.from_single_file(\"{weight_name}\")\n```\n\n"
            "A1111 and ComfyUI: copy the file into their checkpoints folder.")


LORA_PLACES = {"ComfyUI": "`models/loras`", "A1111": "`models/Lora` (A1111, Forge)",
               "kohya sd-scripts": "`--network_weights`, merge scripts", "diffusers": "`pipe.load_lora_weights`"}


def _where_it_loads(folder) -> list[str]:
    """For a LoRA export, the table the export measured: what each program reads of the file, and the share of
    the erasure's change in the denoiser's output that is."""
    record = Path(folder) / "concept_erase.json" if folder is not None else None
    if record is None or not record.is_file():
        return []
    summary = json.loads(record.read_text(encoding="utf-8"))
    if "programs" not in summary:
        return []
    lines = ["## Where it loads", "",
             f"`{summary['file']}` ({summary['form']} form), as each program applies it, measured at export on the "
             "concept prompts at four timesteps:", "",
             "| program | where | tensors read | share of the erasure's output change |", "|---|---|---|---|"]
    lines += [f"| {p} | {LORA_PLACES.get(p, '')} | {r['tensors']} of {r['of']} | {r['output_change_kept']:.1%} |"
              for p, r in summary["programs"].items()]
    if summary.get("dropped"):
        lines += ["", f"Left out, as no LoRA of this form can hold them: {len(summary['dropped'])} changed tensor(s) "
                      f"(e.g. `{summary['dropped'][0]}`). The full erasure is in the run's `erased.safetensors` "
                      "(`concept-erase export --format diffusers` or `single-file`)."]
    return lines + [""]


def card_text(meta: dict, *, fmt: str, repo: str = "<this repository>", weight_name: str = "",
              results: dict | None = None, grids: list[str] = (), folder=None) -> str:
    """The whole card: front matter and text. `meta` is the erasure's metadata (`read_delta`); `folder` the
    exported diffusers folder (its index says which parts it leaves out)."""
    from huggingface_hub import ModelCardData

    family = delta_family(meta)
    base = meta["base_model"]
    concepts = json.loads(meta["concepts"])
    anchors = json.loads(meta.get("anchors", "[]"))
    settings = json.loads(meta.get("settings", "{}"))
    license_ = base_license(base)
    data = ModelCardData(base_model=_hub_id(base), license=license_, library_name="diffusers",
                         pipeline_tag="text-to-image",
                         tags=["concept-erasure", "concept-erase", "diffusers", "text-to-image",
                               *FAMILY_TAGS.get(family.name, []), *(["lora"] if fmt == "lora" else [])])
    edit = meta.get("edit") == "closed-form"
    shown = ("steps", "lr", "eps", "beta", "lambda_update", "eta", "forget_loss", "retain_loss", "batch_size",
             "retain_batch_size", "mixed_precision", "seed", "lora_rank")
    if edit:  # a closed-form edit: its own settings, none of training's
        shown = ("remap_to", "uce_regularization", "uce_preserve_weight", "uce_tokens")
    shown = [k for k in shown if k in settings and (k != "lora_rank" or meta["train"] == "lora")]
    rows = "\n".join(f"| {k} | {_fmt(settings[k]) if settings[k] != [] else 'none'} |" for k in shown)
    lines = [
        f"# {', '.join(concepts)} erased from {base}", "",
        f"This model is **{base}** with {'the concept' if len(concepts) == 1 else 'the concepts'} "
        + ", ".join(f"**{c}**" for c in concepts) + " erased by concept-erase ("
        + ("UCE's closed-form edit, arXiv 2308.14761" if edit else "utility-preserving unlearning, arXiv 2510.22124")
        + "), exported as "
        + {"diffusers": "a diffusers pipeline", "lora": "LoRA weights", "single-file": "one original-layout file"}[fmt]
        + ".", "",
        "## What was done", "",
        "| | |", "|---|---|",
        f"| erased | {', '.join(concepts)} |",
        *(["| requests, in order (each run continued the one before; the original model is the base) | "
           + "; ".join(f"{i}. {', '.join(r['concepts'])} ({r.get('method')}, {r.get('steps')} steps)"
                       for i, r in enumerate(json.loads(meta['chain']), 1)) + " |"] if meta.get("chain") else []),
        f"| kept (anchors) | {', '.join(anchors) if anchors else '(real images)'} |",
        f"| prompt variants (each concept and anchor also drawn inside) | "
        f"{', '.join(settings.get('concept_variants') or []) or 'none: the bare prompts only'} |",
        f"| method | {meta['method']}{' (a closed-form edit, no training)' if edit else ''} |",
        f"| {'edited' if edit else 'trained'} subset | {meta['train']} |",
        *([] if edit else [f"| optimizer steps | {meta['steps']} |",
                           f"| final lambda | {_fmt(float(meta.get('lambda_final', 'nan')))} |"]),
        f"| base model | {base} |",
        f"| base digest (SHA-256 of the denoiser's weights) | `{meta['base_model_digest']}` |",
        f"| licence | {license_ or 'not known: the base model licence applies; set `license` above before publishing'} |",
        "", "Settings:", "", "| setting | value |", "|---|---|", rows, "",
        "## How to load it", "", _loading(fmt, family.pipeline_classes[0], repo, weight_name, base, folder,
                                           family.denoiser_class), "",
        *_where_it_loads(folder),
    ]
    if results:
        lines += [f"## Evaluation (`concept-erase eval`, suite {results.get('suite', '?')})", "",
                  f"Evaluated: model {results.get('model', '?')}, weights {results.get('weights') or '(none)'}.", "",
                  "| summary | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results["summary"].items() if not isinstance(v, (dict, list))]
        lines += ["", "| metric | group | value | images |", "|---|---|---|---|"]
        for r in results["metrics"]:
            values = ", ".join(f"{k} {_fmt(v)}" for k, v in r["value"].items()
                               if isinstance(v, (int, float)) and k != "images")
            lines.append(f"| {r['metric']} | {r['group']} | {values} | {r['value'].get('images', '')} |")
        lines += [""] + [f"![{Path(g).stem}]({g})" for g in grids] + ([""] if grids else [])
    else:
        lines += ["## Evaluation", "", "Not attached: `concept-erase export ... --eval EVAL_DIR` puts the tables of "
                  "`concept-erase eval` here.", ""]
    lines += ["## Limitations", "",
              "Erasure lowers how often the concept is drawn from ordinary prompts; optimised prompts can bring "
              "some of it back (`concept-erase attack` measures how often). Check the model on your own prompts "
              "before relying on it.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def write_card(target: Path, meta: dict, *, fmt: str, eval_dir: str = "", weight_name: str = "") -> Path:
    """Write the card into `target` (an export folder: README.md, and the evaluation's grids under eval/) or
    beside a single file (NAME.md). Returns the card's path."""
    results = read_eval(eval_dir) if eval_dir else None
    grids: list[str] = []
    folder = target if target.is_dir() else None
    if results and folder is not None:
        for png in sorted(Path(results["_dir"], "grids").glob("*.png")):
            (folder / "eval").mkdir(exist_ok=True)
            shutil.copyfile(png, folder / "eval" / png.name)
            grids.append(f"eval/{png.name}")
    path = folder / "README.md" if folder is not None else target.with_suffix(".md")
    write_text(path, card_text(meta, fmt=fmt, results=results, grids=grids, folder=folder,
                               weight_name=weight_name or ("" if folder is not None else target.name)))
    return path


def check_push(repo_id: str) -> None:
    """At the door, before any export work: a repository name, a network and a token."""
    from huggingface_hub import constants, get_token

    if not HUB_ID.match(repo_id):
        raise UserError(f"--push-to-hub {repo_id!r}: give a repository as OWNER/NAME")
    if constants.HF_HUB_OFFLINE:
        raise UserError("--push-to-hub: the Hub is off (HF_HUB_OFFLINE=1, concept-erase's default); run the export "
                        "with HF_HUB_OFFLINE=0 to push, or upload the folder later with `hf upload REPO_ID FOLDER`")
    if not get_token():
        raise UserError("--push-to-hub: no Hub token; run `hf auth login` (or set HF_TOKEN) and export again")


def push(output: Path, repo_id: str, *, private: bool = False) -> str:
    """Upload the export (a folder, or a single file and its card) to `repo_id`; the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if output.is_dir():
            api.upload_folder(folder_path=str(output), repo_id=repo_id, commit_message="concept-erase export")
        else:
            api.upload_file(path_or_fileobj=str(output), path_in_repo=output.name, repo_id=repo_id)
            card = output.with_suffix(".md")
            if card.is_file():
                api.upload_file(path_or_fileobj=str(card), path_in_repo="README.md", repo_id=repo_id)
    except Exception as err:  # noqa: BLE001 - network, permission, quota: one line, the export stays
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({first}); the export is kept in {output}: "
                        f"upload it later with `hf upload {repo_id} {output}`") from None
    return str(url)


def warn_other_weights(results: dict, run: str) -> None:
    """An evaluation of other weights than the exported run's is said, not refused."""
    evaluated = results.get("weights") or ""
    mine = Path(run) if Path(run).is_file() else Path(run) / "erased.safetensors"
    if not evaluated or Path(evaluated).expanduser().resolve() != mine.expanduser().resolve():
        print(f"warning: --eval {results['_dir']} evaluated weights {evaluated or '(none: the base model)'}, "
              f"not {mine}; the card says so", file=sys.stderr)
