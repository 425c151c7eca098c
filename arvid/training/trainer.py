"""One Trainer for every model in arvid, on HuggingFace accelerate.

A model plugs in through a *task*: an ``nn.Module`` holding the model and its loss modules,
with ``training_step(batch, step, generator) -> StepOutput`` and optionally
``optimizer_groups()``, ``ema_model()``, ``loss_weight(batch)``, ``host_metrics(batch)`` and
``trains_group(name, step) -> bool`` (False: group ``name`` takes no optimizer step at ``step``,
no weight decay and no Adam step count either, e.g. a GAN discriminator before its start step;
a function of the step alone, so a resume repeats it). The Trainer owns everything else: devices and
precision, data order and sharding, gradient accumulation and clipping, lr schedules, EMA,
checkpoints, exact resume, logging.

    trainer = Trainer(TrainerConfig(max_steps=1000, batch_size=64), task, dataset, "runs/x")
    result = trainer.fit()          # resumes from runs/x/checkpoints when resume=True
    model = trainer.final_model()   # EMA weights when ema_decay > 0

Randomness. ``training_step`` gets a CPU ``torch.Generator`` seeded from (seed, step, rank,
micro-batch): draw on the CPU and move (``torch.rand(..., generator=g).to(x.device)``), so the
same seed gives the same draws on any device and a resumed step repeats exactly. The global
python/numpy/torch RNG states (dropout) are saved per process in each checkpoint.

Data order. ``batch_size`` is the *global* batch of one optimizer step. Each epoch is a
permutation that depends on ``(seed, epoch)`` only, cut into global batches; each global batch
is cut into ``grad_accum`` micro-batches and each micro-batch into one slice per process. So
1 process and N processes see the same global batches, and a resumed run skips exactly the
batches its checkpoint had consumed. A dataset with ``set_epoch(e)`` (the file datasets: random
clip starts and flips per epoch) is told each epoch before its loader starts, a resumed one the
epoch it resumes in. The loss is averaged over the global batch (each process
averages its slice, gradients are averaged across processes and micro-batches), so the loss
curve does not depend on the number of processes or on ``grad_accum``. That holds when every
slice weighs the same (equal numbers of items); a task whose slices hold different amounts of
what its loss averages over (a packed token batch: loss tokens) defines ``loss_weight(batch) ->
float`` (on the host batch, before it moves to the device): the step's micro-batches are then
fetched first, their weights summed over processes (one small all-reduce), and each slice's
mean loss is scaled by its share, so the step optimises the mean over the whole global batch.
``host_metrics(batch) -> dict`` (optional) is likewise called on each micro-batch while it is still
on the host: counts read there (tokens, for ``tokens_per_s``) cost no wait for the device, where
reading them off the device batch inside ``training_step`` stalls the step until its forward pass
has run (and, under ``compile``, breaks the graph).

Distribution. Launch with ``accelerate launch`` and the same code runs on N processes.
Tasks with one optimizer group are wrapped in DDP by ``accelerator.prepare`` (gradient
all-reduce overlaps the backward pass). Tasks with several groups (a GAN: generator and
discriminator) compute one loss per group in one ``training_step``; each loss is
back-propagated into its own group's parameters only (``backward(inputs=...)``), which DDP's
one-backward-per-step reducer cannot follow, so their gradients are averaged across processes
by one bucketed all-reduce per step instead. On a machine without GPUs,
``accelerate launch --multi_gpu --num_processes N`` gives N gloo CPU processes; note that
``accelerate launch --cpu --num_processes N`` starts ONE process (several need mpirun).

FSDP. ``accelerate launch --use_fsdp --fsdp_version 2 --num_processes N`` shards the task with
torch's FSDP2 (``fully_shard``) over the N processes: parameters, gradients, optimizer state and
EMA shadow are split across processes, gradients are reduce-scattered (averaged) in the backward
pass of every micro-batch, and gradient clipping uses the global norm over all shards; the loss
curve and the weights match 1 process with the same global batch (up to float summation order).
The Trainer calls ``fully_shard`` itself rather than ``accelerator.prepare``, because accelerate
switches to FSDP on accelerators only (gloo CPU processes get MULTI_CPU, and the launcher's FSDP
settings are read from its environment), so GPU and CPU processes run the same code. Process 0's weights are
broadcast before sharding, as under DDP. Honoured plugin options: ``fsdp_auto_wrap_policy``
(``TRANSFORMER_BASED_WRAP`` with ``fsdp_transformer_layer_cls_to_wrap``, or ``SIZE_BASED_WRAP``
with ``fsdp_min_num_params``: those submodules become FSDP units of their own),
``fsdp_reshard_after_forward`` and ``fsdp_offload_params``. Precision is
``TrainerConfig.precision`` (autocast) as in every mode, so FSDP's mixed-precision policy is not
used; activation checkpointing and the other plugin options are ignored. Checkpoints are the
same files as a single process writes (full weights, optimizer and EMA state, gathered tensor by
tensor onto process 0's CPU), so a run resumes on any number of processes, with or without
FSDP. The task stays sharded after ``fit()``: its ``state_dict()`` holds shards (DTensors);
``final_model()`` returns a plain copy with the full (EMA) weights and is a collective (every
process must call it). ``eval_fn`` runs with the full parameters in the task's modules
(gathered on every process for the call). Refused with an error: FSDP1 (``--fsdp_version 1``, the
launcher's default), tasks with several optimizer groups (their per-group
``backward(inputs=...)`` does not fit FSDP's gradient hooks: train GANs with DDP), DeepSpeed and
Megatron-LM.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from arvid.config import ConfigError, doc, save_config
from arvid.io import check_writable, load_state_strict, load_weights
from arvid.training import checkpoint as ckpt
from arvid.training.device import (
    backend_flags,
    check_precision,
    make_accelerator,
    restore_backend_flags,
    setup_backends,
    tensorboard_available,
)
from arvid.training.ema import EMA
from arvid.training.inductor import check_inductor_options
from arvid.training.logging import MetricsLogger
from arvid.training.profiling import StepProfiler
from arvid.training.schedules import make_schedule

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- config and types


def check_batch_split(batch_size: int, grad_accum: int, num_processes: int) -> None:
    """The global batch must split into ``grad_accum`` micro-batches on each of ``num_processes``."""
    if batch_size % (grad_accum * num_processes):
        raise ValueError(f"batch_size={batch_size} must be divisible by grad_accum * processes = "
                         f"{grad_accum} * {num_processes}")


@dataclass
class TrainerConfig:
    """Everything the Trainer needs besides the task and the data."""

    max_steps: int = doc(1000, "optimizer steps to train for (the run's length, also the schedules' horizon)")
    batch_size: int = doc(32, "GLOBAL batch per optimizer step, over all processes and micro-batches; "
                          "must be divisible by grad_accum * num_processes")
    lr: float = doc(3e-4, "peak learning rate (a group's lr_scale multiplies it)")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay for parameters with >= 2 dims")
    betas: tuple[float, float] = doc((0.9, 0.95), "AdamW betas")
    eps: float = doc(1e-8, "AdamW epsilon")
    schedule: Literal["cosine", "wsd", "constant"] = doc("cosine", "lr schedule after warmup")
    warmup_steps: int = doc(0, "linear warmup steps")
    decay_fraction: float = doc(0.2, "wsd: fraction of max_steps spent in the final linear decay")
    min_lr_ratio: float = doc(0.1, "cosine/wsd: the lr floor, as a fraction of lr: wsd trains its last step at "
                                   "it, cosine approaches it at max_steps (its last step, max_steps - 1, is "
                                   "slightly above)")
    precision: Literal["fp32", "bf16"] = doc("fp32", "fp32, or bf16 autocast (accelerate mixed precision)")
    grad_accum: int = doc(1, "micro-batches per optimizer step (memory knob; the global batch stays batch_size)")
    grad_clip: float = doc(1.0, "clip each group's gradient norm to this; 0 = no clipping")
    ema_decay: float = doc(0.0, "EMA decay of task.ema_model() weights (float32 shadow); 0 = no EMA")
    checkpoint_every: int = doc(1000, "save a checkpoint every N steps (and always at the end); 0 = only at the end",
                                execution=True)
    keep_last: int = doc(2, "checkpoints to keep (older ones are deleted)", execution=True)
    log_every: int = doc(10, "log loss/metrics/lr/throughput every N steps (means over the steps since the last "
                             "record; lr/* and grad_norm/* are the last step's, grad_norm_max/* the largest; the first record after a resume between two log steps covers only the "
                             "steps since the resume and says how many in `window_steps`)", execution=True)
    eval_every: int = doc(0, "call eval_fn(task, step) every N steps on the main process; 0 = never")
    seed: int = doc(0, "seeds the data order, the per-step generators and the global RNGs")
    shuffle: bool = doc(True, "shuffle the data each epoch (a permutation from (seed, epoch))")
    num_workers: int = doc(0, "DataLoader worker processes per training process", execution=True)
    compile: bool = doc(False, "torch.compile the training step", execution=True)
    compile_options: dict[str, Any] = doc({}, "with compile: torch._inductor.config options for the step's "
                                              "compilation, e.g. {max_pointwise_cat_inputs: 2}; names and "
                                              "types checked against the installed torch", execution=True)
    resume: bool = doc(True, "continue from the newest checkpoint in out_dir/checkpoints if there is one",
                       execution=True)
    device: Literal["auto", "cpu"] = doc("auto", "auto: the launcher's device (GPU when there is one); cpu: force CPU")
    tf32: bool = doc(True, "allow TF32 matmuls/convolutions on CUDA")
    find_unused_parameters: bool = doc(False, "DDP: set when some trainable parameters get no gradient in a step",
                                        execution=True)
    progress: bool = doc(True, "show a tqdm bar (only on a TTY, only on the main process)", execution=True)
    profile_start: int = doc(-1, "profile optimizer steps profile_start .. + profile_steps - 1 (0-based) with "
                             "torch.profiler: out_dir/profile.txt and profile_trace.json; -1 = off", execution=True)
    profile_steps: int = doc(5, "steps recorded when profile_start >= 0", execution=True)
    loss_check: Literal["auto", "sync", "deferred"] = doc(
        "auto", "the NaN/inf check of each step's loss. sync: the host reads the losses before the optimizer "
        "step (one device sync per step); deferred: the fused optimizer skips a non-finite step on the device "
        "and the host reads the losses one step later, so the host never waits for the GPU (a CPU run uses the "
        "fused AdamW then); auto: deferred on CUDA with fused optimizers and without FSDP, else sync",
        execution=True)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"TrainerConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        need(self.max_steps >= 1, "max_steps", ">= 1")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.lr > 0, "lr", "> 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        need(self.schedule in ("cosine", "wsd", "constant"), "schedule", "'cosine', 'wsd' or 'constant'")
        need(self.warmup_steps >= 0, "warmup_steps", ">= 0")
        need(0 < self.decay_fraction <= 1, "decay_fraction", "in (0, 1]")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        if self.schedule == "wsd":
            from arvid.training.schedules import wsd_decay_steps

            stable_end = self.max_steps - wsd_decay_steps(self.max_steps, self.decay_fraction)
            need(self.warmup_steps <= stable_end, "warmup_steps",
                 f"<= {stable_end} under schedule wsd (max_steps {self.max_steps} less the decay's "
                 f"{self.max_steps - stable_end} steps): a warmup into the decay cuts the decay short")
        need(self.precision in ("fp32", "bf16"), "precision", "'fp32' or 'bf16'")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(isinstance(self.compile_options, dict), "compile_options", "a mapping of inductor option names to values")
        self.compile_options = check_inductor_options(self.compile_options, "TrainerConfig.compile_options")
        need(self.batch_size % self.grad_accum == 0, "batch_size", f"divisible by grad_accum={self.grad_accum}")
        need(self.grad_clip >= 0, "grad_clip", ">= 0 (0 = off)")
        need(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) (0 = off)")
        need(self.checkpoint_every >= 0, "checkpoint_every", ">= 0")
        need(self.keep_last >= 1, "keep_last", ">= 1")
        need(self.log_every >= 1, "log_every", ">= 1")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.num_workers >= 0, "num_workers", ">= 0")
        need(self.profile_start >= -1, "profile_start", ">= 0, or -1 (off)")
        need(self.profile_steps >= 1, "profile_steps", ">= 1")
        need(self.loss_check in ("auto", "sync", "deferred"), "loss_check", "'auto', 'sync' or 'deferred'")


@dataclass
class StepOutput:
    """What ``task.training_step`` returns.

    ``losses``: one scalar tensor per optimizer group (``{"main": loss}`` for one group), each
    the MEAN over the step's (micro-)batch on this process.
    ``metrics``: floats or scalar tensors to log (averaged over micro-batches, processes and the
    log window). Three keys are counts, summed over the window and divided by its wall time:
    ``tokens`` -> ``tokens_per_s`` (all processes), ``flops`` -> ``tflops`` (per process) and
    ``peak_seconds`` (the FLOPs over the accelerator's peak rate) -> ``mfu`` (per process). Read
    that way a rate does not depend on where in the step the task counts (``host_metrics`` counts
    before the device has run anything).
    """

    losses: dict[str, torch.Tensor]
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass
class FitResult:
    """What ``Trainer.fit`` returns."""

    step: int  #: optimizer steps done (== max_steps after a complete run)
    losses: dict[str, float]  #: the last step's global-batch loss per group
    wall_time_s: float  #: seconds this fit() call took
    checkpoint: Path | None  #: the newest checkpoint written or found
    history: list[dict[str, Any]] = field(default_factory=list)  #: the records logged by this call

    @property
    def loss(self) -> float:
        """The last step's loss of the first group (``main`` for one-group tasks)."""
        return next(iter(self.losses.values())) if self.losses else float("nan")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the step was not applied, the last checkpoint is intact."""

    def __init__(self, step: int, name: str, value: float, checkpoint: Path | None):
        self.step, self.name, self.value, self.checkpoint = step, name, value, checkpoint
        where = (f"the last good checkpoint is {str(checkpoint)!r} (rerun with resume=True to continue from it)"
                 if checkpoint is not None else "no checkpoint was written yet")
        super().__init__(
            f"non-finite loss at step {step}: losses[{name!r}] = {value} (global-batch mean); "
            f"the weights were not updated with it; {where}"
        )


# --------------------------------------------------------------------------- seeds and data order


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as ``(seed, "step", step, rank)``; stable across runs and platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """The CPU ``torch.Generator`` handed to ``training_step``: a function of (seed, step, rank, micro)."""
    return torch.Generator().manual_seed(derive_seed(seed, "step", step, rank, micro))


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The data order of ``epoch``: ``LongTensor[n]``, a function of (seed, epoch) only."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's micro-batches of one epoch, from global batch ``start_batch`` on.

    Global batch ``b`` is ``perm[b*B : (b+1)*B]``; its micro-batch ``m`` is the
    ``m``-th of ``grad_accum`` equal slices, and process ``r`` takes the ``r``-th of
    ``num_processes`` equal slices of that. A trailing partial global batch is dropped.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, num_processes: int, rank: int,
                 seed: int, epoch: int, start_batch: int = 0, shuffle: bool = True):
        check_batch_split(batch_size, grad_accum, num_processes)
        self.n, self.batch_size, self.grad_accum = n, batch_size, grad_accum
        self.num_processes, self.rank, self.seed, self.epoch = num_processes, rank, seed, epoch
        self.start_batch, self.shuffle = start_batch, shuffle
        self.micro = batch_size // grad_accum
        self.per_process = self.micro // num_processes

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch) * self.grad_accum

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        for b in range(self.start_batch, self.batches_per_epoch):
            for m in range(self.grad_accum):
                lo = b * self.batch_size + m * self.micro + self.rank * self.per_process
                yield perm[lo:lo + self.per_process].tolist()


# --------------------------------------------------------------------------- internals


@dataclass
class _Group:
    name: str
    params: list[nn.Parameter]
    lr_scale: float
    weight_decay: float
    betas: tuple[float, float]


_SUPPORTED_DISTRIBUTED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_MUSA",
                          "MULTI_SDAA", "MULTI_HPU")


@dataclass
class _Run:
    """What ``Trainer._setup`` builds for one ``fit()``."""

    acc: Any  # accelerate.Accelerator
    device: torch.device
    model: nn.Module  # _StepModule, DDP-wrapped (and compiled) when so configured
    groups: list[_Group]
    names: list[str]
    optimizers: dict[str, torch.optim.Optimizer]
    schedule: Callable[[int], float]
    ema_module: nn.Module
    ddp: bool  # one group, no FSDP: DDP reduces gradients (on several processes)
    manual_sync: bool  # several groups on several processes: _all_reduce_mean
    fsdp: bool  # FSDP2: the task is sharded (see _Sharded), gradients are reduce-scattered
    n_proc: int
    rank: int
    n_items: int
    steps_per_epoch: int
    latest: Path | None
    check: _LossCheck
    weigh: bool = False  # the task defines loss_weight(batch): slices weighed by their share
    host_metrics: bool = False  # the task defines host_metrics(batch): metrics of the host batch
    resumed_losses: dict[str, float] = field(default_factory=dict)


class _StepModule(nn.Module):
    """Routes ``training_step`` through ``forward`` so DDP (and autocast from accelerate) see it."""

    def __init__(self, task: nn.Module):
        super().__init__()
        self.task = task

    def forward(self, batch: Any, step: int, generator: torch.Generator) -> tuple[dict, dict]:
        out = self.task.training_step(batch, step, generator)
        if not isinstance(out, StepOutput):
            raise TypeError(f"{type(self.task).__name__}.training_step must return arvid.training.StepOutput, "
                            f"got {type(out).__name__}")
        # DDP walks the output for tensors; plain dicts are what its pytree handling knows.
        return dict(out.losses), dict(out.metrics)


def _fsdp_plugin(acc: Any) -> Any | None:
    """accelerate's FSDP plugin when the launch asked for FSDP (``--use_fsdp``), else None.

    accelerate switches to ``DistributedType.FSDP`` on accelerators only; CPU processes report
    MULTI_CPU and drop the plugin, so there it is rebuilt from the launcher's environment.
    """
    import os

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type == DistributedType.FSDP:
        return acc.state.fsdp_plugin
    if acc.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FullyShardedDataParallelPlugin()
    return None


def runs_on_cpu(device: str) -> bool:
    """Whether the Trainer asks accelerate for CPU processes: ``device='cpu'``, or ``'auto'`` in one
    of several launched processes on a machine without a GPU (``accelerate launch --multi_gpu`` there:
    accelerate makes them gloo CPU processes only when asked for the CPU, else runs each alone)."""
    import os

    if device == "cpu":
        return True
    return int(os.environ.get("WORLD_SIZE") or 1) > 1 and not torch.cuda.is_available()


def _check_launch(n_proc: int) -> None:
    """Refuse N launched processes that accelerate runs as N independent single processes."""
    import os

    world = int(os.environ.get("WORLD_SIZE") or 1)
    if n_proc == 1 and world > 1:
        raise RuntimeError(
            f"this is one of {world} launched processes (WORLD_SIZE={world}), but accelerate runs it as a single "
            f"process, so each would train alone into the same out_dir: launch with `accelerate launch --multi_gpu "
            f"--num_processes N` (on a machine without GPUs too: it gives N gloo CPU processes)")


class _Sharded:
    """A task sharded with torch's FSDP2 (``fully_shard``), and the way back to full tensors.

    ``root`` is the task's ``_StepModule``, sharded last (the root FSDP unit); ``units`` are all
    FSDP units with their ``reshard_after_forward``; ``skeleton`` is a meta-device copy of
    ``ema_target(task)`` made before sharding, which ``materialize`` fills with full weights.
    """

    def __init__(self, task: nn.Module, root: nn.Module, skeleton: nn.Module, device: torch.device,
                 units: list[tuple[nn.Module, bool]]):
        self.task, self.root, self.skeleton, self.device, self.units = task, root, skeleton, device, units

    @classmethod
    def shard(cls, task: nn.Module, groups: list[_Group], plugin: Any, device: torch.device, n_proc: int,
              previous: _Sharded | None) -> _Sharded:
        """Shard ``task`` over all processes and point ``groups`` at the sharded parameters."""
        version = int(getattr(plugin, "fsdp_version", 1) or 1)
        if version != 2:
            raise ValueError(f"FSDP version {version} is not supported: the Trainer shards with FSDP2; launch with "
                             f"accelerate launch --use_fsdp --fsdp_version 2 (fsdp_version: 2 in an accelerate config)")
        if len(groups) > 1:
            raise ValueError(
                f"FSDP supports tasks with one optimizer group; {type(task).__name__} has {[g.name for g in groups]}. "
                f"Several groups back-propagate each loss into its own group only (backward(inputs=...)), which "
                f"FSDP's gradient reduce-scatter and resharding hooks (one backward per forward) cannot follow; "
                f"train this task with DDP (accelerate launch --multi_gpu)")
        if previous is not None and previous.task is task:  # a second fit(): the task is sharded already
            return previous
        import torch.distributed as dist
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, OffloadPolicy, fully_shard

        if any(isinstance(m, FSDPModule) for m in task.modules()):
            raise ValueError(f"{type(task).__name__} is already sharded with fully_shard; pass the plain task")
        task.to(device)
        with torch.no_grad():  # every process starts from process 0's weights, as under DDP
            for t in [*task.parameters(), *task.buffers()]:
                dist.broadcast(t.detach(), src=0)
        names = {id(p): n for n, p in task.named_parameters()}
        for g in groups:
            if any(id(p) not in names for p in g.params):
                raise ValueError(f"optimizer group {g.name!r} holds a parameter that is not one of the task's "
                                 f"named_parameters(); FSDP cannot shard it")
        skeleton = _meta_copy(ckpt.ema_target(task))
        mesh = init_device_mesh(device.type, (n_proc,))
        offload = plugin.cpu_offload if isinstance(plugin.cpu_offload, OffloadPolicy) else OffloadPolicy()
        reshard = bool(plugin.reshard_after_forward)
        plugin.set_auto_wrap_policy(task)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, task)
        units: list[tuple[nn.Module, bool]] = []
        if policy is not None:
            for module in reversed(list(task.modules())):  # submodules before the modules holding them
                if module is not task and policy(module) and not isinstance(module, FSDPModule):
                    fully_shard(module, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
                    units.append((module, reshard))
        root = _StepModule(task)
        # the root keeps its parameters gathered from forward to backward (torch's default for the root)
        fully_shard(root, mesh=mesh, offload_policy=offload)
        units.append((root, False))
        sharded = dict(task.named_parameters())
        for g in groups:
            g.params = [sharded[names[id(p)]] for p in g.params]
        return cls(task, root, skeleton, device, units)

    @contextlib.contextmanager
    def full_params(self) -> Iterator[None]:
        """Every process gathers the full parameters into the task's modules for the block (a collective)."""
        for m, _ in self.units:
            m.set_reshard_after_forward(False, recurse=False)
        for m, _ in self.units:
            m.unshard()
        try:
            yield
        finally:
            # reshards every unit and forgets forward calls made meanwhile (on the main process only)
            self.root.reset_iter_state()
            for m, reshard in self.units:
                m.set_reshard_after_forward(reshard, recurse=False)

    def materialize(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A plain copy of the skeleton on ``device`` holding ``state`` (full tensors)."""
        out = copy.deepcopy(self.skeleton)
        made: dict[int, torch.Tensor] = {}
        for module in out.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is None or not t.is_meta:
                        continue
                    if id(t) not in made:  # tied tensors stay tied
                        new = torch.empty_like(t, device=self.device)
                        made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
                    store[name] = made[id(t)]
        load_state_strict(out, state, "the full weights gathered from the FSDP shards")
        return out


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and persistent buffers are on the meta device (no memory).

    Non-persistent buffers (not in the state dict, so never saved) are copied for real.
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _parse_groups(task: nn.Module, config: TrainerConfig) -> list[_Group]:
    fn = getattr(task, "optimizer_groups", None)
    raw = fn() if callable(fn) else None
    if raw is None:
        raw = {"main": [p for p in task.parameters() if p.requires_grad]}
    if not isinstance(raw, dict) or not raw:
        raise TypeError(f"{type(task).__name__}.optimizer_groups() must return a non-empty dict "
                        f"{{name: [params]}} or {{name: {{'params': [...], 'lr_scale': x}}}}, got {raw!r}")
    seen: dict[int, str] = {}
    groups = []
    for name, spec in raw.items():
        if isinstance(spec, dict):
            unknown = set(spec) - {"params", "lr_scale", "weight_decay", "betas"}
            if unknown or "params" not in spec:
                raise ValueError(f"optimizer group {name!r}: keys must be params (required), lr_scale, "
                                 f"weight_decay, betas; got {sorted(spec)}")
            params = list(spec["params"])
            lr_scale = float(spec.get("lr_scale", 1.0))
            wd = float(spec.get("weight_decay", config.weight_decay))
            betas = tuple(spec.get("betas", config.betas))
        else:
            params, lr_scale, wd, betas = list(spec), 1.0, config.weight_decay, tuple(config.betas)
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError(f"optimizer group {name!r} has no trainable parameters")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in optimizer groups "
                                 f"{seen[id(p)]!r} and {name!r}; each parameter belongs to one group")
            seen[id(p)] = name
        groups.append(_Group(str(name), params, lr_scale, wd, betas))  # type: ignore[arg-type]
    return groups


def _as_float(v: Any) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Train ``task`` on ``dataset`` into ``out_dir`` (see the module docstring).

    ``dataset``: a map-style dataset (``__len__`` and ``__getitem__``); ``collate_fn`` turns a
    list of items into the batch handed to ``training_step`` (default: torch's default_collate).
    ``eval_fn(task, step) -> dict`` runs on the main process every ``eval_every`` steps, under
    ``torch.no_grad()`` with the task in eval mode; its numbers are logged as ``eval/<key>``.
    The constructor only checks its arguments; devices, processes and files are touched by
    :meth:`fit`.
    """

    def __init__(
        self,
        config: TrainerConfig,
        task: nn.Module,
        dataset: Dataset,
        out_dir: str | Path,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        eval_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None,
    ):
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        if not isinstance(task, nn.Module) or not callable(getattr(task, "training_step", None)):
            raise TypeError(f"task must be an nn.Module with a training_step(batch, step, generator) method, "
                            f"got {type(task).__name__}")
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be map-style (__len__ and __getitem__) so its order can be "
                            f"reproduced on resume; got {type(dataset).__name__}")
        self.config = config
        self.task = task
        self.dataset = dataset
        self.out_dir = Path(out_dir)
        self.collate_fn = collate_fn
        self.eval_fn = eval_fn
        self.accelerator: Any = None
        self.step = 0
        self._ema: EMA | None = None
        self._fsdp: _Sharded | None = None  # set by an FSDP fit(); the task stays sharded after it

    # ----------------------------------------------------------------- public

    def final_model(self) -> nn.Module:
        """The EMA copy of ``task.ema_model()`` when ``ema_decay > 0``, else ``task.ema_model()``.

        (``task.ema_model()`` falls back to the task itself when the task defines none.)
        Under FSDP the task is sharded, so this returns a new plain module holding the full weights,
        gathered from all processes: a collective, which every process must call.
        """
        target = ckpt.ema_target(self.task)
        if self.config.ema_decay > 0 and self._ema is None:
            raise RuntimeError("final_model(): ema_decay > 0 but fit() has not run, so there is no EMA yet")
        if self._fsdp is not None:
            ema = self._ema if self.config.ema_decay > 0 else None
            full = _gather_full(ema.state_dict() if ema is not None else target.state_dict(), keep=True,
                                device=self._fsdp.device)
            out = self._fsdp.materialize(full)
            return out.eval() if ema is not None else out.train(target.training)
        if self.config.ema_decay > 0:
            return self._ema.averaged_model(target)
        return target

    def fit(self) -> FitResult:
        """Train until ``max_steps`` (resuming first if ``resume`` and a checkpoint exists)."""
        t0 = time.perf_counter()
        cfg = self.config
        flags = backend_flags()  # TF32 etc. are set for this fit only: restored in the finally below
        try:
            run = self._setup()
            self.optimizers = run.optimizers  # for inspection after fit() (tests, notebooks)
        except BaseException:
            restore_backend_flags(flags)
            raise
        acc = run.acc
        step = self.step
        self._first_step = step  # where this fit() started (a resume starts past 0)
        last_losses, last_ckpt = run.resumed_losses, run.latest
        logger = MetricsLogger(self.out_dir / "metrics.jsonl", enabled=acc.is_main_process,
                               accelerator=acc if acc.log_with else None)
        if acc.log_with:
            acc.init_trackers("arvid")
        logger.truncate_after(step)
        history: list[dict[str, Any]] = []

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress and acc.is_main_process and sys.stderr.isatty()))
        window = _Window(run.names)
        # a resume between two log steps: the first record averages only the steps since (the
        # window's earlier steps were in the stopped process); it says so with `window_steps`
        short_window = step % cfg.log_every != 0
        profiler = StepProfiler(self.out_dir, cfg.profile_start, cfg.profile_steps,
                                cfg.profile_start >= 0 and acc.is_main_process, run.device)
        it: Iterator[Any] | None = None
        epoch = -1
        try:
            while step < cfg.max_steps:
                if it is None or step // run.steps_per_epoch != epoch:
                    epoch, start = divmod(step, run.steps_per_epoch)
                    set_epoch = getattr(self.dataset, "set_epoch", None)
                    if callable(set_epoch):  # per-epoch random clips (file datasets); before the workers start
                        set_epoch(epoch)
                    it = iter(self._loader(run, epoch, start))
                profiler.before_step(step)
                done, grad_norms, factor = self._train_step(run, step, it, window, last_ckpt)
                t_prof = time.perf_counter()
                if profiler.after_step(step) is not None:
                    log.info("profile of steps %d..%d -> %s", cfg.profile_start,
                             cfg.profile_start + cfg.profile_steps - 1, profiler.written)
                    window.t0 += time.perf_counter() - t_prof  # writing the report is not training time
                step += 1
                self.step = step
                window.add_step({g.name: cfg.lr * g.lr_scale * factor for g in run.groups}, grad_norms)
                bar.update(1)
                logs = step % cfg.log_every == 0 or step == cfg.max_steps
                saves = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps
                if logs or saves:  # a deferred loss check catches up here: logs and checkpoints see every step
                    done = done + run.check.resolve()
                for _, values in done:
                    last_losses = dict(zip(run.names, values))
                    window.add_losses(values)

                if logs:
                    n_steps = window.steps
                    record = window.flush(acc, cfg.batch_size, epoch)
                    if short_window:
                        record["window_steps"] = n_steps
                        short_window = False
                    logger.log(record, step)
                    history.append({"step": step, **record})
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.startswith("loss/")})
                t_aside = time.perf_counter()
                if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_fn is not None:
                    self._evaluate(step, logger, history)
                if saves:
                    last_ckpt = self._save(run, step, last_losses)
                window.t0 += time.perf_counter() - t_aside  # throughput counts training time only
        finally:
            why = profiler.close()
            if why:
                log.warning("trainer.profile_start=%d: no profile written: %s (steps this run: %d..%d)",
                            cfg.profile_start, why, self._first_step, step - 1)
            restore_backend_flags(flags)
            bar.close()
            # Not acc.end_training(): it also destroys the process group, which the caller may
            # still need (a second fit, a sampling stage in the same launch).
            for tracker in getattr(acc, "trackers", []):
                tracker.finish()
        return FitResult(step=step, losses=last_losses, wall_time_s=time.perf_counter() - t0,
                         checkpoint=last_ckpt, history=history)

    # ----------------------------------------------------------------- pieces of fit

    def _setup(self) -> _Run:
        """Accelerator, device flags, checks, optimizers, EMA; then resume or seed. Sets ``self.step``."""
        cfg = self.config
        acc = make_accelerator(
            cfg.precision,
            cpu=runs_on_cpu(cfg.device),
            find_unused_parameters=cfg.find_unused_parameters,
            log_dir=str(self.out_dir / "tensorboard") if tensorboard_available() else None,
        )
        self.accelerator = acc
        device = acc.device
        check_precision(cfg.precision, device)
        setup_backends(device, cfg.tf32)
        fsdp_plugin = _fsdp_plugin(acc)
        if fsdp_plugin is None and acc.distributed_type.value not in _SUPPORTED_DISTRIBUTED:
            raise ValueError(f"Trainer runs single-process, DDP (accelerate launch --multi_gpu) or FSDP2 "
                             f"(accelerate launch --use_fsdp --fsdp_version 2); "
                             f"distributed_type={acc.distributed_type.value} is not supported")
        n_proc, rank = acc.num_processes, acc.process_index
        _check_launch(n_proc)
        if cfg.batch_size % (cfg.grad_accum * n_proc):
            raise ConfigError(f"TrainerConfig.batch_size={cfg.batch_size} must be divisible by grad_accum * "
                              f"num_processes = {cfg.grad_accum} * {n_proc} (it is the global batch)")
        n_items = len(self.dataset)
        steps_per_epoch = n_items // cfg.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"the dataset has {n_items} items, fewer than one global batch "
                             f"(batch_size={cfg.batch_size})")

        if acc.is_main_process:
            check_writable(self.out_dir)
            ckpt.remove_stale_temporaries(self.out_dir)
        acc.wait_for_everyone()
        # Every process reads the same directory: multi-node runs need a shared file system.
        latest = ckpt.latest_checkpoint(self.out_dir)
        if latest is not None and not cfg.resume:
            raise FileExistsError(
                f"{str(self.out_dir)!r} already holds checkpoints (newest: {latest.name}) and resume=False; "
                f"set resume=True to continue that run or use an empty out_dir")

        groups = _parse_groups(self.task, cfg)
        fsdp = fsdp_plugin is not None
        if fsdp:
            self._fsdp = _Sharded.shard(self.task, groups, fsdp_plugin, device, n_proc, self._fsdp)
            model: nn.Module = self._fsdp.root
            ddp = False
        else:
            if isinstance(self._fsdp, _Sharded) and self._fsdp.task is self.task:
                raise RuntimeError("this task was sharded by an earlier FSDP fit(); it cannot train without FSDP")
            self.task.to(device)
            wrapper = _StepModule(self.task)
            ddp = len(groups) == 1
            model = acc.prepare_model(wrapper) if ddp else wrapper
        self.task.train()
        if cfg.compile:
            # the config's options (checked by it) over arvid's graph passes (CUDA only; the module
            # imports inductor, so it is imported here, not at start-up)
            from arvid.training import graph_passes

            options = {**graph_passes.graph_pass_options(device), **cfg.compile_options}
            model = torch.compile(model, options=options or None)
        ema_module = ckpt.ema_target(self.task)
        self._ema = EMA(ema_module, cfg.ema_decay) if cfg.ema_decay > 0 else None
        optimizers = {g.name: self._make_optimizer(g, device, fused_cpu=cfg.loss_check == "deferred")
                      for g in groups}
        names = [g.name for g in groups]
        if cfg.warmup_steps >= cfg.max_steps and acc.is_main_process:  # (wsd refuses it in the config)
            log.warning("trainer: warmup_steps=%d >= max_steps=%d: the learning rate never reaches trainer.lr "
                        "(the last step trains at %.3g of it)", cfg.warmup_steps, cfg.max_steps,
                        cfg.max_steps / max(cfg.warmup_steps, 1))
        run = _Run(
            acc=acc, device=device, model=model, groups=groups, names=names, optimizers=optimizers,
            check=_LossCheck(names, self._defer_loss_check(device, fsdp, optimizers), device),
            schedule=make_schedule(cfg.schedule, cfg.max_steps, cfg.warmup_steps, cfg.decay_fraction,
                                   cfg.min_lr_ratio),
            ema_module=ema_module, ddp=ddp, manual_sync=(not ddp) and (not fsdp) and n_proc > 1, fsdp=fsdp,
            n_proc=n_proc, rank=rank,
            n_items=n_items, steps_per_epoch=steps_per_epoch, latest=latest,
            weigh=callable(getattr(self.task, "loss_weight", None)),
            host_metrics=callable(getattr(self.task, "host_metrics", None)),
        )
        self.step = 0
        if latest is not None:
            self.step, run.resumed_losses = self._resume(latest, run)
        else:
            # Global RNGs (dropout, tasks that use torch.rand without the generator), per process.
            random.seed(derive_seed(cfg.seed, "python", rank) % 2**32)
            np.random.seed(derive_seed(cfg.seed, "numpy", rank) % 2**32)
            torch.manual_seed(derive_seed(cfg.seed, "torch", rank))
        if acc.is_main_process:
            save_config(cfg, self.out_dir / "trainer.yaml")
        return run

    def _train_step(self, run: _Run, step: int, it: Iterator[Any], window: _Window,
                    last_ckpt: Path | None) -> tuple[list[tuple[int, list[float]]], dict[str, torch.Tensor], float]:
        """One optimizer step over ``grad_accum`` micro-batches.

        Returns (the steps whose global losses were read in this call, with them: this step's
        under ``loss_check=sync``, the previous one's under ``deferred``; grad norms; lr factor).
        """
        cfg, acc = self.config, run.acc
        loss_sum = torch.zeros(len(run.groups), device=run.device)
        t_data = time.perf_counter()
        host = [next(it) for _ in range(cfg.grad_accum)] if run.weigh else None
        shares = self._loss_shares(run, host) if run.weigh else None
        window.data_s += time.perf_counter() - t_data
        for micro in range(cfg.grad_accum):
            t_data = time.perf_counter()
            batch = host[micro] if host is not None else next(it)
            window.data_s += time.perf_counter() - t_data
            if run.host_metrics:
                window.add_metrics(self.task.host_metrics(batch))
            t_data = time.perf_counter()
            batch = _to_device(batch, run.device)
            window.data_s += time.perf_counter() - t_data
            gen = step_generator(cfg.seed, step, run.rank, micro)
            last_micro = micro == cfg.grad_accum - 1
            # DDP: all-reduce gradients only on the last micro-batch. (FSDP reduce-scatters each
            # micro-batch's gradients and accumulates the shards, which keeps gradient memory sharded.)
            sync_ctx = acc.no_sync(run.model) if (run.ddp and not last_micro) else contextlib.nullcontext()
            with sync_ctx:
                with acc.autocast():
                    losses, metrics = run.model(batch, step, gen)
                self._check_losses(losses, run.names, step)
                share = shares[micro] if shares is not None else 1.0
                scaled = [losses[n].float() * (share / cfg.grad_accum) for n in run.names]
                if len(run.groups) == 1:
                    scaled[0].backward()
                else:
                    for i, g in enumerate(run.groups):
                        # each loss trains only its own group (a generator's adversarial loss must not
                        # push gradients into the discriminator)
                        scaled[i].backward(inputs=g.params, retain_graph=i < len(run.groups) - 1)
            loss_sum += torch.stack([s.detach() for s in scaled])
            window.add_metrics(metrics)
        if run.manual_sync:
            _all_reduce_mean([p for g in run.groups for p in g.params], run.n_proc)
        # One small all-reduce per step: the global-batch loss for logging and the NaN check,
        # which every process must agree on so that all of them stop together.
        global_loss = acc.reduce(loss_sum, reduction="mean") if run.n_proc > 1 else loss_sum
        try:
            done, found_inf = run.check.push(step, global_loss, last_ckpt)
        except NonFiniteLossError:
            self.task.zero_grad(set_to_none=True)
            raise
        factor = run.schedule(step)
        grad_norms = {}
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure, do not clip
        trains = getattr(self.task, "trains_group", None)
        for g in run.groups:
            if trains is not None and not trains(g.name, step):
                continue  # its (zero) gradients are dropped with the others below
            opt = run.optimizers[g.name]
            for pg in opt.param_groups:
                pg["lr"] = cfg.lr * pg["lr_scale"] * factor
            if run.fsdp:
                # the norm over all shards (accelerate's DTensor-aware clipping); a local shard's norm
                # would clip each process's slice of the gradient differently
                norm = acc.clip_grad_norm_(g.params, max_norm)
                grad_norms[g.name] = _full(norm)
            else:
                grad_norms[g.name] = torch.nn.utils.clip_grad_norm_(g.params, max_norm)
            if found_inf is None:
                opt.step()
            else:  # deferred check: the fused kernel skips the update (and its step count) when it is 1
                opt.grad_scale, opt.found_inf = None, found_inf
                try:
                    opt.step()
                finally:
                    del opt.grad_scale, opt.found_inf
        self.task.zero_grad(set_to_none=True)
        if self._ema is not None:
            self._ema.update(run.ema_module)
        return done, grad_norms, factor

    def _loss_shares(self, run: _Run, batches: list[Any]) -> list[float | torch.Tensor]:
        """Each micro-batch's share of the global batch's weight (``task.loss_weight``), times the
        number of slices (``grad_accum * processes``): the Trainer's mean over slices of
        ``share * slice mean`` is then the weighted mean over the global batch. On several processes
        the weight total is one all-reduce of a float64 scalar and the shares stay on the device (no
        host sync in the step; a global total of 0 makes the loss non-finite, which the loss check
        reports)."""
        weights = [float(self.task.loss_weight(b)) for b in batches]
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"{type(self.task).__name__}.loss_weight returned {weights}: weights must be finite "
                             "and >= 0")
        slices = len(batches) * run.n_proc
        if run.n_proc == 1:
            total = sum(weights)
            if total <= 0:
                raise ValueError(f"{type(self.task).__name__}.loss_weight is 0 for every slice of this step's "
                                 "global batch: nothing to average over")
            return [w * slices / total for w in weights]
        import torch.distributed as dist

        total_t = torch.tensor([sum(weights)], dtype=torch.float64, device=run.device)
        dist.all_reduce(total_t)
        return [(slices * w / total_t).to(torch.float32)[0] for w in weights]

    def _defer_loss_check(self, device: torch.device, fsdp: bool, optimizers: dict[str, torch.optim.Optimizer]
                          ) -> bool:
        """Whether this fit checks its losses one step late (``TrainerConfig.loss_check``)."""
        mode = self.config.loss_check
        if mode == "sync":
            return False
        unfused = [n for n, o in optimizers.items() if not o.defaults.get("fused")]
        why = ("FSDP shards the optimizer step" if fsdp else
               f"the optimizers of {unfused} are not fused AdamW (found_inf skips a step only there)" if unfused
               else "")
        if mode == "deferred" and why:
            raise ConfigError(f"TrainerConfig.loss_check='deferred' is not possible here: {why}; use 'sync' or 'auto'")
        return not why and (mode == "deferred" or device.type == "cuda")

    def _make_optimizer(self, g: _Group, device: torch.device, fused_cpu: bool = False) -> torch.optim.Optimizer:
        # Biases and norm gains (1-D) get no weight decay: decaying them only hurts.
        decay = [p for p in g.params if p.ndim >= 2]
        no_decay = [p for p in g.params if p.ndim < 2]
        param_groups = []
        if decay:
            param_groups.append({"params": decay, "weight_decay": g.weight_decay, "lr_scale": g.lr_scale})
        if no_decay:
            param_groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": g.lr_scale})
        # (FSDP with fsdp_offload_params keeps the parameters, so the optimizer step, on the CPU)
        fused = (device.type == "cuda" or fused_cpu) and all(
            p.is_floating_point() and p.device.type == device.type for p in g.params)
        return torch.optim.AdamW(param_groups, lr=self.config.lr * g.lr_scale, betas=g.betas,
                                 eps=self.config.eps, fused=fused or None)

    def _loader(self, run: _Run, epoch: int, start_batch: int) -> DataLoader:
        cfg = self.config
        sampler = GlobalBatchSampler(run.n_items, cfg.batch_size, cfg.grad_accum, run.n_proc, run.rank, cfg.seed,
                                     epoch, start_batch, cfg.shuffle)
        kwargs: dict[str, Any] = {}
        if self.collate_fn is not None:
            kwargs["collate_fn"] = self.collate_fn
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=run.device.type == "cuda",
            # Worker seeds come from (seed, epoch, rank, start), not from the global torch RNG, which
            # would otherwise be consumed per epoch and shift dropout noise after a resume.
            generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "workers", epoch, run.rank, start_batch)),
            **kwargs,
        )

    @staticmethod
    def _check_losses(losses: dict, names: list[str], step: int) -> None:
        if set(losses) != set(names):
            raise ValueError(f"training_step at step {step} returned losses {sorted(losses)}, but the "
                             f"optimizer groups are {names}: return one loss per group")
        for n in names:
            v = losses[n]
            if not isinstance(v, torch.Tensor) or v.numel() != 1 or not v.requires_grad:
                raise ValueError(f"losses[{n!r}] at step {step} must be a scalar tensor that requires grad, "
                                 f"got {type(v).__name__}{tuple(v.shape) if isinstance(v, torch.Tensor) else ''}")

    def _evaluate(self, step: int, logger: MetricsLogger, history: list[dict[str, Any]]) -> None:
        acc = self.accelerator
        error: BaseException | None = None
        # FSDP: every process gathers the full parameters, so that eval_fn (on the main process
        # only) can call any part of the task without collectives
        with self._fsdp.full_params() if self._fsdp is not None else contextlib.nullcontext():
            if acc.is_main_process:
                was_training = self.task.training
                self.task.eval()
                try:
                    with torch.no_grad():
                        res = self.eval_fn(self.task, step) or {}
                    if not isinstance(res, dict):
                        raise TypeError(f"eval_fn must return a dict of numbers, got {type(res).__name__}")
                    record = {f"eval/{k}": _as_float(v) for k, v in res.items()}
                    logger.log(record, step)
                    history.append({"step": step, **record})
                except Exception as e:
                    error = e
                finally:
                    self.task.train(was_training)
        _agree(acc, error, f"eval_fn at step {step}")

    def _save(self, run: _Run, step: int, losses: dict[str, float]) -> Path:
        from accelerate.utils import gather_object

        acc = self.accelerator
        cfg = self.config
        rng = gather_object([ckpt.capture_rng_state()])
        path = ckpt.checkpoint_dir(self.out_dir, step)
        error: BaseException | None = None
        if run.fsdp:
            # Full tensors, gathered shard by shard (a collective: every process takes part) onto
            # the main process's CPU, so the files are the same as a single process writes.
            keep = acc.is_main_process
            model_state = _gather_full(self.task.state_dict(), keep)
            ema_state = _gather_full(self._ema.state_dict(), keep) if self._ema is not None else None
            optimizer_states = {n: _gather_full(o.state_dict(), keep) for n, o in run.optimizers.items()}
        elif acc.is_main_process:
            model_state = self.task.state_dict()
            ema_state = self._ema.state_dict() if self._ema is not None else None
            optimizer_states = {n: o.state_dict() for n, o in run.optimizers.items()}
        if acc.is_main_process:
            state = {
                "format": 1,
                "step": step,
                "epoch": step // run.steps_per_epoch,
                "batch_in_epoch": step % run.steps_per_epoch,
                "num_processes": run.n_proc,
                "seed": cfg.seed,
                "batch_size": cfg.batch_size,
                "losses": losses,
                "ema": self._ema is not None,
                "generator": "per-step torch.Generator seeded from sha256(seed, 'step', step, rank, micro)",
            }
            try:
                ckpt.save_checkpoint(
                    path,
                    model_state=model_state,
                    ema_state=ema_state,
                    optimizer_states=optimizer_states,
                    rng_states=rng,
                    trainer_state=state,
                    config=cfg,
                )
                ckpt.prune_checkpoints(self.out_dir, cfg.keep_last)
            except Exception as e:  # re-raised by _agree, after telling the other processes
                error = e
        _agree(acc, error, f"saving checkpoint {str(path)!r}")
        return path

    def _resume(self, path: Path, run: _Run) -> tuple[int, dict[str, float]]:
        cfg, optimizers, rank, n_proc = self.config, run.optimizers, run.rank, run.n_proc
        state = ckpt.read_trainer_state(path)
        for key in ("seed", "batch_size"):
            if state.get(key) != getattr(cfg, key):
                warnings.warn(f"resuming {str(path)!r}: it was trained with {key}={state.get(key)!r}, this run has "
                              f"{key}={getattr(cfg, key)!r}; the data order will differ from an uninterrupted run",
                              stacklevel=3)
        # Checkpoints hold full tensors; under FSDP each process loads the files and keeps its shards.
        model_state = load_weights(path / ckpt.MODEL_FILE)
        if run.fsdp:
            model_state = _shard_like(model_state, self.task.state_dict())
        load_state_strict(self.task, model_state, str(path / ckpt.MODEL_FILE))
        if self._ema is not None:
            if not (path / ckpt.EMA_FILE).is_file():
                raise FileNotFoundError(f"ema_decay={cfg.ema_decay} but {str(path)!r} has no {ckpt.EMA_FILE}: "
                                        f"the run was started without EMA")
            ema_state = load_weights(path / ckpt.EMA_FILE)
            if run.fsdp:
                ema_state = _shard_like(ema_state, self._ema.state_dict())
            self._ema.load_state_dict(ema_state, str(path / ckpt.EMA_FILE))
        opt_states = ckpt.load_optimizer_states(path)
        if set(opt_states) != set(optimizers):
            raise ValueError(f"{str(path / ckpt.OPTIMIZER_FILE)!r} holds optimizer groups {sorted(opt_states)}, "
                             f"the task has {sorted(optimizers)}")
        for name, opt in optimizers.items():
            saved = _keep_implementation(opt_states[name], opt)
            opt.load_state_dict(_shard_optimizer_state(saved, opt) if run.fsdp else saved)
        rngs = ckpt.load_rng_states(path)
        if state.get("num_processes") == n_proc and rank < len(rngs):
            ckpt.restore_rng_state(rngs[rank])
        else:
            warnings.warn(f"resuming {str(path)!r} (saved by {state.get('num_processes')} processes) on {n_proc}: "
                          f"global RNG states are reseeded, so dropout noise will differ", stacklevel=3)
            torch.manual_seed(derive_seed(cfg.seed, "torch-resume", state["step"], rank))
        return int(state["step"]), {k: float(v) for k, v in state.get("losses", {}).items()}


