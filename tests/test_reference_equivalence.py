"""The WEMoE layers and the paper's adaptation are the authors' own: the reference implementation
(`fusion_bench.models.we_moe.WeightEnsemblingMoE`, fusion-bench 0.2.33, a test dependency) wrapped around
transformers' CLIP MLPs and T5 feed-forward blocks, with the same base, experts and router weights, gives the same
outputs, the same router gradients of the paper's entropy loss, and the same routers after 20 Adam steps. Both of the
reference's adaptation modes are compared: routing each sample (`batch_reduce=False`), and its default config's
batch-mean routing (`batch_reduce=True`: one weight per batch, from the mean routing weights), which this project
runs as `wemoe-tta --adaptation-routing batch` (`route_each_batch_as_one`).

The reference model is built here from transformers' own classes, independently of this project's conversion: every
tensor outside the upscaled blocks is task arithmetic at `init_lambda` (θ0 + λ Σ τi), and each upscaled block becomes
a `WeightEnsemblingMoE` over the base block and the experts' blocks. Only the zero-shot heads (CLIP: the classifier
rows and logit scale) are read from the project's model: they are not part of the method.

Known difference, by design: the reference routes a T5 block from the mean of its router's outputs over the whole
sequence, padding included, in the decoder too. This project's encoder averages over real tokens only (so padding
never changes a sample's routing; equal without padding, as here), and its decoder routes each token (the paper's
"token" routing) or each prompt (`decoder_routing: prompt`). At the first decoding step, the one the paper's T5
objective reads, the decoder sequence is one token long and per-token routing is the reference's: the test compares
there.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from fusion_bench.models.we_moe import WeightEnsemblingMoE
from toy_t5 import build_toy_t5_base, build_toy_t5_expert

from wemoe import merge_clip, merge_t5

INIT_LAMBDA = 0.3
ADAM_STEPS = 20
LR = 1e-3
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def task_arithmetic_(model: torch.nn.Module, base: torch.nn.Module, experts: list[torch.nn.Module]) -> None:
    """`model`'s parameters set to θ0 + λ Σ (θi - θ0) from `base` and `experts` (same parameter names)."""
    base_params = dict(base.named_parameters())
    expert_params = [dict(expert.named_parameters()) for expert in experts]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(base_params[name] + INIT_LAMBDA * sum(e[name] - base_params[name] for e in expert_params))


def reference_block(
    base_block, expert_blocks, project_router, hidden_size: int, batch_reduce: bool
) -> WeightEnsemblingMoE:
    """The reference's upscaled block, its router (`gate`) holding the project's router weights."""
    moe = WeightEnsemblingMoE(
        hidden_size,
        copy.deepcopy(base_block).requires_grad_(True),  # the reference takes task vectors of trainable tensors
        [copy.deepcopy(block).requires_grad_(True) for block in expert_blocks],
        init_lambda=INIT_LAMBDA,
        batch_first=True,
        router_hidden_layers=2,
        batch_reduce=batch_reduce,
    )
    moe.gate.load_state_dict(
        {f"{layer}.{kind}": getattr(getattr(project_router, layer), kind) for layer in ("fc1", "fc2")
         for kind in ("weight", "bias")}  # fmt: skip
    )
    return moe


