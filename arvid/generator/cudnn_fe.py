"""cuDNN's fused attention over packed sequences, through the cuDNN frontend's Python graphs.

The ``cudnn_fe`` attention backend (:mod:`arvid.generator.attention`). cuDNN runs causal
attention on the packed layout itself: ``[N, H, D]`` tokens with each sequence's start given as
a *ragged offset* (cuDNN's "THD" layout, Hopper and newer), its length as a padding mask, no
padding in memory. A graph describes one problem shape and is built once; here a graph is kept
per (sequence count rounded up to :data:`BATCH_BUCKET`, longest sequence rounded up to
:data:`SEQ_BUCKET`, heads, head size, dtype, token strides; for the backward also the token count
rounded up to a power of two), so a training run builds a few pairs, then only executes them
(``BUILT`` lists them; each build is logged with its time). Sequence counts are padded with
zero-length sequences, which cuDNN's padding mask skips.

Why not torch's own route to the same kernels (``cudnn_varlen``, ``aten._cudnn_attention_*``):
on torch 2.11 it rebuilt the cuDNN graph at every call and its dq/dk were wrong (H100,
2026-12-06). This module owns the graph, its cache, the offsets and the backward's workspace
bound (``max_total_seq_len``) instead.

Needs the ``nvidia-cudnn-frontend`` package (``pip install 'arvid[cudnn]'``; it loads the cuDNN
library torch already loaded), cuDNN >= 9.6 (64-bit ragged offsets) and a Hopper or newer GPU.
Two opaque custom ops (forward, backward; :mod:`arvid.generator.attention` wires the backward) keep
``torch.compile`` graphs whole around them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import time

import torch

from arvid.generator import fused
from arvid.generator.packing import LastBatchMemo

log = logging.getLogger(__name__)

#: cuDNN (backend library) version needed: 9.6 takes 64-bit ragged offsets.
MIN_CUDNN = 90600
#: Sequence counts are rounded up to a multiple of this (zero-length sequences fill the rest), so
#: that a run whose batches hold 37 or 39 sequences shares one graph.
BATCH_BUCKET = 8
#: The longest sequence is rounded up to a multiple of this for the graph's sequence dimension
#: (query tiles past a sequence's end exit at once; coarse buckets keep unpadded batches, whose
#: longest sequence varies, to a few graphs).
SEQ_BUCKET = 512
#: The backward's workspace bound (``max_total_seq_len``, at least the packed token count, a
#: multiple of 64 by cuDNN's rule) is the token count rounded up to a power of two, at least this.
MIN_TOKEN_BOUND = 1024

#: ``ARVID_CUDNN_FE_DV_IN_PLACE=1``: the RoPE route's backward (:func:`cudnn_fe_rope_bwd`) has cuDNN
#: write dv straight into the v columns of ``d[qkv]``, with the token stride and ragged offsets of v
#: (a view of the same columns of the projection), instead of a contiguous dv the RoPE kernel
#: copies (~0.8 GB a GPT-L layer at 65,536 positions, ~2 ms a step). Off until it passes the GPU
#: test: cuDNN wrote wrong dq/dk into column slices where q and k had other strides (H100,
#: 2026-12-07); here dv's layout is exactly v's, which the hypothesis of that failure allows.
DV_IN_PLACE = os.environ.get("ARVID_CUDNN_FE_DV_IN_PLACE", "0") == "1"

#: ``ARVID_CUDNN_FE_AUTOTUNE=1``: build up to :data:`TUNE_MAX_PLANS` of the execution plans cuDNN's
#: heuristics offer for a graph, time them on the graph's first call and keep the fastest whose
#: outputs agree with the heuristics' first choice. Off by default: on the L step's graphs (H100,
#: 2026-12-07) the first choice was the fastest or within noise of it (the other plans of the
#: forward took 5-7x as long; the backward offered one plan), and the step was no faster.
AUTOTUNE = os.environ.get("ARVID_CUDNN_FE_AUTOTUNE", "0") == "1"
#: At most this many plans (the heuristics' first ones) are built and timed per graph: cuDNN compiles
#: some of its attention kernels at build time, a second or more each.
TUNE_MAX_PLANS = 8
#: Timed runs of each candidate plan (after one untimed run, which is also the agreement check).
TUNE_REPEATS = 3
#: A candidate plan's outputs may differ from the first choice's by at most this share of the
#: first choice's largest value (bf16 rounding and a different summation order stay far below).
TUNE_TOLERANCE = 2e-2
#: One record per tuned graph: kind, key, plan names, their times in ms (None: failed or
#: disagreed) and the chosen index (tests and benchmarks read it).
TUNED: list[dict] = []

_INSTALL = "pip install 'arvid[cudnn]' (nvidia-cudnn-frontend>=1.12)"


def round_up(x, m: int):
    """``x`` rounded up to a multiple of ``m`` (an int, or a symbolic size under ``torch.compile``)."""
    return -(-x // m) * m


def token_bound(n: int) -> int:
    """The backward graph's ``max_total_seq_len`` for ``n`` packed tokens: the next power of two
    (at least :data:`MIN_TOKEN_BOUND`), so batches of any size share a few graphs."""
    return max(MIN_TOKEN_BOUND, 1 << (int(n) - 1).bit_length())


@functools.cache
def problem(device_index: int = 0) -> str | None:
    """None when ``cudnn_fe`` can run on CUDA device ``device_index``, else why not and what to do.
    (The caller has checked that the device is CUDA and the dtype fp16/bf16.)"""
    if importlib.util.find_spec("cudnn") is None:
        return f"attention backend 'cudnn_fe' needs the cuDNN frontend's Python package: {_INSTALL}"
    major = torch.cuda.get_device_capability(device_index)[0]
    if major < 9:
        return (f"attention backend 'cudnn_fe' needs a Hopper or newer GPU (cuDNN's packed ragged layout), "
                f"got compute capability {major}.x; use 'torch_varlen'")
    try:
        cudnn = _cudnn()
        version = int(cudnn.backend_version())
    except Exception as e:  # noqa: BLE001 - a broken install shows up as any error at import
        return (f"attention backend 'cudnn_fe': the cuDNN frontend is installed but does not load "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); {_INSTALL}")
    if version < MIN_CUDNN:
        return (f"attention backend 'cudnn_fe' needs cuDNN >= 9.6 (64-bit ragged offsets), this process has "
                f"{version}; upgrade torch (its nvidia-cudnn wheel)")
    return None


def _cudnn():
    """The frontend module, imported after torch has loaded its cuDNN library (the frontend then
    finds that library already in the process instead of looking for its own)."""
    torch.backends.cudnn.version()
    import cudnn

    return cudnn


_HANDLES: dict[int, object] = {}


def _handle(device: torch.device):
    """One cuDNN handle per device, bound to torch's current stream at every call."""
    cudnn = _cudnn()
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _HANDLES:
        with torch.cuda.device(idx):
            _HANDLES[idx] = cudnn.create_handle()
    h = _HANDLES[idx]
    cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(idx).cuda_stream)
    return h


