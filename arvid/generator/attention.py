"""Causal attention over packed variable-length sequences, behind one function.

Training packs many sequences into one row of ``N`` tokens (no padding); each token may
attend only to earlier tokens *of its own sequence*. The sequences are described by
``cu_seqlens`` (``IntTensor[S+1]``, boundaries) and ``max_seqlen`` (a Python int).

Backends (``varlen_causal_attention(..., backend=...)``):

- ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (package ``flash-attn``), CUDA, fp16/bf16.
- ``fa4``: FlashAttention-4's varlen kernels (package ``fa4``: ``flash_attn.cute``, CuTe DSL),
  called directly through two opaque custom ops (forward, backward), so ``torch.compile`` keeps
  the layers around them in one graph. fp16/bf16; forward on Hopper and Blackwell, training on
  Blackwell only: fa4 4.0.0b3 has no varlen backward on Hopper (sm90), and
  :func:`resolve_training_backend` says so. (torch 2.11's own route, ``flash_impl=FA4`` under
  ``torch_varlen``, refuses the backward of a causal window on Hopper.)
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn``; it has no ``is_causal`` flag,
  causality is the sliding window ``window_size=(-1, 0)``. CUDA, fp16/bf16.
- ``flex``: FlexAttention with a document-causal ``BlockMask`` (compiled on CUDA; on CPU it
  runs unfused, materialises the scores, and has no backward pass: inference and tests only).
- ``cudnn``: SDPA restricted to the cuDNN kernel. SDPA has no varlen API, so the packed batch
  is unpacked to padded ``[S, H, Lmax, D]`` and run with ``is_causal=True``: padding sits at the
  tail of each row, after every real query, so the causal mask alone keeps it out. Fast when
  lengths are similar; it spends work on padding when they are not. CUDA only.
- ``cudnn_fe``: cuDNN's fused attention on the packed layout itself (``[N, H, D]`` with each
  sequence's start as a ragged offset: no padding), through the cuDNN frontend's Python graphs,
  built once per bucketed shape and cached (:mod:`arvid.generator.cudnn_fe`). CUDA (Hopper or
  newer), fp16/bf16, cuDNN >= 9.6, the ``nvidia-cudnn-frontend`` package (``arvid[cudnn]``).
- ``cudnn_varlen``: the same cuDNN kernels through torch's own route (``[N, H, D]`` with the
  sequences' offsets, cuDNN's "ragged" THD layout: no padding), through the two aten ops torch's
  nested-tensor SDPA uses (``aten._cudnn_attention_forward`` / ``_backward``, torch>=2.9), wrapped
  as opaque custom ops so ``torch.compile`` keeps the layers around them in one graph. CUDA,
  fp16/bf16. Never chosen by ``auto``, and **refused on torch < 2.12**: on the H100 with torch
  2.11.0+cu130 (cuDNN 9.19, 2026-12-06) its forward matched the reference but ``dq``/``dk`` did
  not (dv did), and every call built its cuDNN graph afresh (45 ms per forward at 16,384 tokens
  against FA2's 0.30 ms; the L step took 3.1 s). Its kernels were fast: the L step's kernel time
  was 152 ms against torch_varlen's 172 ms (attention 21 ms against 43 ms). Later torch caches
  the ragged graphs by (sequence count, longest sequence); ``benchmarks/probe_cudnn_varlen.py``
  (which calls the ops directly) and the attention GPU tests say whether a newer torch fixes it.
- ``xformers``: ``memory_efficient_attention`` with ``BlockDiagonalCausalMask.from_seqlens``.
- ``sdpa``: the portable fallback: SDPA with a dense ``[N, N]`` boolean document-causal mask
  (``O(N^2)`` memory; CPU tests, small batches).
- ``auto``: the fastest available for the device and dtype (see :func:`auto_backend`); the
  choice is logged once.

q: ``[N, H, D]``; k, v: ``[N, Hkv, D]`` with ``H % Hkv == 0`` (grouped-query attention).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F
from einops import rearrange

from arvid.generator import cudnn_fe
from arvid.generator.packing import LastBatchMemo

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "fa4", "torch_varlen", "flex", "cudnn", "cudnn_fe", "cudnn_varlen", "xformers",
            "sdpa")

#: CUDA preference of ``auto`` (fastest first). ``benchmarks/bench_attention.py`` on an H100
#: (2026-12-06), torch 2.11, bf16, 16384 packed tokens of router-like lengths (mean 683), 16 heads
#: of 64, fwd+bwd TFLOP/s: torch_varlen 90.4-104.5, flex 85.8-87.3 (with the batch's block mask
#: shared by the layers, as the GPT runs it), cudnn (padded) 42.2-43.2, sdpa 43.0-43.5 (on CUDA it
#: takes the padded path too). flash_attn was not installed there; it runs the same FA2 varlen
#: kernel as torch_varlen and comes first because it has run in production longest. ``fa4`` is
#: never chosen by ``auto``: it cannot train on Hopper and was not measured on Blackwell; nor is
#: ``cudnn_varlen`` (wrong dq/dk and a graph built per call on torch 2.11, see above). ``cudnn_fe``
#: comes first on Hopper (compute capability 9.x, where it was measured) where its package is
#: installed: in the compiled L training step (H200, 2026-12-06, 32,768 positions) it was 165.8 ms
#: against torch_varlen's 170.5 ms on the same machine (its attention kernels 25 ms a step; FA2's
#: were 43.5 ms in an H100 profile); alone, one call at a time, its host side makes it slower
#: (1.35 against 0.98 ms forward+backward at 16,384 tokens), which a training step's queue hides.
CUDA_AUTO_ORDER = ("cudnn_fe", "flash_attn", "torch_varlen", "flex", "cudnn", "sdpa")
#: Backends of :data:`CUDA_AUTO_ORDER` that ``auto`` takes only on these compute-capability majors
#: (where they were measured faster); the others it takes wherever they run.
AUTO_ONLY_ON = {"cudnn_fe": (9,)}

_HALF = (torch.float16, torch.bfloat16)


class AttentionBackendUnavailable(ValueError):
    """The requested attention backend cannot run here; the message says what to install or change.

    A ``ValueError``: the configured value (``attn_backend``, ``flash_impl``) does not fit this
    machine, so ``arvid`` reports it as one line (``arvid <command>: error: ...``) like any other
    config error, without a traceback."""


# --------------------------------------------------------------------------- availability


def backend_unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when backend ``name`` can run on ``device`` with ``dtype``, else why not and what to do."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if name not in BACKENDS or name == "auto":
        return f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS[1:])} or 'auto'"
    if name == "sdpa":
        return None
    if name == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return "FlexAttention needs torch>=2.5 (torch.nn.attention.flex_attention); upgrade torch"
        return None
    if not cuda:
        # Say what to install as well: the package is needed on the GPU machine too.
        missing = _package_problem(name)
        also = f"; it also needs {missing.split(' needs ', 1)[-1]}" if missing else ""
        return (f"attention backend {name!r} needs a CUDA GPU (got device {device}){also}; use 'sdpa' (or 'flex' "
                "for inference) on CPU")
    if name in ("flash_attn", "fa4", "torch_varlen", "cudnn", "cudnn_fe", "cudnn_varlen") and dtype not in _HALF:
        return f"attention backend {name!r} needs fp16/bf16 inputs, got {dtype}; train with precision=bf16"
    if name == "flash_attn":
        return _flash_attn_problem()
    if name == "fa4":
        if not torch.cuda.is_available():
            return "attention backend 'fa4' needs a CUDA GPU, and this torch sees none (torch.cuda.is_available() is False)"
        major = torch.cuda.get_device_capability(device)[0]
        if major not in (9, 10, 11):
            return f"attention backend 'fa4' needs a Hopper or Blackwell GPU (compute capability 9-11), got {major}.x"
        return _package_problem(name)
    if name == "cudnn_fe":
        if not torch.cuda.is_available():
            return "attention backend 'cudnn_fe' needs a CUDA GPU, and this torch sees none (torch.cuda.is_available() is False)"
        return cudnn_fe.problem(device.index if device.index is not None else torch.cuda.current_device())
    if name == "torch_varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            return "attention backend 'torch_varlen' needs torch.nn.attention.varlen (torch>=2.10); upgrade torch"
        return None
    if name in ("cudnn", "cudnn_varlen"):
        if not torch.backends.cudnn.is_available():
            return f"attention backend {name!r} needs torch built with cuDNN (cuDNN SDPA, cuDNN>=9)"
        if name == "cudnn_varlen":
            if _torch_version() < CUDNN_VARLEN_MIN_TORCH:
                return CUDNN_VARLEN_OLD_TORCH.format(torch=torch.__version__)
            if not _cudnn_has_ragged_ops():
                return ("attention backend 'cudnn_varlen' needs aten._cudnn_attention_forward with cumulative "
                        "sequence lengths; upgrade torch, or use 'torch_varlen'")
        return None
    if name == "xformers":
        return _package_problem(name) or _xformers_kernel_problem()
    return None


#: The oldest torch whose cuDNN ragged attention ``cudnn_varlen`` runs on (torch 2.11 failed, see
#: the module docstring); a newer one is let through but unmeasured.
CUDNN_VARLEN_MIN_TORCH = (2, 12)
CUDNN_VARLEN_OLD_TORCH = (
    "attention backend 'cudnn_varlen' is refused on torch {torch} (< 2.12): on torch 2.11 (H100, cuDNN 9.19, "
    "2026-12-06) its gradients dq/dk disagreed with the reference and every call rebuilt its cuDNN graph "
    "(45 ms per forward); use 'torch_varlen' or 'auto'")


def _torch_version() -> tuple[int, int]:
    """``(major, minor)`` of this torch. (The GPT resolves its backend once, outside
    ``torch.compile``'s trace, so these checks need not be traceable; a decorator that makes them
    constants there would import ``torch._dynamo`` with this module, which the CLI avoids.)"""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.lru_cache(maxsize=1)
def _cudnn_has_ragged_ops() -> bool:
    """Whether this torch's cuDNN attention ops take cumulative sequence lengths (torch>=2.9)."""
    fwd = getattr(torch.ops.aten, "_cudnn_attention_forward", None)
    bwd = getattr(torch.ops.aten, "_cudnn_attention_backward", None)
    if fwd is None or bwd is None:
        return False
    names = {a.name for a in fwd.default._schema.arguments} & {a.name for a in bwd.default._schema.arguments}
    return {"cum_seq_q", "cum_seq_k", "max_q", "max_k"} <= names


