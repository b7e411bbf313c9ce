"""Peak memory of `wemoe-convert` on ViT-B/32-shaped checkpoints: does a conversion stream its experts?

Builds a random CLIP base (ViT-B/32 vision tower: hidden 768, 12 layers, patch 32, 224 px; a 12-layer 512-wide
text tower) and N fine-tuned-shaped vision experts, saves them as ordinary safetensors checkpoints, runs
`wemoe-convert` in a child process and prints its peak RSS beside the sizes it is made of. Random weights: this
measures memory, not accuracy.

    python benchmarks/convert_memory.py --experts 8 --variant e-wemoe
"""

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from speed import VISION  # benchmarks/ is on sys.path when a benchmark runs as a script
from transformers import CLIPConfig, CLIPModel

from wemoe import default_image_processor
from wemoe.toy import build_toy_expert, toy_tokenizer

MIB = 2**20


def vit_b32_config() -> CLIPConfig:
    return CLIPConfig(
        vision_config=VISION,
        text_config={
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "vocab_size": len(toy_tokenizer()),
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        projection_dim=512,
    )


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="Number of experts (default: 8).")
    parser.add_argument("--variant", choices=["wemoe", "e-wemoe"], default="e-wemoe", help="Default: e-wemoe.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write checkpoints (default: a temp dir).")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wemoe-memory-"))
    torch.manual_seed(0)
    base = CLIPModel(vit_b32_config()).eval()
    base.save_pretrained(workdir / "base")
    toy_tokenizer().save_pretrained(workdir / "base")
    default_image_processor(base.config.vision_config).save_pretrained(workdir / "base")
    tasks = []
    for i in range(args.experts):
        build_toy_expert(base, seed=i + 1, scale=0.01).save_pretrained(workdir / f"expert{i}")
        tasks.append({"name": f"task{i}", "model": str(workdir / f"expert{i}"), "classnames": ["a", "b", "c"]})
    recipe = {"base_model": str(workdir / "base"), "variant": args.variant, "keep": 0.1, "tasks": tasks}
    (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    del base

    command = [sys.executable, "-m", "wemoe.cli.convert", str(workdir / "recipe.yaml"), str(workdir / "artifact")]
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB

    base_size = directory_size(workdir / "base")
    expert_size = directory_size(workdir / "expert0")
    artifact_size = directory_size(workdir / "artifact")
    print(f"{args.variant}, {args.experts} ViT-B/32-shaped experts (fp32):")
    all_experts = args.experts * expert_size
    print(f"  base checkpoint            {base_size / MIB:9.0f} MiB")
    print(f"  one expert checkpoint      {expert_size / MIB:9.0f} MiB  (all experts: {all_experts / MIB:.0f} MiB)")
    print(f"  artifact written           {artifact_size / MIB:9.0f} MiB")
    print(f"  peak RSS of wemoe-convert  {peak / MIB:9.0f} MiB")
    print(f"  base + all experts         {(base_size + all_experts) / MIB:9.0f} MiB  (what loading every model holds)")


if __name__ == "__main__":
    main()