class _Graph:
    """A built cuDNN graph, its named tensors, the names of its outputs and its workspace size.

    ``candidates`` (built with :data:`AUTOTUNE`): the indices of the execution plans built; the
    first :meth:`run` times them on its own buffers and keeps the fastest (:meth:`_tune`; one
    candidate is kept untimed), and every run executes that plan by index. ``None``: the graph's
    own plan (``graph.execute``)."""

    def __init__(self, graph, tensors: dict, outputs: tuple[str, ...], workspace: int,
                 candidates: list[int] | None = None, kind: str = "", key: tuple = ()) -> None:
        self.graph, self.tensors, self.outputs, self.workspace = graph, tensors, outputs, workspace
        self.candidates, self.kind, self.key = candidates, kind, key
        self.plan: int | None = None  # the plan index run; None: the graph's own choice (graph.execute)
        if candidates is not None and len(candidates) == 1:
            self.plan = candidates[0]
            self.workspace = int(graph.get_workspace_size_plan_at_index(self.plan))

    def _execute(self, pack: dict, handle, device: torch.device, plan: int | None, workspace: int) -> None:
        ws = torch.empty(max(workspace, 1), dtype=torch.uint8, device=device)
        if plan is None:
            self.graph.execute(pack, ws, handle=handle)
        else:
            self.graph.execute_plan_at_index(pack, ws, plan, handle=handle)

    def run(self, device: torch.device, buffers: dict[str, torch.Tensor]) -> None:
        handle = _handle(device)
        pack = {self.tensors[name]: buf for name, buf in buffers.items()}
        if self.candidates is not None and self.plan is None:
            self.plan, self.workspace = self._tune(pack, buffers, handle, device)
        self._execute(pack, handle, device, self.plan, self.workspace)

    def _tune(self, pack: dict, buffers: dict[str, torch.Tensor], handle, device: torch.device) -> tuple[int, int]:
        """(index, workspace) of the fastest candidate plan on these buffers. The first that runs (the
        heuristics' first choice, unless it fails) is the reference: a plan that fails or whose outputs
        differ from it by more than :data:`TUNE_TOLERANCE` of its largest value is not chosen. Every
        plan overwrites the outputs (each starts from their content on entry, e.g. the zeroed
        statistics rows no plan writes); the caller's run afterwards writes the chosen plan's."""
        initial = [buffers[n].clone() for n in self.outputs]
        names, times, ref = [], [], None
        for i in self.candidates:
            names.append(_plan_name(self.graph, i))
            for n, x in zip(self.outputs, initial):
                buffers[n].copy_(x)
            try:
                ws = int(self.graph.get_workspace_size_plan_at_index(i))
                self._execute(pack, handle, device, i, ws)
                outs = [buffers[n].float() for n in self.outputs]
                if ref is None:
                    ref = [o.clone() for o in outs]
                elif any(float((o - r).abs().max()) > TUNE_TOLERANCE * max(float(r.abs().max()), 1e-6)
                         for o, r in zip(outs, ref)):
                    log.warning("cudnn_fe: %s plan %d (%s) disagrees with the first plan; not used", self.kind, i,
                                names[-1])
                    times.append(None)
                    continue
                times.append(_time(lambda i=i, ws=ws: self._execute(pack, handle, device, i, ws), device))
            except Exception as e:  # noqa: BLE001 - a plan cuDNN cannot build or run is skipped
                log.info("cudnn_fe: %s plan %d (%s) skipped (%s: %s)", self.kind, i, names[-1], type(e).__name__, e)
                times.append(None)
        ran = [(t, j) for j, t in enumerate(times) if t is not None]
        if not ran:
            raise RuntimeError(f"cudnn_fe: none of the {len(self.candidates)} execution plans of the {self.kind} graph "
                               f"{self.key} ran; unset ARVID_CUDNN_FE_AUTOTUNE to use the heuristics' choice")
        best = min(ran)[1]  # position in candidates
        for n, x in zip(self.outputs, initial):
            buffers[n].copy_(x)
        TUNED.append({"kind": self.kind, "key": self.key, "plans": names, "ms": times, "chosen": best,
                      "indices": list(self.candidates)})
        log.info("cudnn_fe: %s graph %s: plan %d of %s (%s), %s ms", self.kind, self.key, self.candidates[best],
                 self.candidates, names[best], ", ".join("-" if t is None else f"{t:.3f}" for t in times))
        index = self.candidates[best]
        return index, int(self.graph.get_workspace_size_plan_at_index(index))


