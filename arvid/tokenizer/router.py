"""The router (method.md, stage 3): a ViT that picks each video's assignment before tokenizing.

A clip ``float [B, C, T, H, W]`` is cut into 3D patches (a strided ``Conv3d``), a [CLS] token is
prepended, a pre-norm transformer runs over all patches (no causal mask: the router sees the whole
clip before deciding), and the [CLS] output goes through a linear head with one logit per
assignment of the layout (``layout.num_assignments`` classes, in the layout's index order).

``Router.choose(video)`` is what a tokenizer calls (``tokenizer.router = router``): the argmax
assignment as token counts, ``LongTensor[B, K]``; a ``budget_bias`` shifts choices towards fewer
(positive) or more (negative) tokens without retraining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvid.config import doc
from arvid.data.types import BlockLayout
from arvid.pretrained import PretrainedMixin


@dataclass
class RouterConfig:
    """A ViT classifier over the assignments of a block layout."""

    frames_per_block: tuple[int, ...] = doc((4, 4, 4, 4), "the tokenizer layout's frames per block")
    candidates: tuple[int, ...] = doc((32, 64, 128, 256, 512), "the tokenizer layout's token counts")
    image_size: int = doc(128, "input height = width (pixels)")
    in_channels: int = doc(3, "input channels")
    patch_size: tuple[int, int, int] = doc((2, 16, 16), "3D patch (time, height, width)")
    dim: int = doc(384, "transformer width")
    depth: int = doc(12, "transformer blocks")
    heads: int = doc(6, "attention heads")
    mlp_ratio: float = doc(4.0, "MLP hidden width / dim")
    dropout: float = doc(0.0, "dropout on attention weights, MLP and the head's input")

    def __post_init__(self) -> None:
        _ = self.layout  # validates frames_per_block / candidates
        pt, ph, pw = self.patch_size
        T = sum(self.frames_per_block)
        if T % pt or self.image_size % ph or self.image_size % pw:
            raise ValueError(f"patch_size {tuple(self.patch_size)} must divide the clip "
                             f"({T} frames, {self.image_size}x{self.image_size})")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")

    @property
    def layout(self) -> BlockLayout:
        return BlockLayout(tuple(self.frames_per_block), tuple(self.candidates))

    @property
    def grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.patch_size
        return sum(self.frames_per_block) // pt, self.image_size // ph, self.image_size // pw


#: named sizes; the layout and input size are set by the caller (they must match the tokenizer)
ROUTER_PRESETS: dict[str, dict] = {
    "debug": {"patch_size": (2, 4, 4), "dim": 64, "depth": 2, "heads": 2, "mlp_ratio": 2.0},
    # ViT-S/16 widths (about 21M parameters at 16x128x128 with 2x16x16 patches), the paper's router
    "S": {"patch_size": (2, 16, 16), "dim": 384, "depth": 12, "heads": 6, "mlp_ratio": 4.0},
    "B": {"patch_size": (2, 16, 16), "dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4.0},
}


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, N, D]``."""
        qkv = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(rearrange(a, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))


class Router(nn.Module, PretrainedMixin):
    """ViT over the clip -> logits over all assignments of ``config.layout``."""

    config_class = RouterConfig
    model_kind = "router"

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        self.layout = config.layout
        pt, ph, pw = config.patch_size
        self.patch_embed = nn.Conv3d(config.in_channels, config.dim, kernel_size=(pt, ph, pw), stride=(pt, ph, pw))
        n = config.grid[0] * config.grid[1] * config.grid[2]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, config.dim))
        self.blocks = nn.ModuleList(
            _Block(config.dim, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head_drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.dim, self.layout.num_assignments)
        # tokens of each class, buffered so choose() biases on the right device without rebuilding
        self.register_buffer("assignment_lengths", self.layout.all_assignments().sum(1).float(), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # a zero head starts from the uniform distribution over assignments
        nn.init.zeros_(self.head.weight)

    @classmethod
    def presets(cls) -> dict[str, dict]:
        return {k: dict(v) for k, v in ROUTER_PRESETS.items()}

    @classmethod
    def from_preset(cls, preset: str, layout: BlockLayout, image_size: int, **overrides) -> Router:
        """Build a preset sized for ``layout`` and ``image_size`` (plus field overrides)."""
        if preset not in ROUTER_PRESETS:
            raise ValueError(f"unknown router preset {preset!r} (presets: {list(ROUTER_PRESETS)})")
        kw = dict(ROUTER_PRESETS[preset])
        kw.update(frames_per_block=layout.frames_per_block, candidates=layout.candidates, image_size=image_size)
        kw.update(overrides)
        return cls(RouterConfig(**kw))

    def _check_input(self, video: torch.Tensor) -> None:
        c = self.config
        want = (c.in_channels, self.layout.num_frames, c.image_size, c.image_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(f"the router expects video [B, {', '.join(map(str, want))}], got {tuple(video.shape)}")

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``float [B, C, T, H, W]`` in [-1, 1] -> logits ``[B, num_assignments]``."""
        self._check_input(video)
        x = self.patch_embed(video.to(self.patch_embed.weight.dtype))  # [B, D, t, h, w]
        x = rearrange(x, "b d t h w -> b (t h w) d")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # [B, 1+N, D]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.head_drop(self.norm(x[:, 0])))

    @torch.no_grad()
    def choose_indices(self, video: torch.Tensor, budget_bias: float = 0.0) -> torch.Tensor:
        """Argmax assignment index per video, ``LongTensor[B]``.

        ``budget_bias`` subtracts ``budget_bias * tokens / max_tokens`` from each logit: > 0 favours
        cheaper assignments, < 0 richer ones.

        Always in the router's own dtype, outside any autocast: the choice is the same function of
        the clip in every stage (train-router's evaluation and eval recon run it in fp32; tokenize
        under bf16 inference autocast and the final tokenizer's bf16 training step chose other
        assignments for near-tied clips before).
        """
        dtype = next(self.parameters()).dtype  # the clip in the router's dtype (autocast no longer casts it)
        with torch.autocast(video.device.type, enabled=False):
            logits = self(video.to(dtype)).float()
        if budget_bias:
            logits = logits - budget_bias * self.assignment_lengths / float(self.layout.max_tokens)
        return logits.argmax(-1)

    @torch.no_grad()
    def choose(self, video: torch.Tensor, budget_bias: float = 0.0) -> torch.Tensor:
        """The chosen assignment as token counts, ``LongTensor[B, K]``."""
        return self.layout.indices_to_assignments(self.choose_indices(video, budget_bias).cpu()).to(video.device)
