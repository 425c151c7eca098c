"""Vector quantizers for the tokenizers: factorised l2-normalised VQ and FSQ.

Both take continuous vectors ``z [N, code_dim]`` (the tokenizer projects its features down to
``code_dim`` first) and return a :class:`QuantOutput` with straight-through quantized vectors,
code indices, the quantizer's own losses (unweighted; the training task weights them) and
usage statistics.

VQ (``kind="vq"``): the codebook lives in a low-dimensional space (``code_dim`` 8..32) and both
``z`` and the codes are l2-normalised, so the nearest code is the one of highest cosine. This
factorised, normalised lookup (ViT-VQGAN) keeps codebook usage high without tricks; on top of it
we offer EMA codebook updates and dead-code restart from recent encoder outputs.

FSQ (``kind="fsq"``): each of ``len(levels)`` channels is bounded and rounded to ``levels[i]``
values; the code index is the mixed-radix number of the rounded channels. No codebook, no losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from arvid.config import doc


@dataclass
class QuantizerConfig:
    """Which quantizer and its settings."""

    kind: Literal["vq", "fsq"] = doc("vq", "vq: factorised l2-normalised codebook; fsq: finite scalar quantization")
    codebook_size: int = doc(8192, "vq: number of codes (fsq: ignored, the product of `levels`)")
    code_dim: int = doc(16, "vq: dimension of the factorised, l2-normalised code space (fsq: len(levels))")
    use_ema: bool = doc(False, "vq: update the codebook by EMA of assigned vectors instead of the codebook loss")
    ema_decay: float = doc(0.99, "vq: decay of the EMA codebook statistics")
    restart_dead: bool = doc(True, "vq: replace codes unused for a while by recent encoder outputs (training only)")
    dead_threshold: float = doc(1e-3, "vq: a code is dead when its EMA usage share x codebook_size is below this")
    usage_decay: float = doc(0.99, "vq: decay of the per-code EMA usage used to find dead codes")
    restart_every: int = doc(50, "vq: check for dead codes every this many training forwards")
    entropy_temperature: float = doc(0.01, "vq: temperature of the softmax over cosine similarities for the entropy loss")
    levels: tuple[int, ...] = doc((8, 8, 8, 5, 5, 5), "fsq: quantization levels per channel")

    def __post_init__(self) -> None:
        if self.kind == "vq":
            if self.codebook_size < 2:
                raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
            if self.code_dim < 1:
                raise ValueError(f"code_dim must be >= 1, got {self.code_dim}")
        else:
            if not self.levels or any(int(v) < 2 for v in self.levels):
                raise ValueError(f"fsq levels must be integers >= 2, got {self.levels}")

    @property
    def num_codes(self) -> int:
        return self.codebook_size if self.kind == "vq" else math.prod(self.levels)

    @property
    def dim(self) -> int:
        return self.code_dim if self.kind == "vq" else len(self.levels)


@dataclass
class QuantOutput:
    """What a quantizer returns.

    ``z_q``: ``float [N, code_dim]`` quantized vectors, straight-through (gradients reach ``z``).
    ``indices``: ``LongTensor[N]``. ``losses``: unweighted scalar tensors (``commit``, ``codebook``,
    ``entropy``). ``metrics``: floats (``usage``: share of codes hit in this batch, ``perplexity``).
    """

    z_q: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def code_statistics(indices: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Usage share and perplexity of ``indices`` (``LongTensor[N]``) over ``num_codes`` codes."""
    return {k: float(v) for k, v in code_statistics_tensors(indices, num_codes).items()}


