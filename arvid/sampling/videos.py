"""Class/text/unconditional -> videos, in fixed-size batches (the library entry point that the
``sample`` and ``eval`` stages call).

Batches have a fixed size (the last one is padded with copies of its last row and trimmed), so
one decoder and one captured CUDA graph serve every batch. Batch ``j`` draws its randomness
from a generator seeded by ``(seed, j)``: a sample does not depend on how the batches are
spread over processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from arvid.data.types import TokenizedVideo
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.constraints import SequenceConstraint
from arvid.sampling.sampler import Sampler, SamplerConfig, conditioning_class

log = logging.getLogger("arvid.sampling")


def batch_seed(seed: int, batch_index: int) -> int:
    """A 63-bit seed for batch ``batch_index`` of a run seeded ``seed`` (splitmix64 mixing)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(batch_index) + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def sequence_format_for(gpt: Any, tokenizer: Any) -> SequenceFormat:
    """The sequence format of ``tokenizer``, checked against the GPT's vocabulary."""
    fmt = SequenceFormat(int(tokenizer.codebook_size), tokenizer.layout)
    vocab = int(gpt.config.vocab_size)
    if vocab != fmt.vocab_size:
        raise ValueError(f"the GPT's vocab_size {vocab} does not match the tokenizer's sequence format "
                         f"({fmt.codebook_size} codes + {fmt.layout.num_candidates} length tokens = {fmt.vocab_size}): "
                         "was the GPT trained on this tokenizer's tokens?")
    return fmt


