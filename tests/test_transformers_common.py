"""transformers' own model test suite, `ModelTesterMixin`, run against every WEMoE model class: the behaviour a
transformers user expects of any model (output_attentions / output_hidden_states, return_dict=False, embeddings
accessors, save/load, dtype moves, gradient checkpointing, training, init of missing weights, ...).

The suite is read from the sdist of the installed transformers version (`transformers_common_suite.py`), so each CI
pass runs the suite of the version it installed. Skips kept here are the ones that do not apply to WEMoE; each is a
class attribute with its reason.
"""

import os
import re
import tempfile
import unittest
from functools import cached_property
from unittest import mock

import pytest
import torch
from torch import nn
from toy_bert import TASK_LABELS, build_toy_bert_base, build_toy_bert_expert
from toy_t5 import build_toy_t5_base, build_toy_t5_expert
from transformers_common_suite import load_common_tests

from modeling_wemoe import WEMoEForConditionalGeneration, WEMoEForImageClassification, WEMoEForSequenceClassification
from modeling_wemoe.modeling_wemoe import WEMoEDenseTaskVectors, WEMoELinear
from wemoe import merge_bert, merge_clip, merge_t5
from wemoe.toy import build_toy_base, build_toy_expert, toy_tokenizer

try:
    common = load_common_tests()
except OSError as error:  # no PyPI: the only reason to skip, and not one in CI, where PyPI is reachable
    if os.environ.get("CI"):
        raise
    pytest.skip(f"transformers' test suite could not be fetched from PyPI: {error}", allow_module_level=True)

ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor
CLIP_CLASSES = {"shapes": ["circle", "square", "triangle"], "colors": ["red", "green", "blue", "yellow"]}


class WEMoETester:
    """What `ModelTesterMixin` reads of a model tester: the config (from a real merge of tiny experts), sizes, and
    inputs for the common tests."""

    batch_size = 2
    is_training = True

    def __init__(self, parent, config):
        self.parent, self.config = parent, config
        backbone_config = config.vision_config or config.text_config
        self.num_hidden_layers = getattr(backbone_config, "num_hidden_layers", None) or backbone_config.num_layers
        self.hidden_size = getattr(backbone_config, "hidden_size", None) or backbone_config.d_model
        self.num_attention_heads = getattr(backbone_config, "num_attention_heads", None) or backbone_config.num_heads

    def get_config(self):
        """The config as `from_pretrained` reads it from config.json: a fresh copy, with no attention implementation
        fixed yet (the merged model's config carries the one it was built with)."""
        return type(self.config).from_dict(self.config.to_dict())

    def prepare_config_and_inputs_for_common(self):
        return self.get_config(), self.inputs()


class CLIPTester(WEMoETester):
    image_size, patch_size = 32, 8
    seq_length = (32 // 8) ** 2 + 1  # patches and the class token

    def inputs(self):
        return {"pixel_values": floats_tensor([self.batch_size, 3, self.image_size, self.image_size])}

    @cached_property
    def labels(self):
        return ids_tensor([self.batch_size], sum(map(len, CLIP_CLASSES.values())))

    def inputs_wanting_gradients(self):
        return {"pixel_values": self.inputs()["pixel_values"].requires_grad_()}


class BertTester(WEMoETester):
    seq_length = 7

    def inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.config.text_config.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -2:] = 0  # padding: routing and attention skip it
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @cached_property
    def labels(self):
        return ids_tensor([self.batch_size], sum(map(len, self.config.task_labels.values())))

    def inputs_wanting_gradients(self):
        embeds = floats_tensor([self.batch_size, self.seq_length, self.hidden_size]).requires_grad_()
        return {"inputs_embeds": embeds, "attention_mask": self.inputs()["attention_mask"]}


class T5Tester(WEMoETester):
    seq_length = encoder_seq_length = 7
    decoder_seq_length = 5

    def inputs(self):
        vocab = self.config.text_config.vocab_size
        input_ids = ids_tensor([self.batch_size, self.seq_length], vocab)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "decoder_input_ids": ids_tensor([self.batch_size, self.decoder_seq_length], vocab),
        }

    @cached_property
    def labels(self):
        return ids_tensor([self.batch_size, self.decoder_seq_length], self.config.text_config.vocab_size)

    def inputs_wanting_gradients(self):
        return {
            "inputs_embeds": floats_tensor([self.batch_size, self.seq_length, self.hidden_size]).requires_grad_(),
            "decoder_inputs_embeds": floats_tensor(
                [self.batch_size, self.decoder_seq_length, self.hidden_size]
            ).requires_grad_(),
        }


