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
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from solo.checkpoints import CheckpointError
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
    if model_type == "solo" or is_solo7b_layout(config):
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
    """Parse a safetensors header and check every entry (dtype, shape, offsets that match the shape)
    and that the file holds every byte it announces; return the header and where the data starts."""
    size = path.stat().st_size

    def invalid(problem: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {problem}; copy it again")

    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise invalid(f"its header is unreadable ({error})") from error
    if not isinstance(header, dict):
        raise invalid(f"its header is a JSON {type(header).__name__}, not an object of tensors")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise invalid(f"tensor {key!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise invalid(f"tensor {key!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise invalid(f"tensor {key!r} has shape {shape!r}, not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise invalid(f"tensor {key!r} has data_offsets {offsets!r}, not [start, end]")
        expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise invalid(f"tensor {key!r} spans {offsets[1] - offsets[0]:,} bytes but shape {shape} of "
                          f"{dtype} needs {expected:,}")
        end = max(end, offsets[1])
    if 8 + length + end > size:
        raise invalid(f"it is truncated (it should hold {8 + length + end:,} bytes but has {size:,})")
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


_ARCH_NUMBERS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def check_weight_shapes(
    weights: HFWeights, config: Dict[str, Any], source: str | os.PathLike, *, vocab_rows: Optional[int] = None,
    vision: bool = True,
) -> None:
    """Config sanity before anything is allocated: config.json's architecture numbers are positive
    integers, its layer count is the number of layers the files hold (checked first, so an absurd
    ``num_hidden_layers`` costs nothing), and every tensor a Mistral/Llama decoder needs has the shape
    those numbers imply. The first problem is named (CheckpointError).

    ``vocab_rows``: the rows the embedding and LM head must have (default: config's ``vocab_size``).
    ``vision``: whether ``model.embed_vision_patch.weight`` must be there (a SOLO checkpoint; not a base LLM).
    """
    numbers = {name: config.get(name) for name in _ARCH_NUMBERS}
    numbers["num_key_value_heads"] = config.get("num_key_value_heads") or numbers["num_attention_heads"]
    heads = numbers["num_attention_heads"]
    numbers["head_dim"] = config.get("head_dim") or (
        numbers["hidden_size"] // heads if type(heads) is int and heads > 0 and type(numbers["hidden_size"]) is int
        else None)
    for name, value in numbers.items():
        if type(value) is not int or value < 1:
            raise CheckpointError(f"{source}/config.json: {name} must be a positive integer, got {value!r}")
    if heads % numbers["num_key_value_heads"]:
        raise CheckpointError(f"{source}/config.json: num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={numbers['num_key_value_heads']}")
    layers = {int(match.group(1)) for name in weights.location if (match := _LAYER_NAME.match(name))}
    count = numbers["num_hidden_layers"]
    if len(layers) != count or layers != set(range(count)):  # the length first: never a set of `count` items
        held = f"layers 0..{max(layers)}" if layers and layers == set(range(len(layers))) else f"{len(layers)} layers"
        raise CheckpointError(f"{source}: config.json says num_hidden_layers={count} but the weights hold {held}; "
                              "is config.json the one of these weights?")
    h, f, dim = numbers["hidden_size"], numbers["intermediate_size"], numbers["head_dim"]
    q, kv = heads * dim, numbers["num_key_value_heads"] * dim
    rows = numbers["vocab_size"] if vocab_rows is None else vocab_rows
    expected = {"model.embed_tokens.weight": (rows, h), "model.norm.weight": (h,)}
    if "lm_head.weight" in weights or not config.get("tie_word_embeddings"):
        expected["lm_head.weight"] = (rows, h)
    if vision:
        channels, patch = config.get("num_channels", 3), config.get("vision_patch_size", 32)
        expected["model.embed_vision_patch.weight"] = (h, channels * patch * patch)
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    for i in range(count):
        expected.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    for name, shape in expected.items():
        if name not in weights:
            hint = ("run `solo create` on a text LLM first" if name == "model.embed_vision_patch.weight"
                    else "is it a complete checkpoint?")
            raise CheckpointError(f"{source} has no tensor {name!r}; {hint}")
        if weights.shapes[name] != shape:
            what = ("the tokenizer's vocabulary" if vocab_rows is not None and shape[0] == rows
                    and name in ("model.embed_tokens.weight", "lm_head.weight") else "config.json")
            raise CheckpointError(f"{source}: {name} has shape {weights.shapes[name]} but {what} implies {shape}")


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

        path = self.out_dir / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
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


def write_processor(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, layout: str,
                    model_config: Optional[Dict[str, Any]] = None):
    """Write tokenizer, chat template and processor files into ``out_dir``; return the tokenizer.

    ``tokenizer_dir`` may hold a full SOLO processor (``solo create`` output, an export) or only a
    tokenizer (the Mistral-Instruct chat template and an image processor are added: SOLO-7B's settings
    when ``model_config`` is the released SOLO-7B layout, else the defaults). The solo7b layout keeps the processor
    files too but without ``auto_map`` (SOLO's scripts never read them).
    """
    from transformers import AutoTokenizer

    from solo.hf import SoloImageProcessor, SoloProcessor
    from solo.hf.image_processing_solo import SOLO7B_SETTINGS
    from solo.hf.processing_solo import CHAT_TEMPLATE

    source = Path(tokenizer_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read a tokenizer from {source} ({error}); pass --tokenizer DIR") from error
    # The image-processor settings are read as data (never by running code found in the directory).
    settings: Dict[str, Any] = dict(SOLO7B_SETTINGS) if is_solo7b_layout(model_config or {}) else {}
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


def is_solo7b_layout(config: Dict[str, Any]) -> bool:
    """Whether a config.json is the released SOLO-7B layout (``model_type: mistral``, SoloForCausalLM)."""
    return config.get("model_type") == "mistral" and "SoloForCausalLM" in (config.get("architectures") or [])


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
        vocab = len(write_processor(tokenizer_dir or hf_dir, staging, layout, config))
        rows = weights.shapes.get("model.embed_tokens.weight", (None,))[0]
        if rows != vocab or config.get("vocab_size") != vocab:
            raise CheckpointError(
                f"{hf_dir}: the tokenizer has {vocab} entries but the embedding has {rows} rows "
                f"(config vocab_size {config.get('vocab_size')}); pass the matching --tokenizer"
            )
        check_weight_shapes(weights, config, hf_dir, vocab_rows=vocab)
        write_config(config, staging, layout)
        index = [INDEX_FILE] if (Path(hf_dir) / INDEX_FILE).is_file() else []
        for name in sorted(set(weights.location.values())) + index:
            shutil.copyfile(Path(hf_dir) / name, staging / name)
    return Path(out_dir)


def iter_layers(num_layers: int) -> Iterator[int]:
    """Layer indices with a progress bar on a terminal (long conversions show progress)."""
    from tqdm import tqdm

    return iter(tqdm(range(num_layers), desc="layers", unit="layer", disable=None))
