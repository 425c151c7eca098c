"""`arvid curate CONFIG [key=value ...]`: label each training video with its best assignment.

Stage 2 of EVATok (method.md): the proxy tokenizer reconstructs every video under candidate
assignments; each is scored ``R = w_q * Q - w_l * L`` (:mod:`arvid.tokenizer.reward`) and the
label is the argmax. ``mode: brute`` decodes all assignments, ``mode: beam`` walks the causal
blocks with a beam (a fraction of the decodes, exact scores for what it keeps).

Outputs in ``out_dir``:
- ``config.yaml``: the resolved config;
- ``calibration.json``: the reward normalisation (means/stds over random videos x random
  assignments), reused by a resumed run;
- ``parts/part_<first index>.npz``: per-process record shards written atomically every
  ``save_every`` videos (a rerun skips videos already in a shard, whatever the process count);
  beside a shard, ``parts/unreadable_<first index>.json`` lists the files of its stretch that could
  not be decoded (``data.on_bad_video: skip``): they get no record and no label;
- ``curation.npz``: every scored (video, assignment, per-block distortion) of the split, so a
  new ``(w_q, w_l)`` needs no decoding (:func:`arvid.tokenizer.reward.labels_for`);
- ``labels.npz`` (``video``, ``label``, ``reward``) and ``labels.npy`` (assignment index per
  dataset index, -1 where not curated: what ``train-tokenizer --stage final`` reads);
- ``stats.json``: the stats, quality term, w_q / w_l, mode, decode counts, label histogram, the
  number of unreadable videos left out;
- ``done``: written last.

Multi-process: run under ``accelerate launch``; process r takes dataset indices i with
``i % world == r``; the main process merges.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from arvid.config import ConfigError, changed_keys, config_fingerprint, doc, load_config, nested, save_config
from arvid.data.datasets import DataConfig, build_dataset, requested
from arvid.io import atomic_write, check_writable, read_json, write_json
from arvid.tokenizer.base import load_tokenizer
from arvid.tokenizer.reward import (
    QUALITY_DESCRIPTIONS,
    CurationRecords,
    Distortion,
    ProxyScorer,
    RewardStats,
    calibration_samples,
    labels_for,
    search,
)
from arvid.training.device import resolve_device

log = logging.getLogger("arvid.curate")


@dataclass
class CurateConfig:
    """Curation with the proxy tokenizer: rewards over assignments -> one label per video."""

    data: DataConfig = nested(DataConfig, "the videos to curate (use fixed clip starts: random_start: false)")
    split: Literal["train", "val", "test"] = doc("train", "dataset split to curate")
    num_videos: int | None = doc(None, "curate only the first N videos of the split (null: all)")
    tokenizer: str = doc("", "directory of the trained proxy tokenizer (save_pretrained output)")
    quality: Literal["lpips", "ssim", "mse"] = doc("lpips", "distortion of the quality term: LPIPS, 1-SSIM or MSE")
    lpips_net: Literal["alex", "vgg"] = doc("alex", "LPIPS backbone when quality is lpips")
    lpips_weights: str | None = doc(None, "explicit LPIPS weights file (default: found by arvid.eval.weights)")
    mode: Literal["brute", "beam"] = doc("brute", "search: every assignment, or block-causal beam search")
    beam_width: int = doc(2, "prefixes kept per block in beam mode")
    w_q: float = doc(1.2, "weight of the quality term")
    w_l: float = doc(0.8, "weight of the length term")
    calib_videos: int = doc(64, "random videos of the calibration pass")
    calib_assignments: int = doc(8, "random assignments per calibration video")
    stats: str | None = doc(None, "reuse this stats.json/calibration.json instead of calibrating "
                                  "(e.g. curate a held-out split with the training split's normalisation)")
    batch_size: int = doc(64, "(video, assignment) pairs decoded per forward pass")
    videos_per_step: int = doc(8, "videos searched together")
    save_every: int = doc(64, "videos per record shard (the resume granularity; a rerun skips curated videos "
                                  "whatever the shard size)", execution=True)
    num_workers: int = doc(0, "DataLoader workers reading videos", execution=True)
    device: str = doc("auto", "auto (the process's accelerator, else cpu), cpu, cuda, cuda:1 ...")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "tokenizer inference: auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    seed: int = doc(0, "seed of the calibration draw")
    out_dir: str = doc("outputs/curate", "output directory")

    def __post_init__(self) -> None:
        for name in ("beam_width", "calib_videos", "batch_size", "videos_per_step", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.calib_videos * self.calib_assignments < 2:
            raise ValueError("calibration needs at least 2 samples (calib_videos * calib_assignments)")
        if self.num_videos is not None and self.num_videos < 1:
            raise ValueError(f"num_videos must be >= 1 or null, got {self.num_videos}")
        if not (self.w_q >= 0 and self.w_l >= 0) or self.w_q == self.w_l == 0:
            raise ValueError(f"w_q and w_l must be >= 0 and not both 0 (R = w_q * Q - w_l * L: a negative weight "
                             f"rewards worse quality or more tokens), got w_q={self.w_q}, w_l={self.w_l}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ProcessInfo:
    """This process's rank and the process count (accelerate's PartialState), and a barrier."""

    rank: int = 0
    world: int = 1
    state: object | None = field(default=None, repr=False)

    def wait(self) -> None:
        if self.world > 1 and self.state is not None:
            self.state.wait_for_everyone()  # type: ignore[attr-defined]


def process_info() -> ProcessInfo:
    """Rank and world size of this process (1 process unless started by ``accelerate launch``)."""
    from accelerate import PartialState

    state = PartialState()
    return ProcessInfo(state.process_index, state.num_processes, state)


def _load_videos(dataset, indices: list[int], num_workers: int, batch: int):
    """Yield ``(indices LongTensor[b], videos float [b, C, T, H, W], unreadable list[int])`` in order.

    Items that are not the video asked for (:func:`arvid.data.datasets.requested`: an unreadable
    file's stand-in) are left out of ``indices`` / ``videos`` and their indices listed in
    ``unreadable``."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch,
                                         shuffle=False, num_workers=num_workers)
    pos = 0
    for item in loader:
        v = item["video"]
        ids = torch.tensor(indices[pos:pos + v.shape[0]], dtype=torch.long)
        pos += v.shape[0]
        keep = requested(item, ids)
        yield ids[keep], v[keep], ids[~keep].tolist()


