"""The conversion recipe: a declarative YAML file, validated in full before anything is loaded.

Unknown keys, missing fields and wrong types are errors that name the key (`tasks.1.classnames: ...`).
"""

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id
from pydantic import Field, FiniteFloat, field_validator, model_validator

from modeling_wemoe.configuration_wemoe import UPSCALE_GROUPS

from .backbone import BACKBONES, Backbone, get_backbone
from .specs import DatasetSource, RecipeError, Strict, dataset_paths, load_validated, read_yaml

# The merging coefficient that task arithmetic, TIES, AdaMerging's start and WEMoE's routers use unless told otherwise
# (the papers' choice for 8 ViT-B/32 tasks).
DEFAULT_LAMBDA = 0.3


class TaskArithmeticSpec(Strict):
    """Task arithmetic: theta_0 + scaling * sum_i tau_i."""

    method: Literal["task_arithmetic"]
    scaling: FiniteFloat = DEFAULT_LAMBDA


class TiesSpec(Strict):
    """TIES-Merging: trim each task vector to `density`, elect signs, average the agreeing entries."""

    method: Literal["ties"]
    scaling: FiniteFloat = DEFAULT_LAMBDA
    density: float = Field(0.2, gt=0, le=1)
    majority_sign: Literal["total", "frequency"] = "total"


class MagnitudePruneSpec(Strict):
    """Task arithmetic on task vectors trimmed to their `density` largest-magnitude entries (TIES without sign
    election)."""

    method: Literal["magnitude_prune"]
    scaling: FiniteFloat = DEFAULT_LAMBDA
    density: float = Field(0.2, gt=0, lt=1)  # 1 keeps every entry: that is task_arithmetic


class DareLinearSpec(Strict):
    """DARE: task arithmetic after dropping task-vector entries at random (seeded: a recipe always merges alike) and
    rescaling the kept `density` by 1/density. Each tensor draws from its own seed, derived from `seed`."""

    method: Literal["dare_linear"]
    scaling: FiniteFloat = DEFAULT_LAMBDA
    density: float = Field(0.5, gt=0, lt=1)
    seed: int = 0


class DareTiesSpec(Strict):
    """DARE-TIES: DARE's random drop and rescale (seeded: a recipe always merges alike), then TIES's sign election
    and mean of the agreeing entries. Each tensor draws from its own seed, derived from `seed`."""

    method: Literal["dare_ties"]
    scaling: FiniteFloat = DEFAULT_LAMBDA
    density: float = Field(0.5, gt=0, lt=1)
    majority_sign: Literal["total", "frequency"] = "total"
    seed: int = 0


class AdaMergingSpec(Strict):
    """Layer-wise AdaMerging: a coefficient per tensor and task, trained by entropy minimisation on unlabeled task
    data. `data` names it (a DATA.yaml, as for `wemoe-tta`); only with `variant: static`."""

    method: Literal["adamerging"]
    data: Annotated[str, Field(min_length=1)]
    init_lambda: FiniteFloat = Field(DEFAULT_LAMBDA, ge=0, le=1)
    steps: int = Field(500, ge=1)
    lr: FiniteFloat = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    seed: int = 0


StaticMergeSpec = Annotated[
    TaskArithmeticSpec | TiesSpec | MagnitudePruneSpec | DareLinearSpec | DareTiesSpec | AdaMergingSpec,
    Field(discriminator="method"),
]
# Every `static_merge` method, in the order `wemoe-convert --list-methods` shows them. Each data-free one is the
# registered tensor function of the same name (`wemoe.merge_methods`), which takes these fields as arguments.
STATIC_MERGE_SPECS: tuple[type[Strict], ...] = get_args(get_args(StaticMergeSpec)[0])


