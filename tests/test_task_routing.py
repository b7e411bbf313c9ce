"""The task-routing adaptation objective: each input's routing weights are pulled toward the expert of the task whose
stream it came from, so the routers learn, from unlabeled data, to route every input on their own.

On toy tasks that are separable (each task's inputs drawn from its own distribution), routing accuracy (the share of
inputs whose largest routing weight is their own task's expert, per routed layer) must rise from chance to nearly
all, for every family (CLIP, BERT, T5 encoder and decoder), router (a router per layer, E-WEMoE's shared one) and
storage format (dense, sparse, low-rank); an expert-less task's inputs must route to zero, the base."""

import pytest
import torch
import yaml
from reference import randomize_routers
from toy_bert import TASK_LABELS, build_toy_bert_base, build_toy_bert_expert
from toy_t5 import build_toy_t5_base, build_toy_t5_expert

from wemoe import merge_bert, merge_clip, merge_t5
from wemoe.adaptation import adapt
from wemoe.backbones.bert import TextClassificationStream
from wemoe.backbones.clip import ImageTaskStream
from wemoe.backbones.t5 import TextTaskStream
from wemoe.cli.tta import main as tta_main
from wemoe.streams import LABEL_WORDS, adaptation_loss, check_entropy_weight, task_routing_loss

BATCH = 8
STEPS = 60
LR = 1e-2

FORMATS = {
    "wemoe-dense": {"variant": "wemoe"},
    "e-wemoe-sparse": {"variant": "e-wemoe", "keep": 0.2},
    "wemoe-lowrank": {"variant": "wemoe", "expert_format": "lowrank", "rank": 4},
}


# The loss itself -----------------------------------------------------------------------------------------------


def test_raw_routing_is_pulled_to_the_one_hot_expert_or_to_zero():
    weights = torch.tensor([[0.3, 0.3, 0.3], [1.0, 0.0, 0.0]])
    assert task_routing_loss([(weights, None)], 0, "none").item() == pytest.approx((0.49 + 0.09 * 2 + 0.0) / 2)
    assert task_routing_loss([(weights, None)], None, "none").item() == pytest.approx((0.27 + 1.0) / 2)


def test_softmax_routing_takes_the_cross_entropy_and_skips_tasks_without_an_expert():
    probabilities = torch.tensor([[0.5, 0.25, 0.25]], requires_grad=True)
    expected = -torch.log(torch.tensor(0.25)).item()
    assert task_routing_loss([(probabilities, None)], 1, "softmax").item() == pytest.approx(expected)
    skipped = task_routing_loss([(probabilities, None)], None, "softmax")
    assert skipped.item() == 0.0 and skipped.requires_grad  # zero, yet reaching the routers (DDP needs every grad)


def test_per_token_routing_counts_real_tokens_only():
    weights = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one sample, two tokens: the second is padding
    mask = torch.tensor([[1, 0]])
    assert task_routing_loss([(weights, mask)], 0, "none").item() == 0.0
    assert task_routing_loss([(weights, None)], 0, "none").item() == pytest.approx(1.0)


def test_the_entropy_weight_belongs_to_task_routing():
    check_entropy_weight("task-routing", 0.5)
    with pytest.raises(ValueError, match="--entropy-weight adds the paper's entropy to the task-routing objective"):
        check_entropy_weight(LABEL_WORDS, 0.5)
    with pytest.raises(ValueError, match="--entropy-weight must be a number >= 0"):
        check_entropy_weight("task-routing", -1.0)


# Separable toy tasks -------------------------------------------------------------------------------------------


class SyntheticStream:
    """A family's task stream whose batches are drawn from its task's own distribution (`draw(generator)`), so that
    only the family's forward (`outputs`) is the library's."""

    def __init__(self, family_stream: type, task: str, draw, **attributes):
        self.stream = family_stream.__new__(family_stream)
        self.stream.task = task
        for name, value in attributes.items():
            setattr(self.stream, name, value)
        self.stream.batch = lambda seed, task_index, step, process_index, num_processes: draw(
            torch.Generator().manual_seed(seed * 1_000 + task_index * 100 + step)
        )


def image_draw(task_index: int):
    pattern = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(task_index))
    return lambda generator: {"pixel_values": pattern + 0.3 * torch.randn(BATCH, 3, 32, 32, generator=generator)}


def token_draw(task_index: int, num_tasks: int, vocab: range, length: int = 6):
    """Token ids from the task's own share of the vocabulary, with padding after a random length."""
    words = torch.tensor(list(vocab))[task_index::num_tasks]

    def draw(generator: torch.Generator) -> dict[str, torch.Tensor]:
        ids = words[torch.randint(len(words), (BATCH, length), generator=generator)]
        lengths = torch.randint(2, length + 1, (BATCH,), generator=generator)
        mask = (torch.arange(length) < lengths[:, None]).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    return draw


