"""Evaluation: I3D and FVD (the original protocol, offline weights), LPIPS, PSNR/SSIM, protocols.

``eval`` holds metrics and knows no model: a stage hands it videos (or features).

- :class:`I3D`, :class:`I3DFeatures`, :func:`i3d_preprocess`: the TF-Hub Kinetics-400 I3D in PyTorch
  and the one function that prepares frames for it.
- :class:`FrechetVideoDistance`: a torchmetrics metric with float64 sum states.
- :class:`LPIPS`: AlexNet / VGG16 LPIPS v0.1.
- :class:`ReconstructionMetrics`: PSNR, SSIM, LPIPS per frame, with tokens per video.
- :data:`PROTOCOLS`: the named FVD protocols written into every result.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from arvid.eval.fvd import FeatureStats, FrechetVideoDistance, FVDResult, frechet_distance
    from arvid.eval.i3d import I3D, I3DFeatures, TorchScriptI3D, i3d_preprocess
    from arvid.eval.lpips import LPIPS
    from arvid.eval.metrics import ReconstructionMetrics, lpips_per_frame, psnr_per_frame, ssim_per_frame
    from arvid.eval.protocols import PROTOCOLS, FVDProtocol, get_protocol
    from arvid.eval.weights import WeightsError

# Exported lazily (PEP 562): a submodule import (``arvid.eval.protocols`` for a command's
# argparse choices) must not pull in torchmetrics, which costs ~1.4 s at start-up.
_EXPORTS = {
    "fvd": ("FeatureStats", "FrechetVideoDistance", "FVDResult", "frechet_distance"),
    "i3d": ("I3D", "I3DFeatures", "TorchScriptI3D", "i3d_preprocess"),
    "lpips": ("LPIPS",),
    "metrics": ("ReconstructionMetrics", "lpips_per_frame", "psnr_per_frame", "ssim_per_frame"),
    "protocols": ("PROTOCOLS", "FVDProtocol", "get_protocol"),
    "weights": ("WeightsError",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> object:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "FeatureStats",
    "FrechetVideoDistance",
    "FVDResult",
    "frechet_distance",
    "I3D",
    "I3DFeatures",
    "TorchScriptI3D",
    "i3d_preprocess",
    "LPIPS",
    "ReconstructionMetrics",
    "lpips_per_frame",
    "psnr_per_frame",
    "ssim_per_frame",
    "PROTOCOLS",
    "FVDProtocol",
    "get_protocol",
    "WeightsError",
]
