"""Named FVD protocols: what is compared with what, how clips are cut, how frames reach I3D.

A number is only comparable with another number of the same protocol, so every FVD result
carries its protocol's name and settings (:meth:`FVDProtocol.describe`), the backbone and the
weights' sha256.

| name            | real set                                       | fake set                  | frames | I3D input                 |
|-----------------|------------------------------------------------|---------------------------|--------|---------------------------|
| ucf-train-rfvd  | UCF-101 train split, one 16-frame clip a video  | their reconstructions     | 16     | 128x128 -> 224x224        |
| ucf-gfvd-10k    | 10,000 train clips drawn with seed 0           | 10,000 class-cond samples | 16     | 128x128 -> 224x224        |
| ucf-gfvd-2048   | 2,048 train clips drawn with seed 0            | 2,048 samples             | 16     | 128x128 -> 224x224        |
| k600-fp-50k     | 50,000 Kinetics-600 test clips                 | 50,000 frame predictions  | 16     | frames -> 64x64 -> 224x224|
| synthetic       | arvid's built-in synthetic videos, any split   | anything                  | any    | -> 224x224                |

A protocol's ``split`` is where its real clips come from; None (``synthetic``) takes any split,
and a run records the split it used in its results and statistics files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from arvid.config import doc
from arvid.eval.i3d import RESIZE_MODES


@dataclass(frozen=True)
class FVDProtocol:
    """One evaluation protocol; every FVD result written by arvid records these fields."""

    name: str = doc("synthetic", "the protocol's name, written into every result")
    dataset: str = doc("synthetic", "dataset of the real clips (ucf101, kinetics600, synthetic, ...)")
    split: str | None = doc("train", "split of the real clips (None: any; a run records the one it used)")
    clip_sampling: str = doc("first-16", "how real clips are cut: which clip of which video (recorded in stats)")
    num_frames: int | None = doc(16, "frames per clip the protocol requires (None: any)")
    resolution: int | None = doc(128, "frame size the videos are generated / reconstructed at (None: any)")
    num_real: int | None = doc(None, "number of real clips (None: all of the split)")
    num_fake: int | None = doc(None, "number of generated clips (None: as many as real)")
    seed: int = doc(0, "seed of the real-clip draw, where clips are drawn at random")
    resize: str = doc("tf1-bilinear", "frame resize to 224x224, see arvid.eval.i3d.i3d_preprocess")
    pre_resize: int | None = doc(None, "first resize frames to this square size (K600: 64), None: no")
    task: str = doc("reconstruction", "reconstruction | class-to-video | frame-prediction | any")

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"protocol {self.name!r}: resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    def describe(self) -> dict:
        """All fields as a plain dict (for results and statistics files)."""
        return dataclasses.asdict(self)

    @property
    def fixed_set(self) -> bool:
        """Whether the real clips are a fixed set, so that "all of the split" (``num_real`` None) is a
        definite number. False for generated clips (``synthetic``): there the split's size is a
        setting (``num_videos``), and any N conforms."""
        return self.clip_sampling != "generator"

    def stats_key(self, num: int | None = None) -> str:
        """Identifies cached real-data statistics: dataset, split, clip sampling, N, frames, size, resize.

        ``num``: the N the statistics hold where it is not the protocol's (a set drawn under
        ``--num K`` / ``num_videos``), so a partial set never carries the key of the full one.
        """
        n = num if num is not None else (self.num_real if self.num_real is not None else "all")
        parts = [
            self.dataset,
            self.split or "any",
            self.clip_sampling,
            f"n{n}",
            f"seed{self.seed}",
            f"t{self.num_frames}",
            f"r{self.resolution}",
            self.resize,
            f"pre{self.pre_resize}" if self.pre_resize else "pre-none",
        ]
        return "_".join(str(p) for p in parts)


PROTOCOLS: dict[str, FVDProtocol] = {
    "ucf-train-rfvd": FVDProtocol(
        name="ucf-train-rfvd", dataset="ucf101", split="train", clip_sampling="one-clip-per-video:first-16",
        num_frames=16, resolution=128, task="reconstruction",
    ),
    "ucf-gfvd-10k": FVDProtocol(
        name="ucf-gfvd-10k", dataset="ucf101", split="train", clip_sampling="random-clips:seeded",
        num_frames=16, resolution=128, num_real=10_000, num_fake=10_000, seed=0, task="class-to-video",
    ),
    "ucf-gfvd-2048": FVDProtocol(
        name="ucf-gfvd-2048", dataset="ucf101", split="train", clip_sampling="random-clips:seeded",
        num_frames=16, resolution=128, num_real=2_048, num_fake=2_048, seed=0, task="class-to-video",
    ),
    "k600-fp-50k": FVDProtocol(
        name="k600-fp-50k", dataset="kinetics600", split="test", clip_sampling="one-clip-per-video:first-16",
        num_frames=16, resolution=None, num_real=50_000, num_fake=50_000, pre_resize=64, task="frame-prediction",
    ),
    "synthetic": FVDProtocol(
        name="synthetic", dataset="synthetic", split=None, clip_sampling="generator",
        num_frames=None, resolution=None, task="any",
    ),
}


def get_protocol(name: str | FVDProtocol) -> FVDProtocol:
    """A protocol by name (or pass one through); unknown names list the known ones."""
    if isinstance(name, FVDProtocol):
        return name
    if name not in PROTOCOLS:
        raise ValueError(f"unknown FVD protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
