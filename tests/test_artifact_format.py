"""Artifacts saved by earlier releases load with today's code: no missing or unexpected tensors, the logits and
generations recorded when they were saved (tests/fixtures/format_v1/make_fixtures.py), and a cache that agrees.
`wemoe-update-code` gives a published artifact today's code without touching its weights."""

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from fresh_process import BLOCK_REPOSITORY_PACKAGES, run_in_fresh_process
from transformers import PreTrainedTokenizerFast

from modeling_wemoe import WEMoEForConditionalGeneration, WEMoEForImageClassification
from wemoe.cli.update_code import main

FORMAT_V1 = Path(__file__).parent / "fixtures" / "format_v1"
# Recorded with torch 2.13; other torch releases differ in the last bits of fp32 kernels (1e-5 seen with torch 2.6).
# A format drift (a tensor read into the wrong place, a layer lost) moves logits by orders of magnitude more.
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def load_without_changes(model_class, directory: Path):
    model, info = model_class.from_pretrained(directory, output_loading_info=True)
    problems = {kind: keys for kind, keys in info.items() if kind != "error_msgs" and keys}
    assert not problems, problems
    return model.eval(), json.loads((directory / "expected.json").read_text())


def test_a_v1_clip_artifact_gives_its_recorded_logits():
    model, expected = load_without_changes(WEMoEForImageClassification, FORMAT_V1 / "clip-wemoe")
    with torch.no_grad():
        logits = model(torch.tensor(expected["pixel_values"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), **TOLERANCE)


@pytest.mark.parametrize("use_cache", [False, True], ids=["without-cache", "with-cache"])
def test_a_v1_t5_artifact_gives_its_recorded_logits_and_generations(use_cache):
    directory = FORMAT_V1 / "t5-ewemoe"
    model, expected = load_without_changes(WEMoEForConditionalGeneration, directory)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    inputs = tokenizer(expected["prompts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=torch.tensor(expected["decoder_input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), **TOLERANCE)
    generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=use_cache)
    assert generated.tolist() == expected["generated_without_cache"]


T5_CACHE_SCRIPT = BLOCK_REPOSITORY_PACKAGES + textwrap.dedent(
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

    artifact, inputs_path, out_path = sys.argv[1:4]
    prompts = torch.load(inputs_path)["prompts"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(artifact)
    model = AutoModelForSeq2SeqLM.from_pretrained(artifact, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    options = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    json.dump(
        {
            "with_cache": model.generate(**inputs, use_cache=True, **options).tolist(),
            "without_cache": model.generate(**inputs, use_cache=False, **options).tolist(),
        },
        open(out_path, "w"),
    )
    """
)


def file_digests(directory: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in directory.iterdir()}


def test_update_code_fixes_cached_generation_of_a_published_artifact_without_touching_its_weights(tmp_path):
    artifact = shutil.copytree(FORMAT_V1 / "t5-ewemoe", tmp_path / "t5-ewemoe")
    expected = json.loads((artifact / "expected.json").read_text())
    before = file_digests(artifact)

    main([str(artifact)])

    after = file_digests(artifact)
    assert after["model.safetensors"] == before["model.safetensors"]
    assert {"modeling_wemoe.py", "modeling_wemoe_t5.py", "pipeline_wemoe.py", "configuration_wemoe.py"} <= set(after)
    assert after["modeling_wemoe.py"] != before["modeling_wemoe.py"]
    config = json.loads((artifact / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_wemoe_t5.WEMoEForConditionalGeneration"
    results = run_in_fresh_process(artifact, {"prompts": expected["prompts"]}, tmp_path, T5_CACHE_SCRIPT)
    assert results["with_cache"] == results["without_cache"] == expected["generated_without_cache"]


def test_update_code_pushes_one_commit_with_the_code_and_config_to_the_hub(tmp_path, monkeypatch):
    artifact = shutil.copytree(FORMAT_V1 / "clip-wemoe", tmp_path / "clip-wemoe")
    calls = []

    class RecordingApi:
        def upload_folder(self, **kwargs):
            calls.append(kwargs)
            return type("Commit", (), {"commit_url": "https://huggingface.co/my-org/clip/commit/1"})()

    monkeypatch.setattr("wemoe.update_code.HfApi", RecordingApi)
    main([str(artifact), "--push-to-hub", "my-org/clip"])

    assert len(calls) == 1 and calls[0]["repo_id"] == "my-org/clip"
    assert set(calls[0]["allow_patterns"]) == {
        "config.json",
        "configuration_wemoe.py",
        "modeling_wemoe.py",
        "modeling_wemoe_clip.py",
        "pipeline_wemoe_classification.py",
        "pipeline_wemoe_image_classification.py",
    }
    assert calls[0]["delete_patterns"] == ["pipeline_wemoe.py"]  # 0.1.0 shipped it with CLIP artifacts too
    assert not (artifact / "pipeline_wemoe.py").exists()
    assert "image-classification" in json.loads((artifact / "config.json").read_text())["custom_pipelines"]


def test_update_code_refuses_a_directory_that_is_not_a_wemoe_artifact(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "is a 't5' model, not a WEMoE artifact" in capsys.readouterr().err
