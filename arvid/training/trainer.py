"""One Trainer for every model in arvid, on HuggingFace accelerate.

A model plugs in through a *task*: an ``nn.Module`` holding the model and its loss modules,
with ``training_step(batch, step, generator) -> StepOutput`` and optionally
``optimizer_groups()`` and ``ema_model()``. The Trainer owns everything else: devices and
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
batches its checkpoint had consumed. The loss is averaged over the global batch (each process
averages its slice, gradients are averaged across processes and micro-batches), so the loss
curve does not depend on the number of processes or on ``grad_accum``.

Distribution. Launch with ``accelerate launch`` and the same code runs on N processes.
Tasks with one optimizer group are wrapped in DDP by ``accelerator.prepare`` (gradient
all-reduce overlaps the backward pass). Tasks with several groups (a GAN: generator and
discriminator) compute one loss per group in one ``training_step``; each loss is
back-propagated into its own group's parameters only (``backward(inputs=...)``), which DDP's
one-backward-per-step reducer cannot follow, so their gradients are averaged across processes
by one bucketed all-reduce per step instead. FSDP and DeepSpeed are refused with a clear error
(sharded optimizer state is not checkpointed). On a machine without GPUs,
``accelerate launch --multi_gpu --num_processes N`` gives N gloo CPU processes; note that
``accelerate launch --cpu --num_processes N`` starts ONE process (several need mpirun).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
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
from arvid.training.device import check_precision, make_accelerator, setup_backends, tensorboard_available
from arvid.training.ema import EMA
from arvid.training.logging import MetricsLogger
from arvid.training.schedules import make_schedule

# --------------------------------------------------------------------------- config and types


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
    min_lr_ratio: float = doc(0.1, "cosine/wsd: the lr at the end of training, as a fraction of lr")
    precision: Literal["fp32", "bf16"] = doc("fp32", "fp32, or bf16 autocast (accelerate mixed precision)")
    grad_accum: int = doc(1, "micro-batches per optimizer step (memory knob; the global batch stays batch_size)")
    grad_clip: float = doc(1.0, "clip each group's gradient norm to this; 0 = no clipping")
    ema_decay: float = doc(0.0, "EMA decay of task.ema_model() weights (float32 shadow); 0 = no EMA")
    checkpoint_every: int = doc(1000, "save a checkpoint every N steps (and always at the end); 0 = only at the end")
    keep_last: int = doc(2, "checkpoints to keep (older ones are deleted)")
    log_every: int = doc(10, "log loss/metrics/lr/throughput every N steps")
    eval_every: int = doc(0, "call eval_fn(task, step) every N steps on the main process; 0 = never")
    seed: int = doc(0, "seeds the data order, the per-step generators and the global RNGs")
    shuffle: bool = doc(True, "shuffle the data each epoch (a permutation from (seed, epoch))")
    num_workers: int = doc(0, "DataLoader worker processes per training process")
    compile: bool = doc(False, "torch.compile the training step")
    resume: bool = doc(True, "continue from the newest checkpoint in out_dir/checkpoints if there is one")
    device: Literal["auto", "cpu"] = doc("auto", "auto: the launcher's device (GPU when there is one); cpu: force CPU")
    tf32: bool = doc(True, "allow TF32 matmuls/convolutions on CUDA")
    find_unused_parameters: bool = doc(False, "DDP: set when some trainable parameters get no gradient in a step")
    progress: bool = doc(True, "show a tqdm bar (only on a TTY, only on the main process)")

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
        need(self.precision in ("fp32", "bf16"), "precision", "'fp32' or 'bf16'")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(self.batch_size % self.grad_accum == 0, "batch_size", f"divisible by grad_accum={self.grad_accum}")
        need(self.grad_clip >= 0, "grad_clip", ">= 0 (0 = off)")
        need(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) (0 = off)")
        need(self.checkpoint_every >= 0, "checkpoint_every", ">= 0")
        need(self.keep_last >= 1, "keep_last", ">= 1")
        need(self.log_every >= 1, "log_every", ">= 1")
        need(self.eval_every >= 0, "eval_every", ">= 0")
        need(self.num_workers >= 0, "num_workers", ">= 0")


@dataclass
class StepOutput:
    """What ``task.training_step`` returns.

    ``losses``: one scalar tensor per optimizer group (``{"main": loss}`` for one group), each
    the MEAN over the step's (micro-)batch on this process.
    ``metrics``: floats or scalar tensors to log (averaged over micro-batches, processes and the
    log window); ``metrics["tokens"]`` is a count (summed) that turns into ``tokens_per_s``.
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
        if batch_size % (grad_accum * num_processes):
            raise ValueError(f"batch_size={batch_size} is not divisible by grad_accum * num_processes = "
                             f"{grad_accum} * {num_processes}")
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
    ddp: bool  # one group: DDP reduces gradients (on several processes)
    manual_sync: bool  # several groups on several processes: _all_reduce_mean
    n_proc: int
    rank: int
    n_items: int
    steps_per_epoch: int
    latest: Path | None
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

    # ----------------------------------------------------------------- public

    def final_model(self) -> nn.Module:
        """The EMA copy of ``task.ema_model()`` when ``ema_decay > 0``, else ``task.ema_model()``.

        (``task.ema_model()`` falls back to the task itself when the task defines none.)
        """
        target = ckpt.ema_target(self.task)
        if self.config.ema_decay > 0:
            if self._ema is None:
                raise RuntimeError("final_model(): ema_decay > 0 but fit() has not run, so there is no EMA yet")
            return self._ema.averaged_model(target)
        return target

    def fit(self) -> FitResult:
        """Train until ``max_steps`` (resuming first if ``resume`` and a checkpoint exists)."""
        t0 = time.perf_counter()
        cfg = self.config
        run = self._setup()
        acc = run.acc
        step = self.step
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
        it: Iterator[Any] | None = None
        epoch = -1
        try:
            while step < cfg.max_steps:
                if it is None or step // run.steps_per_epoch != epoch:
                    epoch, start = divmod(step, run.steps_per_epoch)
                    it = iter(self._loader(run, epoch, start))
                values, grad_norms, factor = self._train_step(run, step, it, window, last_ckpt)
                step += 1
                self.step = step
                last_losses = dict(zip(run.names, values))
                window.add_step(values, {g.name: cfg.lr * g.lr_scale * factor for g in run.groups}, grad_norms)
                bar.update(1)

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    record = window.flush(acc, cfg.batch_size, epoch)
                    logger.log(record, step)
                    history.append({"step": step, **record})
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k.startswith("loss/")})
                t_aside = time.perf_counter()
                if cfg.eval_every and step % cfg.eval_every == 0 and self.eval_fn is not None:
                    self._evaluate(step, logger, history)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
                    last_ckpt = self._save(run, step, last_losses)
                window.t0 += time.perf_counter() - t_aside  # throughput counts training time only
        finally:
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
            cpu=cfg.device == "cpu",
            find_unused_parameters=cfg.find_unused_parameters,
            log_dir=str(self.out_dir / "tensorboard") if tensorboard_available() else None,
        )
        self.accelerator = acc
        device = acc.device
        check_precision(cfg.precision, device)
        setup_backends(device, cfg.tf32)
        if acc.distributed_type.value not in _SUPPORTED_DISTRIBUTED:
            raise ValueError(f"Trainer runs single-process or DDP (accelerate launch --multi_gpu); "
                             f"distributed_type={acc.distributed_type.value} (FSDP/DeepSpeed/...) is not supported")
        n_proc, rank = acc.num_processes, acc.process_index
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
        self.task.to(device)
        self.task.train()
        wrapper = _StepModule(self.task)
        ddp = len(groups) == 1
        model: nn.Module = acc.prepare_model(wrapper) if ddp else wrapper
        if cfg.compile:
            model = torch.compile(model)
        ema_module = ckpt.ema_target(self.task)
        self._ema = EMA(ema_module, cfg.ema_decay) if cfg.ema_decay > 0 else None
        run = _Run(
            acc=acc, device=device, model=model, groups=groups, names=[g.name for g in groups],
            optimizers={g.name: self._make_optimizer(g, device) for g in groups},
            schedule=make_schedule(cfg.schedule, cfg.max_steps, cfg.warmup_steps, cfg.decay_fraction,
                                   cfg.min_lr_ratio),
            ema_module=ema_module, ddp=ddp, manual_sync=(not ddp) and n_proc > 1, n_proc=n_proc, rank=rank,
            n_items=n_items, steps_per_epoch=steps_per_epoch, latest=latest,
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
                    last_ckpt: Path | None) -> tuple[list[float], dict[str, torch.Tensor], float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (global losses, grad norms, lr factor)."""
        cfg, acc = self.config, run.acc
        loss_sum = torch.zeros(len(run.groups), device=run.device)
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(it), run.device)
            gen = step_generator(cfg.seed, step, run.rank, micro)
            last_micro = micro == cfg.grad_accum - 1
            # DDP: all-reduce gradients only on the last micro-batch
            sync_ctx = acc.no_sync(run.model) if (run.ddp and not last_micro) else contextlib.nullcontext()
            with sync_ctx:
                with acc.autocast():
                    losses, metrics = run.model(batch, step, gen)
                self._check_losses(losses, run.names, step)
                scaled = [losses[n].float() / cfg.grad_accum for n in run.names]
                if run.ddp:
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
        values = global_loss.tolist()
        for name, v in zip(run.names, values):
            if not math.isfinite(v):
                self.task.zero_grad(set_to_none=True)
                raise NonFiniteLossError(step, name, v, last_ckpt)
        factor = run.schedule(step)
        grad_norms = {}
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure, do not clip
        for g in run.groups:
            opt = run.optimizers[g.name]
            for pg in opt.param_groups:
                pg["lr"] = cfg.lr * pg["lr_scale"] * factor
            grad_norms[g.name] = torch.nn.utils.clip_grad_norm_(g.params, max_norm)
            opt.step()
        self.task.zero_grad(set_to_none=True)
        if self._ema is not None:
            self._ema.update(run.ema_module)
        return values, grad_norms, factor

    def _make_optimizer(self, g: _Group, device: torch.device) -> torch.optim.Optimizer:
        # Biases and norm gains (1-D) get no weight decay: decaying them only hurts.
        decay = [p for p in g.params if p.ndim >= 2]
        no_decay = [p for p in g.params if p.ndim < 2]
        param_groups = []
        if decay:
            param_groups.append({"params": decay, "weight_decay": g.weight_decay, "lr_scale": g.lr_scale})
        if no_decay:
            param_groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": g.lr_scale})
        fused = device.type == "cuda" and all(p.is_floating_point() for p in g.params)
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
                    model_state=self.task.state_dict(),
                    ema_state=self._ema.state_dict() if self._ema is not None else None,
                    optimizer_states={n: o.state_dict() for n, o in run.optimizers.items()},
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
        load_state_strict(self.task, load_weights(path / ckpt.MODEL_FILE), str(path / ckpt.MODEL_FILE))
        if self._ema is not None:
            if not (path / ckpt.EMA_FILE).is_file():
                raise FileNotFoundError(f"ema_decay={cfg.ema_decay} but {str(path)!r} has no {ckpt.EMA_FILE}: "
                                        f"the run was started without EMA")
            self._ema.load_state_dict(load_weights(path / ckpt.EMA_FILE), str(path / ckpt.EMA_FILE))
        opt_states = ckpt.load_optimizer_states(path)
        if set(opt_states) != set(optimizers):
            raise ValueError(f"{str(path / ckpt.OPTIMIZER_FILE)!r} holds optimizer groups {sorted(opt_states)}, "
                             f"the task has {sorted(optimizers)}")
        for name, opt in optimizers.items():
            opt.load_state_dict(opt_states[name])
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


class _Window:
    """Sums over the steps since the last log: losses, metrics, item counts, time."""

    def __init__(self, names: list[str]):
        self.names = names
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.loss = [0.0] * len(self.names)
        self.metric_sum: dict[str, Any] = {}
        self.metric_n: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self.lr: dict[str, float] = {}
        self.grad_norm: dict[str, torch.Tensor] = {}

    def add_metrics(self, metrics: dict[str, Any]) -> None:
        for k, v in metrics.items():
            # tensors stay on their device until the log step: no host sync per micro-batch
            v = v.detach().float().mean() if isinstance(v, torch.Tensor) else float(v)
            self.metric_sum[k] = self.metric_sum.get(k, 0.0) + v
            self.metric_n[k] = self.metric_n.get(k, 0) + 1

    def add_step(self, losses: list[float], lr: dict[str, float], grad_norm: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.loss = [a + b for a, b in zip(self.loss, losses)]
        self.lr, self.grad_norm = lr, grad_norm

    def flush(self, acc: Any, batch_size: int, epoch: int) -> dict[str, Any]:
        from accelerate.utils import gather_object

        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        # metrics: summed here, then over processes; "tokens" is a count, the rest are means
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
            record[f"loss/{name}"] = v / max(self.steps, 1)
        for name in self.names:
            record[f"lr/{name}"] = self.lr.get(name, 0.0)
            if name in self.grad_norm:
                record[f"grad_norm/{name}"] = float(self.grad_norm[name])
        record["items_per_s"] = batch_size * self.steps / elapsed
        for k in sorted(total):
            if k == "tokens":
                record["tokens_per_s"] = total[k] / elapsed
            else:
                record[k] = total[k] / count[k]
        self._reset()
        return record
