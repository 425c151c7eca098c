"""One Trainer for every arvid model (accelerate: one process, DDP or FSDP2), checkpoints, EMA, schedules.

    from arvid.training import Trainer, TrainerConfig, StepOutput
    result = Trainer(TrainerConfig(max_steps=100), task, dataset, "runs/x").fit()
"""

from arvid.training import schedules
from arvid.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint_weights
from arvid.training.ema import EMA
from arvid.training.schedules import constant_schedule, cosine_schedule, make_schedule, wsd_schedule
from arvid.training.trainer import (
    FitResult,
    GlobalBatchSampler,
    NonFiniteLossError,
    StepOutput,
    Trainer,
    TrainerConfig,
    derive_seed,
    step_generator,
)

__all__ = [
    "EMA",
    "FitResult",
    "GlobalBatchSampler",
    "NonFiniteLossError",
    "StepOutput",
    "Trainer",
    "TrainerConfig",
    "constant_schedule",
    "cosine_schedule",
    "derive_seed",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_weights",
    "make_schedule",
    "schedules",
    "step_generator",
    "wsd_schedule",
]