def _package_problem(name: str) -> str | None:
    """For backends that come from a package of their own (``flash_attn``, ``xformers``): None when
    it is installed, else ``"attention backend ... needs the ... package: pip install ..."``."""
    if name == "flash_attn":
        return _flash_attn_problem()
    if name == "fa4":
        return _fa4_problem()
    if name == "cudnn_fe" and importlib.util.find_spec("cudnn") is None:
        return cudnn_fe.problem()
    if name == "xformers" and importlib.util.find_spec("xformers") is None:
        return "attention backend 'xformers' needs the xformers package: pip install 'arvid[xformers]'"
    return None


def _flash_attn_problem() -> str | None:
    """None when the flash-attn package (its ``flash_attn_varlen_func``) is installed, else what to do.

    A ``flash_attn`` folder without ``__init__.py`` is only a namespace: the ``fa4`` package
    installs ``flash_attn/cute`` that way (FlashAttention-4, used through :func:`activate_flash_impl`),
    and with it alone ``import flash_attn`` succeeds but holds no varlen function."""
    spec = importlib.util.find_spec("flash_attn")
    if spec is None:
        return "attention backend 'flash_attn' needs the flash-attn package: pip install 'arvid[flash]' (flash-attn>=2.6)"
    if spec.origin is None:  # a namespace package
        return ("attention backend 'flash_attn' needs the flash-attn package; the installed 'flash_attn' is only a "
                "namespace (such as fa4's flash_attn.cute: use it with attn_backend=fa4)")
    return None