def _calibrate(cfg: CurateConfig, scorer: ProxyScorer, dataset, n_total: int, device: torch.device) -> RewardStats:
    g = torch.Generator().manual_seed(cfg.seed)
    n = min(cfg.calib_videos, n_total)
    idx = torch.randperm(n_total, generator=g)[:n].sort().values.tolist()
    ds, ls = [], []
    for _, v, _ in _load_videos(dataset, idx, cfg.num_workers, cfg.videos_per_step):
        if not len(v):
            continue
        d, length = calibration_samples(scorer, v.to(device), cfg.calib_assignments, generator=g)
        ds.append(d)
        ls.append(length)
    return RewardStats.from_samples(np.concatenate(ds), np.concatenate(ls), cfg.quality)


def read_stats(path: str | Path) -> RewardStats:
    """RewardStats from a ``stats.json`` (key ``reward_stats``) or a ``calibration.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"reward stats {str(path)!r} do not exist")
    d = read_json(path)
    return RewardStats.from_dict(d.get("reward_stats", d), source=str(path))


def _done_videos(parts_dir: Path) -> set[int]:
    """Videos a shard holds, and unreadable videos an earlier run listed (not tried again)."""
    done: set[int] = set(_unreadable_videos(parts_dir))
    for p in sorted(parts_dir.glob("part_*.npz")):
        done.update(CurationRecords.load(p).searched_videos.tolist())
    return done


def _unreadable_videos(parts_dir: Path) -> list[int]:
    """The dataset indices that the run's processes could not decode (``unreadable_*.json``), sorted."""
    out: set[int] = set()
    for p in sorted(parts_dir.glob("unreadable_*.json")):
        out.update(int(i) for i in read_json(p)["videos"])
    return sorted(out)


