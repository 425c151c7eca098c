"""Sampling from the generator: constrained, cached, guided, budgeted.

- :mod:`~arvid.sampling.constraints`: the vectorised state machine that keeps every sample well
  formed (``SequenceConstraint``: allowed counts, fixed assignment, exact budget, prefixes).
- :mod:`~arvid.sampling.sampler`: ``SamplerConfig``, ``Sampler`` (prefill + decode steps over a
  static KV cache, classifier-free guidance, temperature / top-k / top-p, length bias).
- :mod:`~arvid.sampling.budget`: token-budget control (``calibrate_budget_bias``).
- :mod:`~arvid.sampling.frame_prediction`: context frames -> prefix tokens -> the rest.
- :mod:`~arvid.sampling.compiled`: the decode step captured in a CUDA graph (optionally compiled).
- :mod:`~arvid.sampling.videos`: ``sample_videos`` / ``iter_sample_batches`` (class -> videos).
"""

from arvid.sampling.budget import BudgetCalibration, bisect_bias, calibrate_budget_bias
from arvid.sampling.constraints import DUMMY_TOKEN, ConstraintState, SequenceConstraint, prefix_tokens
from arvid.sampling.frame_prediction import context_blocks_for, encode_context, pad_frames, predict_frames
from arvid.sampling.sampler import (
    SampleOutput,
    Sampler,
    SamplerConfig,
    length_bias,
    mean_tokens,
    sample_from_logits,
)
from arvid.sampling.videos import batch_seed, iter_sample_batches, sample_videos, sequence_format_for

__all__ = [
    "BudgetCalibration", "bisect_bias", "calibrate_budget_bias", "DUMMY_TOKEN", "ConstraintState",
    "SequenceConstraint", "prefix_tokens", "context_blocks_for", "encode_context", "pad_frames", "predict_frames",
    "SampleOutput", "Sampler", "SamplerConfig", "length_bias", "mean_tokens", "sample_from_logits", "batch_seed",
    "iter_sample_batches", "sample_videos", "sequence_format_for",
]
