"""Every command's settings, declared once: type, default, range and meaning.

Each setting is a dataclass field made with `setting(default, help, ...)`. The same declaration
drives the command line (`add_flags`: flag names, types, `--help` with default and range), the
checks (`check_fields`: range, finiteness, choices, paths) and, for `erase`, the YAML recipe
(`config.build_config` reads a file into the same dataclass). Checks run at the door: before any
output is touched and before a model is loaded.

Why not pydantic or jsonargparse: neither is among the toolkit's dependencies, and what is needed
here (a range and a path kind per field, and argparse flags generated from them) is about a hundred
lines on the standard library's dataclasses and argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concept_erase.errors import UserError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 2^64 - 1; numpy's SeedSequence any size

# Path kinds: what a path setting must be before the command runs.
IN_FILE, IN_DIR, IN_ANY = "in-file", "in-dir", "in-any"  # must exist (a file / a folder / either)
OUT_DIR, OUT_FILE = "out-dir", "out-file"  # will be written: its kind if it exists, and a writable place


def setting(default, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None, path: str | None = None,
            flag: str | None = None, aliases: tuple = (), repeat: bool = False, positional: bool = False,
            required: bool = False, metavar: str | None = None, nonempty: bool = False, hidden: bool = False,
            resumable: bool = False):
    """A dataclass field with its command-line and checking metadata.

    ge/gt/le/lt: numeric bounds (every float must also be finite); choices: allowed values; path: one of
    the path kinds above (empty means "not given"); repeat: a list filled by repeating the flag;
    nonempty: strings (or each list item) must hold something other than spaces; resumable: a resumed run may
    take another value than its checkpoint's (it changes how long the run goes, where it writes or what it shows,
    not what a step trains).
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "path": path, "flag": flag,
            "aliases": aliases, "repeat": repeat, "positional": positional, "required": required,
            "metavar": metavar, "nonempty": nonempty, "hidden": hidden, "resumable": resumable}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    if f.metadata.get("positional"):
        return f.name
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def _kind(f: dataclasses.Field):
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {"int": int, "float": float, "bool": bool, "list": list}.get(name, str)


def _range_text(meta: dict) -> str:
    parts = []
    if meta.get("choices"):
        return "one of: " + ", ".join(map(str, meta["choices"]))
    lo = meta.get("ge")
    lo_open = meta.get("gt")
    hi = meta.get("le")
    if lo is not None and hi is not None:
        parts.append(f"{lo} to {_num(hi)}")
    elif lo is not None:
        parts.append(f"at least {lo}")
    elif lo_open is not None:
        parts.append(f"above {lo_open}" + (f", at most {_num(hi)}" if hi is not None else ""))
    elif hi is not None:
        parts.append(f"at most {_num(hi)}")
    if meta.get("lt") is not None:
        parts.append(f"below {_num(meta['lt'])}")
    return ", ".join(parts)


def _num(x) -> str:
    return "2^63 - 1" if x == 2**63 - 1 else str(x)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "none" if f.default in ("", None) else repr(f.default)
    return "none"


