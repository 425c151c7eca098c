"""Proxy rewards and curation search (method.md, stage 2).

For a video ``x`` and an assignment ``a`` (one token count per causal block) the proxy tokenizer
reconstructs ``x`` and the curation scores

    R(x, a) = w_q * Q - w_l * L,   Q = (MEAN_D - D(x, a)) / STD_D,   L = (len(a) - MEAN_L) / STD_L

where ``D`` is a distortion ("lower is better": LPIPS as in the paper, or 1 - SSIM, or MSE) and
the means/stds come from a calibration pass over random videos and random assignments
(:class:`RewardStats`). The label of ``x`` is ``argmax_a R(x, a)``.

Every distortion here is a mean of per-frame values, so it is additive over blocks:
``D(x, a) = sum_t (frames_t / T) * D_t(a_1..a_t)``, and ``D_t`` depends only on the prefix
``a_1..a_t`` because the proxy is block-causal. Two searches use that:

- :func:`brute_force_search` decodes every assignment;
- :func:`beam_search` walks the blocks in order and keeps the ``beam_width`` best prefixes by
  partial reward. To decode a prefix it fills the later blocks with the smallest count (their
  frames are ignored for the prefix score, block-causality guarantees the earlier frames do not
  depend on them), so every decode is also an exact full-assignment score that goes into the
  records; the final level decodes full assignments exactly.

Both return :class:`SearchResult` records holding the per-block distortion of every decoded
assignment, so a new ``(w_q, w_l)`` needs no new decoding (:func:`labels_for`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from arvid.data.types import BlockLayout
from arvid.training.device import inference_autocast

QualityTerm = Literal["lpips", "ssim", "mse"]
QUALITY_TERMS: tuple[str, ...] = ("lpips", "ssim", "mse")
#: what each quality term measures, written next to every number computed with it
QUALITY_DESCRIPTIONS = {
    "lpips": "LPIPS distance per frame, averaged over frames",
    "ssim": "1 - SSIM per frame (data range 2, 11x11 gaussian window), averaged over frames",
    "mse": "mean squared error per frame in [-1, 1] pixel units, averaged over frames",
}


# --------------------------------------------------------------------------- distortion


class Distortion:
    """Per-frame distortion between a video and its reconstruction ("lower is better").

    ``quality``: ``lpips`` (``arvid.eval.lpips.LPIPS``, imported on first use), ``ssim`` (1 - SSIM)
    or ``mse``. No work happens in the constructor; the LPIPS network is built lazily.
    """

    def __init__(self, quality: str = "lpips", lpips_net: str = "alex", device: str | torch.device = "cpu",
                 lpips_weights: str | os.PathLike | None = None):
        if quality not in QUALITY_TERMS:
            raise ValueError(f"quality must be one of {QUALITY_TERMS}, got {quality!r}")
        self.quality = quality
        self.lpips_net = lpips_net
        self.lpips_weights = lpips_weights
        self.device = torch.device(device)
        self._lpips: torch.nn.Module | None = None

    @property
    def name(self) -> str:
        """The name written into every output: ``lpips[alex]``, ``1-ssim`` or ``mse``."""
        return {"lpips": f"lpips[{self.lpips_net}]", "ssim": "1-ssim", "mse": "mse"}[self.quality]

    def _lpips_module(self) -> torch.nn.Module:
        if self._lpips is None:
            from arvid.eval.lpips import LPIPS  # heavy: only when LPIPS is the quality term

            net = LPIPS(net=self.lpips_net, weights=self.lpips_weights)
            net.load()  # fail here, naming the missing weights, not deep inside a search
            self._lpips = net.to(self.device).eval().requires_grad_(False)
        return self._lpips

    def check(self) -> None:
        """Load what the quality term needs now (LPIPS weights), so a stage fails before any work."""
        if self.quality == "lpips":
            self._lpips_module()

    @torch.no_grad()
    def per_frame(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x, y``: ``float [B, C, T, H, W]`` in [-1, 1] -> distortion per frame, ``float32 [B, T]``."""
        if x.shape != y.shape or x.dim() != 5:
            raise ValueError(f"expected two videos of equal shape [B, C, T, H, W], got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        B, _, T = x.shape[:3]
        side = min(x.shape[-2:])
        need = {"ssim": 11, "lpips": 31 if self.lpips_net == "alex" else 16}.get(self.quality, 1)
        if side < need:
            raise ValueError(f"quality term {self.name} needs frames of at least {need}x{need} pixels, got "
                             f"{tuple(x.shape[-2:])}; use quality: mse for smaller clips")
        if self.quality == "mse":
            return (x.float() - y.float()).pow(2).mean(dim=(1, 3, 4))
        # image metrics see frames as a batch: [B, C, T, H, W] -> [B*T, C, H, W]
        xf = x.transpose(1, 2).flatten(0, 1).float().to(self.device)
        yf = y.transpose(1, 2).flatten(0, 1).float().to(self.device)
        if self.quality == "ssim":
            from torchmetrics.functional.image import structural_similarity_index_measure as ssim

            d = 1.0 - ssim(yf, xf, data_range=2.0, reduction="none")
        else:
            d = self._lpips_module()(xf, yf).reshape(-1)
        return d.float().reshape(B, T).to(x.device)  # [B*T] -> [B, T]


def block_weights(layout: BlockLayout) -> np.ndarray:
    """``frames_t / T`` per block, ``float64 [K]``: block distortions sum to the video's."""
    f = np.asarray(layout.frames_per_block, dtype=np.float64)
    return f / f.sum()


def per_block(frame_values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``[B, T]`` per-frame values -> ``[B, K]`` mean over each block's frames."""
    if frame_values.shape[-1] != layout.num_frames:
        raise ValueError(f"got {frame_values.shape[-1]} frames, the layout has {layout.num_frames}")
    return torch.stack([frame_values[:, s:s + n].mean(1)
                        for s, n in zip(layout.block_starts, layout.frames_per_block)], dim=1)


# --------------------------------------------------------------------------- reward


@dataclass
class RewardStats:
    """Normalisation of the two reward terms, from a calibration pass (random videos x random
    assignments). ``std`` is the unbiased (ddof=1) sample standard deviation."""

    quality: str
    mean_distortion: float
    std_distortion: float
    mean_length: float
    std_length: float
    num_samples: int

    def __post_init__(self) -> None:
        for name in ("std_distortion", "std_length"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"RewardStats.{name} must be a positive finite number, got {v!r}")
        for name in ("mean_distortion", "mean_length"):
            # a NaN mean made every reward NaN, and labels_for then labelled each video with index 0
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"RewardStats.{name} must be a finite number, got {v!r}")

    @classmethod
    def from_samples(cls, distortions: np.ndarray, lengths: np.ndarray, quality: str) -> RewardStats:
        """Means and stds of calibration samples ``distortions [N]``, ``lengths [N]`` (N >= 2)."""
        d = np.asarray(distortions, dtype=np.float64).reshape(-1)
        n = np.asarray(lengths, dtype=np.float64).reshape(-1)
        if d.size < 2 or d.size != n.size:
            raise ValueError(f"calibration needs >= 2 paired samples, got {d.size} distortions and {n.size} lengths")
        # a layout with one candidate has no length spread; 1.0 keeps L = 0 instead of NaN
        std_l = float(n.std(ddof=1)) or 1.0
        std_d = float(d.std(ddof=1)) or 1e-12
        return cls(quality, float(d.mean()), std_d, float(n.mean()), std_l, int(d.size))

    def to_dict(self) -> dict:
        return {"quality": self.quality, "mean_distortion": self.mean_distortion,
                "std_distortion": self.std_distortion, "mean_length": self.mean_length,
                "std_length": self.std_length, "num_samples": self.num_samples}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<stats>") -> RewardStats:
        keys = ("quality", "mean_distortion", "std_distortion", "mean_length", "std_length", "num_samples")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"{source}: reward stats miss keys {missing}")
        values = []
        for key, kind in zip(keys[1:], (float, float, float, float, int)):
            try:
                values.append(kind(d[key]))
            except (TypeError, ValueError):
                raise ValueError(f"{source}: reward stats key {key!r} must be a number, got {d[key]!r}") from None
        try:
            return cls(str(d["quality"]), *values)
        except ValueError as e:  # __post_init__'s checks, which do not know the file
            raise ValueError(f"{source}: {e}") from e


