"""`arvid eval recon | gen | fp | budget` stream clips in batches: the protocol's draw, shards that
cover every clip once, per-frame metrics, a real side saved and reused, quality vs token budget,
and 2 processes (gloo) that give the numbers of 1.

I3D is replaced by a small fixed random feature map (:class:`FakeI3D`): the tests check how clips
reach FVD and how its sums are kept, not the network (tests/test_eval_i3d.py does that).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _toy_store import write_random_store

from arvid.data.datasets import DataConfig, build_dataset
from arvid.data.video import as_8bit
from arvid.tokenizer.base import build_tokenizer

TOK_PARAMS = dict(frames_per_block=[2, 2, 2, 2], candidates=[1, 4, 16], image_size=16)
DATA = dict(source="synthetic", frames=8, size=16, num_videos=8, num_val_videos=7, random_start=False)


class FakeI3D:
    """400 features per clip: a fixed random projection of the clip pooled to 2 x 4 x 4."""

    backbone_name = "fake-i3d"
    weights_sha256 = "f" * 64

    def __init__(self) -> None:
        self.w = torch.randn(96, 400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = F.adaptive_avg_pool3d(x.double(), (2, 4, 4)).flatten(1)  # [B, 3 * 32]
        return torch.tanh(p @ self.w.to(x.device))


def fake_i3d(monkeypatch) -> None:
    from arvid.eval.fvd import FrechetVideoDistance

    monkeypatch.setattr(FrechetVideoDistance, "_default_extractor", lambda self: FakeI3D())


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    """A debug EVATok tokenizer and a class-conditional GPT trained one step on its codes (the synthetic
    data's classes)."""
    from arvid.stages.train_generator import TrainGeneratorConfig, run
    from arvid.training import TrainerConfig

    root = tmp_path_factory.mktemp("evalstages")
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", TOK_PARAMS, preset="debug")
    tok.save_pretrained(root / "tok")
    write_random_store(root / "store", tok, 8, 4)
    run(TrainGeneratorConfig(token_store=str(root / "store"), tokenizer=str(root / "tok"), preset="debug",
                             gpt=dict(attn_backend="sdpa"), max_tokens=200, out_dir=str(root / "gen"),
                             num_classes=10,  # the synthetic data's
                             trainer=TrainerConfig(max_steps=1, batch_size=1, device="cpu", progress=False,
                                                   checkpoint_every=0)))
    return root


# --------------------------------------------------------------------------- the clips


def test_clip_set_draws_the_protocols_clips_and_shards_cover_each_once(monkeypatch):
    from arvid.stages import eval_stream
    from arvid.stages.eval_stream import ClipSet

    data = DataConfig(**{**DATA, "num_val_videos": 10})
    first = ClipSet(data, "val", 5, "synthetic", batch_size=2)
    assert first.pairs == [(i, 0) for i in range(5)]
    drawn = ClipSet(data, "val", 5, "ucf-gfvd-2048", batch_size=2)  # random-clips: seeded subset
    want = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:5].sort().values.tolist()
    assert [i for i, _ in drawn.pairs] == want != list(range(5))
    ds = build_dataset(data, "val")
    assert drawn.labels().tolist() == [ds[i]["label"] for i in want]
    # one process: every clip once, in draw order
    seen = [(b["video_index"].tolist(), b["index"].tolist()) for _, b in drawn.batches()]
    assert [i for idx, _ in seen for i in idx] == want
    assert [p for _, pos in seen for p in pos] == list(range(5))
    # two processes: disjoint shares of whole batches that together are every batch
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(eval_stream, "dist_info", lambda rank=rank: (rank, 2))
        shares.append([int(i) for _, b in ClipSet(data, "val", 5, "ucf-gfvd-2048", 2).batches() for i in b["video_index"]])
    assert sorted(shares[0] + shares[1]) == want and not set(shares[0]) & set(shares[1])
    assert len(shares[0]) == 3 and len(shares[1]) == 2  # batches 0, 2 and batch 1


