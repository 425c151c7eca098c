"""`arvid train-tokenizer CONFIG [--stage proxy|fixed|final] [key=value ...]`: train a video tokenizer.

Stages 1 and 4 of EVATok (method.md), and the fixed-length baselines:
- ``proxy``: every sample gets a random assignment (uniform over all, or ``assignment_probs``),
  so one model reconstructs under every assignment;
- ``fixed``: one assignment for every sample (``fixed_assignment``; grid3d: its only one);
- ``final``: the router picks each sample's assignment (``router``: a trained router dir), or
  the curated choices are read from ``assignments`` (a ``.npy`` of assignment indices per
  dataset index, as ``arvid curate`` writes; -1 entries get a random assignment).

Outputs in ``out_dir``:
- ``config.yaml`` (the resolved config), ``trainer.yaml``, ``metrics.jsonl``, ``checkpoints/``
  (the Trainer's; a rerun resumes from them);
- ``tokenizer/``: the final (EMA) tokenizer, ``save_pretrained`` format;
- ``val_recon.gif`` (and ``val_recon.mp4`` where PyAV is installed): validation clips, each input
  row followed by its reconstruction row;
- ``val_metrics.json``: PSNR on validation clips (proxy: per uniform candidate count and under
  random assignments), tokens per video, codebook usage and perplexity;
- ``done``: written last.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from arvid.config import ConfigError, deep_merge, doc, load_config, nested, save_config
from arvid.data.datasets import DataConfig, build_dataset
from arvid.io import check_writable, write_json, write_text
from arvid.tokenizer.base import build_tokenizer, tokenizer_class
from arvid.tokenizer.losses import (
    FixedAssignment,
    LossConfig,
    PrecomputedAssignments,
    RandomAssignments,
    RouterAssignments,
    TokenizerTask,
    psnr,
)
from arvid.tokenizer.quantizers import code_statistics
from arvid.training import Trainer, TrainerConfig
from arvid.training.checkpoint import check_resumable

log = logging.getLogger("arvid.train_tokenizer")


@dataclass
class TokenizerSpec:
    """Which tokenizer to build: a registered name, a preset, and overrides of its config."""

    name: str = doc("evatok", "registered tokenizer name (evatok, grid3d, or a plug-in)")
    preset: str | None = doc("debug", "size preset (debug, S, B ...); null: the config class defaults")
    params: dict[str, Any] = doc({}, "overrides of the preset's config fields (nested dicts merge)")


@dataclass
class TrainTokenizerConfig:
    """The `train-tokenizer` run."""

    data: DataConfig = nested(DataConfig, "training videos (the val split is used for validation)")
    tokenizer: TokenizerSpec = nested(TokenizerSpec, "the tokenizer to train")
    loss: LossConfig = nested(LossConfig, "loss weights")
    trainer: TrainerConfig = nested(TrainerConfig, "optimisation, precision, checkpoints")
    stage: Literal["proxy", "fixed", "final"] = doc("proxy", "how each sample's assignment is chosen")
    fixed_assignment: list[int] | None = doc(None, "stage fixed: one count per block (null: the tokenizer's default)")
    assignment_probs: list[float] | str | None = doc(
        None, "stage proxy: probabilities over all assignments (a list, or a .npy path); null: uniform")
    router: str | None = doc(None, "stage final: a trained router directory (Router.from_pretrained)")
    assignments: str | None = doc(None, "stage final: .npy of assignment indices per dataset index (-1: random)")
    val_videos: int = doc(8, "validation clips for val_metrics.json and the reconstruction grid")
    val_random_assignments: int = doc(4, "proxy: random assignments per validation clip for the mean PSNR")
    fps: int = doc(8, "frame rate of the written reconstruction grid")
    out_dir: str = doc("runs/tokenizer", "output directory")

    def __post_init__(self) -> None:
        if self.stage == "final" and not (self.router or self.assignments):
            raise ValueError("stage final needs `router` (a router directory) or `assignments` (a .npy)")
        if self.stage == "final" and self.router and self.assignments:
            raise ValueError("stage final takes one source of assignments: `router` or `assignments`, not both "
                             "(the router was used and the assignments ignored)")
        if self.val_videos < 1:
            raise ValueError(f"val_videos must be >= 1, got {self.val_videos}")
        if self.val_random_assignments < 0:
            raise ValueError(f"val_random_assignments must be >= 0, got {self.val_random_assignments}")


def build_from_spec(spec: TokenizerSpec, source: str = "<config>") -> torch.nn.Module:
    """Build the tokenizer of ``spec``: preset merged (deeply) with ``params``; errors name a key as
    written, ``tokenizer.params.<key>``."""
    cls = tokenizer_class(spec.name)
    presets = cls.presets()
    if spec.preset is not None and spec.preset not in presets:
        raise ConfigError(f"{source}: tokenizer {spec.name!r} has no preset {spec.preset!r} "
                          f"(presets: {list(presets)})")
    params = deep_merge(dict(presets[spec.preset]) if spec.preset else {}, spec.params)
    return build_tokenizer(spec.name, params, preset=None, source=source, prefix="tokenizer.params.")


def _load_probs(value: list[float] | str | None, n: int) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"assignment_probs file {value!r} does not exist")
        arr = np.load(path, allow_pickle=False)
    else:
        arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (n,):
        raise ConfigError(f"assignment_probs must have {n} entries (one per assignment), got shape {arr.shape}")
    return torch.as_tensor(arr, dtype=torch.float)


def _load_router(path: str):
    from arvid.tokenizer.router import Router

    return Router.from_pretrained(path).eval()


def make_sampler(cfg: TrainTokenizerConfig, tokenizer: torch.nn.Module):
    """The per-sample assignment rule of ``cfg.stage`` (a callable ``(batch, generator) -> [B, K]``)."""
    layout = tokenizer.layout
    if cfg.stage == "proxy":
        return RandomAssignments(layout, _load_probs(cfg.assignment_probs, layout.num_assignments))
    if cfg.stage == "fixed":
        if cfg.fixed_assignment is not None:
            try:
                return FixedAssignment(layout, cfg.fixed_assignment)
            except ValueError as e:
                raise ConfigError(f"fixed_assignment {list(cfg.fixed_assignment)} does not fit the tokenizer's "
                                  f"layout {layout.frames_per_block} / {layout.candidates}: {e}") from e
        default = getattr(tokenizer, "default_assignment", None)
        a = default(1) if callable(default) else layout.uniform(layout.candidates[-1])
        return FixedAssignment(layout, a)
    if cfg.router:
        router = _load_router(cfg.router)
        r_layout = getattr(router, "layout", layout)
        if r_layout != layout:
            raise ConfigError(f"router {cfg.router!r} was trained for layout {r_layout}, "
                              f"but the tokenizer's is {layout}")
        return RouterAssignments(layout, router)
    path = Path(cfg.assignments)  # type: ignore[arg-type]
    if not path.is_file():
        raise FileNotFoundError(f"assignments file {str(path)!r} does not exist (expected a .npy from `arvid curate`)")
    return PrecomputedAssignments(layout, np.load(path, allow_pickle=False), source=str(path))


def _val_assignment_sets(cfg: TrainTokenizerConfig, tokenizer, sampler, videos: torch.Tensor,
                         gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Named assignments ``[N, K]`` to validate under."""
    layout, n = tokenizer.layout, videos.shape[0]
    if cfg.stage == "proxy":
        sets = {f"uniform_{c}": layout.uniform(c, n) for c in layout.candidates}
        for r in range(cfg.val_random_assignments):
            sets[f"random_{r}"] = layout.random_assignments(n, generator=gen)
        return sets
    if cfg.stage == "fixed" or isinstance(sampler, PrecomputedAssignments):
        if isinstance(sampler, PrecomputedAssignments):
            valid = sampler.indices[sampler.indices >= 0]
            mode = int(torch.mode(valid).values) if valid.numel() else 0
            return {"stage": layout.indices_to_assignments(torch.tensor([mode] * n))}
        return {"stage": sampler({"video": videos}, gen)}
    return {"stage": sampler({"video": videos}, gen)}


