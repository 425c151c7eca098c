"""The Triton kernels behind :mod:`arvid.generator.fused` (imported only where Triton is).

Each kernel is a single pass over its tensors at memory bandwidth; the arithmetic is in float32.
``TRITON_INTERPRET=1`` runs them on the CPU (the tests do where Triton is installed)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, y_ptr, c_ptr, s_ptr, n_rows, n_heads, x_row, y_row, t_row,
                 HALF: tl.constexpr, BLOCK: tl.constexpr, INVERSE: tl.constexpr):
    """``BLOCK`` tokens (one program), every head: ``y = [x1 cos - x2 sin, x2 cos + x1 sin]``
    (``sin`` negated for the inverse rotation). Row strides in elements; heads ``2 * HALF`` apart;
    ``cos`` is the first half of the ``c`` table's row, ``sin`` the second half of ``s``'s: read
    once per program for all its heads. ``y`` may be ``x`` (in place: each head's elements are
    read before they are written)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HALF)
    mask = rows[:, None] < n_rows
    r = rows[:, None].to(tl.int64)
    cos = tl.load(c_ptr + r * t_row + cols[None, :], mask=mask, other=0.0)
    sin = tl.load(s_ptr + r * t_row + HALF + cols[None, :], mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    xp = x_ptr + r * x_row + cols[None, :]
    yp = y_ptr + r * y_row + cols[None, :]
    for head in range(n_heads):
        x1 = tl.load(xp + head * (2 * HALF), mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + head * (2 * HALF) + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(yp + head * (2 * HALF), (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(yp + head * (2 * HALF) + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def rope(x, y, c, s, inverse: bool) -> None:
    """``x, y [N, G, D]`` (unit stride in ``D``, heads ``D`` apart, any token stride), ``c, s`` the
    float32 tables ``[N, 1, D]`` (contiguous)."""
    n, g, d = x.shape
    block = 16
    _rope_kernel[(triton.cdiv(n, block),)](x, y, c, s, n, g, x.stride(0), y.stride(0), c.stride(0),
                                           HALF=d // 2, BLOCK=block, INVERSE=inverse, num_warps=4)


@triton.jit
def _swiglu_fwd_kernel(a_ptr, h_ptr, hidden, BLOCK: tl.constexpr):
    """Row ``program_id(0)``, columns ``program_id(1) * BLOCK ...``: ``h = silu(gate) * up`` with
    ``a = [gate, up]`` (``[N, 2 * hidden]``, contiguous)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    ap = a_ptr + row * (2 * hidden) + cols
    g = tl.load(ap, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(ap + hidden, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + row * hidden + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, a_ptr, da_ptr, hidden, BLOCK: tl.constexpr):
    """``da = [dh * up * sig * (1 + gate * (1 - sig)), dh * silu(gate)]`` with ``sig = sigmoid(gate)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    ap = a_ptr + row * (2 * hidden) + cols
    g = tl.load(ap, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(ap + hidden, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    du = dh * g * sig
    dp = da_ptr + row * (2 * hidden) + cols
    tl.store(dp, dg.to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(dp + hidden, du.to(da_ptr.dtype.element_ty), mask=mask)


def _swiglu_grid(a, block: int):
    return (a.shape[0], triton.cdiv(a.shape[1] // 2, block))


def swiglu_fwd(a, h) -> None:
    block = 1024
    _swiglu_fwd_kernel[_swiglu_grid(a, block)](a, h, a.shape[1] // 2, BLOCK=block, num_warps=4)


def swiglu_bwd(dh, a, da) -> None:
    block = 1024
    _swiglu_bwd_kernel[_swiglu_grid(a, block)](dh, a, da, a.shape[1] // 2, BLOCK=block, num_warps=4)