class RouterSpec(Strict):
    hidden_layers: Literal[0, 1, 2] = 2
    normalization: Literal["none", "softmax"] = "none"  # softmax: an option, not the paper's (WEMoEConfig says why)
    top_k: int | None = Field(None, ge=1)
    init_lambda: FiniteFloat = DEFAULT_LAMBDA
    # "exact": a fresh merge is exactly task arithmetic; "reference": the last router layer's weight from N(0, 0.01),
    # as the authors' reference implementation (WEMoEConfig.router_init says more).
    init: Literal["exact", "reference"] = "exact"
    granularity: Literal["sample", "token"] = "sample"
    # How a decoder (T5) routes: "token" (the paper) or "prompt", once per prompt from the pooled encoder output
    # (an option; WEMoEConfig.decoder_routing says more). Only for families with a decoder.
    decoder_routing: Literal["token", "prompt"] = "token"
    seed: int = 0  # of the routers' random initialisation: converting a recipe twice gives the same artifact


class TaskSpec(Strict):
    """One task and its expert. CLIP: its class names, given or from a dataset's ClassLabel (exactly one), and optional
    prompt templates; without `model`, a task without an expert (only its zero-shot head, from the base's text
    tower). T5: optionally its label words (`classnames`, or a dataset's ClassLabel names)."""

    name: Annotated[str, Field(min_length=1)]
    model: (
        Annotated[str, Field(min_length=1, description="Full fine-tune or PEFT LoRA adapter: local dir or Hub id.")]
        | None
    ) = None
    classnames: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    dataset: DatasetSource | None = None
    templates: Annotated[list[str], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def at_most_one_class_source(self) -> "TaskSpec":
        if self.classnames is not None and self.dataset is not None:
            raise ValueError("give only one of `classnames` and `dataset`")
        return self

    @field_validator("templates")
    @classmethod
    def templates_have_a_slot(cls, templates: list[str] | None) -> list[str] | None:
        for template in templates or []:
            if "{}" not in template:
                raise ValueError(f"template {template!r} has no '{{}}' for the class name")
        return templates


EXAMPLE_RECIPE = """\
base_model: openai/clip-vit-base-patch32
variant: e-wemoe
keep: 0.1
static_merge: {method: task_arithmetic, scaling: 0.3}
router: {hidden_layers: 2, init_lambda: 0.3, granularity: sample}
upscale: [mlp]          # the experts' modules: mlp (the paper), attention, or both; everything else merged statically
tasks:
  - name: eurosat
    model: tanganke/clip-vit-base-patch32_eurosat      # full fine-tune or PEFT LoRA adapter
    dataset: {path: tanganke/eurosat, split: test, label_column: label}
  - name: shapes
    model: ./my-lora-adapter
    classnames: [circle, square, triangle]
    templates: ["a drawing of a {}."]
  - name: pets                                         # no model: no expert, only a zero-shot head (CLIP)
    classnames: [cat, dog]
"""

EXAMPLE_T5_RECIPE = """\
base_model: google/flan-t5-base
architecture: t5
variant: wemoe
router: {hidden_layers: 2, init_lambda: 0.3, granularity: sample}   # encoder routing; the decoder routes per token
# (add `decoder_routing: prompt` to route the decoder once per prompt, from the pooled encoder output)
tasks:
  - name: sst2
    model: tanganke/flan-t5-base_glue-sst2
    classnames: [negative, positive]       # label words: test-time adaptation restricts its entropy to them
  - name: stsb
    model: ./flan-t5-stsb-lora             # no label words: adapt on the whole vocabulary
"""


def check_task_fits(backbone: Backbone, task: TaskSpec, where: str) -> None:
    """Recipe rules that depend on the family, named by `where` (`tasks.0 (sst2)`)."""
    if task.model is None:
        backbone.check_task_without_expert(task.classnames is not None or task.dataset is not None, where)
    if backbone.labels_required and task.classnames is None and task.dataset is None:
        raise ValueError(
            f"{where}: a {backbone.display_name} task needs `classnames` or a `dataset` with a ClassLabel column"
        )
    if not backbone.templates_allowed and task.templates is not None:
        raise ValueError(f"{where}: `templates` build CLIP zero-shot heads; a {backbone.display_name} task has none")


def check_router_fits(backbone: Backbone, router: RouterSpec, where: str) -> None:
    """Router options that depend on the family, named by `where` (`router`): only a decoder routes per prompt."""
    if router.decoder_routing != "token" and not backbone.has_decoder:
        raise ValueError(
            f"{where}.decoder_routing: {router.decoder_routing!r} routes a decoder once per prompt; a "
            f"{backbone.display_name} model has no decoder (leave decoder_routing unset)"
        )


class MergeOptions(Strict):
    """How experts are merged; every default is declared here once. `MergeRecipe` adds what is merged. The Python
    API (`wemoe.merge`, `merge_clip`, `merge_t5`) takes these fields as keyword arguments, validated the same
    way."""

    variant: Literal["wemoe", "e-wemoe", "static"] = "wemoe"
    keep: float = Field(0.1, gt=0, le=1)
    expert_format: Literal["dense", "sparse", "lowrank"] | None = None
    rank: int | None = Field(None, ge=1)
    static_merge: StaticMergeSpec = TaskArithmeticSpec(method="task_arithmetic")
    router: RouterSpec = RouterSpec()
    # The module groups whose linears become weight-ensembled experts (WEMoEConfig.upscale); the rest is merged by
    # `static_merge`.
    upscale: Annotated[list[Literal[UPSCALE_GROUPS]], Field(min_length=1)] = ["mlp"]

    @field_validator("upscale")
    @classmethod
    def each_group_once(cls, upscale: list[str]) -> list[str]:
        if len(set(upscale)) != len(upscale):
            raise ValueError(f"each module group at most once, got {upscale}")
        return upscale

    @model_validator(mode="after")
    def upscale_only_wemoe(self) -> "MergeOptions":
        if self.variant == "static" and self.upscale != ["mlp"]:
            raise ValueError("`upscale` chooses a WEMoE model's experts; variant: static merges every tensor once")
        return self

    @model_validator(mode="after")
    def rank_with_lowrank(self) -> "MergeOptions":
        if (self.expert_format == "lowrank") != (self.rank is not None):
            raise ValueError("`rank` is required with expert_format: lowrank and only allowed with it")
        return self

    @model_validator(mode="after")
    def adamerging_only_static(self) -> "MergeOptions":
        if self.static_merge.method == "adamerging" and self.variant != "static":
            raise ValueError(
                "static_merge: adamerging merges a whole model from data; use it with variant: static (a WEMoE "
                "variant merges its non-MLP tensors with a data-free method: task_arithmetic, ties, ...)"
            )
        return self


class MergeRecipe(MergeOptions):
    """What `wemoe-convert` builds; `EXAMPLE_RECIPE` shows every section. `variant: static` builds a plain model
    of the base's class, merged by `static_merge` alone (a baseline to compare WEMoE with). `architecture` names a
    registered backbone family (`wemoe.backbones`). `license` is the Hub license id the model card declares
    (`mit`, `apache-2.0`, ...): a merge is bound by the licenses of its base and of every expert, which only the
    recipe's author can reconcile, so without it the card declares `other` and says so."""

    base_model: Annotated[str, Field(min_length=1)]
    architecture: str = "clip"
    tasks: Annotated[list[TaskSpec], Field(min_length=1)]
    license: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("architecture")
    @classmethod
    def registered_architecture(cls, architecture: str) -> str:
        if architecture not in BACKBONES:
            raise ValueError(f"unknown architecture {architecture!r}; registered: {sorted(BACKBONES)}")
        return architecture

    @model_validator(mode="after")
    def tasks_fit_the_architecture(self) -> "MergeRecipe":
        backbone = get_backbone(self.architecture)
        for index, task in enumerate(self.tasks):
            check_task_fits(backbone, task, f"tasks.{index} ({task.name})")
        return self

    @model_validator(mode="after")
    def router_fits_the_architecture(self) -> "MergeRecipe":
        check_router_fits(get_backbone(self.architecture), self.router, "router")
        return self

    @model_validator(mode="after")
    def some_task_has_an_expert(self) -> "MergeRecipe":
        if not self.expert_tasks:
            raise ValueError("no task names a `model`: give at least one task's fine-tuned model, the experts merged")
        return self

    @model_validator(mode="after")
    def top_k_within_the_experts(self) -> "MergeRecipe":
        experts = len(self.expert_tasks)
        if self.router.top_k is not None and self.router.top_k > experts:
            without = len(self.tasks) - experts
            raise ValueError(
                f"router.top_k ({self.router.top_k}) is larger than the number of experts ({experts}): it mixes "
                "each input's top_k experts, one expert per task with a `model`"
                + (f" ({without} task(s) without `model` have no expert)" if without else "")
            )
        return self

    @property
    def expert_tasks(self) -> list[TaskSpec]:
        """The tasks that name a `model`: the experts, in order."""
        return [task for task in self.tasks if task.model is not None]

    @field_validator("tasks")
    @classmethod
    def unique_task_names(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [task.name for task in tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names {duplicates}")
        return tasks

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def check_model_source(value: str, field: str) -> None:
    """A model named in a recipe must be a local directory or, failing that, something that can be a Hub repo id:
    said before anything is loaded, naming the recipe field."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RecipeError(f"{field}: {value!r} is a file; give a checkpoint directory or a Hub repo id.")
        return
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise RecipeError(f"{field}: {value!r} does not exist here, and is not a Hub repo id (org/name).") from None


def check_recipe_sources(recipe: "MergeRecipe") -> None:
    check_model_source(recipe.base_model, "base_model")
    for index, task in enumerate(recipe.tasks):
        if task.model is not None:
            check_model_source(task.model, f"tasks.{index}.model ({task.name})")


def recipe_inputs(recipe: "MergeRecipe") -> list[str]:
    """The local paths a recipe reads (models, datasets, the AdaMerging data config): an output must never be one."""
    paths = [recipe.base_model, *(task.model for task in recipe.expert_tasks)]
    paths += [path for task in recipe.tasks if task.dataset is not None for path in dataset_paths(task.dataset)]
    if recipe.static_merge.method == "adamerging":
        paths.append(recipe.static_merge.data)
    return [path for path in paths if Path(path).expanduser().exists()]


# The recipe an artifact was converted with, saved in it; an adapted artifact's adds the run under `adaptation`.
RECIPE_FILE = "merge_config.yaml"


def artifact_recipe(directory: str | os.PathLike) -> tuple[MergeRecipe | None, dict[str, Any] | None]:
    """The recipe a local artifact was converted with (its `merge_config.yaml`) and the adaptation record it holds, if
    any; (None, None) where it has none. Read before any weight: a broken recipe is an error naming its keys."""
    path = Path(directory) / RECIPE_FILE
    fields = (read_yaml(path, f"recipe {str(path)!r}") or {}) if path.is_file() else {}
    if not isinstance(fields, dict):
        raise RecipeError(f"The recipe {str(path)!r} must be a mapping of keys, got {type(fields).__name__}.")
    adaptation = fields.pop("adaptation", None)
    recipe = load_validated(MergeRecipe, fields, f"recipe {str(path)!r}") if fields else None
    return recipe, adaptation


def recipe_file_text(recipe: MergeRecipe | None, adaptation: dict[str, Any] | None = None) -> str:
    """An artifact's `merge_config.yaml`: the recipe, then the adaptation record (`wemoe-tta`'s run) if there is one."""
    text = recipe.to_yaml() if recipe is not None else ""
    return text + (yaml.safe_dump({"adaptation": adaptation}, sort_keys=False) if adaptation is not None else "")


def load_recipe(recipe: MergeRecipe | dict[str, Any] | str | os.PathLike) -> MergeRecipe:
    """A validated recipe from a `MergeRecipe`, a dict, or a YAML file path."""
    return load_validated(MergeRecipe, recipe, "conversion recipe")
