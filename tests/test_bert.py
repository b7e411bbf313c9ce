"""WEMoE for BERT-style classifiers against plain-BERT references: task arithmetic at init, exact per-sample routing
over real tokens in every expert format, batch and padding independence, a fresh-process round trip with the
pipeline, conversion and adaptation through the CLIs, the static baselines, LoRA experts, and bad input."""

import copy
import json

import pytest
import torch
import yaml
from fresh_process import BLOCK_REPOSITORY_PACKAGES, run_in_fresh_process
from reference import randomize_routers
from toy_bert import TASK_LABELS, build_toy_bert_base, build_toy_bert_expert, toy_bert_tokenizer
from transformers import BertForSequenceClassification

from wemoe import convert, merge_bert, save_artifact
from wemoe.cli.evaluate import main as eval_main
from wemoe.cli.tta import main as tta_main

TASKS = tuple(TASK_LABELS)
TEXTS = [
    "a really good movie , i love it",
    "the team lost the match",
    "bread and cheese soup",
    "boring",
]


@pytest.fixture(scope="module")
def family():
    base = build_toy_bert_base(seed=0)
    return base, {task: build_toy_bert_expert(base, task, seed=i + 1) for i, task in enumerate(TASKS)}


@pytest.fixture(scope="module")
def tokenizer():
    return toy_bert_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def task_vector(base, expert, key: str) -> torch.Tensor:
    return expert.bert.state_dict()[key] - base.state_dict()[key]


@torch.no_grad()
def task_arithmetic_classifier(base, experts, task: str, scaling: float) -> BertForSequenceClassification:
    """A plain classifier for `task`: every encoder tensor theta_0 + scaling * sum_i tau_i, the task's own head."""
    model = copy.deepcopy(experts[task])
    for key, parameter in model.bert.named_parameters():
        if not key.startswith("pooler."):
            parameter.copy_(base.state_dict()[key] + scaling * sum(task_vector(base, e, key) for e in experts.values()))
    return model


def pruned(task_vectors: torch.Tensor, keep: float | None) -> torch.Tensor:
    """Each expert's tensor cut to its `keep` fraction of largest-magnitude entries, by sorting."""
    if keep is None:
        return task_vectors
    flat = task_vectors.flatten(1)
    order = torch.sort(flat.abs(), dim=1, descending=True).indices[:, : round(keep * flat.shape[1])]
    return (flat * torch.zeros_like(flat).scatter_(1, order, 1.0)).view_as(task_vectors)


@torch.no_grad()
def per_sample_reference_logits(wemoe, base, experts, inputs, task: str) -> torch.Tensor:
    """Each text alone and unpadded through a plain task-arithmetic BERT whose feed-forward weights are merged for
    that text only: a hook before each layer's feed-forward routes on its input, averaged over the text's tokens."""
    config = wemoe.config
    plain = task_arithmetic_classifier(base, experts, task, config.static_merge["scaling"])
    pretrained = base.state_dict()

    def merge_for_this_sample(index):
        layer = plain.bert.encoder.layer[index]
        router = wemoe.bert.encoder.layer[index].router if config.router_mode == "per_layer" else wemoe.router

        def hook(module, args):
            routing = router(args[0]).mean(dim=1)[0]
            linears = {"intermediate.dense": layer.intermediate.dense, "output.dense": layer.output.dense}
            for name, linear in linears.items():
                for kind in ("weight", "bias"):
                    key = f"encoder.layer.{index}.{name}.{kind}"
                    stacked = torch.stack([task_vector(base, e, key) for e in experts.values()])
                    merged = pretrained[key] + torch.einsum("e,e...->...", routing, pruned(stacked, config.keep))
                    getattr(linear, kind).copy_(merged)

        return hook

    handles = [
        layer.intermediate.register_forward_pre_hook(merge_for_this_sample(i))
        for i, layer in enumerate(plain.bert.encoder.layer)
    ]
    try:
        rows = []
        for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
            length = int(mask.sum())
            rows.append(plain(input_ids=ids[None, :length]).logits[0])
        return torch.stack(rows)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(
    "options",
    [
        {"variant": "wemoe"},
        {"variant": "wemoe", "router": {"hidden_layers": 1, "granularity": "token"}},
        {"variant": "e-wemoe", "keep": 1.0},
        {"variant": "wemoe", "expert_format": "lowrank", "rank": 32},
        {"variant": "wemoe", "upscale": ["mlp", "attention"]},
        {"variant": "e-wemoe", "keep": 1.0, "upscale": ["attention"]},
    ],
    ids=["wemoe", "depth1-token", "e-wemoe-keep-all", "lowrank-full-rank", "mlp+attention", "e-wemoe-attention"],
)
def test_fresh_merge_equals_task_arithmetic_with_each_task_s_own_head(family, batch, options):
    base, experts = family
    options = {**options, "router": {**options.get("router", {}), "init_lambda": 0.25}}
    model = merge_bert(base, experts, static_merge={"method": "task_arithmetic", "scaling": 0.25}, **options)
    with torch.no_grad():
        everything = model(**batch).logits
        for index, task in enumerate(TASKS):
            expected = task_arithmetic_classifier(base, experts, task, 0.25)(**batch).logits
            torch.testing.assert_close(model(**batch, task=task).logits, expected, atol=1e-5, rtol=0)
            start = sum(len(TASK_LABELS[t]) for t in TASKS[:index])
            torch.testing.assert_close(everything[:, start : start + len(TASK_LABELS[task])], expected)
    assert model.config.task_labels == TASK_LABELS
    assert model.config.id2label[2] == "topic: sports"


