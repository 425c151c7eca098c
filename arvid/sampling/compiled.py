"""The decode step from a captured CUDA graph (optionally compiled first).

A decode step at batch 1-64 is a few hundred small kernels; launched from Python they cost
more than the math. The whole step (``model.decode_step`` + guidance + constraint mask +
sampling + state update, see ``arvid.sampling.sampler._Decoder.step``) works on static buffers
with the step index on the device, so it is captured once into a ``torch.cuda.CUDAGraph`` and
replayed: one launch per token. ``compile`` additionally runs the model's decode step through
``torch.compile(mode="max-autotune-no-cudagraphs")`` (fused kernels) before capture; we capture
ourselves rather than use ``mode="reduce-overhead"`` because the KV cache and the decoding
state live outside the compiled function and are mutated in place, which cudagraph trees
refuse to capture.

On CPU the sampler runs the same step eagerly (``Sampler.execution``).
"""

from __future__ import annotations

from typing import Any

import torch


def capture_decoder(dec: Any, compile_step: bool = False, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Capture ``dec.step`` into ``dec.graph`` (a CUDA graph over the decoder's static buffers).

    The warm-up steps (which also trigger compilation) mutate the buffers and the KV cache:
    the decoder's buffers are restored afterwards, and the cache is rewritten by the prefill
    that follows (a step only reads cache positions written before it).

    Args:
        dec: a ``_Decoder`` whose buffers were loaded for the batch to come.
        compile_step: run the model's decode step through ``torch.compile`` before capturing.
        warmup: eager (or compiled) steps on a side stream before capture.
    """
    if not torch.cuda.is_available() or dec.device.type != "cuda":
        raise RuntimeError("CUDA graph capture needs the model and the decoder on a CUDA device")
    if compile_step:
        # Only the model's step is compiled: inductor (torch 2.11) fails to generate code for the
        # sampling part (a split cumsum fused with an argmax: "NYI TritonSplitDimKernel
        # reductions"), and the sampling ops are few and small next to the model's.
        dec.decode_fn = torch.compile(dec.model.decode_step, mode="max-autotune-no-cudagraphs", dynamic=False)
    fn = dec.step
    snap = dec.snapshot()
    side = torch.cuda.Stream(device=dec.device)
    side.wait_stream(torch.cuda.current_stream(dec.device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream(dec.device).wait_stream(side)
    dec.restore(snap)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    # Capture records without running; the buffers are as loaded.
    dec.restore(snap)
    dec.graph = graph
    return graph
