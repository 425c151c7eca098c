"""`arvid train-router CONFIG [key=value ...]`: train the router ViT on curation labels.

Stage 3 of EVATok (method.md). The router is a classifier over all assignments of the layout,
trained with cross-entropy on the curated labels (``targets: hard``) or on soft targets
``softmax(R / tau)`` over the curated rewards (``targets: soft``), with the one Trainer.

Measured on held-out videos (a second curation run, ``val_curation``, or the last
``val_fraction`` of the curated videos): top-1 / top-5 accuracy against the reward argmax and the
reward percentile ``P = (R(router) - R(worst)) / (R(best) - R(worst))`` (the paper's measure:
accuracy is low by nature, P is what matters), next to the best uniform assignment's P and the
expected P of a random assignment. Held-out records from a beam search are completed with the
proxy tokenizer first, so best and worst are exact.

Outputs: ``config.yaml``, the Trainer's checkpoints, ``router/`` (save_pretrained),
``router_metrics.json``, ``done``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arvid.config import ConfigError, doc, from_dict, load_config, nested, read_yaml, save_config
from arvid.data.datasets import DataConfig, build_dataset
from arvid.io import check_writable, read_json, write_json
from arvid.stages.curate import read_stats
from arvid.tokenizer.base import load_tokenizer
from arvid.tokenizer.reward import (
    CurationRecords,
    Distortion,
    ProxyScorer,
    RewardStats,
    complete_records,
    labels_for,
    reward_percentile,
)
from arvid.tokenizer.router import ROUTER_PRESETS, Router
from arvid.training import StepOutput, Trainer, TrainerConfig
from arvid.training.checkpoint import check_resumable
from arvid.training.device import resolve_device

log = logging.getLogger("arvid.train_router")


@dataclass
class RouterSpec:
    preset: str = doc("S", "router size preset: " + ", ".join(ROUTER_PRESETS))
    params: dict[str, Any] = doc({}, "RouterConfig fields overriding the preset (e.g. dim, depth, dropout)")


@dataclass
class TrainRouterConfig:
    """Train the router on curated labels; evaluate its reward percentile on held-out videos."""

    data: DataConfig = nested(DataConfig, "the curated videos (same config as the curation run)")
    curation: str = doc("", "output directory of `arvid curate` on the training split")
    val_curation: str | None = doc(None, "curation directory of held-out videos (null: hold out val_fraction)")
    val_fraction: float = doc(0.1, "share of curated videos held out when val_curation is null")
    router: RouterSpec = nested(RouterSpec, "the router model")
    targets: Literal["hard", "soft"] = doc("hard", "cross-entropy on the argmax label, or on softmax(R / tau)")
    tau: float = doc(0.5, "temperature of the soft targets (reward units)")
    w_q: float | None = doc(None, "quality weight of the labels (null: the curation's)")
    w_l: float | None = doc(None, "length weight of the labels (null: the curation's)")
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=2000, batch_size=32, lr=3e-4),
                                   metadata={"help": "the Trainer (steps, batch, lr, precision, ...)"})
    eval_batch_size: int = doc(32, "videos per router forward pass at evaluation")
    device: str = doc("auto", "device for the held-out evaluation (auto: the accelerator, else cpu)")
    out_dir: str = doc("outputs/router", "output directory")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for name in ("w_q", "w_l"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 (or null: the curation's), got {value}: a negative weight "
                                 "turns the reward around")


class RouterDataset(torch.utils.data.Dataset):
    """Curated videos: ``dict(video [C, T, H, W], label int, target float32 [A] (soft only), index)``."""

    def __init__(self, base, videos: np.ndarray, labels: np.ndarray, soft: np.ndarray | None = None):
        self.base = base
        self.videos = np.asarray(videos, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.soft = None if soft is None else np.asarray(soft, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.videos.size)

    def __getitem__(self, i: int) -> dict:
        item = self.base[int(self.videos[i])]
        out = {"video": item["video"], "label": int(self.labels[i]), "index": int(self.videos[i])}
        if self.soft is not None:
            out["target"] = torch.from_numpy(self.soft[i])
        return out


class RouterTask(nn.Module):
    """The Trainer task: the router plus its loss (hard or soft cross-entropy)."""

    def __init__(self, router: Router, soft: bool = False):
        super().__init__()
        self.router = router
        self.soft = soft

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [p for p in self.router.parameters() if p.requires_grad]}

    def training_step(self, batch: dict, step: int, generator: torch.Generator) -> StepOutput:
        """``batch["video"] [B, C, T, H, W]``, ``batch["label"] [B]`` (and ``batch["target"] [B, A]``)."""
        logits = self.router(batch["video"]).float()  # [B, A]
        if self.soft:
            loss = -(batch["target"].float() * F.log_softmax(logits, -1)).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits, batch["label"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return StepOutput(losses={"main": loss}, metrics={"top1": float(acc)})

    def ema_model(self) -> nn.Module:
        return self.router


def soft_targets(table: np.ndarray, tau: float) -> np.ndarray:
    """``softmax(R / tau)`` per row of ``R [V, A]``; unscored (NaN) assignments get probability 0."""
    z = np.where(np.isnan(table), -np.inf, table / tau)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _curation(directory: str) -> tuple[CurationRecords, RewardStats, dict]:
    d = Path(directory)
    if not (d / "curation.npz").is_file():
        raise FileNotFoundError(f"{str(d)!r} holds no finished curation (curation.npz missing): run `arvid curate`")
    return CurationRecords.load(d / "curation.npz"), read_stats(d), read_json(d / "stats.json")


#: the DataConfig fields that say which video a dataset index is (not how its clip is cut)
_VIDEO_SET_FIELDS = {"synthetic": ("source", "num_videos", "num_val_videos", "seed", "synthetic"),
                     "files": ("source", "root", "val_root", "train_list", "val_list", "on_missing_file")}


def curated_data(curation: str) -> DataConfig | None:
    """The data section a curation recorded in its ``config.yaml`` (None: an older or hand-made
    curation that recorded none)."""
    path = Path(curation) / "config.yaml"
    saved = read_yaml(path).get("data") if path.is_file() else None
    return from_dict(DataConfig, saved, source=str(path), prefix="data.") if isinstance(saved, dict) else None


def check_same_videos(data: DataConfig, curation: str, what: str = "curation") -> None:
    """Refuse ``data`` whose dataset index ``i`` is another video than the curation's (its recorded
    data section): the labels are per index, and a router trained on other videos under them
    learns nothing true. Clip settings (frames, size, starts, flips) may differ."""
    theirs = curated_data(curation)
    if theirs is None:
        return  # nothing recorded to compare
    fields = _VIDEO_SET_FIELDS["synthetic" if data.source == "synthetic" else "files"]
    diff = [f for f in fields if getattr(theirs, f) != getattr(data, f)]
    if diff:
        raise ConfigError(
            f"train-router: the {what} {curation!r} labelled other videos: data "
            + ", ".join(f"{f} {getattr(theirs, f)!r} there, {getattr(data, f)!r} here" for f in diff)
            + " (its labels are per dataset index; use the data section the curation used)")


def curated_cut(data: DataConfig, curation: str) -> DataConfig:
    """``data`` with the clip starts and flips of the curation's clips (its recorded ``config.yaml``;
    without a record: fixed starts, no flips, as curation is meant to run). The held-out rewards
    are those of the curated clips, so the router is scored on those clips, not on the random
    starts or flips that ``data`` may give its training clips (before, a held-out video of a file
    dataset with ``random_start: true`` was scored on another cut of the video than its rewards'
    and its beam records were completed on that other cut)."""
    theirs = curated_data(curation)
    if theirs is not None:
        return dataclasses.replace(data, random_start=theirs.random_start, flip=theirs.flip)
    return dataclasses.replace(data, random_start=False, flip=False)


@torch.no_grad()
def evaluate_router(router: Router, dataset, records: CurationRecords, stats: RewardStats, w_q: float,
                    w_l: float, device: torch.device, batch_size: int = 32) -> dict:
    """Top-1/top-5 and reward percentiles on complete records (every assignment scored)."""
    layout = records.layout
    vids, table = records.reward_table(stats, w_q, w_l)
    router = router.to(device).eval()
    logits = []
    for s in range(0, vids.size, batch_size):
        v = torch.stack([dataset[int(i)]["video"] for i in vids[s:s + batch_size]]).to(device)
        logits.append(router(v).float().cpu())
    logits_t = torch.cat(logits)  # [V, A]
    choice = logits_t.argmax(-1).numpy()
    best = np.nanargmax(table, 1)
    top5 = logits_t.topk(min(5, layout.num_assignments), -1).indices.numpy()
    p_router = reward_percentile(table, choice)
    uniform = {}
    for c in layout.candidates:
        idx = int(layout.assignments_to_indices(layout.uniform(c))[0])
        p = reward_percentile(table, np.full(vids.size, idx))
        uniform[str(c)] = {"percentile": float(p.mean()), "mean_reward": float(table[:, idx].mean()),
                           "tokens": c * layout.num_blocks}
    best_uniform = max(uniform, key=lambda k: uniform[k]["percentile"])
    # E[P] of a uniformly random assignment, exactly: the mean over all assignments
    p_random = np.mean([reward_percentile(table, np.full(vids.size, a)) for a in range(layout.num_assignments)], 0)
    lengths = layout.all_assignments().sum(1).numpy()
    return {
        "num_videos": int(vids.size),
        "top1": float((choice == best).mean()),
        "top5": float((top5 == best[:, None]).any(1).mean()),
        "reward_percentile": float(p_router.mean()),
        "reward_percentile_best_uniform": uniform[best_uniform]["percentile"],
        "best_uniform_tokens_per_block": int(best_uniform),
        "reward_percentile_random": float(p_random.mean()),
        "uniform": uniform,
        "mean_reward_router": float(table[np.arange(vids.size), choice].mean()),
        "mean_reward_best": float(np.nanmax(table, 1).mean()),
        "mean_tokens_router": float(lengths[choice].mean()),
        "mean_tokens_label": float(lengths[best].mean()),
    }


def run(cfg: TrainRouterConfig) -> Path:
    """Train, save ``router/``, evaluate on held-out videos; returns ``out_dir``."""
    if not cfg.curation:
        raise ConfigError("train-router: `curation` (an `arvid curate` output directory) is required")
    out = check_writable(cfg.out_dir)
    check_resumable(TrainRouterConfig, cfg, out, "train-router")
    save_config(cfg, out / "config.yaml")
    records, stats, info = _curation(cfg.curation)
    w_q = float(info["w_q"] if cfg.w_q is None else cfg.w_q)
    w_l = float(info["w_l"] if cfg.w_l is None else cfg.w_l)
    layout = records.layout
    split = read_yaml(Path(cfg.curation) / "config.yaml").get("split", "train")
    check_same_videos(cfg.data, cfg.curation)
    base = build_dataset(cfg.data, split)

    vids, labels, _ = labels_for(records, stats, w_q, w_l)
    if cfg.val_curation is None:
        n_val = int(round(cfg.val_fraction * vids.size))
        if n_val < 1:
            raise ConfigError(f"train-router: val_fraction {cfg.val_fraction} of {vids.size} curated videos holds "
                              "out no video; raise it or give val_curation")
        if n_val >= vids.size:  # round() up to every video: nothing was left to train on
            raise ConfigError(f"train-router: val_fraction {cfg.val_fraction} of {vids.size} curated videos holds "
                              f"out all {n_val} of them, leaving none to train on; lower it or give val_curation")
        train_ids, val_ids = vids[:-n_val], vids[-n_val:]
        # a fresh dataset (the first epoch's cut) of the curated clips: not the training set's cut
        val_records = records.select_videos(val_ids)
        val_base = build_dataset(curated_cut(cfg.data, cfg.curation), split)
        train_labels = labels[:-n_val]
    else:
        val_records, _, val_info = _curation(cfg.val_curation)
        if val_records.layout != layout:
            raise ConfigError(f"train-router: val_curation layout {val_records.layout} differs from {layout}")
        for key in ("quality", "tokenizer_fingerprint"):  # its rewards are scored with the curation's stats
            if val_info.get(key) != info.get(key):
                raise ConfigError(
                    f"train-router: val_curation {cfg.val_curation!r} was curated with {key} {val_info.get(key)!r}, "
                    f"curation {cfg.curation!r} with {info.get(key)!r}: held-out rewards are only comparable "
                    "under one proxy and one distortion (curate the held-out split with the same ones)")
        val_split = read_yaml(Path(cfg.val_curation) / "config.yaml").get("split", "val")
        check_same_videos(cfg.data, cfg.val_curation, "val_curation")
        val_base = build_dataset(curated_cut(cfg.data, cfg.val_curation), val_split)
        train_ids, train_labels = vids, labels
    soft = None
    if cfg.targets == "soft":
        t_vids, table = records.select_videos(train_ids).reward_table(stats, w_q, w_l)
        assert np.array_equal(t_vids, train_ids)
        soft = soft_targets(table, cfg.tau)
    train_set = RouterDataset(base, train_ids, train_labels, soft)

    spec = dict(cfg.router.params)
    router_cfg = dict(ROUTER_PRESETS[cfg.router.preset]) if cfg.router.preset in ROUTER_PRESETS else None
    if router_cfg is None:
        raise ConfigError(f"train-router: unknown router preset {cfg.router.preset!r} (presets: {list(ROUTER_PRESETS)})")
    router_cfg.update(frames_per_block=layout.frames_per_block, candidates=layout.candidates,
                      image_size=cfg.data.size)
    router_cfg.update(spec)
    from arvid.tokenizer.router import RouterConfig

    router = Router(from_dict(RouterConfig, router_cfg, source=str(cfg.out_dir), prefix="router."))
    task = RouterTask(router, soft=cfg.targets == "soft")
    device = resolve_device(cfg.device)
    A = layout.num_assignments
    # held-out beam records are completed with the proxy after training: load what its quality term
    # needs (LPIPS weights) now, so a missing file fails before the training, not after it
    incomplete = bool((np.bincount(np.searchsorted(val_records.videos(), val_records.video)) < A).any())
    if incomplete:
        cur = read_yaml(Path(cfg.curation) / "config.yaml")
        distortion = Distortion(stats.quality, cur.get("lpips_net", "alex"), device, cur.get("lpips_weights"))
        distortion.check()
    trainer = Trainer(cfg.trainer, task, train_set, out)
    t0 = time.perf_counter()
    trainer.fit()
    seconds = {"train": time.perf_counter() - t0}
    final = trainer.final_model()
    # Provenance only: the router maps raw clips to assignments of the layout and holds nothing of
    # the proxy's weights, so the final tokenizer (another fingerprint, the same layout) uses it by
    # design (EVATok stages 3-4); loaders check the layout, not this fingerprint.
    final.save_pretrained(out / "router", extra={"curation": str(cfg.curation), "w_q": w_q, "w_l": w_l,
                                                 "proxy_tokenizer_fingerprint": info.get("tokenizer_fingerprint")})

    # held-out evaluation, with best/worst exact: complete beam records with the proxy
    t0 = time.perf_counter()
    if incomplete:
        tok = load_tokenizer(cur.get("tokenizer"), map_location=str(device)).eval()
        scorer = ProxyScorer(tok, distortion, int(cur.get("batch_size", 64)), precision=cur.get("precision", "auto"))
        val_records = complete_records(
            val_records, scorer, lambda ids: torch.stack([val_base[i]["video"] for i in ids]).to(device))
    seconds["complete_held_out"] = time.perf_counter() - t0  # every assignment of each held-out video
    t0 = time.perf_counter()
    metrics = evaluate_router(final, val_base, val_records, stats, w_q, w_l, device, cfg.eval_batch_size)
    seconds["evaluate"] = time.perf_counter() - t0
    metrics.update({"w_q": w_q, "w_l": w_l, "quality": info.get("quality", stats.quality),
                    "targets": cfg.targets, "train_videos": int(train_ids.size),
                    "held_out": "val_curation" if cfg.val_curation else f"last {cfg.val_fraction:.0%} of curated",
                    "seconds": {k: round(v, 2) for k, v in seconds.items()}})
    write_json(out / "router_metrics.json", metrics)
    log.info("router: top1 %.3f top5 %.3f P %.3f (best uniform %.3f, random %.3f)", metrics["top1"],
             metrics["top5"], metrics["reward_percentile"], metrics["reward_percentile_best_uniform"],
             metrics["reward_percentile_random"])
    log.info("router: %.1f s training, %.1f s completing the held-out records with the proxy, %.1f s evaluating",
             seconds["train"], seconds["complete_held_out"], seconds["evaluate"])
    write_json(out / "done", {"stage": "train-router"})
    return out


def _main(args: argparse.Namespace) -> int:
    run(load_config(TrainRouterConfig, args.config, args.overrides))
    return 0


def add_arguments(subparsers) -> None:
    """Register ``arvid train-router CONFIG [overrides]``."""
    p = subparsers.add_parser("train-router", help="train the assignment router on curation labels",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (TrainRouterConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=500 targets=soft")
    p.set_defaults(func=_main)
