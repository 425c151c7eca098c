"""Checkpoints: atomic saves, safe loading, pruning, RNG round trips, strict weight loading."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_toy import ToyTask, toy_data

from arvid.io import ArvidIOError, load_weights, torch_load_safe
from arvid.training import (
    Trainer,
    TrainerConfig,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
)
from arvid.training import checkpoint as ckpt


def _save(path, task, step, config=None):
    return ckpt.save_checkpoint(
        path, model_state=task.state_dict(), optimizer_states={"main": {"state": {}, "param_groups": []}},
        rng_states=[ckpt.capture_rng_state()], trainer_state={"step": step}, config=config or TrainerConfig())


def test_exception_during_save_keeps_previous_checkpoint(tmp_path):
    task = ToyTask()
    p5 = _save(ckpt.checkpoint_dir(tmp_path, 5), task, 5)

    class Boom(dict):
        def items(self):
            raise RuntimeError("disk on fire")

    # a failing save of a new step, and a failing overwrite of the existing one
    for target in (ckpt.checkpoint_dir(tmp_path, 10), p5):
        with pytest.raises(RuntimeError, match="disk on fire"):
            ckpt.save_checkpoint(target, model_state=Boom(), optimizer_states={}, rng_states=[],
                                 trainer_state={"step": 10}, config=TrainerConfig())
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    assert sorted(x.name for x in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    fresh = ToyTask(seed=1)
    load_checkpoint_weights(p5, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), task.state_dict().values()))


def test_trainer_save_failure_leaves_last_checkpoint_and_resumes(tmp_path, monkeypatch):
    cfg = TrainerConfig(max_steps=12, batch_size=8, lr=0.01, checkpoint_every=4, log_every=1, device="cpu",
                        progress=False)
    real = ckpt.save_config
    calls = {"n": 0}

    def flaky(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the 2nd checkpoint (step 8) dies half written
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_config", flaky)
    with pytest.raises(ArvidIOError, match="step_00000008"):
        Trainer(cfg, ToyTask(), toy_data(), tmp_path).fit()
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert not [x for x in (tmp_path / "checkpoints").iterdir() if x.name.startswith(".")]
    monkeypatch.setattr(ckpt, "save_config", real)
    task = ToyTask()
    result = Trainer(cfg, task, toy_data(), tmp_path).fit()
    assert result.step == 12
    ref = ToyTask()
    Trainer(cfg, ref, toy_data(), tmp_path / "ref").fit()
    assert all(torch.equal(a, b) for a, b in zip(task.state_dict().values(), ref.state_dict().values()))


def test_checkpoint_files_load_without_pickled_code(tmp_path):
    cfg = TrainerConfig(max_steps=6, batch_size=8, checkpoint_every=2, keep_last=2, ema_decay=0.9,
                        device="cpu", progress=False)
    task = ToyTask()
    Trainer(cfg, task, toy_data(), tmp_path).fit()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 6]  # keep_last=2 pruned step 2
    last = latest_checkpoint(tmp_path)
    opt = torch_load_safe(last / ckpt.OPTIMIZER_FILE)
    assert set(opt) == {"main"} and opt["main"]["state"]  # AdamW moments are there
    rng = torch_load_safe(last / ckpt.RNG_FILE)["ranks"]
    assert len(rng) == 1 and rng[0]["torch"].dtype == torch.uint8
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    assert state["step"] == 6 and state["epoch"] == 6 // (96 // 8)
    assert (last / "config.yaml").is_file() and (tmp_path / "trainer.yaml").is_file()
    model = load_weights(last / ckpt.MODEL_FILE)
    assert all(torch.equal(model[k], v) for k, v in task.state_dict().items())
    ema = load_weights(last / ckpt.EMA_FILE)
    assert set(ema) == set(task.net.state_dict())


def test_load_checkpoint_weights_strict_and_ema(tmp_path):
    cfg = TrainerConfig(max_steps=3, batch_size=8, ema_decay=0.5, device="cpu", progress=False)
    trainer = Trainer(cfg, ToyTask(), toy_data(), tmp_path)
    trainer.fit()
    other = ToyTask(seed=3)
    load_checkpoint_weights(latest_checkpoint(tmp_path), other, ema=True)
    final = trainer.final_model()
    assert all(torch.equal(a, b) for a, b in zip(other.net.state_dict().values(), final.state_dict().values()))
    with pytest.raises(ArvidIOError, match="shape mismatch"):
        load_checkpoint_weights(latest_checkpoint(tmp_path), ToyTask(hidden=8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_weights(tmp_path / "nope", other)


def test_rng_state_roundtrip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ckpt.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1), np.random.randn())
    ckpt.restore_rng_state(torch_load_safe(tmp_path / "rng.pt"))
    b = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1), np.random.randn())
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3] and a[4] == b[4]


def test_listing_ignores_temporaries_and_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step_00000009.abc.tmp").mkdir(parents=True)
    (root / "step_00000007").mkdir()  # no trainer_state.json: not a checkpoint
    _save(ckpt.checkpoint_dir(tmp_path, 3), ToyTask(), 3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    assert [p.name for p in ckpt.remove_stale_temporaries(tmp_path)] == [".step_00000009.abc.tmp"]
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_pruning_hides_a_checkpoint_before_deleting_it(tmp_path, monkeypatch):
    """A kill mid-delete (here: rmtree stops after one file) leaves a hidden ``.step_*`` leftover,
    which the next run's ``remove_stale_temporaries`` deletes; never a visible half checkpoint."""
    import os
    import shutil
    from types import SimpleNamespace

    import arvid.io

    for step in (1, 2, 3):
        _save(ckpt.checkpoint_dir(tmp_path, step), ToyTask(), step)

    def killed_rmtree(path, ignore_errors=False):
        next(p for p in sorted(Path(path).iterdir()) if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(arvid.io, "shutil", SimpleNamespace(rmtree=killed_rmtree))  # discard_dir's delete
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(tmp_path, 2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f".step_00000001.old-{os.getpid()}", "step_00000002",
                                                      "step_00000003"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    monkeypatch.setattr(arvid.io, "shutil", shutil)
    assert [p.name for p in ckpt.remove_stale_temporaries(tmp_path)] == [f".step_00000001.old-{os.getpid()}"]
    assert [p.name for p in ckpt.prune_checkpoints(tmp_path, 1)] == ["step_00000002"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]


@pytest.mark.parametrize("saved, resumed", [("sync", "deferred"), ("deferred", "sync")])
def test_a_resume_steps_with_this_runs_optimizer_not_the_checkpoints(tmp_path, saved, resumed):
    """A checkpoint of an unfused AdamW (a CPU run) resumed where the AdamW is fused (a GPU run, here
    the CPU's fused AdamW of loss_check=deferred): load_state_dict restored the saved `fused: None`,
    the deferred loss check then handed found_inf to the unfused step, which failed with a bare
    AssertionError at the first step after the resume (before 2026-12-08)."""
    def cfg(check):
        return TrainerConfig(max_steps=6, batch_size=8, lr=1e-2, checkpoint_every=3, log_every=1, device="cpu",
                             progress=False, loss_check=check)

    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(saved), ToyTask(crash_at=4), toy_data(), tmp_path / "run").fit()
    task = ToyTask()
    trainer = Trainer(cfg(resumed), task, toy_data(), tmp_path / "run")
    assert trainer.fit().step == 6
    fused = resumed == "deferred"
    assert [bool(g["fused"]) for g in trainer.optimizers["main"].param_groups] == [fused, fused]
    ref = ToyTask()
    Trainer(cfg(resumed), ref, toy_data(), tmp_path / "ref").fit()
    for a, b in zip(task.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
