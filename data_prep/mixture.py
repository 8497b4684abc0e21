"""Mixtures of packed directories and `solo-data plan`: samples per source and iterations, computed.

Mixture YAML (the same file the training data builder, `megatron_patch.data.read_mixture`, reads;
relative paths are relative to the YAML file)::

    datasets:
      - {path: packed/imagenet21k, weight: 0.7}
      - {path: "packed/slimpajama/shard-*", weight: 0.3}   # a glob, or a list of directories

A glob or a list of directories is one source with one weight (the shards of one `solo-data pack
--shard I/N` job): its weight is split over the directories in proportion to their packs, so the
group is drawn as if it were one directory.

One sample is one pack. With `--epochs E` the run draws E × (total packs of all sources) samples;
with `--tokens T` it draws enough samples for about T non-pad tokens (each source's mean tokens per
pack, weighted). Iterations = ceil(samples / global batch); the samples of the last iteration are
counted too, and split over sources by weight with largest-remainder rounding, so the counts add
up exactly. megatron-core's blended dataset draws in these proportions (it sizes each source's
index with a small surplus).
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import yaml

from solo.outputs import write_json_atomic
from .reader import PackedReader


def read_mixture(path: str, keep_as_is: tuple[str, ...] = ()) -> list[tuple[str, float]]:
    """Mixture YAML → [(packed directory, weight)]; the one reader of this format (training uses it too).

    `${VAR}` in a path is expanded from the environment (an unset variable is an error naming it);
    relative paths are relative to the YAML file; names in `keep_as_is` (e.g. `synthetic`) pass unchanged.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mixture file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("datasets"), list) or not tree["datasets"]:
        raise ValueError(f"{path}: a mixture YAML needs a non-empty 'datasets' list of {{path, weight}}")
    if set(tree) != {"datasets"}:
        raise ValueError(f"{path}: unknown top-level key(s) {sorted(set(tree) - {'datasets'})}; only 'datasets'")
    base = os.path.dirname(os.path.abspath(path))
    sources = []
    for index, entry in enumerate(tree["datasets"]):
        where = f"{path}: datasets[{index}]"
        if not isinstance(entry, dict) or "path" not in entry or "weight" not in entry:
            raise ValueError(f"{where} needs 'path' and 'weight'")
        unknown = sorted(set(entry) - {"path", "weight"})
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; an entry has only 'path' and 'weight'")
        weight = entry["weight"]
        # YAML reads `true` as a bool (an int in Python) and `.inf` as a float: neither is a weight.
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or not weight > 0:
            raise ValueError(f"{where} weight must be a finite number > 0, got {weight!r}")
        given = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
        if not given or not all(isinstance(item, str) and item for item in given):
            raise ValueError(f"{where} path must be a non-empty string or list of strings, got {entry['path']!r}")
        paths = []
        for item in given:
            source = os.path.expandvars(item)
            if "$" in source:
                raise ValueError(f"{where} path {item!r} uses an unset environment variable; export it")
            if source not in keep_as_is and not os.path.isabs(source):
                source = os.path.join(base, source)
            if glob.has_magic(source):
                matches = sorted(glob.glob(source))
                if not matches:
                    raise FileNotFoundError(f"{where} path {item!r} matches no directory")
                paths.extend(matches)
            else:
                paths.append(source)
        if len(paths) == 1:
            sources.append((paths[0], float(weight)))
        else:  # one source: its weight split in proportion to the packs of each directory
            packs = [len(PackedReader(path)) for path in paths]
            sources.extend((path, float(weight) * count / sum(packs)) for path, count in zip(paths, packs) if count)
    return sources


def largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Split `total` into integers proportional to `weights` that add up to `total` exactly."""
    exact = [total * weight / sum(weights) for weight in weights]
    counts = [math.floor(value) for value in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan_mixture(mixture: str, global_batch: int, *, epochs: float | None = None, tokens: float | None = None,
                 output: str | None = None) -> dict[str, Any]:
    if global_batch < 1:
        raise ValueError("--global-batch must be at least 1")
    if (epochs is None) == (tokens is None):
        raise ValueError("give exactly one of --epochs or --tokens")
    sources = read_mixture(mixture)
    infos = []
    for path, weight in sources:
        reader = PackedReader(path)
        lengths = reader.pack_lengths
        if len(reader) == 0:
            raise ValueError(f"{path} holds no packs")
        infos.append({"path": path, "weight": weight, "packs": len(reader), "tokens": int(lengths.sum()),
                      "seq_length": reader.seq_length, "vocab_size": reader.tokenizer_info["vocab_size"]})
    for key in ("seq_length", "vocab_size"):
        values = {info[key] for info in infos}
        if len(values) > 1:
            raise ValueError(f"the mixture's sources differ in {key} ({sorted(values)}); pack them alike")
    total_weight = sum(info["weight"] for info in infos)
    total_packs = sum(info["packs"] for info in infos)
    for info in infos:
        info["weight"] = info["weight"] / total_weight
        info["natural_weight"] = info["packs"] / total_packs
        info["tokens_per_pack"] = info["tokens"] / info["packs"]
    if epochs is not None:
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"--epochs must be a finite number > 0, got {epochs}")
        wanted = math.ceil(epochs * total_packs)
    else:
        if not (math.isfinite(tokens) and tokens > 0):
            raise ValueError(f"--tokens must be a finite number > 0, got {tokens}")
        wanted = math.ceil(tokens / sum(info["weight"] * info["tokens_per_pack"] for info in infos))
    iterations = math.ceil(wanted / global_batch)
    samples = iterations * global_batch
    counts = largest_remainder(samples, [info["weight"] for info in infos])
    for info, count in zip(infos, counts):
        info["samples"] = count
        info["epochs"] = count / info["packs"]
        info["expected_tokens"] = round(count * info["tokens_per_pack"])
    seq_length = infos[0]["seq_length"]
    plan = {
        "mixture": os.path.abspath(mixture),
        "global_batch": global_batch,
        "requested": {"epochs": epochs, "tokens": tokens},
        "iterations": iterations,
        "samples": samples,
        "seq_length": seq_length,
        "token_slots": samples * seq_length,
        "expected_tokens": sum(info["expected_tokens"] for info in infos),
        "sources": infos,
    }
    if output is None:
        stem = mixture[: -len(".yaml")] if mixture.endswith(".yaml") else mixture.rsplit(".yml", 1)[0]
        output = stem + ".plan.json"
    write_json_atomic(output, plan)
    plan["written_to"] = output
    return plan


def print_plan(plan: dict[str, Any]) -> None:
    print(f"{'source':<40} {'weight':>7} {'natural':>7} {'packs':>10} {'samples':>10} {'epochs':>7} {'tokens':>14}")
    for info in plan["sources"]:
        name = info["path"] if len(info["path"]) <= 40 else "…" + info["path"][-39:]
        print(f"{name:<40} {info['weight']:>7.4f} {info['natural_weight']:>7.4f} {info['packs']:>10,} "
              f"{info['samples']:>10,} {info['epochs']:>7.3f} {info['expected_tokens']:>14,}")
    print(f"global batch {plan['global_batch']} × {plan['iterations']:,} iterations = {plan['samples']:,} samples "
          f"of {plan['seq_length']:,} tokens ({plan['token_slots']:,} slots, ~{plan['expected_tokens']:,} tokens)")
    print(f"wrote {plan['written_to']}")
