"""`arvid eval fvd A B`: folders, CSV lists and saved statistics give one consistent, fully described result."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arvid.cli import main
from arvid.data.writer import write_video
from arvid.eval.fvd import FeatureStats
from arvid.eval.weights import I3D_K400


def _clip(seed: int, shift: float) -> torch.Tensor:
    # 10 frames: about the shortest clip I3D's pooling accepts, to keep the test fast
    t, y, x = torch.meshgrid(torch.arange(10.0), torch.arange(32.0), torch.arange(32.0), indexing="ij")
    chans = [torch.sin(0.2 * x + 0.15 * y + (0.3 + shift) * t + seed + c) for c in range(3)]
    return torch.stack(chans)  # [3, 10, 32, 32] in [-1, 1]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fvd_sets")
    (root / "real").mkdir()
    (root / "fake").mkdir()
    for i in range(2):
        write_video(_clip(i, 0.0), root / "real" / f"r{i}.mp4")
        write_video(_clip(i + 5, 0.4), root / "fake" / f"f{i}.mp4")
    (root / "fake.csv").write_text("path,label\nfake/f0.mp4,0\nfake/f1.mp4,0\n")
    return root


def test_cli_fvd_folder_csv_and_stats(sets, capsys):
    stats = sets / "real_stats.npz"
    rc = main(["eval", "fvd", str(sets / "real"), str(sets / "fake.csv"), "--protocol", "synthetic", "--frames", "10",
               "--device", "cpu", "--batch-size", "2", "--workers", "0", "--save-stats", str(stats),
               "--out", str(sets / "r1.json")])
    assert rc == 0
    r1 = json.loads((sets / "r1.json").read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed["fvd"] == r1["fvd"]
    assert r1["metric"] == "FVD"  # the verified TF-Hub weights
    assert r1["weights_sha256"] == I3D_K400.tensors_sha256
    assert r1["protocol"]["name"] == "synthetic" and r1["resize"] == "tf1-bilinear" and r1["num_frames"] is None
    assert (r1["num_real"], r1["num_fake"]) == (2, 2) and r1["fvd"] > 0
    saved = FeatureStats.load(stats)
    assert saved.n == 2 and saved.weights_sha256 == I3D_K400.tensors_sha256

    # the saved statistics stand in for the folder: the same number
    rc = main(["eval", "fvd", str(stats), str(sets / "fake"), "--protocol", "synthetic", "--frames", "10",
               "--device", "cpu", "--workers", "0", "--out", str(sets / "r2.json")])
    assert rc == 0
    r2 = json.loads((sets / "r2.json").read_text())
    assert r2["fvd"] == pytest.approx(r1["fvd"], rel=1e-9)


def test_cli_errors(sets, capsys):
    assert main(["eval", "fvd", str(sets / "real"), "--device", "cpu"]) == 1
    assert "--save-stats" in capsys.readouterr().err
    assert main(["eval", "fvd", str(sets / "nope"), str(sets / "fake"), "--device", "cpu"]) == 1
    assert "neither a video folder" in capsys.readouterr().err
    assert main(["eval", "fvd", str(sets / "real"), str(sets / "fake"), "--protocol", "ucf-train-rfvd",
                 "--frames", "8", "--device", "cpu"]) == 1
    assert "16 frames" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fvd_sharded_over_two_processes_equals_one_process(tmp_path):
    """`arvid eval fvd` under `accelerate launch --multi_gpu --num_processes 2` (2 gloo CPU
    processes) gives the FVD of one process. 3 clips per side: the DistributedSampler pads each
    side to 4 by repeating clip 0 on the second process, which must count once (N stays 3)."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("the accelerate CLI is not installed beside this python")
    for side, shift in (("real", 0.0), ("fake", 0.4)):
        (tmp_path / side).mkdir()
        for i in range(3):
            write_video(_clip(i + (5 if side == "fake" else 0), shift), tmp_path / side / f"{side[0]}{i}.mp4")
    # --num 4 > 3 files: each process warns once per side, so the log counts the processes;
    # --batch-size 1: the same I3D computation per clip in both runs
    common = ["eval", "fvd", str(tmp_path / "real"), str(tmp_path / "fake"), "--protocol", "synthetic",
              "--frames", "10", "--num", "4", "--device", "cpu", "--batch-size", "1", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "arvid", *common,
           "--out", str(tmp_path / "two.json")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stderr.count("asked for 4 clips but the set has only 3") == 4, out.stderr[-3000:]  # 2 processes
    two = json.loads((tmp_path / "two.json").read_text())
    assert main([*common, "--out", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert (two["num_real"], two["num_fake"]) == (one["num_real"], one["num_fake"]) == (3, 3)
    assert one["fvd"] > 0
    assert two["fvd"] == pytest.approx(one["fvd"], rel=1e-6)
    assert {k: v for k, v in two.items() if k != "fvd"} == {k: v for k, v in one.items() if k != "fvd"}
