"""Typed dataclass configs: YAML files, then dotted command-line overrides (the CLI wins).

Every component owns a small dataclass (``EVATokConfig``, ``GPTConfig``, ...); a run config
nests them. Loading is strict: an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the key, the file, what was expected, and a close match.

Field documentation lives in ``field(metadata={"help": ...})`` so ``arvid config show`` can
print it.

    cfg = load_config(RunConfig, "configs/x.yaml", ["model.dim=256", "train.lr=3e-4"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type. The message says where and what."""


def doc(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """``dataclasses.field`` with a help text; mutable defaults go through ``default_factory``."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def nested(cls: type, help: str = "") -> Any:  # noqa: A002
    """A field holding a nested config dataclass, default-constructed."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples etc."""

    def fail() -> ConfigError:
        return ConfigError(
            f"{source}: `{where}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: `{where}` must be {_type_name(tp)}, got {value!r}{hint}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where, source)
            except ConfigError as e:
                errors.append(e)
        raise fail()
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail()
        return from_dict(tp, value, source=source, prefix=where + ".")
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{source}: `{where}` must have {len(args)} items, got {len(value)}")
            out = [_convert(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            out = [_convert(v, inner, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or tp is tuple) else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, f"{where}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any] | None, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, strictly. Missing keys take the dataclass defaults."""
    data = dict(data or {})
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(fields), n=1)
        hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
        raise ConfigError(
            f"{source}: unknown key `{prefix}{k}` for {cls.__name__}{hint} "
            f"(valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key `{prefix}{name}` is missing ({_type_name(hints[name])})")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: invalid {cls.__name__}{' at `' + prefix.rstrip('.') + '`' if prefix else ''}: {e}") from e
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain YAML-safe Python: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def is_override(word: str) -> bool:
    """Whether a command-line word is a dotted override ``key.sub=value`` (not a path or an option)."""
    return bool(_OVERRIDE.match(word))


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``5e-4`` and ``1e5`` as floats, as YAML 1.2 (and Python) do:
    PyYAML follows YAML 1.1, whose floats need a dot (``5.0e-4``), and would hand ``lr: 5e-4``
    over as the string ``"5e-4"``."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _load(stream: Any) -> Any:
    return yaml.load(stream, Loader=_Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=3"`` -> (["a", "b", "c"], 3). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (copying it). Unknown keys are caught later by ``from_dict``."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: `{part}` is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path) as f:
            data = _load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: the top level must be a mapping, got {type(data).__name__}")
    # `_base_: other.yaml` includes another file (relative to this one); this file's keys win.
    base = data.pop("_base_", None)
    if base is not None:
        bases = [base] if isinstance(base, str) else list(base)
        merged: dict[str, Any] = {}
        for b in bases:
            merged = deep_merge(merged, read_yaml(path.parent / b))
        data = deep_merge(merged, data)
    return data


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """YAML file (optional) + dotted overrides -> a validated ``cls`` instance."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + command-line overrides"
    return from_dict(cls, data, source=source)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from arvid.io import write_text

    write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def config_fingerprint(obj: Any) -> str:
    """A short sha256 of the resolved config, used to tell pipeline stages' inputs apart."""
    import hashlib

    return hashlib.sha256(yaml.safe_dump(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: ``key: type = default  # help`` (nested configs recursively)."""
    lines = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  # {f.metadata.get('help', '')}")
            lines.extend(describe(tp, prefix + "  "))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        lines.append(f"{prefix}{f.name}: {_type_name(tp)} = {to_dict(default)!r}  # {f.metadata.get('help', '')}")
    return lines
