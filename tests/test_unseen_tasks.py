"""Tasks without an expert (the papers' unseen tasks): a recipe task with class names but no `model` gets its
zero-shot head from the base's text tower and no expert or routing slot; it is served, evaluated and adapted on like
any task, and can be added to an existing artifact without merging again (`wemoe.add_task`, `wemoe-convert
--add-task`)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import write_image_dataset
from PIL import Image
from test_artifact_format import TOLERANCE as RECORDED_LOGITS_TOLERANCE
from test_tta import write_yaml
from transformers import AutoImageProcessor, AutoModel, CLIPModel, T5Config, pipeline

import wemoe
from modeling_wemoe import WEMoEConfig
from modeling_wemoe.modeling_wemoe import TASK_RECORD
from wemoe.backbones.clip import zero_shot_head
from wemoe.cli.convert import main as convert_main
from wemoe.cli.evaluate import main as evaluate_main
from wemoe.convert import plan_conversion
from wemoe.recipe import RecipeError, load_recipe
from wemoe.streams import entropy_loss
from wemoe.toy import build_toy_base, toy_tokenizer

PETS = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of my {}."]
FIXTURES = Path(__file__).parent / "fixtures" / "format_v1"  # artifacts saved by wemoe 0.1.0


def recipe_of(saved_checkpoints, classnames, *, pets_at: int | None = None, **fields) -> dict:
    """The conftest's three experts, and `pets` (no model) inserted at `pets_at` if given."""
    tasks = [{"name": t, "model": saved_checkpoints[t], "classnames": n} for t, n in classnames.items()]
    if pets_at is not None:
        tasks.insert(pets_at, {"name": "pets", "classnames": PETS})
    return {"base_model": saved_checkpoints["base"], "tasks": tasks, **fields}


@pytest.fixture(scope="module")
def merged(saved_checkpoints, classnames, tmp_path_factory):
    """The three experts merged, no task without an expert."""
    return wemoe.convert(recipe_of(saved_checkpoints, classnames), tmp_path_factory.mktemp("merged") / "artifact")


@pytest.fixture(scope="module")
def with_pets(saved_checkpoints, classnames, tmp_path_factory):
    """The same merge with `pets`, which has no model, between the experts' tasks."""
    recipe = recipe_of(saved_checkpoints, classnames, pets_at=1)
    return wemoe.convert(recipe, tmp_path_factory.mktemp("with-pets") / "artifact")


@pytest.fixture(scope="module")
def data(task_data, tmp_path_factory) -> dict:
    """The conftest's labeled data for the experts' tasks, plus `pets`."""
    path = tmp_path_factory.mktemp("pets") / "pets.parquet"
    write_image_dataset(path, PETS, size=20, seed=7)
    pets = {"path": "parquet", "data_files": str(path), "split": "train"}
    return {"tasks": {**task_data["tasks"], "pets": pets}}


def load(artifact):
    return AutoModel.from_pretrained(artifact, trust_remote_code=True).eval()


