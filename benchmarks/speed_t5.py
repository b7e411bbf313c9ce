"""Forward and generation speed of WEMoE T5 against the dense T5ForConditionalGeneration of the same shape.

Flan-T5-small-shaped (d_model 512, d_ff 1024 gated-gelu, 8 + 8 layers) or T5-base-shaped (d_model 768, d_ff 3072
relu, 12 + 12 layers) random models, 8 experts, batch 16, 64-token prompts, fp32: one forward (encoder plus the
first decoder step, what test-time adaptation runs) and greedy generation of 8 tokens with the KV cache. Each round
times every model once; the medians over rounds are printed as ratios to the dense model. Random weights: this
measures speed, not accuracy.

    python benchmarks/speed_t5.py --threads 2
    python benchmarks/speed_t5.py --shape base --repeats 3
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import T5Config, T5ForConditionalGeneration

from modeling_wemoe import WEMoEConfig, WEMoEForConditionalGeneration
from modeling_wemoe.modeling_wemoe import WEMoEDenseTaskVectors, WEMoELowRankTaskVectors, WEMoESparseTaskVectors
from wemoe import magnitude_keep_mask

T5_SMALL = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 8,
    "num_heads": 6,
    "feed_forward_proj": "gated-gelu",
    "decoder_start_token_id": 0,
    "tie_word_embeddings": False,
}
T5_BASE = {
    "vocab_size": 32128,
    "d_model": 768,
    "d_kv": 64,
    "d_ff": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "feed_forward_proj": "relu",
    "decoder_start_token_id": 0,
    "tie_word_embeddings": True,
}
SHAPES = {"small": T5_SMALL, "base": T5_BASE}
ROWS = {
    "WEMoE dense": {},
    "E-WEMoE keep=0.1": {"expert_format": "sparse", "keep": 0.1, "router_mode": "shared"},
    "low-rank rank 64": {"expert_format": "lowrank", "rank": 64},
}


def wemoe_t5(shape: dict, num_experts: int, options: dict) -> WEMoEForConditionalGeneration:
    config = WEMoEConfig(
        text_config=shape,
        tasks=[f"task{i}" for i in range(num_experts)],
        tie_word_embeddings=shape["tie_word_embeddings"],
        **options,
    )
    return randomize_(WEMoEForConditionalGeneration(config).eval())


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Routers that depend on the input, as after adaptation, and random task vectors, so that sparse ones keep
    entries spread over the whole tensor as magnitude pruning does (a model built from its config keeps the first
    entries of each tensor)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.05)
        for module in model.modules():
            if isinstance(module, WEMoESparseTaskVectors):
                task_vectors = torch.randn(module.values.shape[0], *module.shape) * 1e-3
                module.assign(task_vectors, magnitude_keep_mask(task_vectors, module.num_kept / module.numel))
            elif isinstance(module, WEMoEDenseTaskVectors):
                module.values.normal_(std=1e-3)
            elif isinstance(module, WEMoELowRankTaskVectors):
                module.A.normal_(std=1e-2)
                module.B.normal_(std=1e-2)
    return model


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds of each run and median ratio to the first run, timing every run once per round so that the
    machine's drift affects all of them alike."""
    for run in runs.values():
        run()  # warm-up: caches, lazily built layouts
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    reference = seconds[next(iter(runs))]
    return {
        name: (statistics.median(times), statistics.median(t / r for t, r in zip(times, reference, strict=True)))
        for name, times in seconds.items()
    }


def t5_speed_table(shape: dict, num_experts: int, batch: int, repeats: int) -> None:
    """Print the forward and generation rows for one T5 shape."""
    torch.manual_seed(0)
    input_ids = torch.randint(2, 32000, (batch, 64))
    start = torch.zeros(batch, 1, dtype=torch.long)
    models = {"dense T5": T5ForConditionalGeneration(T5Config(**shape)).eval()}
    models |= {name: wemoe_t5(shape, num_experts, options) for name, options in ROWS.items()}
    with torch.no_grad():
        forward = interleaved_medians(
            {name: lambda m=model: m(input_ids=input_ids, decoder_input_ids=start) for name, model in models.items()},
            repeats,
        )
        generate = interleaved_medians(
            {
                name: lambda m=model: m.generate(input_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
                for name, model in models.items()
            },
            repeats,
        )
    print(f"{'model':<22} {'forward':>10} {'generate 8':>11}")
    for name in models:
        note = f"   ({forward[name][0]:.3f} s, {generate[name][0]:.3f} s)" if name == "dense T5" else ""
        print(f"{name:<22} {forward[name][1]:>9.2f}x {generate[name][1]:>10.2f}x{note}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", choices=SHAPES, default="small", help="Model shape (default: small).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds; medians are reported.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = f"{args.experts} experts, batch {args.batch}, 64-token prompts, fp32, {args.threads} threads"
    print(f"T5-{args.shape} shape, {setting}")
    t5_speed_table(SHAPES[args.shape], args.experts, args.batch, args.repeats)


if __name__ == "__main__":
    main()
