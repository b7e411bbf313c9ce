"""`wemoe-tta` and `wemoe-eval` on a T5 artifact: entropy of the first decoded token (over label words when the model
has them), exact match and Spearman scores."""

import shutil

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_t5 import build_family
from test_tta import mean_entropy
from toy_t5 import build_toy_t5_base, toy_t5_tokenizer
from transformers import AutoModel, AutoTokenizer, T5ForConditionalGeneration

from modeling_wemoe import WEMoEForImageClassification
from wemoe import merge_t5, save_artifact
from wemoe.adaptation import load_task_streams
from wemoe.backbones.t5 import TextTaskStream, spearman
from wemoe.cli.tta import main
from wemoe.data import load_data_config
from wemoe.evaluation import evaluate, update_model_card

SENTENCES = [
    "a good movie", "a bad film", "i loved it", "boring and dull", "really fun", "awful song",
    "a brilliant book", "terrible game", "nice team", "i hate this",
]  # fmt: skip
TOPICS = ["the ball", "an atom", "the soup", "a guitar", "the vote", "the code", "a goal", "the cell"]


@pytest.fixture(scope="module")
def t5_artifact(tmp_path_factory):
    base, experts = build_family(gated=True, tied=False)
    model = merge_t5(base, experts, classnames={"sst2": ["negative", "positive"]})
    # Named apart from the CLIP artifacts: transformers keys dynamic modules by directory name within a process.
    return save_artifact(model, tmp_path_factory.mktemp("t5") / "t5_artifact", toy_t5_tokenizer())


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_data")
    sentiment = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    Dataset.from_dict({"sentence": SENTENCES, "label": [1, 0] * 5}, features=sentiment).to_parquet(
        root / "sst2.parquet"
    )
    Dataset.from_dict({"text": TOPICS, "label": ["sports"] * 8}).to_parquet(root / "topic.parquet")
    Dataset.from_dict({"text": TOPICS, "score": [float(i) for i in range(8)]}).to_parquet(root / "nli.parquet")
    return {
        "tasks": {
            "sst2": {
                "path": "parquet",
                "data_files": str(root / "sst2.parquet"),
                "split": "train",
                "text_column": "sentence",
                "prefix": "sst2 sentence: ",
            },
            "topic": {"path": "parquet", "data_files": str(root / "topic.parquet"), "split": "train"},
            "nli": {
                "path": "parquet",
                "data_files": str(root / "nli.parquet"),
                "split": "train",
                "prefix": "nli premise: ",
                "label_column": "score",
            },
        }
    }


def test_streams_restrict_the_first_token_to_label_words(t5_artifact, text_data):
    model = AutoModel.from_pretrained(t5_artifact, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(t5_artifact)
    streams = load_task_streams(text_data, model, tokenizer, 4, 1)
    assert all(isinstance(stream, TextTaskStream) for stream in streams.values())
    sst2 = streams["sst2"].batch(0, 0, 0, 0, 1)
    assert tokenizer.decode(sst2["input_ids"][0]).startswith("sst2 sentence :")
    with torch.no_grad():
        restricted = streams["sst2"].logits(model, sst2)
        full = streams["topic"].logits(model, streams["topic"].batch(0, 1, 0, 0, 1))
        first_step = model(**sst2, decoder_input_ids=torch.zeros(4, 1, dtype=torch.long)).logits[:, 0]
    label_ids = [tokenizer.convert_tokens_to_ids(word) for word in ("negative", "positive")]
    assert torch.equal(restricted, first_step[:, label_ids])
    assert full.shape == (4, len(tokenizer))


def test_label_words_must_differ_in_their_first_token(t5_artifact, text_data):
    model = AutoModel.from_pretrained(t5_artifact, trust_remote_code=True)
    model.config.task_labels = {"sst2": ["not good", "not bad"]}
    with pytest.raises(ValueError, match=r"Task 'sst2': label words .* do not differ in their first token"):
        load_task_streams(text_data, model, AutoTokenizer.from_pretrained(t5_artifact), 4, 1)


def test_tta_trains_only_the_routers_and_lowers_the_entropy(t5_artifact, text_data, tmp_path):
    import yaml

    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(text_data))
    output = tmp_path / "t5_adapted"
    main([str(t5_artifact), str(data_yaml), "--output", str(output), "--batch-size", "4", "--lr", "1e-2",
          "--steps", "8", "--objective", "label-words"])  # fmt: skip
    before, after = load_file(t5_artifact / "model.safetensors"), load_file(output / "model.safetensors")
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(".router." in key for key in changed)
    assert (output / "tokenizer.json").is_file()
    assert mean_entropy(output, text_data) < mean_entropy(t5_artifact, text_data)


