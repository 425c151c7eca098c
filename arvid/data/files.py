"""Datasets over video files, decoded with PyAV: folders (UCF-101, Kinetics layouts) and CSV lists.

Layouts:
- folder: ``root/<class_name>/**/*.mp4|avi|webm|mkv|mov|m4v|gif``; the class index is the position of
  the class folder in the sorted list of class folders. Kinetics-style ``root/train/<class>/``
  and ``root/val|test/<class>/`` are picked by split, with one class list over all splits.
- CSV list: a header with ``path`` and ``label`` (an int or a class name), optionally
  ``split`` (train/val/test) and ``class_name``; relative paths are resolved against the
  CSV's folder.

A clip: ``frames`` frames, ``frame_stride`` decoded frames apart, or ``fps`` frames per second
of video time when given (which also handles variable frame rate: every output frame is the
last decoded frame at or before its time stamp); from the start of the file or from a random
start; short side resized to ``size`` (by FFmpeg's scaler, so a 4K file is cheap), centre crop
to ``size x size``, optional horizontal flip. A file shorter than the clip is padded by
repeating its last frame. Grayscale and other pixel formats are converted to RGB.

A file that cannot be decoded (truncated, empty, no video stream, no frames) is either an
error naming the file (``on_bad_video="error"``) or skipped with one warning: the dataset
returns the next readable video instead (deterministically) and counts it in ``num_skipped``.
"""

from __future__ import annotations

import csv
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from arvid.config import doc
from arvid.data.synthetic import mix_seed
from arvid.data.video import to_model

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".gif")
SPLIT_DIRS: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("val", "test"), "test": ("test", "val")}
_SEEK_AFTER_S = 1.0  # seek instead of decoding from the start when the clip starts later than this


class BadVideoError(ValueError):
    """A video file could not be decoded into at least one frame; the message names the file."""


@dataclass
class ClipConfig:
    """How a clip is cut out of a video file."""

    frames: int = doc(16, "frames per clip")
    size: int = doc(64, "output height = width: short side resized to this, then centre crop")
    frame_stride: int = doc(1, "take every n-th decoded frame (ignored when fps is set)")
    fps: float | None = doc(None, "sample at this many frames per second of video time (handles variable "
                                  "frame rate); None: use frame_stride over decoded frames")
    random_start: bool = doc(True, "start the clip at a random time (per item and epoch); False: at the start")
    flip: bool = doc(False, "random horizontal flip with probability 0.5")
    on_bad_video: Literal["skip", "error"] = doc("skip", "an undecodable file: skip it (counted) or raise")

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive or None, got {self.fps}")
        if self.on_bad_video not in ("skip", "error"):
            raise ValueError(f"on_bad_video must be 'skip' or 'error', got {self.on_bad_video!r}")


# --------------------------------------------------------------------------- decoding


_SCALERS: dict[tuple[int, int], object] = {}  # (pid, thread id) -> that thread's scaler


def _reformatter():
    """This thread's ``av.video.reformatter.VideoReformatter``. It keeps FFmpeg's scaler context
    between frames of the same geometry, where ``VideoFrame.reformat`` builds a new one for every
    frame (the same pixels; BENCHMARKS.md, Real-video input, has the speed-up).

    Keyed by process and thread in a module-level dict, never freed: a scaler used before a fork
    hangs in the child (its copy refers to the parent's scaler threads), and so does freeing one,
    which a ``threading.local`` would do in the child for every other thread's scaler. A forked
    child makes its own and keeps the inherited ones referenced."""
    key = (os.getpid(), threading.get_ident())
    r = _SCALERS.get(key)
    if r is None:
        from av.video.reformatter import VideoReformatter

        r = _SCALERS[key] = VideoReformatter()
    return r