def _plan_name(graph, i: int) -> str:
    try:
        return str(graph.get_plan_name_at_index(i))
    except Exception:  # noqa: BLE001 - a name is only for the log
        return "?"


def _time(fn, device: torch.device) -> float:
    """Milliseconds per call of ``fn``, the least of :data:`TUNE_REPEATS` runs."""
    best = float("inf")
    for _ in range(TUNE_REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


_GRAPHS: dict[tuple, _Graph] = {}
#: (kind, key) of every graph built in this process, in order (tests and benchmarks read it).
BUILT: list[tuple] = []


def _io_type(cudnn, dtype: torch.dtype):
    return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF,
            torch.float32: cudnn.data_type.FLOAT}[dtype]


def _thd(g, name: str, b: int, h: int, s: int, d: int, token_stride: int, dt, offset):
    """A packed ``[N, h, d]`` tensor seen as cuDNN's ``[b, h, s, d]`` with token stride
    ``token_stride`` and each sequence's start at ``offset`` (elements)."""
    t = g.tensor(name=name, dim=[b, h, s, d], stride=[s * token_stride, d, token_stride, 1], data_type=dt)
    t.set_ragged_offset(offset)
    return t


def _small(g, name: str, b: int, dt):
    return g.tensor(name=name, dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt)