@torch.no_grad()
def validate(cfg: TrainTokenizerConfig, tokenizer, sampler, videos: torch.Tensor, out_dir: Path) -> dict:
    """PSNR / usage on ``videos [N, C, T, H, W]``; writes the grid and returns the metrics."""
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    videos = videos.to(device)
    gen = torch.Generator().manual_seed(cfg.trainer.seed + 1)
    sets = _val_assignment_sets(cfg, tokenizer, sampler, videos, gen)
    metrics: dict[str, Any] = {"stage": cfg.stage, "num_videos": int(videos.shape[0]), "psnr_by_assignment": {}}
    all_codes, grid_recon = [], None
    for name, a in sets.items():
        tv = tokenizer.encode(videos, a.to(device))
        recon = tokenizer.decode(tv).clamp(-1, 1)
        all_codes.append(tv.codes.cpu())
        metrics["psnr_by_assignment"][name] = {
            "psnr": float(psnr(recon, videos).mean()), "tokens_per_video": float(tv.lengths.float().mean())}
        if grid_recon is None or name == "stage" or name == f"uniform_{tokenizer.layout.candidates[-1]}":
            grid_recon = recon
    by = metrics["psnr_by_assignment"]
    if cfg.stage == "proxy":
        # without random assignments (val_random_assignments: 0) both come from the first uniform set;
        # before, the PSNR did and tokens_per_video was 0.0
        rand = [v for k, v in by.items() if k.startswith("random_")] or [by[next(iter(by))]]
        metrics["psnr"] = float(np.mean([v["psnr"] for v in rand]))
        metrics["tokens_per_video"] = float(np.mean([v["tokens_per_video"] for v in rand]))
        metrics["psnr_uniform"] = {str(c): by[f"uniform_{c}"]["psnr"] for c in tokenizer.layout.candidates}
    else:
        metrics["psnr"] = by["stage"]["psnr"]
        metrics["tokens_per_video"] = by["stage"]["tokens_per_video"]
    stats = code_statistics(torch.cat(all_codes), tokenizer.codebook_size)
    metrics["codebook_usage"] = stats["usage"]
    metrics["codebook_perplexity"] = stats["perplexity"]
    metrics["codebook_size"] = int(tokenizer.codebook_size)

    from arvid.data.writer import write_grid

    rows = min(videos.shape[0], 8)
    pairs = recon_grid(videos, grid_recon, rows)
    write_grid(pairs.float().cpu(), out_dir / "val_recon.gif", nrow=rows, fps=cfg.fps)
    names = ["val_recon.gif"]
    if importlib.util.find_spec("av") is not None:  # mp4 needs PyAV; the gif is always written
        write_grid(pairs.float().cpu(), out_dir / "val_recon.mp4", nrow=rows, fps=cfg.fps)
        names.append("val_recon.mp4")
    metrics["grid"] = f"{', '.join(names)} (rows: inputs, then their reconstructions)"
    return metrics


