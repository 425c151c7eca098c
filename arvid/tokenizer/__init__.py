"""Video tokenizers: the protocol and registry (``base``), EVATok (adaptive 1D), grid3d (3D-CNN VQ),
quantizers, and the block-causal attention helpers.

Training losses and the Trainer task live in :mod:`arvid.tokenizer.losses` (imported on demand,
so that using a tokenizer does not import the training stack).
"""

from arvid.tokenizer.base import (
    ENTRY_POINT_GROUP,
    VideoTokenizer,
    available_tokenizers,
    build_tokenizer,
    load_tokenizer,
    register_tokenizer,
    tokenizer_class,
)
from arvid.tokenizer.evatok import EVATok, EVATokConfig
from arvid.tokenizer.grid3d import Grid3D, Grid3DConfig
from arvid.tokenizer.quantizers import FSQ, QuantizerConfig, QuantOutput, VectorQuantizer, build_quantizer

__all__ = [
    "ENTRY_POINT_GROUP",
    "EVATok",
    "EVATokConfig",
    "FSQ",
    "Grid3D",
    "Grid3DConfig",
    "QuantOutput",
    "QuantizerConfig",
    "VectorQuantizer",
    "VideoTokenizer",
    "available_tokenizers",
    "build_quantizer",
    "build_tokenizer",
    "load_tokenizer",
    "register_tokenizer",
    "tokenizer_class",
]
