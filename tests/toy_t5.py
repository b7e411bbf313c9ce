"""Tiny random T5 models and a word-level tokenizer built in-process: the T5 tests' fixtures (nothing downloaded).

Experts are the base plus seeded random perturbations: the structure of real fine-tunes, not their skill.
"""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from wemoe.backbones.t5 import lm_head_is_tied
from wemoe.toy import perturb_

TOY_WORDS = (
    "sst2 sentence topic question premise hypothesis : . , ! ? "
    "positive negative neutral entailment contradiction yes no duplicate not_duplicate "
    "sports science food music politics computers "
    "a an the this that it is was are be not very really quite movie film book song team game match player "
    "good great bad awful boring fun funny dull brilliant terrible nice lovely "
    "i you we they he she love hate like liked loved hated enjoyed and or but of in on at to for with "
    "ball goal win lost atom cell physics bread cheese soup guitar piano vote law code computer"
).split()
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5


def toy_t5_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (punctuation split off, `</s>` appended) over `TOY_WORDS` and `extra_words`, T5's
    special-token ids."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(dict.fromkeys([*TOY_WORDS, *extra_words])))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def toy_t5_config(
    gated: bool = True,
    tied: bool = False,
    num_layers: int = 2,
    num_decoder_layers: int | None = 3,
    vocab_size: int | None = None,
) -> T5Config:
    """Flan-T5 style (gated-gelu, own lm_head, unscaled decoder output) or original T5 (relu, tied, scaled);
    encoder and decoder depths may differ; the vocabulary is `toy_t5_tokenizer()`'s unless `vocab_size` says."""
    return T5Config(
        tie_word_embeddings=tied,
        vocab_size=vocab_size or len(toy_t5_tokenizer()),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers,
        num_heads=4,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


@torch.no_grad()
def build_toy_t5_base(
    seed: int = 0, gated: bool = True, tied: bool = False, **config_kwargs
) -> T5ForConditionalGeneration:
    """A random T5; `tied=False` gives it its own lm_head, as Flan-T5 has."""
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(toy_t5_config(gated=gated, tied=tied, **config_kwargs))
    if not tied:
        model.lm_head.weight = nn.Parameter(torch.randn_like(model.shared.weight) * model.config.d_model**-0.5)
    return model.eval()


@torch.no_grad()
def build_toy_t5_expert(base: T5ForConditionalGeneration, seed: int, scale: float = 0.1) -> T5ForConditionalGeneration:
    """A "fine-tuned" copy of `base` (same tying): every tensor plus seeded noise proportional to its spread."""
    expert = T5ForConditionalGeneration(base.config)
    if expert.lm_head.weight.data_ptr() == expert.shared.weight.data_ptr() and not lm_head_is_tied(base):
        expert.lm_head.weight = nn.Parameter(torch.empty_like(base.lm_head.weight))
    expert.load_state_dict(base.state_dict())
    return perturb_(expert, seed, scale).eval()
