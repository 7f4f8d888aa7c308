"""`concept-erase bench`: EUPMU against EUPMU-fast, UNGrad, fixed weights and ESD on the digits model.

Every run uses the same recipe (subset, batch sizes, steps, learning rate) and differs only in
the method that combines the forget and retain losses. Per run it measures, with the shipped
judge: forget accuracy (the erased digit is still drawn, or the erased style still rendered),
retain accuracy (the other digits; for a style, digit and style both right on the other styles),
the domain FID of the retained prompts against their real held-out renderings, wall time per
step, backward passes per step, and (every `evaluation.every` steps) the curve that gives the
training time to reach the target: forget accuracy at most 10% with retain accuracy at most 3
points below the base model's. A separate probe runs each method, and a plain fine-tuning step
of the same UNet subset, in a fresh process and reads its peak memory.

Each finished run is stored in OUTPUT/runs/ID.json, so a rerun of the same command continues.
Results: OUTPUT/bench.json, OUTPUT/bench.md, OUTPUT/pareto.png.
"""

from __future__ import annotations

from . import env  # noqa: F401

import contextlib
import copy
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import stats
from .atomic import atomic_path, write_json, write_text
from .digits import DIGIT_NAMES, STYLES, caption
from .errors import UserError

FORGET_TARGET = 0.10
RETAIN_DROP = 0.03


@dataclass
class BenchSpec:
    recipe: Path
    concepts: list[str]
    seeds: list[int]
    methods: list[dict]
    eps_sweep: list[float] = field(default_factory=list)
    eval_seeds: int = 16
    eval_steps: int = 25
    eval_guidance: float = 4.0
    eval_every: int = 50
    eval_final_seeds: int = 0  # images per prompt at the final evaluations (0: eval_seeds)
    held_time_reference: str = ""  # the label eupmu's time to held target is compared with
    memory_probe_steps: int = 10
    timing_rounds: int = 8
    timing_steps: int = 5
    source: str = ""


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


SHIPPED_BENCH = Path(__file__).parent / "recipes" / "bench-digits.yaml"