def test_a_protocol_the_data_cannot_meet_fails_before_loading_models(tmp_path):
    from arvid.config import ConfigError
    from arvid.stages.evaluate import ReconEvalConfig, evaluate_recon

    cfg = ReconEvalConfig(data=DataConfig(**DATA), protocol="ucf-train-rfvd", tokenizer=str(tmp_path / "none"),
                          device="cpu")
    with pytest.raises(ConfigError, match="ucf-train-rfvd.*16-frame.*data.frames is 8"):
        evaluate_recon(cfg)


def test_recon_takes_the_protocols_split_unless_one_is_given(tmp_path):
    """``eval recon``'s split defaults to its protocol's (ucf-train-rfvd: train), so the UCF protocol
    does not fail on a default that contradicts it; a split given that contradicts it still fails."""
    from arvid.config import ConfigError
    from arvid.stages.evaluate import ReconEvalConfig, evaluate_recon, protocol_split

    assert ReconEvalConfig().split is None
    assert protocol_split(None, "ucf-train-rfvd", "val") == "train"
    assert protocol_split(None, "k600-fp-50k", "val") == "test"
    assert protocol_split(None, "synthetic", "val") == "val" and protocol_split(None, None, "val") == "val"
    assert protocol_split("test", "ucf-train-rfvd", "val") == "test"  # given: kept (and then refused)
    data = DataConfig(**{**DATA, "frames": 16, "size": 128})
    missing = str(tmp_path / "none")
    # the default split passes the protocol's check: the run gets as far as loading the tokenizer
    with pytest.raises(FileNotFoundError, match="is not a tokenizer directory"):
        evaluate_recon(ReconEvalConfig(data=data, protocol="ucf-train-rfvd", tokenizer=missing, device="cpu"))
    with pytest.raises(ConfigError, match="takes its real clips from the 'train' split, but split is 'val'"):
        evaluate_recon(ReconEvalConfig(data=data, split="val", protocol="ucf-train-rfvd", tokenizer=missing,
                                       device="cpu"))


# --------------------------------------------------------------------------- recon


def _recon_cfg(env: Path, tmp_path: Path, **kw):
    from arvid.stages.evaluate import ReconEvalConfig

    base = dict(data=DataConfig(**DATA), split="val", num_videos=5, tokenizer=str(env / "tok"), uniform=[4, 16],
                fvd_uniform=[4], protocol="synthetic", lpips=False, batch_size=2, device="cpu",
                out_dir=str(tmp_path / "recon"))
    return ReconEvalConfig(**{**base, **kw})


def test_recon_streams_per_frame_metrics_and_reuses_saved_real_statistics(env, tmp_path, monkeypatch):
    from arvid.eval.fvd import FrechetVideoDistance
    from arvid.eval.metrics import psnr_per_frame, ssim_per_frame
    from arvid.stages.evaluate import evaluate_recon, reconstruct, run_recon
    from arvid.tokenizer.base import load_tokenizer

    fake_i3d(monkeypatch)
    stats = tmp_path / "real.npz"
    out = run_recon(_recon_cfg(env, tmp_path, save_real_stats=str(stats)))
    res = json.loads((out / "recon.json").read_text())
    assert "| uniform-4 |" in (out / "recon.md").read_text()
    rows = res["results"]
    assert set(rows) == {"uniform-4", "uniform-16"} and res["num_videos"] == 5
    # the same numbers computed on the whole set at once
    ds = build_dataset(DataConfig(**DATA), "val")
    real = torch.stack([ds[i]["video"] for i in range(5)])
    tok = load_tokenizer(env / "tok").eval()
    for c in (4, 16):
        rec, bl = reconstruct(tok, real, tok.layout.uniform(c)[0], torch.device("cpu"), 5)
        r = rows[f"uniform-{c}"]
        assert r["psnr"] == pytest.approx(float(psnr_per_frame(real, rec).double().mean()), rel=1e-5)
        assert r["ssim"] == pytest.approx(float(ssim_per_frame(real, rec).double().mean()), rel=1e-5)
        assert r["tokens_per_video"] == 4 * c
    assert "rfvd" not in rows["uniform-16"]  # not in fvd_uniform
    m = FrechetVideoDistance("synthetic", extractor=FakeI3D())
    m.update(as_8bit(real), real=True)
    # both sides as 8-bit files would hold them (FVDSides.add_real / add_fake)
    m.update(as_8bit(reconstruct(tok, real, tok.layout.uniform(4)[0], torch.device("cpu"), 5)[0]), real=False)
    # 1e-7: reconstructions in other batch shapes may round a pixel to the next 8-bit level, and 5
    # clips' rank-deficient covariances magnify it (a clip lost or doubled moves it by far more)
    assert rows["uniform-4"]["rfvd"] == pytest.approx(float(m.compute()), rel=1e-7)
    assert rows["uniform-4"]["fvd_record"]["num_real"] == 5 and rows["uniform-4"]["fvd_record"]["num_fake"] == 5
    # the saved real side gives the same rFVD without computing it again
    again = evaluate_recon(_recon_cfg(env, tmp_path, real_stats=str(stats), uniform=[4]))
    assert again["results"]["uniform-4"]["rfvd"] == pytest.approx(rows["uniform-4"]["rfvd"], rel=1e-12)
    assert again["results"]["uniform-4"]["fvd_record"]["extra"]["real_stats"] == str(stats)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        evaluate_recon(_recon_cfg(env, tmp_path, real_stats=str(tmp_path / "missing.npz")))


