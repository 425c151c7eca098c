"""The adaptive pipeline end to end on CPU with the debug EVATok: curate (brute and beam), train
the router, tokenize into a token store, and the quality-cost curve.

One proxy tokenizer (debug preset, 4 blocks x 3 candidates = 81 assignments, 8x16x16 clips) is
trained once per session with random assignments, then shared by every test.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from arvid.data.datasets import DataConfig, build_dataset
from arvid.data.token_store import TokenStore
from arvid.tokenizer import build_tokenizer, load_tokenizer
from arvid.tokenizer.reward import CurationRecords, labels_for
from arvid.training import TrainerConfig

LAYOUT = dict(frames_per_block=(2, 2, 2, 2), candidates=(1, 4, 16), image_size=16)
N_TRAIN, N_VAL = 40, 16
# A briefly trained debug proxy gains little quality from more tokens while the distortion's
# spread over videos is large, so at the paper's (1.2, 0.8) nearly every label is the cheapest
# assignment. A quality-heavy setting gives labels that vary with the video (about 18 distinct).
W_Q, W_L = 1.9, 0.1


def _data(num_videos=N_TRAIN, num_val_videos=N_VAL) -> DataConfig:
    return DataConfig(source="synthetic", frames=8, size=16, num_videos=num_videos, num_val_videos=num_val_videos,
                      random_start=False)


def _psnr(x, y):
    mse = (x - y.clamp(-1, 1)).pow(2).mean(dim=(1, 3, 4))
    return (10 * torch.log10(4 / mse)).mean(1)


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """Train the proxy tokenizer (random assignment per sample) and curate train + val splits."""
    from arvid.stages.curate import CurateConfig, run

    root = tmp_path_factory.mktemp("adaptive")
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", dict(LAYOUT, quantizer=dict(kind="fsq", levels=(8, 5, 5, 5))), preset="debug")
    ds = build_dataset(_data(num_videos=256), "train")
    X = torch.stack([ds[i]["video"] for i in range(len(ds))])
    opt = torch.optim.AdamW(tok.parameters(), lr=2e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    for _ in range(PROXY_STEPS):
        x = X[torch.randint(len(X), (32,), generator=g)]
        rec, qo = tok(x, tok.layout.random_assignments(32, generator=g), generator=g)
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + sum(qo.losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tok.eval().save_pretrained(root / "proxy")
    common = dict(data=_data(), tokenizer=str(root / "proxy"), quality="mse", calib_videos=16, calib_assignments=8,
                  batch_size=96, videos_per_step=4, device="cpu", w_q=W_Q, w_l=W_L)
    run(CurateConfig(split="train", mode="brute", save_every=16, out_dir=str(root / "cur_train"), **common))
    # held-out videos: beam records (the router stage completes them), the training split's normalisation
    run(CurateConfig(split="val", mode="beam", beam_width=2, stats=str(root / "cur_train" / "stats.json"),
                     out_dir=str(root / "cur_val"), **common))
    return root


PROXY_STEPS = 300


def test_curate_brute_outputs_and_relabel(work):
    d = work / "cur_train"
    assert (d / "done").is_file() and (d / "config.yaml").is_file()
    rec = CurationRecords.load(d / "curation.npz")
    stats_json = json.loads((d / "stats.json").read_text())
    assert len(rec) == N_TRAIN * 81 and rec.videos().tolist() == list(range(N_TRAIN))
    assert stats_json["quality"] == "mse" and stats_json["decoded_fraction"] == 1.0
    assert stats_json["w_q"] == W_Q and stats_json["w_l"] == W_L
    from arvid.stages.curate import read_stats

    stats = read_stats(d)
    vids, labels, best = labels_for(rec, stats, W_Q, W_L)
    z = np.load(d / "labels.npz")
    np.testing.assert_array_equal(z["label"], labels)
    np.testing.assert_array_equal(np.load(d / "labels.npy")[vids], labels)
    assert sum(stats_json["label_histogram"]) == N_TRAIN
    # the labels are the argmax of the reward formula over the 81 records of each video
    _, table = rec.reward_table(stats, W_Q, W_L)
    np.testing.assert_array_equal(table.argmax(1), labels)
    assert len(set(labels.tolist())) >= 5  # the labels depend on the video
    # relabelling without decoding: more weight on quality never buys fewer tokens
    lengths = rec.layout.all_assignments().sum(1).numpy()
    tok_lo = lengths[labels_for(rec, stats, 0.4, 1.6)[1]]
    tok_hi = lengths[labels_for(rec, stats, 2.0, 0.0)[1]]
    assert (tok_hi >= tok_lo).all() and tok_hi.mean() > tok_lo.mean()


def test_beam_curation_matches_brute_force_and_resumes(work, tmp_path):
    from arvid.stages.curate import CurateConfig, run

    cfg = CurateConfig(data=_data(), split="train", tokenizer=str(work / "proxy"), quality="mse", mode="beam",
                       beam_width=2, stats=str(work / "cur_train" / "stats.json"), batch_size=96, w_q=W_Q, w_l=W_L,
                       videos_per_step=4, save_every=16, device="cpu", out_dir=str(tmp_path / "beam"))
    out = run(cfg)
    beam = CurationRecords.load(out / "curation.npz")
    brute = CurationRecords.load(work / "cur_train" / "curation.npz")
    from arvid.stages.curate import read_stats

    stats = read_stats(work / "cur_train")
    _, _, r_beam = labels_for(beam, stats, W_Q, W_L)
    _, _, r_brute = labels_for(brute, stats, W_Q, W_L)
    # brute force is the optimum: the beam never beats it, finds it for nearly every video, and
    # misses it by little where it does not (on 2026-12-08, with the packages then resolved: 37
    # of 40 found, the three misses 0.007-0.017 below the optimum, against a spread of 12.6)
    regret = r_brute - r_beam
    hit = np.isclose(r_beam, r_brute, rtol=0, atol=1e-6)
    assert (regret >= -1e-6).all(), regret
    assert hit.mean() >= 0.9, (hit.mean(), regret)
    assert regret.max() <= 0.01 * (r_brute.max() - r_brute.min()), (regret, r_brute.max() - r_brute.min())
    info = json.loads((out / "stats.json").read_text())
    assert info["decoded_fraction"] <= 0.2 and info["mode"] == "beam"
    assert beam.searched_decoded.max() <= 3 + 3 * 2 * 2
    # resume: drop one shard and the merged outputs; only that shard's videos are searched again
    parts = sorted((out / "parts").glob("part_*.npz"))
    assert len(parts) == 3
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    (out / "done").unlink()
    (out / "curation.npz").unlink()
    time.sleep(0.01)
    run(cfg)
    again = CurationRecords.load(out / "curation.npz")
    for p in (parts[0], parts[2]):
        assert p.stat().st_mtime_ns == mtimes[p.name]
    assert (out / "done").is_file()
    np.testing.assert_array_equal(labels_for(again, stats, W_Q, W_L)[1], labels_for(beam, stats, W_Q, W_L)[1])
    # shards of a search guided by another reward are not mixed in (before 2026-12-07 the key held the
    # quality term only: another w_q, beam width or mode reused them)
    (out / "done").unlink()
    import dataclasses

    from arvid.config import ConfigError

    saved = (out / "config.yaml").read_text()
    for change in (dict(w_q=W_Q + 0.5), dict(beam_width=3), dict(mode="brute")):
        with pytest.raises(ConfigError, match=f"holds shards of another run \\(.*{next(iter(change))}.* changed"):
            run(dataclasses.replace(cfg, **change))
    assert (out / "config.yaml").read_text() == saved  # a refused run leaves the run's config alone


@pytest.fixture(scope="session")
def router_dir(work) -> Path:
    from arvid.stages.train_router import RouterSpec, TrainRouterConfig, run

    cfg = TrainRouterConfig(
        data=_data(), curation=str(work / "cur_train"), val_curation=str(work / "cur_val"),
        router=RouterSpec(preset="debug"), targets="soft", tau=0.5,
        trainer=TrainerConfig(max_steps=120, batch_size=20, lr=2e-3, warmup_steps=10, checkpoint_every=0,
                              log_every=50, device="cpu", progress=False),
        eval_batch_size=16, device="cpu", out_dir=str(work / "router"))
    return run(cfg)


def test_router_beats_random_assignment(router_dir, work):
    m = json.loads((router_dir / "router_metrics.json").read_text())
    assert m["num_videos"] == N_VAL and m["quality"] == "mse"
    assert 0.0 <= m["top1"] <= m["top5"] <= 1.0
    assert m["reward_percentile"] > m["reward_percentile_random"] + 0.05, m
    assert set(m["uniform"]) == {"1", "4", "16"}
    assert (router_dir / "done").is_file()
    from arvid.tokenizer.router import Router

    r = Router.from_pretrained(router_dir / "router")
    x = torch.stack([build_dataset(_data(), "val")[i]["video"] for i in range(4)])
    a = r.choose(x)
    assert a.shape == (4, 4) and set(a.unique().tolist()) <= {1, 4, 16}
    # the held-out beam records were completed with the proxy: every assignment has a reward
    assert m["held_out"] == "val_curation"
    # where the stage's time went, for sizing recipes: three positive phases
    assert set(m["seconds"]) == {"train", "complete_held_out", "evaluate"}
    assert all(v >= 0 for v in m["seconds"].values()) and m["seconds"]["train"] > 0


def test_router_held_out_fraction_of_curated_videos(work, tmp_path):
    from arvid.stages.train_router import RouterSpec, TrainRouterConfig, run

    out = run(TrainRouterConfig(
        data=_data(), curation=str(work / "cur_train"), val_fraction=0.25, router=RouterSpec(preset="debug"),
        trainer=TrainerConfig(max_steps=3, batch_size=10, checkpoint_every=0, device="cpu", progress=False),
        device="cpu", out_dir=str(tmp_path / "r")))
    m = json.loads((out / "router_metrics.json").read_text())
    assert m["num_videos"] == 10 and m["train_videos"] == 30 and m["held_out"].startswith("last 25%")
    assert 0.0 <= m["reward_percentile_random"] <= 1.0 and m["w_q"] == W_Q
    # its checkpoints resume only under their config (the check the training stages share)
    from arvid.config import ConfigError

    with pytest.raises(ConfigError, match=r"train-router: the checkpoints in .* another config \(trainer.lr"):
        run(TrainRouterConfig(
            data=_data(), curation=str(work / "cur_train"), val_fraction=0.25, router=RouterSpec(preset="debug"),
            trainer=TrainerConfig(max_steps=3, batch_size=10, lr=0.5, checkpoint_every=0, device="cpu",
                                  progress=False),
            device="cpu", out_dir=str(tmp_path / "r")))


def test_tokenize_store_decodes_like_direct_encode(router_dir, work, tmp_path):
    from arvid.stages.tokenize import TokenizeConfig, run
    from arvid.tokenizer.router import Router

    cfg = TokenizeConfig(data=_data(), split="val", tokenizer=str(work / "proxy"), router=str(router_dir / "router"),
                         batch_size=6, save_every=7, device="cpu", out_dir=str(tmp_path / "tok"))
    out = run(cfg)
    store = TokenStore(out / "tokens")
    tok = load_tokenizer(work / "proxy").eval()
    store.check_fingerprint(tok.fingerprint())
    assert len(store) == N_VAL
    ds = build_dataset(_data(), "val")
    x = torch.stack([ds[i]["video"] for i in range(N_VAL)])
    choice = Router.from_pretrained(router_dir / "router").choose(x)
    tv = store.get_batch(range(N_VAL))
    assert torch.equal(tv.block_lengths, choice)
    direct = tok.encode(x, choice)
    assert torch.equal(tv.codes, direct.codes)
    rec_store, rec_direct = tok.decode(tv), tok.decode(direct)
    assert rec_store.shape == x.shape
    assert torch.allclose(_psnr(x, rec_store), _psnr(x, rec_direct), atol=1e-3)
    assert store.labels.tolist() == [ds[i]["label"] for i in range(N_VAL)]
    st = json.loads((out / "tokenize_stats.json").read_text())
    assert st["mean_tokens"] == pytest.approx(float(choice.sum(1).double().mean()))
    assert sum(st["assignment_histogram"]) == N_VAL and st["assignment_source"].startswith("router")
    assert not (out / "tokens.shards").exists()
    # a rerun finds the finished store and leaves it alone; shards left by a run stopped after its
    # merge (here: one copied back) are removed
    before = (out / "tokens" / "codes.bin").stat().st_mtime_ns
    shutil.copytree(out / "tokens", out / "tokens.shards" / "shard_0")
    run(cfg)
    assert (out / "tokens" / "codes.bin").stat().st_mtime_ns == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("tokens")) == ["tokens"]
    # another config over these tokens (finished, or shards of an interrupted run) is refused, naming
    # what changed: before 2026-12-07 a rerun took any existing shard (video 3 went missing, counts mixed)
    import dataclasses

    from arvid.config import ConfigError

    for change, changed in ((dict(num_videos=3), "num_videos"),
                            (dict(router=None, fixed_assignment=[16, 1, 1, 4]), "fixed_assignment, router")):
        with pytest.raises(ConfigError, match=f"tokens in .* another config \\({changed} changed"):
            run(dataclasses.replace(cfg, **change))
    from arvid.data.token_store import TokenStoreWriter, shard_path

    whole = TokenStore(out / "tokens")  # an interrupted run: its first chunk (7 videos) written
    with TokenStoreWriter(shard_path(out / "tokens", 0), whole.fingerprint, whole.layout, whole.codebook_size) as w:
        w.append(whole.get_batch(range(7)), whole.labels[:7], whole.video_ids[:7])
    shutil.rmtree(out / "tokens")
    with pytest.raises(ConfigError, match="num_videos changed"):
        run(dataclasses.replace(cfg, num_videos=3))
    run(cfg)  # the same config: keeps the shard, writes the others, merges
    again = TokenStore(out / "tokens")
    assert again.video_ids == store.video_ids and torch.equal(again.get_batch(range(N_VAL)).codes, tv.codes)
    # a fixed assignment, from curate's labels.npy, and an invalid index file
    fixed = run(TokenizeConfig(data=_data(), split="val", tokenizer=str(work / "proxy"), fixed_assignment=[16, 1, 1, 4],
                               device="cpu", out_dir=str(tmp_path / "fixed")))
    assert TokenStore(fixed / "tokens").block_lengths.tolist() == [[16, 1, 1, 4]] * N_VAL
    lab = run(TokenizeConfig(data=_data(), split="train", tokenizer=str(work / "proxy"),
                             assignments=str(work / "cur_train" / "labels.npy"), device="cpu",
                             out_dir=str(tmp_path / "lab")))
    want = tok.layout.indices_to_assignments(torch.from_numpy(np.load(work / "cur_train" / "labels.npz")["label"]))
    assert torch.equal(TokenStore(lab / "tokens").block_lengths.long(), want)
    np.save(tmp_path / "bad.npy", np.full(N_VAL, -1))
    with pytest.raises(ValueError, match="no valid assignment"):
        run(TokenizeConfig(data=_data(), split="val", tokenizer=str(work / "proxy"), assignments=str(tmp_path / "bad.npy"),
                           device="cpu", out_dir=str(tmp_path / "bad")))


def test_eval_curve_drops_an_unreadable_video_and_keeps_records_aligned(work, tmp_path, monkeypatch):
    """With on_bad_video=skip a file dataset hands out the next readable video under an unreadable
    one's index; eval curve drops such items (no video counted twice) and selects the curation
    records by the dataset indices it kept (before 2026-12-06: video 4 twice, records shifted)."""
    from arvid.stages import eval_curve
    from arvid.stages.curate import read_stats

    real = build_dataset(_data(), "val")

    class OneBad:  # video 3 is unreadable: its index yields video 4, as VideoFileDataset does
        def __len__(self):
            return len(real)

        def __getitem__(self, i):
            return dict(real[4], index=4) if i == 3 else dict(real[i], index=i)

    monkeypatch.setattr(eval_curve, "build_dataset", lambda cfg, split: OneBad())
    cfg = eval_curve.EvalCurveConfig(data=_data(), split="val", tokenizer=str(work / "proxy"),
                                     curation=str(work / "cur_val"), w_q_sweep=[1.2], n_thresholds=0, quality="mse",
                                     batch_size=16, device="cpu", out_dir=str(tmp_path / "curve"))
    res = json.loads((eval_curve.run(cfg) / "curve.json").read_text())
    assert res["num_videos"] == N_VAL - 1 and res["num_skipped"] == 1
    keep = [i for i in range(N_VAL) if i != 3]
    rec = CurationRecords.load(work / "cur_val" / "curation.npz").select_videos(np.array(keep))
    vids, labels, _ = labels_for(rec, read_stats(str(work / "cur_val")), 1.2, 0.8)
    assert sorted(vids.tolist()) == keep
    layout = load_tokenizer(work / "proxy").layout
    want = layout.indices_to_assignments(torch.from_numpy(labels)).sum(1).double().mean().item()
    mr = [p for p in res["points"] if p["method"] == "max-reward"]
    assert len(mr) == 1 and mr[0]["tokens"] == pytest.approx(want)
    # the uniform points average over the kept videos only
    tok = load_tokenizer(work / "proxy").eval()
    x = torch.stack([real[i]["video"] for i in keep])
    u16 = [p for p in res["points"] if p["method"] == "uniform" and p["param"] == 16][0]
    assert u16["psnr"] == pytest.approx(float(_psnr(x, tok.decode(tok.encode(x, tok.layout.uniform(16, len(keep)))))
                                              .mean()), abs=1e-4)


def test_eval_curve_points_and_tokens_saved(router_dir, work, tmp_path):
    from arvid.stages.eval_curve import EvalCurveConfig, run

    cfg = EvalCurveConfig(data=_data(), split="val", tokenizer=str(work / "proxy"), curation=str(work / "cur_val"),
                          router=str(router_dir / "router"), n_thresholds=3, quality="mse", batch_size=16,
                          device="cpu", out_dir=str(tmp_path / "curve"))
    # the curation of another split (its records index other videos) is refused (before 2026-12-07: used)
    import dataclasses

    from arvid.config import ConfigError

    with pytest.raises(ConfigError, match="holds records of split 'train', but the curve runs on split 'val'"):
        run(dataclasses.replace(cfg, curation=str(work / "cur_train"), out_dir=str(tmp_path / "wrong")))
    out = run(cfg)
    res = json.loads((out / "curve.json").read_text())
    pts = res["points"]
    by = {m: [p for p in pts if p["method"] == m] for m in ("uniform", "max-reward", "router", "threshold")}
    assert [len(by[m]) for m in by] == [3, 5, 1, 3]
    assert [p["tokens"] for p in by["uniform"]] == [4.0, 16.0, 64.0]
    # more weight on quality (w_l = 2 - w_q) buys more tokens and less distortion
    mr = sorted(by["max-reward"], key=lambda p: p["param"])
    assert all(a["tokens"] <= b["tokens"] for a, b in zip(mr, mr[1:]))
    assert all(a["distortion"] >= b["distortion"] - 1e-6 for a, b in zip(mr, mr[1:]))
    assert mr[-1]["tokens"] > mr[0]["tokens"]
    # threshold baseline: a looser threshold never costs more tokens
    th = sorted(by["threshold"], key=lambda p: p["param"])
    assert all(a["tokens"] >= b["tokens"] for a, b in zip(th, th[1:]))
    saved = {(s["method"], s["param"]): s for s in res["tokens_saved"]}
    r = saved[("router", 0.0)]
    eq = r["uniform_tokens_at_equal_distortion"]
    if eq is not None:
        assert r["tokens_saved_at_equal_distortion"] == pytest.approx(1 - by["router"][0]["tokens"] / eq)
    assert res["quality"] == "mse" and res["num_videos"] == N_VAL
    lines = (out / "curve.csv").read_text().strip().splitlines()
    assert lines[0].startswith("method,param,tokens,distortion,psnr") and len(lines) == 13
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the uniform points decode exactly what encode/decode gives for those assignments
    tok = load_tokenizer(work / "proxy").eval()
    ds = build_dataset(_data(), "val")
    x = torch.stack([ds[i]["video"] for i in range(N_VAL)])
    rec = tok.decode(tok.encode(x, tok.layout.uniform(16, N_VAL)))
    assert by["uniform"][2]["psnr"] == pytest.approx(float(_psnr(x, rec).mean()), abs=1e-4)


def test_cli_registration():
    from arvid.stages import curate, eval_curve, tokenize, train_router

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    for mod in (curate, train_router, tokenize):
        mod.add_arguments(sub)
    ev = sub.add_parser("eval").add_subparsers(dest="eval_command")
    eval_curve.add_arguments(ev)
    a = parser.parse_args(["curate", "c.yaml", "mode=beam", "w_q=1.6"])
    assert a.func is curate._main and a.overrides == ["mode=beam", "w_q=1.6"]
    assert parser.parse_args(["train-router", "r.yaml"]).func is train_router._main
    assert parser.parse_args(["tokenize", "t.yaml"]).func is tokenize._main
    assert parser.parse_args(["eval", "curve", "e.yaml"]).func is eval_curve._main


def test_curate_shards_across_processes(work, tmp_path, monkeypatch):
    """Two processes split the videos by index (simulated in turn: the non-main one first, since
    the main process merges); the merged records equal the single-process run's."""
    import arvid.stages.curate as cur

    cfg = cur.CurateConfig(data=_data(), split="train", num_videos=6, tokenizer=str(work / "proxy"), quality="mse",
                           mode="brute", stats=str(work / "cur_train" / "stats.json"), batch_size=96,
                           videos_per_step=2, save_every=2, device="cpu", out_dir=str(tmp_path / "sharded"))
    for rank in (1, 0):
        monkeypatch.setattr(cur, "process_info", lambda rank=rank: cur.ProcessInfo(rank, 2))
        cur.run(cfg)
    out = tmp_path / "sharded"
    firsts = sorted(int(p.stem.split("_")[1]) for p in (out / "parts").glob("part_*.npz"))
    assert firsts == [0, 1, 4, 5]  # rank 0: videos 0,2 | 4 ; rank 1: videos 1,3 | 5
    rec = CurationRecords.load(out / "curation.npz")
    ref = CurationRecords.load(work / "cur_train" / "curation.npz").select_videos(np.arange(6))
    np.testing.assert_allclose(rec.distortion_table()[1], ref.distortion_table()[1], rtol=1e-5, atol=1e-7)
    # shards of another quality term are refused, not mixed
    (out / "done").unlink()
    with pytest.raises(ValueError, match="refusing to mix"):
        cur.run(cur.CurateConfig(**{**cfg.__dict__, "quality": "ssim", "stats": None}))


