"""Bad video files and lists: a clear error naming the file, or a counted skip; never a crash deep
in a kernel. Corrupt, empty, zero-frame, single-frame, grayscale, odd-sized, huge-resolution and
variable-frame-rate files are written with PyAV here.
"""

from __future__ import annotations

import csv
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from arvid.data.files import BadVideoError, ClipConfig, VideoFileDataset, decode_clip


def write_av(path: Path, frames: list[np.ndarray], pts_ms: list[int] | None = None, pix_fmt: str = "yuv420p",
             codec: str = "libx264", fmt: str = "rgb24", rate: int = 10) -> Path:
    """Encode ``frames`` (uint8 [H, W, C]) with PyAV; ``pts_ms``: explicit (irregular) time stamps in ms."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = frames[0].shape[1], frames[0].shape[0] if frames else (16, 16)
        s.pix_fmt = pix_fmt
        if codec == "libx264":
            s.options = {"crf": "0"}
        if pts_ms is not None:
            s.time_base = Fraction(1, 1000)
            s.codec_context.time_base = Fraction(1, 1000)
        for i, fr in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(fr, format=fmt)
            if pts_ms is not None:
                vf.pts = pts_ms[i]
                vf.time_base = Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def flat(v: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.full((h, w, 3), v, np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    good = write_av(d / "good.mp4", [flat(40 + 20 * i) for i in range(8)])
    corrupt = d / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    zero = d / "zero.mp4"
    with av.open(str(zero), "w") as c:  # a container with a video stream and no frames
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
    truncated = d / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    single = write_av(d / "single.mp4", [flat(200)])
    gray = write_av(d / "gray.mkv", [np.full((20, 24), 30 * i, np.uint8) for i in range(6)], codec="ffv1",
                    pix_fmt="gray", fmt="gray")
    odd = write_av(d / "odd.mkv", [np.full((23, 37, 3), 10 * i, np.uint8) for i in range(5)], codec="ffv1",
                   pix_fmt="yuv444p")
    huge = write_av(d / "huge.mp4", [np.full((1080, 1920, 3), 100 + 50 * i, np.uint8) for i in range(3)])
    # variable frame rate: frame i (value 10 + 30 i) shown at irregular times
    vfr = write_av(d / "vfr.mp4", [flat(10 + 30 * i) for i in range(7)], pts_ms=[0, 100, 150, 500, 550, 600, 1000])
    return dict(good=good, corrupt=corrupt, empty=empty, zero=zero, truncated=truncated, single=single, gray=gray,
                odd=odd, huge=huge, vfr=vfr)


@pytest.mark.parametrize("name", ["corrupt", "empty", "zero"])
def test_undecodable_files_raise_bad_video_error_naming_the_file(files, name):
    with pytest.raises(BadVideoError, match=rf"{name}\.mp4"):
        decode_clip(files[name], frames=8, size=16)


def _prefix_then_repeat(clip: np.ndarray, values: list[int]) -> int:
    """Asserts each frame of ``clip`` is flat at values[0], values[1], ... up to some frame n, and
    repeats frame n - 1 after it (past the end of what could be decoded); returns n."""
    got = clip.reshape(clip.shape[0], -1).mean(1)
    n = 1
    while n < len(got) and n < len(values) and abs(got[n] - values[n]) <= 3 and abs(got[n] - got[n - 1]) > 3:
        n += 1
    np.testing.assert_allclose(got[:n], values[:n], atol=3)
    assert (clip[n:] == clip[n - 1]).all(), got
    return n


def test_truncated_file_gives_the_frames_before_the_cut_or_a_clear_error(files, tmp_path):
    values = [40 + 20 * i for i in range(8)]  # the frames of "good", which "truncated" cuts
    try:
        clip = decode_clip(files["truncated"], frames=8, size=16)
    except BadVideoError as e:  # mp4 keeps its index at the end: the cut loses it
        assert "truncated.mp4" in str(e)
    else:
        assert clip.shape == (8, 16, 16, 3) and clip.dtype == np.uint8
        _prefix_then_repeat(clip, values)
    # a streamable container (mkv, intra-only ffv1) cut at 70%: the frames before the cut come back,
    # then the last of them repeats
    mkv = write_av(tmp_path / "good.mkv", [flat(v) for v in values], codec="ffv1", pix_fmt="yuv444p")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: len(mkv.read_bytes()) * 7 // 10])
    clip = decode_clip(cut, frames=8, size=16)
    assert clip.shape == (8, 16, 16, 3) and clip.dtype == np.uint8
    assert 2 <= _prefix_then_repeat(clip, values) < 8


def test_degenerate_but_valid_files_decode_to_the_requested_shape(files):
    single = decode_clip(files["single"], frames=8, size=16)
    assert single.shape == (8, 16, 16, 3)
    assert (single == single[0]).all() and abs(int(single.mean()) - 200) <= 3  # the one frame repeats
    gray = decode_clip(files["gray"], frames=6, size=16)
    assert gray.shape == (6, 16, 16, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()  # gray -> equal RGB
    np.testing.assert_allclose(gray.reshape(6, -1).mean(1), [30 * i for i in range(6)], atol=3)
    odd = decode_clip(files["odd"], frames=5, size=16)
    assert odd.shape == (5, 16, 16, 3)
    np.testing.assert_allclose(odd.reshape(5, -1).mean(1), [10 * i for i in range(5)], atol=3)
    huge = decode_clip(files["huge"], frames=8, size=32)
    assert huge.shape == (8, 32, 32, 3)
    np.testing.assert_allclose(huge.reshape(8, -1).mean(1)[:3], [100, 150, 200], atol=4)
    assert (huge[3:] == huge[2]).all()  # past the end the last frame repeats


def test_variable_frame_rate_is_sampled_by_time(files):
    """At 10 fps of video time, output frame k is the last frame shown at or before k * 100 ms."""
    clip = decode_clip(files["vfr"], frames=11, size=16, fps=10)
    got = np.rint((clip.reshape(11, -1).mean(1) - 10) / 30).astype(int).tolist()
    pts = [0, 100, 150, 500, 550, 600, 1000]
    want = [max(i for i, t in enumerate(pts) if t <= 100 * k + 1) for k in range(11)]
    assert got[0] == 0 and got[-1] == 6 and got == sorted(got)
    # away from the time stamps (the decoder allows half a frame of tolerance) the frame is exact
    exact = [k for k in range(11) if all(abs(100 * k - t) >= 60 for t in pts[1:])]
    assert exact and [got[k] for k in exact] == [want[k] for k in exact], (got, want)


def test_dataset_skips_and_counts_bad_files_or_raises(files, tmp_path):
    paths = [files[n] for n in ("good", "corrupt", "single", "empty", "zero", "gray", "odd", "huge", "vfr")]
    clip = ClipConfig(frames=8, size=16, random_start=False)
    ds = VideoFileDataset([str(p) for p in paths], list(range(len(paths))), [f"c{i}" for i in range(len(paths))],
                          clip=clip)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        v = it["video"]
        assert v.shape == (3, 8, 16, 16) and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert v.min() >= -1 and v.max() <= 1
    # the bad files at 1, 3, 4 are replaced by the next readable video, and counted
    assert [it["index"] for it in items] == [0, 2, 2, 5, 5, 5, 6, 7, 8]
    assert ds.num_skipped == 3
    strict = VideoFileDataset([str(p) for p in paths], list(range(len(paths))), [f"c{i}" for i in range(len(paths))],
                              clip=ClipConfig(frames=8, size=16, random_start=False, on_bad_video="error"))
    with pytest.raises(BadVideoError, match="corrupt.mp4"):
        strict[1]
    all_bad = VideoFileDataset([str(files["corrupt"]), str(files["empty"])], [0, 0], ["c"], clip=clip)
    with pytest.raises(BadVideoError, match="all 2 videos"):
        all_bad[0]


def _csv(path: Path, rows: list[tuple[str, int]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


def test_csv_list_with_missing_files(files, tmp_path):
    from arvid.data.datasets import DataConfig, build_dataset

    lst = _csv(tmp_path / "list.csv", [(str(files["good"]), 0), (str(tmp_path / "gone.mp4"), 1),
                                       (str(files["single"]), 1), (str(tmp_path / "gone2.mp4"), 0)])
    cfg = DataConfig(source="csv", root=str(lst), frames=8, size=16, random_start=False)
    with pytest.raises(FileNotFoundError, match=r"(?s)lists 2 file\(s\) that do not exist.*gone\.mp4.*gone2\.mp4"):
        build_dataset(cfg, "train")
    ds = build_dataset(DataConfig(source="csv", root=str(lst), frames=8, size=16, random_start=False,
                                  on_missing_file="skip"), "train")
    assert len(ds) == 2 and ds.num_skipped == 2
    assert ds[1]["video"].shape == (3, 8, 16, 16)
    none = _csv(tmp_path / "none.csv", [(str(tmp_path / "x.mp4"), 0)])
    with pytest.raises(FileNotFoundError, match="none of the files"):
        build_dataset(DataConfig(source="csv", root=str(none), on_missing_file="skip"), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(source="csv", root=str(tmp_path / "nolist.csv")), "train")
    (tmp_path / "bad_header.csv").write_text("file,cls\na.mp4,0\n")
    with pytest.raises(ValueError, match="must name a `path` column"):
        build_dataset(DataConfig(source="csv", root=str(tmp_path / "bad_header.csv")), "train")
    neg = _csv(tmp_path / "neg.csv", [(str(files["good"]), -3)])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        build_dataset(DataConfig(source="csv", root=str(neg)), "train")
