"""Forward speed and memory of WEMoE against the dense CLIP vision model (and T5) of the same shape.

ViT-B/32-shaped random models (hidden 768, 12 layers, patch 32, 224 px), 8 experts, batch 16, fp32: the dense
model, WEMoE (dense task vectors), E-WEMoE keep=0.1, low-rank rank 64 and 32 (all experts, and each sample's top 2),
and the naive per-sample loop. All models live in one process; each round times every model once, and the medians
over rounds are printed as ratios to the dense `CLIPVisionModel` forward (the median of the per-round ratios, so
that the machine's drift affects every row alike). Peak memory is measured for each row in a fresh child process:
the resident-set growth over the loaded model during its first forward (which builds the sparse tile layouts) and
during a warm one. Then the same for a T5-base-shaped encoder-decoder (see `speed_t5.py`) and a BERT-base-shaped
text classifier (128-token inputs, one task's head). Random weights: this measures speed, not accuracy.

    python benchmarks/speed.py --threads 2
    python benchmarks/speed.py --repeats 9 --no-t5 --no-bert
"""

import argparse
import multiprocessing
import tempfile
from pathlib import Path

import torch
from speed_t5 import T5_BASE, interleaved_medians, randomize_, t5_speed_table
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification, CLIPVisionConfig, CLIPVisionModel

from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification, WEMoEForSequenceClassification

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
    "low-rank rank 32": {"expert_format": "lowrank", "rank": 32},
    "naive per-sample loop": "naive",
}
MIB = 2**20
BERT_BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
BERT_ROWS = {
    "WEMoE dense": {},
    "E-WEMoE keep=0.1": {"expert_format": "sparse", "keep": 0.1, "router_mode": "shared"},
    "low-rank rank 64": {"expert_format": "lowrank", "rank": 64},
}


def wemoe_model(num_experts: int, options: dict) -> WEMoEForImageClassification:
    tasks = [f"task{i}" for i in range(num_experts)]
    config = WEMoEConfig(
        vision_config=VISION, projection_dim=512, tasks=tasks, task_labels={t: ["a", "b"] for t in tasks}, **options
    )
    return randomize_(WEMoEForImageClassification(config).eval())


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


def build_models(num_experts: int) -> dict[str, torch.nn.Module]:
    models = {}
    for row, options in ROWS.items():
        if options == "naive":  # the same WEMoE model as the "WEMoE dense" row, run the naive way
            models[row] = NaivePerSampleLoop(models["WEMoE dense"])
        else:
            models[row] = build(row, num_experts)
    return models


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


def peaks_in_a_fresh_process(row: str, num_experts: int, batch_size: int, threads: int) -> tuple[float, float]:
    """First and warm forward peaks of one row, in a process that has run nothing else (freed memory of other rows
    would otherwise be reused and hide a row's own peak)."""
    torch.set_num_threads(threads)
    model = build(row, num_experts)
    pixel_values = torch.randn(batch_size, 3, 224, 224)
    return forward_peak_mib(model, pixel_values), forward_peak_mib(model, pixel_values)


def artifact_size(model: torch.nn.Module) -> float | None:
    if not isinstance(model, WEMoEForImageClassification):
        return None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")) / MIB


def bert_speed_table(num_experts: int, batch: int, repeats: int, seq_len: int = 128) -> None:
    """Forward rows of a BERT-base-shaped classifier (one task's head) against the dense classifier."""
    torch.manual_seed(0)
    input_ids = torch.randint(1000, 30000, (batch, seq_len))
    tasks = [f"task{i}" for i in range(num_experts)]
    models = {"dense BERT": BertForSequenceClassification(BertConfig(**BERT_BASE)).eval()}
    for row, options in BERT_ROWS.items():
        config = WEMoEConfig(
            text_config=BertConfig(**BERT_BASE).to_dict(), tasks=tasks, task_labels={t: ["a", "b"] for t in tasks},
            **options,
        )
        models[row] = randomize_(WEMoEForSequenceClassification(config).eval())
    with torch.no_grad():
        timings = interleaved_medians(
            {
                row: (lambda m=model: m(input_ids=input_ids))
                if row == "dense BERT"
                else (lambda m=model: m(input_ids=input_ids, task="task0"))
                for row, model in models.items()
            },
            repeats,
        )
    print(f"{'row':<24} {'forward':>9} {'x dense':>8}")
    for row, (seconds, ratio) in timings.items():
        print(f"{row:<24} {seconds * 1e3:7.0f}ms {ratio:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2).")
    parser.add_argument("--batch-size", type=int, default=16, help="Default: 16.")
    parser.add_argument("--experts", type=int, default=8, help="Default: 8.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds; medians are reported (default: 5).")
    parser.add_argument("--no-t5", action="store_true", help="Skip the T5-base-shaped rows.")
    parser.add_argument("--no-bert", action="store_true", help="Skip the BERT-base-shaped rows.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224)
    print(f"ViT-B/32 shape, {args.experts} experts, batch {args.batch_size}, fp32, {args.threads} threads")
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for row in ROWS:
        with context.Pool(1) as pool:
            peaks[row] = pool.apply(peaks_in_a_fresh_process, (row, args.experts, args.batch_size, args.threads))
    models = build_models(args.experts)
    with torch.no_grad():
        timings = interleaved_medians(
            {row: lambda m=model: m(pixel_values) for row, model in models.items()}, args.repeats
        )
    print(f"{'row':<24} {'forward':>9} {'x dense':>8} {'peak MiB: first':>16} {'warm':>6} {'artifact MiB':>13}")
    for row, model in models.items():
        seconds, ratio = timings[row]
        size = artifact_size(model)
        size_text = f"{size:13.0f}" if size is not None else f"{'-':>13}"
        first_peak, warm_peak = peaks[row]
        print(f"{row:<24} {seconds * 1e3:7.0f}ms {ratio:7.2f}x {first_peak:16.0f} {warm_peak:6.0f} {size_text}")
    del models
    if not args.no_t5:
        print(f"\nT5-base shape, {args.experts} experts, batch {args.batch_size}, 64-token prompts, fp32")
        t5_speed_table(T5_BASE, args.experts, args.batch_size, args.repeats)
    if not args.no_bert:
        print(f"\nBERT-base shape, {args.experts} experts, batch {args.batch_size}, 128-token inputs, fp32")
        bert_speed_table(args.experts, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
