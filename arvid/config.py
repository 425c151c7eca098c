"""Typed dataclass configs: YAML files, then dotted command-line overrides (the CLI wins).

Every component owns a small dataclass (``EVATokConfig``, ``GPTConfig``, ...); a run config
nests them. Loading is strict: an unknown key or a value of the wrong type is a
:class:`ConfigError` that names the key, the file, what was expected, and a close match.

Field documentation lives in ``field(metadata={"help": ...})`` so every command's ``--help``
can print it (:func:`describe`).

Execution-only fields (``doc(..., execution=True)``: data loader workers, compile modes,
logging and checkpoint intervals, progress bars) change how fast a stage runs, not what it
writes. :func:`fingerprint_dict` leaves them out, so tuning them does not make a finished
pipeline stage refuse to be reused.

    cfg = load_config(RunConfig, "configs/x.yaml", ["model.dim=256", "train.lr=3e-4"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
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


def doc(default: Any = dataclasses.MISSING, help: str = "", *, execution: bool = False,  # noqa: A002
        **kw: Any) -> Any:
    """``dataclasses.field`` with a help text; mutable defaults go through ``default_factory``.

    ``execution=True`` marks a field that only changes how a stage runs (workers, compilation,
    logging intervals), never what it produces: :func:`fingerprint_dict` leaves it out. Only mark
    a field whose every value computes the same thing: the outputs may differ by floating-point
    rounding (a compiled kernel, a cached attention; in sampling a rounding can flip a token at a
    near tie), never by design. Precision settings (``tf32``), seeds, batch sizes that shape the
    computation and anything written to the outputs stay unmarked.
    """
    metadata = {"help": help, "execution": True} if execution else {"help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def is_execution(f: dataclasses.Field) -> bool:
    """Whether field ``f`` was declared with ``doc(..., execution=True)``."""
    return bool(f.metadata.get("execution", False))


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
        close = difflib.get_close_matches(str(k), list(fields), n=1)  # a YAML key may be a number or null
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
    except (ValueError, TypeError) as e:  # a ConfigError of __post_init__ too: name the file and the key path
        raise ConfigError(f"{source}: invalid {cls.__name__}{' at `' + prefix.rstrip('.') + '`' if prefix else ''}: {e}") from e
    return obj


def _plain(obj: Any, execution: bool) -> Any:
    """``to_dict`` (``execution=True``) or ``fingerprint_dict`` (``False``: execution fields left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name), execution) for f in dataclasses.fields(obj)
                if execution or not is_execution(f)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, execution) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v, execution) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain YAML-safe Python: tuples become lists."""
    return _plain(obj, execution=True)


def fingerprint_dict(obj: Any) -> Any:
    """:func:`to_dict` without the execution-only fields (``doc(..., execution=True)``), at every
    depth: what identifies a stage's outputs. Two configs that differ only in how fast they run
    (workers, compilation, logging intervals) give equal dicts."""
    return _plain(obj, execution=False)


def execution_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the execution-only fields of config class ``cls`` and of the config
    dataclasses nested in it (``["trainer.num_workers", ...]``), in declaration order."""
    names = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if is_execution(f):
            names.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            names.extend(execution_fields(hints[f.name], prefix + f.name + "."))
    return names


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def int_at_least(minimum: int):
    """An argparse ``type`` for an integer flag of at least ``minimum``: a smaller value or a
    non-integer is the flag's error (argparse names the flag), not a failure later in the run."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def is_override(word: str) -> bool:
    """Whether a command-line word is a dotted override ``key.sub=value`` (not a path or an option)."""
    return bool(_OVERRIDE.match(word))


#: Floats as YAML 1.2 and Python write them (``5e-4``, ``1e5``, ``-.5``), plus YAML 1.1's base 60
#: (``1:30.5``), ``.inf`` and ``.nan``. Every branch needs a digit where ``float()`` needs one,
#: so a match always converts (``._e5`` does not match and stays a string).
_FLOAT = re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                   |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X)
_FLOAT_FIRST = list("-+0123456789.")


class _Overflow:
    """A number written in the YAML that a float cannot hold (``1e999``: ``float()`` gives inf).
    :func:`_load` refuses it, naming its key; it never reaches a config."""

    def __init__(self, text: str) -> None:
        self.text = text


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``5e-4`` and ``1e5`` as floats, as YAML 1.2 (and Python) do:
    PyYAML follows YAML 1.1, whose floats need a dot (``5.0e-4``), and would hand ``lr: 5e-4``
    over as the string ``"5e-4"``. A number too large for a float becomes an :class:`_Overflow`
    (refused by :func:`_load`), not a silent ``inf``."""

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        try:
            value = super().construct_yaml_float(node)
        except ValueError as e:  # unreachable while _FLOAT only matches numbers; never a traceback
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} looks like a number but is not one", node.start_mark) from e
        if math.isinf(value) and "inf" not in str(node.value).lower():
            return _Overflow(str(node.value))
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """A key given twice in one mapping is an error (PyYAML keeps the last silently: a second
        ``trainer:`` block would drop the first's settings without a word)."""
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class refuses unhashable keys with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"key {key!r} is given twice (first at line {seen[key].line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, _FLOAT_FIRST)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)


