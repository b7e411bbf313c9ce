"""Using an artifact as transformers users do: the image-classification pipeline per task, processors loaded without
the artifact's code, and a printed model that says what it stores."""

import builtins

import numpy as np
import pytest
import torch
from PIL import Image
from reference import randomize_routers
from toy_bert import TASK_LABELS as BERT_TASK_LABELS
from toy_bert import build_toy_bert_base, build_toy_bert_expert, toy_bert_tokenizer
from toy_t5 import build_toy_t5_base, build_toy_t5_expert, toy_t5_tokenizer
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, pipeline
from transformers.image_processing_utils import BaseImageProcessor

from modeling_wemoe import WEMoEConfig, WEMoELinear, WEMoERouter
from wemoe import default_image_processor, merge_bert, merge_clip, merge_t5, save_artifact


@pytest.fixture(scope="module")
def clip_model(base, experts, classnames, tokenizer):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe", keep=0.1)
    randomize_routers(model)
    return model


@pytest.fixture(scope="module")
def clip_artifact(clip_model, base, tmp_path_factory):
    processor = default_image_processor(base.config.vision_config)
    return save_artifact(clip_model, tmp_path_factory.mktemp("clip") / "artifact", processor)


@pytest.fixture(scope="module")
def classify(clip_artifact):
    return pipeline("image-classification", model=str(clip_artifact), trust_remote_code=True)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (2, 40, 48, 3), generator=generator, dtype=torch.uint8)
    return [Image.fromarray(array.numpy()) for array in pixels]


def task_scores(classify, image, task: str) -> torch.Tensor:
    """Softmax over `task`'s columns of the logits over every task's classes (a path that does not pass `task`)."""
    pixel_values = classify.image_processor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = classify.model(pixel_values).logits[0]
    start, end = classify.model.config.task_label_offsets[task]
    return logits[start:end].softmax(-1)


def test_the_artifact_ships_and_names_its_image_classification_pipeline(clip_artifact, classify):
    assert {"pipeline_wemoe_image_classification.py", "pipeline_wemoe_classification.py"} <= {
        path.name for path in clip_artifact.iterdir()
    }
    assert type(classify).__name__ == "WEMoEImageClassificationPipeline"


def test_one_task_gets_only_its_classes_scored_over_that_task(classify, classnames, images):
    tasks_seen = []
    hook = classify.model.register_forward_pre_hook(
        lambda module, args, kwargs: tasks_seen.append(kwargs.get("task")), with_kwargs=True
    )
    try:
        results = {task: classify(images[0], task=task) for task in classnames}
    finally:
        hook.remove()
    assert tasks_seen == list(classnames)  # the model is told the task
    for task, result in results.items():
        expected = task_scores(classify, images[0], task)
        order = expected.argsort(descending=True).tolist()
        assert [prediction["label"] for prediction in result] == [classnames[task][i] for i in order]
        scores = torch.tensor([prediction["score"] for prediction in result])
        torch.testing.assert_close(scores, expected[order], atol=1e-5, rtol=0)
        assert scores.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_top_k_counts_within_the_task(classify, classnames, images):
    result = classify(images[1], task="colors", top_k=2)
    expected = task_scores(classify, images[1], "colors")
    assert [prediction["label"] for prediction in result] == [
        classnames["colors"][i] for i in expected.argsort(descending=True)[:2]
    ]


def test_without_a_task_each_task_gets_its_own_best_classes(classify, classnames, images):
    best = classify(images[0])
    assert [prediction["task"] for prediction in best] == list(classnames)
    for prediction in best:
        expected = task_scores(classify, images[0], prediction["task"])
        assert prediction["label"] == classnames[prediction["task"]][int(expected.argmax())]
        assert prediction["score"] == pytest.approx(expected.max().item(), abs=1e-5)

    two_each = classify(images[0], top_k=2)
    assert [prediction["task"] for prediction in two_each] == [task for task in classnames for _ in range(2)]
    assert two_each[::2] == best


def test_a_batch_of_images_gives_each_image_its_own_result(classify, images):
    assert classify(images, task="shapes") == [classify(image, task="shapes") for image in images]


def test_an_array_goes_to_the_image_processor_as_it_is(classify, images):
    from_array = classify(np.asarray(images[0]), task="scenes")
    from_image = classify(images[0], task="scenes")
    assert [p["label"] for p in from_array] == [p["label"] for p in from_image]
    assert [p["score"] for p in from_array] == pytest.approx([p["score"] for p in from_image], abs=1e-5)


def test_an_unknown_task_or_a_bad_top_k_is_refused(classify, images):
    known = r"this model has tasks \['shapes', 'colors', 'scenes'\]"
    with pytest.raises(ValueError, match=rf"Unknown task 'animals': {known}"):
        classify(images[0], task="animals")
    with pytest.raises(ValueError, match="`top_k` must be a positive int, got 0"):
        classify(images[0], task="shapes", top_k=0)