def routing_accuracy(model, streams: dict, experts: list[str]) -> torch.Tensor:
    """Per routed layer, the share of fresh inputs (another seed than adaptation's) whose largest routing weight is
    their own task's expert, over the tasks that have one."""
    hits = []
    with torch.no_grad():
        for task_index, (task, stream) in enumerate(streams.items()):
            if task not in experts:
                continue
            inputs = stream.batch(99, task_index, 0, 0, 1)
            output = stream.outputs(model, inputs, routing=True)
            expert = experts.index(task)
            hits.append(torch.stack([layer_hits(weights, mask, expert) for weights, mask in output.routing]))
    return torch.stack(hits).mean(dim=0)


def layer_hits(weights: torch.Tensor, mask: torch.Tensor | None, expert: int) -> torch.Tensor:
    right = (weights.argmax(dim=-1) == expert) & (weights.max(dim=-1).values > weights.min(dim=-1).values)
    if right.dim() == 1 or mask is None:
        return right.float().mean()
    return (right.float() * mask).sum() / mask.sum()


def adapt_task_routing(model, streams: dict, steps: int = STEPS):
    return adapt(model, streams, steps=steps, lr=LR, seed=0, loss=adaptation_loss("task-routing", model.config))


def clip_streams(tasks: list[str]) -> dict:
    return {task: SyntheticStream(ImageTaskStream, task, image_draw(i)).stream for i, task in enumerate(tasks)}


@pytest.mark.parametrize("storage", list(FORMATS))
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_clip_routers_learn_each_input_s_task(base, experts, classnames, tokenizer, storage, normalization):
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer, **FORMATS[storage],
                       router={"normalization": normalization})  # fmt: skip
    streams = clip_streams(list(classnames))
    assert (routing_accuracy(model, streams, list(classnames)) == 0).all()  # every expert alike: no winner
    adapted = adapt_task_routing(model, streams)
    assert (routing_accuracy(adapted, streams, list(classnames)) >= 0.95).all()


def test_clip_inputs_of_a_task_without_an_expert_route_to_the_base(base, experts, classnames, tokenizer):
    tasks = [*classnames, "pets"]
    model = merge_clip(base, experts, {**classnames, "pets": ["cat", "dog"]}, tokenizer=tokenizer, tasks=tasks)
    streams = clip_streams(tasks)
    pets = streams["pets"].batch(99, 3, 0, 0, 1)
    with torch.no_grad():
        before = streams["pets"].outputs(model, pets, routing=True).routing[0][0]
    adapted = adapt_task_routing(model, streams, steps=120)
    with torch.no_grad():
        routing = streams["pets"].outputs(adapted, pets, routing=True).routing
    assert before.numpy() == pytest.approx(0.3)  # init_lambda: task arithmetic
    magnitude = torch.stack([weights.abs().mean() for weights, _ in routing])
    assert (magnitude < 0.05).all(), magnitude  # from 0.3 for every expert
    assert (routing_accuracy(adapted, streams, list(classnames)) >= 0.95).all()


@pytest.mark.parametrize("storage", list(FORMATS))
def test_bert_routers_learn_each_input_s_task(storage):
    base = build_toy_bert_base()
    experts = {task: build_toy_bert_expert(base, task, seed=i + 1) for i, task in enumerate(TASK_LABELS)}
    model = merge_bert(base, experts, **FORMATS[storage])
    vocab = range(5, base.config.vocab_size)
    streams = {task: SyntheticStream(TextClassificationStream, task, token_draw(i, len(experts), vocab)).stream
               for i, task in enumerate(experts)}  # fmt: skip
    adapted = adapt_task_routing(model, streams)
    assert (routing_accuracy(adapted, streams, list(experts)) >= 0.95).all()