def decoder_threads() -> int:
    """FFmpeg decoder threads for this process: 1 inside a DataLoader worker, else 0 (FFmpeg's
    automatic choice, one per core). Parallelism across workers already fills the cores; FFmpeg's
    default in each worker would start one thread per core in every one of them (15 workers on a
    16-core host: ~250 threads), where decoding stopped scaling past 8 workers (H100 host,
    2026-11-23, BENCHMARKS.md). Threading does not change the decoded frames."""
    import torch.utils.data

    return 1 if torch.utils.data.get_worker_info() is not None else 0


def _resize_crop(frame, size: int, sar: float = 1.0) -> np.ndarray:  # frame: av.VideoFrame
    """Resize so the short side is ``size`` (FFmpeg's area scaler), centre crop: ``uint8 [size, size, 3]``.

    ``sar``: the stream's sample (pixel) aspect ratio: the frame is resized as it is shown,
    ``width * sar`` wide (anamorphic video), not as its pixels are stored."""
    w, h = frame.width * sar, frame.height
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    rgb = _reformatter().reformat(frame, width=nw, height=nh, format="rgb24",
                                  interpolation="AREA").to_ndarray()  # [nh, nw, 3]
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return rgb[y0:y0 + size, x0:x0 + size]


def video_info(path: str | os.PathLike) -> dict:
    """Open ``path`` and decode its first frame: ``dict(width, height, fps, frames, duration)``.

    ``frames`` and ``duration`` are the container's claims (0 / None when it does not say).
    Raises :class:`BadVideoError` naming the file when it cannot be opened or has no frame.
    """
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadVideoError(f"{str(path)!r} has no video stream")
            stream = container.streams.video[0]
            first = next(iter(container.decode(stream)), None)
            if first is None:
                raise BadVideoError(f"{str(path)!r} has no decodable frames")
            rate = float(stream.average_rate or stream.guessed_rate or 0) or None
            duration = float(stream.duration * stream.time_base) if stream.duration else (
                container.duration / av.time_base if container.duration else None)
            return {"width": first.width, "height": first.height, "fps": rate, "frames": int(stream.frames or 0),
                    "duration": duration}
    except BadVideoError:
        raise
    except (av.FFmpegError, OSError, StopIteration) as e:
        raise BadVideoError(f"{str(path)!r} cannot be decoded: {e}") from e


#: decode_clip leaves non-reference frames before the clip undecoded (False: decode every frame;
#: the frames are the same either way, ``benchmarks/bench_video_decode.py --skip-nonref off``)
SKIP_NONREF = True


class _SkippedTooMuch(Exception):
    """A frame skipped as non-reference before the clip could have been the one to emit."""


class _UntimedAfterSeek(Exception):
    """A frame without a time stamp after a seek: counting frames from the seek point cannot place it."""


class _SeekedPast(Exception):
    """A seek landed on a frame shown after the clip's first target (AVI seeks by decode time, so a
    keyframe after B-frames shows later than the time asked for)."""


#: how far before the clip's start a seek aims, retry after retry; None: decode from the start
_SEEK_BACK_S = (0.0, 2.0, 10.0, None)


