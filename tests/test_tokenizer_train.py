"""`arvid train-tokenizer`: the proxy stage learns to use its tokens; fixed/final stages; the CLI."""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from arvid.config import ConfigError, from_dict
from arvid.stages.train_tokenizer import TrainTokenizerConfig, _split_stage, add_arguments, run
from arvid.tokenizer.base import load_tokenizer


@contextmanager
def one_thread():
    # Two intra-op threads on a busy 2-core runner can be 10x slower than one for these tiny ops.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_proxy_training_psnr_rises_with_more_tokens(tmp_path):
    """Trained proxy-style (a random assignment per sample) on the synthetic clips, the debug EVATok
    reconstructs held-out clips monotonically better with 1 < 4 < 16 tokens per block."""
    cfg = from_dict(TrainTokenizerConfig, {
        "data": {"frames": 8, "size": 16, "num_videos": 256, "num_val_videos": 32},
        "tokenizer": {"name": "evatok", "preset": "debug",
                      "params": {"image_size": 16, "candidates": [1, 4, 16], "patch_layers": 0,
                                 "query_layers": 1, "decoder_layers": 1}},
        "loss": {"l1_weight": 1.0, "entropy_weight": 0.02},
        "trainer": {"max_steps": 800, "batch_size": 8, "lr": 2e-3, "warmup_steps": 20, "log_every": 100,
                    "checkpoint_every": 0, "progress": False, "device": "cpu", "seed": 0},
        "stage": "proxy", "val_videos": 32, "out_dir": str(tmp_path / "proxy"),
    })
    with one_thread():
        out = run(cfg)
    m = json.loads((out / "val_metrics.json").read_text())
    curve = [m["psnr_uniform"][str(c)] for c in (1, 4, 16)]
    print("PSNR by tokens per block (1, 4, 16):", curve)
    assert curve[0] + 0.1 < curve[1] and curve[1] + 0.1 < curve[2], curve
    assert curve[2] > 17.0, curve  # it learned something (an untrained model is ~11 dB)
    assert 0 < m["codebook_usage"] <= 1 and m["codebook_perplexity"] > 1
    assert (out / "done").is_file() and (out / "val_recon.gif").stat().st_size > 0
    import av  # the mp4 beside the gif: inputs and reconstructions side by side, every frame

    with av.open(str(out / "val_recon.mp4")) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == cfg.data.frames and frames[0].shape[0] > frames[0].shape[1] / 8
    tok = load_tokenizer(out / "tokenizer")
    assert tok.layout.candidates == (1, 4, 16)


def _tiny(tmp_path, name: str, **extra) -> TrainTokenizerConfig:
    base = {
        "data": {"frames": 8, "size": 32, "num_videos": 8, "num_val_videos": 2},
        "tokenizer": {"name": "grid3d", "preset": "debug"},
        "trainer": {"max_steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 0,
                    "progress": False, "device": "cpu"},
        "val_videos": 2, "out_dir": str(tmp_path / name),
    }
    for k, v in extra.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return from_dict(TrainTokenizerConfig, base)


