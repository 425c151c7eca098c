"""A toy regression task for the Trainer tests, and a script the tests run as a subprocess.

    python tests/_training_toy.py OUT_DIR [--task mlp|gan] [--max-steps N] [--sleep S] ...
    accelerate launch --num_processes 2 --cpu tests/_training_toy.py OUT_DIR ...

The script trains and writes ``OUT_DIR/final.safetensors`` (the task's weights) when done.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from arvid.training import StepOutput, Trainer, TrainerConfig


def toy_data(n: int = 96, dim: int = 4, seed: int = 0) -> TensorDataset:
    """``n`` random inputs ``x [n, dim]`` with targets ``y [n, 1] = sin(x @ w)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    return TensorDataset(x, torch.sin(x @ w))


class ToyTask(nn.Module):
    """A 2-layer MLP regressor.

    ``dropout`` draws from the global torch RNG (so exact resume needs the saved RNG states);
    ``noise`` draws input noise from the per-step generator; ``sleep`` slows each step so a
    test can kill the process mid-run; ``nan_at`` returns a NaN loss at that step; ``crash_at``
    raises (a simulated crash) at that step.
    """

    def __init__(self, dim: int = 4, hidden: int = 32, dropout: float = 0.0, noise: float = 0.0,
                 sleep: float = 0.0, nan_at: int = -1, crash_at: int = -1, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.noise, self.sleep, self.nan_at, self.crash_at = noise, sleep, nan_at, crash_at
        self.seen: list[int] = []  # steps this process trained on (for tests)

    def training_step(self, batch, step: int, generator: torch.Generator) -> StepOutput:
        x, y = batch  # [b, dim], [b, 1]
        if step == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash at step {step}")
        if self.sleep:
            time.sleep(self.sleep)
        if self.noise:
            x = x + self.noise * torch.randn(x.shape, generator=generator).to(x.device)
        pred = self.net(x)
        loss = ((pred - y) ** 2).mean()
        if step == self.nan_at:
            loss = loss * float("nan")
        self.seen.append(step)
        return StepOutput({"main": loss}, {"tokens": x.shape[0], "pred_mean": pred.mean().detach()})

    def ema_model(self) -> nn.Module:
        return self.net


class ToyGANTask(nn.Module):
    """Two optimizer groups: a regressor (``main``) and a critic (``critic``) with its own loss.

    The regressor's loss includes a term through the critic, as a GAN generator's does; the
    critic's gradient from that term must NOT reach the critic's optimizer.
    """

    def __init__(self, dim: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            self.critic = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def optimizer_groups(self):
        return {"main": list(self.net.parameters()),
                "critic": {"params": list(self.critic.parameters()), "lr_scale": 0.5}}

    def training_step(self, batch, step: int, generator: torch.Generator) -> StepOutput:
        x, y = batch
        pred = self.net(x)
        fool = self.critic(pred).mean()
        main = ((pred - y) ** 2).mean() - 0.1 * fool
        critic = (self.critic(pred.detach()) - self.critic(y)).mean() + 0.01 * (self.critic(y) ** 2).mean()
        return StepOutput({"main": main, "critic": critic})

    def ema_model(self) -> nn.Module:
        return self.net


class ToyWeightedTask(nn.Module):
    """Items of unequal weight (as packed batches hold unequal numbers of loss tokens): item i counts
    ``w_i = 1 + floor(4 * |x_i0|) % 4`` times; a slice's loss is its weighted mean, and
    ``loss_weight`` (its weight sum) lets the Trainer turn the slices' means into the global one."""

    def __init__(self, dim: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    @staticmethod
    def weights(x: torch.Tensor) -> torch.Tensor:
        return 1.0 + torch.floor(4 * x[:, 0].abs()) % 4  # [b]

    def loss_weight(self, batch) -> float:
        return float(self.weights(batch[0]).sum())

    def training_step(self, batch, step: int, generator: torch.Generator) -> StepOutput:
        x, y = batch
        w = self.weights(x)
        err = ((self.net(x) - y) ** 2)[:, 0]
        return StepOutput({"main": (w * err).sum() / w.sum()}, {"tokens": float(w.sum())})

    def ema_model(self) -> nn.Module:
        return self.net


def run(out_dir: str | Path, task_name: str = "mlp", max_steps: int = 40, batch_size: int = 8, grad_accum: int = 1,
        checkpoint_every: int = 5, sleep: float = 0.0, dropout: float = 0.0, noise: float = 0.0, ema: float = 0.0,
        n: int = 96, device: str = "cpu", precision: str = "fp32", eval_fail_at: int = -1) -> tuple[Trainer, nn.Module]:
    """Train one toy task into ``out_dir`` and save its final weights as ``final.safetensors``."""
    task = (ToyTask(dropout=dropout, noise=noise, sleep=sleep) if task_name == "mlp" else
            ToyWeightedTask() if task_name == "weighted" else ToyGANTask())
    cfg = TrainerConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=3e-2,
                        warmup_steps=3, checkpoint_every=checkpoint_every, log_every=1, ema_decay=ema,
                        eval_every=1 if eval_fail_at >= 0 else 0,
                        keep_last=2, device=device, precision=precision, tf32=False, progress=False)
    def eval_fn(task: nn.Module, step: int) -> dict:
        if step == eval_fail_at:
            raise ValueError(f"planted eval failure at step {step}")
        return {}

    trainer = Trainer(cfg, task, toy_data(n), out_dir, eval_fn=eval_fn)
    result = trainer.fit()
    if trainer.accelerator.is_main_process:
        from arvid.io import save_weights

        save_weights(task.state_dict(), Path(out_dir) / "final.safetensors")
        print(f"done {task_name} step={result.step} loss={result.loss:.6f}", flush=True)
    return trainer, task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--task", default="mlp", help="mlp, gan, weighted, or several comma-separated (each into "
                   "OUT_DIR/<task>)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.0)
    p.add_argument("--device", default="cpu", choices=["cpu", "auto"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--eval-fail-at", type=int, default=-1, help="eval_fn raises (on the main process) at this step")
    args = p.parse_args(argv)
    names = args.task.split(",")
    for name in names:
        out = Path(args.out_dir) / name if len(names) > 1 else Path(args.out_dir)
        run(out, name, args.max_steps, args.batch_size, args.grad_accum, args.checkpoint_every, args.sleep,
            args.dropout, args.noise, args.ema, device=args.device, precision=args.precision,
            eval_fail_at=args.eval_fail_at)
    return 0


if __name__ == "__main__":
    from arvid.training.device import distributed_teardown, exit_process

    torch.set_num_threads(1)
    with distributed_teardown():
        rc = main()
    exit_process(rc)
