"""The Triton kernels behind :mod:`arvid.generator.decode_kernels`: a GPT decode step (a few rows,
one new token each) as one kernel per layer and one for the output head.

At batch 1 (two rows with guidance) every matmul of a decode step is a matrix-vector product:
bound by reading the weights once, and, at ~2-17 MB a matrix, by how fast each piece of work gets
going. :func:`_layer_kernel` runs a whole transformer block in five phases, each folding
everything between two weight reads into the phase that reads them:

0. RMSNorm of the residual, the q/k/v projection, optional QK-norm, RoPE, and the stores: q to a
   buffer, k and v into the layer's KV cache at the step's position;
1. split-KV decode attention over the filled cache positions (masked loads read nothing past the
   position), the splits merged by the last item of each (row, head) to finish;
2. the attention output projection, added to the residual stream in place;
3. RMSNorm, the gate/up projection and ``silu(gate) * up``;
4. the down projection, added to the residual stream in place.

A phase is a list of tiles (a few output columns of a matrix, or one chunk of one head's cache);
the kernel's programs take them in turn (``tile = program, program + programs, ...``), each
loading its next tile's weights before it computes on the current one. The phases run either

- **one launch per phase** (``FIRST == LAST``; ``decode_kernels.TILES["layer"] = 0``, the
  default): the kernel boundaries order the phases; or
- **in one launch** (``FIRST = 0, LAST = 4``; ``layer = 1``, CUDA only, not yet run on a GPU):
  ``programs`` (one per SM) stay resident and meet at a grid barrier between phases (an atomic
  counter in global memory), each program loading its first tile of the next phase before it
  waits there: a phase's weight reads overlap the previous phase's tail, and a layer costs one
  kernel boundary instead of five. Triton's CPU interpreter runs programs one after another, so
  there a barrier is met only with one program (tests).

Under programmatic dependent launch (``PDL``, sm_90+) a kernel's programs start while the previous
kernel runs and read what does not depend on it (their first weight tiles) before waiting for it.
Reads of values written earlier in the same launch bypass the L1 cache (``.cg``: another SM wrote
them). A barrier that has not filled after ``SPIN_LIMIT`` polls (programs that could not all be
resident: another process on the GPU) sets an error flag instead of hanging
(:func:`~arvid.generator.decode_kernels.barrier_errors`).

Every product sums in float32; a program computes its rows' RMSNorm scales once a phase, before
its tiles; the normalised inputs and the projections' outputs are rounded to the activation dtype
where the torch step rounds them, so the two agree to the summation order.
``TRITON_INTERPRET=1`` runs the kernels on the CPU (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # programmatic dependent launch (sm_90+; Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: launched without PDL (decode_kernels.PDL)
    gdc_launch_dependents = gdc_wait = None

#: polls of a grid barrier's counter (each ~1 us, an L2 round trip) before it gives up and flags
#: (~0.25 s: a barrier of resident programs fills within tens of microseconds)
SPIN_LIMIT = 1 << 18


@triton.jit
def _start(PDL: tl.constexpr):
    """A kernel's first act under programmatic dependent launch: let the next kernel launch (its
    programs start, read what does not depend on this kernel, and wait for it to finish before
    reading its results)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _wait(PDL: tl.constexpr):
    """Wait for the previous kernel to finish (its writes visible) before reading what it wrote."""
    if PDL:
        gdc_wait()