def test_a_task_without_model_has_a_head_and_no_expert(merged, with_pets, base, pixel_values):
    plain, model = load(merged), load(with_pets)
    assert type(model).__module__.startswith("transformers_modules.")  # the artifact's own code
    assert model.config.tasks == ["shapes", "pets", "colors", "scenes"]
    assert model.config.tasks_with_experts == model.config.expert_tasks == ["shapes", "colors", "scenes"]
    assert model.config.tasks_without_experts == ["pets"] and model.config.num_experts == 3
    assert plain.config.expert_tasks is None and plain.config.tasks_with_experts == plain.config.tasks

    # No expert for it: the same task vectors and routers as without it; only its head's rows are added.
    report, plain_report = model.parameter_report(), plain.parameter_report()
    assert report["task_vector_entries"] == plain_report["task_vector_entries"]
    assert report["trainable_parameters"] == plain_report["trainable_parameters"]
    assert report["total_parameters"] - plain_report["total_parameters"] == len(PETS) * model.config.projection_dim
    task_vectors = {key: value for key, value in model.state_dict().items() if "task_vectors" in key}
    plain_task_vectors = {key: value for key, value in plain.state_dict().items() if "task_vectors" in key}
    assert task_vectors and task_vectors.keys() == plain_task_vectors.keys()
    for key, value in task_vectors.items():
        assert value.shape[0] == 3  # (num_experts, *shape)
        torch.testing.assert_close(value, plain_task_vectors[key], atol=0, rtol=0)
    routing = model(pixel_values, output_routing_weights=True).routing_weights
    assert all(layer.shape == (len(pixel_values), 3) for layer in routing)

    # Its head is the base text tower's zero-shot head; the other tasks score as without it.
    with torch.no_grad():
        output = model(pixel_values, task="pets")
        head = zero_shot_head(base, toy_tokenizer(), PETS)
        torch.testing.assert_close(output.logits, model.logit_scale.exp() * output.image_embeds @ head.t())
        for task in ("shapes", "colors", "scenes"):
            torch.testing.assert_close(model(pixel_values, task=task).logits, plain(pixel_values, task=task).logits)


@pytest.mark.parametrize("upscale", [["mlp"], ["mlp", "attention"]])
def test_routed_to_zero_it_sees_the_pre_trained_base_when_the_rest_is_not_merged(
    saved_checkpoints, classnames, base, pixel_values, upscale, tmp_path
):
    """Task routing pulls such a task's inputs to all-zero routing weights, the base its zero-shot head was built
    for; with `static_merge.scaling: 0` the weights that are not upscaled stay pre-trained, so there the model is
    exactly the base (the benchmark's "other weights pre-trained" row); with 0.3 the merged embeddings and norms
    (and, MLP-only, attention) still move it."""
    from diagnostics import route_to

    with torch.no_grad():
        expected = F.normalize(base.visual_projection(base.vision_model(pixel_values).pooler_output), dim=-1)
        head = zero_shot_head(base, toy_tokenizer(), PETS)
        for scaling, equal in ((0.0, True), (0.3, False)):
            recipe = recipe_of(saved_checkpoints, classnames, pets_at=1, upscale=upscale,
                               static_merge={"method": "task_arithmetic", "scaling": scaling})  # fmt: skip
            model = load(wemoe.convert(recipe, tmp_path / f"scaling-{scaling}"))
            route_to(model, None)
            output = model(pixel_values, task="pets")
            assert torch.allclose(output.image_embeds, expected, atol=1e-6) is equal, scaling
            if equal:
                torch.testing.assert_close(output.logits, model.logit_scale.exp() * expected @ head.t())


