"""WEMoE for CLIP vision towers: an image classifier with one zero-shot head per task.

The vision tower keeps `CLIPVisionModel`'s parameter names; its MLPs are WEMoE blocks. Embeddings and attention follow
transformers' `CLIPVisionEmbeddings` and `CLIPAttention` (copied rather than imported, so that an artifact does not
break when transformers changes CLIP's internals).

Shipped inside CLIP artifacts, next to the shared `modeling_wemoe.py` and `configuration_wemoe.py` and the
`image-classification` pipeline (`pipeline_wemoe_image_classification.py`, `pipeline_wemoe_classification.py`).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ImageClassifierOutput

from .configuration_wemoe import WEMoEConfig
from .modeling_wemoe import (
    WEMoEPreTrainedModel,
    WEMoERouter,
    apply_linear,
    attention,
    build_router,
    compute_routing_weights,
    group_linear,
    register_wemoe_model,
    returned_attentions,
)
from .pipeline_wemoe_image_classification import WEMoEImageClassificationPipeline


class WEMoECLIPVisionEmbeddings(nn.Module):
    """Class token, patch embeddings and learned positions (follows transformers' `CLIPVisionEmbeddings`)."""

    def __init__(self, vision_config):
        super().__init__()
        self.embed_dim = vision_config.hidden_size
        self.image_size = vision_config.image_size
        self.patch_size = vision_config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            in_channels=vision_config.num_channels,
            out_channels=self.embed_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=False,
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings resized (bicubic) to an image of another size than the model was trained on."""
        num_patches = embeddings.shape[1] - 1
        position_embedding = self.position_embedding.weight.unsqueeze(0)
        num_positions = position_embedding.shape[1] - 1
        if not torch.jit.is_tracing() and num_patches == num_positions and height == width:
            return self.position_embedding(self.position_ids)
        class_pos_embed, patch_pos_embed = position_embedding[:, :1], position_embedding[:, 1:]
        dim = embeddings.shape[-1]
        side = int(math.sqrt(num_positions))
        patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        patch_pos_embed = F.interpolate(
            patch_pos_embed,
            size=(height // self.patch_size, width // self.patch_size),
            mode="bicubic",
            align_corners=False,
        )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size})."
            )
        patch_embeds = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        if interpolate_pos_encoding:
            return embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        return embeddings + self.position_embedding(self.position_ids)


class WEMoECLIPAttention(nn.Module):
    """Multi-head self-attention (follows transformers' `CLIPAttention`); its projections are weight-ensembled when
    the config upscales attention."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        vision_config = config.vision_config
        self.config = config  # read at every call: `set_attn_implementation` may change it after loading
        self.embed_dim = vision_config.hidden_size
        self.num_heads = vision_config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = vision_config.attention_dropout
        self.k_proj = group_linear(config, "attention", self.embed_dim, self.embed_dim)
        self.v_proj = group_linear(config, "attention", self.embed_dim, self.embed_dim)
        self.q_proj = group_linear(config, "attention", self.embed_dim, self.embed_dim)
        self.out_proj = group_linear(config, "attention", self.embed_dim, self.embed_dim)

    def forward(
        self, hidden_states: torch.Tensor, routing_weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = apply_linear(self.q_proj, hidden_states, routing_weights).view(hidden_shape).transpose(1, 2)
        key = apply_linear(self.k_proj, hidden_states, routing_weights).view(hidden_shape).transpose(1, 2)
        value = apply_linear(self.v_proj, hidden_states, routing_weights).view(hidden_shape).transpose(1, 2)
        output, weights = attention(
            query,
            key,
            value,
            None,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
            implementation=self.config._attn_implementation,
        )
        return apply_linear(self.out_proj, output.reshape(*input_shape, -1), routing_weights), weights


class WEMoECLIPMLP(nn.Module):
    """CLIP's fc1 -> activation -> fc2 block, both linears weight-ensembled under one routing vector when the config
    upscales the MLP (the paper). Holds the layer's router (`router`), whichever groups are upscaled."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        vision_config = config.vision_config
        self.granularity = config.routing_granularity
        self.top_k = config.router_top_k
        self.activation_fn = ACT2FN[vision_config.hidden_act]
        self.fc1 = group_linear(config, "mlp", vision_config.hidden_size, vision_config.intermediate_size)
        self.fc2 = group_linear(config, "mlp", vision_config.intermediate_size, vision_config.hidden_size)
        self.router = build_router(config, vision_config.hidden_size, "per_layer")

    def route(self, hidden_states: torch.Tensor, shared_router: WEMoERouter | None = None) -> torch.Tensor:
        router = self.router if self.router is not None else shared_router
        return compute_routing_weights(router, hidden_states, self.granularity, top_k=self.top_k)

    def forward(self, hidden_states: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        hidden_states = apply_linear(self.fc1, hidden_states, routing_weights)
        hidden_states = self.activation_fn(hidden_states)
        return apply_linear(self.fc2, hidden_states, routing_weights)


class WEMoECLIPEncoderLayer(nn.Module):
    """A CLIP encoder layer (pre-norm attention, then pre-norm MLP) with WEMoE blocks: one routing vector per layer,
    read from the first upscaled block's input (the MLP's, as in the paper, unless attention is upscaled too)."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        vision_config = config.vision_config
        self.routes_attention = "attention" in config.upscaled_groups
        self.self_attn = WEMoECLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.mlp = WEMoECLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, shared_router: WEMoERouter | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        normed = self.layer_norm1(hidden_states)
        routing_weights = self.mlp.route(normed, shared_router) if self.routes_attention else None
        hidden_states, attention_weights = self.self_attn(normed, routing_weights)
        hidden_states = residual + hidden_states

        residual = hidden_states
        normed = self.layer_norm2(hidden_states)
        if routing_weights is None:
            routing_weights = self.mlp.route(normed, shared_router)
        return residual + self.mlp(normed, routing_weights), routing_weights, attention_weights


@dataclass
class WEMoECLIPEncoderOutput:
    """Every layer's outputs, kept when the model is asked for them."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]
    routing_weights: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor | None, ...]


class WEMoECLIPEncoder(nn.Module):
    def __init__(self, config: WEMoEConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            [WEMoECLIPEncoderLayer(config) for _ in range(config.vision_config.num_hidden_layers)]
        )

    def forward(self, hidden_states: torch.Tensor, shared_router: WEMoERouter | None = None) -> WEMoECLIPEncoderOutput:
        all_hidden_states, all_routing_weights, all_attentions = (hidden_states,), (), ()
        for layer in self.layers:
            hidden_states, routing_weights, attention_weights = layer(hidden_states, shared_router=shared_router)
            all_hidden_states += (hidden_states,)
            all_routing_weights += (routing_weights,)
            all_attentions += (attention_weights,)
        return WEMoECLIPEncoderOutput(hidden_states, all_hidden_states, all_routing_weights, all_attentions)


class WEMoECLIPVisionTransformer(nn.Module):
    """CLIP's vision tower (same parameter names as `CLIPVisionModel`) with WEMoE MLPs."""

    def __init__(self, config: WEMoEConfig):
        super().__init__()
        vision_config = config.vision_config
        self.embeddings = WEMoECLIPVisionEmbeddings(vision_config)
        self.pre_layrnorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.encoder = WEMoECLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        shared_router: WEMoERouter | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> WEMoECLIPEncoderOutput:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        return self.encoder(hidden_states, shared_router=shared_router)


@dataclass
class WEMoEImageClassifierOutput(ImageClassifierOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Cross-entropy over the returned logits.
    logits (`torch.FloatTensor` of shape `(batch_size, num_classes)`):
        Scaled cosine similarities to the class embeddings of `task`, or of every task's classes.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The embeddings output and every layer's output, each `(batch_size, seq_len, hidden_size)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True` with eager attention):
        Every layer's attention probabilities, each `(batch_size, num_heads, seq_len, seq_len)`.
    image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised projected image embeddings.
    routing_weights (`tuple(torch.FloatTensor)`, *optional*, returned when `output_routing_weights=True`):
        Per layer, the routing weights used: `(batch_size, num_experts)` per sample or
        `(batch_size, seq_len, num_experts)` per token, one column per task with an expert
        (`config.tasks_with_experts`).
    """

    image_embeds: torch.FloatTensor | None = None
    routing_weights: tuple[torch.FloatTensor, ...] | None = None


@register_wemoe_model
class WEMoEForImageClassification(WEMoEPreTrainedModel):
    """CLIP vision tower with WEMoE MLPs, CLIP's visual projection and one zero-shot head per task.

    Logits are `exp(logit_scale) * normalize(visual_projection(pooled)) @ classifier.weight.T`, where the rows of
    `classifier.weight` are the L2-normalised text embeddings of every task's class names, in task order. Every task
    has a head; a task without an expert (`config.tasks_without_experts`) has only its head, and its inputs are
    routed over the other tasks' experts like any input.
    """

    backbone = "clip"
    labels_in_tensors = True  # the classifier's rows are the tasks' classes, in order
    main_input_name = "pixel_values"
    # transformers' own image-classification pipeline cannot pass `task` and ranks all tasks' classes together.
    artifact_pipelines = {
        "image-classification": {
            "impl": f"pipeline_wemoe_image_classification.{WEMoEImageClassificationPipeline.__name__}",
            "pt": ["AutoModelForImageClassification"],
            "type": "image",
        }
    }
    _no_split_modules = ["WEMoECLIPEncoderLayer", "WEMoECLIPVisionEmbeddings"]

    def __init__(self, config: WEMoEConfig):
        super().__init__(config)
        if config.task_labels is None:
            raise ValueError("WEMoEForImageClassification needs `config.task_labels` (each task's class names).")
        vision_config = config.vision_config
        self.vision_model = WEMoECLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.classifier = nn.Linear(config.projection_dim, len(config.id2label), bias=False)
        self.router = build_router(config, vision_config.hidden_size, "shared")
        self.post_init()
        self.freeze_all_but_routers()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, WEMoECLIPVisionEmbeddings):
            init.normal_(module.class_embedding, std=module.embed_dim**-0.5)
            init.copy_(module.position_ids, torch.arange(module.num_positions).expand((1, -1)))

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    def task_slice(self, task: str | None) -> slice:
        """Columns of the logits that belong to `task` (all columns for `None`)."""
        if task is None:
            return slice(None)
        offsets = self.config.task_label_offsets
        if task not in offsets:
            raise ValueError(f"Unknown task {task!r}: this model has tasks {list(offsets)}.")
        return slice(*offsets[task])

    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_routing_weights: bool = False,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
    ) -> WEMoEImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images prepared by the artifact's image processor.
            task (`str`, *optional*):
                Return only this task's classes. Without it the logits span every task's classes, matching
                `config.id2label` (`"<task>: <label>"`).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices within the returned logits; a cross-entropy loss is returned with them.
            output_routing_weights (`bool`, *optional*, defaults to `False`):
                Return every layer's routing weights, for analysis.

        Example:

        ```python
        >>> import torch
        >>> from transformers import AutoModel
        >>> model = AutoModel.from_pretrained("path/to/wemoe-artifact", trust_remote_code=True)
        >>> pixel_values = torch.randn(2, 3, 224, 224)
        >>> logits = model(pixel_values, task="eurosat").logits  # (2, number of eurosat classes)
        ```
        """
        columns = self.task_slice(task)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        encoded = self.vision_model(
            pixel_values, shared_router=self.router, interpolate_pos_encoding=interpolate_pos_encoding
        )
        pooled_output = self.vision_model.post_layernorm(encoded.last_hidden_state[:, 0, :])
        image_embeds = F.normalize(self.visual_projection(pooled_output), dim=-1)
        class_embeds = self.classifier.weight[columns]
        logits = self.logit_scale.exp() * image_embeds @ class_embeds.t()

        loss = F.cross_entropy(logits, labels.to(logits.device)) if labels is not None else None
        output = WEMoEImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=encoded.hidden_states if output_hidden_states else None,
            attentions=returned_attentions(self.config, output_attentions, encoded.attentions),
            image_embeds=image_embeds,
            routing_weights=encoded.routing_weights if output_routing_weights else None,
        )
        return output if return_dict else output.to_tuple()


WEMoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "WEMoECLIPAttention",
    "WEMoECLIPEncoderLayer",
    "WEMoECLIPMLP",
    "WEMoECLIPVisionEmbeddings",
    "WEMoEForImageClassification",
    "WEMoEImageClassifierOutput",
]
