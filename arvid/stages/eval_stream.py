"""What `arvid eval recon | gen | fp | budget` and the report stream: real clips, FVD sides, progress.

No evaluation holds a whole set of clips. Real clips come from a DataLoader in batches and leave
only sums behind (FVD feature sums, per-video quality sums); generated clips likewise. At
10,000 clips of 16 x 128 x 128 a float copy of one set is ~31 GB; the sums are ~1.3 MB. (No
sample ids go to the FVD metric: a clip set has no sampler padding to detect, and ids would
keep every clip's 400 features.)

- :class:`ClipSet`: the protocol's real clips of a split. ``random-clips`` protocols
  (``ucf-gfvd-*``) draw a seeded subset (``protocol.seed``), the others take the first N; clips
  of files are cut as the protocol says (random starts seeded by ``protocol.seed``, or the first
  frames), as ``arvid eval fvd`` cuts them. A drawn file that cannot be read is left out.
  Batches are numbered globally; under ``torchrun`` process ``r`` takes batches
  ``r, r + world, ...``, so every clip is read once (no sampler padding) and a batch's result
  does not depend on the number of processes (a batch's sampling seed is its global number).
- :class:`FVDSides`: one real side and any number of named fake sides sharing one I3D; the
  real side is computed from the clips or loaded from a ``.npz`` (``real_stats``, checked against
  the clips: data source, split, seed, N), and can be saved for the next run
  (``save_real_stats``, which records them). Each result is reduced across processes.
- :func:`progress`: a tqdm bar on rank 0, silent when stderr is not a terminal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from arvid.data.datasets import DataConfig, build_dataset
from arvid.data.files import VideoFileDataset
from arvid.eval.protocols import FVDProtocol, get_protocol

log = logging.getLogger("arvid.evaluate")


def dist_info() -> tuple[int, int]:
    """``(rank, world)``; joins the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    from arvid.stages.eval_fvd import _dist

    return _dist()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over processes (itself when there is one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` when there is one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def progress(total: int, desc: str, unit: str = "video"):
    """A tqdm bar on rank 0 (disabled elsewhere and when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    rank, _ = dist_info()
    return tqdm(total=total, desc=desc, unit=unit, disable=True if rank > 0 else None, leave=False)


def draw_indices(n_total: int, num: int | None, random: bool, seed: int) -> list[int]:
    """The first ``num`` of ``n_total`` items, or (``random``) a seeded subset of ``num``, sorted; all
    when ``num`` is None or larger (with a warning). ``arvid eval fvd`` draws its sets the same way."""
    if num is not None and num < 1:
        raise ValueError(f"the number of clips must be >= 1 or null (all), got {num}")
    if num is not None and num > n_total:
        log.warning("asked for %d clips but the set has only %d: using %d", num, n_total, n_total)
    n = n_total if num is None else min(num, n_total)
    if random and n < n_total:
        return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values.tolist()
    return list(range(n))


#: the most clips a random-clips draw takes of one video (see :func:`draw_clips`)
MAX_CLIPS_PER_VIDEO = 2


def draws_several_clips(ds: Dataset) -> bool:
    """Whether ``ds`` gives another clip of a video in another epoch (files with random starts)."""
    clip = getattr(ds, "clip", None)
    return hasattr(ds, "set_epoch") and clip is not None and bool(clip.random_start)


def draw_clips(ds: Dataset, num: int | None, random: bool, seed: int, several: bool = True
               ) -> list[tuple[int, int]]:
    """``(video index, round)`` of each drawn clip. Up to one clip per video: :func:`draw_indices`
    (round 0). A ``random`` draw of more clips than videos, from a dataset with random clip starts
    (:func:`draws_several_clips`), takes every video once per full round, each round its own
    random starts (the dataset's epoch), and a seeded subset of videos for the last, partial
    round: UCF-101's 9,537 training videos give ``ucf-gfvd-10k``'s 10,000 real clips. At most
    :data:`MAX_CLIPS_PER_VIDEO` clips a video (more is capped, with a warning): a small set is not
    stretched into a large one. ``several`` False: one clip a video (generated videos, whose one
    clip is the whole file)."""
    n = len(ds)  # type: ignore[arg-type]
    if not (several and random and num is not None and num > n and n > 0 and draws_several_clips(ds)):
        return [(i, 0) for i in draw_indices(n, num, random, seed)]
    if num > MAX_CLIPS_PER_VIDEO * n:
        log.warning("asked for %d clips of %d videos: taking %d (at most %d a video)", num, n,
                    MAX_CLIPS_PER_VIDEO * n, MAX_CLIPS_PER_VIDEO)
        num = MAX_CLIPS_PER_VIDEO * n
    rounds, rest = divmod(num, n)
    pairs = [(i, r) for r in range(rounds) for i in range(n)]
    return pairs + [(i, rounds) for i in draw_indices(n, rest, True, seed + rounds)] if rest else pairs


def protocol_draw(ds: Dataset, num: int | None, protocol: FVDProtocol | None) -> list[tuple[int, int]]:
    """The real clips of a protocol: :func:`draw_clips`, random for ``random-clips`` protocols
    (seed ``protocol.seed``), else the first ``num`` videos."""
    random = protocol is not None and protocol.clip_sampling.startswith("random")
    return draw_clips(ds, num, random, protocol.seed if protocol is not None else 0)


class DrawnClips(Dataset):
    """Items ``k`` of a draw: clip ``pairs[k] = (video, round)`` of ``ds`` (the round as its epoch);
    ``index`` is ``k`` (unique per clip), ``video_index`` the video.

    A drawn file that cannot be read (``on_bad_video: skip``) is left out, not replaced: a file
    dataset then returns the next readable video instead, which may be drawn itself (and would be
    counted twice), so such an item comes back as ``{"skipped": True, "index": k, "video_index": i}``
    and :func:`_collate` drops it, counting it in the batch's ``skipped`` (the draw positions left
    out). The set is then that many clips short, which an FVD record reports as a deviation.
    """

    def __init__(self, ds: Dataset, pairs: list[tuple[int, int]]):
        self.ds, self.pairs = ds, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        i, r = self.pairs[k]
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(r)  # type: ignore[attr-defined]
        item = dict(self.ds[i])
        if int(item.get("index", i)) != i:  # video i is unreadable; the dataset gave another one
            return {"skipped": True, "index": k, "video_index": i}
        item["video_index"], item["index"] = i, k
        return item


def label_of(ds: Dataset, i: int) -> int:
    """The class label of item ``i`` without decoding it where the dataset allows."""
    if hasattr(ds, "label_of"):
        return int(ds.label_of(i))  # type: ignore[attr-defined]
    if hasattr(ds, "labels"):
        return int(ds.labels[i])  # type: ignore[attr-defined]
    return int(ds[i]["label"])


def _collate(items: list[dict]) -> dict:
    """A batch of the readable items; ``skipped``: the draw positions of those left out (see
    :class:`DrawnClips`). A batch of skipped items only has ``video`` None and empty ``index``."""
    skipped = [int(it["index"]) for it in items if it.get("skipped")]
    items = [it for it in items if not it.get("skipped")]
    return {"video": torch.stack([it["video"] for it in items]) if items else None,
            "label": torch.tensor([int(it.get("label", -1)) for it in items], dtype=torch.long),  # -1: unlabelled
            "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
            **({"video_index": torch.tensor([int(it["video_index"]) for it in items], dtype=torch.long)}
               if items and "video_index" in items[0] else {}),
            "skipped": torch.tensor(skipped, dtype=torch.long),
            # draw positions of clips that ran past their file's end (its last frame repeated)
            "padded": torch.tensor([int(it["index"]) for it in items if it.get("padded", 0) > 0], dtype=torch.long)}


class ClipSet:
    """The protocol's real clips of one split, read in globally numbered batches (see the module doc).

    ``len(clips)``: all processes' clips; :meth:`labels`: every clip's label in draw order (no
    decoding for the built-in and file datasets); :meth:`batches`: this process's batches as
    ``(j, dict(video float [b, C, T, H, W], label, index, video_index))`` where ``index`` is the
    clips' positions in the draw. A drawn file that cannot be read is left out of its batch
    (:class:`DrawnClips`; a batch left with no clip is not yielded) and counted in
    :attr:`num_skipped`.

    Under a protocol the clips are the protocol's, whatever ``data`` says about cutting them: for
    file datasets ``random_start`` is forced from the protocol's ``clip_sampling`` (``random-clips``:
    a random start; ``one-clip-per-video:first-16``: the first frames), the starts are seeded with
    ``protocol.seed`` (not ``data.seed``) and there are no flips, so the clips (and the statistics
    saved for them) are those of ``arvid eval fvd`` under that protocol. A ``generator`` protocol
    (``synthetic``) leaves the data's settings alone. :attr:`protocol` is the protocol with
    ``split`` set to the split read, as every result records it.
    """

    def __init__(self, data: DataConfig, split: str, num: int | None, protocol: str | FVDProtocol | None,
                 batch_size: int, workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = build_dataset(data, split=split)  # type: ignore[arg-type]
        p = get_protocol(protocol) if protocol is not None else None
        self.protocol = dataclasses.replace(p, split=split) if p is not None else None
        if p is not None and p.fixed_set and isinstance(self.dataset, VideoFileDataset):
            self.dataset.cut_as_protocol(random_start=p.clip_sampling.startswith("random"), seed=p.seed)
        self.data = data
        self.num_skipped = 0  # drawn clips of this process left out (unreadable files), over all passes
        self.num_padded = 0  # drawn clips of this process that ran past their file's end, over all passes
        self.pairs = protocol_draw(self.dataset, num, self.protocol)  # (video, round) per clip
        if not self.pairs:
            where = f"root {data.root!r}" if data.root else "the synthetic set (num_videos / num_val_videos)"
            raise ValueError(f"the {split!r} split of the data ({data.source}, {where}) has no clips")
        self.split, self.batch_size, self.workers = split, batch_size, workers
        self.rank, self.world = dist_info()

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_batches(self) -> int:
        return -(-len(self.pairs) // self.batch_size)

    def my_batches(self) -> list[int]:
        """This process's global batch numbers."""
        return list(range(self.rank, self.num_batches, self.world))

    def positions(self, j: int) -> range:
        """Draw positions of global batch ``j``."""
        return range(j * self.batch_size, min((j + 1) * self.batch_size, len(self.pairs)))

    def describe(self) -> dict:
        """The set these clips are drawn from, as statistics files record it (``FeatureStats.clips``):
        data ``source``, ``root`` (``val_root`` for a held-out split that has one), ``split``,
        ``seed`` (the one the clips depend on: synthetic content, or random starts and flips of
        files; None: none), ``drawn`` (N) and ``available`` (the split's videos)."""
        d, ds = self.data, self.dataset
        stride = fps = None
        if isinstance(ds, VideoFileDataset):
            seed = ds.seed if ds.clip.random_start or ds.clip.flip else None
            stride, fps = ds.clip.frame_stride, ds.clip.fps
        else:
            seed = d.seed
        root = d.val_root if self.split != "train" and d.val_root else d.root
        return clips_record(d.source, str(Path(root).resolve()) if root else None, self.split, seed, len(self.pairs),
                            len(self.dataset), stride, fps)  # type: ignore[arg-type]

    def labels(self) -> torch.Tensor:
        """``LongTensor[N]``: every drawn clip's label, in draw order."""
        return torch.tensor([label_of(self.dataset, i) for i, _ in self.pairs], dtype=torch.long)

    def batches(self, desc: str | None = None) -> Iterator[tuple[int, dict]]:
        mine = self.my_batches()
        plan = [list(self.positions(j)) for j in mine]
        loader = DataLoader(DrawnClips(self.dataset, self.pairs), batch_sampler=plan, num_workers=self.workers,
                            collate_fn=_collate)
        bar = progress(sum(len(b) for b in plan), desc or f"{self.split} clips")
        skipped = padded = 0
        try:
            for j, batch in zip(mine, loader):
                skipped += batch["skipped"].numel()
                padded += batch["padded"].numel()
                bar.update(batch["index"].numel() + batch["skipped"].numel())
                if batch["video"] is not None:
                    yield j, batch
        finally:
            bar.close()
            if padded:
                self.num_padded += padded
                log.warning("%s split: %d clips of this process are longer than their files: their last frame "
                            "repeats to fill them (shorter videos than the protocol's clips?)", self.split, padded)
            if skipped:
                self.num_skipped += skipped
                log.warning("%s split: %d drawn clips of this process were left out (unreadable files); the "
                            "set is that many clips short", self.split, skipped)


class FVDSides:
    """One real side and named fake sides of FVD, one shared I3D, reduced across processes.

    ``clips``: the real clips (a :class:`ClipSet`); their split goes into the protocol every result
    records, and their set (data source, root, split, seed, N drawn, set size) into the saved
    statistics. ``real_stats``: a ``.npz`` of real-side statistics (``arvid eval fvd --save-stats``
    or ``save_real_stats`` of an earlier run); checked against the protocol, backbone and weights,
    and against ``clips``: a file whose data source, split, seed or N drawn differ is refused
    (fields the file does not record are not compared; a different root only warns, as data can
    move). Then :meth:`add_real` is not needed (and :attr:`needs_real` is False).
    """

    def __init__(self, protocol: str | FVDProtocol, weights: str | None, device: torch.device,
                 real_stats: str | None = None, clips: ClipSet | None = None):
        from arvid.eval.fvd import FeatureStats, FrechetVideoDistance

        # the clips' protocol records the split they were read from
        self.protocol = clips.protocol if clips is not None and clips.protocol is not None else get_protocol(protocol)
        self.device = device
        self.real = FrechetVideoDistance(protocol=self.protocol, weights=weights, precision="fp32",
                                         batch_size=8).to(device)
        described = clips.describe() if clips is not None else None
        if described is not None:
            self.real.set_clips("real", described)
        self.fakes: dict[str, Any] = {}
        self._real_stats = None  # set once the real side is complete (loaded, or summed after its pass)
        self.real_stats_source = real_stats
        if real_stats:
            path = Path(real_stats)
            if not path.is_file():
                raise FileNotFoundError(f"real_stats {real_stats!r} does not exist (write one with "
                                        f"`arvid eval fvd REAL --save-stats FILE.npz` or save_real_stats)")
            stats = FeatureStats.load(path)
            if described is not None:
                check_clips(path, stats.clips, described)
            self._extractor()  # the fake sides need it anyway; the check compares its backbone and weights
            self.real.load_real_stats(stats)  # checks protocol key, backbone and weights
            self._real_stats = stats

    @property
    def needs_real(self) -> bool:
        """True until the real side is complete: loaded from a file, or closed by :meth:`real_side`
        after the pass that fed it (a second pass over the same clips then adds nothing)."""
        return self._real_stats is None

    def _extractor(self):
        if self.real.extractor is None:
            self.real.extractor = self.real._default_extractor()
        return self.real.extractor

    @torch.no_grad()
    def add_real(self, videos: torch.Tensor) -> None:
        """Real clips of this process's batch (nothing once the real side is complete)."""
        if not self.needs_real:
            return
        self._extractor()
        self.real.update(self._8bit(videos), real=True)

    def fake(self, name: str):
        """The fake side ``name`` (made empty on first use, so a process without batches takes part
        in the reduction like the others)."""
        from arvid.eval.fvd import FrechetVideoDistance

        m = self.fakes.get(name)
        if m is None:
            m = self.fakes[name] = FrechetVideoDistance(protocol=self.protocol, extractor=self._extractor(),
                                                        precision="fp32", batch_size=8).to(self.device)
        return m

    @torch.no_grad()
    def add_fake(self, name: str, videos: torch.Tensor) -> None:
        """Generated or reconstructed clips, float in [-1, 1], rounded to 8-bit levels first
        (:func:`arvid.data.video.as_8bit`): the same FVD as for the clips written to files and read
        back (``arvid eval fvd REAL FAKE``), as the reference code reads saved frames. Real clips
        are rounded too (:meth:`add_real`: a no-op for clips decoded from files; synthetic clips
        are then scored as written to files as well)."""
        self.fake(name).update(self._8bit(videos), real=False)

    def _8bit(self, videos: torch.Tensor) -> torch.Tensor:
        """Float clips on this device at 8-bit levels (:func:`arvid.data.video.as_8bit`; uint8 clips
        and features as they are)."""
        from arvid.data.video import as_8bit

        videos = videos.to(self.device)
        return as_8bit(videos) if videos.dim() == 5 and videos.is_floating_point() else videos

    def real_side(self):
        """The real side's statistics, summed over processes (computed once; closes the real side).
        Every process must call it (it is a collective under torchrun)."""
        if self._real_stats is None:
            self._extractor()
            self._real_stats = self.real.side_stats("real")
        return self._real_stats

    def save_real(self, path: str) -> None:
        """Write the real side's statistics (rank 0) for later runs' ``real_stats``."""
        stats = self.real_side()
        if dist_info()[0] == 0:
            stats.save(path)
            log.info("real-side FVD statistics (N = %d) written to %s", stats.n, path)

    def result(self, name: str, tokens_per_video: float | None = None, **extra: Any) -> dict:
        """The FVD record of fake side ``name`` against the real side."""
        m = self.fake(name)
        m.load_real_stats(self.real_side())
        if self.real_stats_source:
            extra.setdefault("real_stats", str(self.real_stats_source))
        return m.result(tokens_per_video=tokens_per_video, **extra).to_dict()


def clips_record(source: str, root: str | None, split: str | None, seed: int | None, drawn: int,
                 available: int, frame_stride: int | None = None, fps: float | None = None) -> dict:
    """The record of a set of clips that statistics files keep (``FeatureStats.clips``) and check
    (:data:`CHECKED_CLIP_FIELDS`): the data ``source`` (``synthetic``, ``folder``, ``csv`` ...), its
    ``root``, the ``split`` (None: files outside any split), the ``seed`` the clips depend on (None:
    none), N ``drawn``, the set's size ``available``, and for files the frames' ``frame_stride`` and
    ``fps`` resampling (None: not files, or the file's own rate). The one place its keys are written
    (:meth:`ClipSet.describe`, ``arvid eval fvd``)."""
    return {"source": source, "root": root, "split": split, "seed": seed, "drawn": drawn, "available": available,
            "frame_stride": frame_stride, "fps": fps}


#: the fields of a statistics file's ``clips`` that must equal the run's clips' (where both record them)
CHECKED_CLIP_FIELDS = ("source", "split", "seed", "drawn", "frame_stride", "fps")


def check_clips(path: str | os.PathLike, recorded: dict | None, mine: dict) -> None:
    """Refuse real statistics of other clips than ``mine`` (:meth:`ClipSet.describe`): a differing
    data source, split, seed, N drawn or frame resampling is a ValueError naming the file and the
    field. A field the file records as None (one it could not know, as the split of ``arvid eval
    fvd``'s folders) is not compared, except ``fps`` of file clips, where None is a value (the
    file's own rate). A file that does not record its clips or some fields (older versions) is
    compared on what it records, with a warning naming what was not checked; a different root only
    warns."""
    if recorded is None:
        log.warning("real_stats %s do not record the clips they were computed on (a file of an older "
                    "version): only the protocol, backbone and weights are checked", path)
        return
    files = recorded.get("frame_stride") is not None and mine.get("frame_stride") is not None
    unchecked = []
    for field in CHECKED_CLIP_FIELDS:
        if field not in recorded:
            if mine.get(field) is not None or (field == "fps" and mine.get("frame_stride") is not None):
                unchecked.append(field)
            continue
        theirs, ours = recorded[field], mine.get(field)
        if (field == "fps" and files) or (theirs is not None and ours is not None):
            if theirs != ours:
                raise ValueError(
                    f"real_stats {str(path)!r} were computed on clips with {field} {theirs!r}, but this run's "
                    f"real clips have {field} {ours!r}: statistics stand only for the clips they were computed on "
                    "(save them for these clips with save_real_stats, or leave real_stats out)")
    if unchecked:
        log.warning("real_stats %s do not record the clips' %s (a file of an older version): not checked "
                    "against this run's %s", path, ", ".join(unchecked),
                    ", ".join(f"{f}={mine.get(f)!r}" for f in unchecked))
    if recorded.get("root") and mine.get("root") and recorded["root"] != mine["root"]:
        log.warning("real_stats %s were computed on clips under %s; this run's are under %s (the same data "
                    "moved?)", path, recorded["root"], mine["root"])
