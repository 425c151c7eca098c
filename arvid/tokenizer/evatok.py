"""EVATok: a Q-Former-style 1D video tokenizer with an adaptive token count per temporal block.

The clip ``[B, C, T, H, W]`` is cut into causal temporal blocks (``frames_per_block``) and
patchified (``patch_time`` x ``patch_size`` x ``patch_size``). Block k of a video gets
``assignment[b, k]`` 1D tokens, any of the layout's ``candidates``.

Encoder
    patch embedding -> ``patch_layers`` of block-causal self-attention over patches ->
    queries: for block k, the block's patch features (raster order) are adaptive-average-pooled
    to q_k positions, plus a learned position table (max candidate entries), a block embedding
    and a count embedding -> ``query_layers`` of [block-causal self-attention over queries,
    block-causal cross-attention queries -> patches, MLP] -> projection to ``code_dim`` -> VQ.
Decoder
    codes -> projection to ``dim`` + the same kinds of embeddings -> patch queries of block k
    start from the FIRST token of block k plus a 3D position embedding (and, by default, the
    block's tokens spread back over the raster chunks they were pooled from, see below) ->
    ``decoder_layers`` of
    [block-causal self-attention over patch queries, block-causal cross-attention patch queries
    -> tokens, MLP] -> linear head -> depatchify.

Why pooled query initialisation: it makes every query start from its own region of the block
(raster chunks of the block's patches), so a small count sees a coarse summary of the whole
block and a large count a finer one, with no learned bank to keep in sync across counts. The
count embedding tells the shared weights which compression level they are at.

Two choices beyond the paper's text, both config fields, both measured on the debug model:
``decoder_init="first_unpooled"`` (default) adds to each patch query the tokens of its block
adaptive-average-pooled back from q tokens to the block's patches (the inverse of the encoder's
pooling), a direct token -> region path; with the paper's ``"first"`` alone the tiny model sat
much longer on a blurry plateau (overfitting 4 clips, 300 steps: 23.8 dB vs 26.9 dB).
``token_pos="pooled"`` (default) adds to each decoder token the mean position embedding of its
raster chunk, so a region has the same position whatever the block's count.

Only the needed queries are created (no tail dropping), and a batch with mixed assignments is
ONE packed sequence with a block-diagonal-by-video, block-causal mask (see ``attention.py``).

Block causality, what callers can rely on (curation does):
- the codes of blocks <= t depend only on frames of blocks <= t and on ``assignment[:, :t+1]``;
- the decoded frames of block t depend only on the codes of blocks <= t.
So both ``encode`` and ``decode`` accept a *prefix*: a video with only the first t blocks'
frames (``T = sum(frames_per_block[:t])``) and an assignment ``[B, t]`` encode to exactly the
first t blocks' codes of the full video; a TokenizedVideo with t blocks decodes to those t
blocks' frames. Decoding a prefix is cheaper than decoding with filler blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvid.config import doc, nested
from arvid.data.types import BlockLayout, TokenizedVideo, segment_positions
from arvid.pretrained import PretrainedMixin
from arvid.tokenizer.attention import (
    Segments,
    block_causal_mask,
    flex_block_mask,
    host_tags,
    host_to_device,
    packed_attention,
    resolve_backend,
)
from arvid.tokenizer.base import register_tokenizer
from arvid.tokenizer.quantizers import QuantizerConfig, QuantOutput, build_quantizer


@dataclass
class EVATokConfig:
    """Architecture of the EVATok tokenizer (presets: ``EVATok.presets()``)."""

    frames_per_block: tuple[int, ...] = doc((4, 4, 4, 4), "frames of each causal temporal block (multiples of patch_time)")
    candidates: tuple[int, ...] = doc((32, 64, 128, 256, 512), "allowed token counts per block, ascending")
    default_assignment: tuple[int, ...] | None = doc(
        None, "assignment used by encode() without one and without a router; null: uniform middle candidate")
    image_size: int = doc(128, "frame height = width in pixels (a multiple of patch_size)")
    in_channels: int = doc(3, "video channels")
    patch_time: int = doc(4, "frames per patch")
    patch_size: int = doc(8, "pixels per patch side")
    dim: int = doc(768, "transformer width")
    heads: int = doc(12, "attention heads")
    mlp_ratio: float = doc(4.0, "MLP hidden width / dim")
    patch_layers: int = doc(4, "encoder layers of block-causal self-attention over patches")
    query_layers: int = doc(6, "encoder layers over the 1D queries (self + cross to patches)")
    decoder_layers: int = doc(6, "decoder layers over patch queries (self + cross to tokens)")
    quantizer: QuantizerConfig = nested(QuantizerConfig, "the quantizer of the 1D tokens")
    token_pos: Literal["index", "pooled"] = doc(
        "pooled", "decoder token positions: a learned table over the index in the block only (index), or "
        "plus the decoder's patch position embedding pooled over the token's raster chunk (pooled)")
    decoder_init: Literal["first", "first_unpooled"] = doc(
        "first_unpooled", "patch queries of block t start from its first token (first, the paper's), plus "
        "the block's tokens spread back over the raster chunks they were pooled from (first_unpooled)")
    attention: Literal["auto", "flex", "loop", "dense"] = doc(
        "auto", "attention backend for packed sequences: auto = flex on CUDA, loop (per video SDPA) on CPU")

    def __post_init__(self) -> None:
        self.frames_per_block = tuple(int(f) for f in self.frames_per_block)
        self.candidates = tuple(int(c) for c in self.candidates)
        for name in ("image_size", "in_channels", "patch_time", "patch_size", "dim", "heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("patch_layers", "query_layers", "decoder_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        bad = [f for f in self.frames_per_block if f <= 0 or f % self.patch_time]
        if bad:
            raise ValueError(f"frames_per_block {self.frames_per_block} must be positive multiples of "
                             f"patch_time={self.patch_time}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")
        layout = self.layout  # validates candidates
        if self.default_assignment is not None:
            self.default_assignment = tuple(int(c) for c in self.default_assignment)
            layout.validate(torch.tensor(self.default_assignment))

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(self.frames_per_block, self.candidates)


# --------------------------------------------------------------------------- building blocks


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention with separate query and context inputs (self-attention: the same)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def batched(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention of equal-length videos: ``x [B, N, D]``, ``mask [N, N]`` -> ``[B, N, D]``."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(x), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(rearrange(o, "b h n d -> b n (h d)"))

    def packed(self, x: torch.Tensor, ctx: torch.Tensor, qs: Segments, ks: Segments, backend: str,
               block_mask=None) -> torch.Tensor:
        """Packed attention: ``x [Nq, D]`` attends to ``ctx [Nk, D]`` under the packed block-causal rule."""
        q = rearrange(self.q(x), "n (h d) -> h n d", h=self.heads)
        k, v = rearrange(self.kv(ctx), "n (two h d) -> two h n d", two=2, h=self.heads)
        o = packed_attention(q, k, v, qs, ks, backend=backend, block_mask=block_mask)
        return self.out(rearrange(o, "h n d -> n (h d)"))


class PatchLayer(nn.Module):
    """Block-causal self-attention over the patches of equal-length videos, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.batched(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class QueryLayer(nn.Module):
    """Encoder layer over packed 1D queries: self-attention, cross-attention to patches, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.norm_ctx, self.cross = nn.LayerNorm(dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.norm3, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, qs: Segments, ks: Segments, backend: str,
                masks: tuple = (None, None)) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn.packed(h, h, qs, qs, backend, masks[0])
        x = x + self.cross.packed(self.norm2(x), self.norm_ctx(ctx), qs, ks, backend, masks[1])
        return x + self.mlp(self.norm3(x))


class DecoderLayer(nn.Module):
    """Decoder layer over patch queries: block-causal self-attention, cross-attention to tokens, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.norm_ctx, self.cross = nn.LayerNorm(dim), nn.LayerNorm(dim), Attention(dim, heads)
        self.norm3, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, y: torch.Tensor, tokens: torch.Tensor, self_mask: torch.Tensor, ps: Segments,
                ts: Segments, backend: str, cross_mask=None) -> torch.Tensor:
        B, N, D = y.shape
        y = y + self.self_attn.batched(self.norm1(y), self_mask)
        flat = rearrange(y, "b n d -> (b n) d")  # packed: video-major, like the tokens
        flat = flat + self.cross.packed(self.norm2(flat), self.norm_ctx(tokens), ps, ts, backend, cross_mask)
        y = rearrange(flat, "(b n) d -> b n d", b=B)
        return y + self.mlp(self.norm3(y))