def decode_clip(path: str | os.PathLike, frames: int = 16, size: int = 64, frame_stride: int = 1,
                fps: float | None = None, start_fraction: float | None = None, flip: bool = False,
                info: dict | None = None) -> np.ndarray:
    """Decode one clip of ``path``: ``uint8 [frames, size, size, 3]``.

    ``start_fraction``: None starts at the first frame; ``u`` in [0, 1] starts at ``u`` times
    the latest start that still fits the clip. Output frame k is the last decoded frame whose
    time stamp is at or before ``start + k * step`` (half a frame of tolerance), where ``step``
    is ``1 / fps`` or ``frame_stride`` source frames (``frame_stride`` intervals of the stream's
    average rate: exact for constant-rate video; a variable-rate file, such as a GIF whose
    identical frames were merged and whose delays are whole 1/100 s, can repeat or skip a frame).
    Frames are resized as shown (non-square pixels: the stream's sample aspect ratio). Past the
    end of the file, the last frame repeats. Time 0 is the first frame shown (in AVI with B-frames one interval after the
    stream's start), whether the clip is reached by a seek or by decoding from the start. A
    container that states no duration (nor frame count) always starts at the first frame; frames
    without time stamps are counted from the first (such a clip is decoded from the start,
    never after a seek). Damaged packets are skipped (a truncated file gives the frames before the cut).
    Raises :class:`BadVideoError` naming the file when no frame can be decoded. ``info`` (a dict):
    receives ``padded``, the output frames past the end of the file (the last frame repeated).

    Frames before the clip that no other frame refers to (B-frames, most often) are not decoded
    at all (FFmpeg's ``skip_frame = NONREF``), up to two frame intervals before the first target;
    should the frame to emit first have been one of them (a gap in the time stamps), the clip
    is decoded again without skipping. The frames are those of a full decode either way.
    """
    # Each retry changes one thing: skipping stops (it can fail only while on), or the seek aims
    # further back (the last, None, decodes from the start and cannot land past nor meet a frame
    # without time after a seek): so it ends.
    skip, backs = SKIP_NONREF, iter(_SEEK_BACK_S)
    back = next(backs)
    while True:
        try:
            return _decode_clip(path, frames, size, frame_stride, fps, start_fraction, flip, skip_nonref=skip,
                                seek_back=back, info=info)
        except _SkippedTooMuch:
            skip = False
        except _SeekedPast:
            back = next(backs)
        except _UntimedAfterSeek:
            back = None  # decode from the start, where frames are counted from the first


def _decode_clip(path: str | os.PathLike, frames: int, size: int, frame_stride: int, fps: float | None,
                 start_fraction: float | None, flip: bool, skip_nonref: bool,
                 seek_back: float | None = 0.0, info: dict | None = None) -> np.ndarray:
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise BadVideoError(f"{str(path)!r} cannot be opened as a video: {e}") from e
    with container:
        if not container.streams.video:
            raise BadVideoError(f"{str(path)!r} has no video stream")
        stream = container.streams.video[0]
        stream.thread_count = decoder_threads()
        tb = float(stream.time_base) if stream.time_base else 1 / av.time_base
        sar = float(stream.sample_aspect_ratio or 0) or 1.0  # 0/1 or none: square pixels
        rate = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0) or 25.0
        step = 1.0 / fps if fps else frame_stride / rate  # seconds between output frames
        t_first = stream.start_time * tb if stream.start_time is not None else 0.0
        if stream.duration:
            duration = stream.duration * tb
        elif container.duration and len(container.streams) > 1:
            # the container's duration is its longest stream's (often the audio's, in mkv/webm):
            # the video's own end is read off its last packets
            duration = _video_end(container, stream, tb, t_first)
        elif container.duration:
            duration = container.duration / av.time_base
        elif stream.frames:
            duration = stream.frames / rate
        else:
            duration = None
        t0 = 0.0
        if start_fraction is not None and duration:
            # latest start whose clip still ends on a real frame
            t0 = max(0.0, duration - (frames - 1) * step - 1.0 / rate) * float(start_fraction)
        targets = t_first + t0 + step * np.arange(frames)
        seeked = seek_back is not None and t0 - seek_back > _SEEK_AFTER_S
        if seeked:
            # the clip's time origin is the first frame shown, as when decoding from the start (below)
            first = next(_tolerant_decode(container, stream, []), None)
            if first is not None and first.time is not None and first.time > t_first:
                targets = targets + (first.time - t_first)
            try:
                container.seek(int((t_first + t0 - seek_back) / tb), stream=stream, backward=True, any_frame=False)
            except av.FFmpegError:
                container.seek(0, stream=stream)  # unseekable: decode from the start instead
                seeked = False
        tol = 0.5 / rate
        out: list[np.ndarray] = []
        prev, prev_t = None, 0.0
        prev_rgb: tuple[object, np.ndarray] | None = None
        # packets shown before this time (seconds) decode only if other frames refer to them
        skip_before = targets[0] - 2.0 / rate if skip_nonref else None
        skipping = {"used": False}

        def emit(f) -> None:
            nonlocal prev_rgb
            if not out and skipping["used"] and (f is not prev or f.time is None or f.time < skip_before):
                raise _SkippedTooMuch  # a skipped frame may have been the last one at or before target 0
            if prev_rgb is None or prev_rgb[0] is not f:  # padding repeats a frame: convert it once
                prev_rgb = (f, _resize_crop(f, size, sar))
            out.append(prev_rgb[1])

        n_decoded = 0
        errors: list[str] = []
        for frame in _tolerant_decode(container, stream, errors, skip_before, tb, skipping):
            if frame.time is None and skipping["used"]:
                raise _SkippedTooMuch  # times counted by frame would miss the skipped ones
            if frame.time is None and seeked:
                raise _UntimedAfterSeek
            ft = frame.time if frame.time is not None else t_first + n_decoded / rate
            if n_decoded == 0 and seeked and ft > targets[0] + tol:
                raise _SeekedPast
            if n_decoded == 0 and not seeked and ft > t_first:
                # the first frame shows later than the stream's start time (B-frames in AVI: the start
                # is the first decode time, the first frame's pts one interval later); the video starts
                # at its first frame, else frame 0 would fill target 0 and again target 1
                targets = targets + (ft - t_first)
            n_decoded += 1
            while len(out) < frames and ft > targets[len(out)] + tol:
                emit(prev if prev is not None else frame)
            if len(out) >= frames:
                break
            prev, prev_t = frame, ft
        if prev is None and not out:
            why = f": {errors[-1]}" if errors else ""
            raise BadVideoError(f"{str(path)!r} has no decodable video frames{why}")
        if errors:
            # a file cut short or damaged mid-stream: what decoded is used, the rest padded
            log.debug("%s: %d decoding errors (%s); using the frames that decoded", path, len(errors), errors[-1])
        if info is not None:  # targets past the last frame's interval: the file ended, its last frame repeats
            info["padded"] = int(sum(t > prev_t + tol for t in targets[len(out):])) if prev is not None else 0
        while len(out) < frames:
            emit(prev)
    clip = np.stack(out)  # [T, size, size, 3]
    return np.ascontiguousarray(clip[:, :, ::-1]) if flip else clip


