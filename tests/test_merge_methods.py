"""Merge methods on plain tensors against direct implementations."""

import pytest
import torch
from reference import textbook_ties

from conversion.merge_methods import STATIC_MERGE_METHODS, get_static_merge, magnitude_keep_mask, ties_merging


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_the_textbook_algorithm(majority_sign, density):
    generator = torch.Generator().manual_seed(0)
    pretrained = torch.randn(6, 5, generator=generator)
    task_vectors = torch.randn(4, 6, 5, generator=generator)
    expected = textbook_ties(pretrained, task_vectors, 0.4, density, majority_sign)
    actual = ties_merging(pretrained, task_vectors, scaling=0.4, density=density, majority_sign=majority_sign)
    torch.testing.assert_close(actual, expected)


def test_magnitude_keep_mask_keeps_exactly_the_largest():
    task_vectors = torch.tensor([[[0.1, -3.0], [2.0, 0.5]], [[-1.0, 0.2], [0.3, 4.0]]])
    mask = magnitude_keep_mask(task_vectors, keep=0.5)
    assert mask.tolist() == [[[False, True], [True, False]], [[True, False], [False, True]]]


def test_registry_names_methods_and_rejects_unknown_ones():
    assert {"task_arithmetic", "ties"} <= set(STATIC_MERGE_METHODS)
    assert STATIC_MERGE_METHODS["ties"].reference.startswith("https://arxiv.org/")
    with pytest.raises(
        ValueError, match=r"Unknown static merge method 'dare'; available: \['task_arithmetic', 'ties'\]"
    ):
        get_static_merge("dare")
