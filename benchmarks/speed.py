"""Forward speed and memory of WEMoE against the dense CLIP vision model of the same shape.

ViT-B/32-shaped random models (hidden 768, 12 layers, patch 32, 224 px), 8 experts, batch 16, fp32: the dense
model, WEMoE (dense task vectors), E-WEMoE keep=0.1, low-rank rank 64 (all experts, and each sample's top 2),
and the naive per-sample loop. Times are
medians of several runs measured in one process and printed as ratios to the dense `CLIPVisionModel` forward.
Peak memory of each forward is measured in a child process per row (resident set growth over the loaded model).
Random weights: this measures speed, not accuracy.

    python benchmarks/speed.py --threads 2
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.func import functional_call
from transformers import CLIPVisionConfig, CLIPVisionModel

from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification

VISION = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
}
ROWS = {
    "dense CLIP": None,
    "WEMoE dense": {},
    "E-WEMoE keep=0.1": {"expert_format": "sparse", "keep": 0.1, "router_mode": "shared"},
    "low-rank rank 64": {"expert_format": "lowrank", "rank": 64},
    "low-rank rank 64, top-2": {"expert_format": "lowrank", "rank": 64, "router_top_k": 2},
    "naive per-sample loop": "naive",
}
MIB = 2**20


def wemoe_model(num_experts: int, options: dict) -> WEMoEForImageClassification:
    tasks = [f"task{i}" for i in range(num_experts)]
    config = WEMoEConfig(
        vision_config=VISION, projection_dim=512, tasks=tasks, task_labels={t: ["a", "b"] for t in tasks}, **options
    )
    model = WEMoEForImageClassification(config).eval()
    with torch.no_grad():  # routers that depend on the input, as after adaptation
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.05)
    return model


class NaivePerSampleLoop(torch.nn.Module):
    """The known implementation: for each sample, a full set of merged MLP weights and a dense forward with them."""

    def __init__(self, wemoe: WEMoEForImageClassification):
        super().__init__()
        self.wemoe = wemoe
        self.dense = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
        self.linears = {
            name: module
            for name, module in wemoe.vision_model.named_modules()
            if type(module).__name__ == "WEMoELinear"
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        routing = self.wemoe(pixel_values, output_routing_weights=True).routing_weights  # the routers' decisions
        outputs = []
        for b in range(pixel_values.shape[0]):
            merged = {}
            for name, linear in self.linears.items():
                layer = int(name.split(".")[2])
                r = routing[layer][b]
                merged[f"{name}.weight"] = linear.weight + torch.einsum(
                    "e,eoi->oi", r, linear.weight_task_vectors.dense()
                )
                merged[f"{name}.bias"] = linear.bias + r @ linear.bias_task_vectors.dense()
            outputs.append(functional_call(self.dense, merged, (pixel_values[b : b + 1],)).last_hidden_state)
        return torch.cat(outputs)


def build(row: str, num_experts: int) -> torch.nn.Module:
    options = ROWS[row]
    if options is None:
        return CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    if options == "naive":
        return NaivePerSampleLoop(wemoe_model(num_experts, {}))
    return wemoe_model(num_experts, options)


def median_time(model: torch.nn.Module, pixel_values: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(pixel_values)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def forward_peak_mib(model: torch.nn.Module, pixel_values: torch.Tensor) -> float:
    """Resident-set growth at the peak of one forward (writing 5 to clear_refs resets the peak counter)."""
    before = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with torch.no_grad():
        model(pixel_values)
    return status_mib("VmHWM") - before


def artifact_size(model: torch.nn.Module) -> float | None:
    if not isinstance(model, WEMoEForImageClassification):
        return None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2).")
    parser.add_argument("--batch-size", type=int, default=16, help="Default: 16.")
    parser.add_argument("--experts", type=int, default=8, help="Default: 8.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per row; the median is reported.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224)
    print(f"ViT-B/32 shape, {args.experts} experts, batch {args.batch_size}, fp32, {args.threads} threads")
    print(f"{'row':<24} {'forward':>9} {'x dense':>8} {'peak MiB: first':>16} {'warm':>6} {'artifact MiB':>13}")
    dense_time = None
    for row in ROWS:
        model = build(row, args.experts)
        first_peak = forward_peak_mib(model, pixel_values)
        warm_peak = forward_peak_mib(model, pixel_values)
        seconds = median_time(model, pixel_values, args.repeats)
        dense_time = dense_time or seconds
        size = artifact_size(model)
        size_text = f"{size:13.0f}" if size is not None else f"{'-':>13}"
        print(
            f"{row:<24} {seconds * 1e3:7.0f}ms {seconds / dense_time:7.2f}x "
            f"{first_peak:16.0f} {warm_peak:6.0f} {size_text}"
        )
        del model


if __name__ == "__main__":
    main()