@pytest.mark.parametrize("decoder_routing", ["token", "prompt"])
@pytest.mark.parametrize("storage", list(FORMATS))
def test_t5_encoder_and_decoder_routers_learn_each_input_s_task(storage, decoder_routing):
    base = build_toy_t5_base()
    experts = {task: build_toy_t5_expert(base, seed=i + 1) for i, task in enumerate(["sst2", "topic", "nli"])}
    model = merge_t5(base, experts, **FORMATS[storage], router={"decoder_routing": decoder_routing})
    vocab = range(3, base.config.vocab_size)
    streams = {
        task: SyntheticStream(TextTaskStream, task, token_draw(i, len(experts), vocab), label_ids=None,
                              objective=LABEL_WORDS).stream
        for i, task in enumerate(experts)
    }  # fmt: skip
    encoder_layers = base.config.num_layers
    before = routing_accuracy(model, streams, list(experts))
    assert len(before) == encoder_layers + base.config.num_decoder_layers and (before == 0).all()
    adapted = adapt_task_routing(model, streams, steps=200)
    accuracy = routing_accuracy(adapted, streams, list(experts))
    assert (accuracy[:encoder_layers] >= 0.9).all()
    # Per prompt, the decoder's routers read the pooled encoder output: as separable as the encoder's. Per token, the
    # first decoding step sees the prompt only through cross-attention, which in a random toy T5 carries little of
    # it: well above chance (1/3), not all.
    assert (accuracy[encoder_layers:] >= (0.9 if decoder_routing == "prompt" else 0.5)).all()


# Through wemoe-tta ---------------------------------------------------------------------------------------------


def test_wemoe_tta_records_the_objective_and_resumes_only_the_same_run(artifact, task_data, tmp_path, capsys):
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(task_data))
    output = tmp_path / "adapted"
    # Task routing: the default objective.
    run = [str(artifact), str(data), "--output", str(output), "--lr", "0.001", "--batch-size", "4",
           "--checkpointing-steps", "1"]  # fmt: skip
    tta_main([*run, "--entropy-weight", "0.5", "--steps", "2"])
    record = yaml.safe_load((output / "merge_config.yaml").read_text())["adaptation"]
    assert (record["objective"], record["entropy_weight"], record["lr"]) == ("task-routing", 0.5, 0.001)
    assert record["final_loss"] > 0 and record["final_loss_steps"] == 2 and "final_entropy" not in record
    card = (output / "README.md").read_text()
    assert "| objective | task-routing |" in card and "| entropy weight | 0.5 |" in card
    assert "to send each input of a task's unlabeled data to that task's expert" in card

    with pytest.raises(SystemExit):
        tta_main([*run, "--entropy-weight", "0.1", "--steps", "3", "--resume", "--overwrite"])
    assert "entropy_weight: checkpoint 0.5, this run 0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tta_main([*run, "--objective", "label-words", "--steps", "3", "--resume", "--overwrite"])
    assert "objective: checkpoint 'task-routing', this run 'label-words'" in capsys.readouterr().err


def test_wemoe_tta_adapts_by_task_routing_at_its_own_rate_unless_told_otherwise(artifact, task_data, tmp_path):
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(task_data))
    for objective, lr in ((None, 3e-3), ("label-words", 1e-4)):
        output = tmp_path / str(objective)
        chosen = ["--objective", objective] if objective else []
        tta_main([str(artifact), str(data), "--output", str(output), "--batch-size", "4", "--steps", "1", *chosen])
        record = yaml.safe_load((output / "merge_config.yaml").read_text())["adaptation"]
        assert (record["objective"], record["lr"]) == (objective or "task-routing", lr)


def test_the_entropy_weight_is_refused_with_an_entropy_objective(artifact, task_data, tmp_path, capsys):
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(task_data))
    with pytest.raises(SystemExit):
        tta_main([str(artifact), str(data), "--output", str(tmp_path / "out"), "--objective", "label-words",
                  "--entropy-weight", "1"])  # fmt: skip
    assert "--entropy-weight adds the paper's entropy to the task-routing objective" in capsys.readouterr().err


def test_without_gradients_through_the_experts_each_router_learns_from_its_own_inputs(
    base, experts, classnames, tokenizer
):
    """A loss on the last layer's routing reaches the first layer's router through the experts (the default, which an
    objective on the predictions needs), and does not once they take the routing weights as constants (task routing
    alone, which then trains at inference cost); `adapt` sets it for its loss and restores the default."""
    model = merge_clip(base, experts, classnames, tokenizer=tokenizer)
    with torch.no_grad():
        randomize_routers(model)
    pixels = image_draw(0)(torch.Generator().manual_seed(0))["pixel_values"]
    first_router = model.vision_model.encoder.layers[0].mlp.router.fc2.weight

    def first_router_gradient(through_experts: bool) -> torch.Tensor:
        model.zero_grad()
        model.route_gradients_through_experts(through_experts)
        model(pixel_values=pixels, output_routing_weights=True).routing_weights[-1].sum().backward()
        return first_router.grad

    assert first_router_gradient(True).abs().sum() > 0
    assert first_router_gradient(False) is None or first_router_gradient(False).abs().sum() == 0
    adapt_task_routing(model, clip_streams(list(classnames)), steps=1)
    assert all(module.routing_gradients for module in model.modules() if hasattr(module, "routing_gradients"))
