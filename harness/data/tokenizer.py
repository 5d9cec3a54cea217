"""The word-level tokenizer of the shipped tiny models: every synthetic word and number 0..99 is
one token, so the arithmetic is a lookup the tiny models can learn on a CPU."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from harness.data.problems import synthetic_vocabulary

EOS, UNK = "<eos>", "<unk>"


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """Base vocabulary V = specials + synthetic words; CODI's pad/bot/eot are ids V..V+2."""
    vocab = {tok: i for i, tok in enumerate([EOS, UNK, *synthetic_vocabulary()])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, unk_token=UNK)
