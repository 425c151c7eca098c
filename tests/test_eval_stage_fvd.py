"""`arvid eval fvd A B`: folders, CSV lists and saved statistics give one consistent, fully described result."""

from __future__ import annotations

import json

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
