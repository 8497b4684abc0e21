"""Hugging Face SOLO checkpoint directories: read them tensor by tensor, write them shard by shard,
and lay them out natively or as the released SOLO-7B (`solo convert hf-to-hf`). No megatron import.

Two layouts of the same weights:

* ``native``: ``model_type: solo`` with ``auto_map`` and this package's model/processor code beside
  the weights, so ``AutoModelForCausalLM`` / ``AutoProcessor.from_pretrained(DIR, trust_remote_code=True)``
  return the SOLO classes anywhere;
* ``solo7b``: exactly what the released SOLO-7B ships (``model_type: mistral``,
  ``architectures: [SoloForCausalLM]``, no ``auto_map``, no code), for SOLO's own evaluation scripts.

Both carry ``rope_theta`` at the top level (older readers look only there) and SOLO-7B's
``sliding_window`` number (see ``SoloConfig``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from solo.outputs import atomic_output_dir

LAYOUTS = ("native", "solo7b")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CODE_FILES = ("configuration_solo.py", "modeling_solo.py", "image_processing_solo.py", "processing_solo.py",
              "native_vision.py")
AUTO_MAP = {"AutoConfig": "configuration_solo.SoloConfig", "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM"}
# Files of a model directory that are not tokenizer/processor files.
_MODEL_FILES = {"config.json", "generation_config.json", INDEX_FILE, *CODE_FILES}
DEFAULT_SHARD_BYTES = 2 * 1024**3
_EXPLICIT_FIELDS = (
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_parameters", "sliding_window", "tie_word_embeddings", "vision_patch_size", "num_channels",
    "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, converted or resumed from (or a save directory another run
    holds); the message names the input and what to do."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def read_solo_config(hf_dir: str | os.PathLike) -> Dict[str, Any]:
    """config.json of a SOLO checkpoint (native, or released SOLO-7B layout), as a dict."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise CheckpointError(f"{hf_dir} is not a directory; pass a Hugging Face SOLO checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; --hf must be a Hugging Face checkpoint directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from error
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type == "solo" or (model_type == "mistral" and "SoloForCausalLM" in archs):
        return config
    if model_type in ("mistral", "llama"):
        raise CheckpointError(
            f"{hf_dir} is a plain {model_type} model (architectures={archs}), not a SOLO model; "
            f"run `solo create --base {hf_dir} --out DIR` first"
        )
    raise CheckpointError(
        f"{hf_dir}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
        "expected a SOLO checkpoint (model_type solo, or mistral with architectures [SoloForCausalLM])"
    )


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_header(path: Path) -> tuple[Dict[str, Any], int]:
    """Parse a safetensors header and check the file holds every byte it announces; return the
    header and the offset where the tensor data starts."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}); copy it again") from error
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path} is truncated: it should hold {8 + length + end:,} bytes but has {size:,}; copy it again"
        )
    return header, 8 + length


class HFWeights:
    """The tensors of a Hugging Face checkpoint, read one at a time (never the whole model at once).

    Validates up front that every shard the index names exists and is complete. Tensors are read
    with plain file reads, not memory maps: mapped pages would stay resident (and count) as long
    as the file is open, i.e. a second copy of the model.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.directory = Path(hf_dir)
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index ({error})") from error
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights are read "
                "(re-save .bin checkpoints with save_pretrained(safe_serialization=True))"
            )
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.location: Dict[str, str] = {}
        self.shapes: Dict[str, tuple] = {}
        self._entries: Dict[str, tuple] = {}  # name -> (dtype, absolute start, end)
        for name in files:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"shard {path} named in {INDEX_FILE} is missing; copy the full checkpoint")
            header, data_start = _safetensors_header(path)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if entry["dtype"] not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
                self.location[key] = name
                self.shapes[key] = tuple(entry["shape"])
                start, end = entry["data_offsets"]
                self._entries[key] = (_SAFETENSORS_DTYPES[entry["dtype"]], data_start + start, data_start + end)
        if weight_map:
            absent = [key for key, name in weight_map.items() if self.location.get(key) != name]
            if absent:
                raise CheckpointError(f"{index} names {absent[0]!r} in {weight_map[absent[0]]}, which does not hold it")

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard into fresh memory."""
        if name not in self.location:
            raise CheckpointError(f"{self.directory} has no tensor {name!r}; is it a complete SOLO checkpoint?")
        dtype, start, end = self._entries[name]
        buffer = bytearray(end - start)
        with open(self.directory / self.location[name], "rb") as handle:
            handle.seek(start)
            if handle.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.directory / self.location[name]}: short read of {name}; copy it again")
        if not buffer:
            return torch.empty(self.shapes[name], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(self.shapes[name])


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` as they come, then the index.

    Holds at most one shard in memory. Shards are named ``model-0000i-of-0000N.safetensors`` (or
    ``model.safetensors`` when one shard suffices), as ``save_pretrained`` names them.
    """

    def __init__(self, out_dir: str | os.PathLike, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: List[List[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.out_dir / f"part-{len(self.files):05d}.safetensors"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.files:
            self._flush()
        count = len(self.files)
        if count == 1:
            os.replace(self.out_dir / "part-00000.safetensors", self.out_dir / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out_dir / f"part-{i:05d}.safetensors", self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_config(config: Dict[str, Any], out_dir: str | os.PathLike, layout: str) -> None:
    """Write ``config.json`` (and ``generation_config.json``) for ``layout``; native also gets the code."""
    from solo.hf import SoloConfig
    from solo.hf.native_vision import is_native

    if layout not in LAYOUTS:
        raise CheckpointError(f"--layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    out = Path(out_dir)
    # Through SoloConfig: validates the fields and normalises the window/rope fields (see its docs).
    clean = {k: v for k, v in config.items() if k not in ("auto_map", "model_type", "transformers_version")}
    solo_config = SoloConfig.from_dict(clean)
    solo_config.architectures = ["SoloForCausalLM"]
    if layout != "native" and is_native(solo_config.image_attention, solo_config.vision_positions):
        raise CheckpointError(
            f"image_attention={solo_config.image_attention}, vision_positions={solo_config.vision_positions}: "
            f"the {layout} layout's code (SOLO's released modeling) would ignore them and compute another "
            "function; export with --layout native"
        )
    full = solo_config.to_dict()
    # The non-default fields, plus every architecture field spelled out (readers of SOLO-7B's
    # config, and older transformers, do not know this class's defaults).
    data = {**{k: full[k] for k in _EXPLICIT_FIELDS if k in full}, **solo_config.to_diff_dict()}
    data.pop("auto_map", None)
    if layout == "native":
        data["model_type"] = "solo"
        data["auto_map"] = dict(AUTO_MAP)
        source = Path(__file__).resolve().parent / "hf"
        for name in CODE_FILES:
            shutil.copyfile(source / name, out / name)
    else:
        data["model_type"] = "mistral"
        for field in ("image_attention", "vision_positions"):  # SOLO's (checked above): the released layout
            data.pop(field, None)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = {k: data.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def write_processor(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, layout: str):
    """Write tokenizer, chat template and processor files into ``out_dir``; return the tokenizer.

    ``tokenizer_dir`` may hold a full SOLO processor (``solo create`` output, an export) or only a
    tokenizer (a default ``SoloImageProcessor`` and the Mistral-Instruct chat template are added). The solo7b layout keeps the processor
    files too but without ``auto_map`` (SOLO's scripts never read them).
    """
    from transformers import AutoTokenizer

    from solo.hf import SoloImageProcessor, SoloProcessor
    from solo.hf.processing_solo import CHAT_TEMPLATE

    source = Path(tokenizer_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read a tokenizer from {source} ({error}); pass --tokenizer DIR") from error
    # The image-processor settings are read as data (never by running code found in the directory).
    settings: Dict[str, Any] = {}
    processor_config = source / "processor_config.json"
    if processor_config.is_file():
        settings = json.loads(processor_config.read_text(encoding="utf-8")).get("image_processor") or {}
    settings = {k: v for k, v in settings.items() if k not in ("auto_map", "image_processor_type", "processor_class")}
    try:
        image_processor = SoloImageProcessor(**settings)
    except TypeError as error:
        raise CheckpointError(f"{processor_config}: unexpected image-processor settings ({error})") from error
    processor = SoloProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template or CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    if layout == "solo7b":
        for name in CODE_FILES:
            if (Path(out_dir) / name).exists():
                os.unlink(Path(out_dir) / name)
        for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
            path = Path(out_dir) / name
            if path.is_file():
                path.write_text(json.dumps(_drop_auto_map(json.loads(path.read_text(encoding="utf-8"))), indent=2)
                                + "\n", encoding="utf-8")
    return tokenizer


def _drop_auto_map(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_auto_map(v) for k, v in value.items() if k != "auto_map"}
    return value


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> None:
    """Copy the tokenizer/processor files of a model directory (not weights, config or code)."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for path in Path(src_dir).iterdir():
        if (path.is_file() and path.name not in _MODEL_FILES and not path.name.endswith(".safetensors")
                and not path.name.startswith(".")):
            shutil.copyfile(path, dst / path.name)


# ----------------------------------------------------------------------------------------------
# solo convert hf-to-hf
# ----------------------------------------------------------------------------------------------


def convert_hf_to_hf(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, layout: str = "native",
    tokenizer_dir: Optional[str | os.PathLike] = None, overwrite: bool = False,
) -> Path:
    """Rewrite a SOLO checkpoint directory in ``layout`` (weights copied file by file, unchanged).

    The usual use: a released SOLO-7B directory -> native, so that
    ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` returns the SOLO model
    (on the released layout it returns a plain Mistral that ignores ``vision_patches``).
    """
    config = read_solo_config(hf_dir)
    weights = HFWeights(hf_dir)  # validates shards before anything is written
    inputs = [hf_dir] + ([tokenizer_dir] if tokenizer_dir else [])
    with atomic_output_dir(out_dir, command="solo convert hf-to-hf", inputs=inputs, overwrite=overwrite) as staging:
        vocab = len(write_processor(tokenizer_dir or hf_dir, staging, layout))
        rows = weights.shapes.get("model.embed_tokens.weight", (None,))[0]
        if rows != vocab or config.get("vocab_size") != vocab:
            raise CheckpointError(
                f"{hf_dir}: the tokenizer has {vocab} entries but the embedding has {rows} rows "
                f"(config vocab_size {config.get('vocab_size')}); pass the matching --tokenizer"
            )
        write_config(config, staging, layout)
        for name in sorted(set(weights.location.values())) + ([INDEX_FILE] if (Path(hf_dir) / INDEX_FILE).is_file() else []):
            shutil.copyfile(Path(hf_dir) / name, staging / name)
    return Path(out_dir)


def iter_layers(num_layers: int) -> Iterator[int]:
    """Layer indices with a progress bar on a terminal (long conversions show progress)."""
    from tqdm import tqdm

    return iter(tqdm(range(num_layers), desc="layers", unit="layer", disable=None))