# --------------------------------------------------------------------------- helpers


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (in dicts, lists, tuples, dataclasses or objects with ``.to``) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def _full(t: Any) -> Any:
    """The full tensor of a DTensor (a collective), anything else as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _gather_full(obj: Any, keep: bool, device: torch.device | str = "cpu") -> Any:
    """``obj`` (a state dict, nested like an optimizer's) with each DTensor shard replaced by its full tensor.

    A collective: every process calls it on the same structure, so they meet the DTensors in the
    same order. Tensors go to ``device`` one by one; ``keep=False`` (a process that does not
    save) drops them as they come and returns None.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(obj, torch.Tensor):
        t = obj.full_tensor() if isinstance(obj, DTensor) else obj
        return t.detach().to(device) if keep else None
    if isinstance(obj, dict):
        out = {k: _gather_full(v, keep, device) for k, v in obj.items()}
        return out if keep else None
    if isinstance(obj, (list, tuple)):
        items = [_gather_full(v, keep, device) for v in obj]
        return type(obj)(items) if keep else None
    return obj if keep else None


def _shard_one(full: torch.Tensor, like: Any) -> Any:
    """``full`` cut like the DTensor ``like`` (this process's shard, no communication); else ``full``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or tuple(full.shape) != tuple(like.shape):
        return full  # not sharded, or a shape mismatch that the strict load reports
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _shard_like(state: dict[str, torch.Tensor], like: dict[str, Any]) -> dict[str, Any]:
    """A full state dict (from a checkpoint) cut into this process's shards of ``like`` (a sharded state dict)."""
    return {k: _shard_one(v, like[k]) if k in like else v for k, v in state.items()}


def _shard_optimizer_state(state: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state dict (ids as ``opt.state_dict()`` numbers them) cut like ``opt``'s sharded parameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    per_param = {}
    for i, s in state.get("state", {}).items():
        p = params[i] if isinstance(i, int) and 0 <= i < len(params) else None
        per_param[i] = {k: _shard_one(v, p) if isinstance(v, torch.Tensor) and k != "step" else v
                        for k, v in s.items()}
    return {**state, "state": per_param}


#: AdamW settings that say how its step runs (not what it computes): this run's, not the checkpoint's
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _keep_implementation(state: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A saved optimizer state dict whose param groups take ``opt``'s implementation flags (fused, ...).

    ``load_state_dict`` otherwise restores the saving run's flags: a run saved on the CPU (unfused)
    and resumed on a GPU (fused, with the deferred loss check) stepped unfused, which rejects the
    deferred check's ``found_inf`` (an AssertionError at the first step after the resume). Patched
    before the load, so the loaded ``step`` counters are also placed as a fused AdamW keeps them."""
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        return state  # load_state_dict reports the mismatch
    own = [{k: g[k] for k in _IMPLEMENTATION_KEYS if k in g} for g in opt.param_groups]
    return {**state, "param_groups": [{**g, **o} for g, o in zip(groups, own)]}


def _agree(acc: Any, error: BaseException | None, what: str) -> None:
    """A barrier that also shares failure: if ``what`` failed on any process, all of them raise.

    Without it, an exception on the main process (a full disk during a save, a bug in eval_fn)
    would leave the other processes waiting at the next collective until a timeout.
    """
    from accelerate.utils import gather_object

    msg = None if error is None else f"{type(error).__name__}: {error}"
    statuses = gather_object([msg]) if acc.num_processes > 1 else [msg]
    if error is not None:
        raise error
    failed = [m for m in statuses if m is not None]
    if failed:
        raise RuntimeError(f"{what} failed on another process: {failed[0]}")


def _all_reduce_mean(params: list[nn.Parameter], n_proc: int) -> None:
    """Average ``.grad`` across processes with one flat all-reduce per (device, dtype)."""
    import torch.distributed as dist

    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels]
        dist.all_reduce(flat)
        flat /= n_proc
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


class _LossCheck:
    """The NaN/inf check of each step's global losses (``TrainerConfig.loss_check``).

    ``sync``: :meth:`push` reads the losses on the host and raises before the optimizer step.
    ``deferred``: :meth:`push` returns a device flag (1.0 when any loss is not finite) that the
    fused AdamW takes as ``found_inf`` and skips its update with, and starts a non-blocking copy
    of the losses to the host; the next step's :meth:`resolve` (called after that step's
    backward, before its optimizer step) reads them and raises there. Either way a non-finite
    step never updates the weights, and the error names that step. (Deferred: the EMA shadow
    took its usual step towards the unchanged weights; the run stops and resumes from the last
    checkpoint anyway.)
    """

    def __init__(self, names: list[str], deferred: bool, device: torch.device):
        self.names, self.deferred, self.device = names, deferred, device
        self._pending: tuple[int, torch.Tensor, Any, Path | None] | None = None
        self._host: torch.Tensor | None = None

    def push(self, step: int, global_loss: torch.Tensor, last_ckpt: Path | None
             ) -> tuple[list[tuple[int, list[float]]], torch.Tensor | None]:
        """This step's losses. Returns (the steps whose losses are now known, with them; found_inf or None)."""
        if not self.deferred:
            values = global_loss.tolist()
            self._raise_if_bad(step, values, last_ckpt)
            return [(step, values)], None
        done = self.resolve()
        loss = global_loss.detach().float()
        found_inf = (~torch.isfinite(loss)).any().float()
        cuda = loss.device.type == "cuda"
        if self._host is None or self._host.shape != loss.shape:  # one pinned buffer, reused: resolve()
            self._host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=cuda)  # above has read it
        host = self._host
        host.copy_(loss, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending = (step, host, event, last_ckpt)
        return done, found_inf

    def resolve(self) -> list[tuple[int, list[float]]]:
        """Wait for the pending step's losses (if any), check them, and return them."""
        if self._pending is None:
            return []
        step, host, event, last_ckpt = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        values = host.tolist()
        self._raise_if_bad(step, values, last_ckpt)
        return [(step, values)]

    def _raise_if_bad(self, step: int, values: list[float], last_ckpt: Path | None) -> None:
        for name, v in zip(self.names, values):
            if not math.isfinite(v):
                raise NonFiniteLossError(step, name, v, last_ckpt)


class _Window:
    """Sums over the steps since the last log: losses, metrics, item counts, time."""

    def __init__(self, names: list[str]):
        self.names = names
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.loss = [0.0] * len(self.names)
        self.loss_steps = 0  # steps whose losses were read (a deferred check reads them a step late)
        self.metric_sum: dict[str, Any] = {}
        self.metric_n: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.data_s = 0.0  # waiting for the next batch (loader workers and the copy to the device)
        self.lr: dict[str, float] = {}
        self.grad_norm: dict[str, torch.Tensor] = {}
        self.grad_norms: dict[str, list] = {}  # the window's norms, on the device until the log step

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            # tensors stay on their device until the log step: no host sync per micro-batch
            v = v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)
            self.metric_sum[k] = self.metric_sum.get(k, 0.0) + v
            self.metric_n[k] = self.metric_n.get(k, 0) + 1

    def add_step(self, lr: dict[str, float], grad_norm: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.lr, self.grad_norm = lr, grad_norm
        for k, v in grad_norm.items():  # no work on the step: their largest is taken at the log step
            self.grad_norms.setdefault(k, []).append(v)

    def add_losses(self, losses: list[float]) -> None:
        self.loss_steps += 1
        self.loss = [a + b for a, b in zip(self.loss, losses)]

    def flush(self, acc: Any, batch_size: int, epoch: int) -> dict[str, Any]:
        from accelerate.utils import gather_object

        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        # metrics: summed here, then over processes; tokens / flops / peak_seconds are counts (rates
        # over the window's wall time), the rest are means
        local = {k: _as_float(v) for k, v in self.metric_sum.items()}
        parts = gather_object([(local, self.metric_n)]) if acc.num_processes > 1 else [(local, self.metric_n)]
        total: dict[str, float] = {}
        count: dict[str, int] = {}
        for s, n in parts:
            for k, v in s.items():
                total[k] = total.get(k, 0.0) + v
                count[k] = count.get(k, 0) + n[k]
        record: dict[str, Any] = {"epoch": epoch}
        for name, v in zip(self.names, self.loss):
            record[f"loss/{name}"] = v / max(self.loss_steps, 1)
        for name in self.names:
            record[f"lr/{name}"] = self.lr.get(name, 0.0)
            if name in self.grad_norm:
                record[f"grad_norm/{name}"] = float(self.grad_norm[name])
                norms = self.grad_norms[name]  # one read for the window (not one per step)
                record[f"grad_norm_max/{name}"] = _as_float(torch.stack([torch.as_tensor(v).float() for v in norms]).max())
        record["items_per_s"] = batch_size * self.steps / elapsed
        # on the host's clock: with asynchronous CUDA a slow step shows up as a small fraction here;
        # a large one means the model waits for the loader (more num_workers, cheaper decoding)
        record["data_wait_fraction"] = min(self.data_s / elapsed, 1.0)
        n_proc = max(int(acc.num_processes), 1)
        for k in sorted(total):
            if k == "tokens":
                record["tokens_per_s"] = total[k] / elapsed
            elif k == "flops":
                record["tflops"] = total[k] / elapsed / n_proc / 1e12
            elif k == "peak_seconds":
                record["mfu"] = total[k] / elapsed / n_proc
            else:
                record[k] = total[k] / count[k]
        self._reset()
        return record