def _video_end(container, stream, tb: float, t_first: float) -> float | None:
    """Seconds from the video's start to the end of its last packet (the video stream's own
    duration, where the container states only its longest stream's), read by seeking near the
    container's end and demuxing the video's last packets; the container is left at its start.
    None when no packet tells."""
    import av

    end = None
    # first the last ~10 s of the container; if the video ended before them, every packet (no decoding)
    for start in (max(int(container.duration) - 10 * av.time_base, 0), 0):
        try:
            container.seek(start, backward=True)
            for packet in container.demux(stream):
                if packet.pts is not None:
                    t = (packet.pts + (packet.duration or 0)) * tb
                    end = t if end is None else max(end, t)
        except av.FFmpegError:
            end = None
        if end is not None or start == 0:
            break
    container.seek(0, stream=stream)
    return None if end is None else max(end - t_first, 0.0)


def _tolerant_decode(container, stream, errors: list[str], skip_before: float | None = None, tb: float = 0.0,
                     skipping: dict | None = None, max_errors: int = 16):
    """Yield the decoded frames of ``stream``, packet by packet.

    A damaged packet is recorded in ``errors`` and skipped (up to ``max_errors``); a read error
    of the container flushes the decoder and stops. So a truncated file still yields the frames
    before the damage. ``skip_before`` (seconds; ``tb``: the stream's time base): packets shown
    before it are decoded only if they are reference frames (``skipping["used"]`` records that
    it happened).
    """
    import av

    packets = container.demux(stream)
    cc = stream.codec_context
    mode = "DEFAULT"
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as e:  # the container is cut short: flush what the decoder holds
            errors.append(str(e))
            try:
                yield from stream.codec_context.decode(None)
            except av.FFmpegError as e2:
                errors.append(str(e2))
            return
        if skip_before is not None:
            want = "NONREF" if packet.pts is not None and packet.pts * tb < skip_before else "DEFAULT"
            if want != mode:
                cc.skip_frame, mode = want, want
                if want == "NONREF" and skipping is not None:
                    skipping["used"] = True
        try:
            yield from packet.decode()  # the last (empty) packet flushes the decoder
        except av.FFmpegError as e:
            errors.append(str(e))
            if len(errors) >= max_errors:
                return


