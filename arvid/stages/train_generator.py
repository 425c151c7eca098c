"""`arvid train-generator CONFIG [overrides]`: train the AR GPT on a token store.

Reads the store written by `arvid tokenize`, refuses it unless its fingerprint equals the
tokenizer's (the codes would decode to garbage otherwise), packs variable-length sequences
into token-budget batches (no padding), trains with the one Trainer and writes
``out_dir/gpt`` (``save_pretrained``) and a ``done`` marker.

Conditioning: ``class`` (the store's labels, dropped to the null class with
``gpt.class_dropout`` for CFG), ``text`` (each label's line of ``captions`` through the
SentencePiece model in ``spm_dir``), ``frames`` (frame prediction: the first ``context_blocks``
blocks of every sequence are loss-masked context), ``none``.

A Trainer "item" here is one packed batch of at most ``max_tokens`` positions, so
``trainer.batch_size`` counts such batches per optimizer step (over all processes).
Logged besides the loss: ``tokens_per_s`` (Trainer), ``mfu`` and ``tflops`` (this task).
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from arvid.config import ConfigError, doc, from_dict, load_config, save_config
from arvid.generator.conditioning import Conditioning
from arvid.generator.gpt import GPT, PRESETS, GPTConfig
from arvid.generator.packing import IGNORE, PackedBatch, PackedBatchDataset, PackingSpec, concat_packed
from arvid.generator.sequence import SequenceFormat
from arvid.io import check_writable, read_json, write_json
from arvid.training import StepOutput, Trainer, TrainerConfig
from arvid.training.checkpoint import RESUME_MAY_CHANGE, check_resumable
from arvid.training.trainer import check_batch_split

log = logging.getLogger(__name__)


@dataclass
class TrainGeneratorConfig:
    """Train the GPT on a token store."""

    token_store: str = doc("", "directory written by `arvid tokenize`")
    tokenizer: str = doc("", "the tokenizer directory that will decode the samples (its fingerprint must match the store's)")
    preset: str = doc("B", "GPT size preset: " + ", ".join(PRESETS))
    gpt: dict[str, Any] = doc({}, "GPTConfig fields overriding the preset (dim, n_layers, attn_backend, class_dropout, ...)")
    conditioning: Literal["class", "none", "text", "frames"] = doc("class", "what the GPT is conditioned on")
    num_classes: int = doc(0, "class conditioning: number of classes (0: max label in the store + 1)")
    context_blocks: int = doc(0, "frames: the first blocks of every sequence are context (no loss); K600 protocol: 2")
    spm_dir: str | None = doc(None, "text: the SentencePiece folder from `arvid text train-spm`")
    captions: str | None = doc(None, "text: file with one caption (or class name) per label, line i for label i")
    max_text_len: int = doc(0, "text: prefix slots for text (0: the longest caption of the spm training set)")
    max_tokens: int = doc(16384, "packed positions per batch (the token budget; prefix slots count)")
    pad_batches: bool = doc(False, "pad every packed batch to max_tokens and report a fixed max_seqlen "
                                   "(static shapes: no recompiles under trainer.compile)")
    peak_tflops: float = doc(989.0, "accelerator peak TFLOP/s for MFU (H100 SXM bf16 dense: 989); 0: time a "
                                    "matmul in the training precision on the training device at the start and "
                                    "take MFU against that measured peak (790-803 TFLOP/s on the lent H100)",
                             execution=True)
    flash_impl: str = doc("", "'' (torch's FA2 kernels), FA4 (pip install 'arvid[fa4]'; Hopper/Blackwell; torch 2.11 "
                              "refuses its causal backward on Hopper) or FA3: the flash kernels behind attn_backend "
                              "torch_varlen", execution=True)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(max_steps=20000, batch_size=1, lr=3e-4, weight_decay=0.05,
                                              warmup_steps=500, precision="bf16", ema_decay=0.0),
        metadata={"help": "the Trainer; batch_size counts packed batches of max_tokens per step"})
    out_dir: str = doc("outputs/generator", "output directory (gpt/, checkpoints/, metrics.jsonl, done)")

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.flash_impl not in ("", "FA3", "FA4"):
            raise ValueError(f"flash_impl must be '', 'FA3' or 'FA4', got {self.flash_impl!r}")
        if self.max_tokens <= 0 or self.peak_tflops < 0:
            raise ValueError(f"max_tokens must be positive and peak_tflops >= 0 (0: measure it), got {self.max_tokens}, "
                             f"{self.peak_tflops}")
        if self.max_text_len < 0 or self.num_classes < 0:
            raise ValueError(f"max_text_len and num_classes must be >= 0 (0: from the data), got {self.max_text_len}, "
                             f"{self.num_classes}")
        if self.conditioning == "frames" and self.context_blocks < 1:
            raise ValueError("conditioning 'frames' needs context_blocks >= 1 (K600 protocol: 2)")
        if self.conditioning != "frames" and self.context_blocks:
            raise ValueError(f"context_blocks={self.context_blocks} only applies to conditioning 'frames'")
        if self.conditioning == "text" and (not self.spm_dir or not self.captions):
            raise ValueError("conditioning 'text' needs spm_dir (arvid text train-spm) and captions (one line per label)")


class GeneratorTask(nn.Module):
    """The GPT plus its training loss: next-token cross-entropy over the loss-bearing positions.

    CFG dropout draws from the step's generator (``GPT.drop_condition``) so a resumed run repeats
    exactly. Throughput (``host_metrics``): each batch's tokens and model FLOPs, which the Trainer
    sums over its log window and divides by the window's wall time (tokens/s, TFLOP/s, MFU).
    """

    def __init__(self, gpt: GPT, peak_tflops: float = 989.0) -> None:
        super().__init__()
        self.gpt = gpt
        self.peak_flops = peak_tflops * 1e12

    def ema_model(self) -> nn.Module:
        return self.gpt

    def loss(self, batch: PackedBatch) -> torch.Tensor:
        """Mean cross-entropy over positions whose target is not -100 (0 when there is none)."""
        logits = self.gpt(batch)  # [N, vocab]
        total = F.cross_entropy(logits.float(), batch.targets, ignore_index=IGNORE, reduction="sum")
        return total / (batch.targets != IGNORE).sum().clamp(min=1)

    def loss_weight(self, batch: PackedBatch) -> float:
        """The slice's loss tokens: packed batches hold different numbers of them, and the Trainer
        weighs each slice's mean by its share, so a step optimises the mean over every loss token of
        the global batch, whatever the number of processes or ``grad_accum`` (see the Trainer)."""
        return float(batch.num_loss_tokens)

    def training_step(self, batch: PackedBatch, step: int, generator: torch.Generator) -> StepOutput:
        cond = self.gpt.drop_condition(Conditioning(batch.class_ids, batch.text_ids), generator)
        batch = PackedBatch(batch.tokens, batch.targets, batch.position_ids, batch.cu_seqlens, batch.max_seqlen,
                            cond.class_ids, cond.text_ids, batch.prefix_mask, batch.num_prefix, batch.num_seqs)
        return StepOutput(losses={"main": self.loss(batch)})

    def host_metrics(self, batch: PackedBatch) -> dict[str, float]:
        """Token and FLOP counts of the batch on the host (the Trainer calls this before moving it
        to the device, and turns ``tokens`` / ``flops`` / ``peak_seconds`` into rates over its
        log window: tokens/s, TFLOP/s, MFU).

        Until 2026-12-06 ``training_step`` read them off the device batch (``seqlens().cpu()``,
        the loss-token count): two host syncs per step, each waiting for the forward pass before
        the backward could be launched. ``tokens`` counts the real sequences' positions (prefix
        slots included), not ``pad_batches`` padding (counted until then)."""
        seqlens = batch.seqlens().cpu()
        flops = float(self.gpt.training_flops(seqlens))
        return {"tokens": float(seqlens.sum()), "loss_tokens": float(batch.num_loss_tokens), "flops": flops,
                "peak_seconds": flops / self.peak_flops}


def _text_table(cfg: TrainGeneratorConfig) -> tuple[torch.Tensor, int, int, int]:
    """Text ids of every label ``[num_labels, Lt]``, the text vocabulary, Lt and the pad id."""
    from arvid.generator.text import TextEncoder

    enc = TextEncoder(cfg.spm_dir, max_len=cfg.max_text_len or None)
    path = Path(cfg.captions)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {str(path)!r} does not exist")
    # line i is label i: a blank line is that label's empty text (all pad), not skipped (skipping it
    # would move every later label onto the next caption); a trailing blank line is dropped
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"captions file {str(path)!r} is not UTF-8 text (one caption per line, line i for label "
                         f"i): {e}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return enc.encode(lines), enc.vocab_size, enc.max_len, enc.pad_id


def build_gpt_config(cfg: TrainGeneratorConfig, fmt: SequenceFormat, num_classes: int,
                     text: tuple[int, int, int] | None) -> GPTConfig:
    """The preset, then the run's conditioning and vocabulary, then ``cfg.gpt`` overrides."""
    base: dict[str, Any] = dict(PRESETS[cfg.preset])
    base["vocab_size"] = fmt.vocab_size
    if cfg.conditioning == "class":
        base["num_classes"] = num_classes
    if text is not None:
        base["text_vocab_size"], base["max_text_len"], base["text_pad_id"] = text
    n_prefix = (1 if base.get("num_classes", 0) else 0) + base.get("max_text_len", 0)
    base["max_seq_len"] = max(n_prefix, 1) + fmt.max_length
    # what the token store and the conditioning fix: an override would size the model against the data
    derived = {k: base[k] for k in ("vocab_size", "num_classes", "text_vocab_size", "max_text_len", "text_pad_id")
               if k in base and (k != "num_classes" or cfg.conditioning == "class")}
    clash = {k: v for k, v in cfg.gpt.items() if k in derived and v != derived[k]}
    if clash:
        raise ConfigError(f"{cfg.out_dir} (train-generator): "
                          + "; ".join(f"gpt.{k}={v!r} contradicts the data's {derived[k]!r}" for k, v in clash.items())
                          + " (set from the token store's vocabulary, the classes and the text model): drop the override")
    base.update(cfg.gpt)
    gpt = from_dict(GPTConfig, base, source=f"{cfg.out_dir} (train-generator)", prefix="gpt.")
    need = max(n_prefix, 1) + fmt.max_length
    if gpt.max_seq_len < need:
        raise ConfigError(
            f"gpt.max_seq_len={gpt.max_seq_len} is shorter than the longest sequence the tokenizer's layout allows: "
            f"{need} = {max(n_prefix, 1)} prefix slot(s) + {fmt.max_length} (every block at its largest candidate "
            f"{fmt.layout.candidates[-1]}, plus one length token per block); raise max_seq_len or drop the override")
    return gpt