def _finish(g, cudnn, kind: str, key: tuple, tensors: dict, outputs: tuple[str, ...]) -> _Graph:
    t0 = time.perf_counter()
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    if AUTOTUNE:  # build the first TUNE_MAX_PLANS candidates one by one (one that fails is left out)
        candidates = []
        for i in range(min(int(g.get_execution_plan_count()), TUNE_MAX_PLANS)):
            try:
                g.build_plan_at_index(i)
                candidates.append(i)
            except Exception as e:  # noqa: BLE001 - cuDNN refuses some plans for some shapes
                log.info("cudnn_fe: %s plan %d (%s) not built (%s: %s)", kind, i, _plan_name(g, i), type(e).__name__, e)
        if not candidates:
            raise RuntimeError(f"cudnn_fe: cuDNN built none of the execution plans of the {kind} graph {key}; "
                               "unset ARVID_CUDNN_FE_AUTOTUNE to use the heuristics' choice")
        graph = _Graph(g, tensors, outputs, 0, candidates, kind, key)
    else:
        g.build_plans()
        graph = _Graph(g, tensors, outputs, int(g.get_workspace_size()), None, kind, key)
    plans = len(graph.candidates) if graph.candidates else 1
    BUILT.append((kind, key))
    log.info("cudnn_fe: built the %s graph %s (%d plan%s) in %.2f s", kind, key, plans, "s" * (plans != 1),
             time.perf_counter() - t0)
    return graph


def _causal(cudnn) -> dict:
    return {"diagonal_alignment": cudnn.diagonal_alignment.TOP_LEFT, "diagonal_band_right_bound": 0}


def _fwd_graph(key: tuple, handle) -> _Graph:
    cudnn = _cudnn()
    dtype, b, s, h, hkv, d, ts_q, ts_k, ts_v = key
    dt = _io_type(cudnn, dtype)
    g = cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    t = {n: _small(g, n, b + 1, cudnn.data_type.INT64) for n in ("off_q", "off_k", "off_v", "off_o")}
    t["seq_q"], t["seq_kv"] = (_small(g, n, b, cudnn.data_type.INT32) for n in ("seq_q", "seq_kv"))
    t["q"] = _thd(g, "q", b, h, s, d, ts_q, dt, t["off_q"])
    t["k"] = _thd(g, "k", b, hkv, s, d, ts_k, dt, t["off_k"])
    t["v"] = _thd(g, "v", b, hkv, s, d, ts_v, dt, t["off_v"])
    o, stats = g.sdpa(name="sdpa", q=t["q"], k=t["k"], v=t["v"], generate_stats=True, attn_scale=1.0 / math.sqrt(d),
                      use_padding_mask=True, seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"], **_causal(cudnn))
    o.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1])
    o.set_ragged_offset(t["off_o"])
    stats.set_output(True).set_data_type(cudnn.data_type.FLOAT).set_dim([b, h, s, 1]).set_stride([h * s, s, 1, 1])
    t["o"], t["stats"] = o, stats
    return _finish(g, cudnn, "forward", key, t, ("o", "stats"))


def _bwd_graph(key: tuple, handle) -> _Graph:
    cudnn = _cudnn()
    dtype, b, s, h, hkv, d, ts_q, ts_k, ts_v, max_t, ts_dv = key
    dt = _io_type(cudnn, dtype)
    g = cudnn.pygraph(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    names = ("off_q", "off_k", "off_v", "off_o", "off_dk", "off_dv")
    t = {n: _small(g, n, b + 1, cudnn.data_type.INT64) for n in names}
    t["seq_q"], t["seq_kv"] = (_small(g, n, b, cudnn.data_type.INT32) for n in ("seq_q", "seq_kv"))
    t["q"] = _thd(g, "q", b, h, s, d, ts_q, dt, t["off_q"])
    t["k"] = _thd(g, "k", b, hkv, s, d, ts_k, dt, t["off_k"])
    t["v"] = _thd(g, "v", b, hkv, s, d, ts_v, dt, t["off_v"])
    t["o"] = _thd(g, "o", b, h, s, d, h * d, dt, t["off_o"])
    t["do"] = _thd(g, "do", b, h, s, d, h * d, dt, t["off_o"])
    t["stats"] = g.tensor(name="stats", dim=[b, h, s, 1], stride=[h * s, s, 1, 1], data_type=cudnn.data_type.FLOAT)
    dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"],
                                 stats=t["stats"], attn_scale=1.0 / math.sqrt(d), use_padding_mask=True,
                                 seq_len_q=t["seq_q"], seq_len_kv=t["seq_kv"], max_total_seq_len_q=max_t,
                                 max_total_seq_len_kv=max_t, **_causal(cudnn))
    # the gradients are written contiguous: dq like o ([N, h, d]), dk as [N, hkv, d], dv too unless
    # its token stride ts_dv says otherwise (DV_IN_PLACE: v's own layout, in d[qkv]'s v columns)
    dq.set_output(True).set_dim([b, h, s, d]).set_stride([s * h * d, d, h * d, 1]).set_ragged_offset(t["off_o"])
    for grad, name, ts in ((dk, "dk", hkv * d), (dv, "dv", ts_dv)):
        grad.set_output(True).set_dim([b, hkv, s, d]).set_stride([s * ts, d, ts, 1])
        grad.set_ragged_offset(t["off_" + name])
        t[name] = grad
    t["dq"] = dq
    return _finish(g, cudnn, "backward", key, t, ("dq", "dk", "dv"))


