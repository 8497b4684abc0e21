"""A tiny megatron-core SoloGPTModel (hidden 64, 2 layers, vocabulary 128) and hand-built packed documents
for it. Build models inside the `megatron_world` fixture (conftest.py)."""

import numpy as np
import torch

from megatron_patch import compat

compat.apply()

from megatron_patch.config import Config, ModelConfig  # noqa: E402
from megatron_patch.data import SyntheticImageTask, packed_seq_params  # noqa: E402
from megatron_patch.model import SoloGPTModel, build_transformer_config, solo_layer_spec  # noqa: E402

VOCAB = 128
PAD = 0
VPATCH = SyntheticImageTask.VPATCH


def tiny_config(sliding_window=None) -> Config:
    cfg = Config(
        model=ModelConfig(
            num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            vocab_size=VOCAB, sliding_window=sliding_window, backend="local",
        )
    )
    cfg.training.bf16 = False
    cfg.training.recompute = "none"
    return cfg


def tiny_model(sliding_window=None) -> SoloGPTModel:
    cfg = tiny_config(sliding_window)
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    torch.manual_seed(0)
    return SoloGPTModel(tc, solo_layer_spec("local"), VOCAB, 256, 10000.0).eval()


def image_document(rng, rows, cols, first_patch):
    """tokens, loss_mask, vision_patch_indices, patches of one image+caption document."""
    tokens, vpi, patches = [1, 3], [-1, -1], []
    for r in range(rows):
        for _ in range(cols):
            tokens.append(VPATCH)
            vpi.append(first_patch + len(patches))
            patches.append(rng.integers(0, 256, 3072, dtype=np.uint8))
        if r < rows - 1:
            tokens.append(5)
            vpi.append(-1)
    caption = list(rng.integers(32, VOCAB, 5))
    tokens += [6] + caption + [2]
    vpi += [-1] * (len(caption) + 2)
    loss = [0] * (len(tokens) - len(caption) - 1) + [1] * (len(caption) + 1)
    return tokens, loss, vpi, patches


def text_document(rng, n):
    tokens = [1] + list(rng.integers(32, VOCAB, n)) + [2]
    return tokens, [0] + [1] * (n + 1), [-1] * (n + 2), []


def make_pack(docs):
    """Fake PackedReader item from documents (patch indices re-based onto the pack)."""
    tokens, loss, vpi, patches, cu = [], [], [], [], [0]
    for t, m, v, p in docs:
        base = len(patches)
        tokens += t
        loss += m
        vpi += [x + base if x >= 0 else -1 for x in v]
        patches += p
        cu.append(len(tokens))
    return dict(
        tokens=np.asarray(tokens, np.int32), loss_mask=np.asarray(loss, np.uint8),
        cu_seqlens=np.asarray(cu, np.int32), patches=np.asarray(patches, np.uint8).reshape(-1, 3072),
        vision_patch_indices=np.asarray(vpi, np.int64),
    )


def per_token_losses(model, batch):
    return model(
        input_ids=batch["tokens"], labels=batch["labels"], packed_seq_params=packed_seq_params(batch),
        patches=batch["patches"], vision_patch_indices=batch["vision_patch_indices"],
    )[0]


def documents(seed=0):
    rng = np.random.default_rng(seed)
    return [
        image_document(rng, 2, 3, 0), text_document(rng, 9), image_document(rng, 1, 2, 0),
        text_document(rng, 4), image_document(rng, 3, 2, 0),
    ]
