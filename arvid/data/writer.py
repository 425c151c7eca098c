"""Write clips to disk: mp4 (PyAV), gif (Pillow), png (frames side by side), and grids of clips.

Every file is written under a temporary name and renamed, so an interrupted write never leaves
a truncated video under the final name.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from arvid.data.video import to_file
from arvid.io import atomic_write

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")


def _as_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """``uint8 [T, H, W, C]`` or ``float [C, T, H, W]`` in [-1, 1] -> ``uint8 [T, H, W, 3]`` (numpy)."""
    x = torch.as_tensor(video)
    if x.dim() != 4:
        raise ValueError(
            f"a video must be uint8 [T, H, W, C] or float [C, T, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        frames = x
    elif x.is_floating_point():
        frames = to_file(x)
    else:
        raise TypeError(f"a video must be uint8 [T, H, W, C] or float [C, T, H, W], got dtype {x.dtype}")
    c = frames.shape[-1]
    if c == 1:
        frames = frames.expand(*frames.shape[:-1], 3)  # grayscale -> RGB
    elif c == 4:
        frames = frames[..., :3]  # drop alpha
    elif c != 3:
        raise ValueError(f"a video needs 1, 3 or 4 channels, got {c} (shape {tuple(frames.shape)})")
    return np.ascontiguousarray(frames.cpu().numpy())


def best_video_codec() -> str:
    """``libx264`` when this PyAV build has it, else ``mpeg4`` (always built into FFmpeg)."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(video: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: int = 8, crf: int = 17) -> None:
    """Write one clip; the format comes from the suffix (``.mp4``, ``.gif`` or ``.png``).

    ``video``: ``uint8 [T, H, W, C]`` (file-facing) or ``float [C, T, H, W]`` in [-1, 1]
    (model-facing); C is 1 (gray), 3 or 4 (alpha dropped). mp4 uses libx264 (``crf``: 0 is
    lossless, 17 is visually lossless) or mpeg4 without it, in yuv420p, which needs even sizes,
    so odd sizes are padded by repeating the last row/column. ``.png`` writes the frames side
    by side in one image.
    """
    frames = _as_frames(video)
    path = Path(path)
    suffix = path.suffix.lower()
    if frames.shape[0] == 0:
        raise ValueError(f"cannot write {str(path)!r}: the clip has no frames")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if suffix == ".mp4":
        _write_mp4(frames, path, fps, crf)
    elif suffix == ".gif":
        _write_gif(frames, path, fps)
    elif suffix == ".png":
        _write_png(frames, path)
    else:
        raise ValueError(f"cannot write {str(path)!r}: unknown video suffix {suffix!r}, expected one of {VIDEO_SUFFIXES}")
    _default_permissions(path)


def _default_permissions(path: Path) -> None:
    # atomic_write's temporary file is private (0600); a video is a normal file: 0666 minus umask.
    # The umask is read from /proc (setting it to read it would race with other threads).
    umask = 0o022
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except OSError:
        pass
    os.chmod(path, 0o666 & ~umask)


def _write_mp4(frames: np.ndarray, path: Path, fps: int, crf: int) -> None:
    try:
        import av
    except ImportError:
        raise RuntimeError(f"writing {str(path)!r}: mp4 needs PyAV (pip install av); write a .gif "
                           "instead (no PyAV needed)") from None

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        # yuv420p subsamples chroma 2x2: pad to even sizes with the edge pixels
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = h + h % 2, w + w % 2
    codec = best_video_codec()
    with atomic_write(path, "wb") as f:
        with av.open(f, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(int(fps), 1))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(int(crf)), "preset": "veryfast"}
            else:
                # mpeg4 has no crf: a fixed quantiser (2 = best) plays the same role
                stream.codec_context.qscale = max(2, min(31, 2 + int(crf) // 6))
                stream.codec_context.flags |= av.codec.context.Flags.qscale
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                container.mux(packet)


def _write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    """Every frame is written, each with its own adaptive palette and the same delay, ``100 / fps``
    rounded to whole hundredths of a second (GIF's unit: fps 8 plays at 8.33). Pillow's ``save_all``
    folded a frame equal to the one before into that one's delay, so a static clip became a one-frame
    GIF and a clip with a pause a variable-rate one, which a reader stepping by the average frame
    rate (:func:`arvid.data.files.decode_clip`) read back with frames skipped and the last repeated."""
    from PIL import GifImagePlugin, Image

    delay_ms = 10 * max(1, round(100 / fps))
    buf = io.BytesIO()
    for k, frame in enumerate(frames):
        im = Image.fromarray(frame).convert("P", palette=Image.Palette.ADAPTIVE)
        if k == 0:
            header, _ = GifImagePlugin.getheader(im, None, {"loop": 0})
            buf.write(b"".join(header))
        buf.write(b"".join(GifImagePlugin.getdata(im, duration=delay_ms, disposal=1, include_color_table=True)))
    buf.write(b";")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def _write_png(frames: np.ndarray, path: Path) -> None:
    from PIL import Image

    strip = rearrange(frames, "t h w c -> h (t w) c")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(strip)).save(buf, format="PNG")
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())


def make_grid(videos: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile clips into one clip: ``float [N, C, T, H, W]`` -> ``float [C, T, H', W']``.

    ``nrow`` clips per row; ``pad`` pixels of ``pad_value`` (in [-1, 1]; 1 is white) between
    and around them. A last row with fewer clips is filled with ``pad_value``.
    """
    if videos.dim() != 5:
        raise ValueError(f"make_grid expects videos [N, C, T, H, W], got shape {tuple(videos.shape)}")
    if nrow < 1 or pad < 0:
        raise ValueError(f"need nrow >= 1 and pad >= 0, got nrow={nrow}, pad={pad}")
    n = videos.shape[0]
    if n == 0:
        raise ValueError("make_grid got no videos")
    x = videos.detach().float().cpu()
    ncol = min(nrow, n)
    nrows = -(-n // ncol)  # ceil
    filler = torch.full((nrows * ncol - n, *x.shape[1:]), pad_value)
    x = torch.cat([x, filler])  # [rows * cols, C, T, H, W]
    x = F.pad(x, (pad, 0, pad, 0), value=pad_value)  # each tile gets a border on its top and left
    grid = rearrange(x, "(r k) c t h w -> c t (r h) (k w)", r=nrows, k=ncol)
    return F.pad(grid, (0, pad, 0, pad), value=pad_value)  # close the bottom and right border


def write_grid(videos: torch.Tensor, path: str | os.PathLike, nrow: int = 8, fps: int = 8, pad: int = 2,
               pad_value: float = 1.0) -> None:
    """Write ``float [N, C, T, H, W]`` clips in [-1, 1] as one grid video (see :func:`make_grid`)."""
    write_video(make_grid(videos, nrow=nrow, pad=pad, pad_value=pad_value), path, fps=fps)
