"""One data config and one factory: the built-in synthetic clips, a folder of videos, or a CSV list.

    cfg = DataConfig(source="folder", root="/data/UCF-101", frames=16, size=128)
    train = build_dataset(cfg, "train")      # items: dict(video=float32[C, T, H, W], label, index)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from arvid.config import ConfigError, doc, nested
from arvid.data.files import (
    ClipConfig,
    VideoFileDataset,
    folder_class_names,
    has_split_folders,
    read_csv_list,
)
from arvid.data.synthetic import SyntheticConfig, SyntheticVideos

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Held-out synthetic clips are drawn at these index offsets: disjoint from the train clips.
SYNTHETIC_SPLIT_OFFSET: dict[str, int] = {"train": 0, "val": 1 << 40, "test": 2 << 40}


@dataclass
class DataConfig:
    """Where clips come from and how they are cut."""

    source: Literal["synthetic", "folder", "csv"] = doc("synthetic", "synthetic clips, a folder of videos, or a CSV list")
    root: str | None = doc(None, "folder root (folder) or CSV path (csv); unused for synthetic")
    frames: int = doc(16, "frames per clip")
    size: int = doc(64, "output height = width")
    num_videos: int = doc(1024, "synthetic: clips in the train split")
    num_val_videos: int = doc(128, "synthetic: clips in the val and in the test split (disjoint from train)")
    seed: int = doc(0, "synthetic content; random clip starts and flips of file datasets")
    frame_stride: int = doc(1, "files: take every n-th frame (ignored when fps is set)")
    random_start: bool = doc(True, "files: random clip start per item and epoch; False: start of the file")
    flip: bool = doc(False, "files: random horizontal flips")
    on_bad_video: Literal["skip", "error"] = doc("skip", "files: skip undecodable files (counted) or raise")
    fps: float | None = doc(None, "files: sample at this many frames per second of video time instead of a stride")
    val_root: str | None = doc(None, "folder/csv for the val and test splits; None: root's split folders "
                                     "(root/val, root/test) or split column, else root itself")
    train_list: str | None = doc(None, "folder: UCF-101 style list of relative paths for the train split")
    val_list: str | None = doc(None, "folder: UCF-101 style list of relative paths for the val/test splits")
    on_missing_file: Literal["error", "skip"] = doc("error", "csv: a listed file that does not exist: raise, or skip and count")
    synthetic: SyntheticConfig = nested(SyntheticConfig, "synthetic: sprite count, speeds, textures")

    def __post_init__(self) -> None:
        if self.source in ("folder", "csv") and not self.root:
            raise ValueError(f"data source {self.source!r} needs `root` (a folder or a CSV path)")
        if self.frames < 1 or self.size < 1:
            raise ValueError(f"frames and size must be >= 1, got frames={self.frames}, size={self.size}")
        if self.num_videos < 0 or self.num_val_videos < 0:
            raise ValueError(f"num_videos and num_val_videos must be >= 0, got {self.num_videos}, {self.num_val_videos}")
        # checked here, not first where a dataset is built, so that the error names the config file and `data`
        if self.source == "synthetic" and self.size < 4:
            raise ValueError(f"synthetic clips need size >= 4 pixels, got {self.size}")
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive or null, got {self.fps}")

    def clip_config(self, split: str = "train") -> ClipConfig:
        """The clip settings of file datasets; held-out splits start at the first frame and never flip."""
        train = split == "train"
        return ClipConfig(frames=self.frames, size=self.size, frame_stride=self.frame_stride, fps=self.fps,
                          random_start=self.random_start and train, flip=self.flip and train,
                          on_bad_video=self.on_bad_video)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def requested(batch: dict, ids: torch.Tensor) -> torch.Tensor:
    """``bool [b]``: which items of a collated ``batch`` are the videos of dataset indices ``ids``
    asked for. A file dataset hands out the next readable video for a file it cannot decode
    (``on_bad_video: skip``) under that video's own ``index``; a stage that keeps a result per index
    leaves such items out (else the neighbour is filed twice, once under the bad file's index)."""
    return torch.as_tensor(batch.get("index", ids)).long().reshape(-1) == ids


def build_dataset(cfg: DataConfig, split: Split = "train") -> Dataset:
    """The dataset of ``cfg`` for ``split``: items ``dict(video=float32[C, T, H, W] in [-1, 1], label, index)``.

    Synthetic: ``num_videos`` train clips, ``num_val_videos`` val and test clips drawn at
    disjoint indices. Folder: ``root/<class>/*`` (or ``root/train|val|test/<class>/*``),
    restricted by ``train_list`` / ``val_list`` when given. CSV: ``path,label[,split]``.
    Held-out splits of file datasets use fixed starts and no flips, so evaluation repeats.
    """
    _check_split(split)
    if cfg.source == "synthetic":
        n = cfg.num_videos if split == "train" else cfg.num_val_videos
        return SyntheticVideos(n, frames=cfg.frames, size=cfg.size, seed=cfg.seed,
                               index_offset=SYNTHETIC_SPLIT_OFFSET[split], config=cfg.synthetic)
    clip = cfg.clip_config(split)
    root, split_arg = _split_source(cfg, split)
    if cfg.source == "folder":
        if (split == "train" and cfg.val_list and not cfg.train_list and not cfg.val_root
                and not has_split_folders(cfg.root)):
            raise ConfigError(f"data.val_list ({cfg.val_list!r}) is given without data.train_list: the train split "
                              f"would be every video under {cfg.root!r}, the held-out ones too; give train_list "
                              "(UCF-101: ucfTrainTestlist/trainlist01.txt)")
        split_list = cfg.train_list if split == "train" else cfg.val_list
        # one class list for every split, from the main root, so labels agree across splits
        return VideoFileDataset.from_folder(root, clip=clip, split=split_arg, split_list=split_list, seed=cfg.seed,
                                            class_names=folder_class_names(cfg.root))
    if cfg.source == "csv":
        # names from the whole main list, not one split's rows nor a val_root list's own (its name
        # labels are looked up in the main list's names)
        names = class_names(cfg)
        ds = VideoFileDataset.from_csv(root, clip=clip, split=split_arg, on_missing=cfg.on_missing_file,
                                       seed=cfg.seed, class_names=names)
        ds.class_names = names
        return ds
    raise ValueError(f"unknown data source {cfg.source!r}; expected 'synthetic', 'folder' or 'csv'")


def _split_source(cfg: DataConfig, split: str) -> tuple[str, str | None]:
    """(root or CSV to read, split name to select inside it) for a file dataset."""
    if split != "train" and cfg.val_root:
        return cfg.val_root, None
    if split != "train" and not _has_split(cfg):
        log.warning("data: no held-out %s split in %s (no val_root, split folders or split column); "
                    "using the training videos", split, cfg.root)
        return cfg.root, None
    return cfg.root, split


def _has_split(cfg: DataConfig) -> bool:
    if cfg.source == "folder":
        return has_split_folders(cfg.root) or cfg.val_list is not None
    if not Path(cfg.root).is_file():
        raise FileNotFoundError(f"video list {cfg.root!r} does not exist")
    with open(Path(cfg.root), newline="", encoding="utf-8-sig") as f:
        header = f.readline()
    return "split" in [c.strip() for c in header.strip().split(",")]


def class_names(cfg: DataConfig) -> list[str]:
    """The class names of ``cfg``'s data, label ``i`` is ``class_names(cfg)[i]``."""
    if cfg.source == "synthetic":
        return list(SyntheticVideos.class_names)
    if cfg.source == "folder":
        return folder_class_names(cfg.root)
    if cfg.source == "csv":
        return read_csv_list(cfg.root, check_files=False, require_labels=False)[2]  # an unlabelled split is fine
    raise ValueError(f"unknown data source {cfg.source!r}; expected 'synthetic', 'folder' or 'csv'")


def num_classes(cfg: DataConfig) -> int:
    """How many classes ``cfg``'s data has (the size of a class-conditional generator's label table)."""
    return len(class_names(cfg))
