"""Frame prediction: context frames -> context tokens -> the rest of the video.

Kinetics-600 protocol (method.md): 5 context frames, padded to 8 by repeating the last one,
i.e. the first two blocks of the ``(4, 4, 4, 4)`` layout, whose assignment is fixed. The
context is encoded by the tokenizer with that fixed assignment (block-causal: the context
blocks' codes depend only on context frames, so what the encoder sees after them does not
matter; we pad the clip to full length by repeating the last frame again), written in the
sequence format (``LEN(k) c*k`` per context block) and prefilled; the sampler generates the
remaining blocks, and the tokenizer decodes the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.sampling.sampler import SampleOutput, Sampler


def pad_frames(video: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Repeat the last frame: ``[B, C, T, H, W]`` -> ``[B, C, num_frames, H, W]`` (``T <= num_frames``)."""
    T = video.shape[2]
    if T > num_frames:
        raise ValueError(f"cannot pad {T} frames to {num_frames}: already longer")
    if T == 0:
        raise ValueError("the context has no frames")
    if T == num_frames:
        return video
    tail = video[:, :, -1:].expand(-1, -1, num_frames - T, -1, -1)  # [B, C, num_frames - T, H, W]
    return torch.cat([video, tail], 2)


def context_blocks_for(layout: BlockLayout, num_frames: int) -> int:
    """The fewest leading blocks that hold ``num_frames`` frames (5 frames of (4,4,4,4) -> 2).

    The context must leave at least one block to generate: at most the frames of all blocks but
    the last (until 2026-12-06 a context reaching into the last block, or any context of a one-block
    layout, passed here and failed later: "a prefix is already a complete sequence", or padding
    an empty context)."""
    if layout.num_blocks < 2:
        raise ValueError(f"frame prediction needs two temporal blocks or more (one to condition on, one to "
                         f"predict); this layout has one of {layout.frames_per_block[0]} frames")
    most = layout.num_frames - layout.frames_per_block[-1]
    if not 0 < num_frames <= most:
        raise ValueError(f"context frames must lie in [1, {most}] for this layout (blocks of "
                         f"{list(layout.frames_per_block)} frames: the context's blocks must leave one to generate), "
                         f"got {num_frames}")
    total = 0
    for k, f in enumerate(layout.frames_per_block):
        total += f
        if total >= num_frames:
            return k + 1
    raise AssertionError("unreachable")


def trained_context_blocks(record: dict) -> int:
    """The context blocks a frame-prediction GPT was trained with (``record``: what train-generator
    recorded, :func:`arvid.sampling.videos.training_record`); 0 for any other GPT."""
    return int(record.get("context_blocks") or 0) if record.get("conditioning") == "frames" else 0


def check_context_blocks(record: dict, layout: BlockLayout, context_frames: int, generator: str) -> int:
    """The blocks ``context_frames`` fill in ``layout``; a :class:`~arvid.config.ConfigError` when a
    frame-prediction GPT (``record``) was trained with another number of context blocks."""
    from arvid.config import ConfigError

    blocks = context_blocks_for(layout, context_frames)
    trained = trained_context_blocks(record)
    if trained and blocks != trained:
        fpb = list(layout.frames_per_block)
        raise ConfigError(f"context_frames={context_frames} fill {blocks} block(s) of the tokenizer (frames per "
                          f"block {fpb}), but generator {str(generator)!r} was trained with context_blocks={trained}: "
                          f"give context_frames that fill {trained} block(s) ({sum(fpb[:trained - 1]) + 1} to "
                          f"{sum(fpb[:trained])} frames)")
    return blocks


def context_assignment(layout: BlockLayout, context_blocks: int, counts: int | Sequence[int] | None,
                       batch: int) -> torch.Tensor | None:
    """The assignment to encode a context with: the fixed counts on the context blocks, the
    smallest candidate on the others (their codes are dropped). None: the tokenizer chooses."""
    if counts is None:
        return None
    c = [int(counts)] * context_blocks if isinstance(counts, int) else [int(x) for x in counts]
    if len(c) != context_blocks:
        raise ValueError(f"context counts {c} must give one count per context block ({context_blocks})")
    row = c + [layout.candidates[0]] * (layout.num_blocks - context_blocks)
    return layout.validate(torch.tensor([row]), batch=batch)