@pytest.mark.gpu
def test_gpu_search_and_tokenize_agree_with_cpu(work, router_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # Trainer.fit earlier in the session turned TF32 on process-wide; compare in true fp32.
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        _gpu_agrees_with_cpu(work, router_dir, tmp_path)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _gpu_agrees_with_cpu(work, router_dir, tmp_path):
    from arvid.stages.curate import read_stats
    from arvid.stages.tokenize import TokenizeConfig, run
    from arvid.tokenizer.reward import Distortion, ProxyScorer, beam_search, brute_force_search

    ds = build_dataset(_data(), "val")
    x = torch.stack([ds[i]["video"] for i in range(8)])
    cpu = load_tokenizer(work / "proxy").eval()
    gpu = load_tokenizer(work / "proxy", map_location="cuda").eval()
    assert next(gpu.parameters()).is_cuda
    d_cpu = brute_force_search(ProxyScorer(cpu, Distortion("mse")), x).block_distortion
    d_gpu = brute_force_search(ProxyScorer(gpu, Distortion("mse", device="cuda"), precision="fp32"),
                               x.cuda()).block_distortion
    assert torch.allclose(d_cpu, d_gpu, rtol=2e-2, atol=2e-4)
    stats = read_stats(work / "cur_train")
    _, r_cpu = beam_search(ProxyScorer(cpu, Distortion("mse")), x, stats, W_Q, W_L).best(cpu.layout, stats, W_Q, W_L)
    _, r_gpu = beam_search(ProxyScorer(gpu, Distortion("mse", device="cuda"), precision="fp32"), x.cuda(), stats,
                           W_Q, W_L).best(
        cpu.layout, stats, W_Q, W_L)
    assert torch.allclose(r_cpu, r_gpu, atol=5e-2)
    out = run(TokenizeConfig(data=_data(), split="val", tokenizer=str(work / "proxy"), router=str(router_dir / "router"),
                             device="cuda", precision="fp32", out_dir=str(tmp_path / "tok")))
    store = TokenStore(out / "tokens")
    from arvid.tokenizer.router import Router

    xs = torch.stack([ds[i]["video"] for i in range(N_VAL)])
    choice = Router.from_pretrained(router_dir / "router").choose(xs)
    assert (store.block_lengths.long() == choice).all(1).float().mean() >= 0.9
    rec = cpu.decode(store.get_batch(range(N_VAL)))
    direct = cpu.decode(cpu.encode(xs, store.block_lengths.long()))
    assert (_psnr(xs, rec) - _psnr(xs, direct)).abs().max() < 0.5


def test_plot_curve_adds_an_rfvd_panel_only_when_points_have_rfvd(tmp_path):
    from PIL import Image

    from arvid.stages.eval_curve import plot_curve

    pts = [{"method": "uniform", "param": c, "tokens": 4.0 * c, "distortion": 1.0 / c, "psnr": 20.0 + c, "rfvd": None}
           for c in (1, 2, 4)]
    plot_curve(pts, "mse", tmp_path / "two.png")
    for p, f in zip(pts, (300.0, 200.0, 150.0)):
        p["rfvd"] = f
    plot_curve(pts + [{"method": "router", "param": 0, "tokens": 6.0, "distortion": 0.6, "psnr": 21.5, "rfvd": None}],
               "mse", tmp_path / "three.png")
    w2, h2 = Image.open(tmp_path / "two.png").size
    w3, h3 = Image.open(tmp_path / "three.png").size
    assert h2 == h3 and w3 == round(w2 * 3 / 2)  # 5.5 inches per panel


def test_router_refuses_a_held_out_curation_of_another_distortion_or_proxy(work, tmp_path):
    """Held-out rewards are scored with the training curation's stats: a val_curation made with
    another distortion or proxy gave a meaningless percentile (before 2026-12-07, no error)."""
    from arvid.config import ConfigError
    from arvid.stages.train_router import RouterSpec, TrainRouterConfig, run

    for key, value in (("quality", "1-ssim"), ("tokenizer_fingerprint", "0" * 64)):
        other = tmp_path / f"val_{key}"
        shutil.copytree(work / "cur_val", other)
        info = json.loads((other / "stats.json").read_text())
        info[key] = value
        (other / "stats.json").write_text(json.dumps(info))
        with pytest.raises(ConfigError, match=f"was curated with {key} '{value}', curation .* with "):
            run(TrainRouterConfig(
                data=_data(), curation=str(work / "cur_train"), val_curation=str(other),
                router=RouterSpec(preset="debug"),
                trainer=TrainerConfig(max_steps=1, batch_size=10, checkpoint_every=0, device="cpu", progress=False),
                device="cpu", out_dir=str(tmp_path / f"r_{key}")))


def test_curate_says_when_num_videos_exceeds_the_split(tmp_path, caplog):
    """num_videos larger than the split curated the whole split without a word (bad-input review,
    2026-12-07)."""
    from arvid.stages.curate import CurateConfig, run

    torch.manual_seed(0)
    build_tokenizer("evatok", {}, preset="debug").save_pretrained(tmp_path / "tok")
    data = DataConfig(source="synthetic", frames=8, size=32, num_videos=4, num_val_videos=3, random_start=False)
    cfg = CurateConfig(data=data, split="val", num_videos=10, tokenizer=str(tmp_path / "tok"), quality="mse",
                       mode="beam", beam_width=2, calib_videos=3, calib_assignments=2, batch_size=4,
                       device="cpu", out_dir=str(tmp_path / "cur"))
    with caplog.at_level("WARNING", logger="arvid"):
        run(cfg)
    assert "num_videos=10 but the val split has 3 videos: curating all 3" in caplog.text
    assert len(np.load(tmp_path / "cur" / "labels.npy")) == 3


def test_curate_leaves_out_an_unreadable_video_and_resumes_past_it(tmp_path, caplog):
    """A file dataset hands out the next readable video for one it cannot decode (on_bad_video:
    skip). curate scored it under the bad file's index: the neighbour labelled twice (its record
    and its label under both indices). Now the bad file gets no record and label -1, is counted in
    stats.json, and a resumed run neither tries it again nor misses it."""
    from arvid.stages.curate import CurateConfig, run
    from arvid.stages.data_cmd import synth

    synth(tmp_path / "vids", fmt="mp4", num=5, seed=4, frames=8, size=16)
    paths = sorted((tmp_path / "vids").rglob("*.mp4"))
    paths[2].write_bytes(b"")
    torch.manual_seed(0)
    build_tokenizer("evatok", dict(frames_per_block=[2, 2, 2, 2], candidates=[1, 4], image_size=16),
                    preset="debug").save_pretrained(tmp_path / "tok")
    data = DataConfig(source="folder", root=str(tmp_path / "vids"), frames=8, size=16, random_start=False)
    common = dict(data=data, split="train", tokenizer=str(tmp_path / "tok"), quality="mse", mode="brute",
                  calib_videos=5, calib_assignments=2, batch_size=16, videos_per_step=2, save_every=2,
                  device="cpu")
    out = run(CurateConfig(out_dir=str(tmp_path / "cur"), **common))
    labels = np.load(out / "labels.npy")
    assert labels[2] == -1 and (np.delete(labels, 2) >= 0).all()
    assert np.load(out / "labels.npz")["video"].tolist() == [0, 1, 3, 4]
    assert sorted(np.unique(np.load(out / "curation.npz")["searched_videos"]).tolist()) == [0, 1, 3, 4]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_videos"] == 4 and stats["unreadable_videos"] == 1
    # each label is its own video's: a run over the readable files alone gives the same ones
    paths[2].unlink()
    ref = run(CurateConfig(out_dir=str(tmp_path / "ref"), **common))
    assert np.load(ref / "labels.npy").tolist() == np.delete(labels, 2).tolist()
    # resume: drop the shard after the unreadable file's; the rerun scores only its videos again
    paths[2].write_bytes(b"")
    (out / "done").unlink()
    for f in ("curation.npz", "labels.npz", "labels.npy"):
        (out / f).unlink()
    last = sorted((out / "parts").glob("part_*.npz"))[-1]
    last.unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="arvid"):
        out = run(CurateConfig(out_dir=str(tmp_path / "cur"), **common))
    assert "unreadable" not in caplog.text  # video 2 was not tried again
    assert np.load(out / "labels.npy").tolist() == labels.tolist()
    assert sorted(p.name for p in (out / "parts").glob("unreadable_*.json")) == ["unreadable_000000002.json"]