def test_the_pipeline_classifies_it_with_its_own_classes(with_pets):
    classify = pipeline("image-classification", model=str(with_pets), trust_remote_code=True)
    image = Image.new("RGB", (40, 48), "red")
    predictions = classify(image, task="pets")
    assert sorted(p["label"] for p in predictions) == sorted(PETS)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    pixel_values = classify.image_processor(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        best = PETS[int(classify.model(pixel_values, task="pets").logits.argmax())]
    assert predictions[0]["label"] == best
    assert [p["task"] for p in classify(image)] == ["shapes", "pets", "colors", "scenes"]


def test_wemoe_eval_scores_it_like_any_task(with_pets, data, tmp_path):
    output = tmp_path / "results.json"
    evaluate_main([str(with_pets), write_yaml(data, tmp_path / "data.yaml"), "--output", str(output)])
    results = json.loads(output.read_text())
    assert set(results) == {"shapes", "pets", "colors", "scenes", "average"}
    assert results["pets"]["metric"] == "accuracy" and results["pets"]["num_samples"] == 20

    from datasets import load_dataset

    rows = load_dataset("parquet", data_files=data["tasks"]["pets"]["data_files"], split="train")
    image_processor = AutoImageProcessor.from_pretrained(with_pets)
    pixel_values = image_processor(images=list(rows["image"]), return_tensors="pt").pixel_values
    with torch.no_grad():
        predicted = load(with_pets)(pixel_values, task="pets").logits.argmax(-1)
    expected = (predicted == torch.tensor(rows["label"])).float().mean().item()
    assert results["pets"]["score"] == pytest.approx(expected)


def test_tta_adapts_with_or_without_its_data(with_pets, data, tmp_path):
    """The paper adapts on the merged tasks only; a user may add the new task's unlabeled data, whose entropy is that
    of its own head's distribution. The routing weights stay over the experts either way."""
    merged_only = {"tasks": {t: s for t, s in data["tasks"].items() if t != "pets"}}
    pets_only = {"tasks": {"pets": data["tasks"]["pets"]}}
    options = {"steps": 1, "lr": 1e-2, "batch_size": 4, "checkpointing_steps": None, "objective": "label-words"}
    routers = {}
    for name, config in (("merged-only", merged_only), ("pets-only", pets_only)):
        output = wemoe.adapt_artifact(with_pets, config, tmp_path / name, **options)
        model = load(output)
        routers[name] = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        assert model.config.expert_tasks == ["shapes", "colors", "scenes"]
        assert "| pets | cat, dog, bird | none (a task without an expert) |" in (output / "README.md").read_text()

    # With the new task's data alone, the step's entropy is its head's, on the unadapted model.
    record = yaml.safe_load((tmp_path / "pets-only" / "merge_config.yaml").read_text())["adaptation"]
    assert list(record["data"]) == ["pets"]
    from wemoe.adaptation import load_task_streams

    model = load(with_pets)
    stream = load_task_streams(pets_only, model, AutoImageProcessor.from_pretrained(with_pets), 4, 1)["pets"]
    with torch.no_grad():
        logits = stream.logits(model, stream.batch(0, 0, 0, 0, 1))
    assert logits.shape == (4, len(PETS))
    assert record["final_entropy"] == pytest.approx(entropy_loss(logits).item(), rel=1e-5)

    unadapted = {k: p for k, p in model.named_parameters() if p.requires_grad}
    for adapted in routers.values():
        assert any(not torch.equal(adapted[k], unadapted[k]) for k in unadapted)
        assert all(p.shape[-1] == 3 for k, p in adapted.items() if k.endswith("fc2.bias"))
    assert any(not torch.equal(routers["merged-only"][k], routers["pets-only"][k]) for k in unadapted)


def test_the_model_card_and_the_dry_run_list_it_without_an_expert(with_pets, saved_checkpoints, classnames):
    card = (with_pets / "README.md").read_text()
    assert "3 fine-tuned CLIP vision towers merged into one model" in card
    assert "| pets | cat, dog, bird | none (a task without an expert) |" in card
    assert "Tasks without an expert have no task vector and no routing slot" in card
    recipe = yaml.safe_load((with_pets / "merge_config.yaml").read_text())
    assert recipe["tasks"][1] == {"name": "pets", "classnames": PETS}

    plan = str(plan_conversion(recipe_of(saved_checkpoints, classnames, pets_at=1)))
    assert "pets: (no model)" in plan and "no expert: only a zero-shot head" in plan


def test_a_static_baseline_merges_only_the_experts(saved_checkpoints, classnames, tmp_path):
    static = {"variant": "static"}
    without = wemoe.convert(recipe_of(saved_checkpoints, classnames, **static), tmp_path / "without")
    with_task = wemoe.convert(recipe_of(saved_checkpoints, classnames, pets_at=0, **static), tmp_path / "with")
    assert (without / "model.safetensors").read_bytes() == (with_task / "model.safetensors").read_bytes()


def test_add_task_equals_the_head_conversion_builds_and_leaves_the_rest(merged, with_pets, pixel_values, tmp_path):
    (merged / "results.json").write_text("{}")  # a user's file: kept
    try:
        added = wemoe.add_task(merged, "pets", PETS, output=tmp_path / "added")
    finally:
        (merged / "results.json").unlink()
    before, after, converted = load(merged), load(added), load(with_pets)
    assert after.config.tasks == ["shapes", "colors", "scenes", "pets"]
    assert after.config.expert_tasks == ["shapes", "colors", "scenes"]

    # The new head is the one conversion builds; every other tensor is the artifact's.
    rows = slice(*after.config.task_label_offsets["pets"])
    converted_rows = slice(*converted.config.task_label_offsets["pets"])
    torch.testing.assert_close(
        after.classifier.weight[rows], converted.classifier.weight[converted_rows], atol=0, rtol=0
    )
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    for key in old:
        if key == "classifier.weight":
            torch.testing.assert_close(new[key][: len(old[key])], old[key], atol=0, rtol=0)
        elif key != TASK_RECORD:
            torch.testing.assert_close(new[key], old[key], atol=0, rtol=0)
    with torch.no_grad():
        for task in ("shapes", "colors", "scenes"):
            torch.testing.assert_close(after(pixel_values, task=task).logits, before(pixel_values, task=task).logits)
        torch.testing.assert_close(after(pixel_values, task="pets").logits, converted(pixel_values, task="pets").logits)

    # Recipe, card and the user's files follow.
    recipe = yaml.safe_load((added / "merge_config.yaml").read_text())
    assert recipe["tasks"][-1] == {"name": "pets", "classnames": PETS}
    assert "| pets | cat, dog, bird | none (a task without an expert) |" in (added / "README.md").read_text()
    assert (added / "results.json").read_text() == "{}"


def test_convert_cli_adds_a_task_with_its_templates(merged, base, pixel_values, tmp_path, capsys):
    output = tmp_path / "added"
    convert_main([str(merged), str(output), "--add-task", "pets", "--classnames", *PETS, "--templates", *TEMPLATES])
    assert f"Wrote {output}" in capsys.readouterr().out
    model = load(output)
    head = zero_shot_head(base, toy_tokenizer(), PETS, TEMPLATES)
    torch.testing.assert_close(model.classifier.weight[slice(*model.config.task_label_offsets["pets"])], head)
    recipe = yaml.safe_load((output / "merge_config.yaml").read_text())
    assert recipe["tasks"][-1] == {"name": "pets", "classnames": PETS, "templates": TEMPLATES}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda recipe: recipe["tasks"].insert(1, {"name": "pets"}),
            r"tasks\.1 \(pets\): a task without an expert \(no `model`\) is classified by a zero-shot head built from "
            r"its class names: give `classnames`",
        ),
        (
            lambda recipe: recipe["tasks"].append({"name": "pets", "classnames": []}),
            r"tasks\.3\.classnames: List should have at least 1 item",
        ),
        (
            # Routing options count experts: the task without an expert has no routing slot.
            lambda recipe: (
                recipe["tasks"].append({"name": "pets", "classnames": PETS}),
                recipe.update(router={"top_k": 4}),
            ),
            r"router\.top_k \(4\) is larger than the number of experts \(3\).*1 task\(s\) without `model`",
        ),
        (
            lambda recipe: [task.pop("model") for task in recipe["tasks"]],
            "no task names a `model`",
        ),
        (
            lambda recipe: (recipe.update(architecture="t5"), recipe["tasks"].append({"name": "pets"})),
            r"tasks\.3 \(pets\): no expert \(`model`\): a T5 task needs its fine-tuned model; only CLIP serves",
        ),
        (
            lambda recipe: (recipe.update(architecture="bert"), recipe["tasks"].append({"name": "pets"})),
            r"tasks\.3 \(pets\): no expert \(`model`\): a BERT task needs its fine-tuned model",
        ),
    ],
    ids=["no-classnames", "empty-classnames", "top-k-over-experts", "no-expert-at-all", "t5", "bert"],
)
def test_bad_recipes_name_the_field(saved_checkpoints, classnames, change, message):
    recipe = recipe_of(saved_checkpoints, classnames)
    change(recipe)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_the_python_api_names_tasks_without_an_expert_explicitly(base, experts, classnames, tokenizer):
    from toy_t5 import build_toy_t5_base, build_toy_t5_expert

    model = wemoe.merge_clip(
        base, experts, {**classnames, "pets": PETS}, tokenizer=tokenizer, tasks=["pets", *classnames]
    )
    assert model.config.tasks == ["pets", *classnames] and model.config.expert_tasks == list(classnames)
    unlisted = r"`classnames` names tasks that are not the model's: \['pets'\].*must be listed in `tasks`"
    with pytest.raises(ValueError, match=unlisted):
        wemoe.merge_clip(base, experts, {**classnames, "pets": PETS}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Task 'pets': a task without an expert \(no `model`\) is classified"):
        wemoe.merge_clip(base, experts, classnames, tokenizer=tokenizer, tasks=[*classnames, "pets"])
    with pytest.raises(ValueError, match=r"`tasks` must list every expert's task; it misses \['scenes'\]"):
        wemoe.merge_clip(base, experts, classnames, tokenizer=tokenizer, tasks=["shapes", "colors"])
    t5 = build_toy_t5_base()
    with pytest.raises(ValueError, match=r"Task 'pets': no expert \(`model`\): a T5 task needs its fine-tuned model"):
        wemoe.merge_t5(t5, {"sst2": build_toy_t5_expert(t5, seed=1)}, tasks=["sst2", "pets"])


@pytest.fixture
def t5_artifact(tmp_path):
    """A T5 artifact's config and code (add_task refuses it before reading any weight)."""
    config = WEMoEConfig(text_config=T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8), tasks=["sst2"])
    config.save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


