"""The decode step from a captured CUDA graph (optionally compiled first).

A decode step at batch 1-64 is a few hundred small kernels; launched from Python they cost
more than the math. The whole step (``model.decode_step`` + guidance + constraint mask +
sampling + state update, see ``arvid.sampling.sampler._Decoder.step``) works on static buffers
with the step index on the device, so it is captured once into a ``torch.cuda.CUDAGraph`` (one
per KV length bucket, below) and replayed: one launch per token. ``compile`` additionally runs
the model's decode step, and the sampling part apart from it (``SamplerConfig.compile_sampling``,
:func:`compile_choose`), through ``torch.compile`` (fused kernels; ``SamplerConfig.compile_mode``)
before capture; we capture ourselves rather than use ``mode="reduce-overhead"``
because the KV cache and the decoding state live outside the compiled function and are mutated
in place, which cudagraph trees refuse to capture.

A step attends over the filled part of the KV cache rounded up to a bucket
(``SamplerConfig.kv_bucket``), so there is one graph per bucket length, all in one memory
pool; the run loop replays the graph of the current bucket.

On CPU the sampler runs the same step eagerly (``Sampler.execution``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

_compiled_shapes = 0  # decode-step shapes compiled by capture_decoder in this process


def _recompile_limit(extra: int) -> Any:
    """A context that lets dynamo compile ``extra`` more shapes of a decoder's function.

    Every batch shape (and, for the model's step, up to three ``kv_len`` variants: see
    :func:`compile_decode_step`) is a recompile of the same code object, and past the default
    limit (8) in a process dynamo would run it eagerly (one warning). Only the capture calls the
    compiled functions (the run loop replays graphs), so the limit is raised for the capture
    alone, to at least the number of shapes compiled so far in this process."""
    import torch._dynamo

    global _compiled_shapes
    _compiled_shapes += extra
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), _compiled_shapes)})


def compile_choose(dec: Any, compile_mode: str = "default") -> bool:
    """Compile the decoder's sampling part (``dec.choose``: guidance, constraint mask, truncation,
    the draw, the state update) and install it as ``dec.choose_fn``; True on success.

    Inductor 2.11 failed once to generate Triton code for it ("NYI TritonSplitDimKernel
    reductions": the cumulative sum of the draw fused with an argmax). The compilation is therefore
    tried here, on one call with neutral logits, and on any failure the part stays eager with a
    warning; the decoder's buffers are restored either way."""
    compiled = torch.compile(dec.choose, mode=compile_mode, dynamic=False)
    rows = dec.B * (2 if dec.guided else 1)
    snap = dec.snapshot()
    try:
        with torch.no_grad():
            # logits as the step will produce them (shape and dtype: the compiled part is specialised
            # to them), from one eager model step; it writes position 0 of the cache, which the
            # prefill rewrites
            logits = dec.model.decode_step(dec.cache, torch.zeros(rows, dtype=torch.long, device=dec.device),
                                           torch.zeros((), dtype=torch.long, device=dec.device))
            # every decoder shape is a recompile of the one `choose` code object: raise dynamo's
            # limit for it, or past 8 shapes in a process it would run eagerly without a word
            with _recompile_limit(1):
                compiled(torch.zeros_like(logits))
    except Exception as e:  # noqa: BLE001 - any compiler failure: keep the eager sampling part
        log.warning("sampling: the sampling part of the decode step stays eager; torch.compile failed on it "
                    "(%s: %s)", type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        dec.choose_fn = dec.choose
        return False
    finally:
        dec.restore(snap)
    dec.choose_fn = compiled
    return True


def compile_decode_step(model: Any, attention: str = "sdpa", compile_mode: str = "default") -> Any:
    """``torch.compile`` of the model's decode step, with ``kv_len`` (the attended cache length,
    a Python int) left to dynamo's automatic dynamic shapes: the first length compiles a static
    graph, the second one graph for any length below the whole cache, the whole cache its own.
    So a decoder's KV buckets cost at most three compilations, however fine the buckets, where
    they cost one each with ``dynamic=False`` (until 2026-12-06: 9 for the L layout's
    2,052-position cache at buckets of 256, 135-155 s on an H100).

    Dynamo keeps one shape history per code object, and every decoder compiles the same
    ``GPT.decode_step``: a second decoder (another batch size) would get a graph with a symbolic
    batch. The returned function therefore marks the cache and the fed tokens static at every
    call (only ``kv_len`` varies); it is called during capture only (graphs replay afterwards).
    ``attention`` (``sdpa`` / ``flex``, ``GPT.decode_step``) is passed at every call: a constant
    to dynamo."""
    import torch._dynamo

    compiled = torch.compile(model.decode_step, mode=compile_mode, dynamic=None)

    def step(cache: Any, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        for t in (*cache.tensors(), tokens):
            torch._dynamo.mark_static(t)
        return compiled(cache, tokens, pos, kv_len, attention)

    return step


def capture_decoder(dec: Any, compile_step: bool = False, warmup: int = 3,
                    compile_mode: str = "default", compile_sampling: bool = False,
                    attention: str = "sdpa") -> dict[int, torch.cuda.CUDAGraph]:
    """Capture ``dec.step(kv_len)`` into ``dec.graphs[kv_len]``: one CUDA graph over the decoder's
    static buffers per KV length bucket the run loop can use (``dec.kv_lens()``; the last is the
    whole cache).

    The graphs share one memory pool: each step's results live in the decoder's static buffers
    and its temporaries die within the step, and graphs are replayed one at a time on one
    stream, so they can reuse the same memory in any order.

    Each bucket's shape is warmed up on a side stream before its capture (which also triggers
    its compilation). The warm-up steps mutate the buffers and the KV cache: the decoder's
    buffers are restored after each warm-up and each capture, and the cache is rewritten by the
    prefill that follows (a step only reads cache positions written before it).

    Args:
        dec: a ``_Decoder`` whose buffers were loaded for the batch to come.
        compile_step: run the model's decode step through ``torch.compile``
            (:func:`compile_decode_step`: at most three compilations per batch shape, whatever
            the number of buckets) before capturing.
        warmup: eager (or compiled) steps on a side stream before each capture.
        compile_sampling: also compile the sampling part (:func:`compile_choose`; the sampler asks for it
            under ``compile`` and ``triton``, whose model step is ``dec.decode_fn`` as set beforehand).
        attention: with ``compile_step``, the compiled step's decode attention (``sdpa`` or ``flex``,
            ``GPT.decode_step``); without it the step keeps ``sdpa`` (eager FlexAttention is unfused).
        compile_mode: ``torch.compile`` mode: ``default`` or ``max-autotune-no-cudagraphs``. The
            latter ran 6.5 ms per L step at batch 1 on the H100 (2026-11-23), twice the plain
            CUDA graph, and so did ``default`` (6.47 ms): until 2026-12-05 the compiled step also
            copied the KV cache at every step (the layers' caches were views of one tensor; see
            ``arvid.generator.kv_cache``). The default keeps cuBLAS for the 2-row matmuls.

    Returns:
        ``dec.graphs``, ``{kv_len: graph}``.
    """
    if not torch.cuda.is_available() or dec.device.type != "cuda":
        raise RuntimeError("CUDA graph capture needs the model and the decoder on a CUDA device")
    lens = dec.kv_lens()
    limit = contextlib.nullcontext()
    if compile_step:
        # The model's step and the sampling part are compiled apart: the sampling part may fail in
        # inductor (see compile_choose), and then only it stays eager.
        dec.decode_fn = compile_decode_step(dec.model, attention, compile_mode)
        limit = _recompile_limit(min(len(lens), 3))
    if compile_sampling:
        compile_choose(dec, compile_mode)
    snap = dec.snapshot()
    main = torch.cuda.current_stream(dec.device)
    side = torch.cuda.Stream(device=dec.device)
    pool = torch.cuda.graph_pool_handle()
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    with limit:
        for kv_len in lens:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                for _ in range(max(warmup, 1)):
                    dec.step(kv_len)
                    # every warm-up step from the loaded buffers: consecutive ones would feed
                    # positions past the loaded one, and past the cache's end for a batch whose
                    # prefix leaves fewer tokens to generate than there are warm-up steps
                    dec.restore(snap)
            main.wait_stream(side)
            dec.restore(snap)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                dec.step(kv_len)
            # Capture records without running; the buffers are as loaded.
            dec.restore(snap)
            graphs[kv_len] = graph
    dec.graphs = graphs
    return graphs
