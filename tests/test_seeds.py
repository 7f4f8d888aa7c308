"""Random streams named by their coordinates never share draws."""

import itertools

import pytest
import torch

from concept_erase.training.seeds import derive_seed, generator
from concept_erase.training.trainer import step_generator


def test_no_two_coordinates_of_a_run_share_a_seed():
    coords = list(itertools.product([0, 1, 7], range(12), range(12), range(3), range(3)))  # seed, step, rank, micro, stream
    seeds = {derive_seed(*c) for c in coords}
    assert len(seeds) == len(coords)


def test_the_old_formulas_collisions_are_gone():
    # The linear formula gave rank 10, micro-batch 0, step s exactly the draws of rank 0, micro-batch 1, step s + 1.
    a = torch.randn(8, generator=step_generator(3, 5, 10, 0))
    b = torch.randn(8, generator=step_generator(3, 6, 0, 1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("x,y", [((5, 2), (5, 2, 0)), ((2**32, 7), (0, 1, 7)), ((1, 0), (0, 1))])
def test_padding_and_word_splitting_do_not_merge_streams(x, y):
    assert derive_seed(*x) != derive_seed(*y)


def test_streams_are_reproducible_and_refuse_negative_coordinates():
    assert torch.equal(torch.randn(4, generator=generator(1, 2, 3)), torch.randn(4, generator=generator(1, 2, 3)))
    with pytest.raises(ValueError):
        derive_seed(-1, 0)
    with pytest.raises(ValueError):
        derive_seed(2**63)