def frame_size(tokenizer: Any) -> int | None:
    """The side of the tokenizer's (square) frames, from its config (``image_size``, ``resolution``
    or ``size``); None when it names none."""
    cfg = getattr(tokenizer, "config", None)
    for name in ("image_size", "resolution", "size"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def training_record(generator_dir: str | os.PathLike) -> dict:
    """What ``train-generator`` recorded beside the GPT's config in ``generator_dir/config.yaml``
    (``conditioning``, ``context_blocks``, ``spm_dir``, ``captions``, ``tokenizer_fingerprint``,
    ``spm_fingerprint``); empty for a GPT saved by other code."""
    from arvid.config import read_yaml

    path = Path(generator_dir) / "config.yaml"
    meta = read_yaml(path) if path.is_file() else {}
    return {k: meta[k] for k in ("conditioning", "context_blocks", "spm_dir", "captions", "tokenizer_fingerprint",
                                 "spm_fingerprint") if k in meta}


def check_generator_tokenizer(generator_dir: str | os.PathLike, tokenizer: Any,
                              tokenizer_dir: str | os.PathLike | None = None) -> str | None:
    """Refuse a tokenizer other than the one the GPT in ``generator_dir`` was trained on.

    ``train-generator`` records the tokenizer's fingerprint (a hash of its config and weights) as
    ``tokenizer_fingerprint`` in ``generator_dir/config.yaml``. Another tokenizer with the same
    layout and codebook size passes :func:`sequence_format_for` but decodes the GPT's codes into
    garbage, so a different fingerprint is a :class:`~arvid.config.ConfigError` naming both
    fingerprints and both directories. A GPT saved without a recorded fingerprint (not written by
    ``train-generator``) is not checked. Returns the recorded fingerprint (or None)."""
    from arvid.config import ConfigError

    path = Path(generator_dir) / "config.yaml"
    if not path.is_file():
        return None  # from_pretrained names the missing file
    recorded = training_record(generator_dir).get("tokenizer_fingerprint")
    if not recorded:
        log.warning("generator %s records no tokenizer fingerprint: cannot check that tokenizer %s is the one it "
                    "was trained on", generator_dir, tokenizer_dir or "(given)")
        return None
    actual = tokenizer.fingerprint()
    if actual != recorded:
        where = f"tokenizer {str(tokenizer_dir)!r}" if tokenizer_dir is not None else "the tokenizer given"
        raise ConfigError(
            f"generator {str(generator_dir)!r} was trained on the tokens of tokenizer fingerprint {recorded} "
            f"(recorded in {str(path)!r}), but {where} has fingerprint {actual}: its codes would decode to "
            "garbage videos. Use the tokenizer directory that train-generator was given (its `tokenizer` in the "
            "generator run's config.yaml)")
    return recorded


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def iter_sample_batches(
    gpt: Any,
    tokenizer: Any,
    cfg: SamplerConfig,
    class_ids: torch.Tensor | None = None,
    *,
    text_ids: torch.Tensor | None = None,
    num_samples: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    batches: list[int] | None = None,
    budget: int | None = None,
    decode: bool = True,
    sampler: Sampler | None = None,
    fixed_assignment: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None = None,
    allowed_counts: Sequence | torch.Tensor | None = None,
    prefix: TokenizedVideo | None = None,
    **generate_kwargs,
) -> Iterator[tuple[int, torch.Tensor | None, TokenizedVideo]]:
    """Yield ``(batch_index, videos float [b, C, T, H, W] (CPU) or None, TokenizedVideo)`` batch by batch.

    Args:
        gpt, tokenizer: the generator and its tokenizer.
        cfg: sampling settings.
        class_ids: ``LongTensor[N]`` (one sample per entry); or ``text_ids [N, Lt]``; or
            ``num_samples`` for an unconditional model.
        batch_size: rows per batch.
        seed: run seed (batch ``j`` uses :func:`batch_seed` ``(seed, j)``).
        batches: the batch indices to run (this process's share); None = all.
        budget: exact per-video cap on codes (None: none).
        sampler: reuse a :class:`Sampler` (keeps its captured graphs).
        fixed_assignment: token counts to force: ``[K]`` (every sample) or ``[N, K]`` (one row per
            sample, split into batches like the conditioning).
        allowed_counts: the counts each block may take, for every sample: one collection of counts
            for every block, one collection per block (``K``), or a ``BoolTensor [K, C]`` over the
            layout's candidates (see :class:`~arvid.sampling.constraints.SequenceConstraint`).
        prefix: given leading blocks (frame prediction's context) as a ``TokenizedVideo`` of 1 row
            (every sample), ``N`` rows (one per sample) or ``batch_size`` rows (every batch as given).
        generate_kwargs: passed to ``Sampler.generate`` (``guided``, ``budget_bias``, ...).

    The constraints are checked against the tokenizer's layout (and the prefix against them)
    before the first batch: a bad value is a ``ValueError`` naming it and the layout's candidates.
    """
    fmt = sequence_format_for(gpt, tokenizer)
    sampler = sampler or Sampler(gpt, fmt, cfg)
    if class_ids is not None:
        rows = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1)
        N = rows.shape[0]
    elif text_ids is not None:
        rows = torch.as_tensor(text_ids, dtype=torch.long)
        N = rows.shape[0]
    elif num_samples is not None:
        rows, N = None, int(num_samples)
    else:
        raise ValueError("give class_ids, text_ids or num_samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fixed, fixed_rows = _check_constraints(fmt, N, fixed_assignment, allowed_counts, prefix, batch_size)
    Cond = conditioning_class()
    todo = range(num_batches(N, batch_size)) if batches is None else batches
    for j in todo:
        lo, hi = j * batch_size, min((j + 1) * batch_size, N)
        if not 0 <= lo < N:
            raise IndexError(f"batch {j} is out of range for {N} samples in batches of {batch_size}")
        idx = torch.arange(lo, lo + batch_size).clamp(max=hi - 1)  # pad by repeating the last row
        if class_ids is not None:
            cond = Cond(class_ids=rows[idx])
        elif text_ids is not None:
            cond = Cond(text_ids=rows[idx])
        else:
            cond = Cond()
        extra = dict(generate_kwargs)
        if fixed is not None:
            extra["fixed_assignment"] = fixed[idx] if fixed_rows else fixed
        if allowed_counts is not None:
            extra["allowed_counts"] = allowed_counts
        if prefix is not None:
            extra["prefix"] = _prefix_rows(prefix, idx, N, batch_size)
        g = torch.Generator().manual_seed(batch_seed(seed, j))
        out = sampler.generate(cond, batch_size=batch_size, generator=g, budget=budget, **extra)
        keep = hi - lo
        tokens = out.tokens if keep == batch_size else out.tokens.select(list(range(keep)))
        videos = None
        if decode:
            dev = _device_of(tokenizer)
            with torch.no_grad():
                videos = tokenizer.decode(tokens.to(dev)).float().clamp(-1, 1).cpu()
        yield j, videos, tokens


def _check_constraints(fmt: SequenceFormat, n: int, fixed_assignment: Any, allowed_counts: Any,
                       prefix: TokenizedVideo | None, batch_size: int) -> tuple[torch.Tensor | None, bool]:
    """Check the sampling constraints (and the prefix against them) before any batch runs.

    Returns the fixed assignment as ``LongTensor[K]`` or ``[N, K]`` (or None) and whether it has
    one row per sample. Raises ``ValueError`` naming the bad value and the layout's candidates."""
    K = fmt.layout.num_blocks
    fixed, per_row = None, False
    if fixed_assignment is not None:
        fixed = torch.as_tensor(fixed_assignment, dtype=torch.long).cpu()
        if fixed.dim() == 2 and fixed.shape[0] == 1:
            fixed = fixed[0]
        per_row = fixed.dim() == 2
        if fixed.dim() not in (1, 2) or fixed.shape[-1] != K or (per_row and fixed.shape[0] != n):
            raise ValueError(f"fixed_assignment must be [K={K}] counts (every sample) or [N={n}, K={K}] (one row "
                             f"per sample), got shape {tuple(fixed.shape)}; the layout's candidates are "
                             f"{fmt.layout.candidates}")
    check = SequenceConstraint(fmt, n if per_row else 1, allowed_counts, fixed)  # raises on a bad value
    if prefix is not None:
        rows = prefix.batch_size
        if rows not in (1, n, batch_size):
            raise ValueError(f"prefix must have 1 row (every sample), {n} (one per sample) or batch_size={batch_size}"
                             f" rows, got {rows}")
        if 1 in (rows, check.batch_size) or rows == check.batch_size:
            check.check_prefix_counts(prefix.block_lengths)
    return fixed, per_row


def _prefix_rows(prefix: TokenizedVideo, idx: torch.Tensor, n: int, batch_size: int) -> TokenizedVideo:
    """The prefix rows of one batch (rows ``idx`` of the samples; see ``iter_sample_batches``)."""
    rows = prefix.batch_size
    if rows == n and n != batch_size:
        return prefix.select(idx)
    if rows == 1 and batch_size > 1:
        return TokenizedVideo(prefix.codes.repeat(batch_size), prefix.block_lengths.expand(batch_size, -1).clone())
    return prefix  # batch_size rows: every batch as given (also n == batch_size, where idx is every row)


def sample_videos(gpt: Any, tokenizer: Any, cfg: SamplerConfig, class_ids: torch.Tensor | None = None, *,
                  progress: Callable[[int], None] | None = None,
                  **kwargs) -> tuple[torch.Tensor | None, TokenizedVideo]:
    """Sample and decode videos: ``(float [N, C, T, H, W] in [-1, 1] or None, TokenizedVideo)``.

    Same arguments as :func:`iter_sample_batches`; ``progress(n)`` is called with the number of
    videos of each finished batch. Keeps every video in memory: stream with
    :func:`iter_sample_batches` for large runs (gFVD over 10k clips).
    """
    vids, toks = [], []
    for _, v, t in iter_sample_batches(gpt, tokenizer, cfg, class_ids, **kwargs):
        if v is not None:
            vids.append(v)
        toks.append(t)
        if progress is not None:
            progress(t.batch_size)
    if not toks:
        raise ValueError("nothing to sample: no batches")
    return (torch.cat(vids) if vids else None), TokenizedVideo.cat(toks)


def _device_of(module: Any) -> torch.device:
    if isinstance(module, torch.nn.Module):
        for t in list(module.parameters()) + list(module.buffers()):
            return t.device
    return torch.device("cpu")
