"""Tiny random BERT classifiers and a word-level BERT tokenizer built in-process: the BERT tests' fixtures.

Experts are the base encoder plus seeded random perturbations, each with its own pooler and classifier and named
classes: the structure of real fine-tunes, not their skill.
"""

import copy

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

from wemoe.toy import perturb_

TOY_WORDS = (
    "a an the this that it is was are be not very really movie film book song team game match player good great "
    "bad awful boring fun dull brilliant terrible nice i you we they love hate like and or but of in on to for "
    "with ball goal win lost atom cell physics bread cheese soup guitar piano vote law code computer"
).split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TASK_LABELS = {
    "sentiment": ["negative", "positive"],
    "topic": ["sports", "science", "food"],
    "formality": ["casual", "formal"],
}


def toy_bert_tokenizer() -> BertTokenizer:
    """A BERT WordPiece tokenizer over whole `TOY_WORDS` (lower-cased, `[CLS] ... [SEP]`)."""
    return BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL_TOKENS + TOY_WORDS)})


def toy_bert_config(**overrides) -> BertConfig:
    fields = {
        "vocab_size": len(SPECIAL_TOKENS) + len(TOY_WORDS),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    return BertConfig(**{**fields, **overrides})


def build_toy_bert_base(seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(toy_bert_config(**overrides)).eval()


@torch.no_grad()
def build_toy_bert_expert(base: BertModel, task: str, seed: int, scale: float = 0.1) -> BertForSequenceClassification:
    """A "fine-tuned" classifier for `task`: the base encoder and pooler plus seeded noise, and a random classifier
    over the task's classes (named in its `id2label`)."""
    labels = TASK_LABELS[task]
    config = copy.deepcopy(base.config)
    config.id2label, config.label2id = dict(enumerate(labels)), {label: i for i, label in enumerate(labels)}
    expert = BertForSequenceClassification(config)
    expert.bert.load_state_dict(base.state_dict())
    perturb_(expert.bert, seed, scale)
    generator = torch.Generator().manual_seed(seed + 1000)
    expert.classifier.weight = nn.Parameter(torch.randn(expert.classifier.weight.shape, generator=generator))
    expert.classifier.bias = nn.Parameter(torch.randn(expert.classifier.bias.shape, generator=generator))
    return expert.eval()
