"""The tokenizer protocol and registry: what makes the tokenizer pluggable.

The generator and the sampler see a tokenizer only through :class:`VideoTokenizer`.
Implementations register by name (``@register_tokenizer("evatok")``); third-party packages
plug in through the entry-point group ``arvid.tokenizers`` (``name = "pkg.module:Class"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from arvid.config import ConfigError, from_dict, read_yaml
from arvid.data.types import BlockLayout, TokenizedVideo

ENTRY_POINT_GROUP = "arvid.tokenizers"


@runtime_checkable
class VideoTokenizer(Protocol):
    """What every tokenizer offers. Videos are model-facing ``float [B, C, T, H, W]`` in [-1, 1]."""

    layout: BlockLayout
    codebook_size: int

    def encode(self, video: torch.Tensor, assignment: torch.Tensor | None = None) -> TokenizedVideo:
        """Tokenize ``video``; ``assignment`` ``LongTensor[B, K]`` (None: the router's or the fixed one)."""
        ...

    def decode(self, tokens: TokenizedVideo) -> torch.Tensor:
        """Codes -> ``float [B, C, T, H, W]`` in about [-1, 1]."""
        ...

    def save_pretrained(self, directory: str | os.PathLike) -> Path: ...

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> VideoTokenizer: ...

    def fingerprint(self) -> str: ...


_REGISTRY: dict[str, type] = {}


def register_tokenizer(name: str):
    """Class decorator: make a tokenizer buildable and loadable by ``name``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"tokenizer name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.model_kind = name
        return cls

    return wrap


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        cls = ep.load()
        _REGISTRY.setdefault(ep.name, cls)
        if not getattr(cls, "model_kind", ""):
            cls.model_kind = ep.name


def _load_builtin() -> None:
    # Importing the modules runs their @register_tokenizer decorators.
    import importlib

    for mod in ("arvid.tokenizer.evatok", "arvid.tokenizer.grid3d"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def available_tokenizers() -> list[str]:
    _load_builtin()
    _load_entry_points()
    return sorted(_REGISTRY)


def tokenizer_class(name: str) -> type:
    """The class registered as ``name`` (built-in or through the ``arvid.tokenizers`` entry points)."""
    _load_builtin()
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown tokenizer {name!r}{hint} (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def tokenizer_config(name: str, config: dict | None = None, preset: str | None = None, source: str = "<config>",
                     prefix: str = "tokenizer."):
    """The validated config of tokenizer ``name`` (a preset plus overrides), without building the model:
    enough for its ``layout``. ``prefix``: where the keys sit in the user's config (named in errors)."""
    cls = tokenizer_class(name)
    if preset and preset not in cls.presets():
        raise ConfigError(f"{source}: tokenizer {name!r} has no preset {preset!r} (presets: {list(cls.presets())})")
    base = dict(cls.presets()[preset]) if preset else {}
    base.update(config or {})
    return from_dict(cls.config_class, base, source=source, prefix=prefix)


def build_tokenizer(name: str, config: dict | None = None, preset: str | None = None, source: str = "<config>",
                    prefix: str = "tokenizer."):
    """Build tokenizer ``name`` from a preset (``debug``, ``S``, ``B`` ...) plus config overrides."""
    return tokenizer_class(name)(tokenizer_config(name, config, preset, source, prefix))


def load_tokenizer(directory: str | os.PathLike, map_location: str = "cpu"):
    """Load any registered tokenizer from a pretrained directory (its ``config.yaml`` names the kind)."""
    path = Path(directory) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a tokenizer directory: config.yaml is missing")
    kind = read_yaml(path).get("kind")
    if kind in ("gpt", "router"):
        raise ConfigError(f"{str(directory)!r} holds a {kind}, not a tokenizer (its config.yaml says kind: {kind}); "
                          "give the tokenizer's directory (e.g. <run>/tokenizer)")
    if not kind:
        raise ConfigError(f"{str(path)!r} does not say which tokenizer it holds (no `kind`)")
    return tokenizer_class(kind).from_pretrained(directory, map_location=map_location)
