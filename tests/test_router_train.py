"""`arvid train-router`: held-out split checks that need no training."""

from __future__ import annotations

import numpy as np
import pytest

from arvid.config import ConfigError, from_dict
from arvid.data.types import BlockLayout
from arvid.io import write_json
from arvid.stages.train_router import TrainRouterConfig, run
from arvid.tokenizer.reward import CurationRecords


def _curation(directory, num_videos: int):
    """A brute-force curation of ``num_videos`` videos over a 2-block, 2-candidate layout."""
    layout = BlockLayout((2, 2), (4, 8))
    A = layout.num_assignments
    rng = np.random.default_rng(0)
    directory.mkdir()
    CurationRecords(layout, np.repeat(np.arange(num_videos), A), np.tile(np.arange(A), num_videos),
                    rng.random((num_videos * A, 2)), np.arange(num_videos), np.full(num_videos, A),
                    "mse").save(directory / "curation.npz")
    stats = {"quality": "mse", "mean_distortion": 0.5, "std_distortion": 0.2, "mean_length": 12.0,
             "std_length": 4.0, "num_samples": 8}
    write_json(directory / "stats.json", {"reward_stats": stats, "w_q": 1.2, "w_l": 0.8, "quality": "mse"})
    (directory / "config.yaml").write_text("split: train\n")


def test_a_val_fraction_that_holds_out_every_video_is_named(tmp_path):
    """Found in a correctness review: round(val_fraction * videos) can reach every curated video
    (0.75 of 2 -> 2), leaving an empty training set that the Trainer refused as 'the dataset has
    0 items', not naming val_fraction."""
    _curation(tmp_path / "cur", 2)
    cfg = from_dict(TrainRouterConfig, {
        "data": {"frames": 4, "size": 16, "num_videos": 2, "num_val_videos": 1},
        "curation": str(tmp_path / "cur"), "val_fraction": 0.75, "router": {"preset": "debug"},
        "trainer": {"max_steps": 1, "batch_size": 1, "progress": False, "device": "cpu", "checkpoint_every": 0},
        "device": "cpu", "out_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=r"val_fraction 0.75 of 2 curated videos holds out all 2 of them"):
        run(cfg)


def test_a_router_on_other_videos_than_the_curation_is_refused(tmp_path):
    """train-router took any data section: labels curated on one synthetic set (seed 0, 2 videos)
    were put on the videos of another (review 2026-12-08). Clip settings may differ; which video an
    index is may not."""
    _curation(tmp_path / "cur", 2)
    (tmp_path / "cur" / "config.yaml").write_text(
        "split: train\ndata: {frames: 8, size: 32, num_videos: 2, num_val_videos: 1, seed: 0}\n")
    base = {"curation": str(tmp_path / "cur"), "val_fraction": 0.75, "router": {"preset": "debug"},
            "trainer": {"max_steps": 1, "batch_size": 1, "progress": False, "device": "cpu", "checkpoint_every": 0},
            "device": "cpu", "out_dir": str(tmp_path / "out")}
    data = {"frames": 4, "size": 16, "num_videos": 2, "num_val_videos": 1}
    cfg = from_dict(TrainRouterConfig, {**base, "data": {**data, "seed": 3}})
    with pytest.raises(ConfigError, match=r"the curation .* labelled other videos: data seed 0 there, 3 here"):
        run(cfg)
    # other frames and size, the same videos: past this check (to the val_fraction one)
    cfg = from_dict(TrainRouterConfig, {**base, "data": data})
    with pytest.raises(ConfigError, match=r"val_fraction 0.75"):
        run(cfg)


def test_held_out_videos_are_scored_on_the_curated_clips_not_random_starts(tmp_path, monkeypatch):
    """Found in a chain review: with val_fraction the held-out videos were read from the training
    dataset, whose file clips start at random (data.random_start: true, the default, as an
    augmentation of the router's training clips), while their rewards are those of the clips that
    `arvid curate` cut (fixed starts): the reward percentile scored the router's choice for another
    cut of each video."""
    import torch

    import arvid.stages.train_router as tr
    from arvid.config import save_config
    from arvid.data.datasets import DataConfig, build_dataset
    from arvid.stages.curate import CurateConfig
    from arvid.stages.data_cmd import synth

    synth(tmp_path / "vids", fmt="mp4", num=8, seed=1, frames=24, size=16)
    curated = DataConfig(source="folder", root=str(tmp_path / "vids"), frames=8, size=16, random_start=False)
    layout = BlockLayout((4, 4), (4, 8))
    A, n = layout.num_assignments, 8
    (tmp_path / "cur").mkdir()
    CurationRecords(layout, np.repeat(np.arange(n), A), np.tile(np.arange(A), n),
                    np.random.default_rng(0).random((n * A, 2)), np.arange(n), np.full(n, A),
                    "mse").save(tmp_path / "cur" / "curation.npz")
    write_json(tmp_path / "cur" / "stats.json", {
        "reward_stats": {"quality": "mse", "mean_distortion": 0.5, "std_distortion": 0.2, "mean_length": 12.0,
                         "std_length": 4.0, "num_samples": 8}, "w_q": 1.2, "w_l": 0.8, "quality": "mse"})
    save_config(CurateConfig(data=curated, tokenizer="proxy"), tmp_path / "cur" / "config.yaml")
    seen = {}
    evaluate = tr.evaluate_router

    def spy(router, dataset, records, *a, **kw):
        seen.update(dataset=dataset, videos=records.videos().tolist())
        return evaluate(router, dataset, records, *a, **kw)

    monkeypatch.setattr(tr, "evaluate_router", spy)
    run(from_dict(TrainRouterConfig, {
        "data": {"source": "folder", "root": str(tmp_path / "vids"), "frames": 8, "size": 16, "random_start": True},
        "curation": str(tmp_path / "cur"), "val_fraction": 0.25, "router": {"preset": "debug"},
        "trainer": {"max_steps": 2, "batch_size": 2, "progress": False, "device": "cpu", "checkpoint_every": 0},
        "device": "cpu", "out_dir": str(tmp_path / "out")}))
    assert seen["videos"] == [6, 7]
    cut = build_dataset(curated, "train")
    for i in seen["videos"]:
        assert torch.equal(seen["dataset"][i]["video"], cut[i]["video"])
