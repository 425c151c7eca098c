"""2 processes (``accelerate launch``, gloo on CPU) train like 1 process with the same global batch.

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple
launcher; several CPU processes need mpirun). ``--multi_gpu`` goes through torchrun and, on a
machine without visible GPUs, gives 2 CPU processes with the gloo backend (MULTI_CPU).
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _training_toy import run

from arvid.io import load_weights
from arvid.training.logging import read_metrics

TOY = Path(__file__).parent / "_training_toy.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate CLI is not installed beside this python")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    args = ["--max-steps", "12", "--checkpoint-every", "6", "--batch-size", "8", "--grad-accum", "2"]
    # one launch trains both sync paths: DDP (one optimizer group) and the bucketed all-reduce
    # of several groups (the GAN-like task)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(TOY), str(tmp_path / "two"), "--task", "mlp,gan,weighted", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert all(f"done {t} step=12" in out.stdout for t in ("mlp", "gan", "weighted"))
    uninterrupted = load_weights(tmp_path / "two" / "gan" / "final.safetensors")
    # resume on 2 processes: drop the last checkpoint, relaunch, it continues from step 6
    shutil.rmtree(tmp_path / "two" / "gan" / "checkpoints" / "step_00000012")
    (tmp_path / "two" / "gan" / "final.safetensors").unlink()
    relaunch = [c if c != "mlp,gan,weighted" else "gan" for c in cmd]
    relaunch[relaunch.index(str(tmp_path / "two"))] = str(tmp_path / "two" / "gan")
    relaunch[relaunch.index("--main_process_port") + 1] = str(_free_port())
    out = subprocess.run(relaunch, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resumed = load_weights(tmp_path / "two" / "gan" / "final.safetensors")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
    # a failure on the main process only (eval_fn) stops both processes instead of hanging one; this
    # launch leaves the Trainer's device at 'auto': without a GPU it still gives 2 gloo processes
    # (before 2026-12-06 each ran alone and _check_launch refused it: TrainerConfig.device='cpu' was needed)
    failing = [*cmd[:cmd.index(str(TOY))], str(TOY), str(tmp_path / "fail"), "--task", "mlp", *args,
               "--eval-fail-at", "3", "--device", "auto"]
    failing[failing.index("--main_process_port") + 1] = str(_free_port())
    out = subprocess.run(failing, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "planted eval failure at step 3" in out.stderr
    assert "eval_fn at step 3 failed on another process" in out.stderr
    for name, keys in (("mlp", ["loss/main"]), ("gan", ["loss/main", "loss/critic"]), ("weighted", ["loss/main"])):
        run(tmp_path / "one" / name, name, max_steps=12, checkpoint_every=6, batch_size=8, grad_accum=2)
        two = read_metrics(tmp_path / "two" / name / "metrics.jsonl")
        one = read_metrics(tmp_path / "one" / name / "metrics.jsonl")
        assert [r["step"] for r in two] == list(range(1, 13))
        for key in keys:
            torch.testing.assert_close(torch.tensor([r[key] for r in two]), torch.tensor([r[key] for r in one]),
                                       rtol=1e-5, atol=1e-5)
        # throughput counts the global batch: the 'tokens' metric is summed over both processes
        if name != "weighted":  # (its 'tokens' are item weights)
            assert all(r["tokens_per_s"] == pytest.approx(r["items_per_s"]) for r in two if "tokens_per_s" in r)
        a = load_weights(tmp_path / "two" / name / "final.safetensors")
        b = load_weights(tmp_path / "one" / name / "final.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
        # there really were 2 processes: the checkpoint keeps one RNG state per process
        rng = torch.load(tmp_path / "two" / name / "checkpoints" / "step_00000012" / "rng.pt", weights_only=True)
        assert len(rng["ranks"]) == 2


_EXIT_SCRIPT = """
import sys
import torch.distributed as dist
from arvid.training.device import exit_process, shutdown_distributed
if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%s", rank=0, world_size=1)
print("results written")  # block-buffered (a pipe): lost unless exit_process flushes
shutdown_distributed()
assert not dist.is_initialized()
exit_process(3)
"""


@pytest.mark.parametrize("mode", ["group", "plain"])
def test_exit_process_tears_down_flushes_and_keeps_the_status(mode):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT % _free_port(), mode], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert out.stdout == "results written\n"


def test_slices_of_unequal_weight_give_the_global_weighted_mean(tmp_path):
    """A task with loss_weight (slices of unequal weight, as packed token batches): 1 micro-batch or
    2 per step optimise the same objective (the weighted mean over the global batch): the same
    losses and weights. Without the weighting the two differ."""
    for accum in (1, 2):
        run(tmp_path / f"a{accum}", "weighted", max_steps=6, checkpoint_every=0, batch_size=8, grad_accum=accum)
    one, two = (read_metrics(tmp_path / f"a{a}" / "metrics.jsonl") for a in (1, 2))
    torch.testing.assert_close(torch.tensor([r["loss/main"] for r in two]), torch.tensor([r["loss/main"] for r in one]),
                               rtol=1e-5, atol=1e-6)
    a, b = (load_weights(tmp_path / f"a{x}" / "final.safetensors") for x in (1, 2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