@triton.jit
def _grid_sync(sync_ptr, target, SPIN: tl.constexpr):
    """Grid barrier: count this program in (``*sync_ptr += 1``, releasing its writes) and wait until
    ``target`` programs have (acquiring theirs). ``sync_ptr[1]`` is set where ``SPIN`` polls pass
    first (the barrier's programs were not all resident)."""
    tl.debug_barrier()  # every thread's stores before the one thread's release
    seen = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") + 1
    spins = 0
    while (seen < target) & (spins < SPIN):
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    if seen < target:
        tl.atomic_max(sync_ptr + 1, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _weights(w_ptr, c1, c2, cmask, k0, K, PAIR: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` tiles of ``W [N, K]`` at rows ``c1`` (and ``c2``), columns ``k0 ...``."""
    ks = k0 + tl.arange(0, BLOCK_K)
    wm = cmask[:, None] & (ks < K)[None, :]
    w1 = tl.load(w_ptr + c1[:, None].to(tl.int64) * K + ks[None, :], mask=wm, other=0.0)
    w2 = w1
    if PAIR:
        w2 = tl.load(w_ptr + c2[:, None].to(tl.int64) * K + ks[None, :], mask=wm, other=0.0)
    return w1, w2


@triton.jit
def _rstd(x_ptr, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` of the rows of ``x [M, K]`` (float32, ``[BLOCK_M]``): a program's
    once per phase, before its tiles (``x`` bypasses L1: written by other SMs in this launch)."""
    rows = tl.arange(0, BLOCK_M)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks < K)[None, :],
                    other=0.0, cache_modifier=".cg").to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _dot(x_ptr, g_ptr, w_ptr, M, K, rstd, c1, c2, cmask, w1, w2,
         NORM: tl.constexpr, PAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr):
    """``x W^T`` (``x [M, K]``, ``W [N, K]``, contiguous) at output columns ``c1`` (and ``c2`` where
    ``PAIR``), ``[BLOCK_M, BLOCK_N]`` each, float32; ``w1``, ``w2``: the weight tiles at reduction
    block 0, already loaded. ``NORM``: ``x`` is first RMS-normalised (``rstd`` from :func:`_rstd`)
    with the gain ``g`` and rounded to ``x``'s dtype, as ``RMSNorm`` hands it on. Each block loads
    the next block's weight tiles before its sums; ``x`` bypasses L1 (``.cg``: written by other SMs
    in this launch)."""
    rows = tl.arange(0, BLOCK_M)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & km[None, :],
                    other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            g = tl.load(g_ptr + ks, mask=km, other=0.0).to(tl.float32)
            x = (x * rstd[:, None] * g[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        n1, n2 = _weights(w_ptr, c1, c2, cmask, k0 + BLOCK_K, K, PAIR, BLOCK_K)
        acc1 += tl.sum(x[:, None, :] * w1.to(tl.float32)[None, :, :], axis=2)
        if PAIR:
            acc2 += tl.sum(x[:, None, :] * w2.to(tl.float32)[None, :, :], axis=2)
        w1, w2 = n1, n2
    return acc1, acc2


# --------------------------------------------------------------------------- phase 0: q/k/v


@triton.jit
def _qkv_cols(t, HALF: tl.constexpr, BLOCK_P: tl.constexpr):
    """Phase 0's tile ``t``: its head of the fused ``[q heads, k heads, v heads]`` projection, its
    ``BLOCK_P`` rotation pairs ``j`` (columns ``j`` and ``j + HALF`` of the head) and the first
    columns' rows of the weight, ``c1``."""
    per_head = tl.cdiv(HALF, BLOCK_P)
    head = t // per_head
    j = (t % per_head) * BLOCK_P + tl.arange(0, BLOCK_P)
    return head, j, head * (2 * HALF) + j


@triton.jit
def _qkv_weights(w_ptr, t, n_tiles, K, HALF: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile ``t``'s first weight tiles (nothing past ``n_tiles``)."""
    _, j, c1 = _qkv_cols(t, HALF, BLOCK_P)
    # `!= 0`: Triton's CPU interpreter turns a tensor mask & a scalar flag into integers
    return _weights(w_ptr, c1, c1 + HALF, ((j < HALF) & (t < n_tiles)) != 0, 0, K, True, BLOCK_K)


@triton.jit
def _qkv_tile(t, w1, w2, rstd, x_ptr, g_ptr, w_ptr, q_ptr, k_ptr, v_ptr, f_ptr, pos, qn_ptr, kn_ptr,
              M, K, eps, H, HKV, kv_b, kv_h,
              HALF: tl.constexpr, QK_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Tile ``t`` of phase 0 (its weight tiles ``w1``, ``w2`` loaded; ``rstd`` the rows' RMSNorm
    scales): the projection's ``BLOCK_P`` pairs of one head for every row; q goes to ``q [M, H, 2 HALF]``, k and v to the cache
    (``[M, HKV, max_len, 2 HALF]``, strides ``kv_b``, ``kv_h``) at position ``pos``. ``f_ptr``:
    RoPE's ``HALF`` inverse frequencies (float32); the angles ``pos * f`` and their cosines and sines
    are computed here as :func:`~arvid.generator.gpt.rope_tables` computes them. ``QK_NORM`` needs
    ``BLOCK_P >= HALF`` (a tile holds its whole head)."""
    D: tl.constexpr = 2 * HALF
    head, j, c1 = _qkv_cols(t, HALF, BLOCK_P)
    jm = j < HALF
    rows = tl.arange(0, BLOCK_M)
    a1, a2 = _dot(x_ptr, g_ptr, w_ptr, M, K, rstd, c1, c1 + HALF, jm, w1, w2, True, True,
                  BLOCK_M, BLOCK_P, BLOCK_K)
    dt = q_ptr.dtype.element_ty
    a1 = a1.to(dt).to(tl.float32)  # the projection's output, in the activation dtype
    a2 = a2.to(dt).to(tl.float32)
    is_q = head < H
    is_v = head >= H + HKV
    if QK_NORM:
        inv = 1.0 / tl.sqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / D + eps)
        g1 = tl.where(is_q, tl.load(qn_ptr + j, mask=jm, other=0.0), tl.load(kn_ptr + j, mask=jm, other=0.0))
        g2 = tl.where(is_q, tl.load(qn_ptr + HALF + j, mask=jm, other=0.0),
                      tl.load(kn_ptr + HALF + j, mask=jm, other=0.0))
        n1 = (a1 * inv[:, None] * g1.to(tl.float32)[None, :]).to(dt).to(tl.float32)
        n2 = (a2 * inv[:, None] * g2.to(tl.float32)[None, :]).to(dt).to(tl.float32)
        a1 = tl.where(is_v, a1, n1)
        a2 = tl.where(is_v, a2, n2)
    ang = pos.to(tl.float32) * tl.load(f_ptr + j, mask=jm, other=0.0)
    cos = tl.cos(ang)[None, :]
    sin = tl.sin(ang)[None, :]
    r1 = tl.where(is_v, a1, a1 * cos - a2 * sin)
    r2 = tl.where(is_v, a2, a2 * cos + a1 * sin)
    m = (rows[:, None] < M) & jm[None, :]
    # `!= 0`: Triton's CPU interpreter turns a tensor mask & a scalar flag into integers
    mq = (m & is_q) != 0
    mk = (m & (head >= H) & (head < H + HKV)) != 0
    mv = (m & is_v) != 0
    qp = q_ptr + rows[:, None] * (H * D) + head * D + j[None, :]
    tl.store(qp, r1.to(dt), mask=mq)
    tl.store(qp + HALF, r2.to(dt), mask=mq)
    kvh = tl.where(is_v, head - H - HKV, head - H)
    off = rows[:, None].to(tl.int64) * kv_b + kvh * kv_h + pos * D + j[None, :]
    tl.store(k_ptr + off, r1.to(dt).to(k_ptr.dtype.element_ty), mask=mk)
    tl.store(k_ptr + off + HALF, r2.to(dt).to(k_ptr.dtype.element_ty), mask=mk)
    tl.store(v_ptr + off, r1.to(dt).to(v_ptr.dtype.element_ty), mask=mv)
    tl.store(v_ptr + off + HALF, r2.to(dt).to(v_ptr.dtype.element_ty), mask=mv)


# --------------------------------------------------------------------------- phase 1: attention


@triton.jit
def _attn_place(t, H, GROUP, S, kv_b, kv_h, CHUNK: tl.constexpr):
    """Phase 1's item ``t = (row * H + head) * S + s``: ``(row * H + head, s)``, its cache positions
    ``s * CHUNK ...`` and the offset of its KV head's cache rows."""
    mh = t // S
    s = t % S
    kvh = (mh % H) // GROUP
    return mh, s, s * CHUNK + tl.arange(0, CHUNK), (mh // H).to(tl.int64) * kv_b + kvh * kv_h


@triton.jit
def _attn_earlier(k_ptr, v_ptr, pos, t, n_items, n, H, GROUP, S, kv_b, kv_h,
                  D: tl.constexpr, CHUNK: tl.constexpr):
    """Item ``t``'s keys and values at the positions before ``pos`` (written by earlier steps, so
    readable before this step's phase 0 is done)."""
    _, _, p, base = _attn_place(t, H, GROUP, S, kv_b, kv_h, CHUNK)
    d = tl.arange(0, D)
    earlier = ((p < n) & (p < pos) & (t < n_items)) != 0  # `!= 0`: as in _qkv_weights
    kk = tl.load(k_ptr + base + p[:, None] * D + d[None, :], mask=earlier[:, None], other=0.0)
    vv = tl.load(v_ptr + base + p[:, None] * D + d[None, :], mask=earlier[:, None], other=0.0)
    return kk, vv


@triton.jit
def _attn_item(t, kk, vv, q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr, pos,
               n, scale, H, GROUP, kv_b, kv_h, S,
               D: tl.constexpr, CHUNK: tl.constexpr, MAX_S: tl.constexpr):
    """Item ``t`` of phase 1 (:func:`_attn_place`; its earlier keys and values ``kk``, ``vv`` loaded): the query ``q [M, H, D]`` against cache positions ``s * CHUNK ...`` that are below
    ``n`` and at most ``pos`` (the rest are never read), giving a partial output, its running max
    and its sum; the last of the ``S`` items of a (row, head) to finish (an atomic count, reset by
    it) merges the ``S`` partials into ``o [M, H * D]``."""
    mh, s, p, base = _attn_place(t, H, GROUP, S, kv_b, kv_h, CHUNK)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + mh * D + d, cache_modifier=".cg").to(tl.float32)
    here = (p == pos) & (p < n)
    # `!= 0`: Triton's CPU interpreter turns a tensor mask & a scalar flag into integers
    pm = ((d < D) & (pos >= s * CHUNK) & (pos < s * CHUNK + CHUNK) & (pos < n)) != 0
    kp = tl.load(k_ptr + base + pos * D + d, mask=pm, other=0.0, cache_modifier=".cg")
    vp = tl.load(v_ptr + base + pos * D + d, mask=pm, other=0.0, cache_modifier=".cg")
    kk = tl.where(here[:, None], kp[None, :], kk).to(tl.float32)
    vv = tl.where(here[:, None], vp[None, :], vv).to(tl.float32)
    valid = ((p < n) & (p < pos)) | here
    sc = tl.where(valid, tl.sum(kk * q[None, :], axis=1) * scale, float("-inf"))
    mx = tl.max(sc, axis=0)
    e = tl.exp(sc - tl.where(mx == float("-inf"), 0.0, mx))  # a chunk past pos: all zeros
    tl.store(po_ptr + (mh * MAX_S + s) * D + d, tl.sum(e[:, None] * vv, axis=0))
    tl.store(pm_ptr + mh * MAX_S + s, mx)
    tl.store(pl_ptr + mh * MAX_S + s, tl.sum(e, axis=0))
    # every thread's stores above, then the count (acq_rel: released to the last item); the
    # barrier orders the other threads' stores before the one thread that does the atomic
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + mh, 1, sem="acq_rel", scope="gpu")
    if done == S - 1:
        ss = tl.arange(0, MAX_S)
        sm = ss < S
        ms = tl.load(pm_ptr + mh * MAX_S + ss, mask=sm, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(pl_ptr + mh * MAX_S + ss, mask=sm, other=0.0, cache_modifier=".cg")
        os = tl.load(po_ptr + (mh * MAX_S + ss)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0,
                     cache_modifier=".cg")
        w = tl.exp(ms - tl.max(ms, axis=0))  # chunk 0 always holds position 0: the max is finite
        out = tl.sum(w[:, None] * os, axis=0) / tl.sum(w * ls, axis=0)
        tl.store(o_ptr + mh * D + d, out.to(o_ptr.dtype.element_ty))
        tl.store(cnt_ptr + mh, 0)


# --------------------------------------------------------------------------- phases 2-4 and the head


@triton.jit
def _cols_weights(w_ptr, t, N, K, c2_off, PAIR: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tile ``t``'s first weight tiles: rows ``t * BLOCK_N ...`` of ``W`` (and those ``c2_off`` on)."""
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    return _weights(w_ptr, cols, cols + c2_off, cols < N, 0, K, PAIR, BLOCK_K)


@triton.jit
def _matvec_tile(t, w1, rstd, x_ptr, g_ptr, w_ptr, res_ptr, out_ptr, M, K, N,
                 NORM: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Columns ``t * BLOCK_N ...`` of ``out [M, N] = residual + x W^T`` (``RESIDUAL``; the product
    rounded to ``out``'s dtype before the add, as ``x + proj(a)`` rounds) or of ``RMSNorm(x) W^T``
    (``NORM``). ``out`` may be ``res``: a tile reads its own columns only."""
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    rows = tl.arange(0, BLOCK_M)
    m = (rows[:, None] < M) & cm[None, :]
    off = rows[:, None] * N + cols[None, :]
    r = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if RESIDUAL:  # issued with the product's first loads, not after its sums
        r = tl.load(res_ptr + off, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
    acc, _ = _dot(x_ptr, g_ptr, w_ptr, M, K, rstd, cols, cols, cm, w1, w1, NORM, False, BLOCK_M, BLOCK_N, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    y = acc.to(dt)
    if RESIDUAL:
        y = (r + y.to(tl.float32)).to(dt)
    tl.store(out_ptr + off, y, mask=m)


@triton.jit
def _swiglu_tile(t, w1, w2, rstd, x_ptr, g_ptr, w_ptr, h_ptr, M, K, hidden,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns ``t * BLOCK_N ...`` of ``h [M, hidden] = silu(gate) * up`` with ``[gate, up] =
    RMSNorm(x) W^T`` (``W [2 hidden, K]``): gate column ``c`` and up column ``c + hidden`` in one
    tile. ``silu(gate)`` is rounded before the product, as torch's ``F.silu(gate) * up`` on the
    activation dtype rounds it."""
    cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < hidden
    rows = tl.arange(0, BLOCK_M)
    a, b = _dot(x_ptr, g_ptr, w_ptr, M, K, rstd, cols, cols + hidden, cm, w1, w2, True, True,
                BLOCK_M, BLOCK_N, BLOCK_K)
    dt = h_ptr.dtype.element_ty
    gate = a.to(dt).to(tl.float32)
    up = b.to(dt).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
    m = (rows[:, None] < M) & cm[None, :]
    tl.store(h_ptr + rows[:, None] * hidden + cols[None, :], (act * up).to(dt), mask=m)


@triton.jit
def _head_kernel(x_ptr, g_ptr, w_ptr, out_ptr, M, K, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """The output head, ``out [M, N] = RMSNorm(x) W^T``: one :func:`_matvec_tile` a program."""
    _start(PDL)
    t = tl.program_id(0)
    w1, _ = _cols_weights(w_ptr, t, N, K, 0, False, BLOCK_N, BLOCK_K)
    _wait(PDL)
    rstd = _rstd(x_ptr, M, K, eps, BLOCK_M, BLOCK_K)
    _matvec_tile(t, w1, rstd, x_ptr, g_ptr, w_ptr, out_ptr, out_ptr, M, K, N, True, False, BLOCK_M, BLOCK_N, BLOCK_K)


# --------------------------------------------------------------------------- a layer


@triton.jit
def _layer_kernel(x_ptr, an_ptr, wqkv_ptr, q_ptr, k_ptr, v_ptr, f_ptr, pos_ptr, qn_ptr, kn_ptr,
                  po_ptr, pm_ptr, pl_ptr, cnt_ptr, o_ptr, wo_ptr, fn_ptr, w13_ptr, h_ptr, w2_ptr, sync_ptr,
                  M, DIM, HIDDEN, eps, H, HKV, GROUP, kv_b, kv_h, n, scale, S,
                  HALF: tl.constexpr, QK_NORM: tl.constexpr, CHUNK: tl.constexpr, MAX_S: tl.constexpr,
                  BLOCK_M: tl.constexpr, QKV_P: tl.constexpr, QKV_K: tl.constexpr, O_N: tl.constexpr,
                  O_K: tl.constexpr, UP_N: tl.constexpr, UP_K: tl.constexpr, DOWN_N: tl.constexpr,
                  DOWN_K: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, NEXT: tl.constexpr,
                  PDL: tl.constexpr, SPIN: tl.constexpr):
    """Phases ``FIRST ... LAST`` of one transformer block's decode step (module docstring): ``x
    [M, DIM]`` is the residual stream (updated in place), ``an``/``fn`` the two RMSNorm gains,
    ``wqkv``/``wo``/``w13``/``w2`` the block's weights, ``q``/``o``/``h`` scratch buffers,
    ``po``/``pm``/``pl``/``cnt`` the attention's split partials and merge counters, ``sync`` the
    grid barrier's counter and error flag (several phases in one launch: every program of the
    launch must be resident at once). ``NEXT``: a program may have several tiles of a phase and
    loads the next one's weights before computing on the current one (otherwise: one tile each)."""
    D: tl.constexpr = 2 * HALF
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    _start(PDL)
    pos = tl.load(pos_ptr)
    n_qkv = (H + 2 * HKV) * tl.cdiv(HALF, QKV_P)
    n_attn = M * H * S
    n_o = tl.cdiv(DIM, O_N)
    n_up = tl.cdiv(HIDDEN, UP_N)
    n_down = tl.cdiv(DIM, DOWN_N)
    none = tl.zeros([BLOCK_M], dtype=tl.float32)  # the RMSNorm scales of the phases without a norm
    if FIRST == 0:
        w1, w2 = _qkv_weights(wqkv_ptr, pid, n_qkv, DIM, HALF, QKV_P, QKV_K)
        _wait(PDL)
        rstd = _rstd(x_ptr, M, DIM, eps, BLOCK_M, QKV_K)
        for t in range(pid, n_qkv, progs):
            _qkv_tile(t, w1, w2, rstd, x_ptr, an_ptr, wqkv_ptr, q_ptr, k_ptr, v_ptr, f_ptr, pos, qn_ptr, kn_ptr,
                      M, DIM, eps, H, HKV, kv_b, kv_h, HALF, QK_NORM, BLOCK_M, QKV_P, QKV_K)
            if NEXT:
                w1, w2 = _qkv_weights(wqkv_ptr, t + progs, n_qkv, DIM, HALF, QKV_P, QKV_K)
    if FIRST <= 1 and LAST >= 1:
        kk, vv = _attn_earlier(k_ptr, v_ptr, pos, pid, n_attn, n, H, GROUP, S, kv_b, kv_h, D, CHUNK)
        if FIRST == 1:
            _wait(PDL)
        else:
            _grid_sync(sync_ptr, progs, SPIN)
        for t in range(pid, n_attn, progs):
            _attn_item(t, kk, vv, q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr, pos,
                       n, scale, H, GROUP, kv_b, kv_h, S, D, CHUNK, MAX_S)
            if NEXT:
                kk, vv = _attn_earlier(k_ptr, v_ptr, pos, t + progs, n_attn, n, H, GROUP, S, kv_b, kv_h, D, CHUNK)
    if FIRST <= 2 and LAST >= 2:
        w1, _ = _cols_weights(wo_ptr, pid, DIM, H * D, 0, False, O_N, O_K)
        if FIRST == 2:
            _wait(PDL)
        else:
            _grid_sync(sync_ptr, (2 - FIRST) * progs, SPIN)
        for t in range(pid, n_o, progs):
            _matvec_tile(t, w1, none, o_ptr, an_ptr, wo_ptr, x_ptr, x_ptr, M, H * D, DIM, False, True,
                         BLOCK_M, O_N, O_K)
            if NEXT:
                w1, _ = _cols_weights(wo_ptr, t + progs, DIM, H * D, 0, False, O_N, O_K)
    if FIRST <= 3 and LAST >= 3:
        w1, w2 = _cols_weights(w13_ptr, pid, HIDDEN, DIM, HIDDEN, True, UP_N, UP_K)
        if FIRST == 3:
            _wait(PDL)
        else:
            _grid_sync(sync_ptr, (3 - FIRST) * progs, SPIN)
        rstd = _rstd(x_ptr, M, DIM, eps, BLOCK_M, UP_K)
        for t in range(pid, n_up, progs):
            _swiglu_tile(t, w1, w2, rstd, x_ptr, fn_ptr, w13_ptr, h_ptr, M, DIM, HIDDEN, BLOCK_M, UP_N, UP_K)
            if NEXT:
                w1, w2 = _cols_weights(w13_ptr, t + progs, HIDDEN, DIM, HIDDEN, True, UP_N, UP_K)
    if LAST >= 4:
        w1, _ = _cols_weights(w2_ptr, pid, DIM, HIDDEN, 0, False, DOWN_N, DOWN_K)
        if FIRST == 4:
            _wait(PDL)
        else:
            _grid_sync(sync_ptr, (4 - FIRST) * progs, SPIN)
        for t in range(pid, n_down, progs):
            _matvec_tile(t, w1, none, h_ptr, an_ptr, w2_ptr, x_ptr, x_ptr, M, HIDDEN, DIM, False, True,
                         BLOCK_M, DOWN_N, DOWN_K)
            if NEXT:
                w1, _ = _cols_weights(w2_ptr, t + progs, DIM, HIDDEN, 0, False, DOWN_N, DOWN_K)
    if LAST > FIRST:  # the last program out resets the counter for the next launch
        tl.debug_barrier()
        out = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
        if out == (LAST - FIRST + 1) * progs - 1:
            tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")


def _pdl(tiles) -> dict:
    """The kernels' ``PDL`` flag and, where set, the launch option: programmatic dependent launch
    where the tiles ask for it."""
    return {"PDL": True, "launch_pdl": True} if tiles["pdl"] else {"PDL": False}


def phase_tiles(phase: int, rows: int, dim: int, hidden: int, heads: int, kv_heads: int, half: int,
                splits: int, tiles) -> int:
    """How many tiles phase ``phase`` has (a launch of that phase alone gets one program a tile)."""
    return [(heads + 2 * kv_heads) * triton.cdiv(half, tiles["qkv_p"]), rows * heads * splits,
            triton.cdiv(dim, tiles["o_n"]), triton.cdiv(hidden, tiles["up_n"]),
            triton.cdiv(dim, tiles["down_n"])][phase]


def layer(x, an, wqkv, q, kc, vc, f, pos, qn, kn, ws, o, wo, fn, w13, h, w2, eps, n, scale, splits, chunk,
          qk_norm, tiles, fused, programs):
    """One block's decode step: one launch of ``programs`` programs with grid barriers between the
    phases (``fused``: every program must be resident at once), or one launch per phase of one
    program a tile (``programs`` 0) or of at most ``programs`` programs that take the tiles in turn."""
    m, dim = x.shape
    heads, d = q.shape[1], q.shape[2]
    hkv, hidden = kc.shape[1], h.shape[1]
    args = (x, an, wqkv, q, kc, vc, f, pos, qn, kn, ws.partial_o, ws.partial_m, ws.partial_l, ws.counters, o, wo,
            fn, w13, h, w2, ws.sync, m, dim, hidden, eps, heads, hkv, heads // hkv, kc.stride(0), kc.stride(1), n,
            scale, splits)
    consts = dict(HALF=d // 2, QK_NORM=qk_norm, CHUNK=chunk, MAX_S=ws.max_splits, BLOCK_M=tiles["m"],
                  QKV_P=tiles["qkv_p"], QKV_K=tiles["qkv_k"], O_N=tiles["o_n"], O_K=tiles["o_k"], UP_N=tiles["up_n"],
                  UP_K=tiles["up_k"], DOWN_N=tiles["down_n"], DOWN_K=tiles["down_k"], SPIN=SPIN_LIMIT,
                  **_pdl(tiles))
    if fused:
        _layer_kernel[(programs,)](*args, FIRST=0, LAST=4, NEXT=True, num_warps=tiles["layer_warps"], **consts)
        return
    for phase in range(5):
        n_tiles = phase_tiles(phase, m, dim, hidden, heads, hkv, d // 2, splits, tiles)
        grid = (min(n_tiles, programs) if programs > 0 else n_tiles,)
        # a QK-normed head's whole [head_dim, k] tile in one program: 2 warps would spill registers
        warps = max(4, tiles["warps"]) if phase == 0 and qk_norm else tiles["warps"]
        _layer_kernel[grid](*args, FIRST=phase, LAST=phase, NEXT=grid[0] < n_tiles, num_warps=warps, **consts)


def head(x, g, w, out, eps, tiles):
    """``out = RMSNorm(x; g) W^T``."""
    m, k = x.shape
    n = w.shape[0]
    _head_kernel[(triton.cdiv(n, tiles["head_n"]),)](x, g, w, out, m, k, n, eps, BLOCK_M=tiles["m"],
                                                     BLOCK_N=tiles["head_n"], BLOCK_K=tiles["head_k"],
                                                     num_warps=tiles["warps"], **_pdl(tiles))
