"""Forward speed and memory of WEMoE against the dense CLIP vision model (and T5) of the same shape.

ViT-B/32-shaped random models (hidden 768, 12 layers, patch 32, 224 px), 8 experts, batch 16, fp32: the dense model,
WEMoE (dense task vectors), E-WEMoE keep=0.1, low-rank rank 64 and 32 (all experts, and each sample's top 2), the
naive per-sample loop, and WEMoE and E-WEMoE with the attention projections upscaled as well as the MLPs (`upscale:
[mlp, attention]`; `--rows` picks rows); then the dense, WEMoE, E-WEMoE and rank-64 rows in bfloat16 against the
bfloat16 dense model. All models live in one process; each round times every model once, and the medians over rounds
are printed as ratios to the dense `CLIPVisionModel` forward (the median of the per-round ratios, so that the
machine's drift affects every row alike). Peak memory is measured for each row in a fresh child process: the
resident-set growth over the loaded model during its first forward and during a warm one; and the model's own
resident size once built (with E-WEMoE's tile index, which `from_pretrained` builds at load). `--profile` prints,
for the dense model and WEMoE, the operators the forward spends its time in (torch.profiler), which is where to look
for what WEMoE adds. Then the same for a T5-base-shaped encoder-decoder (see `speed_t5.py`) and a BERT-base-shaped
text classifier (128-token inputs, one task's head). Random weights: this measures speed, not accuracy.

The adaptation-step table (`--adaptation-steps`) times one test-time adaptation step at the CLIP shape: the forward
and backward of one task's batch, for both objectives, with each sample routed on its own (`wemoe-tta`'s default) or
the batch merged once from its mean routing weights (`--adaptation-routing batch`, the reference's mode), against a
dense model's training step on the same batch (forward and backward through every weight).

    python benchmarks/speed.py --threads 2
    python benchmarks/speed.py --repeats 9 --no-t5 --no-bert
    python benchmarks/speed.py --no-t5 --no-bert --profile
    python benchmarks/speed.py --adaptation-steps --no-forward --no-t5 --no-bert
    python benchmarks/speed.py --no-t5 --no-bert --no-bfloat16 --rows "dense CLIP" "WEMoE dense" \
        "WEMoE, MLP + attention" "E-WEMoE, MLP + attention"
"""

import argparse
import multiprocessing
import tempfile
from pathlib import Path

import torch
from speed_t5 import T5_BASE, interleaved_medians, randomize_, t5_speed_table
from torch.func import functional_call
from torch.profiler import ProfilerActivity, profile
from transformers import BertConfig, BertForSequenceClassification, CLIPVisionConfig, CLIPVisionModel

from modeling_wemoe import WEMoEConfig, WEMoEForImageClassification, WEMoEForSequenceClassification
from wemoe.streams import entropy_loss, routed_layers, task_routing_loss

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
    "WEMoE, MLP + attention": {"upscale": ["mlp", "attention"]},
    "E-WEMoE, MLP + attention": {"expert_format": "sparse", "keep": 0.1, "router_mode": "shared",
                                 "upscale": ["mlp", "attention"]},
}  # fmt: skip
MIB = 2**20
BFLOAT16_ROWS = ("dense CLIP", "WEMoE dense", "E-WEMoE keep=0.1", "low-rank rank 64")
PROFILED_ROWS = ("dense CLIP", "WEMoE dense", "E-WEMoE keep=0.1", "WEMoE, MLP + attention")
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
    model = randomize_(WEMoEForImageClassification(config).eval())
    model.prepare_task_vectors()  # what `from_pretrained` does at load: E-WEMoE's tile index
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
                merged[f"{name}.weight"] = linear.weight_task_vectors.merged_weight(linear.weight, r)
                merged[f"{name}.bias"] = linear.bias + linear.bias_task_vectors.combine(r)
            outputs.append(functional_call(self.dense, merged, (pixel_values[b : b + 1],)).last_hidden_state)
        return torch.cat(outputs)


def build(row: str, num_experts: int) -> torch.nn.Module:
    options = ROWS[row]
    if options is None:
        return CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    if options == "naive":
        return NaivePerSampleLoop(wemoe_model(num_experts, {}))
    return wemoe_model(num_experts, options)


def build_models(num_experts: int, rows: list[str]) -> dict[str, torch.nn.Module]:
    models = {}
    for row in rows:
        if ROWS[row] == "naive":  # the same WEMoE model as the "WEMoE dense" row, run the naive way
            models[row] = NaivePerSampleLoop(models.get("WEMoE dense") or build("WEMoE dense", num_experts))
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