@functools.lru_cache(maxsize=1)
def _fa4_problem() -> str | None:
    """None when FlashAttention-4 (``flash_attn.cute.interface``) imports, else what to install."""
    help_ = "pip install 'arvid[fa4]' (fa4 with the CuTe DSL it was built against)"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # a flash_attn module without __path__ (flash-attn 2's shadows the namespace)
        found = False
    if not found:
        return f"attention backend 'fa4' needs the fa4 package (flash_attn.cute): {help_}"
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a DSL version mismatch shows up as any error at import
        return (f"attention backend 'fa4' needs an importable flash_attn.cute, which is installed but does not import ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); {help_}")
    return None


FLASH_IMPLS = ("FA3", "FA4")
_FLASH_IMPL_HELP = {
    "FA4": "FlashAttention-4 needs the fa4 package (pip install 'arvid[fa4]': fa4 with the CuTe DSL it was built against) and a Hopper or "
           "Blackwell GPU",
    "FA3": "FlashAttention-3 needs flash_attn_interface (flash-attention's hopper/ build) and a Hopper GPU",
}


def activate_flash_impl(name: str) -> str | None:
    """Route torch's flash-attention kernels (``torch_varlen``, SDPA's flash path) to ``name``
    (``FA3`` or ``FA4``) through ``torch.nn.attention.activate_flash_attention_impl``; ``""``: torch's
    own FA2 kernels (nothing is changed). Returns the active implementation, or None.

    The activation holds for the whole process (every later stage of a pipeline run in one process
    too). With the flash-attn package installed as well, its ``flash_attn`` shadows fa4's
    ``flash_attn/cute`` namespace and FA4 cannot load: install one or the other.

    Raises :class:`AttentionBackendUnavailable` saying what to install when torch or the kernels'
    package cannot provide it."""
    if not name:
        return None
    if name not in FLASH_IMPLS:
        raise ValueError(f"flash_impl must be '' (torch's own kernels) or one of {', '.join(FLASH_IMPLS)}, got {name!r}")
    try:
        from torch.nn.attention import activate_flash_attention_impl, list_flash_attention_impls
    except ImportError as e:
        raise AttentionBackendUnavailable(
            f"flash_impl={name} needs torch.nn.attention.activate_flash_attention_impl (torch>=2.10); upgrade torch") from e
    if name not in list_flash_attention_impls():
        raise AttentionBackendUnavailable(
            f"this torch does not offer flash_impl={name} (it offers {list_flash_attention_impls()})")
    try:
        activate_flash_attention_impl(name)
    except Exception as e:  # noqa: BLE001 - import, driver or DSL loading errors alike: say what to install
        raise AttentionBackendUnavailable(f"flash_impl={name} could not be activated ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0][:200]}): {_FLASH_IMPL_HELP[name]}") from e
    log.info("flash attention kernels: %s (torch_varlen and SDPA's flash path)", name)
    return name


