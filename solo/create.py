"""`solo create`: turn a local Hugging Face Mistral/Llama checkpoint into a SOLO checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from solo.outputs import atomic_output_dir, check_output_dir

COMMAND = "solo create"
SUPPORTED_MODEL_TYPES = ("mistral", "llama")
PATCH_INIT_STD = 0.02
NEW_WEIGHT = "model.embed_vision_patch.weight"  # the one weight a base checkpoint cannot have


class CreateError(ValueError):
    """The base checkpoint cannot be turned into a SOLO checkpoint; the message says why and what to do."""


def _check_base(base: Path) -> dict:
    if not base.is_dir():
        raise CreateError(f"base checkpoint {base} is not a directory; pass a local Hugging Face model directory")
    config_path = base / "config.json"
    if not config_path.is_file():
        raise CreateError(f"{config_path} is missing; --base must be a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CreateError(f"{config_path} is not valid JSON ({error})") from error
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CreateError(
            f"{base}: unsupported architecture model_type={model_type!r} "
            f"(architectures={config.get('architectures')}); solo create supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any((base / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CreateError(f"{base} has no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files too")
    return config


def _check_weights(base: Path, config: dict) -> None:
    """The base's safetensors files are complete and match config.json, before any model is built
    (an absurd config would otherwise allocate first and fail later). Pickled ``.bin`` weights are
    never loaded: loading a pickle runs code."""
    from solo.checkpoints import CheckpointError
    from solo.hf_checkpoint import HFWeights, check_weight_shapes

    pickles = sorted(path.name for path in base.glob("*.bin"))
    if pickles and not any(base.glob("*.safetensors")):
        raise CreateError(f"{base} holds pickled weights ({pickles[0]}), which solo never loads (a pickle can run "
                          "code); re-save the checkpoint as safetensors (save_pretrained(safe_serialization=True)) "
                          "where you trust it")
    try:
        check_weight_shapes(HFWeights(base), config, base, vision=False)
    except CheckpointError as error:
        raise CreateError(str(error)) from error


@torch.no_grad()
def _resize_with_mean_rows(model, new_size: int) -> None:
    """Grow the input embedding and the LM head to `new_size` rows; new rows = mean of the old rows."""
    old_size = model.get_input_embeddings().weight.shape[0]
    if new_size < old_size:
        raise CreateError(f"tokenizer has {new_size} entries but the model has {old_size} embedding rows")
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = module.weight
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
        module.weight = torch.nn.Parameter(torch.cat([weight, mean.expand(new_size - old_size, -1)], dim=0))
        if isinstance(module, torch.nn.Embedding):
            module.num_embeddings = new_size
        else:
            module.out_features = new_size
    model.config.vocab_size = new_size


def create_solo_checkpoint(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    resize_mode: str = "fit",
    overwrite: bool = False,
    image_attention: str = "causal",
    vision_positions: str = "sequential",
) -> Path:
    """Build a SOLO checkpoint in `out_dir` from the Mistral/Llama checkpoint in `base_dir`.

    Extends the tokenizer (SOLO-7B ids for a 32,000-entry base), grows the embeddings and LM head
    with mean-of-old rows, adds the patch projection drawn from N(0, 0.02) with `seed`, and saves
    model (safetensors), tokenizer and processor so the Auto classes load the directory with
    `trust_remote_code=True`. The directory appears atomically: all is written to a temporary
    sibling that is renamed into place at the end. `image_attention` / `vision_positions` are the
    native-VLM switches of the new model (`solo.hf.native_vision`; SOLO's by default).
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from solo.hf import SoloConfig, SoloForCausalLM, SoloImageProcessor, SoloProcessor
    from solo.hf.native_vision import check_switches
    from solo.tokenizer import extend_tokenizer

    base, out = Path(base_dir), Path(out_dir)
    try:
        check_switches(image_attention, vision_positions, where="--")
    except ValueError as error:
        raise CreateError(str(error).replace("_", "-", 1)) from None
    base_config = _check_base(base)
    _check_weights(base, base_config)
    check_output_dir(out, command=COMMAND, inputs=[base], overwrite=overwrite)

    try:
        tokenizer = extend_tokenizer(AutoTokenizer.from_pretrained(base))
    except (OSError, ValueError) as error:
        raise CreateError(f"{base}: its tokenizer cannot be used ({error})") from error
    if len(tokenizer) < base_config["vocab_size"]:
        raise CreateError(f"{base}: the tokenizer has {len(tokenizer)} entries but the model has "
                          f"{base_config['vocab_size']} embedding rows; is the tokenizer the model's?")
    config = SoloConfig.from_pretrained(base)
    config.architectures = ["SoloForCausalLM"]
    config.image_attention, config.vision_positions = image_attention, vision_positions
    # The patch projection is new by design: transformers' load report would list it as MISSING
    # in a table. Quiet the report, check that nothing else is missing, and say so in one line.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, loading = SoloForCausalLM.from_pretrained(base, config=config, dtype="auto", output_loading_info=True,
                                                         use_safetensors=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(set(loading["missing_keys"]) - {NEW_WEIGHT})
    if missing:
        raise CreateError(f"{base} lacks weights the model needs: {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    generator = torch.Generator().manual_seed(seed)
    projection = model.model.embed_vision_patch.weight
    with torch.no_grad():
        projection.copy_(torch.randn(projection.shape, generator=generator) * PATCH_INIT_STD)
    _resize_with_mean_rows(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    # atomic_output_dir turns a full disk into "no space left on …; free space and run the same command again".
    with atomic_output_dir(out, command=COMMAND, inputs=[base], overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        SoloProcessor(SoloImageProcessor(resize_mode=resize_mode), tokenizer).save_pretrained(staging)
    return out
