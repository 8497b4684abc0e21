"""Hugging Face SOLO <-> megatron-core ``torch_dist`` checkpoints, streaming, through one mapping table.

* :func:`convert_hf_to_mcore`: a SOLO HF directory (``solo create`` output, an export, or the
  released SOLO-7B layout) -> a checkpoint directory laid out like a training ``SAVE_DIR``
  (``iter_0000000/`` + ``latest_checkpointed_iteration.txt``) with the tokenizer/processor in
  ``tokenizer/`` and the model config in the checkpoint. ``torch_dist`` stores global tensors, so
  training loads it (``checkpoint.init_from``) at any TP/PP/DP; the vocabulary padding of the
  loading run may differ (``checkpointing.load_init_weights`` pads/trims the rows).
* :func:`convert_mcore_to_hf`: a checkpoint written at any TP/PP (training's or the above) -> sharded
  safetensors + config + tokenizer + processor, native or SOLO-7B layout, in the checkpoint's dtype.

Memory: HF -> megatron-core reads one HF tensor at a time and holds the converted model once (the
dist-checkpoint writer takes one state dict); megatron-core -> HF reads one layer at a time and holds
at most one output shard. Runs in one process (a private gloo group of one when none exists).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch

from megatron_patch.config import ARCH_DEFAULTS, ARCH_FIELDS, padded_vocab_size
from megatron_patch.model.state_dict_mapping import MAPPINGS, Architecture, expected_shapes
from solo.checkpoints import (
    LATEST_FILE,
    TOKENIZER_DIR,
    CheckpointError,
    CheckpointReader,
    iteration_dir,
    resolve_checkpoint_dir,
    write_complete_marker,
)
from solo.hf_checkpoint import (
    HFWeights,
    ShardWriter,
    check_weight_shapes,
    iter_layers,
    read_solo_config,
    write_config,
    write_processor,
)
from solo.outputs import atomic_output_dir, write_text_atomic
from solo.processes import free_local_port

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A gloo process group of one for megatron-core's dist-checkpointing, unless one exists
    (and the CPU redirects megatron-core needs when CUDA is absent)."""
    import torch.distributed as dist

    from megatron_patch import compat

    compat.apply()
    if dist.is_initialized():
        yield
        return
    store = dist.TCPStore("127.0.0.1", free_local_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# HF -> megatron-core
# ----------------------------------------------------------------------------------------------


def model_config_from_hf(config: Dict[str, Any], vocab_size: int, divisible_by: int) -> Dict[str, Any]:
    """The training recipe's ``model`` section (architecture fields) for an HF SOLO config."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise CheckpointError(
            f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}: megatron-core's "
            "SOLO model uses head_dim = hidden_size / num_attention_heads"
        )
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{flag}=true is not supported: SOLO layers have no biases")
    return dict(
        num_layers=config["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=vocab_size, rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        # config.json holds SOLO-7B's number (earlier tokens seen), which is ModelConfig's meaning too.
        sliding_window=config.get("sliding_window"),
        **{field: config.get(field, default) for field, default in ARCH_DEFAULTS.items()},
        make_vocab_size_divisible_by=divisible_by,
    )


def hf_architecture_config(model_cfg: Dict[str, Any], arch: Architecture) -> Dict[str, Any]:
    """The config.json architecture fields of a megatron-core model config (the export's)."""
    return dict(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.head_dim,
        rms_norm_eps=model_cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg["rope_theta"]},
        sliding_window=model_cfg.get("sliding_window"), tie_word_embeddings=False,
        **{field: model_cfg.get(field, default) for field, default in ARCH_DEFAULTS.items()},
    )


def architecture(model_cfg: Dict[str, Any]) -> Architecture:
    return Architecture(**{f.name: model_cfg[f.name] for f in dataclasses.fields(Architecture)})


def convert_hf_to_mcore(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, divisible_by: int = 128,
    dtype: Optional[str] = None, overwrite: bool = False,
) -> Path:
    """Write the megatron-core checkpoint of the HF SOLO model in ``hf_dir`` to ``out_dir`` (atomic)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from solo.hf.image_processing_solo import PATCH_DIM

    config = read_solo_config(hf_dir)
    weights = HFWeights(hf_dir)
    target_dtype = DTYPES[dtype] if dtype else None
    with atomic_output_dir(out_dir, command="solo convert hf-to-mcore", inputs=[hf_dir],
                           overwrite=overwrite) as staging:
        vocab = len(write_processor(hf_dir, staging / TOKENIZER_DIR, "native", config))
        check_weight_shapes(weights, config, hf_dir, vocab_rows=vocab)  # before anything sized by config.json
        model_cfg = model_config_from_hf(config, vocab, divisible_by)
        arch = architecture(model_cfg)
        rows = padded_vocab_size(vocab, divisible_by)
        sharded: Dict[str, Any] = {}
        for mapping in MAPPINGS:
            layers = iter_layers(arch.num_layers) if mapping.per_layer else [None]
            for layer in layers:
                hf_names = mapping.hf_names(layer)
                if mapping.mcore == "language_model.output_layer.weight" and hf_names[0] not in weights:
                    hf_names = ("model.embed_tokens.weight",)  # tied embeddings: the head is the embedding
                tensors = [weights.get(name) for name in hf_names]
                if target_dtype is not None:
                    tensors = [t.to(target_dtype) for t in tensors]
                try:
                    data = mapping.transform.to_mcore(tensors, arch, rows)
                except ValueError as error:
                    raise CheckpointError(f"{hf_dir}: {hf_names[0]} {error}") from error
                if layer is None:
                    sharded[mapping.mcore] = ShardedTensor.from_rank_offsets(mapping.mcore, data, replica_id=0)
                else:
                    sharded[f"{mapping.mcore}.{layer}"] = ShardedTensor.from_rank_offsets(
                        mapping.mcore, data, (0, layer, arch.num_layers), replica_id=0, prepend_axis_num=1
                    )
        state = {"model": sharded, "iteration": 0, "config": {"model": model_cfg}, "hf_config": config,
                 "patch_dim": PATCH_DIM}
        iter_dir = Path(iteration_dir(str(staging), 0))
        iter_dir.mkdir()
        with single_process_group():
            dist_checkpointing.save(state, str(iter_dir))
        write_complete_marker(str(iter_dir))  # what training's resume/init_from verification looks for
        write_text_atomic(staging / LATEST_FILE, "0")
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# megatron-core -> HF
# ----------------------------------------------------------------------------------------------


def convert_mcore_to_hf(
    ckpt: str | os.PathLike, out_dir: str | os.PathLike, *, iteration: Optional[int] = None,
    tokenizer_dir: Optional[str | os.PathLike] = None, dtype: Optional[str] = None, layout: str = "native",
    overwrite: bool = False, max_shard_bytes: Optional[int] = None,
) -> Path:
    """Export a megatron-core SOLO checkpoint (any TP/PP) as a Hugging Face directory (atomic)."""
    from megatron.core import dist_checkpointing

    iter_dir = Path(resolve_checkpoint_dir(ckpt, iteration))
    save_dir = iter_dir.parent
    try:
        common = dist_checkpointing.load_common_state_dict(str(iter_dir))
    except Exception as error:  # noqa: BLE001 - any unreadable common state means the same to the user
        raise CheckpointError(f"{iter_dir}: cannot read the checkpoint's common state ({error})") from error
    model_cfg = (common.get("config") or {}).get("model") if isinstance(common, dict) else None
    if model_cfg:
        model_cfg = {**ARCH_DEFAULTS, **model_cfg}
    if not model_cfg or any(model_cfg.get(f) is None for f in ARCH_FIELDS if f not in ("vocab_size", "sliding_window")):
        raise CheckpointError(f"{iter_dir} carries no SOLO model config: not a checkpoint of this stack's SOLO model")
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else save_dir / TOKENIZER_DIR
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"{save_dir} has no {TOKENIZER_DIR}/ beside its checkpoints; pass --tokenizer DIR")
    reader = CheckpointReader(iter_dir)
    inputs = [ckpt] + ([tokenizer_dir] if tokenizer_dir != save_dir / TOKENIZER_DIR else [])
    with atomic_output_dir(out_dir, command="solo convert mcore-to-hf", inputs=inputs, overwrite=overwrite) as staging:
        tokenizer = write_processor(tokenizer_dir, staging, layout)
        vocab = len(tokenizer)
        if model_cfg.get("vocab_size") not in (None, vocab):
            raise CheckpointError(
                f"the tokenizer in {tokenizer_dir} has {vocab} entries but the checkpoint was trained with "
                f"vocab_size {model_cfg['vocab_size']}; pass the tokenizer it was trained with (--tokenizer DIR)"
            )
        arch = architecture(dict(model_cfg, vocab_size=vocab))
        rows = (reader.shape(MAPPINGS[0].mcore) or (0,))[0]
        if rows < vocab:
            raise CheckpointError(f"{iter_dir}: the embedding has {rows} rows, "
                                  f"fewer than the tokenizer's {vocab} entries")
        patch_dim = (reader.shape("vision_patch_projection.weight") or (0, 0))[1]
        for key, shape in expected_shapes(arch, rows, patch_dim).items():
            found = reader.shape(key)
            if found != shape:
                raise CheckpointError(
                    f"{iter_dir}: tensor {key} is {'missing' if found is None else found}, expected "
                    f"{shape} from the checkpoint's model config; is this a checkpoint of another model?"
                )
        out_dtype = DTYPES[dtype] if dtype else reader.dtype(MAPPINGS[0].mcore)
        writer = ShardWriter(staging, **({"max_bytes": max_shard_bytes} if max_shard_bytes else {}))

        def export(mapping, layer=None):
            tensors = mapping.transform.to_hf(reader.read(mapping.mcore, layer), arch)
            for name, tensor in zip(mapping.hf_names(layer), tensors):
                writer.add(name, tensor.to(out_dtype).clone())

        for mapping in MAPPINGS:
            if not mapping.per_layer:
                export(mapping)
        for layer in iter_layers(arch.num_layers):
            for mapping in MAPPINGS:
                if mapping.per_layer:
                    export(mapping, layer)
        writer.finish()
        hf_config = dict(common.get("hf_config") or {})
        hf_config.update(hf_architecture_config(model_cfg, arch), dtype=str(out_dtype).replace("torch.", ""))
        hf_config.pop("rope_theta", None)
        hf_config.pop("torch_dtype", None)
        if patch_dim:
            patch_size = int(round((patch_dim // hf_config.get("num_channels", 3)) ** 0.5))
            hf_config.setdefault("vision_patch_size", patch_size)
        if "max_position_embeddings" not in hf_config:
            seq = ((common.get("config") or {}).get("data") or {}).get("seq_length")
            hf_config["max_position_embeddings"] = max(int(seq or 0), 32768)
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, field, None) is not None:
                hf_config[field] = getattr(tokenizer, field)
        write_config(hf_config, staging, layout)
    return Path(out_dir)