@functools.lru_cache(maxsize=1)
def _xformers_kernel_problem() -> str | None:
    # The PyPI wheel may be built for another torch and import without its CUDA kernels.
    try:
        import xformers.ops as xops  # noqa: F401
        from xformers.ops.fmha import cutlass  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the backend cannot run
        return f"xformers is installed but does not load its kernels ({type(e).__name__}: {e}); install a build matching this torch"
    return None


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Backends (not ``auto``) that can run on ``device`` with ``dtype``."""
    return [b for b in BACKENDS[1:] if backend_unavailable_reason(b, device, dtype) is None]


_AUTO_LOGGED: set[tuple[str, torch.dtype, str]] = set()


def auto_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend ``auto`` uses: on CUDA the first available of :data:`CUDA_AUTO_ORDER` (within
    :data:`AUTO_ONLY_ON`), on CPU ``sdpa``."""
    device = torch.device(device)
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        choice = next(b for b in CUDA_AUTO_ORDER if major in AUTO_ONLY_ON.get(b, (major,))
                      and backend_unavailable_reason(b, device, dtype) is None)
    else:
        choice = "sdpa"
    key = (device.type, dtype, choice)
    if key not in _AUTO_LOGGED:
        _AUTO_LOGGED.add(key)
        log.info("attention backend auto -> %s (device %s, %s)", choice, device.type, dtype)
    return choice


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """``auto`` -> a concrete backend; a concrete one is checked and a clear error raised if it cannot run."""
    if name == "auto":
        return auto_backend(device, dtype)
    reason = backend_unavailable_reason(name, device, dtype)
    if reason is not None:
        raise AttentionBackendUnavailable(reason)
    return name


def resolve_training_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """:func:`resolve_backend` for training (forward and backward passes): also refuses ``flex``
    off CUDA, whose unfused CPU path has no backward pass, and ``fa4`` on Hopper, where
    FlashAttention-4 (fa4 4.0.0b3) has no varlen backward pass. Stages call it before they build or
    write anything, so a backend that cannot train here fails at once, not at the first step."""
    device = torch.device(device)
    resolved = resolve_backend(name, device, dtype)
    if resolved == "flex" and device.type != "cuda":
        raise AttentionBackendUnavailable(
            f"attention backend 'flex' cannot train on {device} (FlexAttention has no backward pass off CUDA); "
            "train with attn_backend='sdpa' (or 'auto') on CPU, or run 'flex' on a CUDA GPU")
    if resolved == "fa4" and torch.cuda.get_device_capability(device)[0] == 9:  # resolve_backend checked CUDA
        raise AttentionBackendUnavailable(FA4_HOPPER_NO_BACKWARD)
    return resolved