def encode_context(tokenizer: Any, context: torch.Tensor, context_blocks: int,
                   counts: int | Sequence[int] | None = None) -> TokenizedVideo:
    """Tokens of the first ``context_blocks`` blocks of ``context``.

    Args:
        tokenizer: a ``VideoTokenizer``.
        context: ``float [B, C, Tc, H, W]`` in [-1, 1], ``Tc`` at most the frames of the context blocks.
        context_blocks: blocks to keep.
        counts: fixed token count(s) of the context blocks; None: the tokenizer's own choice
            (router or fixed assignment), which may differ between samples.

    Returns:
        ``TokenizedVideo`` with ``block_lengths [B, context_blocks]``.
    """
    layout: BlockLayout = tokenizer.layout
    if context.dim() != 5:
        raise ValueError(f"context must be float [B, C, T, H, W], got shape {tuple(context.shape)}")
    K = layout.num_blocks
    if not 0 < context_blocks < K:
        raise ValueError(f"context_blocks must lie in [1, {K - 1}] (the context's blocks must leave one of the "
                         f"layout's {K} to generate), got {context_blocks}")
    ctx_frames = sum(layout.frames_per_block[:context_blocks])
    if context.shape[2] > ctx_frames:
        raise ValueError(f"a context of {context.shape[2]} frames does not fit context_blocks={context_blocks} "
                         f"({ctx_frames} frames; blocks of {list(layout.frames_per_block)} frames): give more "
                         f"context blocks or fewer frames")
    video = pad_frames(pad_frames(context, ctx_frames), layout.num_frames)  # [B, C, T, H, W]
    assignment = context_assignment(layout, context_blocks, counts, video.shape[0])
    dev = _device_of(tokenizer)
    if assignment is not None:
        assignment = assignment.to(dev)
    with torch.no_grad():
        tokens = tokenizer.encode(video.to(dev), assignment).to("cpu")
    parts = [TokenizedVideo(torch.cat([tokens.block_codes(i, k) for k in range(context_blocks)]),
                            tokens.block_lengths[i:i + 1, :context_blocks]) for i in range(tokens.batch_size)]
    return TokenizedVideo.cat(parts)


def predict_frames(sampler: Sampler, tokenizer: Any, context: torch.Tensor, *, context_blocks: int | None = None,
                   counts: int | Sequence[int] | None = None, cond: Any = None,
                   generator: torch.Generator | None = None, decode: bool = True,
                   **generate_kwargs) -> tuple[torch.Tensor | None, SampleOutput]:
    """Continue each context clip.

    Args:
        sampler: a :class:`Sampler` over a GPT trained for frame prediction (same format as the tokenizer).
        tokenizer: the ``VideoTokenizer`` (encodes the context, decodes the result).
        context: ``float [B, C, Tc, H, W]`` in [-1, 1].
        context_blocks: leading blocks the context occupies (None: the fewest that hold ``Tc`` frames).
        counts: fixed token count(s) of the context blocks (None: the tokenizer's choice).
        cond: optional class / text conditioning (``Conditioning`` with B rows).
        generator: randomness.
        decode: also decode the sequences to pixels.
        generate_kwargs: passed to ``Sampler.generate`` (``allowed_counts``, ``budget``, ...).

    Returns:
        ``(videos float [B, C, T, H, W] or None, SampleOutput)``; the sequences include the context blocks.
    """
    layout: BlockLayout = tokenizer.layout
    if layout != sampler.fmt.layout or tokenizer.codebook_size != sampler.fmt.codebook_size:
        raise ValueError(f"the tokenizer (layout {layout}, codebook {tokenizer.codebook_size}) does not match the "
                         f"sampler's sequence format ({sampler.fmt.layout}, codebook {sampler.fmt.codebook_size})")
    if context_blocks is None:
        context_blocks = context_blocks_for(layout, context.shape[2])
    ctx = encode_context(tokenizer, context, context_blocks, counts)
    out = sampler.generate(cond, batch_size=context.shape[0], prefix=ctx, generator=generator, **generate_kwargs)
    videos = None
    if decode:
        with torch.no_grad():
            videos = tokenizer.decode(out.tokens.to(_device_of(tokenizer)))
    return videos, out


def _device_of(module: Any) -> torch.device:
    if isinstance(module, torch.nn.Module):
        for t in list(module.parameters()) + list(module.buffers()):
            return t.device
    return torch.device("cpu")