def peaks_in_a_fresh_process(
    row: str, num_experts: int, batch_size: int, threads: int
) -> tuple[float, float, float]:
    """The model's resident size, and the first and warm forward peaks of one row, in a process that has run nothing
    else (freed memory of other rows would otherwise be reused and hide a row's own peak)."""
    torch.set_num_threads(threads)
    pixel_values = torch.randn(batch_size, 3, 224, 224)
    before = status_mib("VmRSS")
    model = build(row, num_experts)
    resident = status_mib("VmRSS") - before
    return resident, forward_peak_mib(model, pixel_values), forward_peak_mib(model, pixel_values)


def artifact_size(model: torch.nn.Module) -> float | None:
    if not isinstance(model, WEMoEForImageClassification):
        return None
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")) / MIB


def print_forward_table(timings: dict[str, tuple[float, float]], heading: str = "row") -> None:
    """One line per row: its median forward time and its ratio to the first row."""
    print(f"{heading:<24} {'forward':>9} {'x dense':>8}")
    for row, (seconds, ratio) in timings.items():
        print(f"{row:<24} {seconds * 1e3:7.0f}ms {ratio:7.2f}x")


def bfloat16_speed_table(models: dict[str, torch.nn.Module], pixel_values: torch.Tensor, repeats: int) -> None:
    """The rows again in bfloat16 (weights and inputs), as ratios to the bfloat16 dense model."""
    models = {row: model.to(torch.bfloat16) for row, model in models.items() if row in BFLOAT16_ROWS}
    pixel_values = pixel_values.to(torch.bfloat16)
    with torch.no_grad():
        timings = interleaved_medians({row: lambda m=model: m(pixel_values) for row, model in models.items()}, repeats)
    print_forward_table(timings, "row (bfloat16)")


def profile_category(operator: str, shapes: list, num_experts: int) -> str:
    """Which part of a forward an operator is: the merges W0 + sum_i r_i tau_i are the matmuls whose routing-weight
    operand has one column per expert (and one for W0, `[1, r] @ [W0; tau]`)."""
    routing_operand = {"aten::addmm": 1, "aten::mm": 0}.get(operator)
    if routing_operand is not None and shapes[routing_operand][-1:] in ([num_experts], [num_experts + 1]):
        return "merges (weight tiles and biases)"
    if operator in ("aten::addmm", "aten::mm"):
        return "linears (attention, routers, dense MLPs)"
    if operator in ("aten::bmm", "aten::baddbmm", "aten::baddbmm_"):
        return "per-sample matmuls (tiles)"
    if operator in ("aten::copy_", "aten::index_put_", "aten::_index_put_impl_", "aten::fill_", "aten::zero_"):
        return "copies, fills, sparse scatters"
    return "everything else"


def print_profile(models: dict[str, torch.nn.Module], pixel_values: torch.Tensor, num_experts: int) -> None:
    """Where one warm forward of each model spends its time (self time per part, and operator calls)."""
    for row, model in models.items():
        with torch.no_grad():
            model(pixel_values)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
                model(pixel_values)
        parts: dict[str, list[float]] = {}
        for event in profiler.key_averages(group_by_input_shape=True):
            part = parts.setdefault(profile_category(event.key, event.input_shapes, num_experts), [0.0, 0])
            part[0] += event.self_cpu_time_total / 1e3
            part[1] += event.count
        total = sum(milliseconds for milliseconds, _ in parts.values())
        shares = ", ".join(
            f"{part} {milliseconds:.0f} ms/{calls}" for part, (milliseconds, calls) in sorted(parts.items())
        )
        print(f"{row} ({pixel_values.dtype}, {total:.0f} ms): {shares}")


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
        models[row].prepare_task_vectors()  # as `from_pretrained` does at load
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
    print_forward_table(timings)


ADAPTATION_ROWS = {  # objective, adaptation routing
    "WEMoE, entropy, per sample": ("entropy", "sample"),
    "WEMoE, entropy, batch mean": ("entropy", "batch"),
    "WEMoE, task routing, per sample": ("task routing", "sample"),
    "WEMoE, task routing, batch mean": ("task routing", "batch"),
}


def adaptation_step(model: WEMoEForImageClassification, pixel_values: torch.Tensor, objective: str) -> None:
    """The forward and backward of one task's batch, as `wemoe.adapt` takes them (its routers the only trainable
    tensors; task routing's gradients stop at the routing weights)."""
    model.zero_grad(set_to_none=True)
    output = model(pixel_values, task="task0", output_routing_weights=objective == "task routing")
    if objective == "entropy":
        loss = entropy_loss(output.logits)
    else:
        loss = task_routing_loss(routed_layers(output.routing_weights), 0, model.config.router_normalization)
    loss.backward()