def _graph(kind: str, key: tuple, device: torch.device) -> _Graph:
    full = (kind, device.index, *key)
    if full not in _GRAPHS:
        _GRAPHS[full] = (_fwd_graph if kind == "forward" else _bwd_graph)(key, _handle(device))
    return _GRAPHS[full]


def batch_layout(cu: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cu_seqlens IntTensor[S+1]`` -> (lengths ``int32 [b, 1, 1, 1]``, starts ``int64 [b+1, 1, 1, 1]``),
    padded from ``S`` to ``b >= S`` sequences with zero-length ones that start at the end. On the
    device of ``cu``, without a host sync."""
    s = cu.numel() - 1
    starts = cu.long()
    if b > s:
        starts = torch.cat([starts, starts[-1:].expand(b - s)])
    lens = (starts[1:] - starts[:-1]).to(torch.int32)
    return lens.view(b, 1, 1, 1), starts.view(b + 1, 1, 1, 1)


#: this module's per-batch lengths and offsets (every layer's forward and backward share them)
_BATCH = LastBatchMemo()


def _layout(cu: torch.Tensor, b: int, *strides: int) -> tuple[torch.Tensor, ...]:
    """The batch's lengths ``int32 [b, 1, 1, 1]`` and, per token stride, each sequence's start in
    elements (``int64 [b+1, 1, 1, 1]``), made once per batch."""
    lens, starts = _BATCH.get(cu, ("layout", b), lambda: batch_layout(cu, b))
    return (lens, *(_BATCH.get(cu, ("offsets", b, st), lambda st=st: starts * st) for st in strides))


def _token_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when cuDNN can read it as packed tokens (unit stride in the head dimension,
    heads adjacent), else a contiguous copy."""
    if t.stride(2) == 1 and t.stride(1) == t.shape[2] and t.stride(0) >= t.shape[1] * t.shape[2]:
        return t
    return t.contiguous()


def _shapes(cu: torch.Tensor, max_seqlen: int) -> tuple[int, int]:
    """(bucketed sequence count, bucketed longest sequence) of a batch: the graphs' ``b`` and ``s``."""
    return round_up(cu.shape[0] - 1, BATCH_BUCKET), round_up(max_seqlen, SEQ_BUCKET)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
             max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_token_view(t) for t in (q, k, v))
    n, h, d = q.shape
    b, s = _shapes(cu, max_seqlen)
    lens, off_q, off_k, off_v, off_o = _layout(cu, b, q.stride(0), k.stride(0), v.stride(0), h * d)
    key = (q.dtype, b, s, h, k.shape[1], d, q.stride(0), k.stride(0), v.stride(0))
    graph = _graph("forward", key, q.device)
    o = q.new_empty((n, h, d))
    # zeros: the rows past each sequence's end (and of the padding sequences) are never written
    stats = torch.zeros((b, h, s, 1), dtype=torch.float32, device=q.device)
    graph.run(q.device, {"q": q, "k": k, "v": v, "o": o, "stats": stats, "seq_q": lens, "seq_kv": lens,
                         "off_q": off_q, "off_k": off_k, "off_v": off_v, "off_o": off_o})
    return o, stats


