"""The Triton kernels behind :mod:`arvid.generator.fused` (imported only where Triton is).

Each kernel is a single pass over its tensors at memory bandwidth; the arithmetic is in float32.
``TRITON_INTERPRET=1`` runs them on the CPU (the tests do where Triton is installed)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _heads(xp, yp, n_heads, cos, sin, mask, HALF: tl.constexpr, ROTATE: tl.constexpr):
    """``n_heads`` heads (``2 * HALF`` apart) of ``BLOCK`` rows from ``xp`` to ``yp``: rotated by
    ``(cos, sin)``, or copied (``ROTATE`` false). Each head is read before it is written (``yp`` may
    be ``xp``)."""
    for head in range(n_heads):
        x1 = tl.load(xp + head * (2 * HALF), mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + head * (2 * HALF) + HALF, mask=mask, other=0.0).to(tl.float32)
        if ROTATE:
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
        else:
            y1 = x1
            y2 = x2
        tl.store(yp + head * (2 * HALF), y1.to(yp.dtype.element_ty), mask=mask)
        tl.store(yp + head * (2 * HALF) + HALF, y2.to(yp.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(x0_ptr, y0_ptr, x1_ptr, y1_ptr, x2_ptr, y2_ptr, c_ptr, s_ptr, n_rows, g0, g1, g2,
                 x0_row, y0_row, x1_row, y1_row, x2_row, y2_row, t_row,
                 HALF: tl.constexpr, BLOCK: tl.constexpr, INVERSE: tl.constexpr, PAIRS: tl.constexpr,
                 ROT0: tl.constexpr, ROT1: tl.constexpr, ROT2: tl.constexpr):
    """``BLOCK`` tokens (one program), every head of up to three ``(x, y)`` pairs (``PAIRS``): pair
    ``i`` rotated where ``ROTi``, ``y = [x1 cos - x2 sin, x2 cos + x1 sin]`` (``sin`` negated for
    the inverse rotation), else copied. Row strides in elements; pair ``i`` has ``g_i`` heads
    ``2 * HALF`` apart; ``cos`` is the first half of the ``c`` table's row, ``sin`` the second half of
    ``s``'s: read once per program for all heads."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HALF)
    mask = rows[:, None] < n_rows
    r = rows[:, None].to(tl.int64)
    cos = tl.load(c_ptr + r * t_row + cols[None, :], mask=mask, other=0.0)
    sin = tl.load(s_ptr + r * t_row + HALF + cols[None, :], mask=mask, other=0.0)
    if INVERSE:
        sin = -sin
    _heads(x0_ptr + r * x0_row + cols[None, :], y0_ptr + r * y0_row + cols[None, :], g0, cos, sin, mask,
           HALF, ROT0)
    if PAIRS > 1:
        _heads(x1_ptr + r * x1_row + cols[None, :], y1_ptr + r * y1_row + cols[None, :], g1, cos, sin, mask,
               HALF, ROT1)
    if PAIRS > 2:
        _heads(x2_ptr + r * x2_row + cols[None, :], y2_ptr + r * y2_row + cols[None, :], g2, cos, sin, mask,
               HALF, ROT2)


def rope(xs, ys, c, s, inverse: bool, rotated: int) -> None:
    """Pairs ``xs[i] -> ys[i]`` (1 to 3; each ``[N, G_i, D]``, unit stride in ``D``, heads ``D``
    apart, any token stride), the first ``rotated`` rotated and the rest copied, in one launch;
    ``c, s`` the float32 tables ``[N, 1, D]`` (contiguous)."""
    pairs = len(xs)
    n, _, d = xs[0].shape
    xs3, ys3 = [*xs, *xs[:1] * (3 - pairs)], [*ys, *ys[:1] * (3 - pairs)]  # unused slots: any tensor
    block = 16
    _rope_kernel[(triton.cdiv(n, block),)](
        xs3[0], ys3[0], xs3[1], ys3[1], xs3[2], ys3[2], c, s, n, *(t.shape[1] for t in xs3),
        *(v for x, y in zip(xs3, ys3) for v in (x.stride(0), y.stride(0))), c.stride(0),
        HALF=d // 2, BLOCK=block, INVERSE=inverse, PAIRS=pairs, ROT0=rotated > 0, ROT1=rotated > 1,
        ROT2=rotated > 2, num_warps=4)


@triton.jit
def _gate_up(a_ptr, hidden, BLOCK: tl.constexpr):
    """Row ``program_id(0)``, columns ``program_id(1) * BLOCK ...`` of ``a = [gate, up]``
    (``[N, 2 * hidden]``, contiguous): ``(row, cols, mask, gate, up)``, gate and up in float32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    ap = a_ptr + row * (2 * hidden) + cols
    g = tl.load(ap, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(ap + hidden, mask=mask, other=0.0).to(tl.float32)
    return row, cols, mask, g, u


@triton.jit
def _swiglu_fwd_kernel(a_ptr, h_ptr, hidden, BLOCK: tl.constexpr):
    """``h = silu(gate) * up`` (``h`` ``[N, hidden]``, contiguous)."""
    row, cols, mask, g, u = _gate_up(a_ptr, hidden, BLOCK)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + row * hidden + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, a_ptr, da_ptr, hidden, BLOCK: tl.constexpr):
    """``da = [dh * up * sig * (1 + gate * (1 - sig)), dh * silu(gate)]`` with ``sig = sigmoid(gate)``."""
    row, cols, mask, g, u = _gate_up(a_ptr, hidden, BLOCK)
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
