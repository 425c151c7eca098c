"""The synthetic clips: deterministic, varied in complexity, every class present and moving as named."""

import time

import pytest
import torch
import torch.nn.functional as F

from arvid.config import ConfigError, from_dict
from arvid.data.synthetic import (
    CLASS_NAMES,
    SyntheticConfig,
    SyntheticVideos,
    clip_complexity,
    temporal_energy,
)


@pytest.fixture(scope="module")
def sample(_one_thread):
    """256 clips of 16x32x32: their temporal energies and labels."""
    ds = SyntheticVideos(256, frames=16, size=32, seed=0)
    videos = torch.stack([ds[i]["video"] for i in range(len(ds))])  # [256, 3, 16, 32, 32]
    return ds, videos, temporal_energy(videos), torch.tensor([ds.label_of(i) for i in range(len(ds))])


def test_item_fields_shapes_and_range():
    ds = SyntheticVideos(12, frames=8, size=48, seed=3)
    item = ds[5]
    v = item["video"]
    assert v.shape == (3, 8, 48, 48) and v.dtype == torch.float32
    assert float(v.min()) >= -1.0 and float(v.max()) <= 1.0
    assert float(v.std()) > 0.05  # not a blank frame
    assert item["label"] == ds.label_of(5) == 5 % len(CLASS_NAMES)
    assert item["index"] == 5
    assert item["complexity"] == pytest.approx(clip_complexity(v))
    assert len(ds) == 12 and ds.num_classes == len(CLASS_NAMES) >= 8
    with pytest.raises(IndexError):
        ds[12]


def test_deterministic_per_seed_and_index():
    a, b = SyntheticVideos(10, 8, 32, seed=7), SyntheticVideos(10, 8, 32, seed=7)
    for i in (0, 3, 9):
        assert torch.equal(a[i]["video"], b[i]["video"])
    assert not torch.equal(a[1]["video"], a[2]["video"])
    assert not torch.equal(a[1]["video"], SyntheticVideos(10, 8, 32, seed=8)[1]["video"])
    # the same global index drawn through an offset dataset is the same clip
    shifted = SyntheticVideos(5, 8, 32, seed=7, index_offset=5)
    assert torch.equal(shifted[2]["video"], a[7]["video"]) and shifted.label_of(2) == a.label_of(7)


def test_any_resolution_draws_the_same_scene():
    lo, hi = SyntheticVideos(6, 8, 32, seed=1), SyntheticVideos(6, 8, 64, seed=1)
    for i in range(6):
        down = F.avg_pool3d(hi[i]["video"][None], (1, 2, 2))[0]  # 64 -> 32, [3, 8, 32, 32]
        assert float((lo[i]["video"] - down).abs().mean()) < 0.03


def test_every_class_appears_and_static_is_still(sample):
    ds, videos, energy, labels = sample
    assert set(labels.tolist()) == set(range(len(CLASS_NAMES)))
    static = CLASS_NAMES.index("static")
    assert torch.all(energy[labels == static] == 0)  # nothing moves at all
    for c, name in enumerate(CLASS_NAMES):
        if c != static:
            med = float(energy[labels == c].median())
            assert med > 1e-4, f"class {name} barely moves (median temporal energy {med})"


def test_complexity_spans_more_than_10x(sample):
    _, videos, energy, labels = sample
    moving = energy[energy > 0]
    assert len(moving) >= 200
    assert float(moving.max() / moving.min()) >= 10.0
    # and not only one outlier: the 90th percentile is 10x the 10th
    q = torch.quantile(moving, torch.tensor([0.1, 0.9]))
    assert float(q[1] / q[0]) >= 10.0


def test_motion_classes_differ(sample):
    """Sprites that stay in place (zoom, rotate, blink, color_cycle) vs the whole scene moving (pan)."""
    _, videos, energy, labels = sample
    mean = {n: float(energy[labels == c].mean()) for c, n in enumerate(CLASS_NAMES)}
    assert mean["pan"] > mean["blink"] and mean["pan"] > mean["color_cycle"]
    assert mean["linear"] > mean["color_cycle"]


