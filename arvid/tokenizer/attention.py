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
        bl = block_lengths.detach().to("cpu", torch.long)
        B, K = bl.shape
        flat = bl.reshape(-1)  # [B*K], video-major
        vid = torch.repeat_interleave(torch.arange(B).repeat_interleave(K), flat)
        blk = torch.repeat_interleave(torch.arange(K).repeat(B), flat)
        device = device if device is not None else block_lengths.device
        return Segments(vid.to(device), blk.to(device), bl.sum(1).tolist())

    @staticmethod
    def uniform(batch: int, block_ids: torch.Tensor) -> Segments:
        """Tags of ``batch`` videos of equal length whose token i is in block ``block_ids[i]``."""
        n = block_ids.numel()
        vid = torch.arange(batch, device=block_ids.device).repeat_interleave(n)
        return Segments(vid, block_ids.repeat(batch), [n] * batch)


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


@lru_cache(maxsize=1)
def _compiled_flex():
    # Compiled lazily, on first use on a GPU: uncompiled flex_attention materialises the scores.
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_mask(q: Segments, k: Segments):
    """A FlexAttention BlockMask for the packed rule, built from the tag vectors."""
    from torch.nn.attention.flex_attention import create_block_mask

    q_vid, q_blk, k_vid, k_blk = q.vid, q.blk, k.vid, k.blk

    def mask_mod(b, h, qi, ki):
        return (q_vid[qi] == k_vid[ki]) & (k_blk[ki] <= q_blk[qi])

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q.total, KV_LEN=k.total,
                             device=q.vid.device)


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
        out = _compiled_flex()(query[None], key[None], value[None], block_mask=block_mask)
        return out[0]
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
