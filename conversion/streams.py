"""Task data as adaptation sees it: one task's unlabeled samples, batch by batch, as model inputs, and what
adaptation minimises on them. Each backbone family subclasses `TaskStream` (`Backbone.task_stream`).

The objectives (`DEFAULT_OBJECTIVE` is task routing):
- "label-words" (the paper's): the entropy of the softmax over the task's classes, or, for a text-to-text model, over
  its label words at the first decoding step.
- "label-words-and-rest" (text-to-text models only): that softmax with one more bin holding the probability of every
  other token (the logsumexp of the other logits), so that mass the model puts outside the label words counts too.
- "task-routing": every routed layer's routing weights pulled toward the expert of the task whose stream the input
  came from (`task_routing_loss`); optionally plus a weighted entropy term. The data carries that signal unlabeled:
  each task's inputs arrive as that task's stream. At inference the routers still route each input from its own
  hidden states, with no task id.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import batch_indices

LABEL_WORDS = "label-words"  # the paper's
TASK_ROUTING = "task-routing"
ENTROPY_OBJECTIVES = (LABEL_WORDS, "label-words-and-rest")
OBJECTIVES = (*ENTROPY_OBJECTIVES, TASK_ROUTING)
# `wemoe-tta`'s: task routing beats the paper's entropy on the validation splits of every benchmark here.
DEFAULT_OBJECTIVE = TASK_ROUTING
# Adam's learning rate when none is given: the paper's 1e-4 for its entropy; task routing regresses the routing weights
# to fixed targets, which every benchmark's validation split preferred at 3e-3 (of 1e-3 and 3e-3).
DEFAULT_LRS = {LABEL_WORDS: 1e-4, "label-words-and-rest": 1e-4, TASK_ROUTING: 3e-3}


def label_words_and_rest(logits: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """`(batch, len(label_ids) + 1)`: the label words' logits, then one "rest" logit, the logsumexp of every other
    token's; its softmax is the full softmax's probabilities of the label words plus the rest's total."""
    rest = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    rest[label_ids] = False
    rest_logit = torch.logsumexp(logits[..., rest], dim=-1, keepdim=True)
    return torch.cat([logits[..., label_ids], rest_logit], dim=-1)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax over the classes, one value per sample averaged over the batch."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


# A routed layer's routing weights, `(batch, experts)` per sample or `(batch, tokens, experts)` per token, with the
# `(batch, tokens)` mask of the tokens that count (None: all of them).
RoutedLayer = tuple[torch.Tensor, torch.Tensor | None]


def routed_layers(weights: Sequence[torch.Tensor] | None, mask: torch.Tensor | None = None) -> list[RoutedLayer]:
    """A model output's routing weights per layer (None: a model that does not route) with the mask of the tokens that
    count."""
    return [(layer, mask) for layer in weights or ()]


@dataclass
class StreamOutput:
    """What a task stream's forward gives adaptation: the logits the entropy is taken over, and, when asked for,
    every routed layer's routing weights."""

    logits: torch.Tensor
    routing: list[RoutedLayer]


def task_routing_loss(routing: Sequence[RoutedLayer], expert: int | None, normalization: str) -> torch.Tensor:
    """How far every layer's routing weights are from routing to `expert` (the input's own task's), as the router
    gives them: raw weights (the paper's routing) are pulled to the one-hot vector, that expert at full strength and
    the others at 0, by the squared distance; with `expert` None (a task without an expert) to all zeros, the
    pre-trained base its zero-shot head was built for. Softmax weights (`router.normalization: softmax`) take the
    cross-entropy to `expert`; they have no slot for the base, so a task without an expert adds nothing. Averaged
    over samples (or real tokens) and layers."""
    losses = []
    for weights, mask in routing:
        weights = weights.float()
        if normalization == "softmax":
            if expert is None:
                continue
            per_input = -weights[..., expert].clamp_min(torch.finfo(torch.float32).tiny).log()
        else:
            target = torch.zeros(weights.shape[-1], device=weights.device)
            if expert is not None:
                target[expert] = 1.0
            per_input = (weights - target).square().sum(dim=-1)
        if mask is None or per_input.dim() == 1:
            losses.append(per_input.mean())
        else:
            mask = mask.to(per_input.dtype)
            losses.append((per_input * mask).sum() / mask.sum().clamp_min(1.0))
    if not losses:  # zero, but still reaching every router: a process's backward must touch what the others' do
        return sum(weights.sum() * 0.0 for weights, _ in routing)
    return torch.stack(losses).mean()


