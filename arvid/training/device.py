"""The one place that picks the device and the precision and sets backend flags.

Nothing here runs at import: :func:`setup_backends` is called by ``Trainer.fit`` and changes
global torch flags only for the length of the fit (it restores them on exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import NoReturn

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")


def parse_device(name: str) -> torch.device:
    """A device name given by the user (``cpu``, ``cuda``, ``cuda:N``, ``mps``...) as a
    :class:`torch.device`; a ConfigError that names it when it is no device or not on this machine
    (a CUDA device without a CUDA torch or GPU, an index past the GPUs), instead of a traceback from
    deep inside a stage."""
    from arvid.config import ConfigError

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: this torch has no CUDA or sees no GPU (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_device(name: str) -> torch.device:
    """A stage's ``device`` setting as a device: ``auto`` is this process's GPU if there is one
    (``cuda:<local rank>`` under torchrun, accelerate launch or mpirun, modulo the GPUs seen), else the CPU;
    any other name goes through :func:`parse_device`. The one rule every inference stage uses."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    return parse_device(name)


#: Where launchers put this process's rank on its node: torchrun / accelerate, then MPI launchers
#: (Open MPI, MVAPICH, Intel MPI), as accelerate reads them.
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def local_rank() -> int:
    """This process's rank on its node (0 when no launcher set one)."""
    for var in LOCAL_RANK_VARS:
        if os.environ.get(var, "").strip():
            return int(os.environ[var])
    return 0


def inference_autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context for tokenizer inference (curation, curves, tokenizing, decoding samples).

    ``auto``: bf16 autocast on CUDA, as the tokenizers were trained (fp32 without TF32 runs an S
    tokenizer ~10x slower on an H100), and plain fp32 on the CPU, where bf16 is slow; ``bf16``: bf16
    autocast on any device; ``fp32``: no autocast (exact fp32, for comparisons across devices).
    """
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def accelerate_precision(precision: str) -> str:
    """arvid's precision name -> accelerate's ``mixed_precision`` (``fp32`` -> ``no``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return "no" if precision == "fp32" else "bf16"


def check_precision(precision: str, device: torch.device) -> None:
    """Fail early, with the reason, when ``device`` cannot run ``precision``.

    bf16 autocast runs on every CPU (slowly where the CPU has no bf16 units) and on CUDA GPUs
    from Ampere on; older GPUs would silently emulate it.
    """
    accelerate_precision(precision)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16 support; use precision='fp32'"
        )


def backend_flags() -> tuple:
    """The process-wide flags :func:`setup_backends` changes, to hand to :func:`restore_backend_flags`."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)


def restore_backend_flags(flags: tuple) -> None:
    """Put back what :func:`backend_flags` read (``Trainer.fit`` does, so TF32 does not outlive a fit)."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags[0], flags[1]
    torch.set_float32_matmul_precision(flags[2])
    torch.backends.cudnn.benchmark = flags[3]


def setup_backends(device: torch.device, tf32: bool = True) -> None:
    """Per-run backend flags: TF32 matmuls and convolutions on CUDA (about 2x faster fp32 on A100/H100).

    TF32 keeps fp32's range with a 10-bit mantissa, which training tolerates; set ``tf32=False``
    for bit-exact fp32 comparisons.
    """
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    # Fixed shapes dominate training steps, so let cuDNN pick the fastest convolution algorithm.
    torch.backends.cudnn.benchmark = True


#: set once this process has torn a process group down (see :func:`exit_process`)
_TORN_DOWN = False


def shutdown_distributed(clean: bool = True) -> None:
    """Destroy the default process group, if one was set up, while the interpreter is whole.

    Left to interpreter shutdown, gloo's worker threads can be torn down mid-flight and abort the
    process ("terminate called without an active exception", exit -6) after all its work is
    done: seen in a 2-process CPU test, also with an explicit ``destroy_process_group`` whose
    peer was still writing its results. So, after a run that ended normally (``clean``), the
    processes first meet at a barrier (none is mid-collective or still working when the group
    goes away), then garbage still holding communication buffers (DDP reducers, finished work
    objects) is collected, then the group is destroyed. After a failure (``clean=False``) there
    is no barrier: a peer may be waiting in another collective, and the launcher stops it."""
    import gc

    import torch.distributed as dist

    global _TORN_DOWN
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        try:
            dist.barrier()
        except RuntimeError as e:  # a peer is gone (it failed; the launcher reports it)
            log.warning("barrier before the process group's teardown failed: %s", e)
    gc.collect()
    dist.destroy_process_group()
    _TORN_DOWN = True


@contextlib.contextmanager
def distributed_teardown():
    """Run the body, then :func:`shutdown_distributed`: clean (with the barrier) after a body that
    returned, without the barrier after one that raised (the exception goes on)."""
    try:
        yield
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()


def exit_process(rc: int | None) -> NoReturn:
    """End a script with exit status ``rc``. A process that ran in a process group (torn down by
    :func:`shutdown_distributed`) flushes its output and leaves through ``os._exit``: interpreter
    finalization is where gloo's threads abort a finished process (see above), and nothing of
    a finished run is left for it to do. Any other process exits normally (``sys.exit``)."""
    import os
    import sys

    if not _TORN_DOWN:
        sys.exit(rc)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(rc or 0))


def make_accelerator(precision: str, cpu: bool, find_unused_parameters: bool = False, log_dir: str | None = None):
    """An ``accelerate.Accelerator`` for ``precision`` on CPU (``cpu=True``) or the launcher's device.

    accelerate keeps one process-wide ``AcceleratorState`` and refuses a second Accelerator with
    another precision. In a single process (tests, notebooks, a pipeline that trains a
    tokenizer in fp32 then a generator in bf16) that state holds nothing that outlives a run,
    so it is reset; under ``accelerate launch`` the launcher's state is kept and a mismatch is
    accelerate's own error.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    mixed = accelerate_precision(precision)
    state = AcceleratorState._shared_state  # a class-level dict; empty until the first Accelerator
    if state and not PartialState().use_distributed:
        on_cpu = PartialState().device.type == "cpu"
        wrong_device = (cpu and not on_cpu) or (not cpu and on_cpu and torch.cuda.is_available())
        if state.get("_mixed_precision") != mixed or wrong_device:
            AcceleratorState._reset_state(reset_partial_state=True)
    kwargs = {}
    if log_dir is not None:
        kwargs = {"log_with": "tensorboard", "project_dir": log_dir}
    return Accelerator(
        mixed_precision=mixed,
        cpu=cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        **kwargs,
    )


def tensorboard_available() -> bool:
    """Whether accelerate can log to TensorBoard here (the ``tensorboard`` package is installed)."""
    from accelerate.utils import is_tensorboard_available

    return bool(is_tensorboard_available())
