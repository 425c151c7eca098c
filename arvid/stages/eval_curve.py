"""`arvid eval curve CONFIG [key=value ...]`: the quality-cost curve (EVATok Fig. 4).

On a dataset split, one tokenizer reconstructs every video under the assignments that several
policies choose, and each policy becomes points (mean tokens per video, mean distortion, PSNR):

- ``uniform``: every block gets candidate c, one point per candidate (the fixed-length baselines);
- ``max-reward``: the argmax of the proxy reward for each ``w_q`` of a sweep (``w_l = 2 - w_q``),
  read from curation records of the same videos (no search is rerun);
- ``router``: a trained router's choices (one point per ``budget_bias``);
- ``threshold``: ElasticTok's rule, per block the fewest tokens whose block distortion meets a
  threshold, for a sweep of thresholds.

Also "tokens saved at equal quality": the router's mean tokens against the uniform curve's
tokens interpolated at the router's distortion (and PSNR). rFVD is optional (``fvd: true``,
needs the I3D weights of ``arvid.eval``).

Outputs in ``out_dir``: ``curve.csv``, ``curve.json``, ``curve.png``, ``config.yaml``, ``done``.
"""

from __future__ import annotations

import argparse
import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from arvid.config import ConfigError, doc, load_config, nested, save_config
from arvid.data.datasets import DataConfig, build_dataset
from arvid.io import atomic_write, check_writable, read_json, write_json
from arvid.stages.curate import read_stats
from arvid.tokenizer.base import load_tokenizer
from arvid.tokenizer.reward import (
    QUALITY_DESCRIPTIONS,
    CurationRecords,
    Distortion,
    ProxyScorer,
    labels_for,
    threshold_search,
)
from arvid.training.device import inference_autocast, resolve_device

log = logging.getLogger("arvid.eval_curve")


@dataclass
class EvalCurveConfig:
    """Quality-cost curve of assignment policies on one dataset split."""

    data: DataConfig = nested(DataConfig, "the evaluation videos")
    split: Literal["train", "val", "test"] = doc("val", "dataset split")
    num_videos: int | None = doc(None, "the first N videos of the split (null: all)")
    tokenizer: str = doc("", "directory of the tokenizer that reconstructs (the proxy: it takes every assignment)")
    curation: str | None = doc(None, "`arvid curate` output over the same videos: max-proxy-reward points")
    w_q_sweep: list[float] = doc([0.4, 0.8, 1.2, 1.6, 2.0], "quality weights of the max-reward points (w_l = 2 - w_q)")
    router: str | None = doc(None, "trained router directory (router/ of `arvid train-router`)")
    router_budget_biases: list[float] = doc([0.0], "router points: budget biases (> 0 favours fewer tokens)")
    thresholds: list[float] | None = doc(None, "threshold baseline's distortion thresholds (null: n_thresholds "
                                               "spaced between the uniform extremes)")
    n_thresholds: int = doc(5, "automatic thresholds (0: no threshold baseline)")
    quality: Literal["lpips", "ssim", "mse"] = doc("lpips", "distortion axis: LPIPS, 1-SSIM or MSE")
    lpips_net: Literal["alex", "vgg"] = doc("alex", "LPIPS backbone")
    lpips_weights: str | None = doc(None, "explicit LPIPS weights file")
    fvd: bool = doc(False, "also compute rFVD per point (I3D weights required)")
    fvd_weights: str | None = doc(None, "explicit I3D weights file for rFVD")
    fvd_protocol: str = doc("synthetic", "FVD protocol name written into the result (arvid.eval.protocols)")
    batch_size: int = doc(32, "videos per encode/decode")
    device: str = doc("auto", "auto (accelerator, else cpu), cpu, cuda ...")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "tokenizer inference: auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    out_dir: str = doc("outputs/eval_curve", "output directory")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.n_thresholds < 0:
            raise ValueError("batch_size must be >= 1 and n_thresholds >= 0")
        bad = [w for w in self.w_q_sweep if not 0.0 <= w <= 2.0]
        if bad:
            raise ValueError(f"w_q_sweep values must lie in [0, 2] (w_l = 2 - w_q), got {bad}")


