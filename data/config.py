"""Typed configuration: dataclasses as the schema, YAML for defaults, command line for overrides.

Every stage describes its options as a (nested) dataclass whose fields carry a `help`
text in their metadata. This module turns such a class into

* a validator for plain dicts (from YAML): unknown keys, wrong types and values outside a
  `Literal[...]` are errors that name the dotted key and what is allowed;
* command-line flags, one per leaf field, named by the field's dotted path
  (`--kl.beta 0.5`, `--corpus.columns '{prompt: question}'`), with help, type and default;
* a resolved YAML file saved beside every output, and a stable hash of it.

Why not HfArgumentParser: it does not nest dataclasses, and our configs do (a stage holds
its corpus, model and tokenisation sections).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or holds a value not allowed."""


def option(
    default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None
) -> Any:
    """A dataclass field with help text. Lists, dicts and nested configs are built per instance
    (pass a config class as `default`, or any zero-argument callable as `factory`)."""
    metadata = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- type helpers


def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(True, X) for Optional[X] / X | None, else (False, tp)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def describe_type(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{describe_type(inner)} or null"
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        (item, *_) = get_args(tp) or (Any,)
        return f"list of {describe_type(item)}"
    if origin is dict:
        key, value = get_args(tp) or (Any, Any)
        return f"mapping of {describe_type(key)} to {describe_type(value)}"
    return getattr(tp, "__name__", str(tp))


def _parse_text(text: str) -> Any:
    """Command-line values arrive as text: read them as YAML scalars/lists/mappings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting command-line text where needed."""
    optional, inner = _is_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none")):
        if optional:
            return None
        raise ConfigError(f"{key}: must be {describe_type(tp)}, got null")
    tp = inner
    origin = get_origin(tp)

    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, str) and any(isinstance(a, bool) for a in allowed):
            # a choice such as Literal["auto", True, False]: command-line text "true"/"false"
            value = {"true": True, "false": False}.get(value.lower(), value)
        # by type as well as value: 1 == True, but 1 is not an allowed True
        if any(type(value) is type(a) and value == a for a in allowed):
            return value
        raise ConfigError(
            f"{key}: {value!r} is not allowed; allowed values: "
            + ", ".join(repr(a) for a in allowed)
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as text; float() does not
            except ValueError:
                pass
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `--model 1` or a YAML number for a name: keep the text
        raise ConfigError(f"{key}: must be a string, got {type(value).__name__} {value!r}")
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            parsed = _parse_text(value)
            # "a,b,c" is accepted as a list for convenience on the command line
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be {describe_type(tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = get_args(tp) or (Any, Any)
        if isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be {describe_type(tp)}, got {value!r}")
        return {
            _coerce(k, key_tp, f"{key} key"): _coerce(v, value_tp, f"{key}.{k}")
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping of {tp.__name__} options, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Any:
        return value
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")


# --------------------------------------------------------------------------- dict <-> dataclass


def from_dict(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    """Build and validate `cls` from a (possibly partial) nested dict."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; allowed keys"
            + (f" under {prefix.rstrip('.')}" if prefix else "")
            + ": "
            + ", ".join(sorted(fields))
        )
    hints = _resolved_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    try:
        instance = cls(**kwargs)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{prefix or ''}{cls.__name__}: {err}") from None
    validate(instance, prefix)
    return instance


def validate(instance: Any, prefix: str = "") -> None:
    """Run each dataclass's `validate()` hook, naming the dotted key of any failure."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    hook = getattr(instance, "validate", None)
    if hook is not None:
        try:
            hook()
        except ValueError as err:  # ConfigError, or a component's own ValueError subclass
            raise ConfigError(f"{prefix}{err}") from None


def to_dict(instance: Any) -> dict[str, Any]:
    return dataclasses.asdict(instance)


def config_hash(instance: Any) -> str:
    """A short, stable hash of the resolved config, or of its dict (key order does not matter)."""
    values = instance if isinstance(instance, dict) else to_dict(instance)
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_resolved(instance: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML beside an output, so every result says how it was made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(instance), sort_keys=False, allow_unicode=True)
    # through a temporary file: a run killed mid-write must not leave half a config that
    # its rerun then reads as foreign
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"# resolved safekeel config, hash {config_hash(instance)}\n{text}")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- YAML + CLI


def read_yaml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """Read a YAML config file. With `section`, a file holding several stages gives that one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    if section is not None and isinstance(data.get(section), dict):
        return data[section]
    return data


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """Every leaf option of a config class as (dotted name, field, annotation)."""
    out = []
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            out.extend(leaf_fields(inner, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def _default_of(cls: type, dotted: str) -> Any:
    node: Any = cls()
    for part in dotted.split("."):
        if node is None:  # inside an optional section that is unset by default
            return None
        node = getattr(node, part)
    return node


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--dotted.name VALUE` flag per leaf option; the value is kept as text until merge."""
    try:
        defaults = cls()
    except TypeError:
        defaults = None
    for dotted, f, tp in leaf_fields(cls):
        default = _default_of(cls, dotted) if defaults is not None else None
        help_text = f.metadata.get("help", "")
        parser.add_argument(
            f"--{dotted}",
            dest=f"cfg::{dotted}",
            metavar=_metavar(tp),
            default=argparse.SUPPRESS,
            # argparse %-formats help text: escape literal percent signs
            help=f"{help_text} [{describe_type(tp)}; default: {default!r}]".replace("%", "%%"),
        )


def _metavar(tp: Any) -> str:
    _, inner = _is_optional(tp)
    if get_origin(inner) is Literal:
        return "{" + ",".join(str(a) for a in get_args(inner)) + "}"
    origin = get_origin(inner)
    if origin in (list, tuple):
        return "LIST"
    if origin is dict:
        return "MAPPING"
    return getattr(inner, "__name__", "VALUE").upper()


def overrides_from_namespace(namespace: argparse.Namespace) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if dest.startswith("cfg::"):
            set_dotted(tree, dest[len("cfg::") :], value)
    return tree


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    cls: type[C],
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    section: str | None = None,
) -> C:
    """Dataclass defaults, then the YAML file, then command-line overrides; validated."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values = read_yaml(yaml_path, section)
    if overrides:
        values = deep_merge(values, overrides)
    return from_dict(cls, values)
