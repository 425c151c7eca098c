"""The GPT's decode step as hand-written Triton kernels: five launches per layer, or one.

:meth:`arvid.generator.gpt.GPT.decode_step` run through ``torch.compile`` and a CUDA graph is
~10 kernels per layer; at batch 1 (two rows with guidance) it took 1.07 ms per GPT-L step on an
H100, 4.1x the time to read its weights and cache once (BENCHMARKS.md, Sampling). :func:`decode_step`
computes the same step (same arguments, same logits up to the summation order) as

    per layer: norm + q/k/v projection + RoPE + cache write | split-KV attention |
               output projection + residual | norm + gate/up projection + SwiGLU |
               down projection + residual
    then:      final norm + output head

(:mod:`arvid.generator._triton_decode`). Each layer's five phases run as five launches, one a
phase (``TILES["layer"] = 0``, the default; always under Triton's CPU interpreter), or in one
launch whose programs stay resident and meet at grid barriers (``1``, CUDA only; compiled for
sm_90 in the tests but not yet run on a GPU, so not the default). On sm_90+ the kernels
are launched with programmatic dependent launch (:data:`TILES` ``pdl``): a kernel's programs start
while the previous kernel runs and read what does not depend on it (their first weight tiles)
before waiting for it. RoPE's angles are computed from the position in the kernel. The attention
reads only the filled cache positions, whatever ``kv_len`` bucket it is given. The sampler uses it
with ``SamplerConfig.compile="triton"`` (captured into CUDA graphs like the other modes).

Rows (``cache.batch_size``) are at most :data:`MAX_ROWS`: at batch 64 the step reads the KV cache
far more than the weights and the compiled step is already within 1.34x of its floor.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from arvid.generator.fused import HAVE_TRITON
from arvid.generator.gpt import rope_inv_freq

#: the most rows (batch x 2 with guidance) the kernels take: each program holds every row
MAX_ROWS = 16
#: cache positions per attention program
CHUNK = 64

# Tile sizes, by matrix (host heuristics; benchmarks/bench_decode_kernels.py overrides them to time others).
# ``pdl``: launch with programmatic dependent launch where the GPU and Triton have it (sm_90+,
# Triton >= 3.4): each kernel lets the next one launch at once, and that one reads its first weight
# tiles while this one runs, waiting for it only before reading its results. ``layer``: a layer's
# phases in one launch of ``layer_programs`` programs (0: one per SM) of ``layer_warps`` warps, with
# grid barriers between them (CUDA only), or (0) one launch a phase of ``warps`` warps.
TILES: dict[str, int] = {"warps": 2, "qkv_p": 4, "qkv_k": 1024, "o_n": 4, "o_k": 1024, "up_n": 8, "up_k": 512,
                         "down_n": 4, "down_k": 1024, "head_n": 32, "head_k": 256, "pdl": 1, "layer": 0,
                         "layer_programs": 0, "layer_warps": 4}


@functools.cache
def _kernels():
    from arvid.generator import _triton_decode

    return _triton_decode


def unsupported(model, rows: int, device: torch.device) -> str | None:
    """Why :func:`decode_step` cannot run ``model`` at ``rows`` rows on ``device`` (None: it can)."""
    if not HAVE_TRITON:
        return "Triton is not installed (it comes with CUDA builds of torch)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton decode kernels run on CUDA devices, not {device.type}"
    if not 1 <= rows <= MAX_ROWS:
        return f"the Triton decode kernels take 1 to {MAX_ROWS} rows (batch x 2 with guidance), got {rows}"
    c = model.config
    if c.head_dim & (c.head_dim - 1) or c.head_dim < 4:
        return f"the Triton decode attention needs a power-of-two head_dim >= 4, got {c.head_dim}"
    dt = model.tok_emb.weight.dtype
    if dt not in (torch.bfloat16, torch.float16, torch.float32):
        return f"the Triton decode kernels take bf16, fp16 or fp32 weights, got {dt}"
    # the kernels index the weights as contiguous [out, in] rows (no views)
    for name, w in model.named_parameters():
        if w.dim() == 2 and not w.is_contiguous():
            return f"the Triton decode kernels need contiguous weights; {name} has strides {w.stride()}"
    return None


#: programs a matrix's kernel should have at least (about two per SM of an H100), where its column
#: block can shrink to give them
PROGRAMS = 256


def _block(units: int, cap: int = 64) -> int:
    """The largest power of two <= cap that still leaves :data:`PROGRAMS` programs over ``units`` (>= 1)."""
    b = cap
    while b > 1 and -(-units // b) < PROGRAMS:
        b //= 2
    return b


@functools.cache
def pdl_available(device_index: int) -> bool:
    """Whether kernels on CUDA device ``device_index`` can use programmatic dependent launch: compute
    capability 9.0 or newer and a Triton that has the launch option and the ``gdc_*`` intrinsics."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return "launch_pdl" in fields and torch.cuda.get_device_capability(device_index)[0] >= 9


