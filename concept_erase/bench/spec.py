"""A benchmark file: what runs (recipe, concepts, seeds, method entries, eps sweep), how each run is
evaluated, and the plan of runs. Checked whole before any run starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from concept_erase.attacks.methods import ATTACKS
from concept_erase.bench.world import BenchWorld, world_of
from concept_erase.config import RECIPES, build_config, is_edit, load_yaml, normalise_keys, settings_for
from concept_erase.errors import UserError
from concept_erase.image_seeds import CHECK_SEED_START, describe, overlap, seed_range
from concept_erase.methods.stopping import check_seeds, judge_name
from concept_erase.yaml_files import read_yaml, whole_number

ATTACK_DEFAULTS = {"method": "unlearndiff", "prompts": 5, "iterations": 10, "timesteps": 10, "tokens": 3}
FORGET_TARGET = 0.10
RETAIN_DROP = 0.03


SPLITS = ("tuning", "held_out")  # a benchmark file's splits: settings are chosen on the first, reported on the second


@dataclass
class Split:
    """Concepts, run seeds and the evaluation's image seeds of one part of a benchmark. The tuning split is where
    settings are chosen; the held-out split is what the headline reports, on concepts, run seeds and image seeds
    that no choice saw."""
    name: str
    concepts: list[str]
    seeds: list[int]
    evaluation_seed_start: int = 0
    edit_seed: int | None = None  # the one run seed of a closed-form edit: the first the file names (see `plan`)

    def __post_init__(self):
        if self.edit_seed is None and self.seeds:
            self.edit_seed = self.seeds[0]


@dataclass
class BenchSpec:
    recipe: Path
    concepts: list[str]
    seeds: list[int]
    methods: list[dict]
    splits: list[Split] = field(default_factory=list)  # none declared: one split "all" of concepts and seeds
    eps_sweep: list[float] = field(default_factory=list)
    eval_seeds: int = 16
    eval_steps: int = 25
    eval_guidance: float = 4.0
    eval_every: int = 50
    eval_final_seeds: int = 0  # images per prompt at the final evaluations (0: eval_seeds)
    eval_tiers: bool = False  # the final evaluations also judge each concept in the world's prompt tiers
    held_time_reference: str = ""  # the label eupmu's time to held target is compared with
    memory_probe_steps: int = 10
    timing_rounds: int = 8
    timing_steps: int = 5
    # the attacks on every run's erasure (concept-erase attack), each a column of the attack table: prompts 0 skips one
    attacks: list[dict] = field(default_factory=lambda: [dict(ATTACK_DEFAULTS)])
    source: str = ""
    sequential: bool = False  # each split's concepts erased one request after another, in order (`bench/sequence.py`)
    model: str = ""  # the recipe's model
    world: BenchWorld | None = None  # what the model's package says of its concepts and judging (`bench/world.py`)


def _number_list(raw: dict, key: str, default: list, kind, path: Path, low=None) -> list:
    value = raw.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              and math.isfinite(v) for v in value):
        raise UserError(f"{path}: {key} must be a list of numbers, not {value!r}")
    if kind is int and not all(float(v).is_integer() for v in value):
        raise UserError(f"{path}: {key} must be whole numbers, not {value!r}")
    if low is not None and any(v < low for v in value):
        raise UserError(f"{path}: every value of {key} must be at least {low}, not {value!r}")
    return [kind(v) for v in value]


SHIPPED_BENCH = RECIPES / "bench-heldout.yaml"  # the protocol: tuning and held-out splits, matched methods


def read_attacks(raw, path) -> list[dict]:
    """`attack:` of a benchmark file: one mapping, or a list of them (several attacks on every run, e.g.
    UnlearnDiffAtk and Ring-A-Bell), each with the settings it reads, unset ones at the attack's own defaults on the
    shipped models (Ring-A-Bell: 16 tokens, 100 generations); an attack with prompts 0 is left out."""
    entries = raw if isinstance(raw, list) else [raw or {}]
    out = []
    for i, attack in enumerate(entries):
        where = "attack" if not isinstance(raw, list) else f"attack[{i}]"
        if not isinstance(attack, dict) or sorted(set(map(str, attack)) - set(ATTACK_DEFAULTS)):
            raise UserError(f"{path}: {where} must be a mapping with some of {', '.join(ATTACK_DEFAULTS)} "
                            f"(prompts: 0 skips it), or a list of them, not {attack!r}")
        method = attack.get("method", ATTACK_DEFAULTS["method"])
        if method not in ATTACKS:
            raise UserError(f"{path}: {where}.method {method!r} is not one of: {', '.join(ATTACKS.names())}")
        unread = [k for k in ("iterations", "timesteps", "tokens") if k in attack and k not in ATTACKS.get(method).reads]
        if unread:
            raise UserError(f"{path}: {where}.{unread[0]} does nothing with {where}.method {method}; drop it")
        if any(a["method"] == method for a in out):
            raise UserError(f"{path}: {where} names {method} a second time; give each attack once")
        kind = ATTACKS.get(method)
        reads = [k for k in ("iterations", "timesteps", "tokens") if k in kind.reads]
        defaults = {**ATTACK_DEFAULTS, **kind.auto_settings(shipped=True)}  # the benchmark runs the shipped models
        out.append({"method": method, **{k: whole_number(attack, k, defaults[k], path, 0 if k == "prompts" else 1,
                                                         f"{where}.{k}") for k in ("prompts", *reads)}})
    return [a for a in out if a["prompts"]]


def load_bench(path: str | Path) -> BenchSpec:
    """Read and check a benchmark file, every method entry included: a mistake is found before any run."""
    path = Path(path)
    raw = read_yaml(path, "benchmark file", "start from pipelines/bench-heldout.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a benchmark file is a mapping (recipe:, concepts:, methods:)")
    known = {"recipe", "concepts", "seeds", "splits", "methods", "settings", "eps_sweep", "evaluation",
             "memory_probe_steps", "timing_probe", "held_time_reference", "attack", "sequential"}
    bad = sorted(set(map(str, raw)) - known)
    if bad:
        raise UserError(f"{path}: unknown key {bad[0]!r}; a benchmark file has {', '.join(sorted(known))}")
    # no recipe: the shipped protocol's (a benchmark file names the recipe its runs share)
    recipe_name = raw["recipe"] if "recipe" in raw else read_yaml(SHIPPED_BENCH, "benchmark file", "")["recipe"]
    if not isinstance(recipe_name, str) or not recipe_name:
        raise UserError(f"{path}: recipe must name a YAML file, not {recipe_name!r}")
    recipe = Path(recipe_name)
    if not recipe.is_absolute():
        local = path.parent / recipe
        recipe = local if local.is_file() else RECIPES / recipe.name
    if not recipe.is_file():
        raise UserError(f"{path}: recipe {recipe_name!r} not found (relative to the benchmark file, or a shipped recipe name)")
    model = load_yaml(recipe).get("model") or ""
    world = world_of(model, str(recipe))
    if "splits" in raw:
        if "concepts" in raw or "seeds" in raw:
            raise UserError(f"{path}: give concepts and seeds inside splits (tuning:, held_out:), not beside them")
        splits = _splits(raw["splits"], path, world)
        concepts = [c for sp in splits for c in sp.concepts]
        seeds = sorted({x for sp in splits for x in sp.seeds})
    else:
        concepts = _concepts(raw.get("concepts"), path, "concepts", world)
        seeds = _number_list(raw, "seeds", [0], int, path, low=0)
        if not seeds:
            raise UserError(f"{path}: seeds must list at least one seed")
        splits = [Split("all", concepts, seeds, 0)]
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) and isinstance(m.get("method"), str)
                                                              for m in methods):
        raise UserError(f"{path}: methods must be a list of {{method: NAME, ...settings}}")
    # Settings as the erase command names them (dashes or underscores, --lambda); the label is the bench's own.
    # `settings:` applies to every entry (an entry's own value wins): e.g. a file measured under an earlier
    # default keeps saying which.
    common = raw.get("settings") or {}
    if not isinstance(common, dict) or "label" in common or "method" in common:
        raise UserError(f"{path}: settings must be a mapping of erase settings for every entry (no label or "
                        f"method), not {common!r}")
    common = normalise_keys(common, f"{path}, settings")

    def shared(m) -> dict:  # a closed-form edit takes the common settings it reads, not the training ones
        return settings_for(common, m["method"])

    methods = [{**shared(m), **normalise_keys({k: v for k, v in m.items() if k != "label"}, f"{path}, method {m['method']!r}"),
                **({"label": m["label"]} if "label" in m else {})} for m in methods]
    eps = _number_list(raw, "eps_sweep", [], float, path, low=0)
    ev = raw.get("evaluation") or {}
    if not isinstance(ev, dict):
        raise UserError(f"{path}: evaluation must be a mapping (seeds:, steps:, guidance:, every:)")
    timing = raw.get("timing_probe") or {}
    if not isinstance(timing, dict) or sorted(set(map(str, timing)) - {"rounds", "steps"}):
        raise UserError(f"{path}: timing_probe must be a mapping with rounds: and steps: (rounds: 0 skips it), "
                        f"not {timing!r}")
    bad = sorted(set(map(str, ev)) - {"seeds", "final_seeds", "steps", "guidance", "every", "tiers"})
    if bad:
        raise UserError(f"{path}: evaluation has no key {bad[0]!r} (seeds, final_seeds, steps, guidance, every, tiers)")
    if not isinstance(ev.get("tiers", False), bool):
        raise UserError(f"{path}: evaluation.tiers must be true or false, not {ev['tiers']!r}")
    attacks = read_attacks(raw.get("attack"), path)
    reference = raw.get("held_time_reference", "")
    if not isinstance(reference, str):
        raise UserError(f"{path}: held_time_reference must be a method entry's label, not {reference!r}")
    guidance = ev.get("guidance", 4.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise UserError(f"{path}: evaluation.guidance must be a finite number, 0 or more, not {guidance!r}")
    spec = BenchSpec(recipe=recipe, concepts=concepts, seeds=seeds, methods=methods, splits=splits, eps_sweep=eps,
                     eval_seeds=whole_number(ev, "seeds", 16, path, 1, "evaluation.seeds"),
                     eval_steps=whole_number(ev, "steps", 25, path, 1, "evaluation.steps"),
                     eval_guidance=float(guidance), eval_every=whole_number(ev, "every", 50, path, 0, "evaluation.every"),
                     eval_final_seeds=whole_number(ev, "final_seeds", 0, path, 0, "evaluation.final_seeds"),
                     eval_tiers=ev.get("tiers", False),
                     held_time_reference=reference,
                     memory_probe_steps=whole_number(raw, "memory_probe_steps", 10, path, 0, "memory_probe_steps"),
                     timing_rounds=whole_number(timing, "rounds", 8, path, 0, "timing_probe.rounds"),
                     timing_steps=whole_number(timing, "steps", 5, path, 1, "timing_probe.steps"),
                     attacks=attacks, source=str(path), sequential=raw.get("sequential", False), model=model,
                     world=world)
    if spec.sequential:
        _check_sequential(spec, path)
    # Every run's settings are built now: an unknown key or a bad value in a method entry fails here,
    # not after an hour of other runs.
    labels = set()
    first = (splits[0].concepts[0], splits[0].seeds[0])
    for label, overrides, concept, seed in plan(spec):
        if (concept, seed) != first:
            continue
        if label in labels:
            raise UserError(f"{path}: two method entries are both labelled {label!r}; give each a distinct label")
        labels.add(label)
        fixed_here = sorted({"concepts", "concept", "anchors", "anchor", "output", "seed", "overwrite"} & set(overrides))
        if fixed_here:
            raise UserError(f"{path}, method {label!r}: {fixed_here[0]} is set by the benchmark itself; remove it")
        try:
            config = run_config(spec, overrides, concept, seed, Path("unused"), False)
        except UserError as err:
            raise UserError(f"{path}, method {label!r}: {err}") from None
        _check_seeds_apart(spec, config, label, path)
    if reference and reference not in labels:
        raise UserError(f"{path}: held_time_reference {reference!r} is not the label of a method entry "
                        f"({', '.join(sorted(labels))})")
    return spec



def _check_sequential(spec: BenchSpec, path: Path) -> None:
    """A sequential file: concepts of the world's chain kind only (each request is judged on all of them at once),
    trained methods only (a closed-form edit cannot be continued), no eps sweep."""
    if not isinstance(spec.sequential, bool):
        raise UserError(f"{path}: sequential must be true or false, not {spec.sequential!r}")
    kind = spec.world.chain_kind
    other = [c for c in spec.concepts if spec.world.kind(c) != kind]
    if other:
        raise UserError(f"{path}: a sequential benchmark erases one {kind} after another; {other[0]!r} is not a "
                        f"{kind}: leave it out")
    edits = [m["method"] for m in spec.methods if is_edit(m["method"])]
    if edits:
        raise UserError(f"{path}: a sequential benchmark continues each request's run, which a closed-form edit "
                        f"({edits[0]}) cannot be; leave it out of this file")
    if spec.eps_sweep:
        raise UserError(f"{path}: eps_sweep is not run in a sequential benchmark; leave it out")


def _concepts(value, path: Path, key: str, world: BenchWorld) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise UserError(f"{path}: {key} must list concepts of the model's world "
                        f"({', '.join(plural for _, plural in world.kinds)}), not {value!r}")
    for c in value:
        error = world.concept_error(c)
        if error:
            raise UserError(f"{path}: {key}: concept {error}")
    if len(set(value)) < len(value):
        raise UserError(f"{path}: {key} names a concept twice")
    return value


def _splits(raw, path: Path, world: BenchWorld) -> list[Split]:
    """`splits: {tuning: {concepts, seeds, evaluation_seed_start}, held_out: {...}}`: both declared, neither empty,
    sharing no concept, no run seed and no evaluation image seed."""
    if not isinstance(raw, dict) or set(map(str, raw)) != set(SPLITS):
        raise UserError(f"{path}: splits must declare exactly tuning: and held_out:, each with concepts:, seeds: "
                        f"and evaluation_seed_start:, not {raw!r}")
    out = []
    for name in SPLITS:
        part = raw[name]
        if not part:
            raise UserError(f"{path}: splits.{name} is empty; give it concepts: and seeds:")
        if not isinstance(part, dict) or sorted(set(map(str, part)) - {"concepts", "seeds", "evaluation_seed_start"}):
            raise UserError(f"{path}: splits.{name} is a mapping with concepts:, seeds: and evaluation_seed_start:, "
                            f"not {part!r}")
        concepts = _concepts(part.get("concepts"), path, f"splits.{name}.concepts", world)
        seeds = _number_list(part, "seeds", [], int, path, low=0)
        if not seeds:
            raise UserError(f"{path}: splits.{name}.seeds must list at least one run seed")
        start = whole_number(part, "evaluation_seed_start", 0, path, 0, f"splits.{name}.evaluation_seed_start")
        out.append(Split(name, concepts, seeds, start))
    tuning, held = out
    for what, a, b in (("concept", tuning.concepts, held.concepts), ("run seed", tuning.seeds, held.seeds)):
        shared = sorted(set(a) & set(b), key=str)
        if shared:
            raise UserError(f"{path}: the tuning and held-out splits share the {what} {shared[0]!r}; a held-out "
                            f"split has {what}s of its own")
    return out


def evaluation_seeds(spec: BenchSpec, split: Split) -> range:
    """Every image seed an evaluation of this split draws (the curve's and the final evaluation's)."""
    return seed_range(split.evaluation_seed_start, max(spec.eval_seeds, spec.eval_final_seeds or spec.eval_seeds))


def _check_seeds_apart(spec: BenchSpec, config, label: str, path: Path) -> None:
    """The splits' evaluations draw disjoint image seeds, and none that an entry's erasure check draws."""
    ranges = [(f"splits.{sp.name}" if sp.name != "all" else "the evaluation", evaluation_seeds(spec, sp))
              for sp in spec.splits]
    for i, (name_a, a) in enumerate(ranges):
        for name_b, b in ranges[i + 1:]:
            if len(overlap(a, b)):
                raise UserError(f"{path}: {name_a} and {name_b} evaluate on the same image seeds "
                                f"({describe(overlap(a, b))}); give each an evaluation_seed_start of its own")
        if config.stop_when_erased and len(overlap(a, check_seeds(config))):
            raise UserError(f"{path}, method {label!r}: its erasure checks draw {describe(check_seeds(config))}, "
                            f"which {name_a} evaluates on ({describe(overlap(a, check_seeds(config)))}); a check "
                            f"and the evaluation must not share images: leave check_seed_start at "
                            f"{CHECK_SEED_START} or move the evaluation's seeds")


def split_of(spec: BenchSpec, concept: str) -> Split:
    """The split a concept belongs to (the splits share no concept)."""
    return next(sp for sp in spec.splits if concept in sp.concepts)


def plan(spec: BenchSpec) -> list[tuple[str, dict, str, int]]:
    """(label, overrides, concept, seed) of every run: split by split (the tuning split first), seed by seed, concept
    by concept, every method and the eps sweep, so that a benchmark cut short still compares all methods on the
    concepts it finished."""
    eupmu = next((m for m in spec.methods if m["method"] == "eupmu"), {"method": "eupmu"})
    runs = []
    for split in spec.splits:
        for seed in split.seeds:
            for concept in split.concepts:
                for m in spec.methods:
                    # a closed-form edit draws nothing at random: each seed would give the same weights and the
                    # same images, so it runs once per concept, at the split's first seed
                    if is_edit(m["method"]) and seed != split.edit_seed:
                        continue
                    runs.append((str(m.get("label", m["method"])), dict(m), concept, seed))
                if seed == split.seeds[0]:
                    for eps in spec.eps_sweep:  # the eupmu entry's settings (same step budget), eps changed
                        label = f"eupmu eps={eps:g}"
                        runs.append((label, {**eupmu, "eps": eps, "label": label}, concept, seed))
    return runs


def run_settings(config, chained: bool = False) -> dict:
    """What a run record says of how its entry erased; a stored run must say the same as the run this benchmark
    file plans under its label (--runs-from). The check's bar only where the run checks; its floor of images per
    concept only where an image judge checks a `chained` request with the chain's earlier concepts: elsewhere the
    benchmark's checks are of one concept (which the world's judge reads as one group, `Judge.group`) on 32 images
    either way. Records made before the floor existed do not name it; nor does a request that shares the chain's
    draws evenly (--newest-share 0, the default) name its share, nor a run that stops at the first check at target
    (--check-confirm 1, the default) its confirmation."""
    checks = config.stop_when_erased
    images = checks and judge_name(config) != "signal"
    return {"method": config.method, "eps": config.eps, "lambda_init": config.lambda_init, "beta": config.beta,
            "lambda_update": config.lambda_update, "retain_loss": config.retain_loss, "steps_planned": config.steps,
            "lr": config.lr,
            "sampling_steps": config.sampling_steps,
            "trajectory_model": config.trajectory_model, "trajectory_refresh": config.trajectory_refresh,
            "stop_when_erased": checks,
            "stop_judge": judge_name(config) if checks else None,
            "stop_signal_at_most": config.stop_signal_at_most if checks and judge_name(config) == "signal" else None,
            "stop_lambda_window": config.stop_lambda_window if checks and judge_name(config) == "signal" else None,
            "hold_erasure_at": config.hold_erasure_at, "concept_variants": list(config.concept_variants),
            "check_forget_at_most": config.check_forget_at_most if checks else None,
            "check_retain_drop_at_most": config.check_retain_drop_at_most if checks else None,
            "check_every": config.check_every if checks else None,
            "check_inference_steps": config.check_inference_steps if checks else None,
            "check_seed_start": config.check_seed_start if checks else None,
            **({"check_images_per_concept": config.check_images_per_concept} if chained and images else {}),
            **({"check_confirm": config.check_confirm} if checks and config.check_confirm != 1 else {}),
            **({"newest_share": config.newest_share} if chained and config.newest_share else {}),
            **({"uce_regularization": config.uce_regularization, "uce_preserve_weight": config.uce_preserve_weight}
               if is_edit(config.method) else {})}


def run_config(spec: BenchSpec, overrides: dict, concept: str, seed: int, output: Path, progress: bool):
    """The erase settings of one run: the recipe, the concept's prompts, then the method entry."""
    concepts, anchors = spec.world.prompts(concept)
    recipe = load_yaml(spec.recipe)
    entry = {k: v for k, v in overrides.items() if k != "label"}
    method = entry.get("method", recipe.get("method", "eupmu"))
    edit = is_edit(method)
    settings = settings_for(recipe, method)  # an edit: the recipe's model and prompts, none of its training
    settings.update(concepts=concepts, anchors=anchors, output=str(output), overwrite=True,
                    progress=progress, seed=seed)
    if edit:
        settings["remap_to"] = spec.world.relative_to(concept) or []  # its guide: what negative guidance erases toward
    elif settings.get("forget_loss", "negative-guidance") == "negative-guidance":
        settings["relative_to"] = spec.world.relative_to(concept)
    settings.update(entry)
    return build_config(settings, {}, source=str(spec.recipe))
