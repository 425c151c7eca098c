"""Real-video input for FVD: clips/s that CPU workers decode, resize and crop, end to end.

    python benchmarks/bench_video_decode.py                      # 48 UCF-101-like mp4s, 0/1/2 workers
    python benchmarks/bench_video_decode.py --workers 0,4,8,16   # on a bigger host

``arvid eval fvd`` reads videos through :class:`arvid.data.files.VideoFileDataset` in DataLoader
workers (PyAV decode, short side resized to the protocol's size, centre crop, 16 frames) and
resizes to 224 on the GPU. This measures that CPU side on files it writes itself (``--src-frames``
frames of ``--src-size``, H.264 or MPEG-4, like UCF-101's 320 x 240 clips), and reports how many
workers it takes to keep an I3D busy at ``--i3d-clips-per-s`` (default: 441, arvid's fp32 I3D on
the H100 with clips already on the GPU, 2026-12-06, BENCHMARKS.md; 267 was an older table that
timed the clips' host-to-device copy too). Prints one JSON object (command, host, date) and appends
it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def write_sources(folder: Path, n: int, frames: int, width: int, height: int) -> None:
    """``n`` mp4 files of moving synthetic sprites at ``width x height`` (drawn square, then resized)."""
    from arvid.data.synthetic import SyntheticVideos
    from arvid.data.writer import write_video

    ds = SyntheticVideos(n, frames=frames, size=height, seed=1)
    for i in range(n):
        v = ds[i]["video"]  # [C, T, H, W] in [-1, 1]
        v = F.interpolate(v.transpose(0, 1), size=(height, width), mode="bilinear", align_corners=False)
        write_video(v.transpose(0, 1).clamp(-1, 1), folder / f"clip_{i:04d}.mp4", fps=25)


def decode_rate(folder: Path, workers: int, frames: int, size: int, batch: int, passes: int,
                consumer=None) -> dict:
    """``passes`` passes over ``folder`` as ``arvid eval fvd`` reads it (each pass draws other random
    clip starts). Returns ``clips_per_s`` (worker start-up included, as in a short run),
    ``startup_s`` (until the first batch arrived) and ``steady_clips_per_s`` (the clips after the
    first batch over the time after it: the rate a 10,000-clip run approaches). ``consumer`` (e.g.
    an :class:`arvid.eval.i3d.I3DFeatures` on a GPU) is called on every batch: the rates are then
    the end-to-end ones, decoding and features together."""
    from torch.utils.data import ConcatDataset, DataLoader

    from arvid.data.files import ClipConfig
    from arvid.stages.eval_fvd import _collate, open_videos

    ds = open_videos(str(folder), ClipConfig(frames=frames, size=size, random_start=True, flip=False), seed=0)
    loader = DataLoader(ConcatDataset([ds] * passes), batch_size=batch, num_workers=workers, collate_fn=_collate,
                        persistent_workers=False)
    t = time.perf_counter()
    seen, first, t_first = 0, 0, None
    for b in loader:
        n = b["video"].shape[0]
        if consumer is not None:
            consumer(b["video"])  # returns features on the CPU: the device work is finished
        if t_first is None:
            first, t_first = n, time.perf_counter()
        seen += n
    t_end = time.perf_counter()
    steady = (seen - first) / (t_end - t_first) if seen > first and t_end > t_first else float("nan")
    return {"clips_per_s": round(seen / (t_end - t), 2), "clips": seen,
            "startup_s": round((t_first or t_end) - t, 2), "steady_clips_per_s": round(steady, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=48, help="source files to write and read")
    p.add_argument("--src-frames", type=int, default=64, help="frames per source file")
    p.add_argument("--src-size", default="320x240", help="source WIDTHxHEIGHT")
    p.add_argument("--frames", type=int, default=16, help="frames per clip")
    p.add_argument("--size", type=int, default=128, help="clip size after resize + crop (the rFVD protocol's 128)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--passes", type=int, default=4, help="passes over the files per measurement")
    p.add_argument("--i3d-clips-per-s", type=float, default=441.0, help="the consumer's rate to keep busy")
    p.add_argument("--i3d", default=None, metavar="DEVICE",
                   help="also feed every batch to the fp32 I3D on DEVICE (e.g. cuda) and report end-to-end clips/s; "
                        "the network is randomly initialised (throughput does not depend on the weights)")
    p.add_argument("--i3d-batch", type=int, default=32, help="I3D batch (clips)")
    p.add_argument("--out", default=None, help="append the JSON result to this file")
    p.add_argument("--skip-nonref", default="on", choices=("on", "off"),
                   help="leave non-reference frames before a clip undecoded (arvid.data.files.SKIP_NONREF)")
    a = p.parse_args(argv)
    from arvid.data import files

    files.SKIP_NONREF = a.skip_nonref == "on"  # before the DataLoader forks its workers
    width, height = (int(x) for x in a.src_size.lower().split("x"))
    torch.set_num_threads(1)  # as in DataLoader workers
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        write_sources(folder, a.videos, a.src_frames, width, height)
        write_s = time.perf_counter() - t
        consumer = None
        if a.i3d:
            from arvid.eval.i3d import I3D, I3DFeatures

            consumer = I3DFeatures(I3D().fuse_().to(a.i3d), precision="fp32", batch_size=a.i3d_batch)
            consumer(torch.zeros(2, a.frames, a.size, a.size, 3, dtype=torch.uint8))  # warm up (cuDNN autotune)
        for w in (int(x) for x in a.workers.split(",")):
            row = {"workers": w, **decode_rate(folder, w, a.frames, a.size, a.batch, a.passes)}
            if consumer is not None:
                e2e = decode_rate(folder, w, a.frames, a.size, a.i3d_batch, a.passes, consumer)
                row.update({f"end_to_end_{k}": v for k, v in e2e.items() if k != "clips"})
            rows.append(row)
    # the steady rate where there was more than one batch (nan otherwise), else the whole run's
    per_worker = max((r["steady_clips_per_s"] if r["steady_clips_per_s"] == r["steady_clips_per_s"]
                      else r["clips_per_s"]) / max(r["workers"], 1) for r in rows)
    res = {"benchmark": "bench_video_decode", "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
           "source": f"{a.videos} mp4 of {a.src_frames} frames at {width}x{height}", "write_s": round(write_s, 1),
           "clip": [a.frames, a.size, a.size], "rows": rows, "best_clips_per_s_per_worker": round(per_worker, 2),
           "workers_to_feed": math.ceil(a.i3d_clips_per_s / per_worker), "i3d_clips_per_s": a.i3d_clips_per_s,
           "i3d_device": a.i3d, "skip_nonref": a.skip_nonref}
    print(json.dumps(res), flush=True)
    if a.out:
        from arvid.io import atomic_write

        old = Path(a.out).read_text() if Path(a.out).is_file() else ""
        with atomic_write(a.out, "w") as f:  # the old lines and the new one, or the old file untouched
            f.write(old + json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