def dense_training_step(model: CLIPVisionModel, pixel_values: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(pixel_values).pooler_output.square().mean().backward()


def adaptation_step_table(num_experts: int, pixel_values: torch.Tensor, repeats: int) -> None:
    """One adaptation step of each objective and routing mode, as ratios to the dense model's training step."""
    dense = randomize_(CLIPVisionModel(CLIPVisionConfig(**VISION))).train()
    model = wemoe_model(num_experts, {})
    steps = {"dense forward+backward": lambda: dense_training_step(dense, pixel_values)}
    for row, (objective, routing) in ADAPTATION_ROWS.items():

        def step(objective=objective, routing=routing) -> None:
            model.route_each_batch_as_one(routing == "batch")
            model.route_gradients_through_experts(objective == "entropy")
            adaptation_step(model, pixel_values, objective)

        steps[row] = step
    print_forward_table(interleaved_medians(steps, repeats), "adaptation step")


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
    parser.add_argument("--no-bfloat16", action="store_true", help="Skip the bfloat16 rows.")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Print where the dense, WEMoE, E-WEMoE and MLP + attention forwards spend their time.",
    )
    parser.add_argument(
        "--adaptation-steps", action="store_true", help="Then the adaptation-step table (see above)."
    )
    parser.add_argument("--no-forward", action="store_true", help="Skip the CLIP forward and bfloat16 tables.")
    parser.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
        help="The CLIP forward table's rows, the dense one first (default: all: " + ", ".join(ROWS) + ").",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, 224, 224)
    print(f"ViT-B/32 shape, {args.experts} experts, batch {args.batch_size}, fp32, {args.threads} threads")
    if not args.no_forward:
        clip_forward_tables(args, pixel_values)
    if args.adaptation_steps:
        print(f"\nOne adaptation step, ViT-B/32 shape, {args.experts} experts, one task's batch of {args.batch_size}")
        adaptation_step_table(args.experts, pixel_values, args.repeats)
    if not args.no_t5:
        print(f"\nT5-base shape, {args.experts} experts, batch {args.batch_size}, 64-token prompts, fp32")
        t5_speed_table(T5_BASE, args.experts, args.batch_size, args.repeats)
    if not args.no_bert:
        print(f"\nBERT-base shape, {args.experts} experts, batch {args.batch_size}, 128-token inputs, fp32")
        bert_speed_table(args.experts, args.batch_size, args.repeats)


def clip_forward_tables(args: argparse.Namespace, pixel_values: torch.Tensor) -> None:
    """The CLIP forward table (time, memory, artifact size per row), then the bfloat16 one."""
    context = multiprocessing.get_context("spawn")
    peaks = {}
    for row in args.rows:
        with context.Pool(1) as pool:
            peaks[row] = pool.apply(peaks_in_a_fresh_process, (row, args.experts, args.batch_size, args.threads))
    models = build_models(args.experts, args.rows)
    with torch.no_grad():
        timings = interleaved_medians(
            {row: lambda m=model: m(pixel_values) for row, model in models.items()}, args.repeats
        )
    print(
        f"{'row':<24} {'forward':>9} {'x dense':>8} {'resident MiB':>13} {'peak MiB: first':>16} {'warm':>6} "
        f"{'artifact MiB':>13}"
    )
    for row, model in models.items():
        seconds, ratio = timings[row]
        size = artifact_size(model)
        size_text = f"{size:13.0f}" if size is not None else f"{'-':>13}"
        resident, first_peak, warm_peak = peaks[row]
        print(
            f"{row:<24} {seconds * 1e3:7.0f}ms {ratio:7.2f}x {resident:13.0f} {first_peak:16.0f} {warm_peak:6.0f} "
            f"{size_text}"
        )
    if args.profile:
        print_profile({row: models[row] for row in PROFILED_ROWS if row in models}, pixel_values, args.experts)
    if not args.no_bfloat16:
        print(f"\nThe same in bfloat16, {args.threads} threads")
        bfloat16_speed_table(models, pixel_values, args.repeats)
        if args.profile:
            profiled = {row: models[row] for row in PROFILED_ROWS if row in models and row in BFLOAT16_ROWS}
            print_profile(profiled, pixel_values.to(torch.bfloat16), args.experts)


if __name__ == "__main__":
    main()