@pytest.mark.parametrize(
    "options",
    [
        {"variant": "wemoe"},
        {"variant": "e-wemoe", "keep": 0.3},
        {"variant": "wemoe", "expert_format": "lowrank", "rank": 32},
    ],
    ids=["dense", "sparse", "lowrank"],
)
def test_routing_matches_a_reference_that_merges_weights_per_sample(family, batch, options):
    base, experts = family
    model = merge_bert(base, experts, **options)
    randomize_routers(model)
    with torch.no_grad():
        output = model(**batch, task="topic", output_routing_weights=True)
    routing = torch.stack(output.routing_weights)  # (layers, batch, experts)
    assert routing.std(dim=1).amax(dim=-1).min() > 1e-2, "routing must differ between samples"
    expected = per_sample_reference_logits(model, base, experts, batch, "topic")
    torch.testing.assert_close(output.logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("upscale", [["mlp"], ["mlp", "attention"]])
def test_padding_and_batch_mates_do_not_change_a_sample(family, tokenizer, upscale):
    base, experts = family
    model = merge_bert(base, experts, variant="e-wemoe", upscale=upscale)
    randomize_routers(model)
    alone = tokenizer(TEXTS[3:], return_tensors="pt")
    padded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert padded["attention_mask"][3].sum() < padded["attention_mask"].shape[1], "the sample must be padded"
    with torch.no_grad():
        single = model(**alone, task="sentiment", output_routing_weights=True)
        in_batch = model(**padded, task="sentiment", output_routing_weights=True)
    torch.testing.assert_close(in_batch.logits[3], single.logits[0], atol=1e-5, rtol=0)
    for batched, solo in zip(in_batch.routing_weights, single.routing_weights, strict=True):
        torch.testing.assert_close(batched[3], solo[0], atol=1e-5, rtol=0)


BERT_FRESH_PROCESS_SCRIPT = BLOCK_REPOSITORY_PACKAGES + """
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline

artifact, inputs_path, out_path = sys.argv[1:4]
texts = torch.load(inputs_path)["texts"]
tokenizer = AutoTokenizer.from_pretrained(artifact)
encoded = tokenizer(texts, return_tensors="pt", padding=True)
results = {}
for auto_class in (AutoModel, AutoModelForSequenceClassification):
    model, info = auto_class.from_pretrained(artifact, trust_remote_code=True, output_loading_info=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(**encoded, task="topic").logits
    results[auto_class.__name__] = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "logits": logits.tolist(),
    }
classify = pipeline("text-classification", model=artifact, trust_remote_code=True)
results["one_task"] = classify(texts[0], task="topic")
results["every_task"] = classify(texts[0])
json.dump(results, open(out_path, "w"))
"""


@pytest.mark.parametrize("variant", ["wemoe", "e-wemoe"])
def test_round_trip_and_pipeline_in_a_process_without_this_repository(family, tokenizer, tmp_path, variant):
    base, experts = family
    model = merge_bert(base, experts, variant=variant)
    randomize_routers(model, std=1.0)
    artifact = save_artifact(model, tmp_path / "artifact", tokenizer)
    config = json.loads((artifact / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSequenceClassification"}
    assert {"modeling_wemoe_bert.py", "pipeline_wemoe_text_classification.py", "modeling_wemoe.py"} <= {
        p.name for p in artifact.iterdir()
    }

    results = run_in_fresh_process(artifact, {"texts": TEXTS}, tmp_path, BERT_FRESH_PROCESS_SCRIPT)

    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, return_tensors="pt", padding=True), task="topic").logits
    for auto_class in ("AutoModel", "AutoModelForSequenceClassification"):
        assert results[auto_class]["missing"] == [] and results[auto_class]["unexpected"] == []
        torch.testing.assert_close(torch.tensor(results[auto_class]["logits"]), expected, atol=1e-5, rtol=0)
    one_task = results["one_task"]
    assert [r["label"] for r in one_task] == [TASK_LABELS["topic"][i] for i in expected[0].argsort(descending=True)]
    assert sum(r["score"] for r in one_task) == pytest.approx(1.0)
    assert [r["task"] for r in results["every_task"]] == list(TASKS)


@pytest.fixture(scope="module")
def saved_family(family, tokenizer, tmp_path_factory):
    """The base (with its tokenizer) and the experts saved as ordinary checkpoint directories, and labeled text data
    per task (parquet)."""
    from datasets import Dataset

    base, experts = family
    root = tmp_path_factory.mktemp("bert")
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    paths = {"base": str(root / "base")}
    data = {"tasks": {}}
    for i, (task, expert) in enumerate(experts.items()):
        expert.save_pretrained(root / task)
        paths[task] = str(root / task)
        labels = [(i + row) % len(TASK_LABELS[task]) for row in range(12)]
        texts = [" ".join(TEXTS[(row + i) % len(TEXTS)].split()[: 2 + row % 4]) for row in range(12)]
        Dataset.from_dict({"text": texts, "label": labels}).to_parquet(root / f"{task}.parquet")
        data["tasks"][task] = {"path": "parquet", "data_files": str(root / f"{task}.parquet"), "split": "train"}
    return paths, data


def bert_recipe(paths, **fields) -> dict:
    return {
        "base_model": paths["base"],
        "architecture": "bert",
        "tasks": [{"name": task, "model": paths[task]} for task in TASKS],
        **fields,
    }


def test_convert_adapt_and_evaluate_through_the_clis(saved_family, tmp_path, capsys):
    paths, data = saved_family
    artifact = convert(bert_recipe(paths, variant="e-wemoe", keep=0.2), tmp_path / "artifact")
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data))
    tta_main([str(artifact), str(data_yaml), "--output", str(tmp_path / "adapted"), "--steps", "3",
              "--batch-size", "4", "--lr", "1e-2"])
    eval_main([str(tmp_path / "adapted"), str(data_yaml), "--output", str(tmp_path / "results.json")])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {*TASKS, "average"} and all(0 <= entry["score"] <= 1 for entry in results.values())
    card = (artifact / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "| topic | sports, science, food |" in card


def test_an_individual_fine_tune_and_the_static_baselines_are_scored_per_task(saved_family, tmp_path):
    paths, data = saved_family
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(data))
    one_task = tmp_path / "topic.yaml"
    one_task.write_text(yaml.safe_dump({"tasks": {"topic": data["tasks"]["topic"]}}))
    eval_main([paths["topic"], str(one_task), "--output", str(tmp_path / "expert.json")])
    static = convert(bert_recipe(paths, variant="static"), tmp_path / "task_arithmetic")
    assert sorted(p.name for p in static.iterdir()) == sorted([*TASKS, "merge_config.yaml"])
    assert BertForSequenceClassification.from_pretrained(static / "topic").config.id2label[0] == "sports"
    eval_main([str(static), str(data_yaml), "--output", str(tmp_path / "static.json")])
    fresh = convert(bert_recipe(paths), tmp_path / "wemoe")
    eval_main([str(fresh), str(data_yaml), "--output", str(tmp_path / "wemoe.json")])
    static_scores = json.loads((tmp_path / "static.json").read_text())
    assert static_scores == json.loads((tmp_path / "wemoe.json").read_text())  # a fresh WEMoE is task arithmetic
    adamerging = {"method": "adamerging", "data": str(data_yaml), "steps": 3, "lr": 0.05, "batch_size": 4}
    convert(bert_recipe(paths, variant="static", static_merge=adamerging), tmp_path / "adamerging")
    eval_main([str(tmp_path / "adamerging"), str(data_yaml), "--output", str(tmp_path / "adamerging.json")])