def _val_videos(cfg: TrainTokenizerConfig) -> torch.Tensor:
    ds = build_dataset(cfg.data, split="val")
    n = min(cfg.val_videos, len(ds))
    if n == 0:
        raise ValueError("the validation split is empty: cannot compute val_metrics.json")
    return torch.stack([ds[i]["video"] for i in range(n)])


def run(cfg: TrainTokenizerConfig) -> Path:
    """Train the tokenizer of ``cfg`` and write the outputs listed in the module docstring."""
    # The model's initial weights are part of the run: make them a function of the seed. Built before
    # the run directory is made, so a bad tokenizer.params key leaves nothing behind.
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = build_from_spec(cfg.tokenizer, source="train-tokenizer config")
    out = check_writable(cfg.out_dir)  # before any other check (an unwritable out_dir is named first)
    layout = tokenizer.layout
    if cfg.data.frames != layout.num_frames:
        raise ConfigError(f"data.frames={cfg.data.frames} but the tokenizer's blocks "
                          f"{layout.frames_per_block} cover {layout.num_frames} frames")
    size = getattr(tokenizer.config, "image_size", None)
    if size is not None and cfg.data.size != size:
        raise ConfigError(f"data.size={cfg.data.size} but the tokenizer expects {size}x{size} frames")
    check_resumable(TrainTokenizerConfig, cfg, out, "train-tokenizer")  # before 2026-12-07: any config resumed
    save_config(cfg, out / "config.yaml")
    sampler = make_sampler(cfg, tokenizer)
    task = TokenizerTask(tokenizer, cfg.loss, sampler)
    dataset = build_dataset(cfg.data, split="train")
    val = _val_videos(cfg)

    def eval_fn(task: TokenizerTask, step: int) -> dict:
        device = next(task.tokenizer.parameters()).device
        v = val[: min(4, len(val))].to(device)
        tv = task.tokenizer.encode(v)
        return {"psnr_default": float(psnr(task.tokenizer.decode(tv), v).mean())}

    trainer = Trainer(cfg.trainer, task, dataset, out, eval_fn=eval_fn)
    result = trainer.fit()
    final = trainer.final_model()
    final.save_pretrained(out / "tokenizer")
    metrics = validate(cfg, final, sampler, val, out)
    metrics["train"] = {"steps": int(getattr(result, "step", cfg.trainer.max_steps))}
    write_json(out / "val_metrics.json", metrics)
    log.info("train-tokenizer: PSNR %.2f dB at %.0f tokens/video, codebook usage %.1f%% -> %s",
             metrics["psnr"], metrics["tokens_per_video"], 100 * metrics["codebook_usage"], out)
    write_text(out / "done", "ok\n")
    return out


