"""Merge methods on plain tensors against direct implementations."""

import pytest
import torch
from peft.utils import merge_utils
from reference import textbook_ties

from wemoe.merge_methods import (
    STATIC_MERGE_METHODS,
    dare_linear,
    dare_ties,
    get_static_merge,
    magnitude_keep_mask,
    magnitude_prune,
    static_merger,
    tensor_seed,
    ties_merging,
)
from wemoe.recipe import STATIC_MERGE_SPECS, RecipeError, load_recipe


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
    assert all(method.reference.startswith("https://arxiv.org/") for method in STATIC_MERGE_METHODS.values())
    with pytest.raises(
        ValueError,
        match=r"Unknown static merge method 'dare'; available: \['dare_linear', 'dare_ties', 'magnitude_prune', "
        r"'task_arithmetic', 'ties'\]",
    ):
        get_static_merge("dare")


def test_every_data_free_recipe_method_is_a_registered_function_taking_its_fields():
    import inspect

    specs = {spec.model_fields["method"].annotation.__args__[0]: spec for spec in STATIC_MERGE_SPECS}
    assert set(STATIC_MERGE_METHODS) == set(specs) - {"adamerging"}
    for name, method in STATIC_MERGE_METHODS.items():
        parameters = list(inspect.signature(method.merge).parameters)
        assert parameters[:2] == ["pretrained", "task_vectors"]
        assert set(parameters[2:]) == set(specs[name].model_fields) - {"method"}


def stacked(num_experts=4, shape=(40, 25), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(num_experts, *shape, generator=generator)


def test_magnitude_prune_is_task_arithmetic_on_magnitude_trimmed_task_vectors():
    pretrained, task_vectors = stacked()  # 1000 entries: density * numel is whole, so floor and round agree
    trimmed = task_vectors * magnitude_keep_mask(task_vectors, 0.3)
    torch.testing.assert_close(magnitude_prune(pretrained, task_vectors, 0.4, 0.3), pretrained + 0.4 * trimmed.sum(0))


def test_dare_drops_at_random_rescales_and_is_peft_under_its_seed():
    pretrained, task_vectors = stacked()
    merged = dare_linear(pretrained, task_vectors, scaling=0.5, density=0.25, seed=3)
    torch.manual_seed(3)
    expected = merge_utils.dare_linear(list(task_vectors), torch.ones(4), 0.25)
    torch.testing.assert_close(merged, pretrained + 0.5 * expected)
    # Each kept entry is rescaled by 1 / density; about a quarter of each expert's entries are kept.
    torch.manual_seed(3)
    kept = [merge_utils.random_pruning(tensor, 0.25, rescale=True) for tensor in task_vectors]
    for tensor, pruned in zip(task_vectors, kept, strict=True):
        nonzero = pruned != 0
        torch.testing.assert_close(pruned[nonzero], tensor[nonzero] / 0.25)
        assert 0.18 < nonzero.float().mean() < 0.32

    torch.manual_seed(3)
    expected_ties = merge_utils.dare_ties(list(task_vectors), torch.ones(4), 0.25, "frequency")
    merged_ties = dare_ties(pretrained, task_vectors, scaling=0.5, density=0.25, majority_sign="frequency", seed=3)
    torch.testing.assert_close(merged_ties, pretrained + 0.5 * expected_ties)


@pytest.mark.parametrize("method", [dare_linear, dare_ties])
def test_dare_is_deterministic_for_a_seed_and_leaves_the_global_generator_alone(method):
    pretrained, task_vectors = stacked()
    options = {"scaling": 0.3, "density": 0.5, "seed": 7} | ({"majority_sign": "total"} if method is dare_ties else {})
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = method(pretrained, task_vectors, **options)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(method(pretrained, task_vectors, **options), first)
    assert not torch.equal(method(pretrained, task_vectors, **options | {"seed": 8}), first)


def test_a_seeded_recipe_draws_each_tensor_from_its_own_seed():
    pretrained, task_vectors = stacked()
    merge_tensor = static_merger({"method": "dare_linear", "scaling": 0.3, "density": 0.5, "seed": 0})
    first = merge_tensor("encoder.layers.0.self_attn.q_proj.weight", pretrained, task_vectors)
    second = merge_tensor("encoder.layers.1.self_attn.q_proj.weight", pretrained, task_vectors)
    assert not torch.equal(first, second)  # same shape, same inputs: different drop patterns
    seed = tensor_seed(0, "encoder.layers.0.self_attn.q_proj.weight")
    torch.testing.assert_close(first, dare_linear(pretrained, task_vectors, 0.3, 0.5, seed), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater than or equal to 1")
def test_ties_agrees_with_peft_except_where_the_sign_vote_is_tied():
    """Why TIES is not peft's `ties`: a tied vote elects + there and the tensor's majority sign here (the paper's
    reference code). Without tied votes the two agree exactly; with `frequency` votes ties are common."""
    pretrained, task_vectors = stacked(num_experts=4)
    ours = ties_merging(pretrained, task_vectors, scaling=0.3, density=0.2, majority_sign="total")
    peft = pretrained + 0.3 * merge_utils.ties(list(task_vectors), torch.ones(4), 0.2, "total")
    torch.testing.assert_close(ours, peft, rtol=0, atol=0)

    # One entry, two experts for + and two against, in a tensor whose other entries are mostly negative.
    task_vectors = torch.tensor([[1.0, -1.0], [2.0, -1.0], [-1.0, -1.0], [-2.0, -1.0]])
    ours = ties_merging(torch.zeros(2), task_vectors, scaling=1.0, density=1.0, majority_sign="frequency")
    peft = merge_utils.ties(list(task_vectors), torch.ones(4), 1.0, "frequency")
    assert ours.tolist() == [-1.5, -1.0] and peft.tolist() == [1.5, -1.0]


@pytest.mark.parametrize(
    ("static_merge", "message"),
    [
        ({"method": "dare_linear", "density": 1.0}, r"static_merge.density: Input should be less than 1"),
        ({"method": "dare_ties", "density": 0}, r"static_merge.density: Input should be greater than 0"),
        ({"method": "dare_ties", "majority_sign": "most"}, r"static_merge.majority_sign: Input should be 'total'"),
        ({"method": "magnitude_prune", "seed": 1}, r"static_merge.seed: Extra inputs are not permitted"),
        ({"method": "dare_linear", "seed": "x"}, r"static_merge.seed: Input should be a valid integer"),
    ],
)
def test_method_parameters_are_validated_with_the_recipe(static_merge, message):
    recipe = {"base_model": "org/base", "variant": "static", "static_merge": static_merge}
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe | {"tasks": [{"name": "a", "model": "org/a", "classnames": ["x", "y"]}]})
