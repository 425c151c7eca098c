"""grid3d: a causal 3D-CNN VQ tokenizer (MAGVIT-style), the fixed-length baseline.

The encoder downsamples ``[B, C, T, H, W]`` to a latent grid ``T' x H' x W'`` of codes; every
temporal convolution is *causal* (padded on the past side only, strided so that latent frame j
sees input frames up to the last frame of its block), and normalisation is per frame, so
latent frame j depends only on input frames <= the end of block j. The decoder mirrors it with
causal convolutions and depth-to-time upsampling, so the frames of block j depend only on
latent frames <= j.

Behind the same protocol as EVATok: its blocks are its latent frames (``frames_per_block`` =
the temporal downsampling factor, repeated), and the layout has the single candidate
``H' * W'``. ``encode`` accepts ``assignment=None`` or that uniform assignment, nothing else.
Codes are packed per video in (t, h, w) raster order. Block prefixes work as in EVATok.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arvid.config import doc, nested
from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.pretrained import PretrainedMixin
from arvid.tokenizer.base import register_tokenizer
from arvid.tokenizer.quantizers import QuantizerConfig, QuantOutput, build_quantizer


@dataclass
class Grid3DConfig:
    """Architecture of the grid3d tokenizer (presets: ``Grid3D.presets()``)."""

    num_frames: int = doc(16, "frames per clip (a multiple of the temporal downsampling factor)")
    image_size: int = doc(128, "frame height = width (a multiple of the spatial downsampling factor)")
    in_channels: int = doc(3, "video channels")
    base_channels: int = doc(128, "channels of the first level")
    channel_mult: tuple[int, ...] = doc((1, 2, 2, 4), "channel multiplier per level; each level but the "
                                        "last halves the spatial size")
    num_res_blocks: int = doc(2, "residual blocks per level")
    temporal_levels: int = doc(2, "the first this many downsampling steps also halve time")
    groups: int = doc(32, "GroupNorm groups (normalisation is per frame to keep causality)")
    quantizer: QuantizerConfig = nested(QuantizerConfig, "the quantizer of the latent grid")

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        downs = len(self.channel_mult) - 1
        if not 0 <= self.temporal_levels <= downs:
            raise ValueError(f"temporal_levels must be in [0, {downs}] (len(channel_mult) - 1), "
                             f"got {self.temporal_levels}")
        if self.num_frames % self.temporal_factor:
            raise ValueError(f"num_frames {self.num_frames} must be a multiple of the temporal factor "
                             f"{self.temporal_factor}")
        if self.image_size % self.spatial_factor:
            raise ValueError(f"image_size {self.image_size} must be a multiple of the spatial factor "
                             f"{self.spatial_factor}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.groups:
                raise ValueError(f"channels {self.base_channels * m} must be divisible by groups {self.groups}")

    @property
    def temporal_factor(self) -> int:
        return 2**self.temporal_levels

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def layout(self) -> BlockLayout:
        side = self.image_size // self.spatial_factor
        blocks = self.num_frames // self.temporal_factor
        return BlockLayout((self.temporal_factor,) * blocks, (side * side,))


class CausalConv3d(nn.Module):
    """3D convolution padded on the past side in time (and symmetrically in space).

    With temporal stride s the past padding is ``kt - s``, so output j sees input frames up to
    ``j * s + s - 1``: the last frame of its group, never a later one.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        st, ss = stride
        self.time_pad = kernel - st
        self.space_pad = kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel, stride=(st, ss, ss))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        x = F.pad(x, (p, p, p, p, self.time_pad, 0))
        return self.conv(x)