class TaskStream:
    """One task's unlabeled samples, served as the batch `batch_indices` picks for each step; a subclass turns rows
    into model inputs (`encode`) and runs the model on them (`outputs`): the logits adaptation takes the entropy of,
    and, for the task-routing objective, every routed layer's routing weights."""

    def __init__(self, dataset, column: str, batch_size: int, task: str):
        if len(dataset) < batch_size:
            raise ValueError(f"Task {task!r} has {len(dataset)} samples, fewer than the batch size {batch_size}.")
        self.dataset = dataset
        self.column = column
        self.batch_size = batch_size
        self.task = task

    def batch(
        self, seed: int, task_index: int, step: int, process_index: int, num_processes: int
    ) -> dict[str, torch.Tensor]:
        rows = batch_indices(len(self.dataset), self.batch_size, seed, task_index, step)[process_index::num_processes]
        return self.encode(self.dataset[rows][self.column], rows)

    def encode(self, values: list, rows: list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def outputs(self, model, inputs: dict[str, torch.Tensor], routing: bool = False) -> StreamOutput:
        """The model's logits on `inputs`, and with `routing` its routing weights per routed layer (a WEMoE model)."""
        raise NotImplementedError

    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.outputs(model, inputs).logits


def check_objective_name(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")


def default_lr(objective: str) -> float:
    """Adam's learning rate for `objective` where none is given (`DEFAULT_LRS`)."""
    check_objective_name(objective)
    return DEFAULT_LRS[objective]


def check_entropy_weight(objective: str, entropy_weight: float) -> None:
    if not (math.isfinite(entropy_weight) and entropy_weight >= 0):
        raise ValueError(f"--entropy-weight must be a number >= 0, got {entropy_weight}.")
    if entropy_weight and objective != TASK_ROUTING:
        raise ValueError(
            f"--entropy-weight adds the paper's entropy to the {TASK_ROUTING} objective; the objective {objective} is "
            "an entropy already."
        )


@dataclass(frozen=True)
class AdaptationLoss:
    """What adaptation minimises on one task's batch: `loss(stream, model, inputs)`, its `name` in logs and records
    ("entropy" for the entropy objectives), and whether its gradients must reach the routers through the experts'
    outputs (`WEMoEPreTrainedModel.route_gradients_through_experts`): a loss on the predictions needs it, a loss on
    the routing weights alone does not, and trains three times faster without."""

    name: str
    compute: Callable[[TaskStream, object, dict[str, torch.Tensor]], torch.Tensor]
    through_experts: bool = True

    def __call__(self, stream: TaskStream, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.compute(stream, model, inputs)


def adaptation_loss(objective: str = LABEL_WORDS, config=None, entropy_weight: float = 0.0) -> AdaptationLoss:
    """The loss of `objective`: the entropy of the stream's logits, or, for "task-routing", `task_routing_loss`
    toward the stream's task's expert in the WEMoE `config` (whose `expert_tasks`, else `tasks`, gives each expert's
    slot), plus `entropy_weight` times the entropy. Task routing alone trains each router on the hidden states
    entering it (its gradients stop at the routing weights); with an entropy term, gradients flow through the whole
    model, the routing term's too."""
    check_entropy_weight(objective, entropy_weight)
    if objective != TASK_ROUTING:
        return AdaptationLoss("entropy", lambda stream, model, inputs: entropy_loss(stream.logits(model, inputs)))
    # Read as artifacts of every release save them: earlier ones name no `expert_tasks` (every task has an expert) and
    # no `router_normalization` (raw routing).
    experts = list(getattr(config, "expert_tasks", None) or config.tasks)
    normalization = getattr(config, "router_normalization", "none")

    def loss(stream: TaskStream, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        output = stream.outputs(model, inputs, routing=True)
        expert = experts.index(stream.task) if stream.task in experts else None
        value = task_routing_loss(output.routing, expert, normalization)
        return value + entropy_weight * entropy_loss(output.logits) if entropy_weight else value

    return AdaptationLoss(f"{TASK_ROUTING} loss", loss, through_experts=bool(entropy_weight))
