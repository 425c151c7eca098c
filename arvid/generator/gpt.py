"""A Llama-style decoder over the generator's token sequences.

RMSNorm, SwiGLU, rotary position embeddings (positions restart per packed sequence; the
conditioning prefix slots get positions too), no biases, optional QK-norm and grouped-query
attention, a zero-initialised output head.

Three ways to run it, one return type each:

- ``forward(PackedBatch) -> [N, vocab]``: training on packed variable-length sequences
  through :func:`arvid.generator.attention.varlen_causal_attention`.
- ``allocate_cache`` / ``prefill`` / ``decode_step``: inference over a static KV cache;
  ``decode_step`` has no host sync and no data-dependent Python branching, so it can be
  captured in a CUDA graph (one graph per ``kv_len``: the cache positions it attends over).
- ``forward_dense(cond, tokens) -> [B, n + L, vocab]``: a full recompute without a cache
  (the reference in tests, and the "no cache" speed baseline).

Input layout (gpt_api.md): ``[cond_1..cond_n, s_1, ..., s_L]``; the logits at index
``n - 1 + i`` predict ``s_{i+1}``. KV-cache position ``p`` holds input index ``p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvid.config import doc
from arvid.generator import cudnn_fe, fused
from arvid.generator.attention import BACKENDS, document_block_mask, resolve_backend, varlen_causal_attention
from arvid.generator.conditioning import Conditioning, drop_classes, drop_text
from arvid.generator.kv_cache import KVCache
from arvid.generator.packing import PackedBatch
from arvid.pretrained import PretrainedMixin


@dataclass
class GPTConfig:
    vocab_size: int = doc(help="SequenceFormat.vocab_size: codes then one length token per candidate count")
    max_seq_len: int = doc(help="longest input: prefix slots + the longest token sequence (KV cache limit)")
    num_classes: int = doc(0, "> 0: class conditioning with this many classes; id num_classes is the null class (CFG)")
    class_dropout: float = doc(0.1, "probability of replacing the condition (class or text) by the null one in training")
    text_vocab_size: int = doc(0, "> 0: text conditioning with SentencePiece ids below this")
    max_text_len: int = doc(0, "text prefix slots (text ids are padded/truncated to this length)")
    text_pad_id: int = doc(0, "the SentencePiece pad id (empty text = all pad: the unconditional text)")
    dim: int = doc(64, "model width")
    n_layers: int = doc(2, "transformer blocks")
    n_heads: int = doc(4, "query heads")
    n_kv_heads: int | None = doc(None, "key/value heads (grouped-query attention); None = n_heads")
    mlp_ratio: float = doc(8 / 3, "SwiGLU hidden size / dim when ffn_dim is 0")
    ffn_dim: int = doc(0, "SwiGLU hidden size; 0 = mlp_ratio * dim rounded up to ffn_multiple_of")
    ffn_multiple_of: int = doc(64, "round the SwiGLU hidden size up to a multiple of this")
    rope_theta: float = doc(10000.0, "RoPE base")
    qk_norm: bool = doc(False, "RMSNorm on queries and keys per head (stabilises large models)")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon")
    init_std: float = doc(0.02, "std of the normal init of linear layers and embeddings")
    attn_backend: str = doc("auto", "packed attention: auto|flash_attn|fa4|torch_varlen|flex|cudnn|cudnn_fe|cudnn_varlen|xformers|sdpa")
    residual_dtype: str = doc("float32", "training's residual stream under autocast: float32 (the parameters' "
                              "dtype) or compute (bf16: every residual add, norm input and their gradients "
                              "move half the bytes; the norms still sum in float32)")

    def __post_init__(self) -> None:
        if self.vocab_size <= 0 or self.max_seq_len <= 0:
            raise ValueError(f"vocab_size and max_seq_len must be positive, got {self.vocab_size}, {self.max_seq_len}")
        for name in ("dim", "n_layers", "n_heads", "ffn_multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_kv_heads is not None and self.n_kv_heads < 1:
            raise ValueError(f"n_kv_heads must be >= 1 (or None: n_heads), got {self.n_kv_heads}")
        if self.ffn_dim < 0 or (self.ffn_dim == 0 and not self.mlp_ratio > 0):
            raise ValueError(f"the SwiGLU needs a hidden size: ffn_dim > 0, or ffn_dim 0 and mlp_ratio > 0 "
                             f"(got ffn_dim {self.ffn_dim}, mlp_ratio {self.mlp_ratio})")
        if not (self.rope_theta > 1 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta (the RoPE base) must be a finite number > 1, got {self.rope_theta}")
        if not (self.norm_eps > 0 and self.init_std > 0):
            raise ValueError(f"norm_eps and init_std must be > 0, got {self.norm_eps}, {self.init_std}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {kv}")
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {self.attn_backend!r}")
        if (self.text_vocab_size > 0) != (self.max_text_len > 0):
            raise ValueError("text conditioning needs both text_vocab_size > 0 and max_text_len > 0 "
                             f"(got {self.text_vocab_size}, {self.max_text_len})")
        if self.text_vocab_size > 0 and not 0 <= self.text_pad_id < self.text_vocab_size:
            raise ValueError(f"text_pad_id {self.text_pad_id} outside the text vocabulary [0, {self.text_vocab_size})")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout <= 1.0:
            raise ValueError(f"num_classes must be >= 0 and class_dropout in [0, 1], got {self.num_classes}, {self.class_dropout}")
        if self.residual_dtype not in ("float32", "compute"):
            raise ValueError(f"residual_dtype must be 'float32' or 'compute', got {self.residual_dtype!r}")
        if self.max_seq_len <= self.num_prefix:
            raise ValueError(f"max_seq_len {self.max_seq_len} leaves no room after {self.num_prefix} prefix slots")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim > 0:
            return self.ffn_dim
        m = self.ffn_multiple_of
        return -(-int(self.mlp_ratio * self.dim) // m) * m

    @property
    def num_prefix(self) -> int:
        """Conditioning slots: a class slot, then max_text_len text slots; one start slot if neither."""
        n = (1 if self.num_classes > 0 else 0) + self.max_text_len
        return max(n, 1)


#: Size presets (counted with vocab 8192 + 5 length tokens): debug ~1.2M, B ~98M, L ~325M, XL ~630M.
PRESETS: dict[str, dict] = {
    "debug": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True),
    "B": dict(dim=768, n_layers=12, n_heads=12, ffn_multiple_of=256),
    "L": dict(dim=1024, n_layers=24, n_heads=16, ffn_multiple_of=256),
    "XL": dict(dim=1280, n_layers=30, n_heads=20, ffn_multiple_of=256),
}


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> same shape and dtype; normalised in float32 (bf16 sums of squares drift)."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies ``theta ** (-2i / head_dim)``, float32 ``[head_dim / 2]``: the one
    place they are computed (the torch tables here and the Triton decode kernels' angles)."""
    return theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_tables(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of positions ``pos`` ``LongTensor[T]``: ``(C, S)``, ``float32 [T, 1, D]``
    each (the 1 broadcasts over heads), ``C = [cos, cos]`` and ``S = [-sin, sin]`` over the two
    halves of the head (rotate-half convention; see :func:`apply_rope`).

    Computed here, in float32, rather than read from a table: no buffer to keep in sync with the
    dtype of the model, and any position works without a size limit. The model computes them
    once per forward (or decode step) and every layer reuses them: per layer they were a dozen
    small kernels, which dominate a decode step at batch 1."""
    ang = pos.to(torch.float32)[:, None] * rope_inv_freq(head_dim, theta, pos.device)[None, :]  # [T, D/2]
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], -1)[:, None, :], torch.cat([-sin, sin], -1)[:, None, :]


@torch.library.custom_op("arvid::rope_tables", mutates_args=())
def rope_tables_saved(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_tables` as an opaque op, for the compiled training forward: AOT autograd's
    partitioner then keeps the tables (``T x D`` floats, a few MB) for the backward instead of
    recomputing them there. Recomputed, they were fused into RoPE's backward kernel as a ``pow``,
    a ``cos`` and a ``sin`` per element of q and k: that kernel took 51 ms of a 356 ms L step at
    65,536 positions (torch_varlen, H100, 2026-12-07)."""
    c, s = rope_tables(pos, head_dim, theta)
    return c.contiguous(), s.contiguous()


@rope_tables_saved.register_fake
def _(pos, head_dim, theta):
    shape = (pos.shape[0], 1, head_dim)
    return pos.new_empty(shape, dtype=torch.float32), pos.new_empty(shape, dtype=torch.float32)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x`` ``[..., T, H, D]`` by the tables of :func:`rope_tables`, in float32; returns
    ``x``'s dtype. With ``x = [x1, x2]`` (halves): ``[x1 cos - x2 sin, x2 cos + x1 sin]``, computed
    as ``x C + [x2, x1] S`` (the same float operations in the same order: one product, one sum per
    element), which takes 6 kernels instead of 9. ``[x2, x1]`` is ``roll(x, D/2)``, not a ``cat`` of
    the halves: inductor's CPU code generator writes a ``cat`` out to memory (four extra passes over
    q and k per layer in the compiled training step), a ``roll`` it fuses as an index remap."""
    return fused.rotate(x, *rope)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.theta = cfg.rope_theta
        # One fused projection for q, k and v: one matmul instead of three.
        self.wqkv = nn.Linear(cfg.dim, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], joint_rope: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [..., T, dim]``, ``rope`` (:func:`rope_tables` of the positions) -> q ``[..., T, H, D]``,
        k and v ``[..., T, Hkv, D]`` (q and k rotated).

        ``joint_rope``: rotate q and k in one pass over their adjacent columns of the fused
        projection (half the kernels; the same values, bit for bit). q and k are then views into
        one tensor, contiguous only in their last dimension: the decode step uses it (SDPA and
        ``index_copy_`` take such views); the packed kernels get contiguous q and k."""
        h, kv, d = self.n_heads, self.n_kv, self.head_dim
        if joint_rope and self.q_norm is None:
            qk, v = self.wqkv(x).split([(h + kv) * d, kv * d], dim=-1)
            q, k = apply_rope(qk.unflatten(-1, (h + kv, d)), rope).split([h, kv], dim=-2)
            return q, k, v.unflatten(-1, (kv, d))
        q, k, v = self.wqkv(x).split([h * d, kv * d, kv * d], dim=-1)
        q = q.unflatten(-1, (h, d))  # [..., T, H, D]
        k = k.unflatten(-1, (kv, d))  # [..., T, Hkv, D]
        v = v.unflatten(-1, (kv, d))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def forward_packed(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor,
                       max_seqlen: int, backend: str, block_mask=None) -> torch.Tensor:
        """``x [N, dim]`` packed, ``rope`` of the position ids -> ``[N, dim]``. ``block_mask``: the
        batch's FlexAttention mask, shared by the layers (``flex`` only)."""
        if backend == "cudnn_fe" and self.q_norm is None and fused.ROPE:
            # RoPE inside cuDNN's opaque ops: the backward returns d[qkv] whole (arvid.generator.fused)
            qkv = self.wqkv(x).unflatten(-1, (self.n_heads + 2 * self.n_kv, self.head_dim))
            out = cudnn_fe.cudnn_fe_rope_attention(qkv, rope, cu_seqlens, max_seqlen, self.n_heads)
            return self.wo(out.flatten(1))
        q, k, v = self.qkv(x, rope)
        # backend: resolved once by GPT._backend (no availability checks traced in every layer)
        out = varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, backend, block_mask, resolved=True)
        return self.wo(out.flatten(1))

    def forward_dense(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None = None,
                      layer: int = 0) -> torch.Tensor:
        """``x [B, T, dim]`` at positions 0..T-1 (``rope`` of those), causal; with a cache, also write
        k/v at cache positions 0..T-1 (prefill). Returns ``[B, T, dim]``."""
        q, k, v = self.qkv(x, rope)
        q, k, v = (rearrange(t, "b t h d -> b h t d") for t in (q, k, v))
        if cache is not None:
            t = x.shape[1]
            cache.k[layer][:, :, :t] = k.to(cache.dtype)
            cache.v[layer][:, :, :t] = v.to(cache.dtype)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))

    def forward_decode(self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       bias: torch.Tensor, cache: KVCache, layer: int, attention: str = "sdpa") -> torch.Tensor:
        """One new token per row: ``x [B, 1, dim]`` at position ``pos`` (``LongTensor[1]`` on the
        device, ``rope`` its tables) -> ``[B, 1, dim]``.

        Writes k/v in place at ``pos`` and attends over the first ``n = bias.shape[-1]`` cache
        positions (a view of the cache, no copy) with the additive length mask ``bias``
        (``[1, 1, 1, n]``: 0 where ``arange(n) <= pos``, -inf after; :meth:`GPT.decode_step` builds
        it once per step for all layers): for a given ``n`` the shapes never change and nothing
        leaves the device (CUDA-graph capturable).

        ``attention``: ``sdpa`` (scaled_dot_product_attention with the mask ``bias``) or ``flex``
        (FlexAttention, the length mask as a score modification; under ``torch.compile`` a query
        of one position runs its split-KV decoding kernel, which spreads the cache over the SMs
        rather than one block per (row, head)). ``flex`` is meant for a compiled step: eagerly,
        FlexAttention runs unfused."""
        q, k, v = self.qkv(x, rope, joint_rope=True)
        q, k, v = (rearrange(t, "b t h d -> b h t d") for t in (q, k, v))  # t == 1
        cache.k[layer].index_copy_(2, pos, k.to(cache.dtype))
        cache.v[layer].index_copy_(2, pos, v.to(cache.dtype))
        n = bias.shape[-1]
        # [B, Hkv, n, D] views of the cache (no copy when it holds q's dtype)
        keys, values = cache.k[layer][:, :, :n].to(q.dtype), cache.v[layer][:, :, :n].to(q.dtype)
        gqa = self.n_kv != self.n_heads
        if attention == "flex":
            out = _flex_decode(q, keys, values, pos, gqa)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.to(q.dtype), enable_gqa=gqa)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))


