"""Plain-T5 references the WEMoE T5 model is checked against: no code shared with the model."""

import copy

import torch
from transformers import T5ForConditionalGeneration
from transformers.activations import ACT2FN


def task_vector(base: T5ForConditionalGeneration, expert: T5ForConditionalGeneration, key: str) -> torch.Tensor:
    return expert.state_dict()[key] - base.state_dict()[key]


@torch.no_grad()
def task_arithmetic_t5(base: T5ForConditionalGeneration, experts: dict, scaling: float) -> T5ForConditionalGeneration:
    """A plain T5 with every parameter theta_0 + scaling * sum_i tau_i (a tied lm_head follows `shared`)."""
    model = copy.deepcopy(base)
    for key, parameter in model.named_parameters():
        parameter.add_(scaling * sum(task_vector(base, expert, key) for expert in experts.values()))
    return model


def feed_forward_layers(model):
    """(stack name, block index, feed-forward sub-layer index, DenseReluDense module) of every block."""
    for stack in ("encoder", "decoder"):
        for index, block in enumerate(getattr(model, stack).block):
            yield stack, index, len(block.layer) - 1, block.layer[-1].DenseReluDense


def explicit_feed_forward(x: torch.Tensor, weights: dict[str, torch.Tensor], activation: str) -> torch.Tensor:
    """T5's DenseReluDense written out: relu `wo(act(wi x))` or gated `wo(act(wi_0 x) * wi_1 x)`."""
    act = ACT2FN[activation]
    if "wi" in weights:
        hidden = act(x @ weights["wi"].t())
    else:
        hidden = act(x @ weights["wi_0"].t()) * (x @ weights["wi_1"].t())
    return hidden @ weights["wo"].t()


@torch.no_grad()
def per_sample_reference_logits(wemoe, base, experts, input_ids, decoder_input_ids) -> torch.Tensor:
    """Each prompt alone and unpadded (`input_ids` rows padded with 0 are cut at their first pad) through a plain
    task-arithmetic T5 whose feed-forward outputs are recomputed with merged weights: in the encoder one merged
    weight per sample (the router averaged over its tokens), in the decoder one per token."""
    config = wemoe.config
    plain = task_arithmetic_t5(base, experts, config.static_merge["scaling"])
    activation = base.config.dense_act_fn

    def merge_hook(stack, index, sub_layer):
        wemoe_layer = getattr(wemoe, stack).block[index].layer[-1]
        router = wemoe_layer.router if config.router_mode == "per_layer" else wemoe.router
        prefix = f"{stack}.block.{index}.layer.{sub_layer}.DenseReluDense"

        def hook(module, args, output):
            x = args[0][0]  # (tokens, d_model): one sample
            routing = router(x)
            if stack == "encoder" and config.routing_granularity == "sample":
                routing = routing.mean(dim=0, keepdim=True).expand_as(routing)
            rows = []
            for token in range(x.shape[0]):
                weights = {
                    name: base.state_dict()[f"{prefix}.{name}.weight"]
                    + sum(
                        r * task_vector(base, e, f"{prefix}.{name}.weight")
                        for r, e in zip(routing[token], experts.values(), strict=True)
                    )
                    for name in ("wi", "wi_0", "wi_1", "wo")
                    if f"{prefix}.{name}.weight" in base.state_dict()
                }
                rows.append(explicit_feed_forward(x[token], weights, activation))
            return torch.stack(rows)[None]

        return hook

    handles = [
        module.register_forward_hook(merge_hook(stack, index, sub_layer))
        for stack, index, sub_layer, module in feed_forward_layers(plain)
    ]
    try:
        rows = []
        for prompt, decoder_prompt in zip(input_ids, decoder_input_ids, strict=True):
            length = int((prompt != 0).sum())
            rows.append(plain(input_ids=prompt[None, :length], decoder_input_ids=decoder_prompt[None]).logits[0])
        return torch.stack(rows)
    finally:
        for handle in handles:
            handle.remove()
