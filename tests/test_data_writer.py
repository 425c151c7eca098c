"""Writing clips: mp4 / gif / png round trips, odd sizes, grids."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from arvid.data.video import to_file
from arvid.data.writer import make_grid, write_grid, write_video


def smooth_clip(t=6, h=24, w=32):
    """float [3, T, H, W] in [-1, 1]: smooth gradients that survive lossy codecs."""
    tt, yy, xx = torch.meshgrid(torch.linspace(0, 1, t), torch.linspace(-1, 1, h), torch.linspace(-1, 1, w),
                                indexing="ij")
    return torch.stack([xx * 0.8, yy * 0.8, (tt * 2 - 1) * 0.8])


def decode_all(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_mp4_round_trip(tmp_path):
    clip = smooth_clip()
    write_video(clip, tmp_path / "a.mp4", fps=10)
    frames = decode_all(tmp_path / "a.mp4")
    ref = to_file(clip).numpy()
    assert frames.shape == ref.shape == (6, 24, 32, 3)
    assert np.abs(frames.astype(float) - ref).mean() < 4.0
    with av.open(str(tmp_path / "a.mp4")) as c:
        assert float(c.streams.video[0].average_rate) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]  # no temporary file left


def test_mp4_odd_size_and_gray_uint8(tmp_path):
    gray = torch.full((4, 17, 33, 1), 200, dtype=torch.uint8)
    write_video(gray, tmp_path / "g.mp4")
    frames = decode_all(tmp_path / "g.mp4")
    assert frames.shape == (4, 18, 34, 3)  # padded to even for yuv420p
    assert np.abs(frames.astype(float) - 200).max() <= 3


def test_gif_and_png(tmp_path):
    clip = torch.zeros(5, 8, 8, 3, dtype=torch.uint8)
    for t in range(5):
        clip[t, :, : t + 1] = 255  # a white bar that grows
    write_video(clip, tmp_path / "a.gif", fps=5)
    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 5 and im.info["duration"] == 200
        im.seek(3)
        f = np.asarray(im.convert("RGB"))
        assert f[:, :4].min() > 240 and f[:, 4:].max() < 15
    write_video(clip, tmp_path / "a.png")
    strip = np.asarray(Image.open(tmp_path / "a.png"))
    assert strip.shape == (8, 40, 3)
    np.testing.assert_array_equal(strip[:, 16:24], clip[2].numpy())


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown video suffix '.avi'"):
        write_video(smooth_clip(), tmp_path / "x.avi")
    with pytest.raises(ValueError, match=r"\[T, H, W, C\]"):
        write_video(torch.zeros(3, 4, 4), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="channels"):
        write_video(torch.zeros(2, 4, 4, 2, dtype=torch.uint8), tmp_path / "x.mp4")
    assert list(tmp_path.iterdir()) == []


def test_make_grid_places_tiles():
    n, pad = 5, 2
    videos = torch.stack([torch.full((3, 2, 4, 6), -1.0 + 0.25 * i) for i in range(n)])  # [5, 3, 2, 4, 6]
    grid = make_grid(videos, nrow=3, pad=pad, pad_value=1.0)
    assert grid.shape == (3, 2, 2 * (4 + pad) + pad, 3 * (6 + pad) + pad)
    for i in range(n):
        r, k = divmod(i, 3)
        y, x = pad + r * (4 + pad), pad + k * (6 + pad)
        assert torch.all(grid[:, :, y:y + 4, x:x + 6] == -1.0 + 0.25 * i)
    assert torch.all(grid[:, :, :pad] == 1.0) and torch.all(grid[:, :, 6 + pad:, 2 * 8 + pad:] == 1.0)


def test_write_grid_file(tmp_path):
    videos = torch.stack([smooth_clip(4, 8, 8) * s for s in (1.0, -1.0, 0.5)])
    write_grid(videos, tmp_path / "g.mp4", nrow=2, pad=2)
    frames = decode_all(tmp_path / "g.mp4")
    assert frames.shape == (4, 2 * 10 + 2, 2 * 10 + 2, 3)
    # the pixels, built by hand: clip i at row i // 2, column i % 2 behind a 2-pixel white border,
    # the empty 4th slot white; lossy (yuv420p on 8x8 tiles), so each tile must be near its own
    # clip and nearer to it than to any other slot's content
    want = np.full((4, 22, 22, 3), 255.0)
    tiles = (videos.permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5  # [3, T, H, W, C]
    slot = [(slice(None), slice(2 + r * 10, 10 + r * 10), slice(2 + k * 10, 10 + k * 10))
            for r, k in (divmod(i, 2) for i in range(4))]
    for i in range(3):
        want[slot[i]] = tiles[i]
    got = frames.astype(float)
    assert np.abs(got - want).mean() < 8.0
    for i in range(4):
        err = [np.abs(got[slot[i]] - want[slot[j]]).mean() for j in range(4)]
        assert err[i] < 16.0 and err[i] < 0.6 * min(e for j, e in enumerate(err) if j != i), (i, err)


def test_gif_keeps_repeated_frames_and_reads_back_in_order(tmp_path):
    """Pillow's save_all folded a frame equal to the one before into its delay: a static clip was a
    one-frame GIF, and a clip with a pause read back (decode_clip steps by the average rate) with
    frames skipped and the last one repeated."""
    from arvid.data.files import decode_clip, video_info

    values = [10] * 8 + [20 + 10 * k for k in range(8)]  # a pause, then a ramp
    clip = np.stack([np.full((8, 8, 3), v, np.uint8) for v in values])
    write_video(clip, tmp_path / "p.gif", fps=8)
    with Image.open(tmp_path / "p.gif") as im:
        assert im.n_frames == 16 and im.info["duration"] == 120  # 100 / 8 rounded to whole 1/100 s
    info = {}
    back = decode_clip(tmp_path / "p.gif", frames=16, size=8, info=info)
    assert [int(f[3, 3, 0]) for f in back] == values and info["padded"] == 0
    write_video(np.repeat(clip[:1], 6, axis=0), tmp_path / "s.gif", fps=8)  # a static clip
    assert video_info(tmp_path / "s.gif")["frames"] == 6