#: What the fa4 package's own check says on an H100 (fa4 4.0.0b3, 2026-12-06: "varlen backward is
#: not yet supported on sm90"); its forward pass runs and matches the reference there.
FA4_HOPPER_NO_BACKWARD = ("attention backend 'fa4' cannot train on a Hopper GPU: FlashAttention-4 (fa4 4.0.0b3) has "
                          "no varlen backward pass on sm90 (its forward runs); train with 'torch_varlen' or 'flex' "
                          "(or 'auto') there, 'fa4' on Blackwell")


# --------------------------------------------------------------------------- helpers


def document_ids(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """``IntTensor[S+1]`` boundaries -> ``LongTensor[n]``: the sequence index of every packed token."""
    pos = torch.arange(n, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)


def document_causal_mask(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """``BoolTensor[n, n]``: True where query i may attend key j (same sequence, j <= i)."""
    doc = document_ids(cu_seqlens, n)
    pos = torch.arange(n, device=cu_seqlens.device)
    return (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])


def _expand_kv(k: torch.Tensor, h: int) -> torch.Tensor:
    """``[N, Hkv, D]`` -> ``[N, H, D]`` by repeating each kv head for its group of query heads."""
    if k.shape[1] == h:
        return k
    return k.repeat_interleave(h // k.shape[1], dim=1)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be packed [N, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit together")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be IntTensor[S+1] with S >= 1, got shape {tuple(cu_seqlens.shape)}")


# --------------------------------------------------------------------------- backends


def _sdpa(q, k, v, cu_seqlens, max_seqlen):
    # The portable path. A dense [N, N] document mask costs N^2; padding every sequence to the
    # longest costs S * Lmax^2, far less for many short sequences (CPU training of small models).
    n = q.shape[0]
    s = cu_seqlens.numel() - 1
    if s > 1 and s * max_seqlen * max_seqlen < n * n:
        return padded_causal_attention(q, k, v, cu_seqlens, max_seqlen)
    return _sdpa_dense(q, k, v, cu_seqlens, max_seqlen)


def _sdpa_dense(q, k, v, cu_seqlens, max_seqlen):
    n, h, _ = q.shape
    mask = document_causal_mask(cu_seqlens, n)  # [N, N]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # [1, H, N, D]
        attn_mask=mask, enable_gqa=k.shape[1] != h)
    return out[0].transpose(0, 1)  # [N, H, D]


def padded_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, sdpa_backends: list | None = None) -> torch.Tensor:
    """Unpack to padded ``[S, H, Lmax, D]``, run SDPA with ``is_causal=True``, pack back: ``[N, H, D]``.

    Padding (zeros) sits at each sequence's tail: the causal mask keeps every real query off
    it, so no extra mask is needed and the fused kernels (cuDNN, flash) apply. Unpacking is a
    scatter to unique slots and packing a gather from them, so both backward passes are plain
    gathers/adds without duplicate indices (a gather *from* a shared padding row would make the
    backward pass accumulate thousands of gradients into one row, serialised).
    ``sdpa_backends``: a list of ``torch.nn.attention.SDPBackend`` to restrict SDPA to.
    """
    n, h, d = q.shape
    s = cu_seqlens.numel() - 1
    doc = document_ids(cu_seqlens, n)
    dst = doc * max_seqlen + (torch.arange(n, device=q.device) - cu_seqlens.long()[doc])  # [N] padded slot

    def unpack(t: torch.Tensor) -> torch.Tensor:
        padded = t.new_zeros(s * max_seqlen, *t.shape[1:]).index_copy(0, dst, t)  # [S*Lmax, H', D]
        return rearrange(padded, "(s l) h d -> s h l d", s=s)

    qp, kp, vp = unpack(q), unpack(_expand_kv(k, h)), unpack(_expand_kv(v, h))
    if sdpa_backends is None:
        out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backends):
            out = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
    out = rearrange(out, "s h l d -> (s l) h d")
    return out.index_select(0, dst)


def _cudnn(q, k, v, cu_seqlens, max_seqlen):
    from torch.nn.attention import SDPBackend

    return padded_causal_attention(q, k, v, cu_seqlens, max_seqlen, [SDPBackend.CUDNN_ATTENTION])


_FLEX_COMPILED: dict = {}  # torch.compile mode -> compiled flex_attention


