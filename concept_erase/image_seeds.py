"""Which image seeds steer a run and which judge it: two ranges that never meet.

An image's seed fixes its starting noise (`Family.initial_noise`). A check that steers a run (`--stop-when-erased`
stops at the first check at target) and an evaluation that reports on the run must not judge the same images:
a run stopped on a lucky draw of its check's images would then be graded on the same lucky draw.

- Evaluations (`eval`, `sample`, the benchmark, the demo) draw from seed 0 upwards: below `CHECK_SEED_START`.
- Erasure checks draw from `CHECK_SEED_START` upwards (`--check-seed-start`).

The benchmark file checks that its evaluation seeds and every entry's check seeds are disjoint before any run
starts, and each split of a benchmark file evaluates on its own seed range (`evaluation_seed_start`).
"""

from __future__ import annotations

CHECK_SEED_START = 1_000_000  # the first seed an erasure check draws; evaluations stay below it


def seed_range(start: int, count: int) -> range:
    """The `count` image seeds from `start` on."""
    return range(int(start), int(start) + int(count))


def check_block(check_images: int, floor: int = 0) -> int:
    """How many seeds one block of a check's images spans: twice --check-images (the anchors take that many), or
    the floor of images per concept where that is more. With --check-confirm N the N checks in a row draw the
    concept from N such blocks, one after another."""
    return max(2 * int(check_images), int(floor))


def overlap(a: range, b: range) -> range:
    """The seeds two ranges share (an empty range when none)."""
    return range(max(a.start, b.start), min(a.stop, b.stop))


def describe(r: range) -> str:
    """'seeds 1000000-1000031' (or 'seed 7', or 'no seed')."""
    if len(r) == 0:
        return "no seed"
    return f"seed {r.start}" if len(r) == 1 else f"seeds {r.start}-{r.stop - 1}"