class _Dumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that knows :class:`_Loader`'s floats, so it quotes every string the
    loader would read as a number: the string ``"1e3"`` is written ``'1e3'``, not ``1e3`` (which
    would come back as the float 1000.0). Every config or config-derived dict is dumped with it
    (:func:`dump_yaml`), so that what is saved loads back equal."""


_Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, _FLOAT_FIRST)


def dump_yaml(data: Any, stream: Any = None, *, sort_keys: bool = False) -> str | None:
    """``yaml.safe_dump`` for arvid's loader: strings that :func:`read_yaml` would read as numbers
    are quoted. Returns the text when ``stream`` is None (as ``yaml.safe_dump`` does)."""
    return yaml.dump(data, stream, Dumper=_Dumper, sort_keys=sort_keys)


def _refuse_overflow(value: Any, source: str, where: str, seen: set[int] | None = None) -> None:
    """Raise a ConfigError naming the key of the first :class:`_Overflow` in ``value`` (YAML
    aliases may share or nest containers: each is walked once)."""
    if isinstance(value, _Overflow):
        raise ConfigError(
            f"{source}: `{where or '<top level>'}` = {value.text} is out of the float range (it would become "
            f"inf); write .inf (or -.inf) for infinity, or quote it ('{value.text}') for a string")
    if not isinstance(value, (dict, list, set)):
        return
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        for k, v in value.items():
            name = k.text if isinstance(k, _Overflow) else k
            sub = f"{where}.{name}" if where else str(name)
            _refuse_overflow(k, source, sub, seen)
            _refuse_overflow(v, source, sub, seen)
    else:
        for i, v in enumerate(value):
            _refuse_overflow(v, source, f"{where}[{i}]", seen)


def _load(stream: Any, source: str, where: str = "") -> Any:
    """Parse YAML with :class:`_Loader`; a number too large for a float is a ConfigError naming
    ``source`` and its key (``where`` is the key of the whole value, for an override)."""
    data = yaml.load(stream, Loader=_Loader)
    _refuse_overflow(data, source, where)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=3"`` -> (["a", "b", "c"], 3). The value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = _load(raw, f"override {text!r}", key) if raw.strip() != "" else ""
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


def read_yaml(path: str | os.PathLike, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = Path(path)
    if path.resolve() in _including:
        chain = " -> ".join(str(p) for p in (*_including, path.resolve()))
        raise ConfigError(f"{str(path)!r} includes itself through `_base_` ({chain})")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path) as f:
            data = _load(f, str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: the top level must be a mapping, got {type(data).__name__}")
    # `_base_: other.yaml` includes another file (relative to this one); this file's keys win.
    base = data.pop("_base_", None)
    if base is not None:
        if not isinstance(base, (str, list)):
            raise ConfigError(f"{str(path)!r}: `_base_` must be a file name or a list of them, got {base!r}")
        bases = [base] if isinstance(base, str) else base
        merged: dict[str, Any] = {}
        for b in bases:
            if not isinstance(b, str):
                raise ConfigError(f"{str(path)!r}: `_base_` must be a file name or a list of them, got {b!r}")
            if not (path.parent / b).is_file():
                raise ConfigError(f"{str(path)!r}: its `_base_` file {str(path.parent / b)!r} does not exist")
            merged = deep_merge(merged, read_yaml(path.parent / b, (*_including, path.resolve())))
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

    write_text(path, dump_yaml(to_dict(obj)))


#: stands for the root that paths are made relative to (:func:`relocate_paths`)
ROOT_MARK = "<out_dir>"


def relocate_paths(obj: Any, root: str) -> Any:
    """``obj`` (a plain config dict) with every string path under ``root`` written relative to
    :data:`ROOT_MARK`: where an experiment lives, or how its directory is spelled, is not part of
    what its stages compute."""
    if isinstance(obj, dict):
        return {k: relocate_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relocate_paths(v, root) for v in obj]
    if isinstance(obj, str) and (obj == root or obj.startswith(root.rstrip(os.sep) + os.sep)):
        return ROOT_MARK + obj[len(root.rstrip(os.sep)):]
    return obj


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two nested records, sorted; both are compared as
    JSON reads them back (tuples as lists), so a record read from a file compares with one just made."""
    def diff(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for key in sorted(set(a) | set(b)) for k in diff(a.get(key), b.get(key), f"{prefix}{key}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return diff(json.loads(json.dumps(old)), json.loads(json.dumps(new)), "")


def changed_fields(old: Any, new: Any, ignore: Sequence[str] = ("out_dir",)) -> list[str]:
    """Dotted names of the fields whose values differ between configs ``old`` and ``new``
    (execution-only fields and ``ignore`` left out), sorted. Paths under the folder that holds a
    config's ``out_dir`` (the experiment's, for a pipeline stage) count relative to it, so an
    experiment moved or spelled otherwise has the same config."""
    def plain(cfg: Any) -> dict:
        d = fingerprint_dict(cfg)
        out_dir = getattr(cfg, "out_dir", None)
        if isinstance(out_dir, str) and out_dir:
            d = relocate_paths(d, str(Path(out_dir).parent))
        for key in ignore:
            d.pop(key, None)
        return d

    return changed_keys(plain(old), plain(new))


def check_same_config(cls: type[T], cfg: T, saved_path: str | os.PathLike, what: str,
                      allowed: Sequence[str] = ()) -> list[str]:
    """Refuse to continue the partial outputs of a run of another config: ``saved_path`` (that run's
    ``config.yaml``) against ``cfg``. Returns the changed fields, which may only be ``allowed`` ones;
    any other change is a :class:`ConfigError` naming them and ``what`` (the outputs that would be
    mixed). A missing ``saved_path`` changes nothing (no run before)."""
    saved_path = Path(saved_path)
    if not saved_path.is_file():
        return []
    try:
        saved = from_dict(cls, read_yaml(saved_path), source=str(saved_path))
    except (OSError, ValueError, ConfigError) as e:
        raise ConfigError(f"{what} were made by a run whose config {str(saved_path)!r} cannot be read ({e}): "
                          "give another out_dir, or delete that one") from e
    changed = changed_fields(saved, cfg)
    refused = [f for f in changed if f not in allowed]
    if refused:
        raise ConfigError(f"{what} were made with another config ({', '.join(refused[:8])} changed since "
                          f"{str(saved_path)!r}): continuing would mix them with this run's; give another out_dir, "
                          "or delete that one to start over")
    return changed


def config_fingerprint(obj: Any) -> str:
    """A short sha256 of the resolved config, used to tell pipeline stages' inputs apart."""
    import hashlib

    # Hashed, never read back: plain safe_dump keeps the fingerprints recorded by earlier runs
    # (dump_yaml only adds quotes, and str "1e3" and float 1000.0 hash apart either way).
    return hashlib.sha256(yaml.safe_dump(to_dict(obj), sort_keys=True).encode()).hexdigest()[:16]


#: appended to the help line of an execution-only field by :func:`describe`
EXECUTION_NOTE = "(execution only: not in the fingerprint)"


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: ``key: type = default  # help`` (nested configs recursively);
    execution-only fields end with :data:`EXECUTION_NOTE`."""
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
        help_text = f.metadata.get("help", "") + (f" {EXECUTION_NOTE}" if is_execution(f) else "")
        lines.append(f"{prefix}{f.name}: {_type_name(tp)} = {to_dict(default)!r}  # {help_text}")
    return lines