def test_add_task_errors(merged, saved_checkpoints, t5_artifact, tmp_path):
    output = tmp_path / "out"
    cases = [
        ((merged, "shapes", PETS), {}, r"Task 'shapes' is already one of the artifact's tasks \['shapes', 'colors'"),
        ((merged, "pets", None), {}, r"Task 'pets': `classnames` is required"),
        ((merged, "pets", []), {}, r"new task:\n  classnames: List should have at least 1 item"),
        ((merged, "pets", PETS), {"templates": ["my {pet}"]}, r"templates: Value error, template 'my \{pet\}' has no"),
        ((t5_artifact, "pets", PETS), {}, r"is a T5 artifact: only CLIP artifacts take a task without an expert"),
        ((tmp_path / "nowhere", "pets", PETS), {}, r"is not a local artifact directory"),
    ]
    for args, options, message in cases:
        with pytest.raises(ValueError, match=message):
            wemoe.add_task(*args, output=output, **options)
    assert not output.exists()


def test_add_task_needs_the_artifacts_base(merged, tmp_path):
    other = build_toy_base(seed=5)
    other.save_pretrained(tmp_path / "other-base")
    toy_tokenizer().save_pretrained(tmp_path / "other-base")
    with pytest.raises(ValueError, match=r"is not the one this artifact was merged from: its visual projection"):
        wemoe.add_task(merged, "pets", PETS, output=tmp_path / "out", base=tmp_path / "other-base")
    assert not (tmp_path / "out").exists()

    bare = tmp_path / "bare"  # an artifact saved without its recipe (save_artifact)
    bare.mkdir()
    for file in merged.iterdir():
        if file.name != "merge_config.yaml":
            (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(ValueError, match=r"has no merge_config.yaml naming its base model: give the base model"):
        wemoe.add_task(bare, "pets", PETS, output=tmp_path / "out")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["A", "--add-task", "pets", "--classnames", "cat", "dog", "B"], "--add-task needs ARTIFACT and OUTPUT_DIR"),
        (["A", "B", "--add-task", "pets"], "--add-task pets needs --classnames"),
        (["A", "B", "--add-task", "pets", "--classnames", "cat", "--dry-run"], "--dry-run does not apply"),
        (["A", "B", "--add-task", "pets", "--classnames", "cat", "--dtype", "bfloat16"], "--dtype does not apply"),
        (["A", "B", "--classnames", "cat"], "--classnames only applies with --add-task"),
    ],
    ids=["positionals-last", "no-classnames", "dry-run", "dtype", "classnames-alone"],
)
def test_add_task_command_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        convert_main(argv)
    assert message in capsys.readouterr().err