def _flex_fn(device: torch.device, mode: str | None = None):
    """FlexAttention: compiled once per process (and ``torch.compile`` mode) on CUDA (its fused
    kernel); eager elsewhere. ``mode``: e.g. ``max-autotune-no-cudagraphs`` (inductor tries its
    kernel configurations; ``benchmarks/bench_attention.py --flex-modes``)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if mode not in _FLEX_COMPILED:
        _FLEX_COMPILED[mode] = torch.compile(flex_attention, mode=mode)  # dynamic after the first new shape
    return _FLEX_COMPILED[mode]


FLEX_BLOCK = 128


@torch._disable_dynamo  # torch.compiler.disable, applied at the first call (no torch._dynamo import here)
def document_block_mask(cu_seqlens: torch.Tensor, n: int, block: int = FLEX_BLOCK):
    """The FlexAttention BlockMask of per-sequence causal attention over ``n`` packed positions
    (``n`` rounded up to a multiple of ``block``; positions past ``cu_seqlens[-1]`` are padding, a
    document of their own), built from tile ranges in closed form: no ``n x n`` evaluation and no
    host sync, so one mask per batch serves every layer (``create_block_mask`` in each layer cost
    ~8 ms per call on the H100).

    Documents are contiguous, so query tile ``i`` needs the key tiles from the one holding the
    start of its first row's document up to ``i``. Those wholly inside its document and before
    it are *full* (every pair allowed: computed without the mask), when the query tile lies in one
    document; the diagonal tile, a tile holding a document's unaligned start, and every tile of a
    query tile spanning documents are *partial* (``mask_mod`` decides per pair).

    Always built eagerly (a graph break under ``torch.compile``): inside the compiled training
    step, inductor (torch 2.11, H200, 2026-12-05) failed on it with ``NotImplementedError:
    SliceView``. It is a few small kernels and no host sync; the layers using it stay compiled."""
    from torch.nn.attention.flex_attention import BlockMask

    n_pad = -(-n // block) * block
    cu = cu_seqlens.long()
    if n_pad != n:  # the padding is one more document (cu_seqlens ends at n)
        cu = torch.cat([cu, cu.new_full((1,), n_pad)])
    doc = document_ids(cu, n_pad)  # [n_pad]
    tiles = n_pad // block
    i = torch.arange(tiles, device=cu.device)
    first, last = doc[i * block], doc[i * block + block - 1]  # documents of each query tile's ends
    lo = cu[first] // block  # key tile holding the start of the first row's document
    full_lo = torch.where(first == last, (cu[last] + block - 1) // block, i)  # first full key tile
    cols = i[None, :]  # [1, tiles]
    n_before = (full_lo - lo)[:, None]  # partial tiles before the full run (0 or 1, or all for spans)
    kv_idx = torch.where(cols < n_before, lo[:, None] + cols, torch.where(cols == n_before, i[:, None], 0))
    full_num = i - full_lo
    full_idx = torch.where(cols < full_num[:, None], full_lo[:, None] + cols, 0)

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    def bh(t: torch.Tensor) -> torch.Tensor:  # FlexAttention's [batch, heads, ...] int32 layout
        return t.to(torch.int32)[None, None]

    extra = {"seq_lengths": (n_pad, n_pad)} if _from_kv_blocks_takes_seq_lengths() else {}
    return BlockMask.from_kv_blocks(bh(n_before[:, 0] + 1), bh(kv_idx), bh(full_num), bh(full_idx),
                                    BLOCK_SIZE=block, mask_mod=mask_mod, **extra)


@functools.lru_cache(maxsize=1)
def _from_kv_blocks_takes_seq_lengths() -> bool:
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    return "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters  # torch >= 2.6


def _flex(q, k, v, cu_seqlens, max_seqlen, block_mask=None, kernel_options: dict | None = None,
          mode: str | None = None):
    n, h, _ = q.shape
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise AttentionBackendUnavailable(
            "FlexAttention has no backward pass on CPU (torch raises NotImplementedError); "
            "train with attn_backend='sdpa' on CPU, or run 'flex' on a CUDA GPU")
    # Pad N to a multiple of the block size: fewer distinct shapes to compile for; the padding is
    # its own document, so it never mixes with real tokens.
    n_pad = -(-n // FLEX_BLOCK) * FLEX_BLOCK
    if n_pad != n:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, n_pad - n)) for t in (q, k, v))
    if block_mask is None:
        block_mask = document_block_mask(cu_seqlens, n)
    extra = {"kernel_options": kernel_options} if kernel_options else {}
    out = _flex_fn(q.device, mode)(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                   block_mask=block_mask, enable_gqa=k.shape[1] != h, **extra)  # [1, H, Npad, D]
    return out[0, :, :n].transpose(0, 1)


def _flash_attn(q, k, v, cu_seqlens, max_seqlen):
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True)


@functools.lru_cache(maxsize=1)
def _varlen_has_gqa() -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters  # added after torch 2.11


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen):
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    h = q.shape[1]
    kw = {}
    if k.shape[1] != h:
        if _varlen_has_gqa():
            kw["enable_gqa"] = True
        else:
            k, v = _expand_kv(k, h), _expand_kv(v, h)
    # varlen_attn has no is_causal argument: a window of (-1 left, 0 right) is causal attention.
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, window_size=(-1, 0), **kw)


@torch.library.custom_op("arvid::fa4_varlen_causal_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
             max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-4 varlen causal forward: ``out [N, H, D]`` and the log-sum-exp ``[H, N]`` (float32)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, cu, cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, causal=True,
                               return_lse=True)
    return out, lse


@_fa4_fwd.register_fake
def _(q, k, v, cu, max_seqlen):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("arvid::fa4_varlen_causal_bwd", mutates_args=())
def _fa4_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
             lse: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, dout.contiguous(), lse, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                 max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    return dq, dk, dv


@_fa4_bwd.register_fake
def _(dout, q, k, v, out, lse, cu, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _wire_backward(fwd_op, bwd_op) -> None:
    """Autograd for a custom forward op ``(q, k, v, cu, max_seqlen) -> (out, lse)`` through its
    backward op ``(dout, q, k, v, out, lse, cu, max_seqlen) -> (dq, dk, dv)`` (the log-sum-exp
    output gets no gradient)."""

    def setup(ctx, inputs, output):
        q, k, v, cu, max_seqlen = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu)
        ctx.max_seqlen = max_seqlen

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        return (*bwd_op(dout, q, k, v, out, lse, cu, ctx.max_seqlen), None, None)

    fwd_op.register_autograd(backward, setup_context=setup)


_wire_backward(_fa4_fwd, _fa4_bwd)
_wire_backward(cudnn_fe.cudnn_fe_fwd, cudnn_fe.cudnn_fe_bwd)


def _fa4(q, k, v, cu_seqlens, max_seqlen):
    # the kernels want unit stride in the last dimension, which q/k/v (views of the fused qkv
    # projection) have; GQA (fewer kv heads) is native
    return _fa4_fwd(q, k, v, cu_seqlens.to(torch.int32), max_seqlen)[0]


#: The layout of cuDNN's log-sum-exp as this torch returns it, seen by the first forward pass:
#: ``[N, H, 1]`` (torch's nested-tensor path up to 2026) or ``[H, N]`` (later torch). The custom op
#: hands it on flat, so that its fake needs no version check; the backward restores the shape.
_CUDNN_LSE_HEADS_FIRST: list[bool] = []


@torch.library.custom_op("arvid::cudnn_varlen_causal_fwd", mutates_args=())
def _cudnn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                      max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN causal attention over packed sequences: ``out [N, H, D]`` and its log-sum-exp, flat
    (``N * H`` float32, in torch's layout; see :data:`_CUDNN_LSE_HEADS_FIRST`)."""
    res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_seqlen, max_seqlen, True, 0.0, True,
                                                  False)
    out, lse = res[0], res[1]
    if not _CUDNN_LSE_HEADS_FIRST:
        _CUDNN_LSE_HEADS_FIRST.append(lse.dim() == 2)
    # the fake promises contiguous tensors; newer torch allocates the output in q's layout
    return out.contiguous(), lse.contiguous().reshape(-1)


