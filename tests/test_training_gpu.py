"""The Trainer on CUDA: exact resume, bf16 autocast with fused AdamW, 2-GPU DDP (NCCL) like 1 GPU.

Marked ``gpu``: CI skips these; run with ``pytest -m gpu tests/test_training_gpu.py`` on a GPU machine.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_toy import ToyGANTask, ToyTask, run, toy_data

from arvid.training import StepOutput, Trainer, TrainerConfig
from arvid.training.logging import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOY = Path(__file__).parent / "_training_toy.py"


def _cfg(**kw):
    base = dict(max_steps=20, batch_size=8, lr=3e-2, warmup_steps=3, checkpoint_every=5, log_every=1,
                device="auto", tf32=False, progress=False)
    base.update(kw)
    return TrainerConfig(**base)


def test_cuda_crash_resume_is_exact(tmp_path):
    kw = dict(dropout=0.2, noise=0.1)
    cfg = _cfg(grad_accum=2, ema_decay=0.8)
    ref = ToyTask(**kw)
    ref_trainer = Trainer(cfg, ref, toy_data(), tmp_path / "ref")
    ref_trainer.fit()
    assert next(ref.parameters()).is_cuda
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, ToyTask(crash_at=13, **kw), toy_data(), tmp_path / "run").fit()
    resumed = ToyTask(**kw)
    trainer = Trainer(cfg, resumed, toy_data(), tmp_path / "run")
    trainer.fit()
    for a, b in zip(resumed.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(trainer.final_model().state_dict().values(), ref_trainer.final_model().state_dict().values()):
        assert torch.equal(a, b)


def test_cuda_bf16_fused_adamw(tmp_path):
    seen = []

    class Task(ToyTask):
        def training_step(self, batch, step, generator):
            seen.append((batch[0].device.type, self.net(batch[0]).dtype))
            return super().training_step(batch, step, generator)

    task = Task()
    trainer = Trainer(_cfg(precision="bf16", max_steps=15, checkpoint_every=0), task, toy_data(), tmp_path)
    result = trainer.fit()
    assert set(seen) == {("cuda", torch.bfloat16)}
    assert all(p.dtype == torch.float32 and p.is_cuda for p in task.parameters())
    losses = [r["loss/main"] for r in result.history]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_cuda_gan_groups(tmp_path):
    class Task(ToyGANTask):
        def training_step(self, batch, step, generator):
            x, y = batch
            pred = self.net(x)
            return StepOutput({"main": ((pred - y) ** 2).mean() - self.critic(pred).mean(),
                               "critic": 0.0 * self.critic(pred.detach()).sum()})

    task = Task()
    critic0 = {k: v.clone().cuda() for k, v in task.critic.state_dict().items()}
    Trainer(_cfg(max_steps=4, checkpoint_every=0), task, toy_data(), tmp_path).fit()
    assert all(torch.equal(v, critic0[k]) for k, v in task.critic.state_dict().items())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_match_one_gpu(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher is not None, "the accelerate CLI is missing"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    args = ["--max-steps", "12", "--checkpoint-every", "6", "--grad-accum", "2", "--device", "auto"]
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(TOY), str(tmp_path / "two"), "--task", "mlp,gan", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name, keys in (("mlp", ["loss/main"]), ("gan", ["loss/main", "loss/critic"])):
        run(tmp_path / "one" / name, name, max_steps=12, checkpoint_every=6, grad_accum=2, device="auto")
        two = read_metrics(tmp_path / "two" / name / "metrics.jsonl")
        one = read_metrics(tmp_path / "one" / name / "metrics.jsonl")
        for key in keys:
            torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]),
                                       rtol=1e-4, atol=1e-5)
        rng = torch.load(tmp_path / "two" / name / "checkpoints" / "step_00000012" / "rng.pt", weights_only=True)
        assert len(rng["ranks"]) == 2


def test_cuda_profile_reports_device_busy_time(tmp_path):
    import re

    Trainer(_cfg(max_steps=6, profile_start=1, profile_steps=3), ToyTask(hidden=512), toy_data(), tmp_path / "p").fit()
    text = (tmp_path / "p" / "profile.txt").read_text()
    assert text.startswith("# steps 1..3 (3 optimizer steps), device cuda")
    m = re.search(r"device busy \(sum of kernel times\): ([0-9.]+) s = ([0-9.]+)% of wall time", text)
    assert m, text[:400]
    # a toy MLP is launch-bound: the device is busy for a small, nonzero part of the wall time
    assert 0.0 < float(m.group(2)) < 100.0
    assert "## top operators by device time" in text


def test_cuda_deferred_loss_check_leaves_the_steps_without_a_host_sync(tmp_path):
    """loss_check=auto on CUDA is deferred: steps 5..8 (no log, no checkpoint) make no stream sync;
    under loss_check=sync each step makes at least one (the host reads the losses)."""
    import warnings

    class Task(ToyTask):
        def training_step(self, batch, step, generator):
            if step == 5:
                torch.cuda.set_sync_debug_mode("warn")
            elif step == 9:
                torch.cuda.set_sync_debug_mode("default")
            return super().training_step(batch, step, generator)

    counts = {}
    for mode in ("auto", "sync"):
        cfg = _cfg(precision="bf16", max_steps=12, checkpoint_every=0, log_every=100, loss_check=mode)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                Trainer(cfg, Task(), toy_data(), tmp_path / mode).fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts[mode] = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert counts["auto"] == [], counts
    assert len(counts["sync"]) >= 4, counts