# --------------------------------------------------------------------------- listing


def class_order(name: str) -> tuple[str, str]:
    """Sort key of class names: case-insensitive, as UCF-101's ``classInd.txt`` numbers its classes
    (``Hammering`` 34 before ``HammerThrow`` 35, where code-point order puts ``T`` before ``i``);
    names equal but for case by code point."""
    return name.casefold(), name


def list_class_folders(root: str | os.PathLike) -> list[str]:
    """The class folders under ``root`` (hidden folders ignored) in :func:`class_order`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {str(root)!r} does not exist")
    return sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=class_order)


def videos_under(folder: str | os.PathLike) -> list[Path]:
    """Video files (by extension) anywhere below ``folder``, sorted; hidden files ignored."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
                  and not p.name.startswith("."))


def split_folder(root: str | os.PathLike, split: str) -> Path | None:
    """The Kinetics-style split subfolder of ``root`` for ``split`` (``root/train``, ...), or None."""
    root = Path(root)
    for name in SPLIT_DIRS.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    return None


def has_split_folders(root: str | os.PathLike) -> bool:
    """True when ``root`` holds ``train/`` and ``val/`` or ``test/`` subfolders (Kinetics layout)."""
    root = Path(root)
    return (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir())


def folder_class_names(root: str | os.PathLike) -> list[str]:
    """Class names of a folder dataset: the class folders in :func:`class_order` (the union over split
    folders if any)."""
    root = Path(root)
    if has_split_folders(root):
        names: set[str] = set()
        for split in ("train", "val", "test"):
            if (root / split).is_dir():
                names.update(list_class_folders(root / split))
        return sorted(names, key=class_order)
    return list_class_folders(root)


