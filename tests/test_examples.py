"""The ready recipes in `examples/`: each passes every check a dry run makes before it opens a checkpoint (offline)."""

from pathlib import Path

import pytest
import yaml

from wemoe.convert import checked_recipe

EXAMPLES = Path(__file__).parent.parent / "examples"
RECIPES = sorted(EXAMPLES.glob("*.yaml"))
EIGHT_TASKS = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]


def test_the_examples_are_there_and_documented():
    names = {recipe.name for recipe in RECIPES}
    assert names == {"clip-vit-b32-8task.yaml", "flan-t5-base-glue.yaml", "lora-experts.yaml", "static-ties.yaml"}
    listed = (EXAMPLES / "README.md").read_text()
    assert all(f"`{name}`" in listed for name in names)
    assert "examples/" in (EXAMPLES.parent / "README.md").read_text()


@pytest.mark.parametrize("path", RECIPES, ids=[recipe.stem for recipe in RECIPES])
def test_example_recipe_passes_the_checks_made_before_any_checkpoint_is_opened(path, tmp_path, monkeypatch):
    # Local experts (the LoRA example's adapters) are the user's: stand them in as empty directories.
    monkeypatch.chdir(tmp_path)
    for task in yaml.safe_load(path.read_text())["tasks"]:
        if task["model"].startswith("./"):
            (tmp_path / task["model"]).mkdir(parents=True)
    recipe, _ = checked_recipe(path, "float32", "5GB")
    assert len(recipe.tasks) >= 3


@pytest.mark.parametrize("name", ["clip-vit-b32-8task.yaml", "static-ties.yaml"])
def test_the_clip_examples_are_the_papers_eight_tasks(name):
    recipe, _ = checked_recipe(EXAMPLES / name, "float32", "5GB")
    assert recipe.base_model == "openai/clip-vit-base-patch32"
    assert [task.name for task in recipe.tasks] == EIGHT_TASKS
    assert all(task.model == f"tanganke/clip-vit-base-patch32_{task.name}" for task in recipe.tasks)
    assert all(task.dataset is not None for task in recipe.tasks)
