"""Plain-CLIP reference implementations the WEMoE model is checked against: no code shared with the model."""

import copy

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPVisionModel


def vision_tower(model) -> CLIPVisionModel:
    return model.vision_model if isinstance(model, CLIPModel) else model


def stacked_task_vectors(base: CLIPModel, experts: dict, key: str, keep: float | None = None) -> torch.Tensor:
    """(num_experts, *shape) task vectors of one tower tensor, pruned by magnitude when `keep` is given."""
    pretrained = base.vision_model.state_dict()[key]
    task_vectors = torch.stack([vision_tower(e).state_dict()[key] - pretrained for e in experts.values()])
    if keep is None:
        return task_vectors
    flat = task_vectors.flatten(1)
    kept = round(keep * flat.shape[1])
    order = torch.sort(flat.abs(), dim=1, descending=True).indices[:, :kept]
    mask = torch.zeros_like(flat).scatter_(1, order, 1.0)
    return (flat * mask).view_as(task_vectors)


@torch.no_grad()
def task_arithmetic_tower(base: CLIPModel, experts: dict, scaling: float) -> CLIPVisionModel:
    """A plain CLIP vision model with every parameter theta_0 + scaling * sum_i tau_i."""
    tower = copy.deepcopy(base.vision_model)
    for key, parameter in tower.named_parameters():
        parameter.add_(scaling * stacked_task_vectors(base, experts, key).sum(0))
    return tower


@torch.no_grad()
def per_sample_reference_logits(wemoe, base: CLIPModel, experts: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """Each sample alone through a plain CLIP vision model whose MLP weights are merged for that sample only:
    before every MLP, a hook routes on the MLP's input and writes W0 + sum_i r_i tau_i into the plain CLIPMLP."""
    config = wemoe.config
    tower = task_arithmetic_tower(base, experts, config.static_merge["scaling"])
    pretrained = base.vision_model.state_dict()
    layers = wemoe.vision_model.encoder.layers

    def merge_for_this_sample(layer_index):
        router = layers[layer_index].mlp.router if config.router_mode == "per_layer" else wemoe.router

        def hook(mlp, args):
            routing = router(args[0]).mean(dim=1)[0]
            if config.router_top_k is not None:  # zero all but the k largest, by sorting
                order = torch.sort(routing, descending=True).indices
                routing = routing * torch.zeros_like(routing).index_fill_(0, order[: config.router_top_k], 1.0)
            for name, parameter in mlp.named_parameters():
                key = f"encoder.layers.{layer_index}.mlp.{name}"
                task_vectors = stacked_task_vectors(base, experts, key, config.keep)
                merged = pretrained[key] + torch.einsum("e,e...->...", routing, task_vectors)
                parameter.copy_(merged)

        return hook

    handles = [
        layer.mlp.register_forward_pre_hook(merge_for_this_sample(i)) for i, layer in enumerate(tower.encoder.layers)
    ]
    try:
        rows = []
        for image in pixel_values:
            pooled = tower(image[None]).pooler_output
            image_embeds = F.normalize(base.visual_projection(pooled), dim=-1)
            rows.append(base.logit_scale.exp() * image_embeds @ wemoe.classifier.weight.t())
        return torch.cat(rows)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def randomize_routers(model, seed: int = 0, std: float = 0.5) -> None:
    """Give every router random weights so that routing differs strongly between samples and layers."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.copy_(std * torch.randn(parameter.shape, generator=generator))


def textbook_ties(pretrained, task_vectors, scaling, density, majority_sign):
    """TIES-Merging, Yadav et al. 2023, Algorithm 1, written out entry by entry on flat tensors."""
    num_experts = task_vectors.shape[0]
    flat = task_vectors.reshape(num_experts, -1)
    trimmed = torch.zeros_like(flat)
    keep = round(density * flat.shape[1])
    for i in range(num_experts):
        order = sorted(range(flat.shape[1]), key=lambda j, i=i: -abs(float(flat[i, j])))[:keep]
        trimmed[i, order] = flat[i, order]
    elected = []
    for j in range(flat.shape[1]):
        column = trimmed[:, j]
        if majority_sign == "total":
            vote = float(column.sum())
        else:
            vote = float((column > 0).sum() - (column < 0).sum())
        elected.append(1.0 if vote > 0 else -1.0 if vote < 0 else 0.0)
    overall = 1.0 if sum(elected) >= 0 else -1.0
    elected = [sign if sign != 0 else overall for sign in elected]
    merged = torch.zeros(flat.shape[1])
    for j, sign in enumerate(elected):
        agreeing = [float(v) for v in trimmed[:, j] if v != 0 and (v > 0) == (sign > 0)]
        merged[j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return pretrained + scaling * merged.view_as(pretrained)