def randomize_routers_(model: torch.nn.Module, seed: int) -> None:
    """Routers far from their exact initialisation (which routes every input alike), so that routing differs per
    sample and a misplaced routing weight shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".router." in name or name.startswith("router."):
                noise = torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5
                parameter.add_(noise)


def project_routers(model) -> list[torch.nn.Module]:
    return [module.router for module in model.modules() if getattr(module, "router", None) is not None
            and module is not model]  # fmt: skip


def reference_gates(model) -> list[torch.nn.Module]:
    return [module.gate for module in model.modules() if isinstance(module, WeightEnsemblingMoE)]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = F.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1).mean()


def assert_routers_equal(project: list[torch.nn.Module], reference: list[torch.nn.Module], grads: bool) -> None:
    assert len(project) == len(reference) > 0
    for router, gate in zip(project, reference, strict=True):
        for layer in ("fc1", "fc2"):
            for kind in ("weight", "bias"):
                ours, theirs = getattr(getattr(router, layer), kind), getattr(getattr(gate, layer), kind)
                if grads:
                    ours, theirs = ours.grad, theirs.grad
                    scale = theirs.abs().max().clamp_min(1e-12)  # relative to the gradient's size
                    torch.testing.assert_close(ours / scale, theirs / scale, **TOLERANCE)
                else:
                    torch.testing.assert_close(ours, theirs, **TOLERANCE)


def adam_steps(routers: list[torch.nn.Module], loss_of_step) -> None:
    optimizer = torch.optim.Adam([p for router in routers for p in router.parameters()], lr=LR)
    for step in range(ADAM_STEPS):
        optimizer.zero_grad()
        loss_of_step(step).backward()
        optimizer.step()


# CLIP ---------------------------------------------------------------------------------------------------------


# This project's --adaptation-routing, and the reference's batch_reduce that does the same.
ADAPTATION_ROUTINGS = {"sample": False, "batch": True}


@pytest.fixture(scope="module", params=list(ADAPTATION_ROUTINGS))
def clip_pair(request, base, experts, classnames, tokenizer):
    """(the project's WEMoE CLIP classifier, the reference vision tower) over the same weights and routers, both
    routing per sample or both per batch."""
    batch_reduce = ADAPTATION_ROUTINGS[request.param]
    ours = merge_clip(base, experts, classnames, tokenizer=tokenizer, router={"init_lambda": INIT_LAMBDA})
    randomize_routers_(ours, seed=0)
    ours.route_each_batch_as_one(batch_reduce)
    tasks = list(ours.config.expert_tasks or ours.config.tasks)
    # A CLIPModel's tower, or a CLIPVisionModel (the tower itself in transformers 5).
    towers = [getattr(expert, "vision_model", expert) for expert in (experts[task] for task in tasks)]
    reference = copy.deepcopy(base.vision_model)
    task_arithmetic_(reference, base.vision_model, towers)
    for index, layer in enumerate(reference.encoder.layers):
        layer.mlp = reference_block(base.vision_model.encoder.layers[index].mlp,
                                    [tower.encoder.layers[index].mlp for tower in towers],
                                    ours.vision_model.encoder.layers[index].mlp.router,
                                    base.config.vision_config.hidden_size, batch_reduce)  # fmt: skip
    return ours, reference.eval()


def reference_clip_logits(ours, reference, pixel_values: torch.Tensor, task: str) -> torch.Tensor:
    """The reference tower's pooled output through the project's zero-shot head for `task`."""
    pooled = reference(pixel_values=pixel_values).pooler_output
    image_embeds = F.normalize(ours.visual_projection(pooled), dim=-1)
    return ours.logit_scale.exp() * image_embeds @ ours.classifier.weight[ours.task_slice(task)].t()


def clip_batch(step: int, task_index: int) -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1000 * step + task_index))


def test_clip_outputs_equal_the_reference(clip_pair, classnames):
    ours, reference = clip_pair
    with torch.no_grad():
        for task_index, task in enumerate(classnames):
            pixel_values = clip_batch(0, task_index)
            expected = reference_clip_logits(ours, reference, pixel_values, task)
            torch.testing.assert_close(ours(pixel_values, task=task).logits, expected, **TOLERANCE)


def test_clip_router_gradients_of_the_entropy_equal_the_reference(clip_pair, classnames):
    ours, reference = copy.deepcopy(clip_pair[0]), copy.deepcopy(clip_pair[1])
    for model, logits_of in ((ours, lambda x, t: ours(x, task=t).logits),
                             (reference, lambda x, t: reference_clip_logits(ours, reference, x, t))):  # fmt: skip
        model.zero_grad()
        sum(entropy(logits_of(clip_batch(0, i), task)) for i, task in enumerate(classnames)).backward()
    assert_routers_equal(project_routers(ours), reference_gates(reference), grads=True)


def test_clip_routers_after_twenty_adam_steps_equal_the_reference(clip_pair, classnames):
    ours, reference = copy.deepcopy(clip_pair[0]), copy.deepcopy(clip_pair[1])
    tasks = list(enumerate(classnames))
    adam_steps(project_routers(ours), lambda step: sum(
        entropy(ours(clip_batch(step, i), task=task).logits) for i, task in tasks))
    adam_steps(reference_gates(reference), lambda step: sum(
        entropy(reference_clip_logits(ours, reference, clip_batch(step, i), task)) for i, task in tasks))
    routers = project_routers(ours)
    assert not torch.equal(routers[0].fc2.weight, clip_pair[0].vision_model.encoder.layers[0].mlp.router.fc2.weight)
    assert_routers_equal(routers, reference_gates(reference), grads=False)


# Flan-T5 ------------------------------------------------------------------------------------------------------

T5_TASKS = ("sst2", "topic", "question")
LABEL_IDS = [3, 5, 8, 13]  # the entropy's classes: a few vocabulary entries, as a task's label words


@pytest.fixture(scope="module", params=list(ADAPTATION_ROUTINGS))
def t5_pair(request):
    """(the project's WEMoE Flan-T5, the reference model) over the same weights and routers, both routing per sample
    or both per batch."""
    batch_reduce = ADAPTATION_ROUTINGS[request.param]
    base = build_toy_t5_base(seed=0)
    experts = [build_toy_t5_expert(base, seed=i + 1) for i in range(len(T5_TASKS))]
    ours = merge_t5(base, dict(zip(T5_TASKS, experts, strict=True)), router={"init_lambda": INIT_LAMBDA})
    randomize_routers_(ours, seed=0)
    ours.route_each_batch_as_one(batch_reduce)
    reference = copy.deepcopy(base)
    task_arithmetic_(reference, base, experts)
    for stack in ("encoder", "decoder"):
        for index, block in enumerate(getattr(reference, stack).block):
            feed_forward = block.layer[-1]
            feed_forward.DenseReluDense = reference_block(
                getattr(base, stack).block[index].layer[-1].DenseReluDense,
                [getattr(expert, stack).block[index].layer[-1].DenseReluDense for expert in experts],
                getattr(ours, stack).block[index].layer[-1].router,
                base.config.d_model,
                batch_reduce,
            )
    return ours, reference.eval()


def t5_batch(step: int, task_index: int) -> dict[str, torch.Tensor]:
    """Unpadded prompts (the reference averages its routing over padding too) and the first decoding step."""
    generator = torch.Generator().manual_seed(1000 * step + task_index)
    input_ids = torch.randint(3, 60, (4, 7), generator=generator)
    return {"input_ids": input_ids, "decoder_input_ids": torch.zeros(4, 1, dtype=torch.long)}


def first_step_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits[:, 0, LABEL_IDS]


def test_t5_encoder_and_first_decoding_step_equal_the_reference(t5_pair):
    ours, reference = t5_pair
    with torch.no_grad():
        batch = t5_batch(0, 0)
        ours_output, reference_output = ours(**batch), reference(**batch)
        torch.testing.assert_close(ours_output.encoder_last_hidden_state, reference_output.encoder_last_hidden_state,
                                   **TOLERANCE)  # fmt: skip
        torch.testing.assert_close(ours_output.logits, reference_output.logits, **TOLERANCE)


def test_t5_router_gradients_of_the_entropy_equal_the_reference(t5_pair):
    ours, reference = copy.deepcopy(t5_pair[0]), copy.deepcopy(t5_pair[1])
    for model in (ours, reference):
        model.zero_grad()
        sum(entropy(first_step_logits(model, t5_batch(0, i))) for i in range(len(T5_TASKS))).backward()
    assert_routers_equal(project_routers(ours), reference_gates(reference), grads=True)


def test_t5_routers_after_twenty_adam_steps_equal_the_reference(t5_pair):
    ours, reference = copy.deepcopy(t5_pair[0]), copy.deepcopy(t5_pair[1])
    for model, routers in ((ours, project_routers(ours)), (reference, reference_gates(reference))):
        adam_steps(routers, lambda step, model=model: sum(
            entropy(first_step_logits(model, t5_batch(step, i))) for i in range(len(T5_TASKS))))
    assert_routers_equal(project_routers(ours), reference_gates(reference), grads=False)