def add_flags(parser: argparse.ArgumentParser, cls, *, suppress_defaults: bool = False) -> None:
    """Add one flag per field of `cls`. With `suppress_defaults`, flags not given are absent from the
    namespace (erase: a YAML file fills them); otherwise the declared default is used."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind = _kind(f)
        help_text = meta["help"]
        says_default = kind in (bool, list) or meta.get("required") or "default" in help_text
        extra = "; ".join(x for x in ("" if says_default else f"default: {_default_text(f)}",
                                      _range_text(meta)) if x)
        # argparse formats help with %: a literal one ("10%") must be doubled
        shown = argparse.SUPPRESS if meta.get("hidden") else (f"{help_text} ({extra})" if extra else help_text).replace("%", "%%")
        default = argparse.SUPPRESS if suppress_defaults else (
            f.default if f.default is not dataclasses.MISSING else f.default_factory())
        if meta.get("positional"):
            parser.add_argument(f.name, help=shown, nargs="+" if kind is list else None)
            continue
        name = flag_name(f)
        if kind is bool:  # both forms, so that a flag can undo what a recipe or --config file set
            hidden = meta.get("hidden")
            if f.default:
                parser.add_argument(f"--no-{name[2:]}", dest=f.name, action="store_false", default=default,
                                    help=argparse.SUPPRESS if hidden else f"do not: {help_text}".replace("%", "%%"))
                parser.add_argument(name, dest=f.name, action="store_true", default=default,
                                    help=argparse.SUPPRESS if hidden else f"turn {name} back on (a recipe or --config "
                                                                          "may have turned it off)")
            else:
                parser.add_argument(name, dest=f.name, action="store_true", default=default, help=shown)
                parser.add_argument(f"--no-{name[2:]}", dest=f.name, action="store_false", default=default,
                                    help=argparse.SUPPRESS if hidden else f"turn {name} off (a recipe or --config may "
                                                                          "have turned it on)")
        elif kind is list:
            parser.add_argument(name, *meta.get("aliases", ()), dest=f.name, action="append", help=shown,
                                default=argparse.SUPPRESS if suppress_defaults else None,
                                metavar=meta.get("metavar") or f.name.upper())
        else:
            parser.add_argument(name, *meta.get("aliases", ()), dest=f.name, type=_typed(kind, name),
                                help=shown, default=default, required=meta.get("required", False),
                                metavar=meta.get("metavar") or f.name.upper())


def _typed(kind, name: str):
    """argparse `type=`: a conversion whose failure names the flag and the kind of value wanted."""
    if kind is str:
        return str

    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    convert.__name__ = kind.__name__
    return convert


def from_namespace(cls, ns: argparse.Namespace):
    """The dataclass `cls` filled from parsed flags (appended lists default to empty)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(ns, f.name):
            v = getattr(ns, f.name)
            values[f.name] = [] if v is None and _kind(f) is list else v
    return cls(**values)


def changed_from_default(opts, names) -> list[str]:
    """The flags among `names` (field names) whose values differ from their declared defaults: the settings a user
    set, where the parser does not say which flags it saw."""
    fields = {f.name: f for f in dataclasses.fields(opts)}
    changed = [fields[n] for n in names if getattr(opts, n) != fields[n].default]
    return [flag_name(f).replace("--", "--no-", 1) if getattr(opts, f.name) is False else flag_name(f)
            for f in changed]


# ---------------------------------------------------------------- the reference page
def field_groups(cls) -> dict[str, str]:
    """{field name: the heading of its group}: the `# comment` lines that head groups of fields in the class's
    source."""
    import inspect

    groups, heading = {}, ""
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("# "):
            heading = text[2:]
        elif ":" in text and text.split(":")[0].isidentifier() and heading:
            groups[text.split(":")[0]] = heading
    return groups


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def settings_reference(cls, hidden: bool = False) -> str:
    """A Markdown table per group of `cls`'s declared settings: flag, YAML key, default, allowed values and what it
    does, from the declarations themselves (so the page cannot drift from the code)."""
    groups = field_groups(cls)
    lines, current = [], None
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or (meta.get("hidden") and not hidden):
            continue
        group = groups.get(f.name, "other settings")
        if group != current:
            current = group
            lines += ["", f"### {group[0].upper() + group[1:]}", "",
                      "| flag | YAML key | default | allowed | what it does |", "|---|---|---|---|---|"]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "(none)" if default in ("", None, []) else (
            ", ".join(map(str, default)) if isinstance(default, list) else str(default).lower()
            if isinstance(default, bool) else str(default))
        allowed = _range_text(meta) or ("true or false" if _kind(f) is bool else
                                        "a path" if meta.get("path") else "")
        if meta.get("resumable"):
            allowed = (allowed + "; " if allowed else "") + "a resume may change it"
        lines.append(f"| `{flag_name(f)}` | `{f.name}` | {_cell(shown)} | {_cell(allowed)} | {_cell(meta['help'])} |")
    return "\n".join(lines[1:]) + "\n"


