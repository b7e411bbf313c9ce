"""Static baselines from a recipe (`variant: static`): task arithmetic, TIES and layer-wise AdaMerging, each a plain
CLIPModel that `wemoe-eval` scores zero-shot."""

import pytest
import torch
import yaml
from test_tta import streams_entropy
from transformers import AutoImageProcessor, CLIPModel

from wemoe import convert
from wemoe.adamerging import LayerWiseAdaMerging
from wemoe.adaptation import task_streams
from wemoe.backbones import get_backbone
from wemoe.backbones.clip import ZeroShotCLIP
from wemoe.checkpoints import InMemoryTensors
from wemoe.data import load_task_datasets
from wemoe.evaluation import evaluate
from wemoe.merge_methods import dare_ties, tensor_seed, ties_merging
from wemoe.recipe import RecipeError, load_recipe
from wemoe.streams import entropy_loss


def static_recipe(recipe: dict, static_merge: dict) -> dict:
    return recipe | {"variant": "static", "static_merge": static_merge}


def vision_tensors(model_dir) -> dict[str, torch.Tensor]:
    return CLIPModel.from_pretrained(model_dir).vision_model.state_dict()


def expert_vision_tensors(experts) -> dict[str, dict[str, torch.Tensor]]:
    # A CLIPVisionModel is the vision tower itself; a CLIPModel holds one.
    return {task: getattr(model, "vision_model", model).state_dict() for task, model in experts.items()}


def test_task_arithmetic_scores_like_a_wemoe_model_before_adaptation(recipe, task_data, tmp_path):
    # A fresh WEMoE model routes every sample with init_lambda on every expert: task arithmetic at that scaling.
    static = convert(static_recipe(recipe, {"method": "task_arithmetic", "scaling": 0.3}), tmp_path / "ta")
    wemoe = convert(recipe, tmp_path / "wemoe")
    static_scores, wemoe_scores = evaluate(static, task_data), evaluate(wemoe, task_data)
    assert static_scores == pytest.approx(wemoe_scores, abs=1e-9)


def test_static_merges_write_the_merged_vision_tower(recipe, base, experts, tmp_path):
    pretrained = base.vision_model.state_dict()
    expert_tensors = expert_vision_tensors(experts)
    ta = vision_tensors(convert(static_recipe(recipe, {"method": "task_arithmetic", "scaling": 0.5}), tmp_path / "ta"))
    ties_options = {"scaling": 0.7, "density": 0.3, "majority_sign": "total"}
    ties = vision_tensors(convert(static_recipe(recipe, {"method": "ties", **ties_options}), tmp_path / "ties"))
    dare_options = {"scaling": 0.6, "density": 0.4, "majority_sign": "frequency", "seed": 5}
    dare = vision_tensors(convert(static_recipe(recipe, {"method": "dare_ties", **dare_options}), tmp_path / "dare"))
    for key, theta0 in pretrained.items():
        task_vectors = torch.stack([tensors[key] - theta0 for tensors in expert_tensors.values()])
        torch.testing.assert_close(ta[key], theta0 + 0.5 * task_vectors.sum(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(ties[key], ties_merging(theta0, task_vectors, **ties_options), atol=1e-6, rtol=0)
        expected = dare_ties(theta0, task_vectors, **dare_options | {"seed": tensor_seed(5, key)})
        torch.testing.assert_close(dare[key], expected, atol=1e-6, rtol=0)
    # The text tower is the base's: it builds the zero-shot heads.
    text = CLIPModel.from_pretrained(tmp_path / "ta").text_model.state_dict()
    for key, tensor in base.text_model.state_dict().items():
        assert torch.equal(text[key], tensor)


def layer_wise_merging(base, experts, tokenizer, classnames, init_lambda=0.3) -> LayerWiseAdaMerging:
    classifier = ZeroShotCLIP(base, tokenizer, classnames)
    sources = {task: InMemoryTensors(tensors, task) for task, tensors in expert_vision_tensors(experts).items()}
    pretrained = InMemoryTensors(base.vision_model.state_dict(), "base")
    return LayerWiseAdaMerging(classifier, "clip.vision_model.", pretrained, sources, init_lambda)


def test_layer_wise_merge_starts_as_task_arithmetic_and_only_its_coefficients_train(
    base, experts, tokenizer, classnames, pixel_values
):
    merging = layer_wise_merging(base, experts, tokenizer, classnames, init_lambda=0.3)
    assert merging.merge_coefficients.shape == (len(base.vision_model.state_dict()), len(experts))
    reference = CLIPModel(base.config).eval()
    reference.load_state_dict(base.state_dict())
    expert_tensors = expert_vision_tensors(experts)
    with torch.no_grad():
        for key, theta0 in base.vision_model.state_dict().items():
            reference.vision_model.get_parameter(key).copy_(
                theta0 + 0.3 * sum(tensors[key] - theta0 for tensors in expert_tensors.values())
            )
    expected = ZeroShotCLIP(reference, tokenizer, classnames)(pixel_values, task="colors").logits
    logits = merging(pixel_values, task="colors").logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    entropy_loss(logits).backward()
    assert merging.merge_coefficients.grad is not None and merging.merge_coefficients.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in merging.named_parameters() if name != "merge_coefficients")


def test_adamerging_recipe_lowers_entropy_and_saves_the_merge_of_its_coefficients(
    recipe, task_data, tmp_path, tokenizer, classnames
):
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(task_data))
    options = {"method": "adamerging", "data": str(data_yaml), "steps": 15, "lr": 0.05, "batch_size": 4}
    adamerged = convert(static_recipe(recipe, options), tmp_path / "adamerging")
    ta = convert(static_recipe(recipe, {"method": "task_arithmetic", "scaling": 0.3}), tmp_path / "ta")

    image_processor = AutoImageProcessor.from_pretrained(adamerged)
    datasets = load_task_datasets(task_data, list(classnames), "image")
    streams = task_streams(get_backbone("clip"), datasets, image_processor, 4)

    def mean_entropy(model_dir) -> float:
        return streams_entropy(
            ZeroShotCLIP(CLIPModel.from_pretrained(model_dir).eval(), tokenizer, classnames), streams
        )

    assert mean_entropy(adamerged) < mean_entropy(ta)
    assert vision_tensors(adamerged).keys() == vision_tensors(ta).keys()
    assert any(not torch.equal(vision_tensors(adamerged)[k], v) for k, v in vision_tensors(ta).items())


def test_adamerging_is_refused_for_a_wemoe_variant(recipe):
    with pytest.raises(RecipeError, match="static_merge: adamerging merges a whole model from data"):
        load_recipe(recipe | {"static_merge": {"method": "adamerging", "data": "data.yaml"}})


def test_adamerging_without_data_names_the_key(recipe):
    with pytest.raises(RecipeError, match=r"static_merge.data: Field required"):
        load_recipe(static_recipe(recipe, {"method": "adamerging"}))
