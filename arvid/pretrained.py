"""``save_pretrained`` / ``from_pretrained`` for every model: a directory with the constructor's
config (``config.yaml``) beside safetensors weights (``model.safetensors``), written atomically
and loaded strictly.

A model class that uses :class:`PretrainedMixin` has a ``config`` attribute (a dataclass),
a class attribute ``config_class`` and a constructor ``__init__(self, config)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import yaml

from arvid.config import ConfigError, dump_yaml, from_dict, read_yaml, to_dict
from arvid.io import atomic_dir, hash_state, load_state_strict, load_weights, save_weights

M = TypeVar("M", bound="PretrainedMixin")

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


class PretrainedMixin:
    config_class: ClassVar[type]
    #: the name written into config.yaml (``kind``) so a loader can tell what a directory holds
    model_kind: ClassVar[str] = ""
    config: Any

    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``config.yaml`` and ``model.safetensors`` into ``directory`` (replaced atomically)."""
        assert isinstance(self, torch.nn.Module)
        directory = Path(directory)
        meta = {"kind": self.model_kind or type(self).__name__, "config": to_dict(self.config)}
        if extra:
            meta.update(extra)
        with atomic_dir(directory) as tmp:
            save_weights(self.state_dict(), tmp / WEIGHTS_NAME)
            with open(tmp / CONFIG_NAME, "w") as f:
                dump_yaml(meta, f)  # quotes strings such as '1e3' that arvid's loader reads as numbers
        return directory

    @classmethod
    def read_pretrained_config(cls, directory: str | os.PathLike) -> tuple[dict, Any]:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not a pretrained directory: {CONFIG_NAME} is missing")
        meta = read_yaml(path)  # a damaged file: a ConfigError naming it (not YAML, not UTF-8, not a mapping)
        kind = cls.model_kind or cls.__name__
        if meta.get("kind") != kind:
            raise ConfigError(f"{str(path)!r} holds a {meta.get('kind')!r}, not a {kind!r}")
        config = meta.get("config")
        if not isinstance(config, dict):  # from_dict would fail on it with a message naming neither
            raise ConfigError(f"{str(path)!r}: `config` must be a mapping of {cls.config_class.__name__} fields, "
                              f"got {'nothing' if config is None else type(config).__name__}")
        return meta, from_dict(cls.config_class, config, source=str(path), prefix="config.")

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike, map_location: str = "cpu") -> M:
        """Rebuild from ``config.yaml``, load the weights strictly (mismatched keys are named) and
        return the model on ``map_location``."""
        _, config = cls.read_pretrained_config(directory)
        model = cls(config)  # type: ignore[call-arg]
        state = load_weights(Path(directory) / WEIGHTS_NAME, device=map_location)
        _take_saved_dtypes(model, state)  # type: ignore[arg-type]
        load_state_strict(model, state, str(Path(directory) / WEIGHTS_NAME))  # type: ignore[arg-type]
        # load_state_dict copies into the parameters where they are (the CPU, as built): the model
        # must move itself, or every map_location="cuda" caller silently runs on the CPU.
        return model.to(map_location)  # type: ignore[attr-defined,return-value]

    def fingerprint(self) -> str:
        """sha256 over the kind, the config and every weight: equal iff the model computes the same thing."""
        assert isinstance(self, torch.nn.Module)
        # hashed, never read back: plain safe_dump keeps the fingerprints recorded in token stores
        extra = yaml.safe_dump({"kind": self.model_kind, "config": to_dict(self.config)}, sort_keys=True)
        return hash_state(self.state_dict(), extra)


def _take_saved_dtypes(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``model`` (as built: float32) the floating dtypes its weights were saved in, which
    ``load_state_dict`` would otherwise cast to float32: a model saved in bf16 loads in bf16 (the
    same computation, and the same :meth:`PretrainedMixin.fingerprint`), not in float32."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    differ = [k for k, t in state.items() if k in own and t.is_floating_point() and own[k].is_floating_point()
              and t.dtype != own[k].dtype]
    if not differ:
        return
    saved = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(saved) == 1:  # saved after `model.to(dtype)`: cast as that did, non-persistent buffers too
        model.to(saved.pop())
        return
    for k in differ:
        own[k].data = own[k].data.to(state[k].dtype)


def num_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