def bert_artifact(directory):
    base = build_toy_bert_base(seed=0)
    experts = {task: build_toy_bert_expert(base, task, seed=i + 1) for i, task in enumerate(BERT_TASK_LABELS)}
    return save_artifact(merge_bert(base, experts), directory, toy_bert_tokenizer()), len(toy_bert_tokenizer())


def t5_artifact(directory):
    base = build_toy_t5_base(seed=0)
    experts = {task: build_toy_t5_expert(base, seed=i + 1) for i, task in enumerate(("sst2", "topic"))}
    return save_artifact(merge_t5(base, experts), directory, toy_t5_tokenizer()), len(toy_t5_tokenizer())


@pytest.mark.parametrize("family", ["clip", "bert", "t5"])
def test_auto_processor_loads_the_stock_class_without_trust_remote_code_or_a_prompt(
    family, clip_artifact, tmp_path, monkeypatch
):
    if family == "clip":
        artifact, vocabulary = clip_artifact, None
    else:
        artifact, vocabulary = {"bert": bert_artifact, "t5": t5_artifact}[family](tmp_path / "artifact")
    prompts = []

    def no_terminal(*args):
        prompts.append(args)
        raise EOFError  # what input() does with stdin closed

    monkeypatch.setattr(builtins, "input", no_terminal)
    processor = AutoProcessor.from_pretrained(artifact)
    assert prompts == []
    assert type(processor).__module__.startswith("transformers."), type(processor)
    assert type(AutoProcessor.from_pretrained(artifact, trust_remote_code=True)) is type(processor)
    if vocabulary is None:
        assert isinstance(processor, BaseImageProcessor)
    else:
        assert isinstance(processor, PreTrainedTokenizerBase) and len(processor) == vocabulary
        tokenizer = AutoTokenizer.from_pretrained(artifact, trust_remote_code=True)
        assert type(tokenizer) is type(processor) and len(tokenizer) == vocabulary


def small_config(**fields) -> WEMoEConfig:
    return WEMoEConfig(
        vision_config={"hidden_size": 16, "num_attention_heads": 4}, projection_dim=8, tasks=["a", "b", "c"], **fields
    )


@pytest.mark.parametrize(
    ("fields", "task_vectors"),
    [
        ({}, "WEMoEDenseTaskVectors(num_experts=3, shape=(70, 12))"),
        (
            {"expert_format": "sparse", "keep": 0.1},
            "WEMoESparseTaskVectors(num_experts=3, shape=(70, 12), keep=0.1 (84 of 840 entries per expert))",
        ),
        ({"expert_format": "lowrank", "rank": 4}, "WEMoELowRankTaskVectors(num_experts=3, shape=(70, 12), rank=4)"),
    ],
    ids=["dense", "sparse", "lowrank"],
)
def test_a_wemoe_linear_prints_its_shape_and_its_task_vectors_storage(fields, task_vectors):
    text = repr(WEMoELinear(small_config(router_top_k=2, **fields), 12, 70))
    assert text.startswith("WEMoELinear(\n  in_features=12, out_features=70, bias=True, top_k=2\n")
    assert f"(weight_task_vectors): {task_vectors}\n" in text
    assert repr(WEMoELinear(small_config(**fields), 12, 70, bias=False)).startswith(
        "WEMoELinear(\n  in_features=12, out_features=70, bias=False\n"
    )


def test_a_router_prints_its_size_depth_and_normalization():
    assert repr(WEMoERouter(16, 3, hidden_layers=2, normalization="softmax")) == (
        "WEMoERouter(\n"
        "  hidden_size=16, num_experts=3, hidden_layers=2, normalization=softmax\n"
        "  (fc1): WEMoERouterLinear(in_features=16, out_features=16, bias=True)\n"
        "  (fc2): WEMoERouterLinear(in_features=16, out_features=3, bias=True)\n"
        ")"
    )
    assert repr(WEMoERouter(16, 3, hidden_layers=0)) == (
        "WEMoERouter(hidden_size=16, num_experts=3, hidden_layers=0, normalization=none)"
    )


def test_a_printed_model_says_what_it_stores(clip_model, base):
    hidden, intermediate = base.config.vision_config.hidden_size, base.config.vision_config.intermediate_size
    text = str(clip_model)
    kept = round(0.1 * hidden * intermediate)
    assert (
        f"(weight_task_vectors): WEMoESparseTaskVectors(num_experts=3, shape=({intermediate}, {hidden}), keep=0.1 "
        f"({kept} of {hidden * intermediate} entries per expert))"
    ) in text
    router = f"hidden_size={hidden}, num_experts=3, hidden_layers=2, normalization=none"
    assert f"(router): WEMoERouter(\n    {router}\n" in text
