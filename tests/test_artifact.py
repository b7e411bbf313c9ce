"""Saved artifacts load through trust_remote_code alone, in a process that cannot import this repository."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import randomize_routers

from conversion import default_image_processor, merge_clip, save_artifact
from conversion.toy import build_toy_expert

FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys

    class BlockRepositoryPackages:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"modeling_wemoe", "conversion"}:
                raise ImportError(f"{name} must not be importable here")

    sys.meta_path.insert(0, BlockRepositoryPackages())

    import torch
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageClassification, pipeline

    artifact, pixels_path, out_path = sys.argv[1:4]
    pixel_values = torch.load(pixels_path)
    results = {}
    for auto_class in (AutoModel, AutoModelForImageClassification):
        model, info = auto_class.from_pretrained(artifact, trust_remote_code=True, output_loading_info=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(pixel_values).logits
        results[auto_class.__name__] = {
            "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]),
            "logits": logits.tolist(),
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        }
    classifier = pipeline("image-classification", model=artifact, trust_remote_code=True)
    results["pipeline"] = classifier(Image.new("RGB", (48, 40), "red"), top_k=2)
    json.dump(results, open(out_path, "w"))
    """
)


def run_in_fresh_process(artifact, pixel_values, tmp_path) -> dict:
    script, pixels, out = tmp_path / "load.py", tmp_path / "pixels.pt", tmp_path / "out.json"
    script.write_text(FRESH_PROCESS_SCRIPT)
    torch.save(pixel_values, pixels)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, str(script), str(artifact), str(pixels), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("variant", ["wemoe", "e-wemoe"])
def test_round_trip_in_a_process_without_this_repository(
    base, experts, classnames, tokenizer, pixel_values, tmp_path, variant
):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant=variant)
    randomize_routers(model)
    artifact = save_artifact(model, tmp_path / "artifact", default_image_processor(base.config.vision_config))
    config = json.loads((artifact / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert {"modeling_wemoe.py", "configuration_wemoe.py", "preprocessor_config.json"} <= {
        p.name for p in artifact.iterdir()
    }

    results = run_in_fresh_process(artifact, pixel_values, tmp_path)

    with torch.no_grad():
        expected = model(pixel_values).logits
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for auto_class in ("AutoModel", "AutoModelForImageClassification"):
        loaded = results[auto_class]
        assert loaded["missing"] == [] and loaded["unexpected"] == []
        assert loaded["trainable"] == trainable
        torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-6, rtol=0)
    labels = [prediction["label"] for prediction in results["pipeline"]]
    assert len(labels) == 2 and all(label in model.config.label2id for label in labels)


def test_e_wemoe_artifact_is_at_most_035x_the_dense_one(base, tokenizer, tmp_path):
    # The paper's setting: eight experts.
    experts = {f"task{i}": build_toy_expert(base, seed=100 + i) for i in range(8)}
    classnames = {task: ["circle", "square"] for task in experts}
    processor = default_image_processor(base.config.vision_config)
    sizes = {}
    for variant in ("wemoe", "e-wemoe"):
        model = merge_clip(base, experts, classnames, tokenizer=tokenizer, variant=variant, keep=0.1)
        artifact = save_artifact(model, tmp_path / variant, processor)
        sizes[variant] = (artifact / "model.safetensors").stat().st_size
    assert sizes["e-wemoe"] <= 0.35 * sizes["wemoe"], sizes


def test_failed_save_leaves_no_output_behind(base, experts, classnames, tokenizer, tmp_path):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)

    class BrokenProcessor:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_artifact(model, tmp_path / "artifact", BrokenProcessor())
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_overwrite_unless_asked(base, experts, classnames, tokenizer, tmp_path):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    processor = default_image_processor(base.config.vision_config)
    (tmp_path / "artifact").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_artifact(model, tmp_path / "artifact", processor)
    save_artifact(model, tmp_path / "artifact", processor, overwrite=True)
    assert (tmp_path / "artifact" / "model.safetensors").exists()
