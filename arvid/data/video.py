"""The one place where file-facing and model-facing video tensors are converted.

file-facing:  ``uint8 [T, H, W, C]`` (what PyAV decodes and writes)
model-facing: ``float [B, C, T, H, W]`` in ``[-1, 1]``
"""

from __future__ import annotations

import numpy as np
import torch


def to_model(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``uint8 [T, H, W, C]`` (or ``[B, T, H, W, C]``) -> ``float32 [C, T, H, W]`` (or batched) in [-1, 1]."""
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model expects uint8 frames, got {x.dtype}")
    if x.dim() == 4:
        return x.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)  # T H W C -> C T H W
    if x.dim() == 5:
        return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # B T H W C -> B C T H W
    raise ValueError(f"to_model expects [T, H, W, C] or [B, T, H, W, C], got shape {tuple(x.shape)}")


def as_8bit(video: torch.Tensor) -> torch.Tensor:
    """Float videos in [-1, 1] as they read back from an 8-bit file (``to_model(to_file(v))``, on
    ``video``'s device and in float32): what FVD's reference code sees of generated clips, which it
    reads as saved uint8 frames."""
    return ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().div(127.5).sub(1.0)


def to_file(video: torch.Tensor) -> torch.Tensor:
    """``float [C, T, H, W]`` (or ``[B, C, T, H, W]``) in [-1, 1] -> ``uint8 [T, H, W, C]`` (or batched)."""
    x = video.detach().float().cpu()
    x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if x.dim() == 4:
        return x.permute(1, 2, 3, 0).contiguous()  # C T H W -> T H W C
    if x.dim() == 5:
        return x.permute(0, 2, 3, 4, 1).contiguous()  # B C T H W -> B T H W C
    raise ValueError(f"to_file expects [C, T, H, W] or [B, C, T, H, W], got shape {tuple(video.shape)}")
