"""Video-file datasets: synth -> files -> dataset round trip, bad files, CSV lists, odd inputs, clip sampling."""

import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from arvid.data.files import BadVideoError, ClipConfig, VideoFileDataset, decode_clip, read_csv_list
from arvid.data.synthetic import SyntheticVideos
from arvid.stages.data_cmd import synth

N, T, S = 20, 8, 32


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    res = synth(out, fmt="mp4", num=N, seed=4, frames=T, size=S)
    assert res["written"] == N
    return out


def fixed(**kw):
    return ClipConfig(frames=T, size=S, random_start=False, **kw)


def write_raw(path, frames, pts=None, pix_fmt="gray", rate=10):
    """Lossless (ffv1) video of ``frames`` uint8 [T, H, W] (gray) or [T, H, W, 3]; ``pts`` in ms if given."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=rate)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if pts is not None:
            s.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="gray" if f.ndim == 2 else "rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_mpeg4(path, images, rate=10, bit_rate=None, **codec):
    """MPEG-4 video of ``images`` (uint8 [H, W, 3] each) in the container ``path``'s suffix names;
    ``codec``: codec-context settings (``max_b_frames``, ``gop_size``, ``sample_aspect_ratio``)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.height, s.width = images[0].shape[:2]
        s.pix_fmt = "yuv420p"
        if bit_rate:
            s.bit_rate = bit_rate
        for k, v in codec.items():
            setattr(s.codec_context, k, v)
        for img in images:
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def test_synth_folder_and_csv_read_back(synth_dir):
    ref = SyntheticVideos(N, T, S, seed=4)
    folder = VideoFileDataset.from_folder(synth_dir, clip=fixed())
    listed = VideoFileDataset.from_csv(synth_dir / "list.csv", clip=fixed())
    assert len(folder) == len(listed) == N
    assert folder.class_names[3] == "03_circular" and listed.num_classes == folder.num_classes == 10
    by_path = {p: lab for p, lab in zip(listed.paths, listed.labels)}
    for i in range(N):
        assert by_path[folder.paths[i]] == folder.labels[i]  # folder and CSV agree
        j = int(folder.paths[i].rsplit("/", 1)[1][:6])
        assert folder.labels[i] == ref.label_of(j)  # and both match the synthetic labels
    for i in (0, 7, 13):
        item = listed[i]
        assert item["video"].shape == (3, T, S, S) and item["video"].dtype == torch.float32
        assert item["label"] == ref.label_of(i) and item["index"] == i
        assert float((item["video"] - ref[i]["video"]).abs().mean()) < 0.06  # lossy codec, same clip
    assert folder.num_skipped == 0


def test_synth_is_resumable(synth_dir):
    before = (synth_dir / "00_static" / "000000.mp4").stat().st_mtime_ns
    res = synth(synth_dir, fmt="mp4", num=N, seed=4, frames=T, size=S)
    assert res["written"] == 0
    assert (synth_dir / "00_static" / "000000.mp4").stat().st_mtime_ns == before
    # other settings over these clips are refused, naming them (before 2026-12-07 the old clips were
    # kept and list.csv described the new settings)
    with pytest.raises(ValueError, match=r"made with other settings \(seed, size changed\)"):
        synth(synth_dir, fmt="mp4", num=N, seed=1, frames=T, size=64)
    assert (synth_dir / "00_static" / "000000.mp4").stat().st_mtime_ns == before