def _backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              stats: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
              dv_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq [N, H, D], dk [N, Hkv, D], dv [N, Hkv, D])``, each contiguous, or dv written into
    ``dv_out`` (a view with v's layout: unit stride in D, heads adjacent) and returned. q and k are made
    contiguous here: handed as strided views (token stride 2,048 where a row holds 1,024), cuDNN's
    backward gave wrong gradients or read out of bounds on an H100 (2026-12-07), where the forward
    took them; v as a strided view of the fused projection is the layout the GPU tests pass."""
    q, k, v = q.contiguous(), k.contiguous(), _token_view(v)
    dout, out = dout.contiguous(), out.contiguous()
    n, h, d = q.shape
    hkv = k.shape[1]
    b, s = _shapes(cu, max_seqlen)
    dq, dk = q.new_empty((n, h, d)), k.new_empty((n, hkv, d))
    dv = v.new_empty((n, hkv, d)) if dv_out is None else dv_out
    if dv_out is not None and (dv.shape != (n, hkv, d) or dv is not _token_view(dv) or dv.dtype != q.dtype
                               or dv.device != q.device):
        raise ValueError(f"cudnn_fe: dv_out must be [{n}, {hkv}, {d}] {q.dtype} on {q.device} with unit stride in D "
                         f"and heads adjacent, got shape {tuple(dv.shape)} strides {dv.stride()} {dv.dtype} on {dv.device}")
    lens, off_q, off_k, off_v, off_o, off_dk, off_dv = _layout(cu, b, q.stride(0), k.stride(0), v.stride(0), h * d,
                                                               hkv * d, dv.stride(0))
    key = (q.dtype, b, s, h, hkv, d, q.stride(0), k.stride(0), v.stride(0), token_bound(n), dv.stride(0))
    graph = _graph("backward", key, q.device)
    graph.run(q.device, {"q": q, "k": k, "v": v, "o": out, "do": dout, "stats": stats, "dq": dq, "dk": dk, "dv": dv,
                         "seq_q": lens, "seq_kv": lens, "off_q": off_q, "off_k": off_k, "off_v": off_v,
                         "off_o": off_o, "off_dk": off_dk, "off_dv": off_dv})
    return dq, dk, dv


@torch.library.custom_op("arvid::cudnn_fe_causal_fwd", mutates_args=())
def cudnn_fe_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                 max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over packed sequences: ``out [N, H, D]`` (contiguous) and the softmax
    statistics ``[b, H, s, 1]`` float32 (b, s: the bucketed sequence count and length)."""
    return _forward(q, k, v, cu, max_seqlen)


@cudnn_fe_fwd.register_fake
def _(q, k, v, cu, max_seqlen):
    b, s = _shapes(cu, max_seqlen)
    return q.new_empty(q.shape), q.new_empty((b, q.shape[1], s, 1), dtype=torch.float32)


@torch.library.custom_op("arvid::cudnn_fe_causal_bwd", mutates_args=())
def cudnn_fe_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 stats: torch.Tensor, cu: torch.Tensor,
                 max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, q, k, v, out, stats, cu, max_seqlen)