def test_fixed_stage_grid3d_with_gan(tmp_path):
    cfg = _tiny(tmp_path, "fixed", stage="fixed",
                loss={"gan_weight": 0.1, "gan_start": 1, "disc_channels": 8, "disc_layers": 2})
    with one_thread():
        out = run(cfg)
    m = json.loads((out / "val_metrics.json").read_text())
    assert m["stage"] == "fixed" and m["tokens_per_video"] == 4 * 64
    assert np.isfinite(m["psnr"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert any("gan_g" in x for x in lines), "the GAN term must be on from gan_start"


def test_final_stage_from_assignment_file_and_errors(tmp_path):
    np.save(tmp_path / "labels.npy", np.array([0, 1, 2, 3, -1, 5, 6, 7]))
    cfg = _tiny(tmp_path, "final", stage="final", assignments=str(tmp_path / "labels.npy"),
                tokenizer={"name": "evatok", "preset": "debug"})
    with one_thread():
        out = run(cfg)
    m = json.loads((out / "val_metrics.json").read_text())
    # the most common curated label is the validation assignment; index 0 is all-smallest (4 x 4)
    assert m["stage"] == "final" and m["tokens_per_video"] == 16
    with pytest.raises(ConfigError, match="router"):
        _tiny(tmp_path, "bad", stage="final")
    with pytest.raises(ConfigError, match="`router` or `assignments`, not both"):
        _tiny(tmp_path, "both", stage="final", router=str(tmp_path), assignments=str(tmp_path / "labels.npy"))
    with pytest.raises(ConfigError, match="data.frames"):
        run(_tiny(tmp_path, "bad2", data={"frames": 6}))


def test_final_stage_with_a_router(tmp_path):
    router_mod = pytest.importorskip("arvid.tokenizer.router")
    layout = {"frames_per_block": [2, 2, 2, 2], "candidates": [4, 8, 16, 32]}
    torch.manual_seed(0)
    router = router_mod.Router(from_dict(router_mod.RouterConfig, {
        **router_mod.Router.presets()["debug"], **layout, "image_size": 32}))
    router.save_pretrained(tmp_path / "router")
    cfg = _tiny(tmp_path, "final_router", stage="final", router=str(tmp_path / "router"),
                tokenizer={"name": "evatok", "preset": "debug"})
    out = run(cfg)
    m = json.loads((out / "val_metrics.json").read_text())
    with torch.no_grad():
        from arvid.data.datasets import build_dataset

        v = torch.stack([build_dataset(cfg.data, "val")[i]["video"] for i in range(2)])
        expect = router.eval().choose(v).sum(1).float().mean().item()
    assert m["tokens_per_video"] == pytest.approx(expect)
    bad = _tiny(tmp_path, "final_bad", stage="final", router=str(tmp_path / "router"),
                tokenizer={"name": "evatok", "preset": "debug", "params": {"candidates": [4, 8, 16]}})
    with pytest.raises(ConfigError, match="trained for layout"):
        run(bad)


def test_cli_registers_train_tokenizer(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-tokenizer", "configs/tokenizer/debug.yaml", "--stage", "fixed",
                              "trainer.max_steps=3"])
    assert args.config == "configs/tokenizer/debug.yaml" and callable(args.func)
    assert _split_stage(args.overrides) == ("fixed", ["trainer.max_steps=3"])
    args = parser.parse_args(["train-tokenizer", "c.yaml", "--stage=proxy"])
    assert (args.stage or _split_stage(args.overrides)[0]) == "proxy"
    args = parser.parse_args(["train-tokenizer", "c.yaml", "a.b=1", "--stage", "final", "c=2"])
    assert _split_stage(args.overrides) == ("final", ["a.b=1", "c=2"])
    with pytest.raises(ConfigError, match="proxy, fixed or final"):
        _split_stage(["--stage=bogus"])


@pytest.mark.parametrize("name", ["debug", "evatok_S", "evatok_B", "grid3d_B"])
def test_shipped_configs_load(name):
    from arvid.config import load_config
    from arvid.stages.train_tokenizer import build_from_spec

    cfg = load_config(TrainTokenizerConfig, f"configs/tokenizer/{name}.yaml")
    with torch.device("meta"):
        tok = build_from_spec(cfg.tokenizer)
    assert cfg.data.frames == tok.layout.num_frames
    assert cfg.data.size == tok.config.image_size


def test_recon_grid_rows_alternate_also_for_a_short_last_chunk():
    from arvid.stages.train_tokenizer import recon_grid

    videos = torch.arange(12.0).view(12, 1, 1, 1, 1).expand(12, 3, 2, 4, 4)
    recon = -videos
    g = recon_grid(videos, recon, 8)  # rows of 8: in 0-7, rec 0-7, in 8-11 + 4 white, rec 8-11 + 4 white
    assert g.shape[0] == 32
    firsts = g[:, 0, 0, 0, 0].tolist()
    assert firsts[:16] == list(range(8)) + [-x for x in range(8)]
    assert firsts[16:] == [8, 9, 10, 11, 1, 1, 1, 1, -8, -9, -10, -11, 1, 1, 1, 1]


def test_checkpoints_resume_only_under_their_config(tmp_path):
    """A rerun with another lr or another model over a run's checkpoints resumed them (or failed on
    shapes) and rewrote config.yaml to the new config (before 2026-12-07); it is refused, naming the
    change, and the run's config.yaml stays."""
    cfg = _tiny(tmp_path, "run", stage="fixed", trainer={"checkpoint_every": 1, "max_steps": 1})
    with one_thread():
        run(cfg)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    for change, name in ((dict(trainer={"checkpoint_every": 1, "max_steps": 1, "lr": 0.1}), "trainer.lr"),
                         (dict(trainer={"checkpoint_every": 1, "max_steps": 1},
                               tokenizer={"params": {"base_channels": 8}}), "tokenizer.params")):
        with pytest.raises(ConfigError, match=f"checkpoints in .* another config [(]{name}"):
            run(_tiny(tmp_path, "run", stage="fixed", **change))
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    with one_thread():  # more steps continue it
        run(_tiny(tmp_path, "run", stage="fixed", trainer={"checkpoint_every": 1, "max_steps": 2}))


def test_val_metrics_without_random_assignments_and_a_bad_fixed_assignment(tmp_path):
    """Found in a correctness review: with val_random_assignments: 0 the proxy stage's val_metrics
    gave the first uniform set's PSNR beside tokens_per_video 0.0; a fixed_assignment that does not
    fit the layout failed with the layout's message, not naming the field."""
    with one_thread():
        out = run(_tiny(tmp_path, "norand", val_random_assignments=0))
    m = json.loads((out / "val_metrics.json").read_text())
    # grid3d debug: 4 blocks of 64 codes, its only (uniform) assignment
    assert m["tokens_per_video"] == 256.0
    assert m["psnr"] == m["psnr_uniform"]["64"] == m["psnr_by_assignment"]["uniform_64"]["psnr"]
    with pytest.raises(ConfigError, match="val_random_assignments must be >= 0"):
        _tiny(tmp_path, "neg", val_random_assignments=-1)
    for bad in ([4, 4, 4], [4, 4, 4, 5]):
        with pytest.raises(ConfigError, match=rf"fixed_assignment \[{', '.join(map(str, bad))}\] does not fit"):
            run(_tiny(tmp_path, f"fixed_{len(bad)}", stage="fixed", fixed_assignment=bad,
                      tokenizer={"name": "evatok", "preset": "debug"}))