def test_rotate_keeps_centroid_linear_moves_it():
    ds = SyntheticVideos(40, 16, 32, seed=2, config=SyntheticConfig(max_objects=1, textured_background_prob=0.0,
                                                                     min_speed=0.02, max_speed=0.03))

    def centroid_shift(video):
        diff_from_bg = (video - video[:, :, :1, :1]).abs().sum(0)  # [T, H, W] sprite mass (flat background)
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        m = diff_from_bg.sum((1, 2))
        cx = (diff_from_bg * xs).sum((1, 2)) / m
        cy = (diff_from_bg * ys).sum((1, 2)) / m
        return float(((cx[-1] - cx[0]) ** 2 + (cy[-1] - cy[0]) ** 2).sqrt())

    rot = [i for i in range(40) if CLASS_NAMES[ds.label_of(i)] == "rotate"]
    bounce = [i for i in range(40) if CLASS_NAMES[ds.label_of(i)] == "bounce"]
    assert all(centroid_shift(ds[i]["video"]) < 1.0 for i in rot)
    assert all(centroid_shift(ds[i]["video"]) > 2.0 for i in bounce)


def test_config_validation_and_from_dict():
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticConfig(max_objects=0)
    with pytest.raises(ConfigError, match="min_speed"):
        from_dict(SyntheticConfig, {"min_speed": 0.5, "max_speed": 0.1})
    with pytest.raises(ValueError, match="frames"):
        SyntheticVideos(4, frames=0)
    with pytest.raises(ValueError, match="min_radius"):
        SyntheticConfig(min_radius=0.2, max_radius=0.1)
    with pytest.raises(ConfigError, match="max_radius"):
        from_dict(SyntheticConfig, {"max_radius": 0.6})
    cfg = SyntheticConfig(max_objects=1, textured_background_prob=0.0, textured_sprite_prob=0.0)
    simple = SyntheticVideos(64, 8, 32, seed=0, config=cfg)
    busy = SyntheticVideos(64, 8, 32, seed=0, config=SyntheticConfig(textured_background_prob=1.0))
    c_simple = sum(simple[i]["complexity"] for i in range(20))
    c_busy = sum(busy[i]["complexity"] for i in range(20))
    assert c_busy > 3 * c_simple


def test_radius_range_sets_sprite_size():
    # one flat sprite on a flat background, in the static clips (every 10th): its area scales with radius^2
    def covered(r):
        cfg = SyntheticConfig(max_objects=1, min_radius=r, max_radius=r, textured_background_prob=0.0,
                              textured_sprite_prob=0.0)
        ds = SyntheticVideos(80, 2, 64, seed=0, config=cfg)
        frames = torch.stack([ds[i]["video"][:, 0] for i in range(0, 80, 10)])  # [8, 3, 64, 64]
        bg = frames[:, :, :1, :1]  # a corner pixel: the sprite lies inside [r, 1 - r], off the corner
        return float(((frames - bg).abs().amax(1) > 0.05).float().mean())

    small, large = covered(0.1), covered(0.3)
    assert 0.01 < small < large and 5.0 < large / small < 12.0  # (0.3 / 0.1)^2 = 9


def test_throughput_sanity():
    """The real target (>= 200 clips/s of 16x64x64 on one free core) is measured outside CI;
    here a loose bound that still catches an accidental 10x slowdown on a loaded 2-core box."""
    ds = SyntheticVideos(64, 16, 64, seed=0)
    ds[0]
    t = time.perf_counter()
    for i in range(64):
        ds[i]
    assert 64 / (time.perf_counter() - t) > 25


def test_data_synth_refuses_a_size_below_4_as_a_flag_error(capsys, tmp_path):
    """`arvid data synth --size 2` passed the flag's check (>= 1) and failed later with "size must be
    >= 4 pixels", naming no flag; the flag now asks for 4 and argparse names it."""
    from arvid.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["data", "synth", str(tmp_path / "s"), "--size", "2"])
    assert e.value.code == 2
    assert "argument --size: expected an integer >= 4, got 2" in capsys.readouterr().err
    assert build_parser().parse_args(["data", "synth", str(tmp_path / "s"), "--size", "4"]).size == 4


def test_data_synth_counts_the_classes_it_wrote(capsys, tmp_path):
    """`arvid data synth --num 3` printed "10 classes" where it wrote 3 (and `data index` found 3)."""
    from arvid.cli import main

    assert main(["data", "synth", str(tmp_path / "s"), "--format", "gif", "--num", "3", "--frames", "2",
                 "--size", "8"]) == 0
    assert "wrote 3 new clips (3 in all, 3 classes)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == ["00_static", "01_linear", "02_bounce"]
