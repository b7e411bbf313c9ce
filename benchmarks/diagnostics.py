"""Diagnostics the accuracy benchmarks share, so that a gap between WEMoE and the individual fine-tunes can be
explained from the output rather than guessed at:

- the oracle-routing artifact: every router's output forced to 1.0 on the evaluated task's expert and 0 elsewhere
  (the best any routing can do with these experts and this static part), scored like any artifact;
- routing accuracy per layer: the share of a task's test samples whose largest routing weight is their own task's
  expert (ties shared out, so that equal weights score chance, 1 / number of experts);
- the mean routing weight per layer, expert and task (the paper's analysis), as a plot;
- entropy and validation accuracy along adaptation, from the checkpoints `wemoe-tta` writes, as a plot.

Family-agnostic: inputs come from the family's task streams (`Backbone.task_stream`), and routing weights are read
where every WEMoE linear receives them.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from accuracy_common import ORACLE_ROWS, method_slug, score_each_alone
from safetensors.torch import load_file

from wemoe.adaptation import task_streams
from wemoe.artifact import load_artifact_model, write_artifact
from wemoe.backbones import backbone_for_config
from wemoe.data import load_task_datasets
from wemoe.recipe import RECIPE_FILE
from wemoe.results import class_indices, class_names_of
from wemoe.streams import entropy_loss

CARRIED_FILES = ("README.md", RECIPE_FILE)

# Inputs per task the diagnostics read (routing weights, the adaptation curves they plot): enough for a plot, and a
# fraction of a benchmark's time. Choices on validation (`selection`) score every input.
DIAGNOSTIC_SAMPLES = 128


def expert_tasks(config) -> list[str]:
    """The tasks with an expert, in expert order (routing weight `i` is the `i`-th's): every task, unless the artifact
    has tasks without an expert (`expert_tasks`; artifacts older than that field have none)."""
    return list(getattr(config, "expert_tasks", None) or config.tasks)


def modules_of_class(model: torch.nn.Module, class_name: str) -> list[tuple[str, torch.nn.Module]]:
    """`(name, module)` of every module of a WEMoE class, matched by name: an artifact loaded with its own code
    (`trust_remote_code`) has its own copies of the classes, which `isinstance` against this repository's misses."""
    return [(name, module) for name, module in model.named_modules() if type(module).__name__ == class_name]


@torch.no_grad()
def route_to(model: torch.nn.Module, expert: int | None) -> None:
    """Every router outputs 1.0 for `expert` and 0 for the others, whatever its input; 0 for every expert with
    `expert=None` (the base, as task routing routes a task without an expert)."""
    routers = modules_of_class(model, "WEMoERouter")
    if not routers:
        raise ValueError(f"{type(model).__name__} has no WEMoE router to route.")
    if any(router.normalization != "none" for _, router in routers if hasattr(router, "normalization")):
        raise ValueError("Oracle routing forces raw router outputs; this model normalises them (softmax).")
    for _, router in routers:
        one_hot = torch.zeros(router.num_experts)
        if expert is not None:
            one_hot[expert] = 1.0
        if router.hidden_layers == 0:
            router.weight.copy_(one_hot)
        else:
            last = router.fc if router.hidden_layers == 1 else router.fc2
            last.weight.zero_()
            last.bias.copy_(one_hot)


def oracle_artifacts(artifact: Path, output: Path) -> dict[str, Path]:
    """Per task with an expert, a copy of the artifact whose routing is that expert alone (cached)."""
    model = load_artifact_model(artifact)
    backbone = backbone_for_config(model.config)
    processor = backbone.load_processor(str(artifact), model.config)
    extra_files = {name: (artifact / name).read_text() for name in CARRIED_FILES if (artifact / name).is_file()}
    copies = {}
    for index, task in enumerate(expert_tasks(model.config)):
        copies[task] = output / task
        if not copies[task].is_dir():
            route_to(model, index)
            copies[task].mkdir(parents=True)
            write_artifact(model, copies[task], processor, extra_files=extra_files)
    return copies


def oracle_results(cache: Path, tasks, eval_args: tuple[str, ...] = ()) -> dict:
    """Every `ORACLE_ROWS` row: each task scored (with `wemoe-eval`'s options `eval_args`, as the benchmark scores
    its other rows) by its expert alone (`oracle_artifacts`) in the converted model of the row it names."""
    results = {}
    for row, (source, stem) in ORACLE_ROWS.items():
        copies = oracle_artifacts(cache / "models" / method_slug(source), cache / "models" / stem)
        results[row] = {"scores": score_each_alone(copies, tasks, cache, stem, eval_args), "parameters": (0, None)}
    return results


LAYER = re.compile(r".*?\.(layers|layer|block)\.\d+\.")
PROMPT_ROUTED = re.compile(r"EncDecAttention\.[kv]$")


def per_sample_routing(model: torch.nn.Module, run) -> list[torch.Tensor]:
    """The per-sample routing weights `(batch, experts)` every WEMoE layer used during `run()`, one per layer in
    order (read where the layer's first expert linear receives them, its MLP's or, upscaled, its attention's;
    per-token routing, as in a T5 decoder, is left out, and so is the prompt routing of a T5 decoder's
    cross-attention keys and values, which is not the layer's)."""
    captured: dict[str, torch.Tensor] = {}

    def recorder(layer: str):
        def hook(module, args):
            if args[1].dim() == 2 and layer not in captured:
                captured[layer] = args[1].detach()

        return hook

    handles = []
    for name, module in modules_of_class(model, "WEMoELinear"):
        if PROMPT_ROUTED.search(name):
            continue
        layer = LAYER.match(name).group(0)  # the layer (CLIP `layers.i`, BERT `layer.i`, T5 `block.i`)
        handles.append(module.register_forward_pre_hook(recorder(layer)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise ValueError(f"{type(model).__name__} routed no sample as a whole (no per-sample WEMoE layer ran).")
    return list(captured.values())


def tie_shared_hits(routing: torch.Tensor, expert: int) -> torch.Tensor:
    """1 where `expert` has the largest weight, 1/k where it ties with k-1 others, 0 elsewhere; per sample."""
    largest = routing.max(dim=-1, keepdim=True).values
    at_top = routing >= largest - 1e-6
    return at_top[:, expert].float() / at_top.sum(dim=-1)


@torch.no_grad()
def routing_analysis(model_dir: Path, data: Mapping, samples: int = DIAGNOSTIC_SAMPLES, batch_size: int = 32) -> dict:
    """Per task: the mean routing weight per layer and expert, and the routing accuracy per layer, over up to
    `samples` of its test inputs (None for a task without an expert: no routing is its own)."""
    model = load_artifact_model(model_dir)
    backbone = backbone_for_config(model.config)
    tasks = list(model.config.tasks)
    processor = backbone.load_processor(str(model_dir), model.config)
    datasets = load_task_datasets(data, tasks, backbone.input_kind)
    streams = task_streams(backbone, datasets, processor, 1, model.config.task_labels)
    analysis = {}
    for task, stream in streams.items():
        rows = list(range(min(samples, len(stream.dataset))))
        per_layer = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            inputs = stream.encode(stream.dataset[batch][stream.column], batch)
            per_layer.append(per_sample_routing(model, lambda s=stream, inputs=inputs: s.logits(model, inputs)))
        layers = [torch.cat([batch[i] for batch in per_layer]) for i in range(len(per_layer[0]))]
        experts = expert_tasks(model.config)
        analysis[task] = {
            "mean_routing": [layer.mean(dim=0).tolist() for layer in layers],
            "routing_accuracy": (
                [float(tie_shared_hits(layer, experts.index(task)).mean()) for layer in layers]
                if task in experts
                else None
            ),
        }
    return analysis


@torch.no_grad()
def stream_scores(
    model, streams: Mapping, datasets: Mapping, batch_size: int = 64, samples: int | None = None
) -> dict[str, dict[str, float]]:
    """Per task, over its first `samples` inputs (all by default): mean entropy of the adaptation objective's logits,
    and the accuracy of their argmax against the labels (the task's classes; for a T5, the label word chosen at the
    first decoding step)."""
    scores = {}
    for task, stream in streams.items():
        dataset, spec = datasets[task]
        scored = len(dataset) if samples is None else min(samples, len(dataset))
        names = list(model.config.task_labels[task])
        labels, _ = class_indices(task, dataset[spec.label_column], class_names_of(dataset, spec) or names)
        entropies, correct, counted = [], 0, 0
        for start in range(0, scored, batch_size):
            rows = list(range(start, min(start + batch_size, scored)))
            logits = stream.logits(model, stream.encode(dataset[rows][stream.column], rows))
            entropies.append(float(entropy_loss(logits)) * len(rows))
            kept = labels[rows] != -1
            correct += int((logits.argmax(-1)[kept] == labels[rows][kept]).sum())
            counted += int(kept.sum())
        scores[task] = {"entropy": sum(entropies) / scored, "accuracy": correct / max(counted, 1)}
    return scores


def adaptation_curve(
    artifact: Path, checkpoint_dir: Path, validation: Mapping, samples: int | None = None
) -> list[dict]:
    """Validation entropy and accuracy (over the first `samples` inputs of each task; all by default) of the unadapted
    artifact and at every checkpoint of its adaptation: each checkpoint's routers loaded into the artifact."""
    model = load_artifact_model(artifact)
    backbone = backbone_for_config(model.config)
    processor = backbone.load_processor(str(artifact), model.config)
    datasets = load_task_datasets(validation, list(model.config.tasks), backbone.input_kind)
    streams = task_streams(backbone, datasets, processor, 1, model.config.task_labels)
    steps = sorted(int(path.name.removeprefix("step_")) for path in checkpoint_dir.glob("step_*"))
    curve = []
    for step in [0, *steps]:
        if step:
            model.load_state_dict(load_file(checkpoint_dir / f"step_{step}" / "model.safetensors"), strict=False)
        scores = stream_scores(model, streams, datasets, samples=samples)
        curve.append(
            {
                "step": step,
                "entropy": sum(s["entropy"] for s in scores.values()) / len(scores),
                "accuracy": sum(s["accuracy"] for s in scores.values()) / len(scores),
                "per_task": scores,
            }
        )
    return curve


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing(analysis: Mapping, experts: list[str], path: Path, title: str) -> None:
    """The mean routing weight per layer (rows) and expert (columns), one panel per task."""
    plt = pyplot()
    tasks = list(analysis)
    figure, axes = plt.subplots(1, len(tasks), figsize=(2.6 * len(tasks), 3), sharey=True, squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        image = axis.imshow(torch.tensor(analysis[task]["mean_routing"]).numpy(), aspect="auto", cmap="viridis")
        axis.set_title(f"{task} inputs", fontsize=8)
        axis.set_xticks(range(len(experts)), experts, rotation=90, fontsize=6)
        axis.set_xlabel("expert", fontsize=7)
        figure.colorbar(image, ax=axis, fraction=0.05)
    axes[0][0].set_ylabel("layer")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_adaptation(curves: Mapping[str, list[dict]], path: Path) -> None:
    """Validation entropy and accuracy along adaptation, one line per method."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    for method, curve in curves.items():
        steps = [point["step"] for point in curve]
        left.plot(steps, [point["entropy"] for point in curve], marker="o", label=method)
        right.plot(steps, [100 * point["accuracy"] for point in curve], marker="o", label=method)
    left.set(xlabel="adaptation step", ylabel="mean entropy (validation)")
    right.set(xlabel="adaptation step", ylabel="accuracy % (validation)")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def task_vector_norms(
    base: Mapping[str, torch.Tensor],
    experts: list[Mapping[str, torch.Tensor]],
    layer_prefix: str,
    blocks: Mapping[str, tuple[str, ...]],
) -> dict[str, list[float]]:
    """The L2 norm of each layer's task vector per block (keys under `layer_prefix.format(layer)` whose rest starts
    with one of the block's prefixes), averaged over the experts: fine-tuning moving the feed-forward blocks more
    than attention is the paper's reason for making them the experts."""
    layers = 0
    while any(key.startswith(layer_prefix.format(layers)) for key in base):
        layers += 1
    norms = {block: [0.0] * layers for block in blocks}
    for expert in experts:
        for block, starts in blocks.items():
            for layer in range(layers):
                prefix = layer_prefix.format(layer)
                keys = [key for key in base if key.startswith(prefix) and key[len(prefix) :].startswith(starts)]
                squared = sum(float(((expert[key] - base[key]).float() ** 2).sum()) for key in keys)
                norms[block][layer] += squared**0.5 / len(experts)
    return norms


def plot_norms(norms: Mapping[str, list[float]], path: Path) -> None:
    """The task vectors' L2 norm per layer, one line per part of the layer (feed-forward, attention, ...)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(4.5, 3))
    for part, values in norms.items():
        axis.plot(range(len(values)), values, marker="o", label=part)
    axis.set(xlabel="layer", ylabel="task vector L2 norm (mean over tasks)")
    axis.set_xticks(range(len(next(iter(norms.values())))))
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_diagnostics(
    adapted: Mapping[str, Path], test: Mapping, validation: Mapping, norms: Mapping, output: Path, stem: str, what: str
) -> dict:
    """A benchmark's diagnostics of its adapted rows (`adapted`: method -> the artifact `wemoe-tta` wrote, its
    unadapted source beside it without `_tta`, its checkpoints in `ADAPTED.checkpoints`): routing accuracy per layer on
    the `test` data before and after adaptation, the adaptation curve on `validation` (`DIAGNOSTIC_SAMPLES` inputs of
    each task, as the routing), and the task-vector `norms`;
    written as `stem_diagnostics.json` in `output` with the plots `stem_routing_METHOD.png` (`what`: the routing
    weights', in the title), `stem_adaptation.png` and `stem_task_vector_norms.png`."""
    report = {}
    for method, artifact in adapted.items():
        converted = artifact.with_name(artifact.name.removesuffix("_tta"))
        before, after = routing_analysis(converted, test), routing_analysis(artifact, test)
        report[method] = {
            "routing_accuracy_before": {task: before[task]["routing_accuracy"] for task in before},
            "routing_accuracy_after": {task: after[task]["routing_accuracy"] for task in after},
            "curve": adaptation_curve(converted, Path(f"{artifact}.checkpoints"), validation, DIAGNOSTIC_SAMPLES),
        }
        experts = expert_tasks(load_artifact_model(converted).config)
        plot_routing(after, experts, output / f"{stem}_routing_{method_slug(method)}.png",
                     f"{method}: mean {what} after adaptation (test inputs)")  # fmt: skip
    plot_adaptation({method: report[method]["curve"] for method in report}, output / f"{stem}_adaptation.png")
    plot_norms(norms, output / f"{stem}_task_vector_norms.png")
    report["task_vector_norms"] = dict(norms)
    (output / f"{stem}_diagnostics.json").write_text(json.dumps(report, indent=2))
    return report
