"""Seeds derived from coordinates, without collisions.

Every random stream of a run is named by its coordinates (the run's seed, the step, the process,
the micro-batch, which stream). A linear formula such as `(seed * A + step) * B + rank * C + micro`
maps different coordinates onto the same seed (rank 10 of step s met rank 0, micro-batch 1, of step
s + 1). numpy's `SeedSequence` hashes the whole tuple instead: distinct tuples give unrelated
64-bit seeds for any number of ranks and micro-batches (a collision needs ~2^32 streams).
"""

from __future__ import annotations

import numpy as np
import torch

from concept_erase.options import MAX_SEED  # noqa: F401 - the seed range every command declares


def derive_seed(*coords: int) -> int:
    """A 64-bit seed for the stream named by `coords` (whole numbers in [0, 2^63)).

    The entropy handed to SeedSequence is a fixed-width encoding (the count, then two 32-bit words
    per coordinate): SeedSequence pads short entropy with zeros and splits big integers into words,
    so the plain list would make (s, i) and (s, i, 0), or (2^32, x) and (0, 1, x), the same stream.
    """
    words = [len(coords)]
    for c in coords:
        c = int(c)
        if not 0 <= c <= MAX_SEED:
            raise ValueError(f"seed coordinates must be whole numbers in [0, 2^63), got {coords}")
        words += [c & 0xFFFFFFFF, c >> 32]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def generator(*coords: int) -> torch.Generator:
    """A CPU generator for the stream named by `coords`: the same draws on any device and after a resume."""
    return torch.Generator("cpu").manual_seed(derive_seed(*coords))
