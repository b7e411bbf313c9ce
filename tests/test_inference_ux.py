"""Using an artifact as transformers users do: processors loaded without the artifact's code, and a printed model
that says what it stores."""

import builtins

import pytest
from reference import randomize_routers
from toy_bert import TASK_LABELS as BERT_TASK_LABELS
from toy_bert import build_toy_bert_base, build_toy_bert_expert, toy_bert_tokenizer
from toy_t5 import build_toy_t5_base, build_toy_t5_expert, toy_t5_tokenizer
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from conversion import default_image_processor, merge_clip, save_artifact
from conversion.backbones.bert import merge_bert
from conversion.backbones.t5 import merge_t5
from modeling_wemoe import WEMoEConfig, WEMoELinear, WEMoERouter


@pytest.fixture(scope="module")
def clip_model(base, experts, classnames, tokenizer):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant="e-wemoe", keep=0.1)
    randomize_routers(model)
    return model


@pytest.fixture(scope="module")
def clip_artifact(clip_model, base, tmp_path_factory):
    processor = default_image_processor(base.config.vision_config)
    return save_artifact(clip_model, tmp_path_factory.mktemp("clip") / "artifact", processor)


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