# --------------------------------------------------------------------------- CLI


def _split_stage(tokens: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--stage S`` / ``--stage=S`` out of the trailing tokens (they may follow the overrides)."""
    stage, rest, i = None, [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--stage":
            if i + 1 >= len(tokens):
                raise ConfigError("--stage needs a value: proxy, fixed or final")
            stage, i = tokens[i + 1], i + 2
            continue
        if tok.startswith("--stage="):
            stage = tok.split("=", 1)[1]
        else:
            rest.append(tok)
        i += 1
    if stage is not None and stage not in ("proxy", "fixed", "final"):
        raise ConfigError(f"--stage must be proxy, fixed or final, got {stage!r}")
    return stage, rest


def recon_grid(videos: torch.Tensor, recon: torch.Tensor, rows: int) -> torch.Tensor:
    """The clips of a ``rows``-wide grid whose rows alternate: ``rows`` inputs, then their
    reconstructions. A last, shorter chunk is padded with white clips to a whole row each (it
    shared one row, inputs beside reconstructions, before 2026-12-07)."""
    def whole_row(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_ones((rows - x.shape[0], *x.shape[1:]))]) if x.shape[0] < rows else x

    return torch.cat([torch.cat([whole_row(videos[i:i + rows]), whole_row(recon[i:i + rows])])
                      for i in range(0, videos.shape[0], rows)])


def _main(args: argparse.Namespace) -> int:
    late_stage, overrides = _split_stage(list(args.overrides))
    stage = late_stage or args.stage
    if stage:
        overrides.append(f"stage={stage}")
    cfg = load_config(TrainTokenizerConfig, args.config, overrides)
    run(cfg)
    return 0


def add_arguments(subparsers) -> None:
    """Register ``arvid train-tokenizer CONFIG [--stage S] [overrides]``."""
    p = subparsers.add_parser("train-tokenizer", help="train a video tokenizer (proxy, fixed or final stage)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (TrainTokenizerConfig)")
    p.add_argument("--stage", choices=["proxy", "fixed", "final"], default=None,
                   help="how each sample's assignment is chosen (overrides the config's `stage`)")
    # REMAINDER so that `CONFIG --stage S a=1` and `CONFIG a=1 --stage S` both parse
    p.add_argument("overrides", nargs=argparse.REMAINDER,
                   help="dotted overrides, e.g. trainer.max_steps=100 loss.gan_weight=0.1")
    p.set_defaults(func=_main)


__all__ = ["TokenizerSpec", "TrainTokenizerConfig", "add_arguments", "build_from_spec", "make_sampler", "run",
           "validate"]
