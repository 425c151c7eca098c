"""Options of torch's inductor compiler for a compiled training step, checked before compiling.

``torch.compile(model, options=...)`` applies them to that compilation alone. An unknown name or a
value of the wrong type is refused here, naming the option, its type and the installed torch,
instead of failing (or being ignored) at the first step. Values may come typed (YAML) or as text
(a ``KEY=VALUE`` command-line flag); text is read as the option's current type."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from arvid.config import ConfigError


def check_inductor_options(options: Mapping[str, Any], where: str = "compile_options") -> dict[str, Any]:
    """``{name: value}`` -> the same options with values of the types ``torch._inductor.config``
    holds (text converted: ``"2"`` -> 2, ``"false"`` -> False, ``"None"`` -> None for options that
    are None or text). Raises :class:`ConfigError` naming ``where.name`` for an unknown option or a
    value that does not fit."""
    if not options:  # nothing to check: no import of the compiler (it loads torch._dynamo, ~1 s)
        return {}
    import torch._inductor.config as inductor_config

    out: dict[str, Any] = {}
    for key, value in options.items():
        name = f"{where}.{key}"
        if not isinstance(key, str) or key.startswith("_") or not hasattr(inductor_config, key):
            raise ConfigError(f"{name}: not an option of torch._inductor.config in torch {torch.__version__} "
                              "(see torch/_inductor/config.py)")
        current = getattr(inductor_config, key)
        try:
            out[key] = _typed(value, current)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: the option holds a {type(current).__name__} ({current!r}); got "
                              f"{value!r} ({exc})") from None
    return out


def _typed(value: Any, current: Any) -> Any:
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ValueError("expected true or false")
    if isinstance(current, (int, float)):
        if isinstance(value, bool):
            raise ValueError(f"expected a {type(current).__name__}, not a bool")
        if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
            raise ValueError("expected a whole number")
        return type(current)(value)
    if isinstance(current, str):
        if isinstance(value, str):
            return value
        raise ValueError("expected text")
    if current is None:  # an optional setting (a number or a name): text that reads as a number is one
        if value is None or value == "None":
            return None
        if isinstance(value, str):
            for kind in (int, float):
                try:
                    return kind(value)
                except ValueError:
                    pass
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise ValueError("expected text, a number or None")
    raise TypeError(f"options of type {type(current).__name__} cannot be set here")
