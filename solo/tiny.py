"""Tiny, fully local stand-ins for a Mistral-class base checkpoint (tests and the demo).

No model or tokenizer can be downloaded at run time, so these build a byte-level tokenizer with
exactly 32,000 entries (the Llama/Mistral vocabulary size, so SOLO-7B's token ids are reproduced)
and a small random Mistral model, saved the way a real Hugging Face checkpoint is.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

BASE_VOCAB_SIZE = 32000


def make_base_tokenizer(vocab_size: int = BASE_VOCAB_SIZE, extra_texts: Sequence[str] = ()):
    """A byte-level BPE tokenizer with `<unk>`, `<s>`, `</s>` at ids 0, 1, 2 and `vocab_size` entries.

    Every byte has its own token and a few hundred common English merges are learned from a
    built-in text (plus `extra_texts`, e.g. a task's words, so they become whole tokens), so real
    sentences tokenise and decode losslessly; the rest of the ids are filler entries that mimic
    the size of a Llama/Mistral vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "a photo of a cat sitting on a red sofa next to the window",
        "the quick brown fox jumps over the lazy dog while the sun sets",
        "what is in the image? describe the picture in one sentence please",
        "there are two dogs playing in the park with a yellow ball and a child",
        "the answer is yes. the chart shows that sales grew in every quarter of the year",
    ] * 4 + list(extra_texts)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Fill the model vocabulary up to the Llama/Mistral size with inert entries (never produced:
    # they contain a character outside the byte-level alphabet and take part in no merge).
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for index in range(vocab_size - len(vocab)):
        vocab[f"\u2400filler{index}"] = len(vocab)
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tokenizer.get_vocab_size()} entries, expected {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=False
    )


def make_base_checkpoint(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    sliding_window: int | None = 4096,
    architecture: str = "mistral",
    seed: int = 0,
    vocab_size: int = BASE_VOCAB_SIZE,
    extra_texts: Sequence[str] = (),
) -> str:
    """Save a tiny random Mistral (or Llama) checkpoint plus its tokenizer to `out_dir`.

    The tokenizer has 32,000 entries by default (SOLO-7B's token ids); a smaller `vocab_size` (at
    least 600, the learned byte-level entries) makes the output layer, which dominates the cost of
    a tiny model, proportionally cheaper. `extra_texts` join the tokenizer's training text.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    tokenizer = make_base_tokenizer(vocab_size, extra_texts)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    if architecture == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    elif architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown tiny architecture {architecture!r}; use 'mistral' or 'llama'")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return os.fspath(out_dir)
