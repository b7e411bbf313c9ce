"""Forward and generation speed of WEMoE T5 against the dense T5ForConditionalGeneration of the same shape.

Flan-T5-small-shaped random models (d_model 512, d_ff 1024 gated-gelu, 8 + 8 layers), 8 experts, batch 16, 64-token
prompts, fp32: one forward (encoder plus the first decoder step, what test-time adaptation runs) and greedy
generation of 8 tokens with the KV cache. Times are medians of several runs in one process, printed as ratios to
the dense model. Random weights: this measures speed, not accuracy.

    python benchmarks/speed_t5.py --threads 2
"""

import argparse
import statistics
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

from modeling_wemoe import WEMoEConfig, WEMoEForConditionalGeneration

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
ROWS = {
    "WEMoE dense": {},
    "E-WEMoE keep=0.1": {"expert_format": "sparse", "keep": 0.1, "router_mode": "shared"},
    "low-rank rank 64": {"expert_format": "lowrank", "rank": 64},
}


def wemoe_t5(num_experts: int, options: dict) -> WEMoEForConditionalGeneration:
    config = WEMoEConfig(text_config=T5_SMALL, tasks=[f"task{i}" for i in range(num_experts)], **options)
    model = WEMoEForConditionalGeneration(config).eval()
    with torch.no_grad():  # routers that depend on the input, as after adaptation
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.05)
    return model


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up: caches, lazily built layouts
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    input_ids = torch.randint(2, 32000, (args.batch, 64))
    start = torch.zeros(args.batch, 1, dtype=torch.long)

    def timings(model) -> tuple[float, float]:
        with torch.no_grad():
            forward = median_seconds(lambda: model(input_ids=input_ids, decoder_input_ids=start), args.repeats)
            generate = median_seconds(
                lambda: model.generate(input_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False), args.repeats
            )
        return forward, generate

    dense_forward, dense_generate = timings(T5ForConditionalGeneration(T5Config(**T5_SMALL)).eval())
    print(f"{'model':<22} {'forward':>10} {'generate 8':>11}")
    print(f"{'dense T5':<22} {'1.00x':>10} {'1.00x':>11}   ({dense_forward:.3f} s, {dense_generate:.3f} s)")
    for name, options in ROWS.items():
        forward, generate = timings(wemoe_t5(args.experts, options))
        print(f"{name:<22} {forward / dense_forward:>9.2f}x {generate / dense_generate:>10.2f}x")


if __name__ == "__main__":
    main()
