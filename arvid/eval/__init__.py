"""Evaluation: I3D and FVD (the original protocol, offline weights), LPIPS, PSNR/SSIM, protocols.

``eval`` holds metrics and knows no model: a stage hands it videos (or features).

- :class:`I3D`, :class:`I3DFeatures`, :func:`i3d_preprocess`: the TF-Hub Kinetics-400 I3D in PyTorch
  and the one function that prepares frames for it.
- :class:`FrechetVideoDistance`: a torchmetrics metric with float64 sum states.
- :class:`LPIPS`: AlexNet / VGG16 LPIPS v0.1.
- :class:`ReconstructionMetrics`: PSNR, SSIM, LPIPS per frame, with tokens per video.
- :data:`PROTOCOLS`: the named FVD protocols written into every result.
"""

from arvid.eval.fvd import FeatureStats, FrechetVideoDistance, FVDResult, frechet_distance
from arvid.eval.i3d import I3D, I3DFeatures, TorchScriptI3D, i3d_preprocess
from arvid.eval.lpips import LPIPS
from arvid.eval.metrics import ReconstructionMetrics, lpips_per_frame, psnr_per_frame, ssim_per_frame
from arvid.eval.protocols import PROTOCOLS, FVDProtocol, get_protocol
from arvid.eval.weights import WeightsError

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