@_cudnn_varlen_fwd.register_fake
def _(q, k, v, cu, max_seqlen):
    return q.new_empty(q.shape), q.new_empty((q.shape[0] * q.shape[1],), dtype=torch.float32)


@torch.library.custom_op("arvid::cudnn_varlen_causal_bwd", mutates_args=())
def _cudnn_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, cu: torch.Tensor,
                      max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, h = q.shape[0], q.shape[1]
    lse = lse.view(h, n) if _CUDNN_LSE_HEADS_FIRST[0] else lse.view(n, h, 1)
    zero = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout's seed and offset: unused at p = 0
    dq, dk, dv = torch.ops.aten._cudnn_attention_backward(dout.contiguous(), q, k, v, out, lse, zero, zero, None, cu,
                                                          cu, max_seqlen, max_seqlen, 0.0, True)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_cudnn_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_wire_backward(_cudnn_varlen_fwd, _cudnn_varlen_bwd)


def _cudnn_varlen(q, k, v, cu_seqlens, max_seqlen):
    # cuDNN takes int32 offsets; kv heads are repeated for grouped-query attention (the GPT's
    # presets other than `debug` have none), whether or not this torch's nested path would take
    # them. Contiguous tensors: torch's nested path before 2026 computed the offsets for a dense
    # [N, H, D] layout. The GPT's q and k are (they leave RoPE as new tensors); v, a view of the
    # fused projection, is copied.
    h = q.shape[1]
    q, k, v = (t.contiguous() for t in (q, _expand_kv(k, h), _expand_kv(v, h)))
    return _cudnn_varlen_fwd(q, k, v, cu_seqlens.to(torch.int32), max_seqlen)[0]


