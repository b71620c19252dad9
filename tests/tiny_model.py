"""A tiny stand-in for a pretrained model, built offline: a random 2-layer Llama (hidden
64, 4 heads, 2 kv heads, 256 positions) and a byte-level BPE tokenizer trained on a few
lines of Paradise Lost, saved as a checkpoint directory with ``save_pretrained``."""

from __future__ import annotations

import torch

LINES = [
    "Of Mans First Disobedience, and the Fruit",
    "Of that Forbidden Tree, whose mortal tast",
    "Brought Death into the World, and all our woe,",
    "With loss of EDEN, till one greater Man",
    "Restore us, and regain the blissful Seat,",
]
TEXT = "\n".join(LINES * 8) + "\n"
SPECIALS = ["<|endoftext|>", "<s>", "</s>"]


def bpe_tokenizer():
    """A byte-level BPE (GPT-2 style, round-trips any text), 300 tokens, trained on LINES."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(LINES * 3, trainer)
    return tok


def tiny_config(vocab_size, **overrides):
    import transformers

    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


def save_tiny_checkpoint(path, **overrides):
    """Write the tiny model and its tokenizer into the directory ``path``; returns it."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok.get_vocab_size(), **overrides))
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<|endoftext|>").save_pretrained(path)
    return path
