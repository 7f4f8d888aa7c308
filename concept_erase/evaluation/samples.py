"""What an evaluation's metrics read: the samples (a prompt row, a seed, its group), their images on disk, read
lazily, the context a metric scores in, and the image conversions metrics share. The `eval` command
(`evaluation/run.py`), the metrics (`evaluation/metrics.py`) and CLIP (`evaluation/clip.py`) import it; it
imports none of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from concept_erase.errors import UserError
from concept_erase.evaluation.prompts import PromptRow
from concept_erase.evaluation.sample import DTYPES, generate_batch
from concept_erase.evaluation.suite import Suite
from concept_erase.io.atomic import atomic_path
from concept_erase.io.loading import load_pipeline
from concept_erase.io.resumable import valid_png
from concept_erase.processes import processes


@dataclass(frozen=True)
class Sample:
    row: PromptRow
    seed: int
    group: str
    attribute: str  # the label column an erased value matched ("concept", "style"), or the suite's default

    @property
    def name(self) -> str:
        return f"{self.row.case_number:05d}_s{self.seed}.png"


TIER = "tier"  # a prompt set's column naming each prompt's tier (bare, a style, a prefix, ...): scored apart too


def tier_of(sample: Sample) -> str:
    return str(sample.row.extra.get(TIER, "") or "")


def labels(row: PromptRow) -> dict[str, str]:
    return {"concept": row.concept, **{k: v for k, v in row.extra.items() if isinstance(v, str)}}


def make_samples(rows: list[PromptRow], seeds: int, erased: list[str]) -> list[Sample]:
    """Every (row, seed) with its group; raises if an erased value names no row."""
    wanted = {e.strip().lower() for e in erased}
    matched: set[str] = set()
    attributes: set[str] = set()
    out = []
    for row in rows:
        hit = [(k, v) for k, v in labels(row).items() if k != TIER and v.strip().lower() in wanted]
        for k, v in hit:
            matched.add(v.strip().lower())
            attributes.add(k)
        group = "forget" if hit else ("retain" if wanted else "all")
        out.extend((row, row.seed + k, group) for k in range(seeds))
    missing = sorted(wanted - matched)
    if missing:
        known = sorted({v for r in rows for v in labels(r).values() if v})
        raise UserError(f"--erased {missing[0]!r} names no prompt of this set; its concepts are: "
                        f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")
    if len(attributes) > 1:
        raise UserError(f"--erased values match different label columns ({', '.join(sorted(attributes))}); "
                        "evaluate one kind of concept at a time")
    attribute = attributes.pop() if attributes else "concept"
    return [Sample(row, seed, group, attribute) for row, seed, group in out]


# ---------------------------------------------------------------- generation

@torch.no_grad()
def generate_missing(pipe, samples: list[Sample], folder: Path, suite: Suite, *, progress: bool = True,
                     desc: str = "generating") -> int:
    """Generate the samples whose PNG is not in `folder`; returns how many were missing. Launched on several
    processes, each draws whole batches of them in turn (the same batches as one process would)."""
    from tqdm.auto import tqdm

    procs = processes()
    folder.mkdir(parents=True, exist_ok=True)
    todo = [s for s in samples if not (folder / s.name).is_file() or not valid_png(folder / s.name)]
    if not todo:
        return 0
    by_guidance: dict[float, list[Sample]] = {}
    for s in todo:
        by_guidance.setdefault(s.row.guidance if s.row.guidance is not None else suite.guidance, []).append(s)
    batches = [(guidance, items[i:i + suite.batch_size]) for guidance, items in by_guidance.items()
               for i in range(0, len(items), suite.batch_size)]
    procs.wait()  # every process has listed what is missing before any of them writes
    mine = procs.share(batches)
    bar = tqdm(total=sum(len(b) for _, b in mine), desc=desc + (f" (process 0 of {procs.world})" if procs.several
                                                                else ""), unit="img",
               disable=not (progress and procs.main))
    for guidance, batch in mine:
        images = generate_batch(pipe, [s.row.prompt for s in batch], [s.seed for s in batch], steps=suite.steps,
                                guidance=guidance, negative_prompt=suite.negative_prompt)
        for s, im in zip(batch, images):
            with atomic_path(folder / s.name, suffix=".png") as tmp:
                im.save(tmp, format="PNG")
        bar.update(len(batch))
    bar.close()
    procs.wait()
    return len(todo)


class LazyImages:
    """The images of some samples, read from disk when indexed: an evaluation of 30,000 images
    never holds them all in memory (metrics read them in batches)."""

    def __init__(self, folder: Path, samples: list[Sample]):
        self.paths = [folder / s.name for s in samples]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def read_images(folder: Path, samples: list[Sample]) -> LazyImages:
    return LazyImages(folder, samples)


def as_uint8(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def uint8_batches(images, size: int = 64):
    """uint8 tensors [B, 3, H, W] over an image sequence, `size` at a time."""
    for i in range(0, len(images), size):
        yield as_uint8(images[i:i + size])


# ---------------------------------------------------------------- the run

class EvalContext:
    """What metrics read: the samples, their images, the groups, the options given on the command line."""

    def __init__(self, *, suite, samples, output, model, weights, erased, options, device, progress):
        self.suite, self.samples, self.output = suite, samples, output
        self.model, self.weights, self.erased = model, weights, erased
        self.options, self.device, self.progress = options, device, progress
        self.attribute = samples[0].attribute if samples else "concept"
        self._images = None

    @property
    def base_groups(self) -> list[str]:
        order = ["forget", "retain", "all"]
        present = {s.group for s in self.samples}
        return [g for g in order if g in present]

    @property
    def groups(self) -> list[str]:
        """The groups, then where the prompt set names tiers (a `tier` column with more than one value) each group
        in each tier: 'forget [red ink]'."""
        tiers = list(dict.fromkeys(tier_of(s) for s in self.samples if tier_of(s)))
        out = self.base_groups
        if len(tiers) > 1:
            out += [f"{g} [{t}]" for g in self.base_groups for t in tiers
                    if any(s.group == g and tier_of(s) == t for s in self.samples)]
        return out

    def images(self) -> LazyImages:
        return read_images(self.output / "images", self.samples)

    def select(self, group: str | None):
        base, _, tier = (group or "").partition(" [")
        tier = tier[:-1] if tier.endswith("]") else None
        idx = [i for i, s in enumerate(self.samples)
               if group is None or (s.group == base and (tier is None or tier_of(s) == tier))]
        samples = [self.samples[i] for i in idx]
        return idx, samples, read_images(self.output / "images", samples)

    def reference_images(self, samples: list[Sample]):
        """The base model's images for these samples: all samples are generated once, in the same
        batches as the evaluated images, into output/reference (resumable like images/)."""
        folder = self.output / "reference"
        if any(not (folder / s.name).is_file() for s in self.samples):
            pipe = load_pipeline(self.model, **self.options.get("load", {}))
            pipe.to(self.device, DTYPES[self.suite.dtype])
            pipe.set_progress_bar_config(disable=True)
            generate_missing(pipe, self.samples, folder, self.suite, progress=self.progress,
                             desc="reference (base model)")
            del pipe
        return read_images(folder, samples), [folder / s.name for s in samples]