def lora_bert_expert(base, task: str, seed: int):
    """A PEFT LoRA classifier over `base` (nonzero factors, trained classifier), and the dense model it stands for."""
    from peft import LoraConfig, get_peft_model

    labels = TASK_LABELS[task]
    model = BertForSequenceClassification(copy.deepcopy(base.config))
    model.bert.load_state_dict(base.state_dict())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], task_type="SEQ_CLS")
    peft_model = get_peft_model(model.eval(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name or "classifier" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    dense = copy.deepcopy(peft_model).merge_and_unload().eval()
    dense.config.id2label = dict(enumerate(labels))
    return peft_model, dense


def test_lora_experts_merge_as_their_dense_fine_tunes(family, batch, tmp_path):
    base, _ = family
    sources, dense = {}, {}
    for i, task in enumerate(("sentiment", "formality")):
        peft_model, dense[task] = lora_bert_expert(base, task, seed=i)
        peft_model.save_pretrained(tmp_path / task)
        sources[task] = str(tmp_path / task)
    classnames = {task: TASK_LABELS[task] for task in sources}
    from_adapters = merge_bert(base, sources, classnames)
    from_dense = merge_bert(base, dense)
    with torch.no_grad():
        for task in sources:
            torch.testing.assert_close(
                from_adapters(**batch, task=task).logits, from_dense(**batch, task=task).logits, atol=1e-5, rtol=0
            )
    with pytest.raises(ValueError, match=r"Task 'sentiment': its expert names no classes \(a LoRA adapter"):
        merge_bert(base, sources)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda base, experts: {**experts, "topic": build_toy_bert_expert(build_toy_bert_base(1, hidden_size=64,
                                                                            num_attention_heads=4), "topic", 3)},
            r"Expert 'topic' does not share the base model's architecture: hidden_size: base 32, expert 64",
        ),
        (
            lambda base, experts: {**experts, "topic": experts["topic"].bert},
            r"Expert 'topic' must be a BertForSequenceClassification \(it brings its head\)",
        ),
        (lambda base, experts: {**experts, "topic": poisoned_head(experts["topic"])},
         r"Expert 'topic': tensor 'classifier.weight' contains NaN"),
    ],
    ids=["architecture", "no-head", "nan-head"],
)
def test_bad_experts_are_named(family, change, message):
    base, experts = family
    with pytest.raises((ValueError, TypeError), match=message):
        merge_bert(base, change(base, experts))


def poisoned_head(expert):
    broken = copy.deepcopy(expert)
    with torch.no_grad():
        broken.classifier.weight[0, 0] = float("nan")
    return broken


def test_classnames_that_disagree_with_an_expert_and_unknown_tasks_are_named(family, batch):
    base, experts = family
    with pytest.raises(ValueError, match=r"Task 'topic': `classnames` lists 2 classes, its expert's id2label 3"):
        merge_bert(base, experts, {"topic": ["sports", "science"]})
    model = merge_bert(base, experts)
    with pytest.raises(ValueError, match=r"Unknown task 'news': this model has tasks"):
        model(**batch, task="news")