# ---------------------------------------------------------------- checks
def check_value(f: dataclasses.Field, value: Any, where: str = "") -> None:
    """Raise a one-line UserError when `value` breaks the field's declaration."""
    meta, name = f.metadata, where or flag_name(f)
    kind = _kind(f)
    if kind in (int, float) and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, not {value!r}")
        if kind is int and not isinstance(value, int):
            raise UserError(f"{name} must be a whole number, not {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, not {value}")
        rng = _range_text(meta)
        if ((meta.get("ge") is not None and value < meta["ge"]) or (meta.get("gt") is not None and value <= meta["gt"])
                or (meta.get("le") is not None and value > meta["le"])
                or (meta.get("lt") is not None and value >= meta["lt"])):
            raise UserError(f"{name} must be {rng}, not {value}")
    if meta.get("choices") and value not in meta["choices"] and not (value == f.default and not meta.get("required")):
        raise UserError(f"{name} {value!r} is not one of: {', '.join(map(str, meta['choices']))}")
    items = value if isinstance(value, list) else [value]
    if meta.get("nonempty"):
        for item in items:
            if isinstance(item, str) and not item.strip():
                raise UserError(f"{name} is empty; give it some text (an empty prompt is the one classifier-free "
                                "guidance draws from, not a concept)" if "concept" in name else f"{name} is empty")
    for item in items:
        if isinstance(item, str) and "\x00" in item:
            raise UserError(f"{name} holds a NUL character; remove it")
    if meta.get("path"):
        for item in items:
            if item:
                check_path(str(item), meta["path"], name)


def check_fields(obj, where=None) -> None:
    """Check every declared field of a settings dataclass. `where(field)` may name a field for the
    message (a YAML key instead of a flag)."""
    for f in dataclasses.fields(obj):
        if "help" in f.metadata:
            check_value(f, getattr(obj, f.name), where(f) if where else "")


def check_path(value: str, kind: str, name: str) -> None:
    path = Path(value).expanduser()
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # said below: missing, or under a file
        pass
    except (OSError, ValueError) as err:  # a name too long, a loop of links, a NUL byte
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise UserError(f"{name} {shown}: not a usable path ({getattr(err, 'strerror', None) or err})") from None
    if kind in (IN_FILE, IN_DIR, IN_ANY):
        if not path.exists():
            raise UserError(f"{name} {value} does not exist")
        if kind == IN_FILE and not path.is_file():
            raise UserError(f"{name} {value} is a folder; give a file")
        if kind == IN_DIR and not path.is_dir():
            raise UserError(f"{name} {value} is a file; give a folder")
        if not os.access(path, os.R_OK):
            raise UserError(f"{name} {value} cannot be read (permission denied)")
        return
    if path.exists():
        if kind == OUT_DIR and not path.is_dir():
            raise UserError(f"{name} {value} is a file; choose a folder path")
        if kind == OUT_FILE and path.is_dir():
            raise UserError(f"{name} {value} is a folder; choose a file path")
    check_writable(path, name)


def check_writable(path: Path, name: str) -> None:
    """Can something be created at `path`? Probes the nearest existing folder with a real file, so a
    read-only file system or a folder the user may not write is found before any work is done."""
    parent = path.parent if not path.is_dir() else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{name} {path}: {parent} is a file, so nothing can be created under it; choose another path")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".concept-erase-probe-"):
            pass
    except OSError as err:
        raise UserError(f"{name} {path}: cannot write in {parent} ({err.strerror or err}); choose another path") from None