def read_split_list(path: str | os.PathLike) -> list[str]:
    """Relative paths from a UCF-101 style split file (``Class/v_x.avi [label]`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list {str(path)!r} does not exist")
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line.split()[0].replace("\\", "/"))
    return out


def scan_folder(root: str | os.PathLike, split: str | None = None, split_list: str | os.PathLike | None = None,
                class_names: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """List a folder dataset: ``(paths, labels, class_names)``.

    ``split``: use ``root/train`` (or ``root/val|test``) when those exist; ``split_list``: a
    UCF-101 style file of paths relative to ``root`` that restricts the listing;
    ``class_names``: the label order to use (default: this folder's sorted class folders);
    class folders not in it are an error.
    """
    root = Path(root)
    classes = folder_class_names(root) if class_names is None else list(class_names)
    extra = sorted(set(folder_class_names(root)) - set(classes))
    if extra:
        raise ValueError(f"video folder {str(root)!r} has class folders {extra[:8]} that the class list "
                         f"({len(classes)} classes) does not have")
    base = split_folder(root, split) if (split and has_split_folders(root)) else root
    if base is None:
        raise FileNotFoundError(f"video folder {str(root)!r} has no {SPLIT_DIRS.get(split, (split,))} subfolder")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if not (base / name).is_dir():
            continue
        for p in videos_under(base / name):
            paths.append(str(p))
            labels.append(label)
    if split_list is not None:
        wanted = set(read_split_list(split_list))
        keep = [i for i, p in enumerate(paths) if Path(p).relative_to(base).as_posix() in wanted]
        found = {Path(paths[i]).relative_to(base).as_posix() for i in keep}
        if not keep:
            raise FileNotFoundError(f"none of the {len(wanted)} files in split list {str(split_list)!r} "
                                    f"is under {str(base)!r}")
        if len(found) < len(wanted):
            missing = sorted(wanted - found)
            log.warning("%d files of split list %s are not in %s (first: %s)", len(missing), split_list, base,
                        missing[:3])
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    if not paths:
        raise FileNotFoundError(
            f"no videos found under {str(base)!r}; expected {str(base)}/<class_name>/*"
            f"{'|'.join(VIDEO_EXTENSIONS)}")
    return paths, labels, classes


def read_csv_list(csv_path: str | os.PathLike, split: str | None = None, on_missing: Literal["error", "skip"] = "error",
                  check_files: bool = True, require_labels: bool = True,
                  class_names: list[str] | None = None) -> tuple[list[str], list[int], list[str], int]:
    """Read a ``path,label[,split][,class_name]`` CSV: ``(paths, labels, class_names, num_missing)``.

    Relative paths are resolved against the CSV's folder. ``label`` is an int or a class name
    (names are indexed in :func:`class_order`, or by their place in ``class_names`` where given: a
    held-out list lacking a class must not renumber the ones after it; a name not in it is an
    error). With a ``split`` column and ``split`` given, only its
    rows are kept (``val`` falls back to ``test`` rows and back). Missing files raise an
    error listing them, or with ``on_missing="skip"`` are dropped and counted. A kept row without
    a label is an error unless ``require_labels`` is False (then its label is -1: reading only
    the class names). Int labels take their names from ``<csv name>.classes.txt`` beside the CSV
    where there is one (`arvid data index` writes it: every class, also those without a row).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"video list {str(csv_path)!r} does not exist")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: the BOM a spreadsheet may write
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in fields:
            raise ValueError(f"{str(csv_path)!r}: the header must name a `path` column (and `label`), got {fields}")
        rows = []
        for r in reader:
            if None in r:  # csv puts the fields beyond the header's under the key None
                raise ValueError(f"{str(csv_path)!r} line {reader.line_num}: {len(fields) + len(r[None])} fields, the "
                                 f"header names {len(fields)} ({', '.join(fields)}); quote a path holding commas")
            rows.append({(k or "").strip(): (v or "").strip() for k, v in r.items()})
    if not rows:
        raise ValueError(f"{str(csv_path)!r} lists no videos")
    # Labels and class names come from every row before the split filter, so a class-name label
    # gets the same index in every split (a split lacking a class would renumber those after it).
    # Blank labels (an unlabelled split beside labelled ones) are -1 and take no part in typing
    # the column or naming the classes. A list with no labels at all is one class, "" (label 0).
    raw = [r.get("label", "") for r in rows]
    given = [x for x in raw if x]
    if not given:
        labels, names = [0] * len(raw), [""]
    elif all(_is_int(x) for x in given):
        labels = [int(x) if x else -1 for x in raw]
        lowest = min(int(x) for x in given)
        if lowest < 0:
            raise ValueError(f"{str(csv_path)!r}: labels must be >= 0, got {lowest}")
        labelled = [i for i, x in enumerate(raw) if x]
        names = _class_names_for([rows[i] for i in labelled], [labels[i] for i in labelled], fields)
        listed = csv_path.with_name(csv_path.stem + ".classes.txt")  # `arvid data index` writes every class
        if listed.is_file():
            every = [line.rstrip("\n") for line in listed.read_text().splitlines()]
            if len(every) < len(names):
                raise ValueError(f"{str(listed)!r} names {len(every)} classes, but {str(csv_path)!r} has labels up "
                                 f"to {len(names) - 1}")
            names = every
    else:
        names = sorted(set(given), key=class_order) if class_names is None else list(class_names)
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(given) - set(lookup))
        if unknown:
            raise ValueError(f"{str(csv_path)!r}: label(s) {unknown[:8]} are not classes of the main list "
                             f"({len(names)} classes, e.g. {names[:5]})")
        labels = [lookup[x] if x else -1 for x in raw]
    if split is not None and "split" in fields:
        for name in SPLIT_DIRS.get(split, (split,)):
            chosen = [i for i, r in enumerate(rows) if r.get("split") == name]
            if chosen:
                rows, labels = [rows[i] for i in chosen], [labels[i] for i in chosen]
                break
        else:
            raise ValueError(f"{str(csv_path)!r} has no rows with split {SPLIT_DIRS.get(split, (split,))}")
    blank = [r["path"] for r, lab in zip(rows, labels) if lab < 0] if require_labels else []
    if blank:
        raise ValueError(f"{str(csv_path)!r}: {len(blank)} row(s){f' of split {split!r}' if split else ''} have no "
                         f"label (e.g. {blank[0]!r}); every row read needs one, as the others have")
    base = csv_path.parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in (r["path"] for r in rows)]
    missing = [p for p in paths if not Path(p).is_file()] if check_files else []
    if missing:
        if on_missing == "error":
            listed = "\n  ".join(missing[:20])
            more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise FileNotFoundError(f"{str(csv_path)!r} lists {len(missing)} file(s) that do not exist "
                                    f"(relative paths are resolved against {str(base)!r}):\n  {listed}{more}")
        gone = set(missing)
        keep = [i for i, p in enumerate(paths) if p not in gone]
        for p in missing:
            log.warning("skipping missing video %s (listed in %s)", p, csv_path)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        if not paths:
            raise FileNotFoundError(f"none of the files listed in {str(csv_path)!r} exist")
    return paths, labels, names, len(missing)


