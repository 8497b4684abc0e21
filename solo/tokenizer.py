"""Extend a base Hugging Face tokenizer with SOLO's vision tokens, pad token and chat template."""

from __future__ import annotations

from transformers import AddedToken, PreTrainedTokenizerBase

from solo.hf.processing_solo import CHAT_TEMPLATE, VISION_TOKENS, non_special_solo_tokens


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the vision and location tokens, a pad token distinct from EOS, and the chat template.

    The tokens are appended in SOLO-7B's order (`<vision>`, `<vpatch>`, `<vrow_sep>`,
    `<vframe_sep>`, `</vision>`, `<loc_1>`..`<loc_1024>`), so a 32,000-entry Llama/Mistral base
    yields SOLO-7B's ids (32000..33028, size 33,029). Other bases get them appended after their
    last id. Pad: the base's pad if it is not EOS, else `<unk>` (never seen in byte-fallback text,
    keeps the 33,029 layout of the released checkpoint), else a new `<pad>` token.
    Idempotent: an already-extended tokenizer is returned unchanged (after checking its ids). SOLO
    tokens it holds as ordinary tokens are made special (`non_special_solo_tokens`: text must never
    produce their ids). Raises ValueError for a tokenizer that cannot be extended.
    """
    if tokenizer.eos_token is None or tokenizer.bos_token is None:
        raise ValueError("the base tokenizer must define bos_token and eos_token (Llama/Mistral style)")
    vocab = tokenizer.get_vocab()
    present = [token for token in VISION_TOKENS if token in vocab]
    if present:
        if len(present) != len(VISION_TOKENS):
            raise ValueError(
                f"tokenizer already has {len(present)} of the {len(VISION_TOKENS)} SOLO vision tokens "
                f"(e.g. {present[0]!r}); start from the base tokenizer instead"
            )
        ids = [vocab[token] for token in VISION_TOKENS]
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError("tokenizer has the SOLO vision tokens but not at consecutive ids in SOLO's order; "
                             "rebuild it from the base")
        ordinary = set(non_special_solo_tokens(tokenizer))
        if ordinary:
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in VISION_TOKENS
                                  if token in ordinary], special_tokens=True)
            if non_special_solo_tokens(tokenizer) or [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS] != ids:
                raise ValueError("tokenizer holds the SOLO tokens as ordinary tokens and they could not be made "
                                 "special; rebuild it from the base")
    else:
        start = len(tokenizer)
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in VISION_TOKENS],
                             special_tokens=True)
        first = tokenizer.convert_tokens_to_ids(VISION_TOKENS[0])
        if first != start:
            raise RuntimeError(f"vision tokens were added at id {first}, expected {start}")

    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # generation pads on the left; training code sets its own
    return tokenizer
