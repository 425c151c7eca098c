"""The Trainer: exact resume (in process and after kill -9), NaN stop, data order, accumulation,
several optimizer groups, evaluation hook, bf16, and clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _training_toy import ToyGANTask, ToyTask, run, toy_data
from torch import nn

from arvid.config import ConfigError, load_config
from arvid.io import load_weights
from arvid.training import (
    GlobalBatchSampler,
    NonFiniteLossError,
    StepOutput,
    Trainer,
    TrainerConfig,
    latest_checkpoint,
    load_checkpoint_weights,
    step_generator,
)
from arvid.training.logging import read_metrics

TOY = Path(__file__).parent / "_training_toy.py"


def _cfg(**kw):
    base = dict(max_steps=20, batch_size=8, lr=3e-2, warmup_steps=3, checkpoint_every=5, log_every=1,
                keep_last=2, device="cpu", progress=False)
    base.update(kw)
    return TrainerConfig(**base)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_crash_then_resume_equals_uninterrupted(tmp_path):
    # dropout (global RNG), input noise (per-step generator), EMA, accumulation, 2+ epochs
    kw = dict(dropout=0.2, noise=0.1)
    cfg = _cfg(grad_accum=2, ema_decay=0.8, max_steps=30)
    ref = ToyTask(**kw)
    ref_trainer = Trainer(cfg, ref, toy_data(), tmp_path / "ref")
    ref_trainer.fit()

    crashed = ToyTask(crash_at=13, **kw)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, crashed, toy_data(), tmp_path / "run").fit()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000010"
    resumed = ToyTask(**kw)
    trainer = Trainer(cfg, resumed, toy_data(), tmp_path / "run")
    result = trainer.fit()
    assert result.step == 30 and resumed.seen[0] == 10  # it did resume at step 10
    assert _same(resumed, ref)
    assert _same(trainer.final_model(), ref_trainer.final_model())
    # each step is logged once, with the same losses as the uninterrupted run
    run_log, ref_log = read_metrics(tmp_path / "run/metrics.jsonl"), read_metrics(tmp_path / "ref/metrics.jsonl")
    assert [r["step"] for r in run_log] == list(range(1, 31))
    assert [r["loss/main"] for r in run_log] == [r["loss/main"] for r in ref_log]
    # a finished run resumed again does nothing and reports the finished step
    again = Trainer(cfg, ToyTask(**kw), toy_data(), tmp_path / "run").fit()
    assert again.step == 30 and again.history == []


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    args = ["--max-steps", "40", "--checkpoint-every", "5", "--dropout", "0.1", "--noise", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TOY), str(run_dir), *args, "--sleep", "0.05"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    target = run_dir / "checkpoints" / "step_00000010"
    deadline = time.monotonic() + 60
    while not target.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest_checkpoint(run_dir)
    assert 10 <= int(killed_at.name.split("_")[1]) < 40 and not (run_dir / "final.safetensors").exists()

    out = subprocess.run([sys.executable, str(TOY), str(run_dir), *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "done mlp step=40" in out.stdout
    # the uninterrupted reference runs in this process (same code, same CPU kernels): saves a start-up
    ref_dir = tmp_path / "ref"
    run(ref_dir, max_steps=40, checkpoint_every=5, dropout=0.1, noise=0.1)
    a, b = load_weights(run_dir / "final.safetensors"), load_weights(ref_dir / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss/main"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert losses == [r["loss/main"] for r in read_metrics(ref_dir / "metrics.jsonl")]


def test_nan_loss_stops_with_clear_error_and_checkpoint_loads(tmp_path):
    task = ToyTask(nan_at=7)
    with pytest.raises(NonFiniteLossError, match=r"step 7: losses\['main'\] = nan") as info:
        Trainer(_cfg(), task, toy_data(), tmp_path).fit()
    assert info.value.step == 7 and info.value.name == "main"
    assert info.value.checkpoint.name == "step_00000005" and "step_00000005" in str(info.value)
    assert all(torch.isfinite(p).all() for p in task.parameters())  # the NaN step was not applied
    loaded = load_checkpoint_weights(latest_checkpoint(tmp_path), ToyTask(seed=5))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    # resuming (after the cause is fixed) continues from the good checkpoint
    fixed = ToyTask()
    assert Trainer(_cfg(), fixed, toy_data(), tmp_path).fit().step == 20 and fixed.seen[0] == 5


def test_deferred_loss_check_skips_the_nan_step_on_the_device_and_raises_one_step_later(tmp_path):
    # loss_check=deferred: the fused AdamW skips step 7 through found_inf; the host reads step 7's
    # loss during step 8 (before step 8's update) and raises naming step 7
    task = ToyTask(nan_at=7)
    cfg = _cfg(loss_check="deferred", log_every=10, checkpoint_every=5)
    trainer = Trainer(cfg, task, toy_data(), tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match=r"step 7: losses\['main'\] = nan") as info:
        trainer.fit()
    assert info.value.step == 7 and info.value.checkpoint.name == "step_00000005"
    assert task.seen[-2:] == [7, 8]  # step 8's forward ran before the check of step 7 was read
    # the weights are those after steps 0..6: neither step 7 nor step 8 was applied
    ref = ToyTask(crash_at=7)  # the same run stopped at step 7's forward
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, ref, toy_data(), tmp_path / "ref").fit()
    assert _same(task, ref)
    opt = next(iter(trainer.optimizers.values()))
    assert all(int(st["step"]) == 7 for st in opt.state.values())  # found_inf undid step 7's count


def test_deferred_loss_check_logs_the_same_losses_as_the_sync_check(tmp_path):
    runs = {}
    for mode in ("sync", "deferred"):
        result = Trainer(_cfg(loss_check=mode, log_every=3, max_steps=11), ToyTask(), toy_data(),
                         tmp_path / mode).fit()
        runs[mode] = result, [(r["step"], r["loss/main"]) for r in read_metrics(tmp_path / mode / "metrics.jsonl")]
    (sync, sync_log), (deferred, deferred_log) = runs["sync"], runs["deferred"]
    assert [s for s, _ in deferred_log] == [s for s, _ in sync_log] == [3, 6, 9, 11]
    # every window averages all of its steps (the deferred check catches up before each log)
    assert [v for _, v in deferred_log] == pytest.approx([v for _, v in sync_log], rel=1e-5)
    assert deferred.losses == pytest.approx(sync.losses, rel=1e-5) and deferred.step == 11
    with pytest.raises(ConfigError, match="loss_check"):
        _cfg(loss_check="later")


def test_global_batches_do_not_depend_on_processes_or_accumulation():
    def steps(n_proc, accum, start=0):
        per_rank = [list(GlobalBatchSampler(40, 8, accum, n_proc, r, seed=1, epoch=2, start_batch=start))
                    for r in range(n_proc)]
        out = []  # regroup micro-batches of all ranks into global batches
        for i in range(0, len(per_rank[0]), accum):
            out.append(sorted(j for m in range(accum) for r in range(n_proc) for j in per_rank[r][i + m]))
        return out

    one = steps(1, 1)
    assert len(one) == 5 and sorted(j for b in one for j in b) == list(range(40))
    assert steps(2, 1) == one and steps(2, 2) == one and steps(1, 4) == one
    assert steps(2, 2, start=3) == one[3:]  # resume skips consumed batches
    other_epoch = list(GlobalBatchSampler(40, 8, 1, 1, 0, seed=1, epoch=3))
    assert sorted(other_epoch[0]) != one[0]
    assert torch.equal(torch.rand(3, generator=step_generator(0, 5, 0)), torch.rand(3, generator=step_generator(0, 5, 0)))
    assert not torch.equal(torch.rand(3, generator=step_generator(0, 5, 0)),
                           torch.rand(3, generator=step_generator(0, 5, 1)))


def test_grad_accumulation_keeps_the_global_batch(tmp_path):
    finals = []
    for accum in (1, 2, 4):
        task = ToyTask()
        Trainer(_cfg(grad_accum=accum, max_steps=8), task, toy_data(), tmp_path / str(accum)).fit()
        finals.append(task)
    for t in finals[1:]:
        for a, b in zip(finals[0].parameters(), t.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not _same(finals[0], ToyTask())  # it trained


def test_each_loss_trains_only_its_group(tmp_path):
    class Task(ToyGANTask):
        def training_step(self, batch, step, generator):
            x, y = batch
            pred = self.net(x)
            main = ((pred - y) ** 2).mean() - self.critic(pred).mean()  # would push grads into the critic
            critic = 0.0 * self.critic(pred.detach()).sum()  # zero gradient: Adam must not move the critic
            return StepOutput({"main": main, "critic": critic})

    task = Task()
    critic0 = {k: v.clone() for k, v in task.critic.state_dict().items()}
    net0 = {k: v.clone() for k, v in task.net.state_dict().items()}
    Trainer(_cfg(max_steps=4, checkpoint_every=0), task, toy_data(), tmp_path).fit()
    assert all(torch.equal(v, critic0[k]) for k, v in task.critic.state_dict().items())
    assert not all(torch.equal(v, net0[k]) for k, v in task.net.state_dict().items())


def test_host_metrics_are_read_from_each_micro_batch_before_its_step(tmp_path):
    """A task's ``host_metrics(batch)`` is called once per micro-batch, on the batch the loader gave
    and before the step that trains on it (the Trainer moves it to the device in between), and its
    counts reach the log like the step's own (``tokens``, ``flops`` and ``peak_seconds`` as rates
    over the log window's wall time)."""

    class Counted(ToyTask):
        def __init__(self):
            super().__init__()
            self.events = []

        def host_metrics(self, batch):
            self.events.append(("host", batch[0].data_ptr()))
            b = batch[0].shape[0]
            return {"tokens": 10.0 * b, "flops": 1e13 * b, "peak_seconds": 0.5 * b}

        def training_step(self, batch, step, generator):
            self.events.append(("step", batch[0].data_ptr()))
            out = super().training_step(batch, step, generator)
            out.metrics.pop("tokens")  # counted on the host only
            return out

    task = Counted()
    Trainer(_cfg(max_steps=3, log_every=3, grad_accum=2, checkpoint_every=0), task, toy_data(), tmp_path).fit()
    assert [e for e, _ in task.events] == ["host", "step"] * 6  # 3 steps x 2 micro-batches
    assert all(task.events[i][1] == task.events[i + 1][1] for i in range(0, 12, 2))
    train = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/main" in r]
    assert train[-1]["tokens_per_s"] == pytest.approx(10 * train[-1]["items_per_s"])
    # flops and peak_seconds are counts too: rates over the same window (one process)
    assert train[-1]["tflops"] == pytest.approx(10 * train[-1]["items_per_s"])
    assert train[-1]["mfu"] == pytest.approx(0.5 * train[-1]["items_per_s"])


def test_metrics_log_and_eval_hook(tmp_path):
    calls = []

    def eval_fn(task, step):
        calls.append((step, task.training, torch.is_grad_enabled()))
        return {"mse": torch.tensor(0.25), "step_seen": step}

    cfg = _cfg(max_steps=6, log_every=3, eval_every=2, grad_accum=2)
    result = Trainer(cfg, ToyTask(), toy_data(), tmp_path, eval_fn=eval_fn).fit()
    assert calls == [(2, False, False), (4, False, False), (6, False, False)]
    recs = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in recs if "loss/main" in r]
    evals = [r for r in recs if "eval/mse" in r]
    assert [r["step"] for r in train] == [3, 6] and [r["step"] for r in evals] == [2, 4, 6]
    assert evals[1]["eval/mse"] == 0.25 and evals[1]["eval/step_seen"] == 4
    assert train[0]["items_per_s"] > 0 and train[0]["tokens_per_s"] == pytest.approx(train[0]["items_per_s"])
    assert {"lr/main", "grad_norm/main", "pred_mean", "epoch"} <= set(train[0])
    assert result.history[-1]["step"] == 6 and result.checkpoint == latest_checkpoint(tmp_path)
    assert result.loss == json.loads((result.checkpoint / "trainer_state.json").read_text())["losses"]["main"]
    assert load_config(TrainerConfig, tmp_path / "trainer.yaml") == cfg


def test_bf16_autocast_on_cpu(tmp_path):
    class Task(ToyTask):
        dtypes: list = []

        def training_step(self, batch, step, generator):
            self.dtypes.append(self.net(batch[0]).dtype)
            return super().training_step(batch, step, generator)

    task = Task()
    result = Trainer(_cfg(precision="bf16", max_steps=15, checkpoint_every=0), task, toy_data(), tmp_path).fit()
    assert set(task.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in task.parameters())  # master weights stay fp32
    losses = [r["loss/main"] for r in result.history]
    assert sum(losses[-3:]) < sum(losses[:3])
    # and fp32 again in the same process (accelerate's one-precision state is reset)
    fp32 = Task()
    Task.dtypes = []
    Trainer(_cfg(max_steps=1, checkpoint_every=0), fp32, toy_data(), tmp_path / "fp32").fit()
    assert set(Task.dtypes) == {torch.float32}


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="batch_size.*grad_accum=3"):
        TrainerConfig(batch_size=8, grad_accum=3)
    with pytest.raises(ConfigError, match="keep_last"):
        TrainerConfig(keep_last=0)
    with pytest.raises(ValueError, match="dataset has 5 items.*batch_size=8"):
        Trainer(_cfg(), ToyTask(), toy_data(5), tmp_path / "small").fit()
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="map-style"):
        Trainer(_cfg(), ToyTask(), Stream(), tmp_path)
    with pytest.raises(TypeError, match="training_step"):
        Trainer(_cfg(), nn.Linear(2, 2), toy_data(), tmp_path)

    class WrongKeys(ToyTask):
        def training_step(self, batch, step, generator):
            return StepOutput({"gen": super().training_step(batch, step, generator).losses["main"]})

    with pytest.raises(ValueError, match=r"returned losses \['gen'\].*groups are \['main'\]"):
        Trainer(_cfg(), WrongKeys(), toy_data(), tmp_path / "keys").fit()

    Trainer(_cfg(max_steps=2), ToyTask(), toy_data(), tmp_path / "done").fit()
    with pytest.raises(FileExistsError, match="resume=False"):
        Trainer(_cfg(max_steps=2, resume=False), ToyTask(), toy_data(), tmp_path / "done").fit()


def test_workers_and_collate_fn_keep_the_order(tmp_path):
    def collate(items):  # a dict batch, as real tasks use
        return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    class DictTask(ToyTask):
        def training_step(self, batch, step, generator):
            return super().training_step((batch["x"], batch["y"]), step, generator)

    finals = []
    for workers in (0, 2):
        task = DictTask()
        Trainer(_cfg(max_steps=14, num_workers=workers, checkpoint_every=0), task, toy_data(), tmp_path / str(workers),
                collate_fn=collate).fit()
        finals.append(task)
    assert _same(finals[0], finals[1])


class _SlowData(torch.utils.data.Dataset):
    """toy_data whose items take ``delay`` seconds each: the loader, not the model, is the bottleneck."""

    def __init__(self, delay: float):
        self.base, self.delay = toy_data(), delay

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.base[i]


def test_data_wait_fraction_is_logged_and_tells_a_slow_loader(tmp_path):
    fast = Trainer(_cfg(max_steps=6, log_every=3), ToyTask(sleep=0.02), toy_data(), tmp_path / "fast").fit()
    slow = Trainer(_cfg(max_steps=6, log_every=3), ToyTask(), _SlowData(0.005), tmp_path / "slow").fit()
    f = [r["data_wait_fraction"] for r in fast.history]
    s = [r["data_wait_fraction"] for r in slow.history]
    assert len(f) == len(s) == 2 and all(0.0 <= v <= 1.0 for v in f + s)
    # 8 items x 5 ms of loading per step against a model step of microseconds, and the reverse
    assert min(s) > 0.8 and max(f) < 0.3, (f, s)
    logged = read_metrics(tmp_path / "slow" / "metrics.jsonl")
    assert all("data_wait_fraction" in r for r in logged)


def test_profile_writes_a_report_for_the_asked_steps(tmp_path, caplog):
    cfg = _cfg(max_steps=8, profile_start=2, profile_steps=3)
    Trainer(cfg, ToyTask(), toy_data(), tmp_path / "run").fit()
    text = (tmp_path / "run" / "profile.txt").read_text()
    assert text.startswith("# steps 2..4 (3 optimizer steps), device cpu")
    assert "ms per step" in text and "aten::addmm" in text  # the toy MLP's linear layers
    trace = json.loads((tmp_path / "run" / "profile_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::addmm" in names
    # off by default; a window the run never reaches writes nothing
    Trainer(_cfg(max_steps=4), ToyTask(), toy_data(), tmp_path / "off").fit()
    with caplog.at_level("WARNING", logger="arvid.training.trainer"):
        Trainer(_cfg(max_steps=4, profile_start=3, profile_steps=5), ToyTask(), toy_data(), tmp_path / "late").fit()
    assert not (tmp_path / "off" / "profile.txt").exists() and not (tmp_path / "late" / "profile.txt").exists()
    assert "no profile written: the run ended inside the profile window" in caplog.text
    with pytest.raises(ConfigError, match="profile_start"):
        TrainerConfig(profile_start=-2)


class _EpochData(torch.utils.data.Dataset):
    """toy_data whose targets shift with the epoch set by ``set_epoch`` (as a file dataset's random
    clips do); ``calls`` records the epochs set."""

    def __init__(self):
        self.base, self.epoch, self.calls = toy_data(), 0, []

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.calls.append(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, y + self.epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_the_dataset_is_told_each_epoch_also_when_resumed(tmp_path, workers):
    """Random clip starts and flips were the same every epoch (before 2026-12-07 the Trainer never
    called set_epoch). 96 items in batches of 8: 12 steps an epoch."""
    data = _EpochData()
    cfg = _cfg(max_steps=30, num_workers=workers, checkpoint_every=10)
    task = ToyTask()
    Trainer(cfg, task, data, tmp_path / "ref").fit()
    assert data.calls == [0, 1, 2]
    crashed = _EpochData()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, ToyTask(crash_at=25), crashed, tmp_path / "run").fit()
    resumed_data, resumed = _EpochData(), ToyTask()
    Trainer(cfg, resumed, resumed_data, tmp_path / "run").fit()
    assert resumed_data.calls == [1, 2]  # resumed at step 20: epoch 1
    assert _same(resumed, task)


def test_the_first_record_after_a_resume_between_log_steps_says_it_covers_fewer_steps(tmp_path):
    """log_every=3, checkpoint at 5, crash at 7: the resumed run's step-6 record averages step 6
    alone, where the uninterrupted one averaged 4..6; it carries window_steps = 1."""
    cfg = _cfg(max_steps=12, log_every=3, checkpoint_every=5)
    Trainer(cfg, ToyTask(), toy_data(), tmp_path / "ref").fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, ToyTask(crash_at=7), toy_data(), tmp_path / "run").fit()
    Trainer(cfg, ToyTask(), toy_data(), tmp_path / "run").fit()
    ref, run_log = read_metrics(tmp_path / "ref/metrics.jsonl"), read_metrics(tmp_path / "run/metrics.jsonl")
    assert [r["step"] for r in run_log] == [r["step"] for r in ref] == [3, 6, 9, 12]
    assert [r.get("window_steps") for r in run_log] == [None, 1, None, None]
    assert all("window_steps" not in r for r in ref)
    assert [r["loss/main"] for r in run_log[2:]] == [r["loss/main"] for r in ref[2:]]


def test_compile_options_are_checked_typed_and_passed_to_torch_compile(tmp_path, monkeypatch):
    """trainer.compile_options: inductor options for the step's compilation, checked when the
    config is made (an unknown name or a wrong type is a ConfigError naming the option), typed from
    YAML or text, and handed to torch.compile as its options."""
    cfg = TrainerConfig(compile_options={"max_pointwise_cat_inputs": "2", "coordinate_descent_tuning": "false"})
    assert cfg.compile_options == {"max_pointwise_cat_inputs": 2, "coordinate_descent_tuning": False}
    for bad, said in (({"no_such_option": 1}, r"compile_options\.no_such_option: not an option"),
                      ({"max_pointwise_cat_inputs": "two"}, r"max_pointwise_cat_inputs: the option holds a int"),
                      ({"max_pointwise_cat_inputs": 2.5}, "whole number"),
                      ({"coordinate_descent_tuning": 1}, "true or false"),
                      ([1, 2], "compile_options must be a mapping")):
        with pytest.raises(ConfigError, match=said):
            TrainerConfig(compile_options=bad)
    p = tmp_path / "t.yaml"
    p.write_text("compile: true\ncompile_options: {max_pointwise_cat_inputs: 3}\n")
    assert load_config(TrainerConfig, p).compile_options == {"max_pointwise_cat_inputs": 3}
    seen = _record_compile(monkeypatch)
    Trainer(_cfg(max_steps=1, compile=True, compile_options={"max_pointwise_cat_inputs": 1}), ToyTask(), toy_data(),
            tmp_path / "run").fit()
    Trainer(_cfg(max_steps=1, compile=True), ToyTask(), toy_data(), tmp_path / "run2").fit()
    assert seen == [{"max_pointwise_cat_inputs": 1}, None]


def _record_compile(monkeypatch) -> list:
    """torch.compile replaced by a recorder of the ``options`` it gets (the model runs eagerly)."""
    seen: list = []

    def fake_compile(model, options=None, **kw):
        seen.append(options)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    return seen


def test_the_compiled_step_gets_arvids_graph_passes_under_the_configs_options(tmp_path, monkeypatch):
    """On CUDA the Trainer hands torch.compile arvid's graph passes (graph_passes: the residual
    addmm split) with the config's options; here the device check is patched so the CPU stands in,
    first with a recording torch.compile, then a real compiled fit that takes the pass object."""
    from arvid.training import graph_passes
    from arvid.training.graph_passes import UnfuseResidualAddmm

    made = []

    def passes(device):
        made.append(UnfuseResidualAddmm())
        return {"post_grad_custom_post_pass": made[-1]}

    monkeypatch.setattr(graph_passes, "graph_pass_options", passes)
    real_compile = torch.compile
    seen = _record_compile(monkeypatch)
    Trainer(_cfg(max_steps=1, compile=True, compile_options={"max_pointwise_cat_inputs": 1}), ToyTask(), toy_data(),
            tmp_path / "run").fit()
    assert seen == [{"post_grad_custom_post_pass": made[0], "max_pointwise_cat_inputs": 1}]
    monkeypatch.setattr(torch, "compile", real_compile)
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    # a cached compilation skips the passes: compile afresh
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        Trainer(_cfg(max_steps=2, compile=True), ToyTask(), toy_data(), tmp_path / "run2").fit()
    assert len(made) == 2 and made[1].graphs >= 2  # the step's forward and backward graphs


def test_grad_norm_max_is_the_windows_largest(tmp_path):
    """grad_norm/* is the last step's norm of a log window; a spike inside the window showed nowhere
    (review 2026-12-08): grad_norm_max/* is the window's largest, equal to the per-step records of
    the same run logged every step."""
    torch.manual_seed(0)
    Trainer(_cfg(max_steps=6, log_every=1, checkpoint_every=0), ToyTask(), toy_data(), tmp_path / "a").fit()
    torch.manual_seed(0)
    Trainer(_cfg(max_steps=6, log_every=3, checkpoint_every=0), ToyTask(), toy_data(), tmp_path / "b").fit()
    each = [r["grad_norm/main"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "grad_norm/main" in r]
    win = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "grad_norm/main" in r]
    assert len(each) == 6 and len(win) == 2
    assert len(set(each[:3])) > 1  # the norms differ within a window, so last != max can show
    for i, r in enumerate(win):
        assert r["grad_norm/main"] == pytest.approx(each[3 * i + 2], rel=1e-6)
        assert r["grad_norm_max/main"] == pytest.approx(max(each[3 * i:3 * i + 3]), rel=1e-6)


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, caplog):
    """cosine/constant took warmup_steps >= max_steps in silence: the LR never reached its peak."""
    with caplog.at_level("WARNING", logger="arvid"):
        Trainer(_cfg(max_steps=3, warmup_steps=10, checkpoint_every=0), ToyTask(), toy_data(), tmp_path / "a").fit()
    assert "warmup_steps=10 >= max_steps=3: the learning rate never reaches trainer.lr (the last step trains at 0.3" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="arvid"):
        Trainer(_cfg(max_steps=3, warmup_steps=2, checkpoint_every=0), ToyTask(), toy_data(), tmp_path / "b").fit()
    assert "warmup_steps" not in caplog.text