class FrameNorm(nn.GroupNorm):
    """GroupNorm applied to each frame separately (statistics over time would break causality)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=B)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(groups, cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = FrameNorm(groups, cout), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    """x2 in space (nearest + conv) and, if ``temporal``, x2 in time by depth-to-time, so both
    output frames of latent frame j come from latent j alone (no look-ahead)."""

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.time_conv = CausalConv3d(ch, 2 * ch) if temporal else None
        self.conv = CausalConv3d(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_conv is not None:
            x = rearrange(self.time_conv(x), "b (s c) t h w -> b c (t s) h w", s=2)
        B = x.shape[0]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = rearrange(x, "(b t) c h w -> b c t h w", b=B)
        return self.conv(x)


@register_tokenizer("grid3d")
class Grid3D(nn.Module, PretrainedMixin):
    """Causal 3D-CNN VQ tokenizer emitting ``T' x H' x W'`` codes (see module docstring)."""

    config_class = Grid3DConfig

    def __init__(self, config: Grid3DConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.layout = c.layout
        self.codebook_size = c.quantizer.num_codes
        self.router = None  # protocol symmetry: grid3d has one assignment, a router has no choice
        chans = [c.base_channels * m for m in c.channel_mult]
        g = c.groups

        enc: list[nn.Module] = [CausalConv3d(c.in_channels, chans[0])]
        cin = chans[0]
        for i, ch in enumerate(chans):
            for _ in range(c.num_res_blocks):
                enc.append(ResBlock(cin, ch, g))
                cin = ch
            if i < len(chans) - 1:
                enc.append(CausalConv3d(ch, ch, stride=(2 if i < c.temporal_levels else 1, 2)))
        enc += [ResBlock(cin, cin, g), FrameNorm(g, cin), nn.SiLU(), nn.Conv3d(cin, c.quantizer.dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = build_quantizer(c.quantizer)

        dec: list[nn.Module] = [nn.Conv3d(c.quantizer.dim, chans[-1], 1), ResBlock(chans[-1], chans[-1], g)]
        cin = chans[-1]
        n_up = len(chans) - 1
        for j, ch in enumerate(reversed(chans)):
            for _ in range(c.num_res_blocks):
                dec.append(ResBlock(cin, ch, g))
                cin = ch
            if j < n_up:
                # the last `temporal_levels` upsamplings undo the first temporal downsamplings
                dec.append(Upsample(ch, temporal=(n_up - 1 - j) < c.temporal_levels))
        dec += [FrameNorm(g, cin), nn.SiLU()]
        self.decoder = nn.Sequential(*dec)
        self.conv_out = CausalConv3d(cin, c.in_channels)

    @classmethod
    def presets(cls) -> dict[str, dict]:
        """``debug``: tiny, CPU tests (8x32x32 clips, 4 blocks of 8x8 codes); ``B``: 16x128x128 clips,
        4 blocks of 16x16 codes (1024 tokens, the fixed-length baseline)."""
        return {
            "debug": dict(num_frames=8, image_size=32, base_channels=16, channel_mult=(1, 2, 2),
                          num_res_blocks=1, temporal_levels=1, groups=8,
                          quantizer=dict(kind="vq", codebook_size=256, code_dim=8, restart_every=20)),
            "B": dict(num_frames=16, image_size=128, base_channels=128, channel_mult=(1, 2, 2, 4),
                      num_res_blocks=2, temporal_levels=2, groups=32,
                      quantizer=dict(kind="vq", codebook_size=16384, code_dim=16)),
        }

    def __setattr__(self, name, value) -> None:
        # Keep an attached router out of the submodules (it is not part of these weights).
        if name == "router":
            self.__dict__["router"] = value
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ helpers
    def _num_blocks_of(self, video: torch.Tensor) -> int:
        c = self.config
        if video.dim() != 5:
            raise ValueError(f"grid3d expects video [B, C, T, H, W], got shape {tuple(video.shape)}")
        _, C, T, H, W = video.shape
        if C != c.in_channels or H != c.image_size or W != c.image_size:
            raise ValueError(f"grid3d expects {c.in_channels} channels and {c.image_size}x{c.image_size} frames, "
                             f"got video of shape {tuple(video.shape)}")
        f = c.temporal_factor
        if T % f or not 0 < T <= c.num_frames:
            raise ValueError(f"video has {T} frames; expected {c.num_frames} (or a prefix, a multiple of {f})")
        return T // f

    def _assignment(self, assignment: torch.Tensor | None, batch: int, nb: int) -> torch.Tensor:
        n = self.layout.candidates[0]
        if assignment is not None:
            a = torch.as_tensor(assignment, dtype=torch.long).cpu()
            a = a[None] if a.dim() == 1 else a
            if a.dim() != 2 or a.shape[1] != nb or not bool((a == n).all()):
                raise ValueError(f"grid3d is fixed-length: the only assignment is {n} tokens for each of its "
                                 f"{nb} blocks (or None), got {a.tolist()}")
        return torch.full((batch, nb), n, dtype=torch.long)

    # ------------------------------------------------------------------ public API
    def encode_features(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> pre-quantization latents ``[B, code_dim, T', H', W']``."""
        self._num_blocks_of(video)
        return self.encoder(video)

    def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``[B, code_dim, T', H', W']`` -> video ``[B, C, T'*f, H, W]``."""
        return self.conv_out(self.decoder(z_q))

    def forward(self, video: torch.Tensor, assignment: torch.Tensor | None = None,
                generator: torch.Generator | None = None, entropy: bool = False) -> tuple[torch.Tensor, QuantOutput]:
        """Training pass: ``video [B, C, T, H, W]`` -> (reconstruction, :class:`QuantOutput`).
        ``assignment``: None or the uniform one (checked)."""
        nb = self._num_blocks_of(video)
        self._assignment(assignment, video.shape[0], nb)
        z = self.encode_features(video)
        B, D, T, H, W = z.shape
        qo = self.quantizer(rearrange(z, "b d t h w -> (b t h w) d"), generator=generator, entropy=entropy)
        z_q = rearrange(qo.z_q, "(b t h w) d -> b d t h w", b=B, t=T, h=H, w=W)
        return self.decode_features(z_q.to(z.dtype)), qo

    @torch.no_grad()
    def encode(self, video: torch.Tensor, assignment: torch.Tensor | None = None) -> TokenizedVideo:
        """``video [B, C, T, H, W]`` -> TokenizedVideo of ``T' * H' * W'`` codes per video."""
        nb = self._num_blocks_of(video)
        bl = self._assignment(assignment, video.shape[0], nb)
        z = self.encode_features(video)
        qo = self.quantizer(rearrange(z, "b d t h w -> (b t h w) d"))
        return TokenizedVideo(qo.indices, bl.to(qo.indices.device))

    @torch.no_grad()
    def decode(self, tokens: TokenizedVideo) -> torch.Tensor:
        """TokenizedVideo (all blocks, or a prefix) -> ``float [B, C, T, H, W]``."""
        bl = tokens.block_lengths
        n = self.layout.candidates[0]
        if bl.shape[1] > self.layout.num_blocks or not bool((bl == n).all()):
            raise ValueError(f"grid3d decodes {n} codes per block for up to {self.layout.num_blocks} blocks, "
                             f"got block_lengths {bl.tolist()}")
        side = self.config.image_size // self.config.spatial_factor
        device = self.conv_out.conv.weight.device
        e = self.quantizer.lookup(tokens.codes.to(device))
        z_q = rearrange(e, "(b t h w) d -> b d t h w", b=bl.shape[0], t=bl.shape[1], h=side, w=side)
        return self.decode_features(z_q.to(self.conv_out.conv.weight.dtype))

    def last_layer_weight(self) -> torch.Tensor:
        """The output layer's weight (for the GAN's adaptive weight)."""
        return self.conv_out.conv.weight