def test_evaluation_scores_exact_match_and_spearman(t5_artifact, text_data, tmp_path):
    model = AutoModel.from_pretrained(t5_artifact, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(t5_artifact)
    inputs = tokenizer(TOPICS, return_tensors="pt", padding=True)
    answers = tokenizer.batch_decode(model.generate(**inputs, max_new_tokens=4), skip_special_tokens=True)
    labels = [answer.strip() for answer in answers[:6]] + ["never said", "never said"]
    Dataset.from_dict({"text": TOPICS, "label": labels}).to_parquet(tmp_path / "topic.parquet")
    data = {
        "tasks": {
            **text_data["tasks"],
            "topic": {"path": "parquet", "data_files": str(tmp_path / "topic.parquet"), "split": "train"},
        }
    }

    results = evaluate(t5_artifact, data, batch_size=3, max_new_tokens=4)

    assert results["topic"] == pytest.approx(6 / 8)
    assert results.metrics == {"sst2": "exact_match", "topic": "exact_match", "nli": "spearmanr"}
    assert results.num_samples["topic"] == 8
    assert 0 <= results["sst2"] <= 1 and -1 <= results["nli"] <= 1
    update_model_card(t5_artifact, results, load_data_config(data), None)
    card = ModelCard.load(t5_artifact / "README.md")
    metrics = {r.dataset_name: (r.task_type, r.metric_type) for r in card.data.eval_results}
    assert metrics["nli"] == ("text2text-generation", "spearmanr")


def test_spearman_reads_answers_as_numbers():
    assert spearman(["1", "2", "x", "4.5"], [1.0, 2.0, 0.5, 4.0]) == pytest.approx(1.0)
    assert spearman(["3", "3", "3"], [1.0, 2.0, 3.0]) == 0.0
    # Ties share their mean rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3) correlate at 0.9487 (scipy's value).
    assert spearman(["1", "1", "2", "5"], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(0.948683, abs=1e-6)
    assert spearman(["4", "3", "2", "1"], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(-1.0)


def test_a_lora_adapter_is_evaluated_over_its_base(text_data, tmp_path):
    from peft import LoraConfig, get_peft_model

    # Equal depths: plain transformers T5 cannot generate with a decoder deeper than its encoder (see test_t5.py).
    base = build_toy_t5_base(gated=True, tied=False, num_decoder_layers=2)
    base.save_pretrained(tmp_path / "base")
    base = T5ForConditionalGeneration.from_pretrained(tmp_path / "base")  # the adapter records where its base is
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules=["q", "wi_0", "wo"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    toy_t5_tokenizer().save_pretrained(tmp_path / "adapter")
    merged = adapter.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    toy_t5_tokenizer().save_pretrained(tmp_path / "merged")
    data = {"tasks": {"topic": text_data["tasks"]["topic"]}}
    tokenizer = toy_t5_tokenizer()
    answers = tokenizer.batch_decode(
        merged.generate(**tokenizer(TOPICS, return_tensors="pt", padding=True), max_new_tokens=4),
        skip_special_tokens=True,
    )
    labels = [answer.strip() for answer in answers[:5]] + ["never said"] * 3
    Dataset.from_dict({"text": TOPICS, "label": labels}).to_parquet(tmp_path / "topic.parquet")
    data["tasks"]["topic"] = {**data["tasks"]["topic"], "data_files": str(tmp_path / "topic.parquet")}

    assert evaluate(tmp_path / "adapter", data, max_new_tokens=4)["topic"] == pytest.approx(5 / 8)


def test_auto_model_builds_each_artifact_as_its_own_model_in_one_process(artifact, t5_artifact, tmp_path):
    # transformers maps one config class to one model class per process; a CLIP load must not decide a T5 load,
    # even from directories of the same name (which share a dynamic module name).
    same_name = [
        shutil.copytree(source, tmp_path / str(kind) / "wemoe") for kind, source in enumerate((artifact, t5_artifact))
    ]
    clip, t5 = "WEMoEForImageClassification", "WEMoEForConditionalGeneration"
    loads = ((artifact, clip), (t5_artifact, t5), (artifact, clip), (same_name[0], clip), (same_name[1], t5))
    for directory, expected in loads:
        assert type(AutoModel.from_pretrained(directory, trust_remote_code=True)).__name__ == expected
    t5_config = AutoModel.from_pretrained(t5_artifact, trust_remote_code=True).config
    with pytest.raises(ValueError, match="for a 't5' backbone, not WEMoEForImageClassification"):
        WEMoEForImageClassification(t5_config)


def test_the_rest_bin_holds_the_probability_outside_the_label_words():
    from wemoe.streams import entropy_loss, label_words_and_rest

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    logits[:, 7] += 6.0  # most of the mass on a token that is not a label word
    label_ids = [4, 9, 21]
    binned = label_words_and_rest(logits, label_ids)
    full = logits.softmax(-1)
    probabilities = binned.softmax(-1)
    assert binned.shape == (3, 4)
    torch.testing.assert_close(probabilities[:, :3], full[:, label_ids])
    torch.testing.assert_close(probabilities[:, 3], 1 - full[:, label_ids].sum(-1))
    # Confident off-label answers: near-zero entropy with the rest bin, yet the label words alone look uncertain.
    assert float(entropy_loss(binned)) < 0.3 < float(entropy_loss(logits[:, label_ids]))


def test_the_rest_objective_adds_one_bin_to_the_label_words(t5_artifact, text_data):
    from wemoe.streams import label_words_and_rest

    model = AutoModel.from_pretrained(t5_artifact, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(t5_artifact)
    sst2_only = {"tasks": {"sst2": text_data["tasks"]["sst2"]}}
    stream = load_task_streams(sst2_only, model, tokenizer, 4, 1, objective="label-words-and-rest")["sst2"]
    inputs = stream.batch(0, 0, 0, 0, 1)
    with torch.no_grad():
        binned = stream.logits(model, inputs)
        first_step = model(**inputs, decoder_input_ids=torch.zeros(4, 1, dtype=torch.long)).logits[:, 0]
    label_ids = [tokenizer.convert_tokens_to_ids(word) for word in ("negative", "positive")]
    torch.testing.assert_close(binned, label_words_and_rest(first_step, label_ids))
    with pytest.raises(ValueError, match="Task 'topic': the adaptation objective 'label-words-and-rest' needs"):
        load_task_streams(text_data, model, tokenizer, 4, 1, objective="label-words-and-rest")
    with pytest.raises(ValueError, match="--objective must be one of"):
        load_task_streams(sst2_only, model, tokenizer, 4, 1, objective="rest")


def test_tta_with_the_rest_objective_minimises_it_and_records_it(t5_artifact, text_data, tmp_path):
    import yaml

    sst2_only = {"tasks": {"sst2": text_data["tasks"]["sst2"]}}
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(sst2_only))
    outputs = {}
    for objective in ("label-words", "label-words-and-rest"):
        outputs[objective] = tmp_path / objective
        main([str(t5_artifact), str(data_yaml), "--output", str(outputs[objective]), "--batch-size", "4", "--lr",
              "1e-2", "--steps", "4", "--objective", objective])  # fmt: skip
        record = yaml.safe_load((outputs[objective] / "merge_config.yaml").read_text())["adaptation"]
        assert record["objective"] == objective
    default, rest = (load_file(outputs[o] / "model.safetensors") for o in outputs)
    assert any(not torch.equal(default[key], rest[key]) for key in default if ".router." in key)


def test_task_routing_adapts_tasks_without_label_words(t5_artifact, text_data, tmp_path):
    """Task routing's loss reads the routing weights only: a task the recipe gives no label words (STS-B in the Flan-T5
    GLUE recipe) adapts with the others under the default objective."""
    import yaml

    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text(yaml.safe_dump(text_data))
    output = tmp_path / "routed"
    main([str(t5_artifact), str(data_yaml), "--output", str(output), "--batch-size", "4", "--steps", "2"])
    record = yaml.safe_load((output / "merge_config.yaml").read_text())["adaptation"]
    assert record["objective"] == "task-routing" and set(record["data"]) == {"sst2", "topic", "nli"}
