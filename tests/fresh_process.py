"""Loading an artifact in a fresh Python process that cannot import this repository's packages."""

import json
import os
import subprocess
import sys
import textwrap

import torch

BLOCK_REPOSITORY_PACKAGES = """
import json, sys

class BlockRepositoryPackages:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"modeling_wemoe", "wemoe"}:
            raise ImportError(f"{name} must not be importable here")

sys.meta_path.insert(0, BlockRepositoryPackages())
"""

FRESH_PROCESS_SCRIPT = BLOCK_REPOSITORY_PACKAGES + textwrap.dedent(
    """
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
    image = Image.new("RGB", (48, 40), "red")
    results["pipeline"] = classifier(image, task="shapes", top_k=2)
    results["pipeline_every_task"] = classifier(image)
    json.dump(results, open(out_path, "w"))
    """
)


T5_FRESH_PROCESS_SCRIPT = BLOCK_REPOSITORY_PACKAGES + textwrap.dedent(
    """
    import torch
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    artifact, inputs_path, out_path = sys.argv[1:4]
    inputs = torch.load(inputs_path)
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    encoded = tokenizer(inputs["prompts"], return_tensors="pt", padding=True)
    results = {}
    for auto_class in (AutoModel, AutoModelForSeq2SeqLM):
        model, info = auto_class.from_pretrained(artifact, trust_remote_code=True, output_loading_info=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(**encoded, decoder_input_ids=inputs["decoder_input_ids"]).logits
        results[auto_class.__name__] = {
            "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]),
            "logits": logits.tolist(),
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "generated": model.generate(**encoded, max_new_tokens=5, num_beams=2).tolist(),
        }
    generator = pipeline("text2text-generation", model=artifact, trust_remote_code=True)
    results["pipeline"] = generator(inputs["prompts"][0], max_new_tokens=5, num_beams=2)
    json.dump(results, open(out_path, "w"))
    """
)


def run_in_fresh_process(artifact, inputs, tmp_path, script_text: str = FRESH_PROCESS_SCRIPT) -> dict:
    """Run a loading script on `artifact` in a fresh interpreter; `inputs` are saved for it with torch.save."""
    script, pixels, out = tmp_path / "load.py", tmp_path / "inputs.pt", tmp_path / "out.json"
    script.write_text(script_text)
    torch.save(inputs, pixels)
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