def _two_process_worker(rank: int, port: int, env: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    from arvid.eval.fvd import FrechetVideoDistance
    from arvid.stages.evaluate import run_recon

    FrechetVideoDistance._default_extractor = lambda self: FakeI3D()
    run_recon(_recon_cfg(Path(env), Path(out), num_videos=7, batch_size=2))
    # fewer batches than processes: rank 1 reads nothing and still takes part in every reduction
    run_recon(_recon_cfg(Path(env), Path(out), num_videos=2, batch_size=2, out_dir=str(Path(out) / "small")))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()  # gloo's threads must stop before the interpreter exits


def test_two_processes_give_the_numbers_of_one(env, tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    from arvid.stages.evaluate import evaluate_recon

    fake_i3d(monkeypatch)
    one = evaluate_recon(_recon_cfg(env, tmp_path, num_videos=7, batch_size=2))["results"]
    small = evaluate_recon(_recon_cfg(env, tmp_path, num_videos=2, batch_size=2))["results"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(port, str(env), str(tmp_path / "two")), nprocs=2, join=True)
    for ref, path, n in ((one, tmp_path / "two" / "recon", 7), (small, tmp_path / "two" / "small", 2)):
        two = json.loads((path / "recon.json").read_text())["results"]
        for name in ref:
            for key in ("psnr", "ssim", "tokens_per_video", "rfvd"):
                if key in ref[name]:
                    # rFVD from 7 clips and 400 features: rank-deficient covariances, whose square root
                    # magnifies the sums' rounding in another order to ~1e-9; a clip lost or counted
                    # twice moves it by far more than 1e-7
                    tol = 1e-7 if key == "rfvd" else 1e-9
                    assert two[name][key] == pytest.approx(ref[name][key], rel=tol), (name, key, n)
        assert two["uniform-4"]["fvd_record"]["num_real"] == n and two["uniform-4"]["fvd_record"]["num_fake"] == n


# --------------------------------------------------------------------------- gen, budget


def _gen_kw(env: Path, tmp_path: Path) -> dict:
    return dict(data=DataConfig(**DATA), split="train", num_videos=8, generator=str(env / "gen" / "gpt"),
                tokenizer=str(env / "tok"), protocol="synthetic", batch_size=4, device="cpu",
                calibration_videos=16)


def test_gen_with_a_token_cap_and_the_budget_sweep(env, tmp_path, monkeypatch):
    from arvid.stages.evaluate import BudgetEvalConfig, GenEvalConfig, evaluate_gen, run_budget

    fake_i3d(monkeypatch)
    free = evaluate_gen(GenEvalConfig(**_gen_kw(env, tmp_path)))
    capped = evaluate_gen(GenEvalConfig(**_gen_kw(env, tmp_path), budget=10, budget_mode="exact"))
    assert capped["budget"] == {"mode": "exact", "target": 10, "cap": 10}
    assert capped["tokens_per_video"] <= 10 < free["tokens_per_video"]
    assert free["num_samples"] == 8 and free["fvd_record"]["num_real"] == 8
    # a forced assignment (the report's fixed-length branch): every sample at exactly those counts
    from arvid.tokenizer.base import load_tokenizer

    layout = load_tokenizer(env / "tok").layout
    forced = [layout.candidates[0]] * layout.num_blocks
    fixed = evaluate_gen(GenEvalConfig(**_gen_kw(env, tmp_path), fixed_assignment=forced))
    assert fixed["tokens_per_video"] == sum(forced) != free["tokens_per_video"]
    with pytest.raises(ValueError, match="fixed_assignment .* budget=10 has nothing to choose"):
        GenEvalConfig(**_gen_kw(env, tmp_path), fixed_assignment=forced, budget=10)
    out = run_budget(BudgetEvalConfig(**_gen_kw(env, tmp_path), budgets=[8, 40], out_dir=str(tmp_path / "b")))
    res = json.loads((out / "budget.json").read_text())
    rows = res["rows"]
    assert [r["target"] for r in rows] == [None, 8, 40]
    assert rows[0]["tokens_per_video"] == pytest.approx(free["tokens_per_video"])  # same seed, no budget
    assert rows[0]["gfvd"] == pytest.approx(free["gfvd"], rel=1e-9)
    assert rows[1]["tokens_per_video"] < rows[2]["tokens_per_video"]
    for r in rows[1:]:  # 8 samples against a calibration on 16 labels: near, not exact
        assert abs(r["off_target"]) < 0.35, r
        assert r["beta"] != 0.0
    md = (out / "budget.md").read_text()
    assert "| none |" in md and "| 8 |" in md and "| 40 |" in md
    with pytest.raises(Exception, match="budgets"):
        BudgetEvalConfig(**_gen_kw(env, tmp_path))
    with pytest.raises(Exception, match="repeat"):
        BudgetEvalConfig(**_gen_kw(env, tmp_path), budgets=[8, 8])


def test_an_exact_reconstruction_caps_psnr_instead_of_infinity():
    from arvid.eval.metrics import PSNR_CAP, ReconstructionMetrics

    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    y = x.clone()
    y[1] += 0.1  # the second clip differs, the first is exact
    m = ReconstructionMetrics(lpips_net=None)
    m.update(x, y.clamp(-1, 1), 10)
    out = m.compute()
    assert PSNR_CAP > out["psnr"] > (PSNR_CAP + 20) / 2  # finite: the exact clip counts as PSNR_CAP dB


def test_a_random_clips_protocol_takes_more_clips_than_videos_in_rounds(tmp_path):
    """ucf-gfvd-10k asks for 10,000 real clips of UCF-101's 9,537 training videos: every video once
    per full round, each round its own random starts, a seeded subset for the last round; at most
    two clips a video."""
    pytest.importorskip("av")
    from arvid.stages.data_cmd import synth
    from arvid.stages.eval_fvd import choose, open_videos
    from arvid.stages.eval_stream import ClipSet

    synth(tmp_path / "v", fmt="mp4", num=3, seed=1, frames=40, size=16)
    data = DataConfig(source="folder", root=str(tmp_path / "v"), frames=4, size=16, random_start=True)
    clips = ClipSet(data, "train", 5, "ucf-gfvd-2048", batch_size=3)
    assert len(clips) == 5 and [r for _, r in clips.pairs] == [0, 0, 0, 1, 1]
    got = {int(p): v for _, b in clips.batches() for p, v in zip(b["index"], b["video"])}
    assert sorted(got) == list(range(5))
    again = {int(p): v for _, b in ClipSet(data, "train", 5, "ucf-gfvd-2048", batch_size=2).batches()
             for p, v in zip(b["index"], b["video"])}
    assert all(torch.equal(got[p], again[p]) for p in got)  # the draw and the starts are seeded
    assert not torch.equal(got[1], got[4])  # round 1 of video 1 is another clip of it (video 0 is static)
    ds = clips.dataset
    assert clips.labels().tolist() == [ds.labels[i] for i, _ in clips.pairs]
    # one clip a video for a non-random protocol, and for a generated set in eval fvd
    assert len(ClipSet(data, "train", 7, "synthetic", batch_size=3)) == 3
    assert len(ClipSet(data, "train", 9, "ucf-gfvd-2048", batch_size=3)) == 6  # at most 2 clips a video
    clip = data.clip_config("train")
    assert len(choose(open_videos(str(tmp_path / "v"), clip, 0), 7, True, 0, several=False)) == 3
    assert len(choose(open_videos(str(tmp_path / "v"), clip, 0), 5, True, 0, several=True)) == 5
    assert len(choose(open_videos(str(tmp_path / "v"), clip, 0), 9, True, 0, several=True)) == 6  # 2 a video


def test_real_statistics_record_and_check_the_split_data_seed_and_n(tmp_path, monkeypatch):
    """A named protocol refuses another split; saved real statistics record the clips' split (also in
    the protocol every result records), data source, seed and N, and a run on other clips refuses them."""
    import numpy as np

    from arvid.config import ConfigError
    from arvid.stages.eval_stream import ClipSet, FVDSides
    from arvid.stages.evaluate import check_protocol

    with pytest.raises(ConfigError, match="protocol 'ucf-train-rfvd' takes its real clips from the 'train' split, "
                                          "but split is 'val'"):
        check_protocol("ucf-train-rfvd", DataConfig(frames=16, size=128), "val")
    check_protocol("ucf-train-rfvd", DataConfig(frames=16, size=128), "train")
    check_protocol("synthetic", DataConfig(**DATA), "val")  # any split
    fake_i3d(monkeypatch)
    cpu = torch.device("cpu")
    data = DataConfig(**DATA)
    clips = ClipSet(data, "val", 3, "synthetic", batch_size=3)
    fvd = FVDSides("synthetic", None, cpu, clips=clips)
    for _, b in clips.batches():
        fvd.add_real(b["video"])
        fvd.add_fake("x", b["video"].flip(-1))
    assert fvd.result("x")["protocol"]["split"] == "val"
    path = tmp_path / "val.npz"
    fvd.save_real(str(path))
    meta = json.loads(str(np.load(path)["meta"]))
    assert meta["protocol"]["split"] == "val" and meta["stats_key"].startswith("synthetic_val_")
    assert meta["clips"] == {"source": "synthetic", "root": None, "split": "val", "seed": 0, "drawn": 3,
                             "available": 7, "frame_stride": None, "fps": None}
    # the same clips: accepted, the same number
    again = FVDSides("synthetic", None, cpu, real_stats=str(path), clips=ClipSet(data, "val", 3, "synthetic", 3))
    for _, b in clips.batches():
        again.add_fake("x", b["video"].flip(-1))
    assert again.result("x")["fvd"] == pytest.approx(fvd.result("x")["fvd"], rel=1e-12)
    # other clips: refused, naming the file and the field
    for other, field in ((ClipSet(data, "train", 3, "synthetic", 3), "split 'val'.*split 'train'"),
                         (ClipSet(DataConfig(**{**DATA, "seed": 1}), "val", 3, "synthetic", 3), "seed 0.*seed 1"),
                         (ClipSet(data, "val", 2, "synthetic", 3), "drawn 3.*drawn 2")):
        with pytest.raises(ValueError, match=f"real_stats '{path}' were computed on clips with {field}"):
            FVDSides("synthetic", None, cpu, real_stats=str(path), clips=other)


def test_clip_set_cuts_file_clips_as_the_protocol_says(tmp_path):
    """Under a protocol, file clips start where its clip_sampling says, seeded with its seed (as in
    `arvid eval fvd`), whatever data.random_start / data.seed / data.flip say."""
    import dataclasses

    pytest.importorskip("av")
    from arvid.data.files import ClipConfig
    from arvid.data.writer import write_video
    from arvid.stages.eval_fvd import choose, open_videos
    from arvid.stages.eval_stream import ClipSet

    (tmp_path / "a").mkdir()
    for i in range(3):  # 40-frame videos whose brightness ramps from -1 (frame 0) to 1 over time
        v = torch.linspace(-1, 1, 40).view(1, 40, 1, 1).expand(3, 40, 16, 16).clone()
        write_video(v, tmp_path / "a" / f"v{i}.mp4")

    def clips_of(c: ClipSet) -> list[torch.Tensor]:
        return [v for _, b in c.batches() for v in b["video"]]

    data = DataConfig(source="folder", root=str(tmp_path), frames=8, size=16, random_start=True, flip=True)
    first = ClipSet(data, "train", None, "ucf-train-rfvd", 3)  # one-clip-per-video:first-16
    assert first.dataset.clip.random_start is False and first.dataset.clip.flip is False
    assert [round(float(v[:, 0].mean()), 2) for v in clips_of(first)] == [-1.0, -1.0, -1.0]
    runs = [clips_of(ClipSet(dataclasses.replace(data, seed=s), "train", 3, "ucf-gfvd-2048", 3)) for s in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # protocol.seed, not data.seed
    assert any(float(v[:, 0].mean()) > -0.9 for v in runs[0])  # random starts
    eval_fvd = choose(open_videos(str(tmp_path), ClipConfig(frames=8, size=16, random_start=True, flip=False), 0),
                      3, True, 0, several=True)
    assert all(torch.equal(a, eval_fvd[k]["video"]) for k, a in enumerate(runs[0]))
    # consecutive frames at the file's own rate, whatever data.frame_stride / data.fps say; recorded
    strided = ClipSet(dataclasses.replace(data, frame_stride=3, fps=4.0), "train", None, "ucf-train-rfvd", 3)
    assert strided.dataset.clip.frame_stride == 1 and strided.dataset.clip.fps is None
    assert all(torch.equal(a, b) for a, b in zip(clips_of(strided), clips_of(first)))
    assert strided.describe()["frame_stride"] == 1 and strided.describe()["fps"] is None


def test_check_clips_compares_frame_resampling_and_warns_on_fields_a_file_lacks(caplog):
    """fps None is a value for file clips (the file's own rate): stats at 8 fps are refused for
    clips at the files' rate. A file older than the frame_stride/fps fields (no such keys) passed
    silently before 2026-12-07; it now warns naming them."""
    from arvid.stages.eval_stream import check_clips, clips_record

    mine = clips_record("folder", "/d", "train", 0, 10, 10, frame_stride=1, fps=None)
    check_clips("s.npz", dict(mine), mine)  # the same clips
    with pytest.raises(ValueError, match=r"real_stats 's.npz' were computed on clips with fps 8.0, but .* fps None"):
        check_clips("s.npz", {**mine, "fps": 8.0}, mine)
    with pytest.raises(ValueError, match="frame_stride 2, but .* frame_stride 1"):
        check_clips("s.npz", {**mine, "frame_stride": 2}, mine)
    check_clips("s.npz", {**mine, "split": None}, mine)  # a field the file could not know
    old = {k: v for k, v in mine.items() if k not in ("frame_stride", "fps")}
    with caplog.at_level("WARNING", logger="arvid"):
        caplog.clear()
        check_clips("s.npz", old, mine)
    assert "do not record the clips' frame_stride, fps" in caplog.text and "frame_stride=1, fps=None" in caplog.text
    synth = clips_record("synthetic", None, "val", 0, 3, 7)  # not files: nothing to warn about
    with caplog.at_level("WARNING", logger="arvid"):
        caplog.clear()
        check_clips("s.npz", {k: v for k, v in synth.items() if k not in ("frame_stride", "fps")}, synth)
    assert "do not record" not in caplog.text


def test_clip_set_workers_change_no_clip_so_they_stay_out_of_fingerprints(tmp_path):
    """The evaluation stages' and the report's ``workers`` (data-loader processes reading the real
    clips) are execution settings: with 0 or 2 workers the same clips come, random starts and
    all, so changing them must not rerun a finished stage."""
    pytest.importorskip("av")
    from arvid.config import execution_fields
    from arvid.stages.data_cmd import synth
    from arvid.stages.eval_stream import ClipSet
    from arvid.stages.evaluate import FPEvalConfig, GenEvalConfig, ReconEvalConfig
    from arvid.stages.report import ReportConfig

    synth(tmp_path / "v", fmt="mp4", num=3, seed=1, frames=40, size=16)
    data = DataConfig(source="folder", root=str(tmp_path / "v"), frames=4, size=16, random_start=True)
    got = []
    for workers in (0, 2):
        clips = ClipSet(data, "train", 5, "ucf-gfvd-2048", batch_size=2, workers=workers)
        got.append({int(p): v for _, b in clips.batches() for p, v in zip(b["index"], b["video"])})
    assert sorted(got[0]) == list(range(5)) and got[0].keys() == got[1].keys()
    assert all(torch.equal(got[0][p], got[1][p]) for p in got[0])
    for cls in (ReconEvalConfig, GenEvalConfig, FPEvalConfig, ReportConfig):
        assert "workers" in execution_fields(cls), cls.__name__


def test_fp_example_only_continues_the_clips_it_shows(env, tmp_path):
    """The report's frame-prediction example without FVD-FP continued every drawn clip (all 10,000
    in ucf101_evatok.yaml) to show 8; with only_kept it stops once the shown ones are predicted."""
    from arvid.stages import evaluate

    cfg = evaluate.FPEvalConfig(data=DataConfig(**DATA), num_videos=7, context_frames=2, batch_size=2, protocol=None,
                                generator=str(env / "gen" / "gpt"), tokenizer=str(env / "tok"), device="cpu")
    full = evaluate.evaluate_fp(cfg, keep=3)
    assert full["num_videos"] == 7 and sorted(full["_kept"]) == [0, 1, 2] and "example_only" not in full
    ex = evaluate.evaluate_fp(cfg, keep=3, only_kept=True)
    assert ex["num_videos"] == 4 and ex["example_only"] is True  # batches [0, 1] and [2, 3]
    for p in (0, 1, 2):
        assert torch.equal(ex["_kept"][p][1], full["_kept"][p][1])  # the same predictions (seeded per batch)


def test_a_failed_evaluation_leaves_the_previous_config_and_result(tmp_path):
    """`eval recon` with a bad setting wrote its config.yaml beside the previous run's recon.json
    before failing (CLI review, 2026-12-07): the config is now written with the result."""
    from arvid.stages import evaluate

    out = tmp_path / "r"
    ok = evaluate.GenEvalConfig(out_dir=str(out), num_videos=2)
    evaluate._run(ok, lambda cfg: {"x": 1}, "gen", lambda r: "ok\n")
    saved = (out / "config.yaml").read_text()

    def fails(cfg):
        raise ValueError("bad setting")

    with pytest.raises(ValueError, match="bad setting"):
        evaluate._run(evaluate.GenEvalConfig(out_dir=str(out), num_videos=3), fails, "gen", lambda r: "")
    assert (out / "config.yaml").read_text() == saved and json.loads((out / "gen.json").read_text()) == {"x": 1}


def test_results_are_logged_as_well_as_written(tmp_path, caplog):
    """`eval gen` and `eval fp` printed nothing without a terminal (their results only in the .md):
    every evaluation logs the table it writes."""
    from arvid.stages import evaluate as E

    cfg = E.GenEvalConfig(out_dir=str(tmp_path / "g"))
    with caplog.at_level("INFO", logger="arvid"):
        out = E._run(cfg, lambda c: {"x": 1}, "gen", lambda r: f"| gFVD | {r['x'] * 123.4} |\n")
    assert (out / "gen.md").read_text() == "| gFVD | 123.4 |\n"
    assert "| gFVD | 123.4 |" in caplog.text and str(out / "gen.md") in caplog.text


def test_fake_clips_are_scored_as_they_read_back_from_8bit_files(monkeypatch):
    """The reference FVD code reads generated clips as saved uint8 frames; in-process evaluation
    passed the float clips straight on (review 2026-12-08). The fake side now gives the FVD of
    their 8-bit round trip (what `arvid eval fvd` on the written files gives), not of the floats."""
    from arvid.data.video import to_file, to_model
    from arvid.stages.eval_stream import ClipSet, FVDSides

    fake_i3d(monkeypatch)
    cpu = torch.device("cpu")
    clips = ClipSet(DataConfig(**DATA), "val", 4, "synthetic", batch_size=4)
    g = torch.Generator().manual_seed(0)
    fakes = [(b["video"] + 0.01 * torch.randn(b["video"].shape, generator=g)).clamp(-1, 1) for _, b in clips.batches()]
    assert torch.equal(as_8bit(fakes[0]), to_model(to_file(fakes[0])))
    results = []
    for videos in (fakes, [to_model(to_file(v)) for v in fakes]):
        sides = FVDSides("synthetic", None, cpu, clips=clips)
        for (_, b), v in zip(clips.batches(), videos):
            sides.add_real(b["video"])
            sides.add_fake("x", v)
        results.append(sides.result("x")["fvd"])
    assert results[0] == results[1]
    # and not the float clips' own FVD
    sides = FVDSides("synthetic", None, cpu, clips=clips)
    for (_, b), v in zip(clips.batches(), fakes):
        sides.add_real(b["video"])
        sides.fake("x").update(v, real=False)
    assert sides.result("x")["fvd"] != results[0]
    # the real side too: synthetic (float) real clips are scored as their 8-bit files
    sides = FVDSides("synthetic", None, cpu, clips=clips)
    for (_, b), v in zip(clips.batches(), fakes):
        sides.add_real(to_model(to_file(b["video"])))
        sides.add_fake("x", v)
    assert sides.result("x")["fvd"] == results[0]


def test_real_labels_past_the_generators_classes_are_refused_not_sampled_as_the_null_class(env, tmp_path,
                                                                                            monkeypatch):
    """Found in a chain review: train-generator sizes the class table from the store's largest
    label (a store of 9 synthetic clips: classes 0..8), and eval gen / fp / the report took the real
    clips' labels as class ids unchecked: a clip of class 9 (the data has 10) was sampled with id 9,
    the GPT's null class, i.e. unconditionally, and counted in the gFVD as class 9 without an error."""
    from arvid.config import ConfigError
    from arvid.stages.evaluate import FPEvalConfig, GenEvalConfig, evaluate_fp, evaluate_gen
    from arvid.stages.train_generator import TrainGeneratorConfig, run
    from arvid.training import TrainerConfig

    fake_i3d(monkeypatch)
    from arvid.tokenizer.base import load_tokenizer


    tok = load_tokenizer(env / "tok")
    write_random_store(tmp_path / "store9", tok, 9, 9)
    run(TrainGeneratorConfig(token_store=str(tmp_path / "store9"), tokenizer=str(env / "tok"), preset="debug",
                             gpt=dict(attn_backend="sdpa"), max_tokens=200, out_dir=str(tmp_path / "gen"),
                             trainer=TrainerConfig(max_steps=1, batch_size=1, device="cpu", progress=False,
                                                   checkpoint_every=0)))
    kw = dict(data=DataConfig(**DATA), split="val", num_videos=4, generator=str(tmp_path / "gen" / "gpt"),
              tokenizer=str(env / "tok"), protocol="synthetic", batch_size=4, device="cpu")
    assert build_dataset(DataConfig(**DATA), "val").label_of(3) == 9  # val labels 6, 7, 8, 9
    with pytest.raises(ConfigError, match=r"labels reach 9, but generator .* has 9 classes \(0..8; id 9 is its null"):
        evaluate_gen(GenEvalConfig(**kw))
    with pytest.raises(ConfigError, match=r"labels reach 9, but generator .* has 9 classes"):
        evaluate_fp(FPEvalConfig(**{**kw, "context_frames": 2}))
    # the first three clips (classes 6..8) are the GPT's own classes
    r = evaluate_gen(GenEvalConfig(**{**kw, "num_videos": 3}))
    assert r["num_samples"] == 3
