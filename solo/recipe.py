"""Typed recipes: a tree of dataclasses loaded from YAML plus dotted ``section.key=value`` overrides.

One mechanism for every stage (pretraining's ``megatron_patch.config``, SFT's recipe): unknown keys
and wrong types are rejected with a message naming the key; ``${VAR}`` in strings is expanded and an
unset variable is an error naming it. A field with a fixed set of values is typed ``Literal[...]``:
that list is the only one, checked here on load and by :func:`check_choices` for configs built in code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe, override or config value the user must fix; the message names the key."""


def expand_env(value: str, key: str) -> str:
    """Expand ${VAR} / $VAR; an unset variable is an error naming it (recipes use SOLO_DATA etc.)."""
    expanded = os.path.expandvars(value)
    if "$" in expanded:
        missing = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
        raise ConfigError(f"{key}: set the environment variable(s) {', '.join(missing)} (value {value!r})")
    return expanded


def _check_choice(value: Any, annotation: Any, key: str) -> Any:
    """``value`` if it is one of the ``Literal`` annotation's choices, else ConfigError naming them."""
    choices = typing.get_args(annotation)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_choices(config: Any, prefix: str = "") -> None:
    """ConfigError naming the first field of a dataclass tree whose value is not one of its choices."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            _check_choice(value, hints[f.name], prefix + f.name)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value against a dataclass field's (resolved) annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return _check_choice(expand_env(value, key) if isinstance(value, str) else value, annotation, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return expand_env(str(value), key)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def build_dataclass(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build ``cls`` (a dataclass whose nested sections are dataclasses) from a mapping, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[name] = build_dataclass(f.default_factory, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, raw: str) -> None:
    """Apply one ``section.key=value`` override (the value parsed as YAML) to a recipe tree."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None


def load_recipe(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load a YAML recipe into ``cls`` and apply ``section.key=value`` overrides (no validation)."""
    try:
        with open(path, encoding="utf-8") as fh:
            tree = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"recipe {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), raw)
    return build_dataclass(cls, tree)