@cudnn_fe_bwd.register_fake
def _(dout, q, k, v, out, stats, cu, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _kv_heads(qkv: torch.Tensor, heads: int) -> int:
    """The key/value heads ``hkv`` of a fused projection ``qkv [N, heads + 2 * hkv, D]``."""
    hkv, odd = divmod(qkv.shape[1] - heads, 2)
    if odd or hkv < 1 or heads % hkv:
        raise ValueError(f"cudnn_fe: a fused projection of {qkv.shape[1]} heads cannot hold {heads} query heads "
                         "and two equal key/value groups dividing them")
    return hkv


@torch.library.custom_op("arvid::cudnn_fe_rope_fwd", mutates_args=())
def cudnn_fe_rope_fwd(qkv: torch.Tensor, c: torch.Tensor, s: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
                      heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE and causal attention from the fused projection ``qkv [N, H + 2 Hkv, D]`` (q, k, v
    heads in that order; ``c, s`` the float32 tables ``[N, 1, D]`` of
    :func:`arvid.generator.gpt.rope_tables`): ``(out [N, H, D], stats, q, k)``, q and k rotated
    and contiguous (saved for the backward; :func:`_backward` says why contiguous). v is read in
    place from ``qkv``."""
    qkv, h = qkv.contiguous(), heads
    hkv = _kv_heads(qkv, h)
    q, k = qkv.new_empty((qkv.shape[0], h, qkv.shape[2])), qkv.new_empty((qkv.shape[0], hkv, qkv.shape[2]))
    fused.rope_pairs((qkv[:, :h], qkv[:, h:h + hkv]), (q, k), c, s)
    out, stats = _forward(q, k, qkv[:, h + hkv:], cu, max_seqlen)
    return out, stats, q, k


@cudnn_fe_rope_fwd.register_fake
def _(qkv, c, s, cu, max_seqlen, heads):
    b, sb = _shapes(cu, max_seqlen)
    n, _, d = qkv.shape
    hkv = _kv_heads(qkv, heads)
    return (qkv.new_empty((n, heads, d)), qkv.new_empty((b, heads, sb, 1), dtype=torch.float32),
            qkv.new_empty((n, heads, d)), qkv.new_empty((n, hkv, d)))


@torch.library.custom_op("arvid::cudnn_fe_rope_bwd", mutates_args=())
def cudnn_fe_rope_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                      stats: torch.Tensor, c: torch.Tensor, s: torch.Tensor, cu: torch.Tensor, max_seqlen: int,
                      heads: int) -> torch.Tensor:
    """``d[qkv]`` in one buffer: cuDNN's dq, dk and dv, with RoPE's inverse rotation applied to dq
    and dk on their way into its columns and dv copied, in one kernel (no separate concatenation pass)."""
    qkv, h = qkv.contiguous(), heads
    hkv = _kv_heads(qkv, h)
    dqkv = torch.empty_like(qkv)
    if DV_IN_PLACE:  # cuDNN writes dv into d[qkv]'s v columns; the kernel rotates dq and dk
        dq, dk, _ = _backward(dout, q, k, qkv[:, h + hkv:], out, stats, cu, max_seqlen, dv_out=dqkv[:, h + hkv:])
        fused.rope_pairs((dq, dk), (dqkv[:, :h], dqkv[:, h:h + hkv]), c, s, inverse=True)
    else:
        dq, dk, dv = _backward(dout, q, k, qkv[:, h + hkv:], out, stats, cu, max_seqlen)
        fused.rope_pairs((dq, dk, dv), (dqkv[:, :h], dqkv[:, h:h + hkv], dqkv[:, h + hkv:]), c, s, inverse=True,
                         copied=1)
    return dqkv


@cudnn_fe_rope_bwd.register_fake
def _(dout, q, k, qkv, out, stats, c, s, cu, max_seqlen, heads):
    return qkv.new_empty(qkv.shape)  # contiguous, as the op's result


def _rope_setup(ctx, inputs, output):
    qkv, c, s, cu, max_seqlen, heads = inputs
    ctx.mark_non_differentiable(output[1], output[2], output[3])  # stats and the rotated q, k: saved, not used
    ctx.save_for_backward(output[2], output[3], qkv, output[0], output[1], c, s, cu)
    ctx.max_seqlen, ctx.heads = max_seqlen, heads


def _rope_backward(ctx, dout, dstats, dq, dk):
    q, k, qkv, out, stats, c, s, cu = ctx.saved_tensors
    dqkv = cudnn_fe_rope_bwd(dout, q, k, qkv, out, stats, c, s, cu, ctx.max_seqlen, ctx.heads)
    return dqkv, None, None, None, None, None


cudnn_fe_rope_fwd.register_autograd(_rope_backward, setup_context=_rope_setup)


def cudnn_fe_rope_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor,
                            max_seqlen: int, heads: int) -> torch.Tensor:
    """``qkv [N, H + 2 Hkv, D]`` (the fused projection, q k v heads in that order, not rotated),
    ``rope`` = the ``(c, s)`` tables of the tokens' positions -> ``[N, H, D]``: q and k rotated,
    then causal attention within each packed sequence. The same values as rotating q and k and
    calling :func:`cudnn_fe_attention`; its backward returns ``d[qkv]`` directly."""
    return cudnn_fe_rope_fwd(qkv, rope[0], rope[1], cu_seqlens, int(max_seqlen), heads)[0]


# (autograd: arvid.generator.attention wires cudnn_fe_fwd's backward to cudnn_fe_bwd, as it does fa4's)


def cudnn_fe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_seqlen: int) -> torch.Tensor:
    """``q [N, H, D]``, ``k, v [N, Hkv, D]`` (grouped-query attention native), packed sequences
    ``cu_seqlens`` ending at ``N`` -> ``[N, H, D]``, causal within each sequence."""
    return cudnn_fe_fwd(q, k, v, cu_seqlens, int(max_seqlen))[0]