def training_device(trainer: TrainerConfig) -> torch.device:
    """The device type the Trainer will train on: ``cpu`` with ``trainer.device=cpu`` or without a
    GPU, else ``cuda`` (accelerate's choice; the index does not matter for the checks here)."""
    if trainer.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def training_dtype(trainer: TrainerConfig) -> torch.dtype:
    """The dtype the training step computes in: bf16 under ``precision: bf16``, else float32."""
    return torch.bfloat16 if trainer.precision == "bf16" else torch.float32


def measured_peak(trainer: TrainerConfig) -> float:
    """``peak_tflops: 0``: the matmul rate measured on the training device in the training precision
    (bf16, else float32), logged; MFU is then taken against it."""
    from arvid.training.profiling import measure_matmul_peak

    device, dtype = training_device(trainer), training_dtype(trainer)
    peak = measure_matmul_peak(device, dtype)
    log.info("train-generator: measured %s matmul peak on %s: %.1f TFLOP/s (MFU is taken against it)",
             str(dtype).replace("torch.", ""), device.type, peak)
    return peak


def check_attention_backend(cfg: TrainGeneratorConfig) -> str:
    """The concrete attention backend ``gpt.attn_backend`` (the GPTConfig default when not
    overridden) resolves to for the training device and ``trainer.precision``; raises
    :class:`~arvid.generator.attention.AttentionBackendUnavailable` (a ValueError) saying what to
    install or change when it cannot train there. Called before anything is built or written."""
    from arvid.generator.attention import AttentionBackendUnavailable, resolve_training_backend

    name = cfg.gpt.get("attn_backend", GPTConfig.__dataclass_fields__["attn_backend"].default)
    if not isinstance(name, str):
        raise ConfigError(f"gpt.attn_backend must be a string (auto, sdpa, flex, ...), got {name!r}")
    device = training_device(cfg.trainer)
    dtype = training_dtype(cfg.trainer)
    try:
        resolved = resolve_training_backend(name, device, dtype)
    except AttentionBackendUnavailable as e:
        raise AttentionBackendUnavailable(
            f"gpt.attn_backend={name} cannot train here (device {device.type}, trainer.precision="
            f"{cfg.trainer.precision}): {e}") from None
    log.info("train-generator: attention backend %s%s (device %s, %s)", resolved,
             "" if resolved == name else f" (from {name})", device.type, cfg.trainer.precision)
    return resolved


