"""Hand-written kernels for the memory-bound parts of the compiled training step that inductor's
generated code leaves slow, each with a torch fallback that computes the same thing.

- :func:`rope` / :func:`rope_pairs`: RoPE's rotation of ``[N, G, D]`` heads, out of place or in
  place, forward or inverse; :func:`rope_pairs` takes up to three tensors in one launch, copying the
  last ones where asked. The ``cudnn_fe`` attention backend rotates q and k inside its opaque ops with it
  (:func:`arvid.generator.cudnn_fe.cudnn_fe_rope_attention`): its backward writes cuDNN's dq and
  dk through the inverse rotation straight into the q and k columns of one ``d[qkv]`` buffer. Under
  ``torch.compile`` the same backward was one generated kernel that rotated dq and dk and
  concatenated them with dv into ``d[qkv]``, at ~1 TB/s (19.3 ms of a 306 ms GPT-L step at 65,536
  positions, H100, 2026-12-07).
- :func:`swiglu`: ``silu(gate) * up`` of the fused ``[gate, up]`` projection, as an opaque op
  whose backward writes ``d[gate, up]`` in one pass (inductor's generated backward, a masked-load
  concatenation, took 20.5 ms of the same step, ~2.2 TB/s).

The Triton kernels (:mod:`arvid.generator._triton_kernels`) run on CUDA tensors where Triton is
installed (it comes with CUDA builds of torch); elsewhere, and for shapes they do not take, the
torch fallback runs. ``ARVID_FUSED=0`` (or :data:`ROPE` / :data:`SWIGLU` ``= False``) turns the
uses off: the model then runs the plain torch code that inductor compiles, as before. Execution only: the
values agree to bf16 rounding and checkpoints are unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_ON = os.environ.get("ARVID_FUSED", "1") != "0"
#: The cudnn_fe backend rotates q and k inside its ops (:func:`arvid.generator.cudnn_fe.cudnn_fe_rope_attention`):
#: on unless ``ARVID_FUSED_ROPE=0`` (or ``ARVID_FUSED=0``). Its current form (cuDNN gets q and k
#: each contiguous, as the plain route hands them) passed the GPU test on an H100 (2026-12-07, 16:20
#: and 16:38 UTC). Its two earlier forms failed there: cuDNN's backward, handed q and k as strided
#: views of one rotated buffer, gave wrong dq/dk/dv when told to write them into column slices of
#: d[qkv], and read or wrote out of bounds when told to write them contiguous.
ROPE = _ON and os.environ.get("ARVID_FUSED_ROPE", "1") != "0"
#: SwiGLU runs as the opaque :func:`swiglu` op in training on CUDA (on by default; ``ARVID_FUSED=0``
#: turns it off).
SWIGLU = _ON


#: Whether Triton is installed (found, not imported: importing it takes a while). A plain bool that
#: ``torch.compile`` reads as a constant in :func:`use_swiglu`.
HAVE_TRITON = importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels():
    """The Triton kernel module, or None where Triton cannot be imported."""
    if not HAVE_TRITON:
        return None
    try:
        from arvid.generator import _triton_kernels
    except Exception:  # noqa: BLE001 - a broken Triton install: the torch fallback runs
        return None
    return _triton_kernels


#: dtypes the Triton kernels take (they compute in float32; float64 takes the torch fallback)
_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton_ok(*tensors: torch.Tensor) -> bool:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return _kernels() is not None and all(t.is_cuda or interpret for t in tensors)


def use_swiglu(x: torch.Tensor) -> bool:
    """Whether :class:`~arvid.generator.gpt.SwiGLU` should call :func:`swiglu` for input ``x``: in
    training (gradients on), on CUDA with Triton. On the CPU inductor's own fused code is as good,
    and an opaque op would only stop its fusions; without gradients (sampling's decode step, whose
    timings were taken with inductor's code) the op's forward is no faster (8.9 against 8.6 ms a
    GPT-L step, H100, 2026-12-07)."""
    return SWIGLU and x.is_cuda and HAVE_TRITON and torch.is_grad_enabled()


# --------------------------------------------------------------------------- RoPE


def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation in torch, in float32, returned in ``x``'s dtype: with halves
    ``x = [x1, x2]``, ``c = [cos, cos]`` and ``s = [-sin, sin]`` (:func:`~arvid.generator.gpt.rope_tables`),
    ``[x1 cos - x2 sin, x2 cos + x1 sin]`` computed as ``x c + roll(x, D/2) s``."""
    d = x.shape[-1]
    xf = x.float()
    return (xf * c + xf.roll(d // 2, dims=-1) * s).to(x.dtype)


def rope(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None,
         inverse: bool = False) -> torch.Tensor:
    """Rotate the heads of ``x [N, G, D]`` (unit stride in ``D``, heads ``D`` apart, any token
    stride) by the tables ``c, s`` (``[N, 1, D]`` float32) into ``out`` (same shape; a new
    contiguous tensor when None; ``x`` itself for in place). ``inverse``: rotate by ``-theta``
    (RoPE's backward: the rotation is orthogonal). Returns ``out``."""
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rope_pairs((x,), (out,), c, s, inverse=inverse)
    return out


def rope_pairs(xs: tuple[torch.Tensor, ...], outs: tuple[torch.Tensor, ...], c: torch.Tensor, s: torch.Tensor,
               inverse: bool = False, copied: int = 0) -> None:
    """Each ``xs[i]`` (``[N, G_i, D]``, as :func:`rope` takes them; 1 to 3 of them) into ``outs[i]``
    (same shape), rotated by the tables ``c, s``, except the last ``copied`` pairs, which are copied
    as they are: one kernel launch where Triton takes them all (the cudnn_fe backend's q and k in
    the forward; dq, dk rotated and dv copied into ``d[qkv]`` in the backward)."""
    if not 1 <= len(xs) == len(outs) <= 3 or not 0 <= copied < len(xs):
        raise ValueError(f"rope_pairs: 1 to 3 (x, out) pairs with fewer than all copied, got {len(xs)} inputs, "
                         f"{len(outs)} outputs and copied={copied}")
    for x, out in zip(xs, outs):
        if x.dim() != 3 or out.shape != x.shape or x.shape[0] != xs[0].shape[0] or x.shape[-1] != xs[0].shape[-1]:
            raise ValueError(f"rope_pairs: each pair [N, G, D] alike and with the same N and D, got {tuple(x.shape)} "
                             f"-> {tuple(out.shape)} (first input {tuple(xs[0].shape)})")
    n, _, d = xs[0].shape
    if c.shape != (n, 1, d) or s.shape != c.shape:
        raise ValueError(f"rope_pairs: the tables must be [N, 1, D] = {[n, 1, d]} for inputs [N, G, D], got "
                         f"{list(c.shape)} and {list(s.shape)}")
    tensors = (*xs, *outs)
    layout_ok = all(t.stride(-1) == 1 and t.stride(-2) == d for t in tensors)
    if (_triton_ok(*tensors, c, s) and layout_ok and d >= 4 and d & (d - 1) == 0 and c.is_contiguous()
            and s.is_contiguous() and c.dtype == s.dtype == torch.float32
            and all(t.dtype == xs[0].dtype for t in tensors) and xs[0].dtype in _KERNEL_DTYPES):
        _kernels().rope(xs, outs, c, s, inverse, len(xs) - copied)
        return
    for i, (x, out) in enumerate(zip(xs, outs)):
        out.copy_(x if i >= len(xs) - copied else rotate(x, c, -s if inverse else s))


# --------------------------------------------------------------------------- SwiGLU


def _compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _swiglu_torch(a: torch.Tensor) -> torch.Tensor:
    g, u = _compute(a).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(a.dtype)


@torch.library.custom_op("arvid::swiglu_fwd", mutates_args=())
def _swiglu_fwd(a: torch.Tensor) -> torch.Tensor:
    a = a.contiguous()
    if _triton_ok(a) and a.dtype in _KERNEL_DTYPES:
        h = a.new_empty((*a.shape[:-1], a.shape[-1] // 2))
        _kernels().swiglu_fwd(a.view(-1, a.shape[-1]), h.view(-1, h.shape[-1]))
        return h
    return _swiglu_torch(a)


@_swiglu_fwd.register_fake
def _(a):
    return a.new_empty((*a.shape[:-1], a.shape[-1] // 2))


@torch.library.custom_op("arvid::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dh: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    a, dh = a.contiguous(), dh.contiguous()
    if _triton_ok(a) and a.dtype == dh.dtype and a.dtype in _KERNEL_DTYPES:
        da = torch.empty_like(a)
        _kernels().swiglu_bwd(dh.view(-1, dh.shape[-1]), a.view(-1, a.shape[-1]), da.view(-1, a.shape[-1]))
        return da
    g, u = _compute(a).chunk(2, dim=-1)
    sig = torch.sigmoid(g)
    dhf = _compute(dh)
    return torch.cat([dhf * u * sig * (1 + g * (1 - sig)), dhf * g * sig], dim=-1).to(a.dtype)


@_swiglu_bwd.register_fake
def _(dh, a):
    return a.new_empty(a.shape)  # contiguous, as the op's result


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, dh):
    (a,) = ctx.saved_tensors
    return _swiglu_bwd(dh, a)


_swiglu_fwd.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(a: torch.Tensor) -> torch.Tensor:
    """``a = [gate, up]`` (``[..., 2 * hidden]``) -> ``silu(gate) * up`` (``[..., hidden]``), in
    float32, returned in ``a``'s dtype; the backward writes ``d[gate, up]`` in one pass."""
    if a.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension ({a.shape[-1]}) must hold gate and up halves (even)")
    return _swiglu_fwd(a)
