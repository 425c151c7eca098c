"""`arvid sample`: class labels / text / context frames -> token sequences -> videos.

    arvid sample --generator runs/gpt/gpt --tokenizer runs/tok/tokenizer --classes 0,3,7 --per-class 8 \\
        --cfg-scale 2.0 --top-k 0 --top-p 1.0 --seed 0 --out outputs/samples
    arvid sample --generator G --tokenizer T --context clip.mp4 --per-class 4      # frame prediction
    arvid sample --generator G --tokenizer T --text "a red ball bounces" --per-class 4
    arvid sample --generator G --tokenizer T --budget 600                          # mean tokens/video
    arvid sample --generator G --tokenizer T --fixed-assignment 64,64,128,256      # every video's counts
    arvid sample --generator G --tokenizer T --allowed-counts 64,128               # counts every block may take
    arvid sample --config sample.yaml sampler.top_k=100                            # YAML + overrides

Outputs in ``out``:
- ``config.yaml``: the resolved config;
- ``grid.mp4`` / ``grid.gif``: the first ``max_grid`` videos, ``nrow`` per row;
- ``videos/NNNNN.mp4`` (with ``save_videos``): every video on its own;
- ``tokens.npz``: ``sequences`` (packed, length tokens included), ``lengths``, ``codes``
  (packed), ``block_lengths [N, K]``, ``classes [N]`` (-1: none), ``prompt_index [N]``;
- ``sample_stats.json``: samples, seconds, samples/s (tokens only and with decoding), tokens
  per video (mean, std, min, max, per block), the budget and the calibrated length bias, the
  constraints (``fixed_assignment``, ``allowed_counts``), device and step execution (eager / CUDA
  graph); the quality for a budget comes from ``arvid eval``;
- ``done``: written last.

Multi-process (``accelerate launch``): the batches are split between processes; batch ``j`` is
seeded by ``(seed, j)``, so the samples are the same for any process count. Each process writes
``parts/part_<rank>.npz``; the main process merges them into ``tokens.npz`` and removes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from arvid.config import ConfigError, doc, load_config, nested, save_config
from arvid.data.types import TokenizedVideo
from arvid.generator.sequence import SequenceFormat
from arvid.io import atomic_write, check_writable, write_json
from arvid.sampling.budget import calibrate_budget_bias, calibration_rows
from arvid.sampling.constraints import SequenceConstraint
from arvid.sampling.frame_prediction import check_context_blocks, encode_context
from arvid.sampling.sampler import Sampler, SamplerConfig, conditioning_class
from arvid.sampling.videos import (
    batch_seed,
    check_generator_tokenizer,
    frame_size,
    iter_sample_batches,
    num_batches,
    sequence_format_for,
    training_record,
)
from arvid.training.device import inference_autocast, resolve_device

log = logging.getLogger("arvid.sample")


@dataclass
class SampleConfig:
    """What to sample, how, and where to write it."""

    generator: str = doc("", "directory of a trained GPT (GPT.save_pretrained; train-generator writes out_dir/gpt)")
    tokenizer: str = doc("", "directory of the tokenizer the GPT was trained on (decodes the tokens)")
    out: str = doc("outputs/samples", "output directory")
    classes: list[int] | None = doc(None, "class ids to sample (class-conditional GPT); None = every class")
    per_class: int = doc(8, "samples per class (and per text prompt); with --context: samples of the context "
                            "(per class with a class-conditional GPT)")
    num_samples: int = doc(16, "samples of an unconditional GPT (no classes, no text)")
    text: list[str] | None = doc(None, "text prompts (text-conditional GPT)")
    spm: str | None = doc(None, "SentencePiece model directory for text prompts (default: the spm_dir train-generator "
                                "recorded, else <generator>/spm)")
    context: str | None = doc(None, "a video file: frame prediction from its first context_frames frames")
    context_frames: int = doc(5, "context frames read from --context (Kinetics-600 protocol: 5, padded to 8)")
    context_count: int = doc(0, "fixed token count of each context block; 0 = the tokenizer's own choice (the "
                                "router's where `router` is given)")
    router: str | None = doc(None, "with --context: a trained router directory choosing the context blocks' counts "
                                   "(give the one `arvid tokenize` used for the GPT's training tokens: without it the "
                                   "context is encoded at the tokenizer's default counts)")
    sampler: SamplerConfig = nested(SamplerConfig, "guidance, temperature, top-k/top-p, length bias, execution")
    fixed_assignment: list[int] | None = doc(
        None, "one token count per block, forced on every video, e.g. [64, 64, 128, 256] (each a candidate of the "
              "tokenizer's layout; with --context, the context blocks are encoded at these counts)")
    allowed_counts: list[int] | list[list[int]] | None = doc(
        None, "the token counts the sampler may choose: one list for every block, e.g. [64, 128], or one list per "
              "block, e.g. [[64], [64, 128], [128, 256], [256]]; null = every candidate of the layout")
    budget: float = doc(0.0, "tokens per video: the mean to aim for (mode mean) or the cap (mode exact); 0 = off")
    budget_mode: Literal["mean", "exact"] = doc(
        "mean", "mean: calibrate the length bias beta to meet the mean; exact: cap every video at `budget`")
    calibration_batches: int = doc(2, "batches' worth of rows (>= 1), spread over the run, that calibrate beta (mode mean)")
    seed: int = doc(0, "run seed (batch j draws from seed (seed, j): the same samples for any process count)")
    batch_size: int = doc(16, "videos per sampling batch")
    device: str = doc("auto", "auto (this process's GPU, else cpu), cpu, cuda, cuda:1 ...")
    precision: Literal["fp32", "bf16"] = doc("fp32", "GPT weights and KV cache precision")
    save_videos: bool = doc(False, "also write every video as videos/NNNNN.mp4")
    grid_format: Literal["mp4", "gif", "both", "none"] = doc("both", "the grid file(s) to write")
    max_grid: int = doc(64, "videos in the grid")
    nrow: int = doc(8, "videos per grid row")
    fps: int = doc(8, "frames per second of written videos")

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(f"per_class, num_samples and batch_size must be >= 1, got {self.per_class}, "
                             f"{self.num_samples}, {self.batch_size}")
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0 (0 = off), got {self.budget}")
        # checked here, not once every video is sampled (max_grid -1 then failed in the merge)
        for name, least in (("max_grid", 0), ("nrow", 1), ("fps", 1), ("context_frames", 1), ("context_count", 0),
                            ("calibration_batches", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.classes is not None and not self.classes:
            raise ValueError("classes is an empty list: give class ids (e.g. --classes 0,3), or leave it out for "
                             "every class")
        if self.context is not None and self.text:
            raise ValueError("give either --context or --text, not both")
        if self.fixed_assignment is not None:
            if not self.fixed_assignment or any(c <= 0 for c in self.fixed_assignment):
                raise ValueError(f"fixed_assignment must be one positive token count per block, got "
                                 f"{self.fixed_assignment}")
            if self.budget > 0:
                raise ValueError(f"fixed_assignment {self.fixed_assignment} fixes every video at "
                                 f"{sum(self.fixed_assignment)} tokens: budget={self.budget:g} has nothing to choose; "
                                 "give one of them")
        if self.allowed_counts is not None:
            from arvid.sampling.constraints import split_allowed_counts

            what = (f"allowed_counts must be positive token counts: one list for every block, e.g. [64, 128], or "
                    f"one non-empty list per block, e.g. [[64], [64, 128]], not a mix; got {self.allowed_counts}")
            try:
                _, per_block = split_allowed_counts(self.allowed_counts)
            except ValueError:
                raise ValueError(what) from None
            if not self.allowed_counts or any(not cs or min(cs) <= 0 for cs in per_block):
                raise ValueError(what)


# --------------------------------------------------------------------------- helpers


def read_context(path: str | Path, frames: int, size: int | None) -> torch.Tensor:
    """The first ``frames`` frames of a video file -> ``float [1, C, frames, size, size]`` in [-1, 1]
    (short side resized to ``size``, then center-cropped; a shorter video repeats its last frame)."""
    import av

    from arvid.data.video import to_model

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"context video {str(path)!r} is a folder: give one video file")
    if not path.is_file():
        raise FileNotFoundError(f"context video {str(path)!r} does not exist")
    got = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                got.append(frame.to_ndarray(format="rgb24"))
                if len(got) == frames:
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"context video {str(path)!r} cannot be decoded: {e}") from e
    if not got:
        raise ValueError(f"context video {str(path)!r} has no frames")
    if len(got) < frames:
        log.warning("context video %r has %d frames, fewer than the %d asked for: its last frame repeats to "
                    "fill them", str(path), len(got), frames)
    while len(got) < frames:
        got.append(got[-1])
    video = to_model(torch.from_numpy(np.stack(got)))[None]  # [1, C, T, H, W]
    if size:
        import torch.nn.functional as F

        _, C, T, H, W = video.shape
        s = size / min(H, W)
        h, w = max(size, round(H * s)), max(size, round(W * s))
        x = video[0].permute(1, 0, 2, 3)  # [T, C, H, W]: resize frame by frame
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (h - size) // 2, (w - size) // 2
        video = x[:, :, top:top + size, left:left + size].permute(1, 0, 2, 3)[None].clamp(-1, 1)
    return video


def _spm_dir(cfg: SampleConfig, record: dict) -> str:
    """--spm, else the ``spm_dir`` train-generator recorded, else ``<generator>/spm``."""
    if cfg.spm:
        return cfg.spm
    recorded = record.get("spm_dir")
    beside = Path(cfg.generator) / "spm"
    if recorded:
        if Path(recorded).exists():
            return str(recorded)
        if beside.exists():  # the model copied beside the GPT (the default place before 2026-12-06)
            return str(beside)
        raise ConfigError(f"generator {cfg.generator!r} was trained with the SentencePiece model in {recorded!r} "
                          f"(spm_dir in {str(Path(cfg.generator) / 'config.yaml')!r}), which does not exist here: "
                          "set --spm DIR to that model")
    return str(beside)


def _encode_text(cfg: SampleConfig, gpt: Any, record: dict | None = None) -> torch.Tensor:
    from arvid.generator.text import TextEncoder

    spm = _spm_dir(cfg, record or {})
    if not Path(spm).exists():
        raise ConfigError(f"text prompts need a SentencePiece model: {spm!r} does not exist (set --spm DIR)")
    enc = TextEncoder(spm)
    recorded = (record or {}).get("spm_fingerprint")
    if recorded and recorded != enc.fingerprint:
        raise ConfigError(f"the SentencePiece model in {spm!r} is not the one generator {cfg.generator!r} was trained "
                          f"with (sha256 {enc.fingerprint[:12]}..., recorded {recorded[:12]}...): the same words "
                          "would get other ids; give that model with --spm DIR")
    pad = int(gpt.config.text_pad_id)
    if enc.pad_id != pad:
        raise ConfigError(f"the SentencePiece model in {spm!r} pads with id {enc.pad_id}, the GPT was trained "
                          f"with text_pad_id={pad}: is it the model the GPT was trained with?")
    vocab = int(gpt.config.text_vocab_size)
    if enc.vocab_size > vocab:
        raise ConfigError(f"the SentencePiece model in {spm!r} has {enc.vocab_size} pieces, the GPT's text embedding "
                          f"{vocab} (text_vocab_size): is it the model the GPT was trained with?")
    return enc.encode(list(cfg.text), max_len=int(gpt.config.max_text_len))  # [P, Lt]


@dataclass
class _Plan:
    """One row per video: its class (or -1), its prompt index (text / class), text ids, prefix."""

    classes: torch.Tensor  # [N]
    prompt_index: torch.Tensor  # [N]
    text_ids: torch.Tensor | None = None  # [N, Lt]
    prefix: TokenizedVideo | None = None  # one context's blocks, for every row

    @property
    def n(self) -> int:
        return int(self.classes.shape[0])


def plan_rows(cfg: SampleConfig, gpt: Any, tokenizer: Any, device: torch.device, record: dict | None = None,
              constraint: SequenceConstraint | None = None) -> _Plan:
    """Which videos to sample, from the config and what the GPT is conditioned on (its config, and
    ``record``: what train-generator recorded, see :func:`training_record`). ``constraint``: the
    config's, as :func:`check_constraints` returns it (made here when not given)."""
    record = record or {}
    if record.get("conditioning") == "frames" and not cfg.context:
        raise ConfigError(f"generator {cfg.generator!r} was trained for frame prediction (conditioning 'frames', "
                          f"context_blocks={record.get('context_blocks')}): give --context VIDEO, whose first blocks "
                          "it continues")
    if cfg.context and record.get("conditioning") not in (None, "frames"):
        log.warning("generator %s was trained with conditioning %r, not frame prediction: --context is a prefix it "
                    "was not trained to continue", cfg.generator, record.get("conditioning"))
    nc = int(gpt.config.num_classes)
    text_cond = int(getattr(gpt.config, "max_text_len", 0)) > 0
    if cfg.text and not text_cond:
        raise ConfigError("--text was given but this GPT has no text conditioning (max_text_len=0)")
    if text_cond and not cfg.text:
        raise ConfigError("this GPT is text-conditional: give --text prompts")
    if cfg.classes is not None and nc == 0:
        raise ConfigError("--classes was given but this GPT has no class conditioning (num_classes=0)")
    if cfg.sampler.guided and nc == 0 and not text_cond:  # else found only while sampling, outputs cleared
        raise ConfigError(f"sampler.cfg_scale={cfg.sampler.cfg_scale:g} asks for classifier-free guidance, but "
                          f"generator {cfg.generator!r} is unconditional (no classes, no text): there is no condition "
                          "to guide by; set --cfg-scale 1")
    if nc > 0:
        if cfg.num_samples != SampleConfig.__dataclass_fields__["num_samples"].default:
            log.warning("num_samples=%d is for unconditional GPTs; this one is class-conditional: it samples "
                        "per_class=%d per class (give --classes to choose them)", cfg.num_samples, cfg.per_class)
        classes = list(range(nc)) if cfg.classes is None else [int(c) for c in cfg.classes]
        bad = [c for c in classes if not 0 <= c < nc]
        if bad:
            raise ConfigError(f"class ids {bad} are outside [0, {nc}) for this GPT")
    else:
        classes = None
    if cfg.text:
        ids = _encode_text(cfg, gpt, record)  # [P, Lt]
        P = ids.shape[0]
        idx = torch.arange(P).repeat_interleave(cfg.per_class)
        cls = torch.full((idx.numel(),), -1, dtype=torch.long)
        if classes is not None:
            raise ConfigError("a GPT conditioned on both classes and text is not supported by `arvid sample`")
        return _Plan(cls, idx, text_ids=ids[idx])
    if classes is not None:
        cls = torch.tensor(classes, dtype=torch.long).repeat_interleave(cfg.per_class)
        plan = _Plan(cls, cls.clone())
    else:
        n = cfg.per_class if cfg.context else cfg.num_samples
        plan = _Plan(torch.full((n,), -1, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    if cfg.context:
        if cfg.context_count and cfg.context_count not in tokenizer.layout.candidates:
            raise ConfigError(f"context_count={cfg.context_count} is not a token count of the tokenizer "
                              f"{str(cfg.tokenizer)!r}: give one of its candidates {list(tokenizer.layout.candidates)} "
                              "(or 0: the tokenizer's own choice)")
        video = read_context(cfg.context, cfg.context_frames, frame_size(tokenizer))
        blocks = check_context_blocks(record, tokenizer.layout, cfg.context_frames, cfg.generator)
        counts: int | list[int] | None = cfg.context_count or None
        if counts is None and cfg.fixed_assignment is not None:
            counts = list(cfg.fixed_assignment[:blocks])  # the context blocks at the forced counts
        if counts is None and getattr(tokenizer, "router", None) is None:
            log.warning("sample: --context is encoded at the tokenizer's default counts; a GPT trained on "
                        "router-chosen tokens saw other context lengths: give `router` (the one `arvid tokenize` "
                        "used) or `context_count`")
        plan.prefix = encode_context(tokenizer, video, blocks, counts)
        if cfg.fixed_assignment is not None or cfg.allowed_counts is not None:
            if constraint is None:
                constraint = check_constraints(cfg, SequenceFormat(tokenizer.codebook_size, tokenizer.layout))
            try:
                constraint.check_prefix_counts(plan.prefix.block_lengths)
            except ValueError as e:
                raise ConfigError(f"--context {cfg.context!r} was encoded with block counts "
                                  f"{plan.prefix.block_lengths[0].tolist()} (context_count={cfg.context_count}), "
                                  f"which the constraints refuse: {e}; set context_count (or fixed_assignment) to "
                                  "counts they allow") from None
    return plan


def _batch_kwargs(plan: _Plan, cfg: SampleConfig) -> dict:
    """``iter_sample_batches`` arguments for the plan and the config's constraints."""
    kw: dict[str, Any] = {}
    if plan.text_ids is not None:
        kw["text_ids"] = plan.text_ids
    elif bool((plan.classes >= 0).any()):
        kw["class_ids"] = plan.classes
    else:
        kw["num_samples"] = plan.n
    if plan.prefix is not None:
        kw["prefix"] = plan.prefix  # one row: the same context for every sample
    if cfg.fixed_assignment is not None:
        kw["fixed_assignment"] = list(cfg.fixed_assignment)
    if cfg.allowed_counts is not None:
        kw["allowed_counts"] = list(cfg.allowed_counts)
    return kw


def check_constraints(cfg: SampleConfig, fmt: SequenceFormat) -> SequenceConstraint:
    """Refuse ``fixed_assignment`` / ``allowed_counts`` that do not fit the tokenizer's layout, with a
    :class:`~arvid.config.ConfigError` naming the field, the value, and the layout's blocks and
    candidates (before any sampling). Returns the constraint of one row (:func:`check_budget`
    reads it)."""
    if cfg.fixed_assignment is None and cfg.allowed_counts is None:
        return SequenceConstraint(fmt, 1)
    layout = fmt.layout
    where = (f"tokenizer {str(cfg.tokenizer)!r} has {layout.num_blocks} blocks with candidate counts "
             f"{list(layout.candidates)}")
    if cfg.fixed_assignment is not None and len(cfg.fixed_assignment) != layout.num_blocks:
        raise ConfigError(f"fixed_assignment {cfg.fixed_assignment} gives {len(cfg.fixed_assignment)} counts; the "
                          f"{where}: give one count per block")
    try:
        return SequenceConstraint(fmt, 1, cfg.allowed_counts, cfg.fixed_assignment)
    except ValueError as e:
        raise ConfigError(f"{e}; the {where}") from None


def check_budget(cfg: SampleConfig, fmt: SequenceFormat, c: SequenceConstraint,
                 prefix_counts: list[int] | None = None) -> None:
    """Refuse a budget no video can meet under the constraint ``c`` (:func:`check_constraints`'s; a
    frame-prediction prefix's blocks at their given counts), before any output is touched: an exact
    cap (``budget_mode exact``) below the fewest codes a video can have (the sampler would have to
    exceed it to keep the sequence well formed), or a mean target (``budget_mode mean``) outside
    the fewest to the most codes a video can have (the calibration failed only after ~8 sampling
    runs, once the previous run's outputs were gone)."""
    if cfg.budget <= 0:
        return
    n = len(prefix_counts or [])
    cand = torch.tensor(fmt.layout.candidates)
    smallest = sum(prefix_counts or []) + int(c.min_rest[0, n])
    where = (f"{', the context prefix included' if n else ''}; allowed_counts {cfg.allowed_counts}, "
             f"fixed_assignment {cfg.fixed_assignment}")
    if cfg.budget_mode == "mean":
        largest = sum(prefix_counts or []) + sum(int(cand[c.allowed[0, k]].max()) for k in range(n, fmt.layout.num_blocks))
        if not smallest <= cfg.budget <= largest:
            raise ConfigError(f"budget {cfg.budget:g} (budget_mode mean, a mean per video) is out of reach: a video "
                              f"has between {smallest} and {largest} tokens here{where}: give a budget in that range")
        return
    if int(cfg.budget) < smallest:
        per_block = list(prefix_counts or []) + [int(cand[c.allowed[0, k]].min()) for k in range(n, fmt.layout.num_blocks)]
        raise ConfigError(f"budget {cfg.budget:g} (budget_mode exact, a cap per video) is below the fewest tokens "
                          f"a video can have here: {smallest} (blocks at {per_block}{where}): raise budget to at "
                          f"least {smallest} or loosen the constraints")


def _calibration_cond(plan: _Plan, cfg: SampleConfig) -> tuple[Any, int]:
    """Conditioning for the budget calibration, as one batch: ``calibration_batches`` batches' worth of
    rows spread evenly over the whole run (the run lists its classes or prompts in order, so its
    first rows would often be a single class, whose lengths need not be the run's)."""
    n = min(plan.n, cfg.batch_size * cfg.calibration_batches)
    rows = calibration_rows(plan.n, n)
    Cond = conditioning_class()
    if plan.text_ids is not None:
        return Cond(text_ids=plan.text_ids[rows]), n
    if bool((plan.classes >= 0).any()):
        return Cond(class_ids=plan.classes[rows]), n
    return Cond(), n


# --------------------------------------------------------------------------- the stage


def run(cfg: SampleConfig) -> Path:
    """Sample, decode and write (see the module docstring); returns the output directory."""
    if not cfg.generator or not cfg.tokenizer:
        raise ConfigError("sample: --generator DIR and --tokenizer DIR are required")
    from accelerate import PartialState

    from arvid.generator.gpt import GPT
    from arvid.tokenizer.base import load_tokenizer

    t_start = time.perf_counter()
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    _check_out_is_not_an_input(cfg)
    out = check_writable(cfg.out)
    device = resolve_device(cfg.device)
    gpt = GPT.from_pretrained(cfg.generator, map_location=str(device)).eval()
    if cfg.precision == "bf16":
        gpt = gpt.cast_for_inference_(torch.bfloat16)
    tokenizer = load_tokenizer(cfg.tokenizer, map_location=str(device)).eval()
    unused = [n for n, on in (("--router", bool(cfg.router)),
                              ("--context-frames", cfg.context_frames != SampleConfig.context_frames)) if on]
    if unused and not cfg.context:
        log.warning("%s: only for frame prediction (--context VIDEO); ignored here", ", ".join(unused))
    if cfg.router:
        from arvid.stages.evaluate import _attach_router

        _attach_router(tokenizer, cfg.router, device, cfg.tokenizer)
    fmt = sequence_format_for(gpt, tokenizer)  # the vocabulary first: the plainer message when it differs
    check_generator_tokenizer(cfg.generator, tokenizer, cfg.tokenizer)
    constraint = check_constraints(cfg, fmt)
    plan = plan_rows(cfg, gpt, tokenizer, device, training_record(cfg.generator), constraint)
    check_budget(cfg, fmt, constraint, plan.prefix.block_lengths[0].tolist() if plan.prefix is not None else None)
    scfg = cfg.sampler
    sampler = Sampler(gpt, fmt, scfg)
    kw = _batch_kwargs(plan, cfg)
    if state.is_main_process:
        # the inputs are checked: this run replaces what a run before left in `out` (a failed run left
        # its config.yaml beside the older run's samples and done marker, before 2026-12-07)
        (out / "done").unlink(missing_ok=True)
        _clear_previous_outputs(out)
        save_config(cfg, out / "config.yaml")
    state.wait_for_everyone()  # the older outputs are gone before any process writes new ones

    beta = scfg.budget_bias
    budget_cap = None
    calibration = None
    if cfg.budget > 0 and cfg.budget_mode == "mean":
        cond, n = _calibration_cond(plan, cfg)
        extra = {k: v for k, v in kw.items() if k in ("allowed_counts", "fixed_assignment")}
        if plan.prefix is not None:
            extra["prefix"] = TokenizedVideo.cat([plan.prefix] * n)
        calibration = calibrate_budget_bias(sampler, cfg.budget, cond, batch_size=n,
                                            seed=batch_seed(cfg.seed, -1), **extra)
        beta = calibration.beta
        log.info("budget %.1f tokens/video: beta=%.4f (calibration mean %.1f)", cfg.budget, beta,
                 calibration.mean_tokens)
        scfg = dataclasses.replace(scfg, budget_bias=beta)
        sampler = Sampler(gpt, fmt, scfg)
    elif cfg.budget > 0:
        budget_cap = int(cfg.budget)

    nb = num_batches(plan.n, cfg.batch_size)
    with state.split_between_processes(list(range(nb))) as mine:
        my_batches = list(mine)
    toks, idxs, t_tokens, t_decode = [], [], 0.0, 0.0
    vid_dir = out / "videos"
    # the grid's first videos, kept as decoded for --save-videos in one process (not decoded twice)
    k_grid = min(cfg.max_grid, plan.n) if cfg.grid_format != "none" else 0
    grid_kept: list[torch.Tensor] | None = [] if cfg.save_videos and world == 1 and k_grid else None
    n_kept = 0
    from tqdm.auto import tqdm

    my_rows = sum(min(cfg.batch_size, plan.n - j * cfg.batch_size) for j in my_batches)
    # None: tqdm's own test, off when stderr is not a terminal (a log file gets no '\r' lines)
    bar = tqdm(total=my_rows, desc=f"sample[{rank}]", unit="video",
               disable=None if state.is_local_main_process else True)
    it = iter_sample_batches(gpt, tokenizer, scfg, batch_size=cfg.batch_size, seed=cfg.seed, batches=my_batches,
                             budget=budget_cap, decode=False, sampler=sampler, **kw)
    while True:
        t0 = time.perf_counter()
        try:
            j, _, tokens = next(it)
        except StopIteration:
            break
        _sync(device)
        t1 = time.perf_counter()
        t_tokens += t1 - t0
        first = j * cfg.batch_size
        ids = torch.arange(first, first + tokens.batch_size)
        if cfg.save_videos:
            videos = _decode(tokenizer, tokens, device)
            t_decode += time.perf_counter() - t1
            from arvid.data.writer import write_video

            vid_dir.mkdir(exist_ok=True)
            for i, v in zip(ids.tolist(), videos):
                write_video(v, vid_dir / f"{i:05d}.mp4", fps=cfg.fps)
            if grid_kept is not None and n_kept < k_grid:
                grid_kept.append(videos[: k_grid - n_kept])
                n_kept += len(grid_kept[-1])
        toks.append(tokens)
        idxs.append(ids)
        bar.update(tokens.batch_size)
    bar.close()

    parts = out / "parts"
    parts.mkdir(exist_ok=True)
    mine_tokens = TokenizedVideo.cat(toks) if toks else TokenizedVideo(torch.zeros(0, dtype=torch.long),
                                                                         torch.zeros(0, fmt.layout.num_blocks,
                                                                                     dtype=torch.long))
    mine_idx = torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.long)
    _save_npz(parts / f"part_{rank}.npz", index=mine_idx.numpy(), codes=mine_tokens.codes.numpy(),
              block_lengths=mine_tokens.block_lengths.numpy(),
              timing=np.array([t_tokens, t_decode, len(mine_idx)], dtype=np.float64))
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_and_report(cfg, out, plan, fmt, world, tokenizer, beta, budget_cap, calibration, device, sampler,
                          scfg, time.perf_counter() - t_start,
                          torch.cat(grid_kept) if grid_kept and n_kept == k_grid else None)
    state.wait_for_everyone()
    return out


def _check_out_is_not_an_input(cfg: SampleConfig) -> None:
    """Refuse an ``out`` that is (or holds) one of the run's inputs: the run writes its own
    ``config.yaml`` there, which would replace a model's and leave it unloadable."""
    out = Path(cfg.out).resolve()
    for field_name in ("generator", "tokenizer", "router", "spm"):
        given = getattr(cfg, field_name, None)
        if not given:
            continue
        path = Path(given).resolve()
        if out == path or out in path.parents:
            raise ConfigError(f"out {cfg.out!r} is the {field_name} directory {given!r} (or holds it): the run's "
                              f"config.yaml would replace the model's; write the samples elsewhere")
    if (out / "model.safetensors").exists():
        raise ConfigError(f"out {cfg.out!r} holds a model (model.safetensors): the run's config.yaml would replace "
                          "the model's; write the samples elsewhere")


#: What a sample run writes into ``out`` (besides config.yaml and done): a new run removes them
#: first, so that a run with fewer samples leaves none of an older run's videos behind.
_RUN_OUTPUTS = ("videos", "parts", "tokens.npz", "sample_stats.json", "grid.mp4", "grid.gif")


def _clear_previous_outputs(out: Path) -> None:
    for name in _RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode(tokenizer: Any, tokens: TokenizedVideo, device: torch.device) -> torch.Tensor:
    """Videos of ``tokens``: ``float [B, 3, T, H, W]`` in [-1, 1] on the CPU (the device synced)."""
    with torch.no_grad(), inference_autocast("auto", device):
        videos = tokenizer.decode(tokens.to(device)).float().clamp(-1, 1).cpu()
    _sync(device)
    return videos


def _save_npz(path: Path, **arrays) -> None:
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _merge_and_report(cfg, out, plan, fmt, world, tokenizer, beta, budget_cap, calibration, device, sampler,
                      scfg, seconds_total, grid_videos: torch.Tensor | None = None) -> None:
    index, codes_parts, bl_parts, t_tok, t_dec = [], [], [], 0.0, 0.0
    for r in range(world):
        with np.load(out / "parts" / f"part_{r}.npz") as z:
            index.append(z["index"])
            bl_parts.append(z["block_lengths"])
            codes_parts.append(z["codes"])
            # Processes ran in parallel: the slowest one is the wall time.
            t_tok, t_dec = max(t_tok, float(z["timing"][0])), max(t_dec, float(z["timing"][1]))
    order_idx = np.concatenate(index)
    tokens = TokenizedVideo(torch.from_numpy(np.concatenate(codes_parts)).long(),
                            torch.from_numpy(np.concatenate(bl_parts)).long())
    order = np.argsort(order_idx, kind="stable")
    tokens = tokens.select(torch.from_numpy(order))
    seqs, lengths = fmt.to_sequences(tokens)
    _save_npz(out / "tokens.npz", sequences=seqs.numpy(), lengths=lengths.numpy(), codes=tokens.codes.numpy(),
              block_lengths=tokens.block_lengths.numpy(), classes=plan.classes.numpy(),
              prompt_index=plan.prompt_index.numpy())
    n = tokens.batch_size
    # the grid: the first max_grid videos of the merged run, whatever the process count
    k, t_grid = min(cfg.max_grid, n) if cfg.grid_format != "none" else 0, 0.0
    if k:
        from arvid.data.writer import write_grid

        t0 = time.perf_counter()
        g = grid_videos if grid_videos is not None and len(grid_videos) == k else torch.cat(
            [_decode(tokenizer, tokens.select(torch.arange(a, min(a + cfg.batch_size, k))), device)
             for a in range(0, k, cfg.batch_size)])
        t_grid = time.perf_counter() - t0
        for ext in (["mp4", "gif"] if cfg.grid_format == "both" else [cfg.grid_format]):
            write_grid(g, out / f"grid.{ext}", nrow=cfg.nrow, fps=cfg.fps)
    decode_estimated = not cfg.save_videos
    if decode_estimated:  # not every video was decoded: the grid's time per video, over the busiest process's share
        t_dec = t_grid / k * -(-n // world) if k else 0.0
    per_video = tokens.lengths.float()
    stats = {
        "samples": n,
        "processes": world,
        "device": str(device),
        "execution": sampler.execution(device),
        "seconds_tokens": t_tok,
        "seconds_decode": t_dec,
        "seconds_decode_estimated": decode_estimated and k > 0,
        "seconds_total": seconds_total,
        "samples_per_s_tokens": n / t_tok if t_tok > 0 else None,
        "samples_per_s": n / (t_tok + t_dec) if t_tok + t_dec > 0 and (cfg.save_videos or k) else None,
        "tokens_per_video": {"mean": float(per_video.mean()), "std": float(per_video.std()) if n > 1 else 0.0,
                             "min": int(per_video.min()), "max": int(per_video.max()),
                             "per_block_mean": tokens.block_lengths.float().mean(0).tolist()},
        "budget": {"mode": cfg.budget_mode if cfg.budget > 0 else "off", "target": cfg.budget, "beta": beta,
                   "cap": budget_cap,
                   "calibration_mean": calibration.mean_tokens if calibration else None,
                   "calibration_history": calibration.history if calibration else None},
        "sampler": dataclasses.asdict(scfg),  # as used: budget_bias holds the calibrated beta
        "constraints": {"fixed_assignment": cfg.fixed_assignment, "allowed_counts": cfg.allowed_counts},
        "seed": cfg.seed,
        "generator": str(cfg.generator),
        "tokenizer": str(cfg.tokenizer),
    }
    write_json(out / "sample_stats.json", stats)
    log.info("%d videos, %.2f samples/s (tokens only: %.2f), %.1f tokens/video", n, stats["samples_per_s"] or 0,
             stats["samples_per_s_tokens"] or 0, stats["tokens_per_video"]["mean"])
    shutil.rmtree(out / "parts", ignore_errors=True)  # merged into tokens.npz: nothing else reads them
    write_json(out / "done", {"stage": "sample", "samples": n})


# --------------------------------------------------------------------------- CLI


def config_from_args(args: argparse.Namespace) -> SampleConfig:
    """``--config`` YAML, then the flags given, then dotted overrides (the last wins)."""
    overrides: list[str] = []

    def put(key: str, value: Any) -> None:
        if value is not None:
            overrides.append(f"{key}={_yaml(value)}")

    put("generator", args.generator)
    put("tokenizer", args.tokenizer)
    put("out", args.out)
    if args.classes is not None:
        try:
            put("classes", [int(c) for c in args.classes.split(",") if c.strip()])
        except ValueError:
            raise ConfigError(f"--classes must be comma-separated integers, got {args.classes!r}") from None
    put("per_class", args.per_class)
    put("num_samples", args.num_samples)
    put("text", args.text)
    put("spm", args.spm)
    put("context", args.context)
    put("context_frames", args.context_frames)
    put("router", args.router)
    put("sampler.cfg_scale", args.cfg_scale)
    put("sampler.cfg_schedule", args.cfg_schedule)
    put("sampler.temperature", args.temperature)
    put("sampler.top_k", args.top_k)
    put("sampler.top_p", args.top_p)
    put("sampler.compile", args.compile)
    put("seed", args.seed)
    if args.fixed_assignment is not None:
        put("fixed_assignment", _int_list(args.fixed_assignment, "--fixed-assignment"))
    if args.allowed_counts:
        sets = [_int_list(a, "--allowed-counts") for a in args.allowed_counts]
        put("allowed_counts", sets[0] if len(sets) == 1 else sets)
    put("budget", args.budget)
    put("budget_mode", args.budget_mode)
    put("batch_size", args.batch_size)
    put("device", args.device)
    put("precision", args.precision)
    if args.save_videos:
        put("save_videos", True)
    return load_config(SampleConfig, args.config, overrides + list(args.overrides))


def _int_list(text: str, flag: str) -> list[int]:
    """``"64,64,128"`` -> ``[64, 64, 128]``; a ConfigError naming the flag otherwise."""
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, e.g. 64,128, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} must be comma-separated integers, e.g. 64,128, got {text!r}")
    return values


def _yaml(value: Any) -> str:
    import json

    # JSON is valid YAML: strings are quoted, lists stay lists.
    return json.dumps(value)


def _main(args: argparse.Namespace) -> int:
    run(config_from_args(args))
    return 0


def add_arguments(subparsers) -> None:
    """Register ``arvid sample``."""
    p = subparsers.add_parser("sample", help="sample videos from a trained generator (class, text or context frames)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (SampleConfig); flags and overrides win")
    p.add_argument("--generator", help="trained GPT directory")
    p.add_argument("--tokenizer", help="tokenizer directory")
    p.add_argument("--out", help="output directory")
    p.add_argument("--classes", help="comma-separated class ids, e.g. 0,3,7 (default: every class)")
    p.add_argument("--per-class", type=int, help="samples per class / prompt / context")
    p.add_argument("--num-samples", type=int, help="samples of an unconditional GPT")
    p.add_argument("--text", action="append", help="a text prompt (repeat for several)")
    p.add_argument("--spm", help="SentencePiece model directory for --text")
    p.add_argument("--context", help="video file: predict the frames after its first --context-frames")
    p.add_argument("--context-frames", type=int, help="context frames (default 5)")
    p.add_argument("--router", help="router directory choosing the context blocks' token counts (the one "
                                    "`arvid tokenize` used)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], help="guidance over the sequence")
    p.add_argument("--temperature", type=float, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, help="top-k truncation (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus truncation (1 = off)")
    p.add_argument("--compile", choices=["auto", "eager", "cuda_graph", "compile", "triton"],
                   help="decode step execution (triton: arvid's Triton decode kernels, at most 16 rows)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--fixed-assignment", help="one token count per block for every video, e.g. 64,64,128,256")
    p.add_argument("--allowed-counts", action="append",
                   help="token counts the sampler may choose, e.g. 64,128: once for every block, or once per block "
                        "(in block order)")
    p.add_argument("--budget", type=float, help="tokens per video: mean target (or cap with --budget-mode exact)")
    p.add_argument("--budget-mode", choices=["mean", "exact"], help="mean: calibrated length bias; exact: a cap")
    p.add_argument("--batch-size", type=int, help="videos per batch")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="GPT precision")
    p.add_argument("--save-videos", action="store_true", help="also write each video")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampler.top_k=100 max_grid=16")
    p.set_defaults(func=_main)
