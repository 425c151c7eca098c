"""Training checkpoints: one directory per saved step, written atomically, no pickled code.

Layout of ``<out_dir>/checkpoints/step_00001000/``::

    model.safetensors     the task's state dict (model + loss modules, e.g. a discriminator)
    ema.safetensors       EMA shadow weights of ``task.ema_model()`` (only when EMA is on)
    optimizer.pt          {group name: AdamW state dict}       torch.load(weights_only=True)
    rng.pt                {"ranks": [per-process RNG states]}  torch.load(weights_only=True)
    trainer_state.json    step, epoch, position in the epoch, losses, process count
    config.yaml           the resolved TrainerConfig

The directory is built under a temporary dot-name and renamed into place
(:func:`arvid.io.atomic_dir`), so a kill -9 or an exception during a save leaves either the
previous checkpoints alone or a complete new one, never a half-written ``step_*``.
The lr schedule is a pure function of the step, so the step is the whole scheduler state.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from arvid.config import save_config
from arvid.io import (
    atomic_dir,
    discard_dir,
    load_state_strict,
    load_weights,
    read_json,
    save_weights,
    torch_load_safe,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step_(\d+)$")


def checkpoint_dir(out_dir: str | os.PathLike, step: int) -> Path:
    """``<out_dir>/checkpoints/step_<step, 8 digits>``."""
    return Path(out_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir/checkpoints`` as ``(step, path)``, oldest first.

    Temporary directories of an interrupted save start with a dot and are never listed.
    """
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``out_dir``, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete leftovers of saves that were killed mid-write (``.step_*.tmp``, ``.step_*.old-*``)."""
    root = Path(out_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".step_") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


#: what a resumed run may change beyond the execution-only fields: more steps, and how the global
#: batch is cut into micro-batches or placed (the same data order and loss: the Trainer's contract)
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.grad_accum", "trainer.device")


def check_resumable(cls: type, cfg: Any, out_dir: str | os.PathLike, stage: str) -> None:
    """Refuse to let a stage's Trainer resume the checkpoints in ``out_dir`` when they were made
    with another config (``out_dir/config.yaml``, the stage config ``cls``) than ``cfg``: only
    :data:`RESUME_MAY_CHANGE` may differ. No checkpoints: nothing to check."""
    from arvid.config import check_same_config

    if list_checkpoints(out_dir):
        check_same_config(cls, cfg, Path(out_dir) / "config.yaml", f"{stage}: the checkpoints in {str(out_dir)!r}",
                          allowed=RESUME_MAY_CHANGE)


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(out_dir)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:  # a kill mid-delete leaves hidden debris (remove_stale_temporaries), no half checkpoint
        try:
            discard_dir(p)
        except OSError as e:  # pruning must not stop training: the next prune (or rerun) tries again
            log.warning("could not prune checkpoint %s: %s", p, e)
    return doomed


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) RNG states, as tensors and numbers.

    Everything is a tensor, int, float, str or None so the file loads with ``weights_only=True``.
    """
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(
        (state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), state["python_gauss"])
    )
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model_state: Mapping[str, torch.Tensor],
    optimizer_states: Mapping[str, dict],
    rng_states: list[dict[str, Any]],
    trainer_state: dict[str, Any],
    config: Any,
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write one checkpoint directory atomically (see the module docstring for its files)."""
    from arvid.io import write_json

    path = Path(path)
    with atomic_dir(path) as tmp:
        save_weights(model_state, tmp / MODEL_FILE)
        if ema_state is not None:
            save_weights(ema_state, tmp / EMA_FILE)
        torch.save(dict(optimizer_states), tmp / OPTIMIZER_FILE)
        torch.save({"ranks": list(rng_states)}, tmp / RNG_FILE)
        save_config(config, tmp / CONFIG_FILE)
        write_json(tmp / STATE_FILE, trainer_state)
    return path


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint (step, epoch, losses, ...)."""
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a training checkpoint: {STATE_FILE} is missing")
    return read_json(file)


def load_optimizer_states(path: str | os.PathLike) -> dict[str, dict]:
    """``{group name: optimizer state dict}``, loaded with ``weights_only=True``."""
    return torch_load_safe(Path(path) / OPTIMIZER_FILE)


def load_rng_states(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-process RNG states (index = process rank), loaded with ``weights_only=True``."""
    return torch_load_safe(Path(path) / RNG_FILE)["ranks"]


def load_checkpoint_weights(ckpt_dir: str | os.PathLike, task: nn.Module, ema: bool = False) -> nn.Module:
    """Load a checkpoint's weights strictly into ``task`` and return it.

    ``ema=False``: ``model.safetensors`` into the whole task. ``ema=True``: the EMA weights
    (``ema.safetensors``) into ``task.ema_model()`` (or the task when it defines none), which is
    what ``Trainer.final_model()`` returns after training.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist")
    if not ema:
        load_state_strict(task, load_weights(ckpt_dir / MODEL_FILE), str(ckpt_dir / MODEL_FILE))
        return task
    file = ckpt_dir / EMA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{str(ckpt_dir)!r} holds no EMA weights ({EMA_FILE}): the run had ema_decay=0")
    target = ema_target(task)
    state = load_weights(file)
    own = target.state_dict()
    # The shadow is float32; cast to the module's dtypes so a bf16 model loads it as is.
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    load_state_strict(target, state, str(file))
    return task


def ema_target(task: nn.Module) -> nn.Module:
    """The module whose EMA is kept: ``task.ema_model()`` when defined and not None, else the task."""
    fn = getattr(task, "ema_model", None)
    module = fn() if callable(fn) else None
    if module is None:
        return task
    if not isinstance(module, nn.Module):
        raise TypeError(f"{type(task).__name__}.ema_model() must return an nn.Module or None, got {type(module).__name__}")
    return module