def run(cfg: TrainGeneratorConfig) -> Path:
    """Train and save ``out_dir/gpt``; returns ``out_dir``."""
    from arvid.data.token_store import TokenStore
    from arvid.tokenizer.base import load_tokenizer

    if not cfg.token_store:
        raise ConfigError("train-generator: `token_store` (an `arvid tokenize` output) is required")
    if not cfg.tokenizer:
        raise ConfigError("train-generator: `tokenizer` is required: the store's fingerprint is checked against it")
    if cfg.flash_impl:
        from arvid.generator.attention import activate_flash_impl

        activate_flash_impl(cfg.flash_impl)  # before anything else: a missing package fails at once
    out = Path(cfg.out_dir)
    check_attention_backend(cfg)  # before the run directory, the dataset or the model exist
    out = check_writable(out)  # before any work
    store = TokenStore(cfg.token_store)
    tokenizer = load_tokenizer(cfg.tokenizer)
    fingerprint = tokenizer.fingerprint()
    store.check_fingerprint(fingerprint)
    if _finished(out, cfg, fingerprint):
        log.info("train-generator: %s is complete (done marker, same config and tokenizer); nothing to do", out)
        return out
    _check_interrupted(out, cfg, fingerprint)
    if store.layout != tokenizer.layout or store.codebook_size != tokenizer.codebook_size:
        raise ConfigError(f"token store layout/codebook {store.layout}/{store.codebook_size} differs from the "
                          f"tokenizer's {tokenizer.layout}/{tokenizer.codebook_size}")
    del tokenizer
    if len(store) == 0:
        raise ConfigError(f"token store {cfg.token_store!r} is empty")
    fmt = SequenceFormat(store.codebook_size, store.layout)

    num_classes = 0
    if cfg.conditioning == "class":
        labels = store.labels
        if int(labels.min()) < 0:
            raise ConfigError(f"conditioning 'class' but token store {cfg.token_store!r} has videos without a label")
        num_classes = cfg.num_classes or int(labels.max()) + 1
        if int(labels.max()) >= num_classes:
            raise ConfigError(f"store labels reach {int(labels.max())} but num_classes={num_classes}")
    text_table, text = None, None
    if cfg.conditioning == "text":
        text_table, vocab, max_len, pad = _text_table(cfg)
        text = (vocab, max_len, pad)
        if int(store.labels.min()) < 0:
            raise ConfigError(f"conditioning 'text' but token store {cfg.token_store!r} has videos without a label "
                              "(a video's caption is the captions file's line at its label)")
        if int(store.labels.max()) >= text_table.shape[0]:
            raise ConfigError(f"captions file {cfg.captions!r} has {text_table.shape[0]} lines; the store's labels "
                              f"span [{int(store.labels.min())}, {int(store.labels.max())}]")
    gpt_cfg = build_gpt_config(cfg, fmt, num_classes, text)
    spec = PackingSpec(fmt, gpt_cfg.num_prefix, cfg.conditioning, cfg.context_blocks, text_table,
                       pad_to=cfg.max_tokens if cfg.pad_batches else None, static_max_seqlen=cfg.pad_batches)
    dataset = PackedBatchDataset(store, spec, cfg.max_tokens, seed=cfg.trainer.seed)
    # packed batches for one global batch, checked before the run directory holds a config (the
    # Trainer would say "the dataset has N items", counting packed batches, not videos)
    if len(dataset) < cfg.trainer.batch_size:
        raise ConfigError(f"train-generator: the {len(store)} videos of {cfg.token_store!r} pack into {len(dataset)} "
                          f"batches of <= max_tokens={cfg.max_tokens} positions, fewer than trainer.batch_size="
                          f"{cfg.trainer.batch_size} (packed batches per optimizer step): lower trainer.batch_size "
                          "or max_tokens")
    # the Trainer's split of the global batch, checked before the run directory holds a config
    try:
        check_batch_split(cfg.trainer.batch_size, cfg.trainer.grad_accum, int(os.environ.get("WORLD_SIZE") or 1))
    except ValueError as e:
        raise ConfigError(f"trainer.{e}") from None
    save_config(cfg, out / "config.yaml")
    write_json(out / RUN_FILE, {"tokenizer_fingerprint": fingerprint})

    torch.manual_seed(cfg.trainer.seed)  # the initial weights are a function of the seed
    gpt = GPT(gpt_cfg)
    log.info("train-generator: GPT %s, %.1fM parameters; %d videos in %d packed batches of <= %d positions",
             cfg.preset, gpt.num_params() / 1e6, len(store), len(dataset), cfg.max_tokens)
    peak = cfg.peak_tflops or measured_peak(cfg.trainer)
    task = GeneratorTask(gpt, peak)
    trainer = Trainer(cfg.trainer, task, dataset, out, collate_fn=concat_packed)
    result = trainer.fit()
    final = trainer.final_model()
    extra = {"tokenizer_fingerprint": fingerprint, "conditioning": cfg.conditioning,
             "context_blocks": cfg.context_blocks, "spm_dir": cfg.spm_dir, "captions": cfg.captions}
    if cfg.conditioning == "text":
        from arvid.generator.text import TextEncoder

        extra["spm_fingerprint"] = TextEncoder(cfg.spm_dir).fingerprint
    final.save_pretrained(out / "gpt", extra=extra)
    write_json(out / "done", {"stage": "train-generator", "step": result.step, "losses": result.losses,
                              "params": gpt.num_params(), "batches_per_epoch": len(dataset),
                              "peak_tflops": peak, "peak_measured": not cfg.peak_tflops})
    log.info("train-generator: %d steps, loss %.4f (%.0f s) -> %s", result.step, result.loss, result.wall_time_s,
             out / "gpt")
    return out