def load_bench(path: str | Path) -> BenchSpec:
    """Read and check a benchmark file, every method entry included: a mistake is found before any run."""
    from .config import build_config, load_yaml, normalise_keys, read_yaml, whole_number

    path = Path(path)
    raw = read_yaml(path, "benchmark file", "start from pipelines/bench-digits.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a benchmark file is a mapping (recipe:, concepts:, methods:)")
    known = {"recipe", "concepts", "seeds", "methods", "eps_sweep", "evaluation", "memory_probe_steps", "timing_probe",
             "held_time_reference"}
    bad = sorted(set(map(str, raw)) - known)
    if bad:
        raise UserError(f"{path}: unknown key {bad[0]!r}; a benchmark file has {', '.join(sorted(known))}")
    recipe_name = raw.get("recipe", "digits-erase.yaml")
    if not isinstance(recipe_name, str) or not recipe_name:
        raise UserError(f"{path}: recipe must name a YAML file, not {recipe_name!r}")
    recipe = Path(recipe_name)
    if not recipe.is_absolute():
        local = path.parent / recipe
        recipe = local if local.is_file() else Path(__file__).parent / "recipes" / recipe.name
    if not recipe.is_file():
        raise UserError(f"{path}: recipe {recipe_name!r} not found (relative to the benchmark file, or a shipped recipe name)")
    concepts = raw.get("concepts")
    if isinstance(concepts, str):
        concepts = [concepts]
    if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) for c in concepts):
        raise UserError(f"{path}: concepts must list digits ({', '.join(DIGIT_NAMES)}) or styles "
                        f"({', '.join(STYLES[1:])})")
    for c in concepts:
        if c not in DIGIT_NAMES and c not in STYLES[1:]:
            raise UserError(f"{path}: concept {c!r} is neither a digit ({', '.join(DIGIT_NAMES)}) nor a style "
                            f"({', '.join(STYLES[1:])})")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) and isinstance(m.get("method"), str)
                                                              for m in methods):
        raise UserError(f"{path}: methods must be a list of {{method: NAME, ...settings}}")
    # Settings as the erase command names them (dashes or underscores, --lambda); the label is the bench's own.
    methods = [{**normalise_keys({k: v for k, v in m.items() if k != "label"}, f"{path}, method {m['method']!r}"),
                **({"label": m["label"]} if "label" in m else {})} for m in methods]
    seeds = _number_list(raw, "seeds", [0], int, path, low=0)
    if not seeds:
        raise UserError(f"{path}: seeds must list at least one seed")
    eps = _number_list(raw, "eps_sweep", [], float, path, low=0)
    ev = raw.get("evaluation") or {}
    if not isinstance(ev, dict):
        raise UserError(f"{path}: evaluation must be a mapping (seeds:, steps:, guidance:, every:)")
    timing = raw.get("timing_probe") or {}
    if not isinstance(timing, dict) or sorted(set(map(str, timing)) - {"rounds", "steps"}):
        raise UserError(f"{path}: timing_probe must be a mapping with rounds: and steps: (rounds: 0 skips it), "
                        f"not {timing!r}")
    bad = sorted(set(map(str, ev)) - {"seeds", "final_seeds", "steps", "guidance", "every"})
    if bad:
        raise UserError(f"{path}: evaluation has no key {bad[0]!r} (seeds, final_seeds, steps, guidance, every)")
    reference = raw.get("held_time_reference", "")
    if not isinstance(reference, str):
        raise UserError(f"{path}: held_time_reference must be a method entry's label, not {reference!r}")
    guidance = ev.get("guidance", 4.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise UserError(f"{path}: evaluation.guidance must be a finite number, 0 or more, not {guidance!r}")
    spec = BenchSpec(recipe=recipe, concepts=concepts, seeds=seeds, methods=methods, eps_sweep=eps,
                     eval_seeds=whole_number(ev, "seeds", 16, path, 1, "evaluation.seeds"),
                     eval_steps=whole_number(ev, "steps", 25, path, 1, "evaluation.steps"),
                     eval_guidance=float(guidance), eval_every=whole_number(ev, "every", 50, path, 0, "evaluation.every"),
                     eval_final_seeds=whole_number(ev, "final_seeds", 0, path, 0, "evaluation.final_seeds"),
                     held_time_reference=reference,
                     memory_probe_steps=whole_number(raw, "memory_probe_steps", 10, path, 0, "memory_probe_steps"),
                     timing_rounds=whole_number(timing, "rounds", 8, path, 0, "timing_probe.rounds"),
                     timing_steps=whole_number(timing, "steps", 5, path, 1, "timing_probe.steps"),
                     source=str(path))
    # Every run's settings are built now: an unknown key or a bad value in a method entry fails here,
    # not after an hour of other runs.
    recipe_settings = load_yaml(recipe)
    labels = set()
    for label, overrides, concept, seed in plan(spec):
        if concept != concepts[0] or seed != seeds[0]:
            continue
        if label in labels:
            raise UserError(f"{path}: two method entries are both labelled {label!r}; give each a distinct label")
        labels.add(label)
        fixed_here = sorted({"concepts", "concept", "anchors", "anchor", "output", "seed", "overwrite"} & set(overrides))
        if fixed_here:
            raise UserError(f"{path}, method {label!r}: {fixed_here[0]} is set by the benchmark itself; remove it")
        try:
            build_config({**recipe_settings, **{k: v for k, v in overrides.items() if k != "label"}},
                         source=f"{path} (method {label!r})")
        except UserError as err:
            raise UserError(f"{path}, method {label!r}: {err}") from None
    if reference and reference not in labels:
        raise UserError(f"{path}: held_time_reference {reference!r} is not the label of a method entry "
                        f"({', '.join(sorted(labels))})")
    return spec


# ---------------------------------------------------------------- what is erased, and how it is judged

def concept_prompts(concept: str) -> tuple[list[str], list[str]]:
    """(concept prompts, anchor prompts) for a digit or a style of the digits world."""
    if concept in DIGIT_NAMES:
        d = DIGIT_NAMES.index(concept)
        return [caption(d)], [caption(o) for o in range(10) if o != d]
    return ([caption(d, concept) for d in range(10)],
            [caption(d, s) for s in STYLES if s != concept for d in range(10)])


def erase_relative_to(concept: str) -> list[str]:
    """A style is erased relative to the same caption without it (negative guidance away from the style,
    not from the digit); a digit relative to the empty prompt, as ESD does."""
    return [] if concept in DIGIT_NAMES else [caption(d) for d in range(10)]


def judged_items(concept: str, seeds: int) -> tuple[list, list]:
    """(forget, retain) as (digit, style, images) for `seeds` images per prompt: a digit is judged on its
    one caption and the other nine; a style on every digit in it (half as many images per prompt) and
    every digit in each other style (a quarter)."""
    if concept in DIGIT_NAMES:
        d = DIGIT_NAMES.index(concept)
        return [(d, "plain", seeds)], [(o, "plain", seeds) for o in range(10) if o != d]
    return ([(d, concept, max(2, seeds // 2)) for d in range(10)],
            [(d, s, max(2, seeds // 4)) for s in STYLES if s != concept for d in range(10)])


def judged_images(concept: str, seeds: int) -> int:
    return sum(n for part in judged_items(concept, seeds) for _, _, n in part)


class Judging:
    """Forget and retain accuracy (and the domain FID) of a pipeline for one erased concept.

    `seeds` images per prompt for the evaluations during training (the curve), `final_seeds` for the
    base model's and each run's final evaluation, the figures the report's means are taken over.
    """

    def __init__(self, concept: str, seeds: int, steps: int, guidance: float, final_seeds: int | None = None):
        from .digits import build
        from .loading import load_judge

        self.concept, self.steps, self.guidance = concept, steps, guidance
        self.seeds, self.final_seeds = seeds, final_seeds or seeds
        self.judge = load_judge()
        test = build("test")
        wanted = {(d, STYLES.index(s)) for d, s, _ in self.items(1)[1]}
        keep = torch.tensor([(int(a), int(b)) in wanted for a, b in zip(test.digits, test.styles)])
        self.real = test.images[keep]

    def items(self, seeds: int) -> tuple[list, list]:
        return judged_items(self.concept, seeds)

    def images(self, final: bool) -> int:
        """How many images one evaluation generates."""
        return judged_images(self.concept, self.final_seeds if final else self.seeds)

    @torch.no_grad()
    def __call__(self, pipe, *, fid: bool = True, final: bool = False) -> dict:
        from .digits_eval import domain_fid, generate_many

        forget_items, retain_items = self.items(self.final_seeds if final else self.seeds)
        every = forget_items + retain_items
        made = generate_many(pipe, [(caption(d, s), range(n)) for d, s, n in every], steps=self.steps, guidance=self.guidance)
        judged = []
        for (d, s, _), images in zip(every, made):
            pd, ps = self.judge.predict(images)
            judged.append((d, STYLES.index(s), images, pd, ps))
        forget, retain = judged[:len(forget_items)], judged[len(forget_items):]
        if self.concept in DIGIT_NAMES:
            f_hits = sum(int((pd == d).sum()) for d, _, _, pd, _ in forget)
            r_hits = sum(int((pd == d).sum()) for d, _, _, pd, _ in retain)
        else:
            f_hits = sum(int((ps == s).sum()) for _, s, _, _, ps in forget)
            r_hits = sum(int(((pd == d) & (ps == s)).sum()) for d, s, _, pd, ps in retain)
        n_f = sum(len(x[2]) for x in forget)
        n_r = sum(len(x[2]) for x in retain)
        result = {"forget_accuracy": f_hits / n_f, "retain_accuracy": r_hits / n_r, "images": n_f + n_r,
                  "forget_images": n_f}
        if fid:
            result["domain_fid"] = domain_fid(self.judge, torch.cat([x[2] for x in retain]), self.real)
        return result


# ---------------------------------------------------------------- one run

def _run_id(label: str, concept: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in f"{label}__{concept}__s{seed}")
    return safe


def run_config(spec: BenchSpec, overrides: dict, concept: str, seed: int, output: Path, progress: bool):
    """The erase settings of one run: the recipe, the concept's prompts, then the method entry."""
    from .config import build_config, load_yaml

    concepts, anchors = concept_prompts(concept)
    settings = load_yaml(spec.recipe)
    settings.update(concepts=concepts, anchors=anchors, output=str(output), overwrite=True,
                    progress=progress, seed=seed)
    if settings.get("forget_loss", "negative-guidance") == "negative-guidance":
        settings["relative_to"] = erase_relative_to(concept)
    settings.update({k: v for k, v in overrides.items() if k != "label"})
    return build_config(settings, {}, source=str(spec.recipe))


def run_one(spec: BenchSpec, base, judging: Judging, base_eval: dict, *, label: str, overrides: dict, concept: str,
            seed: int, workdir: Path, progress: bool) -> dict:
    from .trainer import erase

    config = run_config(spec, overrides, concept, seed, workdir / "run", progress)
    target_retain = base_eval["retain_accuracy"] - RETAIN_DROP
    curve: list[dict] = []

    def on_step(done: int, trainer) -> None:
        if spec.eval_every and done % spec.eval_every == 0 and done < config.steps:
            trainer.pipe.unet.eval()
            r = judging(trainer.pipe, fid=False)
            trainer.pipe.unet.train()
            curve.append({"step": done, **r})

    t0 = time.perf_counter()
    erase(config, pipe=copy.deepcopy(base), on_step=on_step)
    wall = time.perf_counter() - t0
    run_dir = workdir / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_seconds = [r["step_time_s"] for r in records]
    done = len(records)  # fewer than config.steps when --stop-when-erased stopped the run
    checks = _read_checks(run_dir)
    from .export import apply

    final = judging(apply(copy.deepcopy(base), run_dir / "erased.safetensors"), final=True)
    curve = [c for c in curve if c["step"] < done]
    curve.append({"step": done, **{k: final[k] for k in ("forget_accuracy", "retain_accuracy", "images")}})
    cumulative = dict(zip((r["step"] for r in records), _cumsum(step_seconds)))
    meets = final["forget_accuracy"] <= FORGET_TARGET and final["retain_accuracy"] >= target_retain
    first = next((c["step"] for c in curve if c["forget_accuracy"] <= FORGET_TARGET
                  and c["retain_accuracy"] >= target_retain), None)
    # The erasure's own checks during training (--stop-when-erased) are part of its cost.
    check_seconds = lambda step: sum(c["seconds"] for c in checks if c["step"] <= step)  # noqa: E731
    time_to_target = None if first is None else cumulative[first] + check_seconds(first)
    k = config.gradient_accumulation_steps
    return {
        "label": label, "method": config.method, "concept": concept, "seed": seed,
        "eps": config.eps, "lambda_init": config.lambda_init, "beta": config.beta,
        "lambda_update": config.lambda_update,
        "forget_accuracy": final["forget_accuracy"], "retain_accuracy": final["retain_accuracy"],
        "domain_fid": final["domain_fid"], "eval_images": final["images"], "forget_images": final["forget_images"],
        "base_forget_accuracy": base_eval["forget_accuracy"], "base_retain_accuracy": base_eval["retain_accuracy"],
        "base_domain_fid": base_eval["domain_fid"],
        "meets_target": meets, "steps": done, "steps_planned": config.steps,
        "step_time_s_median": statistics.median(step_seconds),
        "step_time_s_mean": statistics.fmean(step_seconds),
        "backward_passes_per_step": statistics.fmean(r.get("backward_passes", float("nan")) for r in records) / k,
        "lambda_final": records[-1]["lambda"], "lambda_mean": statistics.fmean(r["lambda"] for r in records),
        "train_seconds": sum(step_seconds), "check_seconds": check_seconds(done), "wall_seconds": wall,
        "time_to_target_s": time_to_target,
        # held: the first evaluation at target counts only if the run is still at target at its end
        "steps_to_held_target": first if meets else None,
        "time_to_held_target_s": time_to_target if meets else None,
        "curve": curve, "checks": checks,
    }


def _read_checks(run_dir: Path) -> list[dict]:
    """The erasure checks a --stop-when-erased run made (checks.jsonl), else none."""
    path = run_dir / "checks.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cumsum(xs):
    total = 0.0
    for x in xs:
        total += x
        yield total


# ---------------------------------------------------------------- step-time probe (interleaved, one process)

def probe_timing(spec: BenchSpec, base, concept: str, log=print) -> list[dict]:
    """Time per step of every method entry, measured in one process, the methods taking turns.

    A run's own step times drift with the machine (about 20% between runs of the same method on
    the shared 2-core CPU used here), too much for ratios near 1. Here every method is set up once
    (each on its own copy of the model), then `rounds` rounds each run `steps` steps of every
    method, the order rotated every round; a first round is a warm-up and is not counted. Slow
    spells of the machine fall on all methods alike. Also timed: the part of a step spent making
    the forget batch (for negative guidance: the partial trajectory and the original model's
    prediction), which no method can avoid.
    """
    import tempfile

    from .trainer import Trainer

    rounds, steps = spec.timing_rounds, spec.timing_steps
    entries = [(str(m.get("label", m["method"])), m) for m in spec.methods]
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="ce-timing-") as tmp:
        trainers = []
        for i, (label, overrides) in enumerate(entries):
            config = run_config(spec, overrides, concept, spec.seeds[0], Path(tmp) / str(i), progress=False)
            config.checkpoint_every = 0
            trainer = Trainer(config, pipe=copy.deepcopy(base))
            trainer._setup()
            clock = _Stopwatch(trainer.forget.batch)
            trainer.forget.batch = clock
            trainers.append((label, trainer, clock))
        times: dict[str, list[float]] = {label: [] for label, _ in entries}
        target_times: dict[str, list[float]] = {label: [] for label, _ in entries}
        backward: dict[str, list[int]] = {label: [] for label, _ in entries}
        for r in range(rounds + 1):
            shift = r % len(trainers)
            for label, trainer, clock in trainers[shift:] + trainers[:shift]:
                for s in range(steps):
                    clock.seconds = 0.0
                    t0 = time.perf_counter()
                    record = trainer._step(r * steps + s)
                    if cuda:
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    if r:  # round 0 warms up
                        times[label].append(dt)
                        target_times[label].append(clock.seconds)
                        backward[label].append(record["backward_passes"])
            if r:
                log(f"    timing round {r}/{rounds}: " + ", ".join(
                    f"{label} {1000 * statistics.median(times[label][-steps:]):.0f} ms" for label, _, _ in trainers))
        del trainers
    out = []
    for label, overrides in entries:
        ts = sorted(times[label])
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        # The mean is the headline: the time a run takes per step, a trajectory pool's refreshes amortised
        # (cover whole refresh periods: rounds x steps a multiple of the period); quartiles give the spread.
        out.append({"label": label, "method": overrides["method"], "steps_timed": len(ts),
                    "mean_ms": 1000 * statistics.fmean(ts), "median_ms": 1000 * q[1],
                    "mean_ms_ci": [1000 * v for v in stats.mean_ci(ts)],
                    "q1_ms": 1000 * q[0], "q3_ms": 1000 * q[2],
                    "forget_batch_ms": 1000 * statistics.fmean(target_times[label]),
                    "backward_per_step": statistics.fmean(backward[label])})
    return out


class _Stopwatch:
    """Wraps a function and adds up the wall time spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


# ---------------------------------------------------------------- peak memory probe (its own process)

def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def probe_memory(recipe: str, mode: str, steps: int, concept: str = "three") -> dict:
    """Peak memory of `steps` training steps of `mode` (a method, or 'plain' fine-tuning), measured
    from just before training (after the model is loaded) in this process."""
    import tempfile

    from .config import build_config, load_yaml
    from .loading import load_pipeline

    settings = load_yaml(recipe)
    concepts, anchors = concept_prompts(concept)
    out = tempfile.mkdtemp(prefix="ce-probe-")
    settings.update(concepts=concepts, anchors=anchors, output=out, overwrite=True, progress=False, steps=steps,
                    checkpoint_every=0, method=mode if mode != "plain" else "fixed")
    config = build_config(settings, {}, source=recipe)
    pipe = load_pipeline(config.model)
    cuda = torch.cuda.is_available()
    if cuda:
        pipe.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    have_hwm_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM, the peak resident size, to the current size
    except OSError:
        have_hwm_reset = False
    base_kb = _rss_kb("VmRSS")
    base_cuda = torch.cuda.memory_allocated() if cuda else 0
    if mode == "plain":
        _plain_finetune(pipe, config, steps)
    else:
        from .trainer import erase

        erase(config, pipe=pipe)
    peak_kb = _rss_kb("VmHWM")
    out_dict = {"mode": mode, "steps": steps, "baseline_rss_mb": base_kb / 1024, "peak_rss_mb": peak_kb / 1024,
                "extra_rss_mb": (peak_kb - base_kb) / 1024, "hwm_reset": have_hwm_reset}
    if cuda:
        out_dict.update(baseline_cuda_mb=base_cuda / 2**20, peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20)
    return out_dict


def _plain_finetune(pipe, config, steps: int) -> None:
    """A plain denoising fine-tuning step of the same UNet subset and the same number of training
    samples per step (forget batch + retain batch): the memory yardstick."""
    from .subsets import select_trainable

    unet = pipe.unet
    device = unet.device
    trained = select_trainable(unet, config.train, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha)
    params = list(trained.values())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    with torch.no_grad():
        ids = pipe.tokenizer(config.anchors[:1], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        emb = pipe.text_encoder(ids)[0]
    n = config.batch_size + config.retain_batch_size
    c = unet.config
    acp = pipe.scheduler.alphas_cumprod.to(device)
    g = torch.Generator().manual_seed(0)
    unet.train()
    for _ in range(steps):
        x0 = torch.randn((n, c.in_channels, c.sample_size, c.sample_size), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, len(acp), (n,), generator=g).to(device)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(xt, t, emb.expand(n, -1, -1)).sample.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def memory_table(recipe: Path, modes: list[str], steps: int) -> list[dict]:
    out = []
    for mode in modes:
        cmd = [sys.executable, "-m", "concept_erase.bench", "--probe", mode, "--recipe", str(recipe),
               "--steps", str(steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise UserError(f"the memory probe for {mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ---------------------------------------------------------------- the whole benchmark

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def plan(spec: BenchSpec) -> list[tuple[str, dict, str, int]]:
    """(label, overrides, concept, seed) of every run. Concept by concept, every method and the eps
    sweep, so that a benchmark cut short still compares all methods on the concepts it finished."""
    eupmu = next((m for m in spec.methods if m["method"] == "eupmu"), {"method": "eupmu"})
    runs = []
    for seed in spec.seeds:
        for concept in spec.concepts:
            for m in spec.methods:
                runs.append((str(m.get("label", m["method"])), dict(m), concept, seed))
            if seed == spec.seeds[0]:
                for eps in spec.eps_sweep:  # the eupmu entry's settings (same step budget), eps changed
                    label = f"eupmu eps={eps:g}"
                    runs.append((label, {**eupmu, "eps": eps, "label": label}, concept, seed))
    return runs


def run_bench(config_path: str, output: str | Path, *, progress: bool = True, only: list[str] | None = None,
              overrides: dict | None = None, report_only: bool = False, command: str = "", log=None) -> dict:
    from .loading import load_pipeline

    if log is None:
        def log(message: str) -> None:
            print(message, flush=True)
    config_path = config_path or SHIPPED_BENCH  # found wherever the command runs, not only in a clone
    spec = load_bench(config_path)
    for key, value in (overrides or {}).items():
        if key == "concepts":
            for c in value:
                if c not in DIGIT_NAMES and c not in STYLES[1:]:
                    raise UserError(f"--concepts: {c!r} is neither a digit nor a style ({', '.join(STYLES[1:])})")
        setattr(spec, key, value)
    output = Path(output)
    runs = plan(spec)
    if only:
        runs = [r for r in runs if r[0] in only]
        if not runs:
            raise UserError(f"--only {', '.join(only)} names no run of {config_path}")
    if report_only:
        if not (output / "runs").is_dir():
            raise UserError(f"no finished run in {output / 'runs'} to report")
        return _bench(spec, runs, output, None, progress, only, report_only, command, log)
    made = [f for f in (output / "runs", output) if not f.exists()]
    (output / "runs").mkdir(parents=True, exist_ok=True)
    try:
        base = load_pipeline("builtin:digits")
        base.set_progress_bar_config(disable=True)
        return _bench(spec, runs, output, base, progress, only, report_only, command, log)
    finally:  # the scratch run goes; folders this call made go too if nothing finished into them
        shutil.rmtree(output / "work", ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _bench(spec: BenchSpec, runs: list, output: Path, base, progress: bool, only, report_only: bool, command: str,
           log) -> dict:
    results, judgings, base_evals = [], {}, {}
    started = time.time()
    final_seeds = spec.eval_final_seeds or spec.eval_seeds
    for i, (label, overrides, concept, seed) in enumerate(runs):
        path = output / "runs" / f"{_run_id(label, concept, seed)}.json"
        wanted = judged_images(concept, final_seeds)
        if path.is_file():
            record = json.loads(path.read_text())
            if report_only or _final_images(record) == wanted:
                results.append(record)
                continue
            log(f"[{i + 1}/{len(runs)}] {label} on {concept!r} (seed {seed}) was judged on {_final_images(record)} "
                f"images, this file asks for {wanted}: run again")
        if report_only:
            continue
        if concept not in judgings:
            judgings[concept] = Judging(concept, spec.eval_seeds, spec.eval_steps, spec.eval_guidance, final_seeds)
            base_file = output / "runs" / f"base__{concept.replace(' ', '_')}.json"
            stored = json.loads(base_file.read_text()) if base_file.is_file() else {}
            if stored.get("images") == wanted:
                base_evals[concept] = stored
            else:
                base_evals[concept] = judgings[concept](base, final=True)
                write_json(base_file, base_evals[concept])
        log(f"[{i + 1}/{len(runs)}] {label} erasing {concept!r} (seed {seed})")
        work = output / "work"
        record = run_one(spec, base, judgings[concept], base_evals[concept], label=label, overrides=overrides,
                         concept=concept, seed=seed, workdir=work, progress=progress)
        write_json(path, record)
        results.append(record)
        log(f"    forget {record['forget_accuracy']:.1%}  retain {record['retain_accuracy']:.1%} "
            f"(base {record['base_retain_accuracy']:.1%})  domain FID {record['domain_fid']:.1f}  "
            f"{record['step_time_s_median'] * 1000:.0f} ms/step")
    memory_file = output / "memory.json"
    if spec.memory_probe_steps and not memory_file.is_file() and not report_only:
        modes = ["plain"] + sorted({m["method"] for m in spec.methods})
        log(f"memory probe: {', '.join(modes)} ({spec.memory_probe_steps} steps each, a fresh process each)")
        write_json(memory_file, memory_table(spec.recipe, modes, spec.memory_probe_steps))
    memory = json.loads(memory_file.read_text()) if memory_file.is_file() else []
    timing_file = output / "timing.json"
    if spec.timing_rounds and not timing_file.is_file() and not report_only and not only:
        log(f"step-time probe: {len(spec.methods)} methods in turn, {spec.timing_rounds} rounds of "
            f"{spec.timing_steps} steps each, on {spec.concepts[0]!r}")
        write_json(timing_file, probe_timing(spec, base, spec.concepts[0], log=log))
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else []
    summary = summarise(results, memory, timing, spec.held_time_reference)
    if not results:
        raise UserError(f"no finished run in {output / 'runs'} to report")
    report = {"config": spec.source, "machine": machine(), "seconds": round(time.time() - started, 1),
              "runs_planned": len(runs), "runs_finished": len(results),
              "targets": {"forget_at_most": FORGET_TARGET, "retain_drop_at_most": RETAIN_DROP},
              "summary": summary, "memory": memory, "timing": timing, "runs": results}
    write_json(output / "bench.json", report)
    pareto_plot(results, output / "pareto.png")
    command = command or f"concept-erase bench --config {spec.source} --output {output}"
    report["command"] = command
    write_json(output / "bench.json", report)
    write_text(output / "bench.md", markdown(report, command=command))
    return report


def _final_images(record: dict) -> int | None:
    """How many images a stored run's final evaluation judged (older files: its curve's last point)."""
    if "eval_images" in record:
        return record["eval_images"]
    curve = record.get("curve") or [{}]
    return curve[-1].get("images")


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else float("nan")


def concept_kind(concept: str) -> str:
    return "digit" if concept in DIGIT_NAMES else "style"


def summarise(results: list[dict], memory: list[dict], timing: list[dict] | None = None, reference: str = "") -> dict:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    probe_ms = {t["label"]: t["mean_ms"] for t in timing or []}
    for label in by:  # the eps sweep is the eupmu entry with eps changed: the same work per step
        if label.startswith("eupmu eps=") and label not in probe_ms and "eupmu" in probe_ms:
            probe_ms[label] = probe_ms["eupmu"]
    rows = {label: _summary_row(rs, probe_ms.get(label)) for label, rs in by.items()}
    by_kind: dict[str, dict[str, dict]] = {}
    for label, rs in by.items():
        for kind in ("digit", "style"):
            part = [r for r in rs if concept_kind(r["concept"]) == kind]
            if part:
                by_kind.setdefault(kind, {})[label] = _summary_row(part, probe_ms.get(label))
    checks = _checks(rows, memory, results, timing or [], reference)
    return {"by_method": rows, "by_kind": by_kind, "checks": checks}


def steps_to_target(run: dict) -> int | None:
    """The first evaluated step at which the run met the target (forget and retain), or None."""
    floor = run["base_retain_accuracy"] - RETAIN_DROP
    return next((c["step"] for c in run.get("curve", []) if c["forget_accuracy"] <= FORGET_TARGET
                 and c["retain_accuracy"] >= floor), None)


def steps_to_held_target(run: dict) -> int | None:
    """The first evaluated step at target, if the run is still at target at its end; else None."""
    return steps_to_target(run) if run.get("meets_target") else None


def _held_seconds(run: dict, probe_ms: float | None) -> float | None:
    """Training seconds to the held target: the probe's step time where it ran (the runs' own clocks drift
    with the machine), else the run's clock; an erasure check's own time (--stop-when-erased) added."""
    steps = steps_to_held_target(run)
    if steps is None:
        return None
    checks = sum(c["seconds"] for c in run.get("checks", []) if c["step"] <= steps)
    if probe_ms is not None:
        return steps * probe_ms / 1000 + checks
    own = run.get("time_to_held_target_s", run.get("time_to_target_s"))
    return None if own is None else float(own)


def _with_ci(row: dict, key: str, values) -> None:
    """row[key] = the mean, row["ci"][key] = its 95% bootstrap interval (see stats.py)."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    row[key] = _mean(values) if values else None
    ci = stats.mean_ci(values)
    row.setdefault("ci", {})[key] = list(ci) if ci is not None else None


def _summary_row(rs: list[dict], probe_ms: float | None = None) -> dict:
    ttt = [r.get("time_to_target_s") for r in rs]
    stt = [steps_to_target(r) for r in rs]
    held = [steps_to_held_target(r) for r in rs]
    row = {"runs": len(rs), "meets_target": sum(bool(r["meets_target"]) for r in rs),
           "backward_per_step": _mean(r["backward_passes_per_step"] for r in rs), "probe_step_ms": probe_ms,
           "reached_target": sum(a is not None or b is not None for a, b in zip(stt, ttt)), "held_target": sum(t is not None for t in held),
           "images_per_run": _mean(_final_images(r) for r in rs)}
    _with_ci(row, "forget_accuracy", [r["forget_accuracy"] for r in rs])
    _with_ci(row, "retain_drop", [r["base_retain_accuracy"] - r["retain_accuracy"] for r in rs])
    _with_ci(row, "domain_fid", [r["domain_fid"] for r in rs])
    _with_ci(row, "met_fraction", [float(bool(r["meets_target"])) for r in rs])
    _with_ci(row, "step_time_ms", [1000 * r["step_time_s_median"] for r in rs])
    _with_ci(row, "lambda_mean", [r.get("lambda_mean") for r in rs])
    # Means over the runs that reached (held) the target; the counts beside them say how many did.
    _with_ci(row, "steps_to_held_target", held)
    _with_ci(row, "time_to_held_target_s", [_held_seconds(r, probe_ms) for r in rs])
    row["time_to_held_target_source"] = "probe" if probe_ms is not None else "run clocks"
    # Kept from earlier reports: the first evaluation at target whether or not it held, over every run.
    row["time_to_target_s"] = _mean(ttt) if all(t is not None for t in ttt) else None
    row["steps_to_target"] = _mean(stt) if all(t is not None for t in stt) else None
    row["probe_time_to_target_s"] = (row["steps_to_target"] * probe_ms / 1000
                                     if probe_ms is not None and row["steps_to_target"] is not None else None)
    return row


def _pairs(results: list[dict], a: str, b: str) -> list[tuple[dict, dict]]:
    """The runs of labels a and b on the (concept, seed) pairs both have, matched."""
    key = lambda r: (r["concept"], r.get("seed", 0))  # noqa: E731
    ra = {key(r): r for r in results if r["label"] == a}
    rb = {key(r): r for r in results if r["label"] == b}
    return [(ra[k], rb[k]) for k in sorted(set(ra) & set(rb))]


def dominance(results: list[dict], a: str, b: str) -> dict | None:
    """Is label a dominated by label b beyond the noise? On the pairs both ran, the paired bootstrap
    intervals of a - b in forget accuracy and in retain drop: dominated when neither interval reaches
    below zero and one lies wholly above it (b at least as good on both axes, better on one, both
    beyond chance). None when the labels share no run."""
    pairs = _pairs(results, a, b)
    if not pairs:
        return None
    drop = lambda r: r["base_retain_accuracy"] - r["retain_accuracy"]  # noqa: E731
    fa, fb = [x["forget_accuracy"] for x, _ in pairs], [y["forget_accuracy"] for _, y in pairs]
    da, db = [drop(x) for x, _ in pairs], [drop(y) for _, y in pairs]
    ci_f, ci_d = stats.paired_difference_ci(fa, fb), stats.paired_difference_ci(da, db)
    dominated = ci_f[0] >= 0 and ci_d[0] >= 0 and (ci_f[0] > 0 or ci_d[0] > 0)
    return {"pairs": len(pairs), "dominated": dominated,
            "forget": (_mean(fa), _mean(fb)), "retain_drop": (_mean(da), _mean(db)),
            "forget_diff_ci": ci_f, "retain_drop_diff_ci": ci_d}


# The step-time targets: (method, what it is compared with) -> the largest ratio allowed.
SPEED_TARGETS = {("eupmu", "ungrad"): 0.6, ("eupmu-fast", "fixed"): 1.05}


def _speed_ratios(ms: dict[str, float]) -> dict[tuple[str, str], float]:
    """The ratios the speed targets name, from per-label times; "fixed" is the mean over the fixed weights."""
    fixed = [v for k, v in ms.items() if k.startswith("fixed")]
    ref = dict(ms, **({"fixed": statistics.fmean(fixed)} if fixed else {}))
    return {(a, b): ref[a] / ref[b] for a, b in SPEED_TARGETS if a in ref and b in ref}


def _checks(rows: dict, memory: list[dict], results: list[dict] | None = None,
            timing: list[dict] | None = None, reference: str = "") -> list[dict]:
    checks = []
    # Step times from the interleaved probe where it ran (methods timed in turns, one process); else
    # the medians of the runs, each taken at its own time on the machine.
    if timing:
        step_ms = {t["label"]: t["mean_ms"] for t in timing}
        source = "interleaved step-time probe"
    else:
        step_ms = {label: r["step_time_ms"] for label, r in rows.items()}
        source = "medians of the runs' step times"

    ratios = _speed_ratios(step_ms)
    for pair, bound in SPEED_TARGETS.items():
        if pair in ratios:
            a, b = pair
            checks.append({"target": f"{a} step <= {bound} x {b} step", "measured": ratios[pair],
                           "met": ratios[pair] <= bound, "source": source})
    fixed_labels = [k for k in rows if k.startswith("fixed")]
    mem = {m["mode"]: m for m in memory}
    if "plain" in mem:
        for mode in ("esd", "eupmu", "eupmu-fast", "ungrad", "fixed"):
            if mode in mem:
                total = mem[mode]["peak_rss_mb"] / mem["plain"]["peak_rss_mb"]
                extra = mem[mode]["extra_rss_mb"] / max(mem["plain"]["extra_rss_mb"], 1e-9)
                checks.append({"target": f"{mode} peak memory <= 1.2 x plain fine-tuning (process peak)",
                               "measured": total, "met": total <= 1.2, "extra_ratio": extra})
    if "eupmu" in rows:
        e = rows["eupmu"]
        checks.append({"target": "eupmu default: forget <= 10% and retain <= 3 points below base, every run",
                       "measured": f"{e['meets_target']} of {e['runs']} runs", "met": e["meets_target"] == e["runs"]})
    sweep = [k for k in rows if k.startswith("eupmu eps=")]
    if sweep and fixed_labels:
        # The curve is the sweep and the default eupmu point (the recipe's eps). Every point is compared
        # with every fixed weight on the (concept, seed) pairs both ran (the eps sweep runs on the first
        # seed only), by paired bootstrap intervals: a difference inside the noise dominates nothing.
        dominated = []
        for s in (["eupmu"] if "eupmu" in rows else []) + sweep:
            for f in fixed_labels:
                d = dominance(results or [], s, f)
                if d and d["dominated"]:
                    n = d["pairs"]
                    dominated.append(
                        f"{s} by {f} ({n} common run{'s' if n > 1 else ''}: forget {d['forget'][0]:.1%} vs "
                        f"{d['forget'][1]:.1%}, retain drop {100 * d['retain_drop'][0]:.2f} vs "
                        f"{100 * d['retain_drop'][1]:.2f} points; 95% intervals of the differences "
                        f"[{100 * d['forget_diff_ci'][0]:.1f}, {100 * d['forget_diff_ci'][1]:.1f}] and "
                        f"[{100 * d['retain_drop_diff_ci'][0]:.2f}, {100 * d['retain_drop_diff_ci'][1]:.2f}] points)")
        checks.append({"target": "eupmu eps curve not dominated by the fixed weights beyond the 95% intervals",
                       "measured": "; ".join(dominated) or "no point dominated", "met": not dominated})
    if reference and "eupmu" in rows and reference in rows:
        # Time to held target, eupmu against the reference, on the runs where both held the target.
        both = [(x, y) for x, y in _pairs(results or [], "eupmu", reference)
                if steps_to_held_target(x) is not None and steps_to_held_target(y) is not None]
        ms = {t["label"]: t["mean_ms"] for t in timing or []}
        if both:
            te = _mean(_held_seconds(x, ms.get("eupmu")) for x, _ in both)
            tr = _mean(_held_seconds(y, ms.get(reference)) for _, y in both)
            ratio = te / tr if tr else float("nan")
            checks.append({"target": f"eupmu time to held target <= 0.5 x {reference}",
                           "measured": f"{ratio:.2f} ({te:.1f} s vs {tr:.1f} s on the {len(both)} runs both held; "
                                       f"eupmu held {rows['eupmu']['held_target']} of {rows['eupmu']['runs']}, "
                                       f"{reference} {rows[reference]['held_target']} of {rows[reference]['runs']})",
                           "met": ratio <= 0.5 and rows["eupmu"]["held_target"] == rows["eupmu"]["runs"]})
        else:
            checks.append({"target": f"eupmu time to held target <= 0.5 x {reference}",
                           "measured": "no run where both held the target", "met": False})
    return checks


def _f(v, pct=False, digits=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.{digits}f}%" if pct else f"{v:.{digits}f}"


def _ci_text(row: dict, key: str, scale: float = 1.0, digits: int = 1, pct: bool = False) -> str:
    """'3.1% [1.0, 5.2]': the mean and its 95% interval."""
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    ci = (row.get("ci") or {}).get(key)
    unit = "%" if pct else ""
    text = f"{scale * v:.{digits}f}{unit}"
    if ci is not None:
        text += f" [{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
    return text


def markdown(report: dict, command: str) -> str:
    s = report["summary"]
    lines = ["# Benchmark", "", f"Command: `{command}`", "", f"Machine: {report['machine']}", "",
             f"Targets: forget accuracy <= {FORGET_TARGET:.0%}, retain accuracy at most {RETAIN_DROP * 100:.0f} "
             "points below the base model's. Means over runs (concepts x seeds), each with its 95% bootstrap "
             "interval in brackets (runs resampled; `stats.py`).", "",
             "| method | runs | images/run | forget acc | retain drop (points) | domain FID | met target | ms/step | "
             "backward/step | held target | steps to held target | train s to held target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    probed = bool(report.get("timing"))
    for label, r in s["by_method"].items():
        ms = _f(r["probe_step_ms"], digits=0) if probed and r.get("probe_step_ms") is not None else \
            _ci_text(r, "step_time_ms", digits=0)
        lines.append(f"| {label} | {r['runs']} | {_f(r.get('images_per_run'), digits=0)} | "
                     f"{_ci_text(r, 'forget_accuracy', 100, pct=True)} | {_ci_text(r, 'retain_drop', 100)} | "
                     f"{_ci_text(r, 'domain_fid')} | {r['meets_target']}/{r['runs']} | {ms} | "
                     f"{_f(r['backward_per_step'], digits=2)} | {r.get('held_target', 'n/a')}/{r['runs']} | "
                     f"{_ci_text(r, 'steps_to_held_target', digits=0)} | {_ci_text(r, 'time_to_held_target_s')} |")
    lines += ["", "images/run: images judged at each run's final evaluation (forget and retain prompts). Held target: "
              "the run met the target at an evaluation during training and still meets it at its end; steps and "
              "seconds to it are means over the runs that held it, at the first evaluation at target. "
              + ("ms/step: the interleaved step-time probe's mean (below); train s to held target: steps x the "
                 "probe's ms/step." if probed else
                 "ms/step: mean of the runs' median step times; train s to held target: the runs' own clocks.")
              + " An erasure check's own time (--stop-when-erased) is included."]
    for kind, title in (("digit", "Digits only"), ("style", "Styles only")):
        part = s.get("by_kind", {}).get(kind)
        if not part:
            continue
        lines += ["", f"### {title}", "", "| method | runs | forget acc | retain drop (points) | domain FID | "
                  "met target | mean lambda |", "|---|---|---|---|---|---|---|"]
        for label, r in part.items():
            lines.append(f"| {label} | {r['runs']} | {_ci_text(r, 'forget_accuracy', 100, pct=True)} | "
                         f"{_ci_text(r, 'retain_drop', 100)} | {_ci_text(r, 'domain_fid')} | "
                         f"{r['meets_target']}/{r['runs']} | {_ci_text(r, 'lambda_mean', digits=2)} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for c in s["checks"]:
        m = c["measured"]
        m = f"{m:.3f}" if isinstance(m, float) else m
        if "extra_ratio" in c:
            m += f" (memory above the loaded model: {c['extra_ratio']:.2f}x)"
        if "source" in c:
            m += f" ({c['source']})"
        lines.append(f"| {c['target']} | {m} | {'yes' if c['met'] else '**MISSED**'} |")
    if report.get("timing"):
        lines += ["", "## Step time (interleaved probe: one process, the methods in turn, order rotated each round)", "",
                  "| method | steps timed | mean ms/step [95% interval] | median (quartiles) | "
                  "making the forget batch (ms) | "
                  "rest of the step (ms) | backward/step |", "|---|---|---|---|---|---|---|"]
        for t in report["timing"]:
            ci = f" [{t['mean_ms_ci'][0]:.0f}, {t['mean_ms_ci'][1]:.0f}]" if t.get("mean_ms_ci") else ""
            lines.append(f"| {t['label']} | {t['steps_timed']} | {t['mean_ms']:.0f}{ci} | {t['median_ms']:.0f} "
                         f"({t['q1_ms']:.0f}-{t['q3_ms']:.0f}) | "
                         f"{t['forget_batch_ms']:.0f} ({t['forget_batch_ms'] / t['mean_ms']:.0%}) | "
                         f"{t['mean_ms'] - t['forget_batch_ms']:.0f} | {t['backward_per_step']:.2f} |")
        rest = {t["label"]: t["mean_ms"] - t["forget_batch_ms"] for t in report["timing"]}
        said = [f"{a} / {b} {r:.2f}" for (a, b), r in _speed_ratios(rest).items()]
        if said:
            lines += ["", "Without the forget batch (the same work for every method; the steps are the same step "
                      "numbers, so the same trajectory lengths): " + ", ".join(said) + "."]
    if report["memory"]:
        lines += ["", "## Peak memory (a fresh process per mode)", "",
                  "| mode | loaded model (MB) | peak (MB) | above the loaded model (MB) |", "|---|---|---|---|"]
        for m in report["memory"]:
            lines.append(f"| {m['mode']} | {m['baseline_rss_mb']:.0f} | {m['peak_rss_mb']:.0f} | "
                         f"{m['extra_rss_mb']:.0f} |")
    lines += ["", "## Runs", "", "ms/step: the run's own median (its clock, not the probe's).", "",
              "| method | concept | seed | steps | forget | retain (base) | domain FID (base) | ms/step | "
              "mean lambda | first at target | held |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        stt = steps_to_target(r)
        held = "yes" if steps_to_held_target(r) is not None else "no"
        lines.append(f"| {r['label']} | {r['concept']} | {r['seed']} | {r.get('steps', 'n/a')} | "
                     f"{_f(r['forget_accuracy'], True)} | "
                     f"{_f(r['retain_accuracy'], True)} ({_f(r['base_retain_accuracy'], True)}) | "
                     f"{_f(r['domain_fid'])} ({_f(r['base_domain_fid'])}) | {_f(1000 * r['step_time_s_median'], digits=0)} | "
                     f"{_f(r.get('lambda_mean'), digits=3)} | {stt if stt is not None else 'not reached'} | {held} |")
    lines += ["", "![retain against forget](pareto.png)", ""]
    return "\n".join(lines)


def pareto_plot(results: list[dict], path: Path) -> None:
    """Mean retain drop against mean forget accuracy per method, with 95% bootstrap bars on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=110)
    markers = "osD^v<>pP*Xh"

    def point(rs):
        fx = [r["forget_accuracy"] for r in rs]
        dy = [100 * (r["base_retain_accuracy"] - r["retain_accuracy"]) for r in rs]
        return (_mean(fx), stats.mean_ci(fx)), (_mean(dy), stats.mean_ci(dy))

    for i, (label, rs) in enumerate(by.items()):
        (x, cx), (y, cy) = point(rs)
        ax.errorbar([x], [y], xerr=[[x - cx[0]], [cx[1] - x]], yerr=[[y - cy[0]], [cy[1] - y]],
                    fmt=markers[i % len(markers)], ms=7, capsize=3, elinewidth=0.9, label=f"{label} ({len(rs)})",
                    zorder=3)
    sweep = [k for k in by if k.startswith("eupmu eps=")]
    if sweep:  # the eps curve (the default eupmu point included), on the runs the sweep has
        pairs = {(r["concept"], r.get("seed", 0)) for r in by[sweep[0]]}
        curve = sorted(((by[k][0].get("eps", 0.0), [r for r in by[k] if (r["concept"], r.get("seed", 0)) in pairs])
                        for k in (["eupmu"] if "eupmu" in by else []) + sweep), key=lambda c: c[0])
        curve = [rs for _, rs in curve if rs]
        if len(curve) > 1:
            xs = [_mean(r["forget_accuracy"] for r in rs) for rs in curve]
            ys = [_mean(r["base_retain_accuracy"] - r["retain_accuracy"] for r in rs) * 100 for rs in curve]
            ax.plot(xs, ys, "k:", lw=1, zorder=2, label="eps curve (first seed)")
    ax.axvline(FORGET_TARGET, color="grey", lw=0.8, ls="--")
    ax.axhline(RETAIN_DROP * 100, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("forget accuracy (lower: more erased)")
    ax.set_ylabel("retain accuracy drop from the base model (points; lower is better)")
    ax.set_title("Erasure against utility (means, 95% bootstrap bars; runs in brackets)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _probe_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--probe", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    print(json.dumps(probe_memory(a.recipe, a.probe, a.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(sys.argv[1:]))