def _is_int(x: str) -> bool:
    try:
        int(x)
        return True
    except ValueError:
        return False


def _class_names_for(rows: list[dict], labels: list[int], fields: list[str]) -> list[str]:
    """Names for int labels: a ``class_name`` column, else parent folder names if they agree, else the ints."""
    n = max(labels) + 1
    if "class_name" in fields:
        names = [str(i) for i in range(n)]
        for r, lab in zip(rows, labels):
            if r.get("class_name"):
                names[lab] = r["class_name"]
        return names
    parent: dict[int, set[str]] = {}
    for r, lab in zip(rows, labels):
        parent.setdefault(lab, set()).add(Path(r["path"]).parent.name)
    if all(len(v) == 1 for v in parent.values()) and len({next(iter(v)) for v in parent.values()}) == len(parent):
        return [next(iter(parent[i])) if i in parent else str(i) for i in range(n)]
    return [str(i) for i in range(n)]


# --------------------------------------------------------------------------- dataset


class VideoFileDataset(Dataset):
    """Clips of video files: ``dataset[i]`` -> ``dict(video=float32[3, T, S, S] in [-1, 1], label, index)``.

    Build one with :meth:`from_folder` or :meth:`from_csv` (they list the files; the
    constructor does no I/O). ``index`` in an item is the position of the video actually
    returned: a skipped bad file at ``i`` yields the next readable video ``j`` and ``index=j``.
    Random starts and flips come from a generator seeded by ``(seed, epoch, i)``: call
    :meth:`set_epoch` each epoch for new clips; the same epoch repeats exactly.

    ``num_skipped`` counts the bad files this process has met (DataLoader workers each count
    their own; :meth:`scan` checks every file up front in the calling process).
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names: Sequence[str],
                 clip: ClipConfig | None = None, seed: int = 0, num_missing: int = 0) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = [int(x) for x in labels]
        self.class_names = list(class_names)
        self.clip = clip or ClipConfig()
        self.seed = int(seed)
        self.epoch = 0
        self.num_missing = int(num_missing)
        self.bad: set[int] = set()

    def cut_as_protocol(self, random_start: bool, seed: int) -> None:
        """Cut clips as an FVD protocol does, whatever the data config said: a random start (seeded
        by the protocol's ``seed``) or the first frames, consecutive frames at the file's own rate
        (``frame_stride`` 1, no ``fps`` resampling: the protocols' ``first-16`` / ``random-16``
        clips), and no flips (``arvid.stages.eval_stream.ClipSet``)."""
        c = self.clip
        if c.frame_stride != 1 or c.fps:
            log.warning("FVD protocol clips are consecutive frames at each file's own rate: the data config's "
                        "frame_stride=%s fps=%s are not used for these clips", c.frame_stride, c.fps)
        self.clip = replace(c, random_start=bool(random_start), flip=False, frame_stride=1, fps=None)
        self.seed = int(seed)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, clip: ClipConfig | None = None, split: str | None = None,
                    split_list: str | os.PathLike | None = None, seed: int = 0,
                    class_names: Sequence[str] | None = None) -> VideoFileDataset:
        """A dataset over ``root/<class>/*.mp4`` (or ``root/<split>/<class>/...``); see :func:`scan_folder`."""
        paths, labels, names = scan_folder(root, split=split, split_list=split_list, class_names=class_names)
        return cls(paths, labels, names, clip=clip, seed=seed)

    @classmethod
    def from_csv(cls, csv_path: str | os.PathLike, clip: ClipConfig | None = None, split: str | None = None,
                 on_missing: Literal["error", "skip"] = "error", seed: int = 0,
                 class_names: list[str] | None = None) -> VideoFileDataset:
        """A dataset over the files of a ``path,label`` CSV; see :func:`read_csv_list` (``class_names``:
        the main list's, which class-name labels index)."""
        paths, labels, names, missing = read_csv_list(csv_path, split=split, on_missing=on_missing,
                                                      class_names=class_names)
        return cls(paths, labels, names, clip=clip, seed=seed, num_missing=missing)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        """Files skipped so far: undecodable ones met by this process plus missing ones dropped at listing."""
        return len(self.bad) + self.num_missing

    def set_epoch(self, epoch: int) -> None:
        """Choose the random starts and flips of this epoch (deterministic per (seed, epoch, index))."""
        self.epoch = int(epoch)

    def video_id(self, i: int) -> str:
        """The file of video ``i`` (used as the video id in token stores)."""
        return self.paths[int(i)]

    def load(self, i: int, info: dict | None = None) -> np.ndarray:
        """Decode the clip of video ``i``: ``uint8 [T, S, S, 3]``; raises :class:`BadVideoError` if unreadable.
        ``info``: see :func:`decode_clip`."""
        c = self.clip
        start, flip = None, False
        if c.random_start or c.flip:
            g = torch.Generator().manual_seed(mix_seed(self.seed * 1_000_003 + self.epoch, int(i)))
            u = torch.rand(2, generator=g).tolist()
            start = u[0] if c.random_start else None
            flip = c.flip and u[1] < 0.5
        return decode_clip(self.paths[i], frames=c.frames, size=c.size, frame_stride=c.frame_stride, fps=c.fps,
                           start_fraction=start, flip=flip, info=info)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        n = len(self.paths)
        if not 0 <= i < n:
            raise IndexError(f"video index {i} out of range [0, {n})")
        for j in (i + k for k in range(n)):
            j %= n
            if j in self.bad:
                continue
            info: dict = {}
            try:
                frames = self.load(j, info)
            except BadVideoError as e:
                if self.clip.on_bad_video == "error":
                    raise BadVideoError(f"{e} (set on_bad_video=skip to skip such files)") from e
                self.bad.add(j)
                log.warning("skipping unreadable video %s", e)
                continue
            return {"video": to_model(torch.from_numpy(frames)), "label": self.labels[j], "index": j,
                    "padded": int(info.get("padded", 0))}
        raise BadVideoError(f"all {n} videos of this dataset are unreadable (first: {self.paths[0]!r})")

    def scan(self) -> int:
        """Try to open and decode the first frame of every file; mark the bad ones. Returns how many are bad."""
        for j, p in enumerate(self.paths):
            if j in self.bad:
                continue
            try:
                video_info(p)
            except BadVideoError as e:
                if self.clip.on_bad_video == "error":
                    raise
                self.bad.add(j)
                log.warning("skipping unreadable video %s", e)
        return len(self.bad)


__all__ = [
    "VIDEO_EXTENSIONS", "BadVideoError", "ClipConfig", "VideoFileDataset", "decode_clip", "video_info",
    "scan_folder", "read_csv_list", "read_split_list", "folder_class_names", "list_class_folders",
    "has_split_folders", "split_folder", "videos_under",
]