def compute_reward(distortion, length, stats: RewardStats, w_q: float, w_l: float):
    """``R = w_q * (MEAN_D - D) / STD_D - w_l * (len - MEAN_L) / STD_L``, elementwise.

    ``distortion`` and ``length`` are numbers, numpy arrays or tensors of one shape.
    """
    q = (stats.mean_distortion - distortion) / stats.std_distortion
    l_term = (length - stats.mean_length) / stats.std_length
    return w_q * q - w_l * l_term


def partial_reward(distortion_partial, length_partial, stats: RewardStats, w_q: float, w_l: float):
    """The prefix's share of the reward: ``-w_q * D_<=t / STD_D - w_l * len_<=t / STD_L``.

    The full reward is this at the last block plus the constant ``w_q MEAN_D/STD_D + w_l MEAN_L/STD_L``,
    so prefixes of equal depth are ranked consistently with the full reward.
    """
    return -w_q * distortion_partial / stats.std_distortion - w_l * length_partial / stats.std_length


# --------------------------------------------------------------------------- records


@dataclass
class CurationRecords:
    """Every scored (video, assignment) pair of a curation run, enough to relabel for any (w_q, w_l).

    ``video``: ``int64 [M]`` dataset index; ``assignment``: ``int64 [M]`` assignment index;
    ``block_distortion``: ``float64 [M, K]`` exact per-block distortion of the full assignment;
    ``searched_videos`` / ``searched_decoded``: ``int64 [V]`` each video once and how many
    assignments its search decoded.
    """

    layout: BlockLayout
    video: np.ndarray
    assignment: np.ndarray
    block_distortion: np.ndarray
    searched_videos: np.ndarray
    searched_decoded: np.ndarray
    quality: str = "mse"
    mode: str = "brute"
    _lengths: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.video = np.asarray(self.video, dtype=np.int64).reshape(-1)
        self.assignment = np.asarray(self.assignment, dtype=np.int64).reshape(-1)
        self.block_distortion = np.asarray(self.block_distortion, dtype=np.float64).reshape(
            -1, self.layout.num_blocks)
        self.searched_videos = np.asarray(self.searched_videos, dtype=np.int64).reshape(-1)
        self.searched_decoded = np.asarray(self.searched_decoded, dtype=np.int64).reshape(-1)
        M = self.video.size
        if self.assignment.size != M or self.block_distortion.shape[0] != M:
            raise ValueError(f"records disagree in size: {M} videos, {self.assignment.size} assignments, "
                             f"{self.block_distortion.shape[0]} distortion rows")
        if self.searched_videos.size != self.searched_decoded.size:
            raise ValueError("searched_videos and searched_decoded differ in size")
        if M and (self.assignment.min() < 0 or self.assignment.max() >= self.layout.num_assignments):
            raise ValueError(f"assignment indices out of range [0, {self.layout.num_assignments})")

    def __len__(self) -> int:
        return int(self.video.size)

    @property
    def distortion(self) -> np.ndarray:
        """``float64 [M]``: frame-weighted sum of the block distortions (= per-frame mean)."""
        return self.block_distortion @ block_weights(self.layout)

    @property
    def length(self) -> np.ndarray:
        """``int64 [M]`` tokens of each record's assignment."""
        if self._lengths is None or self._lengths.size != self.assignment.size:
            table = self.layout.all_assignments().sum(1).numpy()
            self._lengths = table[self.assignment]
        return self._lengths

    def rewards(self, stats: RewardStats, w_q: float, w_l: float) -> np.ndarray:
        """``float64 [M]`` reward of every record."""
        return compute_reward(self.distortion, self.length.astype(np.float64), stats, w_q, w_l)

    def videos(self) -> np.ndarray:
        """Sorted unique dataset indices that have records."""
        return np.unique(self.video)

    def reward_table(self, stats: RewardStats, w_q: float, w_l: float) -> tuple[np.ndarray, np.ndarray]:
        """``(videos [V], R [V, A])`` with NaN where an assignment was not scored."""
        vids = self.videos()
        table = np.full((vids.size, self.layout.num_assignments), np.nan)
        rows = np.searchsorted(vids, self.video)
        table[rows, self.assignment] = self.rewards(stats, w_q, w_l)
        return vids, table

    def distortion_table(self) -> tuple[np.ndarray, np.ndarray]:
        """``(videos [V], D [V, A])`` with NaN where an assignment was not scored."""
        vids = self.videos()
        table = np.full((vids.size, self.layout.num_assignments), np.nan)
        table[np.searchsorted(vids, self.video), self.assignment] = self.distortion
        return vids, table

    def select_videos(self, videos: np.ndarray) -> CurationRecords:
        """The records of the given dataset indices only."""
        keep = np.isin(self.video, videos)
        skeep = np.isin(self.searched_videos, videos)
        return CurationRecords(self.layout, self.video[keep], self.assignment[keep],
                               self.block_distortion[keep], self.searched_videos[skeep],
                               self.searched_decoded[skeep], self.quality, self.mode)

    @staticmethod
    def concat(items: list[CurationRecords]) -> CurationRecords:
        if not items:
            raise ValueError("cannot concatenate an empty list of CurationRecords")
        first = items[0]
        for r in items[1:]:
            if r.layout != first.layout or r.quality != first.quality:
                raise ValueError(f"records disagree: layout {r.layout} vs {first.layout}, "
                                 f"quality {r.quality!r} vs {first.quality!r}")
        return CurationRecords(
            first.layout,
            np.concatenate([r.video for r in items]),
            np.concatenate([r.assignment for r in items]),
            np.concatenate([r.block_distortion for r in items]),
            np.concatenate([r.searched_videos for r in items]),
            np.concatenate([r.searched_decoded for r in items]),
            first.quality,
            first.mode,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically."""
        from arvid.io import atomic_write

        with atomic_write(path, "wb") as f:
            np.savez(
                f,
                video=self.video,
                assignment=self.assignment,
                block_distortion=self.block_distortion,
                searched_videos=self.searched_videos,
                searched_decoded=self.searched_decoded,
                frames_per_block=np.asarray(self.layout.frames_per_block, dtype=np.int64),
                candidates=np.asarray(self.layout.candidates, dtype=np.int64),
                quality=np.asarray(self.quality),
                mode=np.asarray(self.mode),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CurationRecords:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"curation records {str(path)!r} do not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                layout = BlockLayout(tuple(int(v) for v in z["frames_per_block"]),
                                     tuple(int(v) for v in z["candidates"]))
                return cls(layout, z["video"], z["assignment"], z["block_distortion"], z["searched_videos"],
                           z["searched_decoded"], str(z["quality"]), str(z["mode"]))
        except (KeyError, ValueError, OSError) as e:
            raise ValueError(f"{str(path)!r} is not a curation records file: {e}") from e


def labels_for(records: CurationRecords, stats: RewardStats, w_q: float, w_l: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel without decoding: ``(videos [V], label [V] assignment index, best reward [V])``.

    The label is the best-rewarded scored assignment of each video; ties go to the lower index
    (which is the cheaper or equal assignment at the first differing block).
    """
    if stats.quality != records.quality:
        raise ValueError(f"stats are for quality {stats.quality!r} but the records for {records.quality!r}")
    r = records.rewards(stats, w_q, w_l)
    order = np.lexsort((records.assignment, -r, records.video))  # by video, then best reward, then index
    v_sorted = records.video[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = v_sorted[1:] != v_sorted[:-1]
    pick = order[first]
    return records.video[pick], records.assignment[pick], r[pick]


# --------------------------------------------------------------------------- scoring with the proxy


class ProxyScorer:
    """Reconstructs (video, assignment) pairs with a tokenizer and returns per-block distortions.

    ``num_decoded`` counts every assignment decoded, the cost measure of a curation search.
    """

    def __init__(self, tokenizer, distortion: Distortion, batch_size: int = 64, device: str | torch.device | None = None,
                 precision: str = "auto"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.tokenizer = tokenizer
        self.distortion = distortion
        self.batch_size = batch_size
        self.precision = precision  # arvid.training.device.inference_autocast: bf16 on CUDA by default
        self.num_decoded = 0
        if device is None:  # the tokenizer's own device: videos may stay on the host, batches move
            params = getattr(tokenizer, "parameters", None)
            first = next(iter(params()), None) if callable(params) else None
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)

    @property
    def layout(self) -> BlockLayout:
        return self.tokenizer.layout

    @torch.no_grad()
    def score(self, videos: torch.Tensor, rows: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
        """Per-block distortion of each pair.

        ``videos``: ``float [V, C, T, H, W]`` (any device: batches move to ``self.device``);
        ``rows``: ``LongTensor[N]`` row of ``videos`` of each
        pair; ``assignments``: ``LongTensor[N, K]`` token counts -> ``float64 [N, K]``.
        """
        layout = self.layout
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        assignments = layout.validate(assignments)
        if assignments.shape[0] != rows.numel():
            raise ValueError(f"{rows.numel()} rows but {assignments.shape[0]} assignments")
        out = torch.empty(rows.numel(), layout.num_blocks, dtype=torch.float64)
        for s in range(0, rows.numel(), self.batch_size):
            r = rows[s:s + self.batch_size].to(videos.device)
            x = videos.index_select(0, r).to(self.device)  # [n, C, T, H, W]
            a = assignments[s:s + self.batch_size].to(self.device)
            with inference_autocast(self.precision, self.device):
                recon = self.tokenizer.decode(self.tokenizer.encode(x, a))
            frames = self.distortion.per_frame(x, recon.to(x.dtype))  # [n, T], outside autocast
            out[s:s + r.numel()] = per_block(frames, layout).double().cpu()
            self.num_decoded += r.numel()
        return out


@dataclass
class SearchResult:
    """Records of one search over a batch of videos (rows index the batch)."""

    row: torch.Tensor  # LongTensor[M]
    assignment: torch.Tensor  # LongTensor[M] assignment index
    block_distortion: torch.Tensor  # float64 [M, K]
    num_decoded: torch.Tensor  # LongTensor[V]

    def to_records(self, video_ids: torch.Tensor | np.ndarray, layout: BlockLayout, quality: str,
                   mode: str) -> CurationRecords:
        """Map batch rows to dataset indices ``video_ids [V]``."""
        ids = torch.as_tensor(video_ids, dtype=torch.long).reshape(-1)
        return CurationRecords(layout, ids[self.row].numpy(), self.assignment.numpy(),
                               self.block_distortion.numpy(), ids.numpy(), self.num_decoded.numpy(),
                               quality, mode)

    def best(self, layout: BlockLayout, stats: RewardStats, w_q: float, w_l: float) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
        """``(assignment index [V], reward [V])`` of the best scored assignment per row."""
        rec = self.to_records(torch.arange(self.num_decoded.numel()), layout, stats.quality, "search")
        vids, labels, rewards = labels_for(rec, stats, w_q, w_l)
        out_l = torch.full((self.num_decoded.numel(),), -1, dtype=torch.long)
        out_r = torch.full((self.num_decoded.numel(),), float("nan"), dtype=torch.float64)
        out_l[torch.as_tensor(vids)] = torch.as_tensor(labels)
        out_r[torch.as_tensor(vids)] = torch.as_tensor(rewards)
        return out_l, out_r


def brute_force_search(scorer: ProxyScorer, videos: torch.Tensor) -> SearchResult:
    """Decode every assignment of every video: ``videos [V, C, T, H, W]`` -> records of V x A pairs."""
    layout = scorer.layout
    V, A = videos.shape[0], layout.num_assignments
    rows = torch.arange(V).repeat_interleave(A)  # [V*A]
    idx = torch.arange(A).repeat(V)  # [V*A]
    dist = scorer.score(videos, rows, layout.indices_to_assignments(idx))
    return SearchResult(rows, idx, dist, torch.full((V,), A, dtype=torch.long))


def beam_search(scorer: ProxyScorer, videos: torch.Tensor, stats: RewardStats, w_q: float, w_l: float,
                beam_width: int = 2) -> SearchResult:
    """Block-causal beam search: ``videos [V, C, T, H, W]`` -> records of every decoded assignment.

    Level t expands each kept prefix by every candidate of block t; a prefix is decoded as the
    full assignment ``prefix + smallest count for later blocks`` (cached: the prefix that extends
    by the smallest count is its parent's decode), scored by its partial reward over blocks <= t,
    and the ``beam_width`` best prefixes survive. The last level's decodes are full assignments,
    so the best record is scored exactly. (Ranking by the filler decode's full reward instead, which
    sees how a prefix affects later blocks, found the brute-force argmax less often in our tests.)
    Cost: at most ``C + (K-1) * beam_width * (C-1)``
    decodes per video instead of ``C**K``.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    layout = scorer.layout
    K, C = layout.num_blocks, layout.num_candidates
    V = videos.shape[0]
    cand = np.asarray(layout.candidates, dtype=np.float64)
    w = block_weights(layout)
    powers = C ** np.arange(K - 1, -1, -1)  # positions -> assignment index, first block most significant
    cache: list[dict[int, np.ndarray]] = [dict() for _ in range(V)]
    beams: list[list[tuple[int, ...]]] = [[()] for _ in range(V)]
    for t in range(K):
        # every expansion of every kept prefix, as the index of its filled-in full assignment
        expansions: list[list[tuple[tuple[int, ...], int]]] = []
        pend_rows, pend_idx = [], []
        pending: set[tuple[int, int]] = set()
        for v in range(V):
            exp_v = []
            for prefix in beams[v]:
                for c in range(C):
                    pos = prefix + (c,) + (0,) * (K - t - 1)
                    idx = int(np.dot(pos, powers))
                    exp_v.append((prefix + (c,), idx))
                    if idx not in cache[v] and (v, idx) not in pending:
                        pending.add((v, idx))
                        pend_rows.append(v)
                        pend_idx.append(idx)
            expansions.append(exp_v)
        if pend_rows:
            idx_t = torch.tensor(pend_idx, dtype=torch.long)
            dist = scorer.score(videos, torch.tensor(pend_rows), layout.indices_to_assignments(idx_t)).numpy()
            for v, idx, d in zip(pend_rows, pend_idx, dist):
                cache[v][idx] = d
        for v in range(V):
            scored = []
            for prefix, idx in expansions[v]:
                d_part = float(np.dot(cache[v][idx][:t + 1], w[:t + 1]))
                l_part = float(cand[list(prefix)].sum())
                scored.append((-partial_reward(d_part, l_part, stats, w_q, w_l), prefix))
            scored.sort()  # best partial reward first; ties by prefix (cheaper first)
            beams[v] = [p for _, p in scored[:beam_width]]
    rows, idxs, dists, counts = [], [], [], []
    for v in range(V):
        for idx in sorted(cache[v]):
            rows.append(v)
            idxs.append(idx)
            dists.append(cache[v][idx])
        counts.append(len(cache[v]))
    return SearchResult(torch.tensor(rows, dtype=torch.long), torch.tensor(idxs, dtype=torch.long),
                        torch.from_numpy(np.stack(dists)).double(), torch.tensor(counts, dtype=torch.long))


def calibration_samples(scorer: ProxyScorer, videos: torch.Tensor, per_video: int,
                        generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Score ``per_video`` random assignments of each video: ``(distortion [V*per_video], length [...])``."""
    layout = scorer.layout
    V = videos.shape[0]
    a = layout.random_assignments(V * per_video, generator=generator)  # [V*per_video, K]
    rows = torch.arange(V).repeat_interleave(per_video)
    dist = scorer.score(videos, rows, a).numpy() @ block_weights(layout)
    return dist, a.sum(1).numpy()


def search(scorer: ProxyScorer, videos: torch.Tensor, mode: Literal["brute", "beam"],
           stats: RewardStats | None = None, w_q: float = 1.2, w_l: float = 0.8,
           beam_width: int = 2) -> SearchResult:
    """Dispatch to :func:`brute_force_search` or :func:`beam_search` (which needs ``stats``)."""
    if mode == "brute":
        return brute_force_search(scorer, videos)
    if mode == "beam":
        if stats is None:
            raise ValueError("beam search ranks prefixes by reward and needs calibration stats")
        return beam_search(scorer, videos, stats, w_q, w_l, beam_width)
    raise ValueError(f"curation mode must be 'brute' or 'beam', got {mode!r}")


# --------------------------------------------------------------------------- evaluation


def reward_percentile(table: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """``P = (R(choice) - R(worst)) / (R(best) - R(worst))`` per video.

    ``table``: ``float [V, A]`` rewards of every assignment (complete rows); ``choice``: ``int [V]``
    assignment indices -> ``float64 [V]`` in [0, 1] (1 where every assignment scores the same).
    """
    table = np.asarray(table, dtype=np.float64)
    choice = np.asarray(choice, dtype=np.int64).reshape(-1)
    if table.ndim != 2 or choice.size != table.shape[0]:
        raise ValueError(f"expected table [V, A] and choice [V], got {table.shape} and {choice.shape}")
    if np.isnan(table).any():
        raise ValueError("reward_percentile needs every assignment's reward (complete rows, no NaN)")
    lo, hi = table.min(1), table.max(1)
    r = table[np.arange(table.shape[0]), choice]
    span = hi - lo
    return np.where(span > 0, (r - lo) / np.where(span > 0, span, 1.0), 1.0)


def complete_records(records: CurationRecords, scorer: ProxyScorer, load_videos) -> CurationRecords:
    """Score every assignment missing from ``records`` (beam records of held-out videos), so that
    percentiles use the true best and worst. ``load_videos(indices list[int]) -> float [n, C, T, H, W]``."""
    layout = records.layout
    A = layout.num_assignments
    vids, dist = records.distortion_table()
    extra = []
    for row, v in enumerate(vids):
        missing = np.flatnonzero(np.isnan(dist[row]))
        if missing.size == 0:
            continue
        video = load_videos([int(v)])
        idx = torch.from_numpy(missing)
        d = scorer.score(video, torch.zeros(idx.numel(), dtype=torch.long), layout.indices_to_assignments(idx))
        extra.append(CurationRecords(layout, np.full(missing.size, v), missing, d.numpy(), [], [],
                                     records.quality, records.mode))
    if not extra:
        return records
    out = CurationRecords.concat([records] + extra)
    assert (np.bincount(np.searchsorted(vids, out.video), minlength=vids.size) == A).all()
    return out


def threshold_search(scorer: ProxyScorer, videos: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """The ElasticTok-style baseline: block by block, the fewest tokens whose block distortion is
    at most the threshold (the largest count if none is), given the counts already chosen.

    ``videos [V, C, T, H, W]``, ``thresholds [S]`` -> assignments ``LongTensor[S, V, K]``. Later
    blocks are filled with the smallest count while block t is scored (block-causality); decodes
    are cached across thresholds.
    """
    layout = scorer.layout
    K, C = layout.num_blocks, layout.num_candidates
    V = videos.shape[0]
    powers = C ** np.arange(K - 1, -1, -1)
    cache: dict[tuple[int, int], np.ndarray] = {}
    out = torch.empty(len(thresholds), V, K, dtype=torch.long)
    for s, thr in enumerate(thresholds):
        prefix = [[] for _ in range(V)]
        for t in range(K):
            keys = [(v, int(np.dot(prefix[v] + [c] + [0] * (K - t - 1), powers))) for v in range(V) for c in range(C)]
            todo = sorted({k for k in keys if k not in cache})
            if todo:
                rows = torch.tensor([k[0] for k in todo])
                idx = torch.tensor([k[1] for k in todo])
                d = scorer.score(videos, rows, layout.indices_to_assignments(idx)).numpy()
                cache.update(zip(todo, d))
            for v in range(V):
                ok = [c for c in range(C) if cache[keys[v * C + c]][t] <= thr]
                prefix[v].append(ok[0] if ok else C - 1)
        pos = torch.tensor(prefix, dtype=torch.long)  # [V, K] candidate positions
        out[s] = torch.tensor(layout.candidates)[pos]
    return out