def test_truncated_and_empty_files_are_skipped_and_counted(synth_dir, tmp_path, caplog):
    root = tmp_path / "d"
    shutil.copytree(synth_dir, root)
    victim = root / "02_bounce" / "000002.mp4"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    (root / "05_rotate" / "000005.mp4").write_bytes(b"")
    ds = VideoFileDataset.from_folder(root, clip=fixed())
    bad = [ds.paths.index(str(victim)), ds.paths.index(str(root / "05_rotate" / "000005.mp4"))]
    with caplog.at_level("WARNING"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2
    assert sum("000002.mp4" in r.getMessage() for r in caplog.records) == 1  # one warning line per file
    for b in bad:
        assert items[b]["index"] != b and items[b]["index"] not in bad  # replaced by a readable video
        assert items[b]["index"] == (b + 1) % len(ds) or (b + 1) % len(ds) in bad
    ds[bad[0]]  # met again: not counted twice
    assert ds.num_skipped == 2
    assert VideoFileDataset.from_folder(root, clip=fixed()).scan() == 2

    strict = VideoFileDataset.from_folder(root, clip=fixed(on_bad_video="error"))
    with pytest.raises(BadVideoError, match="000002.mp4"):
        strict[bad[0]]


def test_csv_with_missing_file_names_it(synth_dir, tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(f"path,label\n{synth_dir}/00_static/000000.mp4,0\nnot/there.mp4,1\ngone.mp4,2\n")
    with pytest.raises(FileNotFoundError, match=r"(?s)2 file\(s\).*not/there.mp4.*gone.mp4") as e:
        VideoFileDataset.from_csv(csv_path)
    assert str(tmp_path) in str(e.value)  # says where relative paths were resolved
    ds = VideoFileDataset.from_csv(csv_path, on_missing="skip", clip=fixed())
    assert len(ds) == 1 and ds.num_skipped == 2 and ds[0]["label"] == 0


def test_csv_with_a_byte_order_mark_reads_its_header(synth_dir, tmp_path):
    """A CSV saved by a spreadsheet starts with a UTF-8 BOM: its first column was `\ufeffpath`, refused
    as a header without a `path` column."""
    csv_path = tmp_path / "list.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + f"path,label\n{synth_dir}/00_static/000000.mp4,3\n".encode())
    paths, labels, _, missing = read_csv_list(csv_path)
    assert paths == [f"{synth_dir}/00_static/000000.mp4"] and labels == [3] and missing == 0


def test_csv_relative_paths_string_labels_and_split_column(synth_dir, tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    rel = "../" + synth_dir.name
    shutil.copytree(synth_dir, tmp_path / synth_dir.name)
    (sub / "l.csv").write_text(
        "path,label,split\n"
        f"{rel}/01_linear/000001.mp4,walk,train\n{rel}/02_bounce/000002.mp4,run,train\n"
        f"{rel}/03_circular/000003.mp4,walk,test\n")
    paths, labels, names, missing = read_csv_list(sub / "l.csv", split="train")
    assert names == ["run", "walk"] and labels == [1, 0] and missing == 0
    paths, labels, names, _ = read_csv_list(sub / "l.csv", split="val")  # val falls back to test rows
    assert len(paths) == 1 and paths[0].endswith("000003.mp4")
    # the held-out rows name only `walk`: it keeps its index in the whole list (1), not 0
    assert names == ["run", "walk"] and labels == [1]
    # an unlabelled split beside labelled ones: int labels stay ints; its own rows are refused
    rows = "".join(f"{rel}/01_linear/000001.mp4,{i},train\n" for i in range(12))
    (sub / "blank.csv").write_text(f"path,label,split\n{rows}{rel}/03_circular/000003.mp4,,test\n")
    paths, labels, names, _ = read_csv_list(sub / "blank.csv", split="train")
    assert labels == list(range(12)) and names == [str(i) for i in range(12)]
    with pytest.raises(ValueError, match=r"1 row\(s\) of split 'test' have no label"):
        read_csv_list(sub / "blank.csv", split="test")
    (sub / "none.csv").write_text(f"path,split\n{rel}/01_linear/000001.mp4,train\n")  # no labels at all
    assert read_csv_list(sub / "none.csv", split="train")[1:3] == ([0], [""])
    (sub / "extra.csv").write_text("path,label\na,b.mp4,0\n")  # an unquoted comma in a path
    with pytest.raises(ValueError, match=r"extra.csv' line 2: 3 fields, the header names 2 \(path, label\)"):
        read_csv_list(sub / "extra.csv")
    with pytest.raises(ValueError, match="`path` column"):
        (sub / "bad.csv").write_text("file,label\nx.mp4,0\n")
        read_csv_list(sub / "bad.csv")


def test_grayscale_odd_sized_video(tmp_path):
    frames = np.stack([np.full((23, 37), 40 * t, np.uint8) for t in range(5)])  # gray, odd W and H
    frames[:, :, :5] = 255  # a white band at the left edge
    write_raw(tmp_path / "g.mkv", frames)
    clip = decode_clip(tmp_path / "g.mkv", frames=5, size=16)
    assert clip.shape == (5, 16, 16, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip[..., 0], clip[..., 1]) and np.array_equal(clip[..., 1], clip[..., 2])
    # short side 23 -> 16, width 37 -> 26, centre crop drops 5 columns per side: the band is cut away
    assert abs(int(clip[3, 8, 8, 0]) - 120) <= 2 and clip[:, :, 0].max() < 255


def test_large_resolution_is_resized(tmp_path):
    f = np.zeros((2, 720, 1280, 3), np.uint8)
    f[:, :, :640] = 250  # left half bright
    write_raw(tmp_path / "big.mkv", f, pix_fmt="yuv444p")
    clip = decode_clip(tmp_path / "big.mkv", frames=2, size=32)
    assert clip.shape == (2, 32, 32, 3)
    assert clip[:, :, :14].mean() > 200 and clip[:, :, 18:].mean() < 30


def test_short_clip_padded_with_last_frame_and_stride(tmp_path):
    frames = np.stack([np.full((8, 8), 20 * t, np.uint8) for t in range(5)])
    write_raw(tmp_path / "s.mkv", frames)
    clip = decode_clip(tmp_path / "s.mkv", frames=8, size=8)
    assert [int(v) for v in clip[:, 4, 4, 0]] == [0, 20, 40, 60, 80, 80, 80, 80]
    clip = decode_clip(tmp_path / "s.mkv", frames=3, size=8, frame_stride=2)
    assert [int(v) for v in clip[:, 4, 4, 0]] == [0, 40, 80]


def test_variable_frame_rate_samples_by_time(tmp_path):
    pts = [0, 100, 150, 400, 450, 800]  # ms: irregular gaps
    frames = np.stack([np.full((8, 8), 30 * t, np.uint8) for t in range(len(pts))])
    write_raw(tmp_path / "v.mkv", frames, pts=pts)
    clip = decode_clip(tmp_path / "v.mkv", frames=5, size=8, fps=5)  # t = 0, 200, 400, 600, 800 ms
    # each output is the last frame at or before its time (within half a source frame)
    assert [int(v) // 30 for v in clip[:, 4, 4, 0]] == [0, 2, 3, 4, 5]


def test_random_start_and_flip_are_seeded(tmp_path):
    frames = np.stack([np.tile(np.arange(16, dtype=np.uint8) * 10 + t, (16, 1)) for t in range(40)])
    (tmp_path / "a").mkdir()
    write_raw(tmp_path / "a" / "x.mkv", frames)
    ds = VideoFileDataset.from_folder(tmp_path, clip=ClipConfig(frames=4, size=16, random_start=True, flip=True),
                                      seed=1)
    firsts, flips = [], []
    for epoch in range(8):
        ds.set_epoch(epoch)
        a, b = ds[0]["video"], ds[0]["video"]
        assert torch.equal(a, b)  # same (seed, epoch, index): same clip
        left = to_uint8(a)[:, 0, 0, 0]  # [4] left column per frame: 10*0 + t, or 150 + t if flipped
        flipped = bool(left[0] >= 150)
        flips.append(flipped)
        t = (left - 150 if flipped else left).tolist()
        assert t == [t[0], t[0] + 1, t[0] + 2, t[0] + 3]  # consecutive frames, also after a seek
        firsts.append(t[0])
    # 40 frames at 10 fps: starts spread over 0..36 (starts past 1 s seek instead of decoding from 0)
    assert len(set(firsts)) > 3 and all(0 <= f <= 36 for f in firsts) and max(firsts) > 10
    assert any(flips) and not all(flips)
    fixed_ds = VideoFileDataset.from_folder(tmp_path, clip=ClipConfig(frames=4, size=16, random_start=False))
    assert to_uint8(fixed_ds[0]["video"])[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


def to_uint8(video):
    """float [3, T, H, W] -> int [T, H, W, 3] pixel values."""
    return ((video + 1) * 127.5).round().long().permute(1, 2, 3, 0)


def test_file_cut_mid_stream_keeps_the_frames_before_the_cut(tmp_path):
    frames = np.stack([np.full((16, 16), 10 * t, np.uint8) for t in range(20)])
    frames[:, ::2] += 3  # some texture so frames are not tiny
    write_raw(tmp_path / "c.mkv", frames)
    data = (tmp_path / "c.mkv").read_bytes()
    (tmp_path / "c.mkv").write_bytes(data[: len(data) // 2])
    clip = decode_clip(tmp_path / "c.mkv", frames=20, size=16)
    got = [int(v) // 10 for v in clip[:, 1, 1, 0]]
    cut = got.index(got[-1])
    assert 3 <= cut < 19 and got[:cut + 1] == list(range(cut + 1))  # the frames before the cut, in order
    assert got[cut:] == [got[-1]] * (20 - cut)  # then the last one repeats


def test_shared_scaler_gives_the_pixels_of_a_fresh_one_across_geometries(tmp_path):
    """decode_clip keeps one FFmpeg scaler per thread across frames and files (a fresh one per
    frame was half the decode time); files of other sizes and pixel formats in between must get
    exactly what a fresh scaler gives."""
    from arvid.data.files import _resize_crop

    rng = np.random.default_rng(0)
    files = []
    for i, (shape, fmt) in enumerate([((3, 48, 80, 3), "yuv420p"), ((3, 60, 34, 3), "yuv444p"),
                                      ((3, 23, 37), "gray"), ((3, 48, 80, 3), "yuv420p")]):
        write_raw(tmp_path / f"v{i}.mkv", rng.integers(0, 256, shape, dtype=np.uint8), pix_fmt=fmt)
        files.append(tmp_path / f"v{i}.mkv")
    for size in (16, 32):
        for path in files:
            with av.open(str(path)) as c:
                for frame in c.decode(video=0):
                    w, h = frame.width, frame.height
                    nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
                    fresh = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="AREA").to_ndarray()
                    y0, x0 = (nh - size) // 2, (nw - size) // 2
                    assert np.array_equal(_resize_crop(frame, size), fresh[y0:y0 + size, x0:x0 + size]), (path, size)


def test_decoding_in_a_forked_worker_after_the_parent_decoded(tmp_path):
    """The per-thread scaler must not cross a fork: reused in the child it hangs (FFmpeg's scaler
    threads stay in the parent). The parent decodes first, then DataLoader workers (fork) decode."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    frames = np.random.default_rng(1).integers(0, 256, (4, 48, 80, 3), dtype=np.uint8)
    write_raw(tmp_path / "v.mkv", frames, pix_fmt="yuv420p")
    parent = decode_clip(tmp_path / "v.mkv", frames=4, size=32)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        res = pool.apply_async(decode_clip, (tmp_path / "v.mkv",), {"frames": 4, "size": 32})
        child = res.get(timeout=60)  # hung before the fix
    assert np.array_equal(parent, child)


def test_fork_while_another_thread_holds_a_scaler(tmp_path):
    """A live thread that decoded holds its own scaler; a fork must not free it in the child
    (freeing waits on scaler threads that do not exist there: the child hung inside fork)."""
    import multiprocessing
    import threading

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    frames = np.random.default_rng(2).integers(0, 256, (4, 48, 80, 3), dtype=np.uint8)
    write_raw(tmp_path / "v.mkv", frames, pix_fmt="yuv420p")
    decoded, stop = threading.Event(), threading.Event()

    def worker():
        decode_clip(tmp_path / "v.mkv", frames=4, size=32)
        decoded.set()
        stop.wait(60)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert decoded.wait(30)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(decode_clip, (tmp_path / "v.mkv",), {"frames": 4, "size": 32}).get(timeout=60)
        assert np.array_equal(child, decode_clip(tmp_path / "v.mkv", frames=4, size=32))
    finally:
        stop.set()
        t.join()


class _ThreadsSeen(torch.utils.data.Dataset):
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 2

    def __getitem__(self, i):
        from arvid.data import files

        seen = []
        real = files._tolerant_decode

        def spy(container, stream, *a, **k):  # the thread count decode_clip gave the stream
            seen.append(stream.thread_count)
            return real(container, stream, *a, **k)

        files._tolerant_decode = spy
        try:
            clip = files.decode_clip(self.path, frames=T, size=S)
        finally:
            files._tolerant_decode = real
        return {"threads": seen[0], "clip": torch.from_numpy(clip)}


def test_decoder_threads_one_per_worker_and_the_same_frames(synth_dir):
    """Inside DataLoader workers the FFmpeg decoder runs one thread (the workers are the
    parallelism); in the main process FFmpeg picks. The decoded frames do not depend on it."""
    from arvid.data.files import decoder_threads

    path = sorted(synth_dir.glob("**/*.mp4"))[0]
    assert decoder_threads() == 0
    main = _ThreadsSeen(path)[0]
    assert main["threads"] == 0
    got = list(torch.utils.data.DataLoader(_ThreadsSeen(path), batch_size=None, num_workers=1))
    assert [g["threads"] for g in got] == [1, 1]
    assert all(torch.equal(g["clip"], main["clip"]) for g in got)


def _write_h264(path, frames, pts_ms):
    """H.264 with B-frames (x264 defaults) of ``frames`` uint8 [T, H, W, 3] at times ``pts_ms``."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.time_base = Fraction(1, 1000)
        s.codec_context.time_base = Fraction(1, 1000)
        for f, t in zip(frames, pts_ms):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = int(t), Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_skipping_non_reference_frames_before_the_clip_gives_the_frames_of_a_full_decode(tmp_path, monkeypatch):
    """Non-reference frames before the clip are not decoded (skip_frame NONREF); the clips equal a
    full decode's for every start, also where a gap in the time stamps puts a skipped frame first
    (the clip is then decoded again without skipping)."""
    from arvid.data import files

    if "libx264" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx264 (no B-frames to skip)")
    g = np.random.default_rng(0)
    frames = np.clip(np.cumsum(g.integers(-12, 13, (96, 32, 48, 3)), axis=0) + 128, 0, 255).astype(np.uint8)
    steady = tmp_path / "steady.mp4"
    _write_h264(steady, frames, np.arange(96) * 40)
    gappy = tmp_path / "gappy.mp4"  # 25 fps with two 1-s holes: a target can fall long after its frame
    pts = np.arange(96) * 40 + np.where(np.arange(96) >= 30, 1000, 0) + np.where(np.arange(96) >= 60, 1000, 0)
    _write_h264(gappy, frames, pts)
    with av.open(str(steady)) as c:
        c.streams.video[0].codec_context.skip_frame = "NONREF"
        assert len(list(c.decode(video=0))) < 80  # the file has frames to skip (of 96)
    retries = []
    plain = files._decode_clip

    def counted(*a, skip_nonref, **k):
        try:
            return plain(*a, skip_nonref=skip_nonref, **k)
        except files._SkippedTooMuch:
            retries.append(a[0])
            raise

    monkeypatch.setattr(files, "_decode_clip", counted)
    for path in (steady, gappy):
        for u in np.linspace(0, 1, 23):
            for stride in (1, 3):
                full = plain(path, 8, 16, stride, None, float(u), False, skip_nonref=False)
                assert np.array_equal(files.decode_clip(path, 8, 16, stride, start_fraction=float(u)), full), (path, u)
    assert str(gappy) in map(str, retries) and str(steady) not in map(str, retries)


def test_b_frame_avi_whose_first_frame_shows_after_the_stream_start(tmp_path):
    """MPEG-4 with B-frames in AVI: the stream starts at time 0 (the first decode time) but the first
    frame's pts is one interval later. The clip starts at that first frame; before 2026-12-06 frame
    0 filled targets 0 and 1 and every later frame came one place late."""
    import av

    path = tmp_path / "b.avi"
    write_mpeg4(path, [np.full((32, 32, 3), 20 * t, np.uint8) for t in range(12)], max_b_frames=2)
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        first = next(iter(c.decode(st)))
        assert st.start_time == 0 and first.pts == 1  # the case: the first frame after the start
    clip = decode_clip(path, frames=6, size=16)
    got = [int(x[8, 8, 0]) for x in clip]
    assert all(abs(g - 20 * t) <= 3 for t, g in enumerate(got)), got


def test_b_frame_avi_random_starts_give_consecutive_frames(tmp_path):
    """A seek in AVI goes by decode time and can land on a keyframe shown after the clip's start
    (the B-frames before it cannot be decoded): that keyframe then filled the first 2-4 targets
    (before 2026-12-06, 139 of 201 start fractions). A seek that lands late is retried further back."""

    def img(t):
        a = np.zeros((32, 32, 3), np.uint8)
        a[:, :16], a[:, 16:] = 20 * (t % 12), 20 * (t // 12)
        return a

    def index(x):  # the frame number a decoded 16x16 frame shows
        return int(round(x[8, 3, 0] / 20)) + 12 * int(round(x[8, 12, 0] / 20))

    path = tmp_path / "gop.avi"
    write_mpeg4(path, [img(t) for t in range(80)], bit_rate=4_000_000, max_b_frames=2, gop_size=6)
    from arvid.data import files

    bad, shifted = [], []
    for u in np.linspace(0, 1, 41):
        got = [index(x) for x in decode_clip(path, frames=8, size=16, start_fraction=float(u))]
        if not all(np.diff(got) == 1):
            bad.append((round(float(u), 3), got))
        # a seeked clip starts where decoding from the start puts it (before 2026-12-07 the seeked
        # clips, starts past 1 s, came one frame early: their origin was the stream start, not the
        # first frame shown one interval later)
        full = [index(x) for x in files._decode_clip(path, 8, 16, 1, None, float(u), False, skip_nonref=False,
                                                     seek_back=None)]
        if got != full:
            shifted.append((round(float(u), 3), got[0], full[0]))
    assert not bad, bad
    assert not shifted, shifted
    assert got == list(range(72, 80))  # u = 1: the clip ends on the last frame


def test_frames_without_time_stamps_are_counted_from_the_first_not_the_seek(tmp_path, monkeypatch):
    """A frame without a time stamp after a seek was counted from the stream's start (before
    2026-12-07: the clip came from wherever the seek landed). Such a clip is now decoded from the
    start and gives the frames of a file with time stamps."""
    from arvid.data import files

    path = tmp_path / "v.mkv"
    write_mpeg4(path, [np.full((32, 32, 3), 6 * t, np.uint8) for t in range(40)], gop_size=5)
    timed = [decode_clip(path, frames=6, size=16, start_fraction=u) for u in (0.0, 0.5, 1.0)]
    starts = [int(x[0, 8, 8, 0]) for x in timed]
    assert starts[0] < 3 and 6 * 12 < starts[1] < starts[2]  # u = 0.5 and 1 start past 1 s: they seek

    def no_times(frames):  # decoded frames whose time stamps are missing
        for f in frames:
            f.pts = None
            yield f

    real, seeks = files._tolerant_decode, []
    monkeypatch.setattr(files, "_tolerant_decode", lambda *a, **k: no_times(real(*a, **k)))
    real_seek = av.container.InputContainer.seek
    monkeypatch.setattr(av.container.InputContainer, "seek",
                        lambda self, *a, **k: (seeks.append(a), real_seek(self, *a, **k))[1])
    untimed = [decode_clip(path, frames=6, size=16, start_fraction=u) for u in (0.0, 0.5, 1.0)]
    assert seeks  # the seek was tried, then given up for a decode from the start
    for a, b in zip(timed, untimed):
        assert np.array_equal(a, b)


def test_class_folders_are_numbered_as_ucf101_numbers_its_classes(tmp_path):
    """Code-point order put HammerThrow (official 35) before Hammering (34) and JumpRope (47) before
    JumpingJack (46); class names now sort case-insensitively, as UCF-101's classInd.txt."""
    from arvid.data.files import folder_class_names, read_csv_list

    official = ["Haircut", "Hammering", "HammerThrow", "HandstandPushups", "JugglingBalls", "JumpingJack", "JumpRope"]
    for name in reversed(official):
        (tmp_path / "ucf" / name).mkdir(parents=True)
    assert folder_class_names(tmp_path / "ucf") == official
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    (tmp_path / "l.csv").write_text("path,label\n" + "".join(f"v.mp4,{n}\n" for n in reversed(official)))
    assert read_csv_list(tmp_path / "l.csv")[2] == official  # name labels: the same numbering


@pytest.mark.parametrize("audio_s", [4, 20])
def test_random_starts_in_an_mkv_whose_audio_outlasts_the_video(tmp_path, audio_s):
    """Matroska states no video duration; the container's is its longest stream's (the audio's),
    so late starts fell past the last video frame and the clip froze on it (before 2026-12-07).
    The video's end is now read off its last packets (also when the audio runs 18 s past it)."""
    path = tmp_path / "a.mkv"
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=25)
        v.width = v.height = 32
        v.pix_fmt = "yuv420p"
        a = c.add_stream("pcm_s16le", rate=16000)
        a.layout = "mono"
        for k in range(50):  # 2 s of video; frame k shows k in its two halves
            img = np.zeros((32, 32, 3), np.uint8)
            img[16:], img[:16] = 20 * (k % 12) + 10, 20 * (k // 12) + 10
            for pkt in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in v.encode():
            c.mux(pkt)
        for j in range(10 * audio_s):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
            fr.sample_rate, fr.pts = 16000, j * 1600
            for pkt in a.encode(fr):
                c.mux(pkt)
        for pkt in a.encode():
            c.mux(pkt)
    with av.open(str(path)) as c:
        assert c.streams.video[0].duration is None and c.duration / 1e6 == pytest.approx(audio_s, abs=0.1)

    def ids(clip):
        return [int(round((f[24, 16].mean() - 10) / 20)) + 12 * int(round((f[8, 16].mean() - 10) / 20)) for f in clip]

    assert ids(decode_clip(path, frames=16, size=32, start_fraction=1.0)) == list(range(34, 50))
    mid = ids(decode_clip(path, frames=16, size=32, start_fraction=0.6))
    assert mid == list(range(mid[0], mid[0] + 16)) and 15 <= mid[0] <= 25


def test_non_square_pixels_are_resized_as_shown(tmp_path):
    """Stored 64 x 32 with pixel aspect 1:2 is shown 32 x 32: the clip keeps the whole picture (red
    and blue quarters at the edges); the stored width was taken as shown and half was cropped away
    (before 2026-12-07)."""
    path = tmp_path / "sar.mp4"
    img = np.full((32, 64, 3), 128, np.uint8)
    img[:, :16], img[:, 48:] = (255, 0, 0), (0, 0, 255)
    write_mpeg4(path, [img] * 4, rate=8, bit_rate=2_000_000, sample_aspect_ratio=Fraction(1, 2))
    with av.open(str(path)) as c:
        assert c.streams.video[0].sample_aspect_ratio == Fraction(1, 2)
    row = decode_clip(path, frames=1, size=32)[0, 16].astype(int)
    red = int(((row[:, 0] > 200) & (row[:, 2] < 60)).sum())
    blue = int(((row[:, 2] > 200) & (row[:, 0] < 60)).sum())
    assert 6 <= red <= 9 and 6 <= blue <= 9, (red, blue)


def test_decode_clip_counts_the_frames_past_the_end_of_the_file(synth_dir):
    from arvid.data.files import decode_clip

    path = sorted(synth_dir.rglob("*.mp4"))[0]
    for frames, want in ((T, 0), (T + 3, 3)):
        info: dict = {}
        clip = decode_clip(path, frames=frames, size=S, info=info)
        assert clip.shape[0] == frames and info["padded"] == want