def _flex_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Decode attention of ``q [B, H, 1, D]`` over ``k, v [B, Hkv, n, D]``, key positions after
    ``pos`` (``LongTensor[1]``, on the device) masked, through FlexAttention."""
    from torch.nn.attention.flex_attention import flex_attention

    def length_mask(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= pos[0], score, -float("inf"))

    return flex_attention(q.contiguous(), k, v, score_mod=length_mask, enable_gqa=gqa)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections fused
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.use_swiglu(x):  # one pass for d[gate, up] in the backward (arvid.generator.fused)
            return self.w2(fused.swiglu(self.w13(x)))
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.hidden_dim)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.ffn_norm(x))


# --------------------------------------------------------------------------- model


class VocabHead(nn.Linear):
    """The output head, ``nn.Linear(dim, vocab, bias=False)`` (same parameter, same checkpoints),
    whose matmul runs over the vocabulary padded with zero rows to a multiple of :attr:`ALIGN`.

    EVATok vocabularies are codes plus one length token per candidate (8,192 + 5 = 8,197): a row
    stride of 8,197 bf16 values is not 16-byte aligned, and cuBLAS then runs the head's three
    matmuls (forward, both gradients) with old sm75 kernels; on an H200 they took 6.5% of the L
    step (2026-12-06). Padded, the logits are a view of the first ``vocab`` columns of an aligned
    ``[..., vocab + pad]`` product: the same values, and the padding never reaches a loss or a
    sampler. Only for inputs of at least :attr:`MIN_ROWS` rows (the packed training forward, dense
    full-sequence forwards): the padded copy of the weight (17 MB for L) would cost a decode or
    prefill head (a few rows: the last position of each) more than it saves."""

    ALIGN = 64
    MIN_ROWS = 1024

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = -self.out_features % self.ALIGN
        if pad == 0 or x.numel() < self.MIN_ROWS * x.shape[-1]:
            return super().forward(x)
        return F.linear(x, F.pad(self.weight, (0, 0, 0, pad)))[..., : self.out_features]


class GPT(nn.Module, PretrainedMixin):
    """Decoder-only transformer over :class:`~arvid.generator.sequence.SequenceFormat` tokens."""

    config_class = GPTConfig
    model_kind = "gpt"

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.dim)
        self.class_emb = nn.Embedding(c.num_classes + 1, c.dim) if c.num_classes > 0 else None
        self.text_emb = nn.Embedding(c.text_vocab_size, c.dim) if c.text_vocab_size > 0 else None
        # A model with no conditioning still needs one slot whose output predicts the first token.
        self.start_emb = nn.Parameter(torch.zeros(1, c.dim)) if c.num_classes == 0 and c.max_text_len == 0 else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = VocabHead(c.dim, c.vocab_size)
        self._backend_cache: dict[tuple, str] = {}
        # weights of the linear layers: training_flops runs for every micro-batch (on the host)
        self._matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {k: dict(v) for k, v in PRESETS.items()}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT:
        """``GPT(GPTConfig(**PRESETS[name], **overrides))``; ``vocab_size``/``max_seq_len`` go in overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(GPTConfig(**{**PRESETS[name], **overrides}))

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name == "head.weight":
                nn.init.zeros_(p)  # every logit starts equal: the first loss is log(vocab)
            elif name.endswith(("wo.weight", "w2.weight")):
                # Residual branches scaled down so the stream's variance does not grow with depth.
                nn.init.normal_(p, std=std / (2 * self.config.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    def num_prefix(self, cond: Conditioning | None = None) -> int:
        """Conditioning prefix slots: 1 for a class token, the text length for text, 1 start slot for none."""
        if cond is not None:
            self._check_cond(cond, cond.batch_size or 1)
        return self.config.num_prefix

    def set_attn_backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {', '.join(BACKENDS)}, got {name!r}")
        self.config.attn_backend = name
        self._backend_cache.clear()

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= sum(m.weight.numel() for m in (self.tok_emb, self.class_emb, self.text_emb) if m is not None)
        return n

    def training_flops(self, seqlens: torch.Tensor | list[int], full_attention: bool = False) -> float:
        """FLOPs of one forward+backward over packed sequences of the given lengths.

        ``6 * matmul params * tokens`` plus causal attention ``6 * n_layers * dim * sum L^2 / 2 * 2``
        (QK^T and PV, half of the square for causality, backward = 2x forward). ``full_attention``:
        count attention as the full square instead (twice that), as nanoGPT's ``estimate_mfu`` does;
        for comparing with figures counted that way."""
        lens = torch.as_tensor(seqlens, dtype=torch.float64)
        attn = (12.0 if full_attention else 6.0) * self.config.n_layers * self.config.dim * float((lens**2).sum())
        return 6.0 * self._matmul_params * float(lens.sum()) + attn

    # ------------------------------------------------------------------ conditioning prefix
    def _check_cond(self, cond: Conditioning, batch: int) -> None:
        c = self.config
        if c.num_classes > 0:
            if cond.class_ids is None:
                raise ValueError(f"this GPT is class-conditional ({c.num_classes} classes): pass class_ids "
                                 f"(null class id {c.num_classes} for unconditional rows)")
            if cond.class_ids.shape[0] != batch:
                raise ValueError(f"class_ids has {cond.class_ids.shape[0]} rows, expected {batch}")
            # values checked on the host only (a device tensor would sync), and not while compiling
            if (cond.class_ids.device.type == "cpu" and cond.class_ids.numel() and not torch.compiler.is_compiling()) and (
                    int(cond.class_ids.min()) < 0 or int(cond.class_ids.max()) > c.num_classes):
                raise ValueError(f"class ids must lie in [0, {c.num_classes}] ({c.num_classes} = null), got "
                                 f"{cond.class_ids.unique().tolist()[:8]}")
        elif cond.class_ids is not None:
            raise ValueError("this GPT has no class conditioning (num_classes=0) but class_ids were given")
        if c.max_text_len > 0:
            if cond.text_ids is None:
                raise ValueError(f"this GPT is text-conditional: pass text_ids [B, {c.max_text_len}] "
                                 f"(all pad id {c.text_pad_id} for unconditional rows)")
            if tuple(cond.text_ids.shape) != (batch, c.max_text_len):
                raise ValueError(f"text_ids must have shape [{batch}, {c.max_text_len}], got {tuple(cond.text_ids.shape)}")
        elif cond.text_ids is not None:
            raise ValueError("this GPT has no text conditioning (max_text_len=0) but text_ids were given")

    def prefix_embeddings(self, cond: Conditioning, batch: int) -> torch.Tensor:
        """The conditioning slots of ``batch`` rows: ``[B, n_prefix, dim]``."""
        self._check_cond(cond, batch)
        parts = []
        if self.class_emb is not None:
            parts.append(self.class_emb(cond.class_ids)[:, None])  # [B, 1, dim]
        if self.text_emb is not None:
            parts.append(self.text_emb(cond.text_ids))  # [B, Lt, dim]
        if self.start_emb is not None:
            parts.append(self.start_emb[None].expand(batch, 1, -1))  # [B, 1, dim]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def null_conditioning(self, batch: int, device: torch.device | str = "cpu") -> Conditioning:
        """The unconditional rows for CFG: null class id and/or all-pad text."""
        c = self.config
        return Conditioning(
            torch.full((batch,), c.num_classes, dtype=torch.long, device=device) if c.num_classes > 0 else None,
            torch.full((batch, c.max_text_len), c.text_pad_id, dtype=torch.long, device=device)
            if c.max_text_len > 0 else None,
        )

    def drop_condition(self, cond: Conditioning, generator: torch.Generator | None = None,
                       p: float | None = None) -> Conditioning:
        """Training-time CFG dropout: each row's condition replaced by the null one with probability
        ``p`` (default ``config.class_dropout``); the draw comes from ``generator``. A model conditioned
        on both class and text drops both together (one draw per row): the fully null row is what
        guidance samples with, and half-dropped rows would never be used."""
        p = self.config.class_dropout if p is None else p
        drop = None
        if cond.class_ids is not None and cond.text_ids is not None and 0.0 < p <= 1.0:
            drop = torch.rand(cond.class_ids.shape, generator=generator) < p  # [S] on CPU
        return Conditioning(
            None if cond.class_ids is None else drop_classes(cond.class_ids, p, self.config.num_classes, generator,
                                                             drop),
            None if cond.text_ids is None else drop_text(cond.text_ids, p, self.config.text_pad_id, generator, drop),
        )

    def cast_for_inference_(self, dtype: torch.dtype = torch.bfloat16) -> GPT:
        """Cast every weight to ``dtype`` in place, except the RMSNorm gains, which stay float32: the
        norms compute in float32, so a ``dtype`` gain would be converted back on every call (two
        kernels per layer and decode step). Returns ``self``."""
        norms = [(m, m.weight.detach().float().clone()) for m in self.modules() if isinstance(m, RMSNorm)]
        self.to(dtype)
        for m, w in norms:
            m.weight.data = w.to(m.weight.device)
        return self

    # ------------------------------------------------------------------ training: packed
    # torch._disable_dynamo is torch.compiler.disable applied at the first call: the decorator
    # imports torch._dynamo, which costs ~1.4 s at start-up. Its wrapper lives in a module dynamo
    # skips, so a first call inside torch.compile still runs eagerly.
    @torch._disable_dynamo
    def _backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The concrete attention backend for inputs on ``device`` in ``dtype`` (resolved once, eagerly:
        the availability checks import modules, which torch.compile should not trace)."""
        key = (device.type, device.index, dtype)
        if key not in self._backend_cache:
            self._backend_cache[key] = resolve_backend(self.config.attn_backend, device, dtype)
        return self._backend_cache[key]

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Logits at every packed input position: ``[N, vocab]``."""
        n, s = self.config.num_prefix, batch.num_seqs
        dtype = (torch.get_autocast_dtype(batch.tokens.device.type)
                 if torch.is_autocast_enabled(batch.tokens.device.type) else self.tok_emb.weight.dtype)
        backend = self._backend(batch.tokens.device, dtype)
        if batch.num_prefix != n:
            raise ValueError(f"the batch was packed with {batch.num_prefix} prefix slots, this GPT uses {n}")
        if batch.max_seqlen > self.config.max_seq_len:
            raise ValueError(f"a packed sequence has {batch.max_seqlen} positions, more than max_seq_len="
                             f"{self.config.max_seq_len}")
        x = self.tok_emb(batch.tokens)  # [N, dim]
        if self.config.residual_dtype == "compute":
            x = x.to(dtype)  # the residual stream in the autocast dtype from here on
        cond = self.prefix_embeddings(Conditioning(batch.class_ids, batch.text_ids), s)  # [S, n, dim]
        slots = batch.cu_seqlens[:s].long()[:, None] + torch.arange(n, device=x.device)  # [S, n]
        x = x.index_put((slots.reshape(-1),), cond.reshape(s * n, -1).to(x.dtype))
        rope = rope_tables_saved(batch.position_ids, self.config.head_dim, self.config.rope_theta)
        # flex: one block mask per batch for all layers (built from tile ranges, no host sync)
        mask = document_block_mask(batch.cu_seqlens, x.shape[0]) if backend == "flex" else None
        for blk in self.blocks:
            x = x + blk.attn.forward_packed(blk.attn_norm(x), rope, batch.cu_seqlens, batch.max_seqlen, backend, mask)
            x = blk.mlp(x)
        return self.head(self.norm(x))

    # ------------------------------------------------------------------ inference: dense and cached
    def _dense(self, cond: Conditioning, tokens: torch.Tensor | None, batch: int,
               cache: KVCache | None) -> torch.Tensor:
        """Hidden states of ``[cond slots, tokens]``: ``[B, n + L, dim]``."""
        x = self.prefix_embeddings(cond, batch)  # [B, n, dim]
        if tokens is not None and tokens.shape[1] > 0:
            x = torch.cat([x, self.tok_emb(tokens).to(x.dtype)], dim=1)  # [B, n + L, dim]
        t = x.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"{t} input positions exceed max_seq_len={self.config.max_seq_len}")
        rope = rope_tables(torch.arange(t, device=x.device), self.config.head_dim, self.config.rope_theta)
        for i, blk in enumerate(self.blocks):
            x = x + blk.attn.forward_dense(blk.attn_norm(x), rope, cache, i)
            x = blk.mlp(x)
        return self.norm(x)

    def forward_dense(self, cond: Conditioning, tokens: torch.Tensor) -> torch.Tensor:
        """No cache, full recompute: ``tokens LongTensor[B, L]`` -> logits ``[B, n_prefix + L, vocab]``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be LongTensor[B, L], got shape {tuple(tokens.shape)}")
        return self.head(self._dense(cond, tokens, tokens.shape[0], None))

    def allocate_cache(self, batch_size: int, max_len: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed static cache for ``batch_size`` rows and ``max_len`` positions (prefix included)."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds the model's max_seq_len {self.config.max_seq_len}")
        p = self.tok_emb.weight
        return KVCache(self.config.n_layers, batch_size, self.config.kv_heads, max_len, self.config.head_dim,
                       device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)

    def prefill(self, cache: KVCache, cond: Conditioning, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Write the conditioning slots (+ ``prefix_tokens LongTensor[B, P]``) at cache positions
        ``0 .. n + P - 1``; return the logits predicting the next token, ``[B, vocab]``."""
        b = cache.batch_size
        if prefix_tokens is not None and tuple(prefix_tokens.shape[:1]) != (b,):
            raise ValueError(f"prefix_tokens must be LongTensor[{b}, P], got shape {tuple(prefix_tokens.shape)}")
        n = self.config.num_prefix + (0 if prefix_tokens is None else prefix_tokens.shape[1])
        if n > cache.max_len:
            raise ValueError(f"prefill of {n} positions does not fit a cache of max_len {cache.max_len}")
        h = self._dense(cond, prefix_tokens, b, cache)  # [B, n, dim]
        return self.head(h[:, -1])

    def decode_step(self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor,
                    kv_len: int | None = None, attention: str = "sdpa") -> torch.Tensor:
        """Feed ``tokens LongTensor[B]`` at sequence position ``pos`` (0-dim LongTensor on the device,
        shared by the batch); return the logits predicting the next token, ``[B, vocab]``.

        ``kv_len`` (a Python int, ``pos < kv_len <= cache.max_len``): attend only over the first
        ``kv_len`` cache positions, so a step costs what the filled part of the cache costs, not
        the whole preallocated cache (None = the whole cache). Each value is its own static
        shape (one CUDA graph, or one compiled shape, per value): callers round it up to a few
        bucket lengths. ``pos`` must be below ``kv_len`` (not checked: a check would sync with
        the host). ``attention``: ``sdpa`` or ``flex`` (for a compiled step; see
        :meth:`Attention.forward_decode`)."""
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"decode attention must be 'sdpa' or 'flex', got {attention!r}")
        if kv_len is not None and not 0 < kv_len <= cache.max_len:
            raise ValueError(f"kv_len must lie in [1, cache.max_len={cache.max_len}], got {kv_len}")
        n = cache.max_len if kv_len is None else kv_len
        p = pos.reshape(1)
        x = self.tok_emb(tokens)[:, None]  # [B, 1, dim]
        # Shared by every layer (once per step, not once per layer): the rotary tables of the
        # position and the additive length mask, in the dtype the attention will run in.
        dt = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
        rope = rope_tables(p, self.config.head_dim, self.config.rope_theta)
        bias = torch.zeros(n, device=x.device, dtype=dt).masked_fill(torch.arange(n, device=x.device) > p,
                                                                      float("-inf")).reshape(1, 1, 1, n)
        for i, blk in enumerate(self.blocks):
            x = x + blk.attn.forward_decode(blk.attn_norm(x), p, rope, bias, cache, i, attention)
            x = blk.mlp(x)
        return self.head(self.norm(x))[:, 0]