def tiles_for(model, rows: int, device: torch.device | None = None) -> dict[str, int]:
    """The tile sizes for ``model`` at ``rows`` rows: :data:`TILES`, with the row block and, where
    a matrix is too small for the set sizes to keep the GPU's SMs busy, smaller column blocks."""
    c = model.config
    t = dict(TILES)
    t["m"] = max(2, 1 << (rows - 1).bit_length())
    scale = t["m"] // 2  # the product tile is m x n x k: keep it at the size set for 2 rows
    for key, units in (("o_n", c.dim), ("down_n", c.dim), ("up_n", c.hidden_dim), ("head_n", c.vocab_size)):
        t[key] = min(t[key], _block(units))
    t["qkv_p"] = min(t["qkv_p"], max(1, c.head_dim // 2))
    for key in ("qkv_k", "o_k", "up_k", "down_k", "head_k"):
        k = c.hidden_dim if key == "down_k" else c.dim  # the reduced dimension
        t[key] = min(max(16, t[key] // scale), 1 << (k - 1).bit_length())
    if c.qk_norm:  # a program holds its whole head (head_dim / 2 pairs): a narrower reduction block
        t["qkv_k"] = max(16, t["qkv_k"] * t["qkv_p"] // max(1, c.head_dim // 2))
        t["qkv_p"] = max(1, c.head_dim // 2)
    cuda = device is not None and device.type == "cuda"
    t["pdl"] = int(bool(t["pdl"]) and cuda and pdl_available(device.index or 0))
    # one launch a layer needs every program resident at once: compiled for CUDA only (the
    # interpreter runs programs in turn: each barrier would poll until it gives up)
    t["layer"] = int(bool(t["layer"]) and cuda and os.environ.get("TRITON_INTERPRET") != "1")
    if c.head_dim >= 128:  # a [CHUNK, head_dim] key and value tile, and the next item's, a program
        t["layer_warps"] = max(t["layer_warps"], 8)
    if t["layer"] and t["layer_programs"] <= 0:
        t["layer_programs"] = torch.cuda.get_device_properties(device).multi_processor_count
    return t


class _Workspace:
    """The attention's split partials and its per-(row, head) counters (zero between launches: the
    merging program resets its own), and the one-launch layer's barrier counter, kept per (device,
    rows): allocated once, before any graph capture, and shared by every layer and step (the
    kernels run one after another on a stream; two steps of one shape on concurrent streams would
    share them, and are not supported)."""

    def __init__(self, rows: int, heads: int, head_dim: int, max_splits: int, device: torch.device) -> None:
        self.max_splits = max_splits
        self.partial_o = torch.empty(rows * heads * max_splits * head_dim, device=device, dtype=torch.float32)
        self.partial_m = torch.empty(rows * heads * max_splits, device=device, dtype=torch.float32)
        self.partial_l = torch.empty(rows * heads * max_splits, device=device, dtype=torch.float32)
        self.counters = torch.zeros(rows * heads, device=device, dtype=torch.int32)
        #: the layer kernel's grid-barrier counter (zero between launches) and error flag
        self.sync = torch.zeros(2, device=device, dtype=torch.int32)


_WORKSPACES: dict[tuple, _Workspace] = {}


def _refuse_in_capture(device: torch.device) -> None:
    """The step's lasting buffers (workspace, frequencies) must not be made inside a CUDA graph
    capture: they would come from the graph's pool, and their filling would replay with it."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the Triton decode step's first call for a batch shape must run before CUDA graph "
                           "capture (a warm-up call makes its workspace)")


def workspace(rows: int, heads: int, head_dim: int, max_len: int, device: torch.device,
              create: bool = True) -> _Workspace:
    """The workspace of steps of this shape; ``create=False``: the one :func:`decode_step` made
    (KeyError where none was: checks of its counters must not read a fresh one)."""
    max_splits = 1 << (max(1, -(-max_len // CHUNK)) - 1).bit_length()
    key = (device, rows, heads, head_dim, max_splits)
    if key not in _WORKSPACES:
        if not create:
            raise KeyError(f"no Triton decode workspace for {key}")
        _refuse_in_capture(device)
        _WORKSPACES[key] = _Workspace(rows, heads, head_dim, max_splits, device)
    return _WORKSPACES[key]


def barrier_errors(device: torch.device | str, reset: bool = True) -> int:
    """How many of ``device``'s workspaces saw a grid barrier of the one-launch layer give up since
    the last call (its programs were not all resident at once, e.g. another process held SMs: the
    step's results are then wrong); ``reset`` clears the flags. Syncs with the device."""
    d = torch.device(device)
    index = d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else None)
    bad = 0
    for key, ws in _WORKSPACES.items():
        if key[0].type == d.type and key[0].index == index:
            bad += int(ws.sync[1].item() != 0)
            if reset:
                ws.sync[1].zero_()
    return bad


_FREQS: dict[tuple, torch.Tensor] = {}


def inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """:func:`~arvid.generator.gpt.rope_inv_freq` kept per device (made once, outside any capture:
    the first step is a warm-up)."""
    key = (device, head_dim, theta)
    if key not in _FREQS:
        _refuse_in_capture(device)
        _FREQS[key] = rope_inv_freq(head_dim, theta, device)
    return _FREQS[key]


@torch.no_grad()
def decode_step(model, cache, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int | None = None,
                attention: str = "sdpa") -> torch.Tensor:
    """:meth:`GPT.decode_step <arvid.generator.gpt.GPT.decode_step>` through the Triton kernels:
    feed ``tokens LongTensor[B]`` at position ``pos`` (a device scalar), write each layer's k/v into
    ``cache`` there, return the next-token logits ``[B, vocab]`` in the weights' dtype. ``kv_len``
    bounds the attended positions as there (the kernels read only positions ``<= pos`` anyway);
    ``attention`` is accepted for the same signature and ignored. No host sync: CUDA-graph
    capturable."""
    c = model.config
    rows = tokens.shape[0]
    why = unsupported(model, rows, tokens.device)
    if why is not None:
        raise ValueError(why)
    if cache.batch_size != rows:
        raise ValueError(f"the cache has {cache.batch_size} rows, tokens {rows}")
    n = cache.max_len if kv_len is None else kv_len
    if not 0 < n <= cache.max_len:
        raise ValueError(f"kv_len must lie in [1, cache.max_len={cache.max_len}], got {kv_len}")
    h, hkv, d = c.n_heads, c.kv_heads, c.head_dim
    dt = model.tok_emb.weight.dtype
    if cache.dtype != dt:
        raise ValueError(f"the Triton decode step needs the KV cache in the weights' dtype {dt}, got {cache.dtype}")
    kc = cache.k[0]
    if (tuple(kc.shape[1:2]) + tuple(kc.shape[3:]) != (hkv, d) or kc.stride(-1) != 1 or kc.stride(-2) != d
            or any(t.stride() != kc.stride() or t.shape != kc.shape for t in cache.tensors())):
        raise ValueError(f"the Triton decode step needs every cache tensor [B, {hkv}, max_len, {d}] with unit stride "
                         f"in head_dim (got {tuple(kc.shape)}, strides {kc.stride()})")
    k = _kernels()
    t = tiles_for(model, rows, tokens.device)
    x = model.tok_emb(tokens).contiguous()  # [M, dim], the residual stream, updated in place
    freqs = inv_freq(d, c.rope_theta, x.device)
    p = pos.reshape(1)
    q = torch.empty(rows, h, d, device=x.device, dtype=dt)
    o = torch.empty(rows, h * d, device=x.device, dtype=dt)
    hid = torch.empty(rows, c.hidden_dim, device=x.device, dtype=dt)
    ws = workspace(rows, h, d, cache.max_len, x.device)
    splits = -(-n // CHUNK)
    scale = 1.0 / math.sqrt(d)
    eps = c.norm_eps
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        qn = a.q_norm.weight if a.q_norm is not None else blk.attn_norm.weight
        kn = a.k_norm.weight if a.k_norm is not None else blk.attn_norm.weight
        k.layer(x, blk.attn_norm.weight, a.wqkv.weight, q, cache.k[i], cache.v[i], freqs, p, qn, kn, ws, o,
                a.wo.weight, blk.ffn_norm.weight, blk.ffn.w13.weight, hid, blk.ffn.w2.weight, eps, n, scale, splits,
                CHUNK, a.q_norm is not None, t, bool(t["layer"]), t["layer_programs"])
    logits = torch.empty(rows, c.vocab_size, device=x.device, dtype=dt)
    k.head(x, model.norm.weight, model.head.weight, logits, eps, t)
    return logits