def check_device(value: str, name: str = "--device") -> None:
    """'' (automatic), cpu, cuda, cuda:N or mps, checked against what this machine has."""
    if not value:
        return
    import torch

    if value == "cpu":
        return
    if value == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"{name} mps: this machine has no Apple GPU; use cpu")
        return
    head, _, index = value.partition(":")
    if head != "cuda" or (index and not index.isdigit()):
        raise UserError(f"{name} {value!r} is not a device; use cpu, cuda, cuda:N or mps (or leave it out)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"{name} {value}: this machine has no CUDA GPU; use cpu (or leave --device out)")
    if index and int(index) >= count:
        raise UserError(f"{name} {value}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")


# ---------------------------------------------------------------- the commands other than erase
# Settings several commands share, declared once so that every command says the same about them.
def _device():
    return setting("", "cpu, cuda, cuda:N or mps (default: cuda when there is one)")


def _model_config():
    return setting("", "configs for a single-file model: a diffusers folder or hub id")


def _allow_pickle():
    return setting(False, "allow loading a pickled .ckpt (it can run code)")


def _allow_other_base():
    return setting(False, "apply even if the base model's digest differs from the run's")


def _overwrite(what: str = "an existing output"):
    return setting(False, f"replace {what}, once the new one is complete")


def _negative_prompt():
    return setting("", "negative prompt of every image (classifier-free guidance steers away from it)")


def _dtype():
    return setting("fp32", "the pipeline's precision: fp32, fp16 or bf16 (half precision: a GPU)",
                   choices=("fp32", "fp16", "bf16"))


def _progress():
    return setting(True, "show a progress bar")


@dataclass
class ExportOptions:
    run: str = setting("", "run folder or its erased.safetensors", positional=True, path=IN_ANY)
    format: str = setting("", "diffusers: a pipeline folder; lora: LoRA weights; single-file: one "
                              "original-layout .safetensors (A1111, ComfyUI)", choices=("diffusers", "lora", "single-file"),
                          required=True)
    output: str = setting("", "where to write: a folder (diffusers, lora) or a .safetensors file (single-file)",
                          required=True)
    model: str = setting("", "base model (default: the one the run was made from)")
    model_config: str = _model_config()
    rank: int = setting(16, "LoRA rank when factoring a non-LoRA run (--format lora)", ge=1, le=4096)
    exact_svd: bool = setting(False, "factor with the exact SVD (default: randomized SVD for matrices of 256 or "
                                     "more rows and columns)")
    lora_format: str = setting("", "--format lora: kohya (one file of lora_unet_* keys that ComfyUI, A1111, kohya's "
                                   "scripts and diffusers read; no biases; the default for SD 1.x/2.x and SDXL) or "
                                   "diffusers (PEFT keys for pipe.load_lora_weights, with biases; the form of SD3 and "
                                   "FLUX)", choices=("kohya", "diffusers"))
    eval: str = setting("", "an evaluation of this run (the --output of `concept-erase eval`): its tables and grids go "
                            "into the model card", path=IN_ANY)
    push_to_hub: str = setting("", "upload the export and its card to this Hub repository (OWNER/NAME; needs a network "
                                   "and `hf auth login`)", metavar="REPO_ID")
    private: bool = setting(False, "--push-to-hub: create the repository private")
    lora_bias: bool = setting(True, "in the diffusers form, carry changed biases as lora_B.bias (load_lora_weights "
                                    "reads them; fuse_lora and ComfyUI cannot use them)")
    overwrite: bool = _overwrite()
    allow_other_base: bool = _allow_other_base()
    allow_pickle: bool = _allow_pickle()


@dataclass
class SampleOptions:
    model: str = setting("", "base model: folder, hub id, single file, or builtin:digits / builtin:tiny",
                         required=True, nonempty=True)
    prompt: list = setting([], "prompt (repeat for several)", repeat=True, nonempty=True, metavar="PROMPT")
    output: str = setting("", "folder for the images, grid.png and images.json", required=True, path=OUT_DIR)
    weights: str = setting("", "erased.safetensors (or its run folder) to apply", path=IN_ANY)
    seeds: str = setting("0-3", "which seeds: a range like 0-7, a list like 1,4,9, or one number")
    inference_steps: int = setting(30, "the sampler's denoising steps", ge=1, le=1000)
    guidance: float = setting(7.5, "classifier-free guidance scale", ge=0, le=100)
    negative_prompt: str = _negative_prompt()
    batch_size: int = setting(4, "images per pipeline call", ge=1, le=4096)
    dtype: str = _dtype()
    device: str = _device()
    model_config: str = _model_config()
    overwrite: bool = _overwrite()
    allow_other_base: bool = _allow_other_base()
    allow_pickle: bool = _allow_pickle()
    progress: bool = _progress()


@dataclass
class EvalOptions:
    suite: str = setting("", "suite YAML, e.g. eval/digits.yaml", required=True, path=IN_FILE)
    model: str = setting("", "base model: folder, hub id, single file, or builtin:digits", required=True, nonempty=True)
    output: str = setting("", "folder: images/, results.json, results.md, grids/", required=True, path=OUT_DIR)
    weights: str = setting("", "erased.safetensors (or the run folder) to apply", path=IN_ANY)
    erased: list = setting([], "concept value that was erased (repeat); default: the run's concepts found in "
                               "the prompt set", repeat=True, nonempty=True, metavar="VALUE")
    seeds_per_prompt: int = setting(0, "seeds per prompt, from each row's seed up (0: the suite's)", ge=0, le=100000)
    limit: int = setting(0, "evaluate only the first N prompts, a quick look (0: all)", ge=0)
    negative_prompt: str = _negative_prompt()
    batch_size: int = setting(0, "images per pipeline call (0: the suite's)", ge=0, le=4096)
    dtype: str = _dtype()
    device: str = _device()
    clip_model: str = setting("", "open_clip model name for the CLIP classifiers (default: the suite's)")
    clip_weights: str = setting("", "local open_clip weights file for that model", path=IN_FILE)
    clip_score_model: str = setting("", "transformers CLIP folder (or hub id) for CLIP score")
    inception_weights: str = setting("", "FID Inception weights (torch-fidelity .pth or TorchScript)", path=IN_FILE)
    fid_reference: str = setting("", "'base' or a folder of reference images (default: the suite's)")
    cache_dir: str = setting("", "where FID statistics and converted weights are cached", path=OUT_DIR)
    model_config: str = _model_config()
    allow_pickle: bool = _allow_pickle()
    allow_other_base: bool = _allow_other_base()
    overwrite: bool = _overwrite("an output that holds another evaluation")
    progress: bool = _progress()


@dataclass
class AttackOptions:
    model: str = setting("", "base model: folder, hub id, single file, or builtin:digits", required=True, nonempty=True)
    weights: str = setting("", "erased.safetensors (or its run folder) to attack; without it, the base model itself",
                           path=IN_ANY)
    concept: str = setting("", "the erased concept: a digit or style on the digits models, 'nudity', an object or an "
                           "artist", required=True, nonempty=True)
    attack: str = setting("unlearndiff", "unlearndiff: K optimised prompt tokens (UnlearnDiffAtk); textual-inversion: "
                          "K learnt embedding vectors; ring-a-bell: a K-token prompt found by a genetic search on the "
                          "text encoder alone (Ring-A-Bell); none: the pre-attack rate alone",
                          choices=["unlearndiff", "textual-inversion", "ring-a-bell", "none"])
    pairs: str = setting("", "ring-a-bell: a text file of prompt pairs that build the concept vector, one a line: the "
                         "prompt with the concept, a tab, the prompt without it; default: the attacked prompts with "
                         "and without the concept's words", path=IN_FILE)
    prompts: int = setting(8, "how many prompts of the concept to attack", ge=1, le=100000)
    iterations: int = setting(None, "optimisation steps per timestep (textual-inversion: x timesteps in all; "
                              "ring-a-bell: generations); default: 10 on the digits models, 40 otherwise (the paper's); "
                              "ring-a-bell: 100 on the digits models, 3000 otherwise (the paper's)", ge=1, le=100000)
    timesteps: int = setting(None, "timesteps taken in turn, each ending with a drawing and the judge; default: 10 on the "
                             "digits models, 50 otherwise (the paper's)", ge=1, le=1000)
    tokens: int = setting(None, "adversarial tokens K in front of the prompt; default: 5 for nudity, 3 otherwise (the "
                          "paper's); ring-a-bell: the whole prompt's length, 16 (the paper's)", ge=1, le=70)
    output: str = setting("", "folder: results.json, report.md, grid.png, the images", required=True, path=OUT_DIR)
    judge: str = setting("", "nudity (NudeNet, score above 0.45), clip (zero-shot over --classes) or a built-in "
                         "model's own judge by its name (digits: the digits models'); default: the model's own where it "
                         "has one, nudity for 'nudity'")
    classes: str = setting("", "the clip judge's classes, comma-separated (the concept is added)")
    clip_model: str = setting("ViT-L-14", "open_clip model of the clip judge")
    clip_weights: str = setting("", "local open_clip weights file of the clip judge", path=IN_FILE)
    templates: str = setting("object", "the clip judge's prompt templates", choices=["object", "style"])
    prompt_file: str = setting("", "CSV of prompts (the project's, I2P's or COCO's form); rows naming the concept are "
                               "taken first; default: prompts the judge makes", path=IN_FILE)
    inference_steps: int = setting(None, "the sampler's denoising steps of each drawing; default: 25 on the digits "
                                   "models, 50 otherwise", ge=1, le=1000)
    guidance: float = setting(None, "classifier-free guidance of each drawing; default: 4.0 on the digits models, 7.5 "
                              "otherwise", ge=0, le=100)
    device: str = _device()
    model_config: str = _model_config()
    allow_pickle: bool = _allow_pickle()
    allow_other_base: bool = _allow_other_base()
    overwrite: bool = _overwrite("an output that holds another attack")
    progress: bool = _progress()


@dataclass
class DemoOptions:
    output: str = setting("runs/demo", "folder for report.md, report.json, grid.png, run/", path=OUT_DIR)
    model: str = setting("builtin:digits", "the digits model: builtin:digits (SD) or builtin:digits-flow "
                                           "(flow-matching, SD3's structure)", choices=("builtin:digits",
                                                                                        "builtin:digits-flow"))
    digit: str = setting("three", "the digit to erase, by name",
                         choices=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
    config: str = setting("", "erasure recipe (default: the shipped digits-erase.yaml)", path=IN_FILE)
    method: str = setting("", "override the recipe's method: eupmu, eupmu-fast, ungrad, fixed, esd, or uce (a "
                                  "closed-form edit: the recipe's training settings are left out)")
    steps: int = setting(0, "override the recipe's steps (0: the recipe's)", ge=0, le=1000000)
    concept_variants: list = setting([], "override the recipe's prompt variants: auto (the digit in every style "
                                         "phrase), none, a template ('{} in red ink') or a file of templates "
                                         "(repeat to combine)",
                                     repeat=True, nonempty=True, metavar="auto|none|TEMPLATE|FILE")
    seeds_per_digit: int = setting(16, "seeds per digit in the evaluation", ge=1, le=10000)
    overwrite: bool = _overwrite()
    progress: bool = _progress()


@dataclass
class BenchOptions:
    config: str = setting("", "benchmark file (default: the shipped bench-heldout.yaml, also in pipelines/)",
                          path=IN_FILE)
    output: str = setting("runs/bench", "folder: bench.md, bench.json, pareto.png, runs/ (a rerun continues)",
                          path=OUT_DIR)
    seeds: str = setting("", "which seeds (override the benchmark file's): a list like 0,1, a range like 0-2, or one")
    concepts: str = setting("", "override the concepts, e.g. 'three,red ink'")
    only: list = setting([], "run only this method label (repeat)", repeat=True, nonempty=True, metavar="LABEL")
    report_only: bool = setting(False, "write the report from the finished runs; run nothing")
    runs_from: list = setting([], "a bench.json from another machine or output (repeat): its finished runs join "
                              "OUTPUT/runs (a run already there is kept), so a benchmark can be split across "
                              "machines and reported whole", repeat=True, path=IN_FILE, metavar="BENCH_JSON")
    progress: bool = _progress()


@dataclass
class CompareOptions:
    results: list = setting([], "output folders of `concept-erase eval` (or their results.json)", positional=True,
                            path=IN_ANY)
    output: str = setting("", "folder for comparison.md, comparison.json, pareto.png", required=True, path=OUT_DIR)
    label: list = setting([], "a name per evaluation, in order (repeat)", repeat=True, nonempty=True)
    quality: str = setting("retain_accuracy", "the y axis",
                           choices=("retain_accuracy", "fid", "domain_fid", "clip_score"))
    overwrite: bool = _overwrite()