def psnr_per_video(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over frames of per-frame PSNR (data range 2 for [-1, 1] pixels): ``[B, C, T, H, W]`` -> ``[B]``."""
    mse = (x.float() - y.float().clamp(-1, 1)).pow(2).mean(dim=(1, 3, 4)).clamp_min(1e-10)  # [B, T]
    return (10 * torch.log10(4.0 / mse)).mean(1)


class _Evaluator:
    """Reconstructs the evaluation videos under given assignments; per-video tokens, distortion, PSNR."""

    def __init__(self, tok, videos: torch.Tensor, distortion: Distortion, batch_size: int, device: torch.device,
                 fvd=None, precision: str = "auto"):
        self.tok, self.videos, self.distortion, self.batch_size, self.fvd = tok, videos, distortion, batch_size, fvd
        self.device, self.precision = device, precision

    @torch.no_grad()
    def __call__(self, assignments: torch.Tensor) -> dict:
        layout = self.tok.layout
        a = layout.validate(assignments, batch=self.videos.shape[0])
        dist, psnr, recons = [], [], []
        for s in range(0, a.shape[0], self.batch_size):
            x = self.videos[s:s + self.batch_size].to(self.device)
            with inference_autocast(self.precision, self.device):
                r = self.tok.decode(self.tok.encode(x, a[s:s + self.batch_size].to(x.device)))
            r = r.to(x.dtype)
            dist.append(self.distortion.per_frame(x, r).mean(1).double().cpu())
            psnr.append(psnr_per_video(x, r).double().cpu())
            if self.fvd is not None:
                recons.append(r.clamp(-1, 1).cpu())
        out = {"tokens": float(a.sum(1).double().mean()), "distortion": float(torch.cat(dist).mean()),
               "psnr": float(torch.cat(psnr).mean()), "num_videos": int(a.shape[0])}
        if self.fvd is not None:
            out["rfvd"] = float(self.fvd(torch.cat(recons)))
        return out


def _fvd_fn(cfg: EvalCurveConfig, real: torch.Tensor, device: torch.device):
    """rFVD of reconstructions against ``real`` with arvid.eval's I3D FVD: the I3D network and
    the real side's statistics are computed once and shared by every point."""
    from arvid.eval.fvd import FrechetVideoDistance

    bs = cfg.batch_size
    base = FrechetVideoDistance(protocol=cfg.fvd_protocol, weights=cfg.fvd_weights).to(device)
    for s in range(0, real.shape[0], bs):
        base.update(real[s:s + bs].to(device), real=True)
    real_stats = base.side_stats("real")

    def fvd(fake: torch.Tensor) -> float:
        m = FrechetVideoDistance(protocol=cfg.fvd_protocol, extractor=base.extractor).to(device)
        m.load_real_stats(real_stats, check=False)
        for s in range(0, fake.shape[0], bs):
            m.update(fake[s:s + bs].to(device), real=False)
        return float(m.compute())

    return fvd


def tokens_at_equal_quality(uniform: list[dict], point: dict, key: str) -> float | None:
    """The uniform curve's tokens, linearly interpolated at ``point[key]`` (a distortion or PSNR);
    None when the point's quality lies outside the uniform points' range (no extrapolation)."""
    pts = sorted(uniform, key=lambda p: p[key])
    q = np.array([p[key] for p in pts])
    t = np.array([p["tokens"] for p in pts])
    if not (q.min() <= point[key] <= q.max()):
        return None
    return float(np.interp(point[key], q, t))


def plot_curve(points: list[dict], quality_name: str, path: str | Path) -> None:
    """The curve's PNG: tokens vs the quality term and PSNR, and vs rFVD where the points have it.

    ``points``: the ``points`` list of ``curve.json`` (so a saved curve can be redrawn:
    ``plot_curve(json.load(open("curve.json"))["points"], "lpips[alex]", "curve.png")``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("distortion", f"{quality_name} (lower is better)"), ("psnr", "PSNR (dB)")]
    if any(p.get("rfvd") is not None for p in points):
        panels.append(("rfvd", "rFVD (lower is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    styles = {"uniform": "o-", "max-reward": "s-", "router": "*", "threshold": "^--"}
    for method in ("uniform", "max-reward", "threshold", "router"):
        pts = sorted([p for p in points if p["method"] == method], key=lambda p: p["tokens"])
        for ax, (key, _) in zip(axes, panels):
            have = [p for p in pts if p.get(key) is not None]
            if have:
                ax.plot([p["tokens"] for p in have], [p[key] for p in have], styles[method], label=method,
                        markersize=14 if method == "router" else 6)
    for ax, (_, label) in zip(axes, panels):
        ax.set_ylabel(label)
        ax.set_xlabel("mean tokens per video")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("quality-cost curve")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def run(cfg: EvalCurveConfig) -> Path:
    """Compute every policy's points; write CSV, JSON and PNG; returns ``out_dir``."""
    if not cfg.tokenizer:
        raise ConfigError("eval curve: `tokenizer` is required")
    out = check_writable(cfg.out_dir)
    save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg.device)
    tok = load_tokenizer(cfg.tokenizer, map_location=str(device)).eval()
    layout = tok.layout
    dataset = build_dataset(cfg.data, cfg.split)
    n = len(dataset) if cfg.num_videos is None else min(cfg.num_videos, len(dataset))
    # held on the host; batches move to the device (a whole split may not fit on the GPU). An
    # unreadable file (on_bad_video=skip) makes the dataset hand out the next readable video under
    # the bad one's index: such items are dropped, so no video counts twice and `keep` holds the
    # dataset indices of the videos kept (the curation records are selected by them)
    items = [dataset[i] for i in range(n)]
    keep = [i for i, it in enumerate(items) if int(it.get("index", i)) == i]
    if not keep:
        raise ConfigError(f"eval curve: none of the first {n} videos of split {cfg.split!r} could be read")
    if len(keep) < n:
        log.warning("eval curve: %d of the first %d videos are unreadable and skipped", n - len(keep), n)
    videos = torch.stack([items[i]["video"] for i in keep])  # [V, C, T, H, W]
    del items
    num_skipped, n = n - len(keep), len(keep)
    distortion = Distortion(cfg.quality, cfg.lpips_net, device, cfg.lpips_weights)
    distortion.check()
    fvd = _fvd_fn(cfg, videos, device) if cfg.fvd else None
    evaluate = _Evaluator(tok, videos, distortion, cfg.batch_size, device, fvd, cfg.precision)
    points: list[dict] = []

    for c in layout.candidates:
        points.append({"method": "uniform", "param": c, **evaluate(layout.uniform(c, n))})
    if cfg.curation:
        records = CurationRecords.load(Path(cfg.curation) / "curation.npz")
        stats = read_stats(cfg.curation)
        if records.layout != layout:
            raise ConfigError(f"eval curve: curation layout {records.layout} differs from the tokenizer's {layout}")
        info = read_json(Path(cfg.curation) / "stats.json")  # the records index videos of one split, one proxy
        if info.get("split") not in (None, cfg.split):
            raise ConfigError(f"eval curve: curation {cfg.curation!r} holds records of split {info['split']!r}, but the "
                              f"curve runs on split {cfg.split!r}: its labels would be applied to other videos")
        if info.get("tokenizer_fingerprint") not in (None, tok.fingerprint()):
            raise ConfigError(f"eval curve: curation {cfg.curation!r} was made with tokenizer fingerprint "
                              f"{info['tokenizer_fingerprint']!r}, not that of {cfg.tokenizer!r} "
                              f"({tok.fingerprint()!r}): its rewards are another proxy's")
        missing = sorted(set(keep) - set(records.videos().tolist()))
        if missing:
            raise ConfigError(f"eval curve: curation {cfg.curation!r} has no records for {len(missing)} of the {n} "
                              f"videos (e.g. {missing[:5]}); curate split {cfg.split!r} with num_videos >= "
                              f"{keep[-1] + 1}")
        sel = records.select_videos(np.asarray(keep))
        for w_q in cfg.w_q_sweep:
            vids, labels, _ = labels_for(sel, stats, w_q, 2.0 - w_q)
            a = layout.indices_to_assignments(torch.from_numpy(labels[np.argsort(vids)]))
            points.append({"method": "max-reward", "param": w_q, **evaluate(a)})
    if cfg.router:
        from arvid.tokenizer.router import Router

        router = Router.from_pretrained(cfg.router, map_location=str(device)).eval()
        if router.layout != layout:
            raise ConfigError(f"eval curve: router layout {router.layout} differs from the tokenizer's {layout}")
        for bias in cfg.router_budget_biases:
            a = torch.cat([router.choose(videos[s:s + cfg.batch_size].to(device), bias).cpu()
                           for s in range(0, n, cfg.batch_size)])
            points.append({"method": "router", "param": bias, **evaluate(a)})
    thresholds = cfg.thresholds
    if thresholds is None and cfg.n_thresholds > 0:
        u = [p["distortion"] for p in points if p["method"] == "uniform"]
        thresholds = np.linspace(min(u), max(u), cfg.n_thresholds).tolist()
    if thresholds:
        scorer = ProxyScorer(tok, distortion, cfg.batch_size, device, cfg.precision)
        choices = threshold_search(scorer, videos, list(thresholds))
        for thr, a in zip(thresholds, choices):
            points.append({"method": "threshold", "param": float(thr), **evaluate(a)})

    uniform = [p for p in points if p["method"] == "uniform"]
    saved = []
    for p in points:
        if p["method"] not in ("router", "max-reward"):
            continue
        entry = {"method": p["method"], "param": p["param"], "tokens": p["tokens"]}
        for key in ("distortion", "psnr"):
            eq = tokens_at_equal_quality(uniform, p, key)
            entry[f"uniform_tokens_at_equal_{key}"] = eq
            entry[f"tokens_saved_at_equal_{key}"] = None if eq is None else 1.0 - p["tokens"] / eq
        saved.append(entry)

    fields = ["method", "param", "tokens", "distortion", "psnr", "num_videos"] + (["rfvd"] if cfg.fvd else [])
    with atomic_write(out / "curve.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(points)
    write_json(out / "curve.json", {
        "quality": distortion.name, "quality_description": QUALITY_DESCRIPTIONS[cfg.quality],
        "split": cfg.split, "num_videos": n, "num_skipped": num_skipped, "layout": layout.to_dict(), "tokenizer": cfg.tokenizer,
        "tokenizer_fingerprint": tok.fingerprint(), "points": points, "tokens_saved": saved,
        "rfvd_backbone": "i3d" if cfg.fvd else None,
        "rfvd_protocol": cfg.fvd_protocol if cfg.fvd else None,
    })
    plot_curve(points, distortion.name, out / "curve.png")
    write_json(out / "done", {"stage": "eval-curve", "points": len(points)})
    return out


def _main(args: argparse.Namespace) -> int:
    run(load_config(EvalCurveConfig, args.config, args.overrides))
    return 0


def add_arguments(eval_subparsers) -> None:
    """Register ``arvid eval curve CONFIG [overrides]`` on the ``eval`` group's subparsers."""
    p = eval_subparsers.add_parser("curve", help="quality-cost curve: uniform, max-reward, router, threshold",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (EvalCurveConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. router=outputs/router/router")
    p.set_defaults(func=_main)