def _code_counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """``float [num_codes]``: how often each code occurs. A scatter-add rather than ``torch.bincount``,
    which on CUDA reads the indices' min and max back to the host (a sync) to size its output."""
    flat = indices.reshape(-1)
    counts = torch.zeros(num_codes, device=indices.device, dtype=torch.float32)
    return counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def code_statistics_tensors(indices: torch.Tensor, num_codes: int) -> dict[str, torch.Tensor]:
    """:func:`code_statistics` as 0-dim tensors on the indices' device: no host sync (a training
    step logs them every step; the Trainer reads them at its log interval)."""
    if indices.numel() == 0:
        zero = torch.zeros((), device=indices.device)
        return {"usage": zero, "perplexity": zero.clone()}
    counts = _code_counts(indices, num_codes)
    p = counts / counts.sum()
    entropy = -torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p)).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy (to be low: confident codes) minus the entropy of the batch-average
    distribution (to be high: all codes used). ``logits [N, V]`` -> scalar."""
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    per_sample = -(p * logp).sum(-1).mean()
    avg = p.mean(0)
    batch = -(avg * (avg + 1e-10).log()).sum()
    return per_sample - batch


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Factorised, l2-normalised VQ with straight-through gradients.

    The codebook is ``[codebook_size, code_dim]``; lookups compare l2-normalised vectors, so the
    nearest code is the highest cosine. Training-time state (EMA statistics, per-code usage) is in
    buffers, so it is saved and restored with the weights and kept in sync across processes.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.codebook_size = config.codebook_size
        self.code_dim = config.code_dim
        # Deterministic init without touching the global RNG (no side effects in constructors).
        g = torch.Generator().manual_seed(0)
        weight = F.normalize(torch.randn(config.codebook_size, config.code_dim, generator=g), dim=-1)
        self.codebook = nn.Parameter(weight, requires_grad=not config.use_ema)
        self.register_buffer("usage", torch.full((config.codebook_size,), 1.0 / config.codebook_size))
        self.register_buffer("ema_sum", weight.clone())
        self.register_buffer("ema_count", torch.ones(config.codebook_size))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # the host's copy of `steps` for the restart interval (reading the buffer each step would be
        # a device sync): read once after construction or a load, then counted alongside
        self._host_steps: int | None = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = None  # `steps` was replaced: read it again

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def normalized_codebook(self) -> torch.Tensor:
        """``float [codebook_size, code_dim]``, unit rows."""
        return F.normalize(self.codebook, dim=-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """``LongTensor[...]`` -> ``float [..., code_dim]`` (unit vectors)."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"code indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]")
        return F.embedding(indices, self.normalized_codebook())

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None,
                entropy: bool = False, token_weight: torch.Tensor | None = None) -> QuantOutput:
        """``z [N, code_dim]`` -> :class:`QuantOutput`. ``entropy``: also compute the entropy loss.
        ``token_weight [N]`` (summing to 1): the commitment and codebook losses are that weighted
        mean over tokens instead of the plain one (packed videos of different token counts: each
        video weighs the same, whatever the batch's split into micro-batches).

        In training mode this also updates the EMA codebook (if ``use_ema``) and the usage
        statistics, and restarts dead codes every ``restart_every`` calls (``generator`` picks
        which recent vectors replace them).
        """
        if z.dim() != 2 or z.shape[1] != self.code_dim:
            raise ValueError(f"VectorQuantizer expects [N, {self.code_dim}], got {tuple(z.shape)}")
        z = F.normalize(z.float(), dim=-1)
        codes = self.normalized_codebook().float()
        sim = z @ codes.t()  # [N, V] cosine similarities
        indices = sim.argmax(-1)
        e = F.embedding(indices, codes)
        def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if token_weight is None:
                return F.mse_loss(a, b)
            return ((a - b).pow(2).mean(-1) * token_weight.to(a.dtype)).sum()

        losses = {
            # Commitment pulls the encoder output to its code; the codebook loss pulls the code
            # (when not updated by EMA). Both on unit vectors: the mean over elements of the squared
            # difference, (2 - 2 cos) / code_dim per token.
            "commit": mse(z, e.detach()),
            "codebook": mse(e, z.detach()) if not self.config.use_ema else z.new_zeros(()),
        }
        if entropy:
            losses["entropy"] = entropy_loss(sim / self.config.entropy_temperature)
        z_q = z + (e - z).detach()  # straight-through
        if self.training and torch.is_grad_enabled():
            self._update(z.detach(), indices, generator)
        return QuantOutput(z_q=z_q, indices=indices, losses=losses,
                           metrics=code_statistics_tensors(indices, self.codebook_size))

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None) -> None:
        cfg = self.config
        onehot_counts = _code_counts(indices, self.codebook_size)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, z.to(self.ema_sum.dtype))
        _all_reduce_sum(onehot_counts)
        _all_reduce_sum(sums)
        total = onehot_counts.sum().clamp(min=1)
        self.usage.mul_(cfg.usage_decay).add_(onehot_counts / total, alpha=1 - cfg.usage_decay)
        if cfg.use_ema:
            self.ema_count.mul_(cfg.ema_decay).add_(onehot_counts, alpha=1 - cfg.ema_decay)
            self.ema_sum.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
            used = (self.ema_count > 1e-6)[:, None]  # a where, not a boolean index (which would sync)
            fresh = F.normalize(self.ema_sum, dim=-1).to(self.codebook.dtype)
            self.codebook.data.copy_(torch.where(used, fresh, self.codebook.data))
        if self._host_steps is None:
            self._host_steps = int(self.steps)
        self.steps += 1
        self._host_steps += 1
        if cfg.restart_dead and cfg.restart_every > 0 and self._host_steps % cfg.restart_every == 0:
            self.restart_dead_codes(z, generator)

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Replace every code whose EMA usage share is below ``dead_threshold / codebook_size`` by a
        randomly chosen vector of ``z [N, code_dim]`` (plus a little noise). Returns how many.

        With several processes, rank 0 chooses and broadcasts, so codebooks stay identical.
        """
        dead = self.usage * self.codebook_size < self.config.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0 or z.shape[0] == 0:
            return 0
        pick = torch.randint(z.shape[0], (n_dead,), generator=generator, device="cpu").to(z.device)
        noise = torch.randn(n_dead, self.code_dim, generator=generator, device="cpu").to(z.device)
        new = F.normalize(z[pick] + 0.01 * noise, dim=-1).to(self.codebook.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(new, src=0)
        self.codebook.data[dead] = new
        self.ema_sum[dead] = new.to(self.ema_sum.dtype)
        self.ema_count[dead] = 1.0
        # A revived code starts with an average share so it is not restarted again at once.
        self.usage[dead] = 1.0 / self.codebook_size
        return n_dead


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): bounded, rounded channels, no codebook."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        levels = torch.tensor([int(v) for v in config.levels], dtype=torch.long)
        self.register_buffer("levels", levels, persistent=False)
        basis = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), levels[:-1]]), 0)
        self.register_buffer("basis", basis, persistent=False)
        self.code_dim = len(config.levels)
        self.codebook_size = int(math.prod(config.levels))

    @property
    def num_codes(self) -> int:
        return self.codebook_size

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # Map to about (-(L-1)/2, (L-1)/2) per channel; even L gets a half-step offset so that
        # rounding yields exactly L values. The range is widened by 1e-3, not narrowed: narrowed,
        # L = 2 had offset / half > 1 and atanh gave NaN (before 2026-12-07).
        half = (self.levels.float() - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _to_unit(self, q: torch.Tensor) -> torch.Tensor:
        """Rounded integer grid values -> [-1, 1]."""
        half = self.levels.float() // 2
        return q / half

    def forward(self, z: torch.Tensor, generator: torch.Generator | None = None,
                entropy: bool = False, token_weight: torch.Tensor | None = None) -> QuantOutput:
        """``z [N, len(levels)]`` -> :class:`QuantOutput` (no losses). ``generator``/``entropy``/``token_weight``
        unused."""
        if z.dim() != 2 or z.shape[1] != self.code_dim:
            raise ValueError(f"FSQ expects [N, {self.code_dim}], got {tuple(z.shape)}")
        b = self._bound(z.float())
        # clamped to the L grid values: the 1e-3 widening of _bound let round() reach one value past
        # either end for L > 1000 (an index outside [0, codebook_size)); a no-op for smaller L
        lo = -(self.levels // 2)
        r = torch.minimum(torch.maximum(torch.round(b), lo), lo + self.levels - 1)
        q = b + (r - b).detach()  # straight-through rounding
        indices = self.codes_to_indices(r.detach())
        return QuantOutput(z_q=self._to_unit(q), indices=indices, losses={},
                           metrics=code_statistics_tensors(indices, self.codebook_size))

    def codes_to_indices(self, q: torch.Tensor) -> torch.Tensor:
        """Rounded grid values ``[..., D]`` -> ``LongTensor[...]`` mixed-radix indices."""
        shifted = (q + self.levels.float() // 2).long()  # 0..L-1 per channel
        return (shifted * self.basis).sum(-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """``LongTensor[...]`` -> ``float [..., D]`` in [-1, 1]."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"FSQ indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        digits = (indices[..., None] // self.basis) % self.levels  # [..., D]
        return self._to_unit(digits.float() - self.levels.float() // 2)


def build_quantizer(config: QuantizerConfig) -> VectorQuantizer | FSQ:
    """The quantizer named by ``config.kind``."""
    return VectorQuantizer(config) if config.kind == "vq" else FSQ(config)
