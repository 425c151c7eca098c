"""Reconstruction quality per frame (PSNR, SSIM, LPIPS) and a reducible accumulator.

Conventions: videos are model-facing ``float [B, C, T, H, W]`` in [-1, 1]; PSNR and SSIM are
computed on ``(x + 1) / 2`` with data range 1 (torchmetrics functional; SSIM with its default
11x11 Gaussian window, sigma 1.5); every metric is per frame, averaged over a video's frames,
then over videos. The token count goes beside every quality number (:meth:`ReconstructionMetrics.compute`).
A frame reconstructed exactly would have an infinite PSNR; :func:`psnr_per_frame` caps each frame at
:data:`PSNR_CAP` dB so that one such frame does not make a mean (and a JSON file) infinite.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torchmetrics import Metric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from arvid.eval.lpips import LPIPS

#: per-frame PSNR ceiling (dB) of :func:`psnr_per_frame` (identical frames: MSE 0)
PSNR_CAP = 100.0


def _frames(video: torch.Tensor, name: str) -> torch.Tensor:
    if video.dim() != 5:
        raise ValueError(f"{name} must be a video [B, C, T, H, W], got shape {tuple(video.shape)}")
    return rearrange(video.float(), "b c t h w -> (b t) c h w")


def _check_pair(real: torch.Tensor, recon: torch.Tensor) -> None:
    if real.shape != recon.shape:
        raise ValueError(f"real {tuple(real.shape)} and reconstruction {tuple(recon.shape)} must have the same shape")


def psnr_per_frame(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each frame: ``[B, C, T, H, W]`` x2 in [-1, 1] -> ``[B, T]``; identical frames give
    :data:`PSNR_CAP`."""
    _check_pair(real, recon)
    b = real.shape[0]
    x, y = (_frames(real, "real") + 1) / 2, (_frames(recon, "recon") + 1) / 2
    v = peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return v.reshape(b, -1).clamp(max=PSNR_CAP)  # (B T) -> B T


def ssim_per_frame(real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """SSIM of each frame: ``[B, C, T, H, W]`` x2 in [-1, 1] -> ``[B, T]`` (frames at least 11 x 11)."""
    _check_pair(real, recon)
    b = real.shape[0]
    x, y = (_frames(real, "real") + 1) / 2, (_frames(recon, "recon") + 1) / 2
    v = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
    return v.reshape(b, -1)  # (B T) -> B T


@torch.no_grad()
def lpips_per_frame(lpips: LPIPS, real: torch.Tensor, recon: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """LPIPS of each frame: ``[B, C, T, H, W]`` x2 in [-1, 1] -> ``[B, T]``, ``chunk`` frames at a time."""
    _check_pair(real, recon)
    b = real.shape[0]
    x, y = _frames(real, "real"), _frames(recon, "recon")
    out = [lpips(x[i : i + chunk], y[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    return torch.cat(out).reshape(b, -1)  # (B T) -> B T


class ReconstructionMetrics(Metric):
    """Mean PSNR, SSIM, LPIPS (per frame, then per video) and mean tokens per video; reducible.

    ``update(real, recon, tokens=None)``: videos ``[B, C, T, H, W]`` in [-1, 1]; ``tokens``: the
    number of tokens each video was coded with (``LongTensor[B]`` or one int for all).
    ``lpips_net=None`` leaves LPIPS out (no weights needed); ``lpips``: an :class:`LPIPS` to use
    instead of building one (several metrics can share one network).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, lpips_net: str | None = "alex", lpips_weights: str | None = None, lpips: LPIPS | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if lpips is None and lpips_net is not None:
            lpips = LPIPS(lpips_net, lpips_weights)
        self.lpips = lpips
        for name in ("psnr", "ssim", "lpips_sum", "videos", "tokens", "token_videos"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, real: torch.Tensor, recon: torch.Tensor, tokens: torch.Tensor | int | None = None) -> None:
        b = real.shape[0]
        self.psnr += psnr_per_frame(real, recon).double().mean(1).sum()
        self.ssim += ssim_per_frame(real, recon).double().mean(1).sum()
        if self.lpips is not None:
            self.lpips_sum += lpips_per_frame(self.lpips, real, recon).double().mean(1).sum()
        self.videos += b
        if tokens is not None:
            t = torch.as_tensor(tokens, dtype=torch.float64).reshape(-1)
            if t.numel() == 1:
                t = t.expand(b)
            if t.numel() != b:
                raise ValueError(f"tokens must be one count or one per video ({b}), got {t.numel()}")
            self.tokens += t.sum().to(self.tokens.device)
            self.token_videos += b

    def compute(self) -> dict[str, float | int | None]:
        n = float(self.videos)
        if n == 0:
            raise ValueError("ReconstructionMetrics: no videos were added")
        out: dict[str, float | int | None] = {
            "psnr": float(self.psnr) / n,
            "ssim": float(self.ssim) / n,
            "lpips": float(self.lpips_sum) / n if self.lpips is not None else None,
            "num_videos": int(n),
            "tokens_per_video": float(self.tokens) / float(self.token_videos) if float(self.token_videos) else None,
        }
        return out


def format_quality(metrics: dict, keys: tuple[str, ...] = ("rfvd", "fvd", "psnr", "ssim", "lpips")) -> str:
    """One report line with the token count beside the quality numbers, e.g. ``psnr 28.10 | ... | tokens 774``."""
    parts = [f"{k} {metrics[k]:.4g}" for k in keys if metrics.get(k) is not None]
    tokens = metrics.get("tokens_per_video")
    parts.append(f"tokens/video {tokens:.1f}" if tokens is not None else "tokens/video n/a")
    return " | ".join(parts)