#: the tokenizer a run trains on, written before its first step (config.yaml holds only its path)
RUN_FILE = "run.json"


def _check_interrupted(out: Path, cfg: TrainGeneratorConfig, fingerprint: str) -> None:
    """Refuse to resume the checkpoints of an unfinished run made with another config
    (:func:`~arvid.training.checkpoint.check_resumable`) or on another tokenizer's tokens: the
    Trainer would resume their weights and the GPT would be saved as this tokenizer's (before
    2026-12-07 only a finished run was checked)."""
    check_resumable(TrainGeneratorConfig, cfg, out, "train-generator")
    run_path = out / RUN_FILE
    saved = read_json(run_path).get("tokenizer_fingerprint") if run_path.is_file() else None
    if saved is not None and saved != fingerprint:
        raise ConfigError(f"train-generator: the checkpoints in {str(out)!r} were trained on the tokens of tokenizer "
                          f"fingerprint {saved!r}, not of {cfg.tokenizer!r} ({fingerprint!r}): give another out_dir, "
                          "or delete that one to retrain")


def _finished(out: Path, cfg: TrainGeneratorConfig, fingerprint: str) -> bool:
    """Whether ``out`` holds a finished run of this config on this tokenizer's tokens.

    Execution-only settings (workers, compilation, logging) and ``out_dir`` do not count. A
    finished run whose only change is a raised ``trainer.max_steps`` is not finished: its
    ``done`` marker goes and training continues from its last checkpoint (an interrupted
    continuation is then resumed, never taken for finished). Any other change, or another
    tokenizer, is refused: the Trainer would resume the old weights at their last step and train
    nothing (or fail to load them), and the saved GPT would be kept under a config it was not
    trained with."""
    from arvid.config import changed_fields, read_yaml
    from arvid.pretrained import CONFIG_NAME

    if not ((out / "done").is_file() and (out / "gpt" / CONFIG_NAME).is_file()):
        return False
    saved_fp = read_yaml(out / "gpt" / CONFIG_NAME).get("tokenizer_fingerprint")
    if saved_fp != fingerprint:
        raise ConfigError(f"{str(out)!r} holds a finished GPT for tokenizer {saved_fp!r}, not for {cfg.tokenizer!r} "
                          f"(fingerprint {fingerprint!r}): give another out_dir, or delete that one to retrain")
    saved_path = out / "config.yaml"
    try:
        saved = from_dict(TrainGeneratorConfig, read_yaml(saved_path), source=str(saved_path))
    except (OSError, ValueError, ConfigError) as e:
        raise ConfigError(f"{str(out)!r} holds a finished run whose config cannot be read ({e}): give another "
                          "out_dir, or delete that one to retrain") from e
    # a finished run is finished whatever it may resume with, but more steps (below) continue it
    changed = [f for f in changed_fields(saved, cfg) if f not in RESUME_MAY_CHANGE or f == "trainer.max_steps"]
    if not changed:
        return True
    if changed == ["trainer.max_steps"] and cfg.trainer.max_steps > saved.trainer.max_steps:
        log.info("train-generator: %s finished at %d steps; continuing to %d", out, saved.trainer.max_steps,
                 cfg.trainer.max_steps)
        (out / "done").unlink()
        return False
    raise ConfigError(f"{str(out)!r} holds a finished run of another config ({', '.join(changed[:8])} changed; "
                      "only a raised trainer.max_steps continues one): give another out_dir, or delete that one "
                      "to retrain")


def _main(args: argparse.Namespace) -> int:
    run(load_config(TrainGeneratorConfig, args.config, args.overrides))
    return 0


def add_arguments(subparsers) -> None:
    """Register ``arvid train-generator CONFIG [overrides]``."""
    p = subparsers.add_parser("train-generator", help="train the AR GPT on a token store",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (TrainGeneratorConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.max_steps=500 preset=L")
    p.set_defaults(func=_main)


__all__ = ["TrainGeneratorConfig", "GeneratorTask", "build_gpt_config", "check_attention_backend", "training_device",
           "run", "add_arguments"]