def merge_parts(parts_dir: Path) -> CurationRecords:
    """All record shards, each video once (the first shard that holds it wins)."""
    parts = [CurationRecords.load(p) for p in sorted(parts_dir.glob("part_*.npz"))]
    if not parts:
        raise FileNotFoundError(f"no curation shards in {str(parts_dir)!r}")
    seen: set[int] = set()
    kept = []
    for r in parts:
        new = np.array(sorted(set(r.searched_videos.tolist()) - seen), dtype=np.int64)
        seen.update(new.tolist())
        if new.size:
            kept.append(r.select_videos(new))
    return CurationRecords.concat(kept)


def run(cfg: CurateConfig) -> Path:
    """Curate ``cfg.split``; returns ``out_dir``. Resumes from existing shards."""
    if not cfg.tokenizer:
        raise ConfigError("curate: `tokenizer` (the proxy tokenizer directory) is required")
    out = check_writable(cfg.out_dir)
    dist = process_info()
    device = resolve_device(cfg.device)
    tok = load_tokenizer(cfg.tokenizer, map_location=str(device)).eval()
    layout = tok.layout
    distortion = Distortion(cfg.quality, cfg.lpips_net, device, cfg.lpips_weights)
    distortion.check()
    scorer = ProxyScorer(tok, distortion, cfg.batch_size, precision=cfg.precision)
    dataset = build_dataset(cfg.data, cfg.split)
    n_total = len(dataset) if cfg.num_videos is None else min(cfg.num_videos, len(dataset))
    if cfg.num_videos is not None and cfg.num_videos > len(dataset):
        log.warning("curate: num_videos=%d but the %s split has %d videos: curating all %d", cfg.num_videos,
                    cfg.split, len(dataset), len(dataset))
    fp = tok.fingerprint()

    # calibration: given (every process reads it), or once on the main process (reused on resume)
    calib_path = out / "calibration.json"
    if cfg.stats:
        stats = read_stats(cfg.stats)
        if stats.quality != cfg.quality:
            raise ConfigError(f"curate: stats {cfg.stats!r} are for quality {stats.quality!r}, not {cfg.quality!r}")
    else:
        # what the calibration draw and its distortions depend on (reused on resume only if equal)
        calib_key = {"tokenizer_fingerprint": fp, "distortion": distortion.name, "lpips_weights": cfg.lpips_weights,
                     "split": cfg.split, "data": config_fingerprint(cfg.data), "num_videos": n_total,
                     "calib_videos": cfg.calib_videos, "calib_assignments": cfg.calib_assignments, "seed": cfg.seed}
        if dist.rank == 0:
            stats = None
            if calib_path.is_file():
                old = read_json(calib_path)
                if old.get("key") == calib_key:
                    stats = RewardStats.from_dict(old["reward_stats"], str(calib_path))
            if stats is None:
                stats = _calibrate(cfg, scorer, dataset, n_total, device)
            write_json(calib_path, {"reward_stats": stats.to_dict(), "quality": cfg.quality,
                                    "tokenizer_fingerprint": fp, "key": calib_key})
        dist.wait()
        stats = RewardStats.from_dict(read_json(calib_path)["reward_stats"], str(calib_path))

    parts_dir = out / "parts"
    parts_dir.mkdir(exist_ok=True)
    # shards of another tokenizer, distortion, search or video set must not be mixed into this run
    # (a beam search's choices also depend on the reward: its weights and normalisation)
    key = {"tokenizer_fingerprint": fp, "quality": cfg.quality, "distortion": distortion.name,
           "lpips_weights": cfg.lpips_weights, "mode": cfg.mode, "split": cfg.split,
           "data": config_fingerprint(cfg.data), "layout": layout.to_dict()}
    if cfg.mode == "beam":
        key.update(beam_width=cfg.beam_width, w_q=cfg.w_q, w_l=cfg.w_l, reward_stats=stats.to_dict())
    key_path = parts_dir / "run.json"
    changed = changed_keys(read_json(key_path), key) if key_path.is_file() else []
    if changed:
        raise ConfigError(f"curate: {str(parts_dir)!r} holds shards of another run ({', '.join(changed)} changed): "
                          "refusing to mix them with this one: use a new out_dir or delete it")
    if dist.rank == 0:
        # written once the run is known to continue these outputs (a refused run leaves the old one)
        save_config(cfg, out / "config.yaml")
        if not key_path.is_file():
            write_json(key_path, key)
    done = _done_videos(parts_dir)
    todo = [i for i in range(dist.rank, n_total, dist.world) if i not in done]
    log.info("curate: %d of %d videos left on process %d (%s, %d assignments, %s)", len(todo), n_total,
             dist.rank, cfg.mode, layout.num_assignments, distortion.name)
    t0 = time.time()
    recs, bad, in_part, finished = [], [], 0, 0
    # one loader for the whole run (its workers start once), a part file every save_every videos
    for ids, v, unreadable in _load_videos(dataset, todo, cfg.num_workers, cfg.videos_per_step):
        if len(ids):
            res = search(scorer, v.to(device), cfg.mode, stats, cfg.w_q, cfg.w_l, cfg.beam_width)
            recs.append(res.to_records(ids, layout, cfg.quality, cfg.mode))
        bad += unreadable
        in_part += ids.numel() + len(unreadable)
        finished += ids.numel() + len(unreadable)
        if in_part >= cfg.save_every or finished == len(todo):
            first = min([int(r.searched_videos.min()) for r in recs] + bad)
            if bad:  # before the shard: a run stopped between the two tries its videos again, not these
                write_json(parts_dir / f"unreadable_{first:09d}.json", {"videos": sorted(bad)})
                log.warning("curate: %d unreadable video(s) left out (on_bad_video: skip): %s", len(bad), sorted(bad))
            if recs:
                CurationRecords.concat(recs).save(parts_dir / f"part_{first:09d}.npz")
            recs, bad, in_part = [], [], 0
            log.info("curate: %d/%d videos (%.1f videos/s)", finished, len(todo),
                     finished / max(time.time() - t0, 1e-9))
    dist.wait()

    if dist.rank == 0:
        unreadable = [i for i in _unreadable_videos(parts_dir) if i < n_total]
        records = merge_parts(parts_dir).select_videos(np.arange(n_total))
        missing = n_total - records.searched_videos.size - len(set(unreadable) - set(records.searched_videos.tolist()))
        if missing:
            raise RuntimeError(f"curate: {missing} videos have no records after all processes finished")
        records.save(out / "curation.npz")
        vids, labels, rewards = labels_for(records, stats, cfg.w_q, cfg.w_l)
        with atomic_write(out / "labels.npz") as f:
            np.savez(f, video=vids, label=labels, reward=rewards)
        per_index = np.full(len(dataset), -1, dtype=np.int64)
        per_index[vids] = labels
        with atomic_write(out / "labels.npy") as f:
            np.save(f, per_index)
        hist = np.bincount(labels, minlength=layout.num_assignments)
        tokens = layout.all_assignments().sum(1).numpy()[labels]
        decoded = int(records.searched_decoded.sum())
        write_json(out / "stats.json", {
            "reward_stats": stats.to_dict(),
            "quality": distortion.name,
            "quality_term": cfg.quality,
            "quality_description": QUALITY_DESCRIPTIONS[cfg.quality],
            "w_q": cfg.w_q,
            "w_l": cfg.w_l,
            "mode": cfg.mode,
            "beam_width": cfg.beam_width if cfg.mode == "beam" else None,
            "split": cfg.split,
            "num_videos": int(vids.size),
            "unreadable_videos": len(unreadable),
            "layout": layout.to_dict(),
            "num_assignments": layout.num_assignments,
            "decoded_assignments": decoded,
            "decoded_fraction": decoded / float(vids.size * layout.num_assignments),
            "mean_label_tokens": float(tokens.mean()),
            "label_histogram": hist.tolist(),
            "tokenizer": str(cfg.tokenizer),
            "tokenizer_fingerprint": fp,
        })
        write_json(out / "done", {"stage": "curate", "videos": int(vids.size)})
    dist.wait()
    return out


def _main(args: argparse.Namespace) -> int:
    cfg = load_config(CurateConfig, args.config, args.overrides)
    run(cfg)
    return 0


def add_arguments(subparsers) -> None:
    """Register ``arvid curate CONFIG [overrides]``."""
    p = subparsers.add_parser("curate", help="label videos with their best assignment (proxy rewards)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (CurateConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mode=beam w_q=1.6 w_l=0.4")
    p.set_defaults(func=_main)