@dataclass
class TokenMeta:
    """Per-token tags of a packed token sequence (all ``LongTensor[N]``)."""

    segments: Segments
    pos: torch.Tensor  # position inside its block
    cand: torch.Tensor  # index of the block's count in the layout's candidates
    block_start: torch.Tensor  # [B, K] offset of each block's first token in the packed sequence
    block_start_cpu: torch.Tensor  # the same on the host, for index arithmetic without a device sync
    groups: list | None = None  # EVATok._groups's plan, made on first use (encoder and decoder share it)


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a learned table ``[R, D]`` and ``LongTensor[N]`` of rows with many repeats
    (a token's block, count or position): ``F.embedding``, whose CUDA backward reduces each row's
    repeats in parallel, where plain indexing's backward runs the sort-based accumulating
    ``index_put`` (22% of the EVATok proxy step's device time on an H100, 2026-12-05)."""
    return F.embedding(index, table)


# --------------------------------------------------------------------------- the tokenizer


@register_tokenizer("evatok")
class EVATok(nn.Module, PretrainedMixin):
    """The EVATok adaptive-length 1D video tokenizer (see the module docstring)."""

    config_class = EVATokConfig

    def __init__(self, config: EVATokConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.layout = c.layout
        self.codebook_size = c.quantizer.num_codes
        K, C = self.layout.num_blocks, self.layout.num_candidates
        self.grid = c.image_size // c.patch_size
        self.latent_frames = self.layout.num_frames // c.patch_time
        patch_dim = c.in_channels * c.patch_time * c.patch_size**2
        max_q = self.layout.candidates[-1]
        D = c.dim

        # encoder
        self.patch_embed = nn.Linear(patch_dim, D)
        self.enc_space = nn.Parameter(torch.zeros(self.grid * self.grid, D))
        self.enc_time = nn.Parameter(torch.zeros(self.latent_frames, D))
        self.patch_layers = nn.ModuleList([PatchLayer(D, c.heads, c.mlp_ratio) for _ in range(c.patch_layers)])
        self.query_pos = nn.Parameter(torch.zeros(max_q, D))
        self.query_block = nn.Parameter(torch.zeros(K, D))
        self.query_count = nn.Parameter(torch.zeros(C, D))
        self.query_layers = nn.ModuleList([QueryLayer(D, c.heads, c.mlp_ratio) for _ in range(c.query_layers)])
        self.enc_norm = nn.LayerNorm(D)
        self.to_code = nn.Linear(D, c.quantizer.dim)
        self.quantizer = build_quantizer(c.quantizer)
        # decoder
        self.from_code = nn.Linear(c.quantizer.dim, D)
        self.token_pos = nn.Parameter(torch.zeros(max_q, D))
        self.token_block = nn.Parameter(torch.zeros(K, D))
        self.token_count = nn.Parameter(torch.zeros(C, D))
        self.dec_space = nn.Parameter(torch.zeros(self.grid * self.grid, D))
        self.dec_time = nn.Parameter(torch.zeros(self.latent_frames, D))
        self.decoder_layers = nn.ModuleList([DecoderLayer(D, c.heads, c.mlp_ratio) for _ in range(c.decoder_layers)])
        self.dec_norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.enc_space, self.enc_time, self.query_pos, self.query_block, self.query_count,
                  self.token_pos, self.token_block, self.token_count, self.dec_space, self.dec_time):
            nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ presets and router
    @classmethod
    def presets(cls) -> dict[str, dict]:
        """Named sizes. ``debug``: tiny, for CPU tests; ``S``: ~50M; ``B``: ~145M (the paper's size)."""
        return {
            "debug": dict(frames_per_block=(2, 2, 2, 2), candidates=(4, 8, 16, 32), image_size=32,
                          patch_time=2, patch_size=4, dim=64, heads=4, mlp_ratio=2.0, patch_layers=1,
                          query_layers=1, decoder_layers=2,
                          quantizer=dict(kind="vq", codebook_size=256, code_dim=8, restart_every=20)),
            "S": dict(dim=512, heads=8, patch_layers=2, query_layers=4, decoder_layers=6,
                      quantizer=dict(kind="vq", codebook_size=8192, code_dim=16)),
            "B": dict(dim=768, heads=12, patch_layers=4, query_layers=6, decoder_layers=6,
                      quantizer=dict(kind="vq", codebook_size=16384, code_dim=16)),
        }

    @property
    def router(self):
        """A module with ``choose(video) -> LongTensor[B, K]`` used by ``encode`` without an
        assignment, or None. Not a submodule: it is not part of the weights or the fingerprint."""
        return self.__dict__.get("_router")

    @router.setter
    def router(self, value) -> None:
        if value is not None and not callable(getattr(value, "choose", None)):
            raise TypeError(f"a router must have a choose(video) method, got {type(value).__name__}")
        self.__dict__["_router"] = value

    def __setattr__(self, name, value) -> None:
        # nn.Module would register a Module-valued `router` as a submodule (its weights would then
        # leak into save_pretrained and the fingerprint); route it to the property instead.
        if name == "router":
            type(self).router.fset(self, value)
            return
        super().__setattr__(name, value)

    def default_assignment(self, batch: int, num_blocks: int | None = None) -> torch.Tensor:
        """The fixed assignment of the config (or uniform middle candidate), ``LongTensor[batch, K]``."""
        K = num_blocks or self.layout.num_blocks
        a = self.config.default_assignment
        if a is None:
            a = (self.layout.candidates[self.layout.num_candidates // 2],) * self.layout.num_blocks
        return torch.tensor(a[:K], dtype=torch.long)[None].expand(batch, K).clone()

    # ------------------------------------------------------------------ helpers
    def _num_blocks_of(self, video: torch.Tensor) -> int:
        c = self.config
        if video.dim() != 5:
            raise ValueError(f"EVATok expects video [B, C, T, H, W], got shape {tuple(video.shape)}")
        B, C, T, H, W = video.shape
        if C != c.in_channels or H != c.image_size or W != c.image_size:
            raise ValueError(f"EVATok expects {c.in_channels} channels and {c.image_size}x{c.image_size} frames, "
                             f"got video of shape {tuple(video.shape)}")
        ends = [sum(self.layout.frames_per_block[:k + 1]) for k in range(self.layout.num_blocks)]
        if T not in ends:
            raise ValueError(f"video has {T} frames; expected {self.layout.num_frames} (or a block prefix: {ends})")
        return ends.index(T) + 1

    def _patch_blocks(self, num_blocks: int, device: torch.device) -> torch.Tensor:
        """Block id of every patch of a ``num_blocks``-block prefix, ``LongTensor[Np]`` (t, h, w order)."""
        per_block = [f // self.config.patch_time * self.grid * self.grid
                     for f in self.layout.frames_per_block[:num_blocks]]
        return host_to_device(torch.from_numpy(np.repeat(np.arange(num_blocks, dtype=np.int64), per_block)), device)

    def _block_ranges(self, num_blocks: int) -> list[tuple[int, int]]:
        """``[(start, end)]`` of each block's patches in (t, h, w) raster order: time-major, so a
        block's patches are one contiguous range (slicing them needs no boolean mask, whose
        ``nonzero`` would wait for the device)."""
        ranges, start = [], 0
        for f in self.layout.frames_per_block[:num_blocks]:
            n = f // self.config.patch_time * self.grid * self.grid
            ranges.append((start, start + n))
            start += n
        return ranges

    def _check_assignment(self, assignment: torch.Tensor, batch: int, num_blocks: int) -> torch.Tensor:
        layout = BlockLayout(self.layout.frames_per_block[:num_blocks], self.layout.candidates)
        return layout.validate(assignment, batch=batch).to(torch.long)

    def _token_meta(self, block_lengths: torch.Tensor, device: torch.device) -> TokenMeta:
        # host index arithmetic in numpy (see attention.host_tags: no intra-op thread pool)
        bl_t = block_lengths.detach().to("cpu", torch.long)
        cpos = self.layout.candidate_positions(bl_t).numpy().reshape(-1)  # raises on a non-candidate
        bl = bl_t.numpy()
        flat = bl.reshape(-1)
        vid, blk = host_tags(bl)
        n = vid.size
        starts = np.cumsum(flat) - flat  # [B*K] start of each block
        pos = segment_positions(flat)  # position inside its block
        cand = np.repeat(cpos, flat)
        # every per-token tag in one host-to-device copy (each copy of its own would sync the stream)
        tags = host_to_device(torch.from_numpy(np.concatenate([vid, blk, pos, cand, starts])), device)
        vid_d, blk_d, pos_d, cand_d, starts_d = tags.split([n, n, n, n, starts.size])
        starts_cpu = torch.from_numpy(starts).reshape(bl.shape)
        return TokenMeta(Segments(vid_d, blk_d, bl.sum(1).tolist()), pos_d, cand_d, starts_d.reshape(bl.shape),
                         starts_cpu)

    def _backend(self, device: torch.device) -> str:
        return resolve_backend(self.config.attention, device)

    # ------------------------------------------------------------------ encoder
    def patchify(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> ``[B, Np, C*pt*p*p]`` patches in (t, h, w) raster order."""
        c = self.config
        return rearrange(video, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)",
                         pt=c.patch_time, ph=c.patch_size, pw=c.patch_size)

    def unpatchify(self, patches: torch.Tensor, frames: int) -> torch.Tensor:
        """``[B, Np, C*pt*p*p]`` -> ``[B, C, T, H, W]``."""
        c = self.config
        return rearrange(patches, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)",
                         t=frames // c.patch_time, h=self.grid, w=self.grid,
                         pt=c.patch_time, ph=c.patch_size, pw=c.patch_size)

    def encode_features(self, video: torch.Tensor, assignment: torch.Tensor) -> tuple[torch.Tensor, TokenMeta]:
        """Continuous pre-quantization vectors ``[sum(assignment), code_dim]`` (packed) and their tags."""
        nb = self._num_blocks_of(video)
        B, _, T = video.shape[:3]
        assignment = self._check_assignment(assignment, B, nb)
        device = video.device
        meta = self._token_meta(assignment, device)
        backend = self._backend(device)

        x = self.patch_embed(self.patchify(video))  # [B, Np, D]
        lat = T // self.config.patch_time
        pos = (self.enc_time[:lat, None, :] + self.enc_space[None]).reshape(-1, self.config.dim)  # [Np, D]
        x = x + pos
        p_blk = self._patch_blocks(nb, device)
        mask = block_causal_mask(p_blk, p_blk)
        for layer in self.patch_layers:
            x = layer(x, mask)

        q = self._init_queries(x, assignment, meta)
        q = q + _rows(self.query_pos, meta.pos) + _rows(self.query_block, meta.segments.blk) \
            + _rows(self.query_count, meta.cand)
        ctx = rearrange(x, "b n d -> (b n) d")  # packed patches, video-major
        ps = Segments.uniform(B, p_blk)
        masks = (None, None)
        if backend == "flex":
            masks = (flex_block_mask(meta.segments, meta.segments), flex_block_mask(meta.segments, ps))
        for layer in self.query_layers:
            q = layer(q, ctx, meta.segments, ps, backend, masks)
        return self.to_code(self.enc_norm(q)), meta

    def _groups(self, block_lengths: torch.Tensor, meta: TokenMeta, device: torch.device
                ) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """The videos that give block ``k`` the same count, with their tokens' packed positions:
        ``[(k, count, sel LongTensor[m], idx LongTensor[m, count])]`` on ``device``, computed on the
        host and copied in one go (no device sync). Kept on ``meta``: a training step's encoder
        and decoder use the same plan."""
        if meta.groups is not None:
            return meta.groups
        bl = block_lengths.detach().to("cpu", torch.long)
        plan, parts = [], []
        for k in range(bl.shape[1]):
            for count in bl[:, k].unique().tolist():
                sel = (bl[:, k] == count).nonzero().flatten()
                idx = meta.block_start_cpu[sel, k][:, None] + torch.arange(count)[None]  # [m, count]
                plan.append((k, count, sel.numel()))
                parts += [sel, idx.reshape(-1)]
        meta.groups = []
        if parts:
            flat = host_to_device(torch.cat(parts), device).split([p.numel() for p in parts])
            meta.groups = [(k, count, flat[2 * i], flat[2 * i + 1].view(m, count))
                           for i, (k, count, m) in enumerate(plan)]
        return meta.groups

    def _init_queries(self, x: torch.Tensor, assignment: torch.Tensor, meta: TokenMeta) -> torch.Tensor:
        """Pool each block's patch features to its token count; returns packed ``[N, D]``."""
        B, _, D = x.shape
        out = x.new_zeros(meta.segments.total, D)
        ranges = self._block_ranges(assignment.shape[1])
        for k, count, sel, idx in self._groups(assignment, meta, x.device):
            s, e = ranges[k]
            feats = x[:, s:e]  # [B, n_k, D], raster order inside the block
            pooled = F.adaptive_avg_pool1d(rearrange(feats.index_select(0, sel), "m n d -> m d n"), count)
            out = out.index_copy(0, idx.reshape(-1), rearrange(pooled, "m d q -> (m q) d"))
        return out

    # ------------------------------------------------------------------ decoder
    def decode_features(self, z_q: torch.Tensor, block_lengths: torch.Tensor,
                        meta: TokenMeta | None = None) -> torch.Tensor:
        """Quantized vectors ``[sum(block_lengths), code_dim]`` (packed) -> video ``[B, C, T', H, W]``
        with ``T' = sum(frames_per_block[:K'])`` for ``K' = block_lengths.shape[1]`` blocks.
        ``meta``: the encoder's tags for these block lengths (a training step), else made here."""
        device = z_q.device
        B, nb = block_lengths.shape
        if nb < 1 or nb > self.layout.num_blocks:
            raise ValueError(f"block_lengths has {nb} blocks; this tokenizer has {self.layout.num_blocks}")
        if meta is None:
            meta = self._token_meta(block_lengths, device)
        backend = self._backend(device)
        frames = sum(self.layout.frames_per_block[:nb])
        lat = frames // self.config.patch_time
        p_blk = self._patch_blocks(nb, device)
        pos = (self.dec_time[:lat, None, :] + self.dec_space[None]).reshape(-1, self.config.dim)  # [Np, D]

        t = self.from_code(z_q.to(self.from_code.weight.dtype))
        t = t + _rows(self.token_pos, meta.pos) + _rows(self.token_block, meta.segments.blk) \
            + _rows(self.token_count, meta.cand)
        if self.config.token_pos == "pooled":
            t = t + self._pooled_positions(pos, nb, meta)
        first = t.index_select(0, meta.block_start.reshape(-1)).reshape(B, nb, -1)  # [B, K', D] first tokens
        # each block's first token over the block's patches: expands (whose backward is a sum), not an
        # index by p_blk (whose backward would accumulate Np rows into K' on the device)
        y = torch.cat([first[:, k:k + 1].expand(-1, e - s, -1) for k, (s, e) in enumerate(self._block_ranges(nb))],
                      dim=1) + pos  # [B, Np, D]
        if self.config.decoder_init == "first_unpooled":
            y = self._unpool_tokens(y, t, block_lengths, meta)
        mask = block_causal_mask(p_blk, p_blk)
        ps = Segments.uniform(B, p_blk)
        cross_mask = flex_block_mask(ps, meta.segments) if backend == "flex" else None
        for layer in self.decoder_layers:
            y = layer(y, t, mask, ps, meta.segments, backend, cross_mask)
        return self.unpatchify(self.head(self.dec_norm(y)), frames)

    def _unpool_tokens(self, y: torch.Tensor, t: torch.Tensor, block_lengths: torch.Tensor,
                       meta: TokenMeta) -> torch.Tensor:
        """Add to each patch query ``y [B, Np, D]`` the tokens ``t [N, D]`` of its block spread back over
        the raster chunks they were pooled from (adaptive average pooling from q tokens to n_k patches):
        a direct path from a token to its region, which the decoder's attention then refines."""
        ranges = self._block_ranges(block_lengths.shape[1])
        B, _, D = y.shape
        # each block's videos are split among its count groups: fill a [B, n_k, D] slab per block by
        # index_copy (backward: index_select) and add the slabs once; an accumulating index_put per
        # group would run the device's sort-based accumulate kernel, forward and backward
        slabs = [y.new_zeros(B, e - s, D) for s, e in ranges]
        for k, count, sel, idx in self._groups(block_lengths, meta, y.device):
            s, e = ranges[k]
            m = sel.numel()
            src = t.index_select(0, idx.reshape(-1)).view(m, count, -1)
            up = F.adaptive_avg_pool1d(rearrange(src, "m q d -> m d q"), e - s)
            slabs[k] = slabs[k].index_copy(0, sel, rearrange(up, "m d n -> m n d").to(y.dtype))  # [B, n_k, D]
        return y + torch.cat(slabs, dim=1)

    def _pooled_positions(self, pos: torch.Tensor, nb: int, meta: TokenMeta) -> torch.Tensor:
        """Token i of a block with q tokens gets the mean of the patch position embeddings of the
        raster chunk its encoder query was pooled from (the same chunks as ``_init_queries``):
        the same region has the same position whatever the count. ``pos [Np, D]`` -> ``[N, D]``."""
        C = self.layout.num_candidates
        tables, offsets, off = [], torch.zeros(nb, C, dtype=torch.long), 0
        for k, (s, e) in enumerate(self._block_ranges(nb)):
            block_pos = rearrange(pos[s:e], "n d -> d n")[None]  # [1, D, n_k]
            for ci, count in enumerate(self.layout.candidates):
                tables.append(rearrange(F.adaptive_avg_pool1d(block_pos, count)[0], "d q -> q d"))
                offsets[k, ci], off = off, off + count
        table = torch.cat(tables)  # [sum over (k, c) of c, D]
        offsets = host_to_device(offsets, pos.device)
        return _rows(table, offsets[meta.segments.blk, meta.cand] + meta.pos)

    # ------------------------------------------------------------------ public API
    def forward(self, video: torch.Tensor, assignment: torch.Tensor, generator: torch.Generator | None = None,
                entropy: bool = False) -> tuple[torch.Tensor, QuantOutput]:
        """Training pass: ``video [B, C, T, H, W]``, ``assignment LongTensor[B, K]`` ->
        (reconstruction ``[B, C, T, H, W]``, :class:`QuantOutput` with packed ``indices``, VQ
        losses and usage). ``entropy``: also compute the entropy loss. ``generator``: dead-code restarts."""
        z, meta = self.encode_features(video, assignment)
        bl = self._check_assignment(assignment, video.shape[0], self._num_blocks_of(video))
        # VQ losses: each video weighs the same (its tokens' mean), not each token; a plain token
        # mean weighted a 2048-token video 16x a 128-token one, and changed with the batch's split
        seg = meta.segments
        per_video = torch.tensor([1.0 / (max(c, 1) * len(seg.counts)) for c in seg.counts])  # [B], host
        weight = host_to_device(per_video, z.device)[seg.vid]  # [N]
        qo = self.quantizer(z, generator=generator, entropy=entropy, token_weight=weight)
        recon = self.decode_features(qo.z_q, bl, meta)
        return recon, qo

    @torch.no_grad()
    def encode(self, video: torch.Tensor, assignment: torch.Tensor | None = None) -> TokenizedVideo:
        """``video [B, C, T, H, W]`` in [-1, 1] -> TokenizedVideo with ``sum(assignment)`` codes.

        ``assignment`` ``LongTensor[B, K]`` (or ``[K]`` / ``[1, K]``, broadcast). None: the
        attached router's choice, else the config's fixed assignment. A block prefix of the
        video (see module docstring) with a ``[B, t]`` assignment gives the first t blocks' codes.
        """
        nb = self._num_blocks_of(video)
        B = video.shape[0]
        if assignment is None:
            if self.router is not None:
                if nb < self.layout.num_blocks:
                    raise ValueError(f"the attached router chooses from whole clips ({self.layout.num_frames} frames), "
                                     f"got a block prefix of {video.shape[2]} frames: encode a prefix with an "
                                     "explicit assignment (the whole clip's choice, cut to its blocks)")
                assignment = self.router.choose(video)
            else:
                assignment = self.default_assignment(B, nb)
        assignment = self._check_assignment(assignment, B, nb)
        z, _ = self.encode_features(video, assignment)
        qo = self.quantizer(z)
        return TokenizedVideo(qo.indices, assignment.to(qo.indices.device))

    @torch.no_grad()
    def decode(self, tokens: TokenizedVideo) -> torch.Tensor:
        """TokenizedVideo with K (or a prefix of t) blocks -> ``float [B, C, T, H, W]`` (T of those blocks)."""
        bl = tokens.block_lengths
        if bl.shape[1] > self.layout.num_blocks:
            raise ValueError(f"tokens have {bl.shape[1]} blocks; this tokenizer has {self.layout.num_blocks}")
        self.layout.candidate_positions(bl)  # clear error on a non-candidate count
        device = self.head.weight.device
        z_q = self.quantizer.lookup(tokens.codes.to(device))
        return self.decode_features(z_q, bl)

    def last_layer_weight(self) -> torch.Tensor:
        """The output layer's weight (for the GAN's adaptive weight)."""
        return self.head.weight