def test_unknown_tasks_are_named_with_the_task_without_an_expert(with_pets, data, tmp_path, capsys):
    known = r"\['shapes', 'pets', 'colors', 'scenes'\]"
    with pytest.raises(ValueError, match=rf"Unknown task 'cars': this model has tasks {known}"):
        load(with_pets)(torch.zeros(1, 3, 32, 32), task="cars")
    bad = {"tasks": {"cars": data["tasks"]["pets"]}}
    with pytest.raises(SystemExit):
        evaluate_main([str(with_pets), write_yaml(bad, tmp_path / "bad.yaml")])
    assert "names task(s) ['cars'] that the model does not have" in capsys.readouterr().err


def test_add_task_to_an_artifact_saved_by_0_1_0(tmp_path):
    """An artifact saved before tasks without an expert existed (and without a recipe) takes one; its own tasks give
    the logits recorded when it was saved."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig

    fixture = tmp_path / "clip-wemoe"
    shutil.copytree(FIXTURES / "clip-wemoe", fixture)
    shared = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        vision_config={**shared, "image_size": 8, "patch_size": 4, "hidden_act": "quick_gelu"},
        text_config={**shared, "vocab_size": len(toy_tokenizer()), "max_position_embeddings": 64, "eos_token_id": 1},
        projection_dim=8,
    )
    base = CLIPModel(config)  # a stand-in for the fixture's base: its visual projection is what add_task checks
    with torch.no_grad():
        base.visual_projection.weight.copy_(load_file(fixture / "model.safetensors")["visual_projection.weight"])
    base.save_pretrained(tmp_path / "base")
    toy_tokenizer().save_pretrained(tmp_path / "base")

    added = wemoe.add_task(fixture, "pets", PETS, output=tmp_path / "added", base=tmp_path / "base")
    model = load(added)
    assert model.config.tasks == ["shapes", "colors", "pets"] and model.config.expert_tasks == ["shapes", "colors"]
    expected = json.loads((fixture / "expected.json").read_text())
    with torch.no_grad():
        logits = model(torch.tensor(expected["pixel_values"])).logits
    torch.testing.assert_close(logits[:, :5], torch.tensor(expected["logits"]), **RECORDED_LOGITS_TOLERANCE)
    assert (added / "expected.json").is_file()  # the artifact's other files are kept


def test_routing_diagnostics_index_routing_by_expert_not_by_task(with_pets, data, tmp_path):
    """`pets` sits between the experts' tasks: the benchmarks' oracle copies and routing accuracy must count routing
    weight `i` as the `i`-th expert's, and give a task without an expert no oracle and no routing accuracy."""
    import diagnostics

    experts = [task for task in data["tasks"] if task != "pets"]
    copies = diagnostics.oracle_artifacts(Path(with_pets), tmp_path / "oracle")
    assert list(copies) == experts
    analysis = diagnostics.routing_analysis(copies[experts[1]], data, samples=8)
    assert analysis["pets"]["routing_accuracy"] is None
    assert all(accuracy == 1.0 for accuracy in analysis[experts[1]]["routing_accuracy"])
    assert all(accuracy == 0.0 for accuracy in analysis[experts[0]]["routing_accuracy"])