# The common tests that do not apply to WEMoE, each with why (the suite skips them by itself too; declaring them
# keeps the list in one place). Skips for missing hardware or optional libraries (accelerators, flash attention,
# deepspeed, kernels, MPS) are the suite's own and are not repeated here.
NOT_APPLICABLE = {
    "test_attn_implementation_composite_models": "one model, not a composite of PreTrainedModels",
    "test_sdpa_can_dispatch_composite_models": "one model, not a composite; test_can_set_attention_dynamically runs",
    "test_can_set_attention_dynamically_composite_model": "one model, not a composite of PreTrainedModels",
    "test_can_capture_specific_layers_hidden_states": "explicit forward passes (no output-capturing decorator)",
    "test_capture_outputs_decorator": "explicit forward passes (no output-capturing decorator)",
    "test_causal_lm_loss_honors_shift_labels": "no decoder-only language-model head",
    "test_eager_matches_batched_and_grouped_inference": "no grouped_mm experts: WEMoE mixes weights, not tokens",
    "test_moe_models_record_router_logits": "no sparse token experts; output_routing_weights returns the routing",
    "test_output_router_logits_from_config": "no sparse token experts; output_routing_weights returns the routing",
    "test_model_rope_scaling_frequencies": "no rotary position embeddings",
    "test_model_rope_scaling_from_config": "no rotary position embeddings",
    "test_model_rope_with_partial_rotation": "no rotary position embeddings",
    "test_vision_axial_rope": "no rotary position embeddings",
    "test_resize_position_vector_embeddings": "position embeddings are not resizable (as in the CLIP/BERT/T5 bases)",
    "test_sliding_window_mask": "no sliding-window attention",
    "test_tp_plan_matches_params": "no tensor-parallel plan",
    "test_tied_head_has_a_tp_plan_entry": "no tensor-parallel plan",
    "test_keep_in_fp32_modules": "no module is kept in fp32",
    "test_keep_in_fp32_modules_exist": "no module is kept in fp32",
    "test_keep_in_fp32_modules_strict_also_hardcode_fp32": "no module is kept in fp32",
    "test_can_load_from_already_mapped_keys": "no checkpoint key conversion: the library writes WEMoE checkpoints",
    "test_reverse_loading_mapping": "no checkpoint key conversion: the library writes WEMoE checkpoints",
    "test_torch_save_load": "loaded through auto_map (trust_remote_code), not transformers' MODEL_MAPPING",
    "test_model_weights_reload_no_missing_tied_weights": "a checkpoint missing tensors is refused, naming them, not "
    "initialised at random (tests/test_failure_behaviour.py)",
    "test_can_init_all_missing_weights": "a checkpoint missing tensors is refused, naming them, not initialised at "
    "random (tests/test_failure_behaviour.py)",
    "test_enable_input_require_grads_with_gradient_checkpointing": "the embeddings are frozen (only routers train): "
    "no embedding gradient to compare",
}
ENCODER_ONLY = {
    "test_bc_cache_name_forward": "an encoder: no KV cache",
    "test_encoder_decoder_loss_no_double_shift": "a classifier: no sequence-to-sequence head",
}


def skip_not_applicable(test_class: type) -> type:
    """Class decorator: every test of `test_class.not_applicable` the suite defines becomes a skip with its reason
    (a name also covers its parametrised variants, `<name>_0_fp16`, ...)."""
    for name in dir(ModelTesterMixin):
        reason = test_class.not_applicable.get(re.sub(r"(_\d+\w*)$", "", name))
        if reason is not None:
            setattr(test_class, name, unittest.skip(reason)(lambda self: None))
    return test_class