#: the xformers mask of the last batch (its host sync once per batch, not once per layer)
_BATCH = LastBatchMemo()


def _xformers_mask(cu_seqlens: torch.Tensor):
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    return _BATCH.get(cu_seqlens, "xformers_mask", lambda: BlockDiagonalCausalMask.from_seqlens(
        (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()))  # a host sync


def _xformers(q, k, v, cu_seqlens, max_seqlen):
    import xformers.ops as xops

    h = q.shape[1]
    bias = _xformers_mask(cu_seqlens)
    out = xops.memory_efficient_attention(q[None], _expand_kv(k, h)[None], _expand_kv(v, h)[None], attn_bias=bias)
    return out[0]


_IMPLS = {
    "sdpa": _sdpa,
    "cudnn": _cudnn,
    "cudnn_varlen": _cudnn_varlen,
    "cudnn_fe": cudnn_fe.cudnn_fe_attention,
    "flex": _flex,
    "flash_attn": _flash_attn,
    "fa4": _fa4,
    "torch_varlen": _torch_varlen,
    "xformers": _xformers,
}


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, backend: str = "auto", block_mask=None, *,
                            resolved: bool = False) -> torch.Tensor:
    """Per-sequence causal attention over a packed batch.

    q: ``[N, H, D]``, k/v: ``[N, Hkv, D]``, ``cu_seqlens``: ``IntTensor[S+1]`` (0 first, N last),
    ``max_seqlen``: the longest sequence. Returns ``[N, H, D]``. Scale is ``1/sqrt(D)``.
    ``block_mask``: for ``flex``, :func:`document_block_mask` of the batch, built once and shared
    by the layers (built here when not given); ignored by the other backends.
    ``resolved``: ``backend`` is a concrete name the caller has already checked for this device and
    dtype (:class:`~arvid.generator.gpt.GPT` does, once): the availability checks are skipped. Under
    torch.compile they are traced in every layer, and the cuDNN frontend's package lookup
    (``importlib.util.find_spec``) broke the compiled graph at every layer's attention.
    """
    _check(q, k, v, cu_seqlens)
    if int(max_seqlen) <= 0:
        raise ValueError(f"max_seqlen must be the longest sequence's length (> 0), got {max_seqlen}")
    if resolved and backend not in _IMPLS:
        raise ValueError(f"resolved=True needs a concrete attention backend, got {backend!r}")
    name = backend if resolved else resolve_backend(backend, q.device, q.dtype)
    if name == "flex":
        return _flex(q, k, v, cu_seqlens, int(max_seqlen), block_mask)
    return _IMPLS[name](q, k, v, cu_seqlens, int(max_seqlen))


def attention_flops(seqlens: list[int] | torch.Tensor, n_heads: int, head_dim: int, backward: bool = True) -> float:
    """Matmul FLOPs of causal attention over sequences of the given lengths (half of the full L^2).

    Forward: ``QK^T`` and ``PV``, ``2 * 2 * L^2 * H * D`` each full, halved for causality;
    backward is 2.5x the forward in flash-attention accounting (5 matmuls vs 2)."""
    lens = torch.as_tensor(seqlens, dtype=torch.float64)
    fwd = float((2 * 2 * lens**2 * n_heads * head_dim / 2).sum())
    return fwd * (3.5 if backward else 1.0)
