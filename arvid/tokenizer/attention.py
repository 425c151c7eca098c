"""Block-causal attention over packed, variable-length sequences (the tokenizers' attention).

Mixed assignments inside one batch are first-class: the 1D tokens of every video of a batch are
flattened into ONE packed sequence (video 0's blocks in order, then video 1's ...), each token
tagged with its video id and its temporal block id. Attention then obeys one rule:

    token i may attend to token j  iff  vid[i] == vid[j]  and  blk[j] <= blk[i]

(block-diagonal by video, block-causal in time). Queries and keys may be different sequences
(cross-attention from 1D queries to patches and back), each with its own (vid, blk) tags.

Backends, one function (:func:`packed_attention`):
- ``flex``: FlexAttention with a BlockMask built from the tag vectors (CUDA; no padding, cost
  proportional to the allowed pairs).
- ``loop``: one SDPA call per video with that video's dense block-causal mask (CPU default;
  exact: numerically the same computation as encoding each video alone).
- ``dense``: one SDPA call over the whole packed sequence with a dense boolean mask
  (``[Nq, Nk]``; simple reference, quadratic in the batch).
``auto`` picks ``flex`` on CUDA and ``loop`` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Backend = Literal["auto", "flex", "loop", "dense"]


@dataclass
class Segments:
    """Tags of a packed sequence: ``vid`` and ``blk`` are ``LongTensor[N]``, sorted by ``vid``.

    ``counts``: ``list[int]`` of tokens per video (length = batch size, zeros allowed), kept as
    Python ints so the loop backend needs no device sync.
    """

    vid: torch.Tensor
    blk: torch.Tensor
    counts: list[int]

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @staticmethod
    def from_block_lengths(block_lengths: torch.Tensor, device: torch.device | str | None = None) -> Segments:
        """Tags of a packed token sequence whose video b has ``block_lengths[b, k]`` tokens in block k."""
        bl = block_lengths.detach().to("cpu", torch.long).numpy()
        vid, blk = host_tags(bl)
        device = device if device is not None else block_lengths.device
        both = host_to_device(torch.from_numpy(np.stack([vid, blk])), device)  # one copy, no stream sync
        return Segments(both[0], both[1], bl.sum(1).tolist())

    @staticmethod
    def uniform(batch: int, block_ids: torch.Tensor) -> Segments:
        """Tags of ``batch`` videos of equal length whose token i is in block ``block_ids[i]``."""
        n = block_ids.numel()
        vid = torch.arange(batch, device=block_ids.device).repeat_interleave(n)
        return Segments(vid, block_ids.repeat(batch), [n] * batch)


def host_tags(block_lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(vid, blk)`` int64 arrays ``[N]`` of the packed tokens of ``block_lengths [B, K]``.

    Host index arithmetic is done in numpy, single-threaded: torch's CPU ``repeat_interleave``
    enters its intra-op thread pool, and on a GPU host whose cores are busy with data-loader
    workers each such call waited milliseconds for the pool (4.3 ms per call on the H100 host,
    2026-12-05, 37% of the EVATok step's host time; ``benchmarks/bench_tokenizer_host.py``)."""
    B, K = block_lengths.shape
    flat = block_lengths.reshape(-1)
    vid = np.repeat(np.arange(B, dtype=np.int64), block_lengths.sum(1))
    blk = np.repeat(np.tile(np.arange(K, dtype=np.int64), B), flat)
    return vid, blk


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a (small, index) tensor from the host to ``device`` without stalling the device's queue.

    A plain ``.to("cuda")`` of a pageable CPU tensor synchronises the stream: the host waits until
    every queued kernel has run, and the GPU then idles while the host launches the next ones. On
    CUDA the tensor goes through pinned memory with ``non_blocking`` instead (torch's pinned
    allocator keeps the buffer alive until the copy is done). Elsewhere it is ``.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def block_causal_mask(q_blk: torch.Tensor, k_blk: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[Nq, Nk]``: True where key block <= query block (one video)."""
    return k_blk[None, :] <= q_blk[:, None]


def packed_mask(q: Segments, k: Segments) -> torch.Tensor:
    """``BoolTensor[Nq, Nk]`` for a packed batch: same video and key block <= query block."""
    return (q.vid[:, None] == k.vid[None, :]) & (k.blk[None, :] <= q.blk[:, None])


def resolve_backend(backend: Backend, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA when FlexAttention exists, else ``loop``."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and _flex_available():
        return "flex"
    return "loop"


@lru_cache(maxsize=1)
def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


#: recompiles of the compiled flex_attention allowed (dynamo's default is 8)
FLEX_RECOMPILE_LIMIT = 64


@lru_cache(maxsize=1)
def _compiled_flex():
    # Compiled lazily, on first use on a GPU: uncompiled flex_attention materialises the scores.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex_recompile_limit():
    """A context raising dynamo's recompile limit to :data:`FLEX_RECOMPILE_LIMIT` (never lowering it)
    for one call of the compiled flex_attention.

    Even with ``dynamic=True`` each new guard failure is a recompile: the relation of query and key
    lengths (self-attention, cross-attention either way), single-tile masks, training and inference.
    A pipeline process that trained the proxy tokenizer and then curated reached the default limit
    of 8 on the H100 and H200 (logs in docs/synthetic_gpu/); past it dynamo runs flex_attention
    eagerly, the unfused scores-materialising path, for the rest of the process. Scoped to the call,
    so other compiled functions of the process keep their own limit."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), FLEX_RECOMPILE_LIMIT)})


def _tile_stats(seg: Segments, tile: int) -> tuple[torch.Tensor, ...]:
    """Per tile of ``tile`` consecutive tokens: min/max video id, min/max block id, and whether the
    tile is complete (no positions past the end). Statistics cover real tokens only."""
    n = seg.total
    tiles = -(-n // tile)
    pad = tiles * tile - n
    vid, blk = seg.vid, seg.blk
    if pad:  # repeat the last token: padding must not widen the ranges
        vid = torch.cat([vid, vid[-1:].expand(pad)])
        blk = torch.cat([blk, blk[-1:].expand(pad)])
    vid, blk = vid.view(tiles, tile), blk.view(tiles, tile)
    # the last tile is incomplete when padded; written without `complete[-1] = False`, whose copy of a
    # host scalar to the device synchronises the stream (caught on the H200 by the sync-count test)
    complete = torch.arange(tiles, device=vid.device) < (tiles - 1 if pad else tiles)
    return vid.amin(1), vid.amax(1), blk.amin(1), blk.amax(1), complete


def block_tiles(q: Segments, k: Segments, tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``tile x tile`` tiles of the packed mask need computing: ``(partial, full)``, each
    ``BoolTensor[tiles_q, tiles_k]``, from per-tile ranges of the tags (``O(tiles_q * tiles_k)``
    work, never the ``Nq x Nk`` element mask).

    ``full``: every pair of the tile is allowed (one video on both sides, every key block <= every
    query block, no padding): computed without the mask. ``partial``: some pair may be allowed (the
    element rule is applied). Neither: no pair is allowed, skipped. Exact for ``full`` and for
    skipping; a tile straddling a video boundary is kept as partial (its mask does the rest).
    """
    qv0, qv1, qb0, qb1, qc = _tile_stats(q, tile)
    kv0, kv1, kb0, kb1, kc = _tile_stats(k, tile)
    overlap = (qv0[:, None] <= kv1[None, :]) & (kv0[None, :] <= qv1[:, None])
    one_video = (qv0 == qv1)[:, None] & (kv0 == kv1)[None, :] & (qv0[:, None] == kv0[None, :])
    all_later = kb0[None, :] > qb1[:, None]  # every key block after every query block
    maybe = overlap & ~(one_video & all_later)
    full = one_video & (kb1[None, :] <= qb0[:, None]) & qc[:, None] & kc[None, :]
    return maybe & ~full, full


def _kv_lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``BoolTensor[Tq, Tk]`` -> FlexAttention's ``(num_blocks [1, 1, Tq], indices [1, 1, Tq, Tk])``:
    per query tile, the kept key tiles in ascending order first."""
    num = tiles.sum(1, dtype=torch.int32)
    idx = (~tiles).to(torch.int8).argsort(dim=1, stable=True).to(torch.int32)
    return num[None, None], idx[None, None]


def flex_block_mask(q: Segments, k: Segments, tile: int = 128):
    """A FlexAttention BlockMask for the packed rule, built from per-tile tag ranges
    (:func:`block_tiles`) rather than by evaluating the rule on all ``Nq x Nk`` pairs as
    ``create_block_mask`` does (a billion pairs for a curation batch of 128 clips)."""
    from torch.nn.attention.flex_attention import BlockMask

    q_vid, q_blk, k_vid, k_blk = q.vid, q.blk, k.vid, k.blk

    def mask_mod(b, h, qi, ki):
        return (q_vid[qi] == k_vid[ki]) & (k_blk[ki] <= q_blk[qi])

    partial, full = block_tiles(q, k, tile)
    num, idx = _kv_lists(partial)
    full_num, full_idx = _kv_lists(full)
    extra = {"seq_lengths": (q.total, k.total)} if _takes_seq_lengths() else {}  # torch >= 2.6
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod, **extra)


@lru_cache(maxsize=1)
def _takes_seq_lengths() -> bool:
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    return "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q: Segments, k: Segments,
                     backend: Backend = "auto", block_mask=None) -> torch.Tensor:
    """Attention over packed sequences under the packed block-causal rule.

    ``query [H, Nq, d]``, ``key``/``value [H, Nk, d]`` -> ``[H, Nq, d]``. ``q``/``k``: the tags.
    ``block_mask``: a prebuilt FlexAttention mask (reuse one across layers), ``flex`` only.
    Every query must see at least one key (true whenever each video has keys in its first block).
    """
    kind = resolve_backend(backend, query.device)
    if kind == "flex":
        if block_mask is None:
            block_mask = flex_block_mask(q, k)
        fn = _compiled_flex()
        if torch.compiler.is_compiling():  # inside a compiled model: its own compilation decides
            return fn(query[None], key[None], value[None], block_mask=block_mask)[0]
        with _flex_recompile_limit():
            return fn(query[None], key[None], value[None], block_mask=block_mask)[0]
    if kind == "dense":
        mask = packed_mask(q, k)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    if kind == "loop":
        outs = []
        qo, ko = 0, 0
        for nq, nk in zip(q.counts, k.counts):
            if nq == 0:
                ko += nk
                continue
            mask = block_causal_mask(q.blk[qo:qo + nq], k.blk[ko:ko + nk])
            outs.append(F.scaled_dot_product_attention(
                query[:, qo:qo + nq], key[:, ko:ko + nk], value[:, ko:ko + nk], attn_mask=mask))
            qo, ko = qo + nq, ko + nk
        return torch.cat(outs, dim=1) if outs else query[:, :0]
    raise ValueError(f"unknown attention backend {backend!r} (expected auto, flex, loop or dense)")