class WEMoECommonTests(ModelTesterMixin):
    """The common suite, with labels for the training tests (WEMoE classes are in no transformers auto mapping,
    from which the suite would derive them)."""

    model_tester_class: type = WEMoETester
    not_applicable = NOT_APPLICABLE

    def setUp(self):
        self.model_tester = self.model_tester_class(self, self.merged_config())

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=False)
        if return_labels:
            inputs_dict["labels"] = self.model_tester.labels  # the same labels each call: outputs are compared
        return inputs_dict

    def test_load_contiguous_weights(self):
        """The suite's check that loading leaves every parameter in the contiguous layout it was saved in, but for
        the one WEMoE lays out on purpose: dense task vectors of a matrix tiled by input columns are held transposed
        under W0 at load (`WEMoEDenseTaskVectors.stack_under`), a view with the transpose's strides. Those must be
        exactly that view, every other parameter contiguous, and the state dict (what savers read) contiguous."""
        for model_class in self.all_model_classes:
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            model = model_class(config)
            self.assertTrue(all(param.is_contiguous() for param in model.parameters()))
            with tempfile.TemporaryDirectory() as directory:
                model.save_pretrained(directory)
                model = model_class.from_pretrained(directory)
            held_transposed = set()
            for linear in model.modules():
                store = getattr(linear, "weight_task_vectors", None)
                if isinstance(linear, WEMoELinear) and isinstance(store, WEMoEDenseTaskVectors):
                    if store.goes_by_columns():
                        self.assertTrue(store.is_stacked_under(linear.weight))
                        self.assertTrue(store.values.transpose(-1, -2).is_contiguous())
                        held_transposed.add(id(store.values))
            self.assertTrue(held_transposed)
            others = [param for param in model.parameters() if id(param) not in held_transposed]
            self.assertTrue(all(param.is_contiguous() for param in others))
            self.assertTrue(all(tensor.is_contiguous() for tensor in model.state_dict().values()))

    def _prepare_config_and_inputs_for_retain_grad_hidden_states_attentions(self):
        """Only the routers train, so the embeddings' output (the first hidden state) gets a gradient only from an
        input that wants one; every later hidden state and attention must pass it on."""
        return self.model_tester.get_config(), self.model_tester.inputs_wanting_gradients()


@skip_not_applicable
class WEMoEForImageClassificationCommonTest(WEMoECommonTests, unittest.TestCase):
    all_model_classes = (WEMoEForImageClassification,)
    model_tester_class = CLIPTester
    not_applicable = {
        **NOT_APPLICABLE,
        **ENCODER_ONLY,
        "test_resize_embeddings_untied": "pixels in: no vocabulary to resize",
        "test_resize_tokens_embeddings": "pixels in: no vocabulary to resize",
        "test_inputs_embeds": "pixels in: no input ids to replace by embeddings",
    }

    def test_model_get_set_embeddings(self):
        """As transformers' CLIP vision tests: the input embedding is the patch convolution, not an `nn.Embedding`."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            self.assertIsNone(model.get_output_embeddings())

    @staticmethod
    def merged_config():
        base = build_toy_base(seed=0)
        experts = {task: build_toy_expert(base, seed=i + 1) for i, task in enumerate(CLIP_CLASSES)}
        return merge_clip(base, experts, CLIP_CLASSES, tokenizer=toy_tokenizer()).config


@skip_not_applicable
class WEMoEForSequenceClassificationCommonTest(WEMoECommonTests, unittest.TestCase):
    all_model_classes = (WEMoEForSequenceClassification,)
    model_tester_class = BertTester
    not_applicable = {**NOT_APPLICABLE, **ENCODER_ONLY}

    @staticmethod
    def merged_config():
        base = build_toy_bert_base()
        experts = {task: build_toy_bert_expert(base, task, seed=i + 1) for i, task in enumerate(TASK_LABELS)}
        return merge_bert(base, experts).config


@skip_not_applicable
class WEMoEForConditionalGenerationCommonTest(WEMoECommonTests, unittest.TestCase):
    all_model_classes = (WEMoEForConditionalGeneration,)
    model_tester_class = T5Tester
    is_encoder_decoder = True
    # `generate` is tested in tests/test_t5.py (greedy and beam, with and without the cache, against task arithmetic):
    # the suite's GenerationTesterMixin is in generation/test_utils.py, which the sdist does not ship.
    all_generative_model_classes = ()
    not_applicable = {
        **NOT_APPLICABLE,
        "test_model_base_model_prefix": "like T5ForConditionalGeneration (and MT5's tests): no base model without "
        "the head",
    }

    def test_encoder_decoder_loss_no_double_shift(self):
        """The suite finds seq2seq LM heads by class name in transformers' auto mappings, where WEMoE (loaded by
        auto_map) is not: it is listed there for this test."""
        mapping = common.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        with mock.patch.dict(mapping, {"wemoe": WEMoEForConditionalGeneration.__name__}):
            super().test_encoder_decoder_loss_no_double_shift()

    @staticmethod
    def merged_config():
        base = build_toy_t5_base(num_decoder_layers=None)  # the suite expects as many decoder layers
        experts = {task: build_toy_t5_expert(base, seed=i + 1) for i, task in enumerate(("movies", "topics"))}
        return merge_t5(base, experts).config
