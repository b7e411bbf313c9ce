"""Task data as adaptation sees it: one task's unlabeled samples, batch by batch, as model inputs, and the logits
whose entropy adaptation minimises. Each backbone family subclasses `TaskStream` (`Backbone.task_stream`)."""

import torch
import torch.nn.functional as F

from .data import batch_indices

# Test-time adaptation objectives. "label-words" (the paper's, every family's default): the entropy of the softmax over
# the task's classes, or, for a text-to-text model, over its label words at the first decoding step.
# "label-words-and-rest" (text-to-text models only): that softmax with one more bin holding the probability of every
# other token (the logsumexp of the other logits), so that mass the model puts outside the label words counts too.
DEFAULT_OBJECTIVE = "label-words"
OBJECTIVES = (DEFAULT_OBJECTIVE, "label-words-and-rest")


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


class TaskStream:
    """One task's unlabeled samples, served as the batch `batch_indices` picks for each step; a subclass turns rows
    into model inputs and says which logits adaptation takes the entropy of."""

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

    def logits(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError
