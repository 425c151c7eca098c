"""FSDP (``accelerate launch --use_fsdp --fsdp_version 2``, 2 gloo CPU processes) trains like 1 process.

The same file is the script that the launch runs (``python tests/test_training_fsdp.py OUT``): it
trains the toy task sharded with FSDP2, with EMA, clipping, gradient accumulation and an eval_fn,
resumes a checkpoint written by 1 process, and checks that several optimizer groups are refused. The test then compares everything with 1-process runs and resumes an FSDP checkpoint
in 1 process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from _training_toy import ToyGANTask, ToyTask, toy_data

from arvid.io import load_weights, save_weights
from arvid.training import Trainer, TrainerConfig
from arvid.training.logging import read_metrics

HERE = Path(__file__).resolve()
STEPS, EVERY = 12, 6
EVAL_X = torch.randn(16, 4, generator=torch.Generator().manual_seed(7))  # [16, 4]


def _config(**kw) -> TrainerConfig:
    base = dict(max_steps=STEPS, batch_size=8, grad_accum=2, lr=3e-2, warmup_steps=3, grad_clip=0.5,
                checkpoint_every=EVERY, log_every=1, eval_every=4, ema_decay=0.9, keep_last=2, device="cpu",
                tf32=False, progress=False)
    return TrainerConfig(**{**base, **kw})


def _eval_fn(task: torch.nn.Module, step: int) -> dict:
    # calls the task's modules directly: under FSDP they must hold the full parameters here
    return {"pred_sq": float((task.net(EVAL_X) ** 2).mean())}


def train(out_dir: Path, task_name: str = "mlp", **kw) -> Trainer:
    """Train the toy task into ``out_dir``; the main process saves final_model() as final.safetensors."""
    task = ToyTask() if task_name == "mlp" else ToyGANTask()
    trainer = Trainer(_config(**kw), task, toy_data(), out_dir, eval_fn=_eval_fn)
    trainer.fit()
    final = trainer.final_model()  # under FSDP a collective: every process calls it
    if trainer.accelerator.is_main_process:
        save_weights(final.state_dict(), Path(out_dir) / "final.safetensors")
    return trainer


def _script(out: Path) -> None:
    """What each of the launched processes runs."""
    torch.set_num_threads(1)
    trainer = train(out / "fsdp")
    rank = trainer.accelerator.process_index
    shards = {n: (type(p).__name__, tuple(p.to_local().shape)) for n, p in trainer.task.named_parameters()}
    print(f"rank {rank} {trainer.accelerator.num_processes} processes shards {shards}", flush=True)
    print(f"rank {rank} units {len(trainer._fsdp.units)}", flush=True)
    train(out / "from_one")  # resumes the 1-process checkpoint that the test copied there
    if rank == 0:
        print("done fsdp", flush=True)
    try:
        train(out / "gan", "gan")
    except ValueError as e:
        if rank == 0:
            print(f"refused gan: {e}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def test_fsdp_two_processes_match_one_process(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate CLI is not installed beside this python")
    t0 = time.perf_counter()
    one = tmp_path / "one"
    reference = train(one)
    # a 1-process checkpoint (step 6) for the FSDP processes to resume
    (tmp_path / "from_one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints" / "step_00000006", tmp_path / "from_one" / "checkpoints" / "step_00000006")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), str(HERE.parent)]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [launcher, "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           # each Linear its own FSDP unit (nested sharding), the rest in the root unit
           "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "Linear",
           str(HERE), str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "done fsdp" in out.stdout
    # really sharded over 2 processes: each holds half of the first layer (32 rows); the 1-row
    # output layer lives on process 0 only
    for rank, rows in ((0, 1), (1, 0)):
        assert (f"rank {rank} 2 processes shards {{'net.0.weight': ('DTensor', (16, 4)), 'net.0.bias': ('DTensor', "
                f"(16,)), 'net.3.weight': ('DTensor', ({rows}, 32)), 'net.3.bias': ('DTensor', ({rows},))}}"
                in out.stdout), out.stdout
        assert f"rank {rank} units 3" in out.stdout  # two Linear units and the root
    assert "refused gan: FSDP supports tasks with one optimizer group" in out.stdout

    fsdp = tmp_path / "fsdp"
    # same loss curve, global gradient norm (clipping at 0.5 is active) and eval as 1 process
    a, b = read_metrics(fsdp / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in a if "loss/main" in r] == list(range(1, STEPS + 1))
    for key in ("loss/main", "grad_norm/main", "eval/pred_sq"):
        x = torch.tensor([r[key] for r in a if key in r])
        y = torch.tensor([r[key] for r in b if key in r])
        assert len(x) == len(y) > 0, key
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert max(r["grad_norm/main"] for r in b if "grad_norm/main" in r) > 0.5  # clipping did something

    # checkpoints: the same files as 1 process writes (full weights, EMA, optimizer with the same ids)
    for step in (EVERY, STEPS):
        d_fsdp, d_one = (x / "checkpoints" / f"step_{step:08d}" for x in (fsdp, one))
        assert sorted(p.name for p in d_fsdp.iterdir()) == sorted(p.name for p in d_one.iterdir())
        _close(load_weights(d_fsdp / "model.safetensors"), load_weights(d_one / "model.safetensors"))
        _close(load_weights(d_fsdp / "ema.safetensors"), load_weights(d_one / "ema.safetensors"))
        o_fsdp = torch.load(d_fsdp / "optimizer.pt", weights_only=True)["main"]
        o_one = torch.load(d_one / "optimizer.pt", weights_only=True)["main"]
        assert o_fsdp["param_groups"] == o_one["param_groups"]
        assert sorted(o_fsdp["state"]) == sorted(o_one["state"])
        for i in o_one["state"]:
            _close(o_fsdp["state"][i], o_one["state"][i])
        assert len(torch.load(d_fsdp / "rng.pt", weights_only=True)["ranks"]) == 2
    # final_model() under FSDP: a plain module with the full EMA weights
    final = load_weights(fsdp / "final.safetensors")
    _close(final, load_weights(fsdp / "checkpoints" / "step_00000012" / "ema.safetensors"), tol=0)
    _close(final, {k: v.detach() for k, v in reference.final_model().state_dict().items()})

    # a 1-process checkpoint resumed under FSDP ends where the uninterrupted 1-process run does
    _close(load_weights(tmp_path / "from_one" / "checkpoints" / "step_00000012" / "model.safetensors"),
           load_weights(one / "checkpoints" / "step_00000012" / "model.safetensors"))
    # and an FSDP checkpoint resumes in 1 process
    to_one = tmp_path / "fsdp_to_one"
    (to_one / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp / "checkpoints" / "step_00000006", to_one / "checkpoints" / "step_00000006")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*global RNG states are reseeded")
        resumed = train(to_one)
    assert resumed.step == STEPS
    for f in ("model.safetensors", "ema.safetensors"):
        _close(load_weights(to_one / "checkpoints" / "step_00000012" / f),
               load_weights(one / "checkpoints" / "step_00000012" / f))
    print(f"fsdp test body took {time.perf_counter() - t0:.1f} s")


def test_fsdp1_is_refused():
    # (on CPU accelerate itself cannot build an FSDP1 plugin: its sync_module_states wants a GPU)
    from types import SimpleNamespace

    from arvid.training.trainer import _parse_groups, _Sharded

    task = ToyTask()
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*--fsdp_version 2"):
        _Sharded.shard(task, _parse_groups(task, _config()), SimpleNamespace(fsdp_version=1), torch.device("cpu"), 2,
                       None)


if __name__ == "__main__":
    from arvid.training.device import distributed_teardown, exit_process

    with distributed_teardown():
        _script(Path(sys.argv[1]))
    exit_process(0)
