"""Forward and generation speed of WEMoE T5 against the dense T5ForConditionalGeneration of the same shape.

Flan-T5-small-shaped (d_model 512, d_ff 1024 gated-gelu, 8 + 8 layers) or T5-base-shaped (d_model 768, d_ff 3072
relu, 12 + 12 layers) random models, 8 experts, batch 16, 64-token prompts, fp32: one forward (encoder plus the
first decoder step, what test-time adaptation runs), the encoder alone, and greedy generation of 8 tokens with the
KV cache. Each round times every model once; the medians over rounds are printed as ratios to the dense model, and
the decoding steps' share of generation as milliseconds per step ((generation - encoder) / 8). WEMoE and E-WEMoE
are timed with the paper's per-token decoder routing and with `decoder_routing="prompt"` (one routing vector per
prompt, the same weights: only the routing differs). Random weights: this measures speed, not accuracy.

    python benchmarks/speed_t5.py --threads 2
    python benchmarks/speed_t5.py --shape base --repeats 3
    python benchmarks/speed_t5.py --threads 1 --clock cpu   # on a shared machine: this process's CPU time
"""

import argparse
import copy
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
# Rows timed again with the decoder routed once per prompt, on the same tensors.
PER_PROMPT_ROWS = ("WEMoE dense", "E-WEMoE keep=0.1")
NEW_TOKENS = 8


def wemoe_t5(shape: dict, num_experts: int, options: dict) -> WEMoEForConditionalGeneration:
    config = WEMoEConfig(
        text_config=shape,
        tasks=[f"task{i}" for i in range(num_experts)],
        tie_word_embeddings=shape["tie_word_embeddings"],
        **options,
    )
    return randomize_(WEMoEForConditionalGeneration(config).eval())


def with_decoder_routing(model: WEMoEForConditionalGeneration, routing: str) -> WEMoEForConditionalGeneration:
    """The same model, sharing every tensor, with its decoder routed as `routing` says (no second copy of the task
    vectors in memory)."""
    config = copy.deepcopy(model.config)
    config.decoder_routing = routing
    with torch.device("meta"):
        other = WEMoEForConditionalGeneration(config)
    other.load_state_dict(model.state_dict(), assign=True)
    return other.eval()


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


# What a run's time is: wall-clock seconds, or (`--clock cpu`) the CPU seconds of this process, which other processes
# on a shared machine inflate much less (with one thread they are close to the run's own work).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_medians(
    runs: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, tuple[float, float]]:
    """Median seconds of each run and median ratio to the first run, timing every run once per round so that the
    machine's drift affects all of them alike."""
    for run in runs.values():
        run()  # warm-up: caches, lazily built layouts
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = clock()
            run()
            seconds[name].append(clock() - start)
    reference = seconds[next(iter(runs))]
    return {
        name: (statistics.median(times), statistics.median(t / r for t, r in zip(times, reference, strict=True)))
        for name, times in seconds.items()
    }


def t5_speed_table(
    shape: dict, num_experts: int, batch: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> None:
    """Print the forward and generation rows for one T5 shape."""
    torch.manual_seed(0)
    input_ids = torch.randint(2, 32000, (batch, 64))
    start = torch.zeros(batch, 1, dtype=torch.long)
    models = {"dense T5": T5ForConditionalGeneration(T5Config(**shape)).eval()}
    for name, options in ROWS.items():
        models[name] = wemoe_t5(shape, num_experts, options)
        if name in PER_PROMPT_ROWS:
            models[f"{name}, per-prompt decoder"] = with_decoder_routing(models[name], "prompt")
    with torch.no_grad():
        forward = interleaved_medians(
            {name: lambda m=model: m(input_ids=input_ids, decoder_input_ids=start) for name, model in models.items()},
            repeats,
            clock,
        )
        encoder = interleaved_medians(
            {name: lambda m=model: m.get_encoder()(input_ids=input_ids) for name, model in models.items()},
            repeats,
            clock,
        )
        generate = interleaved_medians(
            {
                name: lambda m=model: m.generate(
                    input_ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
                )
                for name, model in models.items()
            },
            repeats,
            clock,
        )
    print(f"{'model':<38} {'forward':>8} {'encoder':>8} {'generate 8':>11} {'ms / decoding step':>19}")
    for name in models:
        step_ms = 1000 * (generate[name][0] - encoder[name][0]) / NEW_TOKENS
        note = (
            f"   ({forward[name][0]:.3f} s, {encoder[name][0]:.3f} s, {generate[name][0]:.3f} s)"
            if name == "dense T5"
            else ""
        )
        print(
            f"{name:<38} {forward[name][1]:>7.2f}x {encoder[name][1]:>7.2f}x {generate[name][1]:>10.2f}x "
            f"{step_ms:>19.1f}{note}"
        )


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
    parser.add_argument("--clock", choices=CLOCKS, default="wall", help="Wall-clock or CPU time (default: wall).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = f"{args.experts} experts, batch {args.batch}, 64-token prompts, fp32, {args.threads} threads"
    print(f"T5-{args.shape} shape, {setting}, {args.clock} time")
    t5_speed_table(SHAPES[args.shape], args.experts, args.batch, args.repeats, CLOCKS[args.clock])


if __name__ == "__main__":
    main()
