"""The Triton kernels behind :mod:`arvid.generator.decode_kernels`: a GPT decode step (a few rows,
one new token each) as five kernels per layer.

At batch 1 (two rows with guidance) every matmul of a decode step is a matrix-vector product:
bound by reading the weights once, and, at ~2-17 MB a matrix, by how fast a kernel gets going.
The kernels here fold everything between two weight reads into the kernels that read them:

- :func:`_qkv_kernel`: RMSNorm of the residual (prologue), the q/k/v projection, optional QK-norm,
  RoPE, and the stores: q to a buffer, k and v into the layer's KV cache at the step's position;
- :func:`_attn_kernel`: split-KV decode attention over the filled cache positions (masked loads
  read nothing past the position), the splits merged by the last program of each (row, head);
- :func:`_matvec_kernel`: ``out = residual + a W^T`` (the attention output and MLP-down
  projections) or ``out = RMSNorm(x) W^T`` (the output head);
- :func:`_swiglu_kernel`: RMSNorm, the gate/up projection and ``silu(gate) * up``.

Every product sums in float32; intermediate values are rounded to the activation dtype where the
torch step rounds them (the projections' outputs, the normalised inputs), so the two agree to
the summation order. ``TRITON_INTERPRET=1`` runs the kernels on the CPU (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # programmatic dependent launch (sm_90+; Triton >= 3.4)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: launched without PDL (decode_kernels.PDL)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _rstd(x_ptr, rows, M, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``1 / sqrt(mean(x^2) + eps)`` of rows ``rows`` of ``x`` ``[M, K]`` (float32, ``[BLOCK_M]``)."""
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = (rows[:, None] < M) & (ks[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=m, other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(ss / K + eps)


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
def _project(x_ptr, g_ptr, w_ptr, rows, M, K, eps, c1, c2, cmask,
             NORM: tl.constexpr, PAIR: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A kernel's projection: ``x W^T`` (``x [M, K]``, ``W [N, K]``, contiguous) at output columns
    ``c1`` (and ``c2`` where ``PAIR``), ``[BLOCK_M, BLOCK_N]`` each, float32. ``NORM``: ``x`` is first
    RMS-normalised with the gain ``g`` and rounded to ``x``'s dtype, as ``RMSNorm`` hands it on.

    Starts the kernel: under ``PDL`` it lets the next kernel launch, reads its first weight tiles,
    and only then waits for the previous kernel (which wrote ``x``); each iteration loads the next
    tiles before its sums."""
    _start(PDL)
    w1, w2 = _weights(w_ptr, c1, c2, cmask, 0, K, PAIR, BLOCK_K)
    _wait(PDL)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM:
        rstd = _rstd(x_ptr, rows, M, K, eps, BLOCK_M, BLOCK_K)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & km[None, :],
                    other=0.0).to(tl.float32)
        if NORM:
            g = tl.load(g_ptr + ks, mask=km, other=0.0).to(tl.float32)
            x = (x * rstd[:, None] * g[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
        n1, n2 = _weights(w_ptr, c1, c2, cmask, k0 + BLOCK_K, K, PAIR, BLOCK_K)
        acc1 += tl.sum(x[:, None, :] * w1.to(tl.float32)[None, :, :], axis=2)
        if PAIR:
            acc2 += tl.sum(x[:, None, :] * w2.to(tl.float32)[None, :, :], axis=2)
        w1, w2 = n1, n2
    return acc1, acc2


@triton.jit
def _qkv_kernel(x_ptr, g_ptr, w_ptr, q_ptr, k_ptr, v_ptr, f_ptr, pos_ptr, qn_ptr, kn_ptr,
                M, K, eps, H, HKV, kv_b, kv_h,
                HALF: tl.constexpr, QK_NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One program: ``BLOCK_P`` rotation pairs (columns ``j`` and ``j + HALF``) of one head of the
    fused projection ``[q heads, k heads, v heads]``, for every row. q goes to ``q [M, H, 2 HALF]``,
    k and v to the cache (``[M, HKV, max_len, 2 HALF]``, strides ``kv_b``, ``kv_h``) at the position
    ``pos``. ``f_ptr``: RoPE's ``HALF`` inverse frequencies (float32): the angles ``pos * f`` and
    their cosines and sines are computed here, as :func:`~arvid.generator.gpt.rope_tables` computes
    them (in torch they were a handful of launches per step).
    ``QK_NORM`` needs ``BLOCK_P >= HALF`` (a program holds its whole head)."""
    D: tl.constexpr = 2 * HALF
    per_head = tl.cdiv(HALF, BLOCK_P)
    head = tl.program_id(0) // per_head
    j = (tl.program_id(0) % per_head) * BLOCK_P + tl.arange(0, BLOCK_P)
    jm = j < HALF
    rows = tl.arange(0, BLOCK_M)
    c1 = head * D + j
    a1, a2 = _project(x_ptr, g_ptr, w_ptr, rows, M, K, eps, c1, c1 + HALF, jm, True, True, PDL,
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
    pos = tl.load(pos_ptr)
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


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, pm_ptr, pl_ptr, cnt_ptr, pos_ptr,
                 n, scale, H, GROUP, kv_b, kv_h, S,
                 D: tl.constexpr, CHUNK: tl.constexpr, MAX_S: tl.constexpr, PDL: tl.constexpr):
    """Program ``(row * H + head, s)``: the query ``q [M, H, D]`` against cache positions
    ``s * CHUNK ...`` that are below ``n`` and at most ``pos`` (the rest are never read), giving a
    partial output, its running max and its sum; the last of the ``S`` programs of a (row, head) to
    finish (an atomic count, reset by it) merges the ``S`` partials into ``o [M, H * D]``.

    The positions before ``pos`` were written by earlier steps: they are read before waiting on
    the previous kernel (the q/k/v kernel, which writes q and position ``pos`` itself)."""
    _start(PDL)
    mh = tl.program_id(0)
    s = tl.program_id(1)
    row = mh // H
    kvh = (mh % H) // GROUP
    d = tl.arange(0, D)
    t = s * CHUNK + tl.arange(0, CHUNK)
    pos = tl.load(pos_ptr)
    base = row.to(tl.int64) * kv_b + kvh * kv_h
    earlier = (t < n) & (t < pos)
    kk = tl.load(k_ptr + base + t[:, None] * D + d[None, :], mask=earlier[:, None], other=0.0)
    vv = tl.load(v_ptr + base + t[:, None] * D + d[None, :], mask=earlier[:, None], other=0.0)
    _wait(PDL)
    q = tl.load(q_ptr + mh * D + d).to(tl.float32)
    here = (t == pos) & (t < n)
    # `!= 0`: Triton's CPU interpreter turns a tensor mask & a scalar flag into integers
    pm = ((d < D) & (pos >= s * CHUNK) & (pos < s * CHUNK + CHUNK) & (pos < n)) != 0
    kp = tl.load(k_ptr + base + pos * D + d, mask=pm, other=0.0)
    vp = tl.load(v_ptr + base + pos * D + d, mask=pm, other=0.0)
    kk = tl.where(here[:, None], kp[None, :], kk).to(tl.float32)
    vv = tl.where(here[:, None], vp[None, :], vv).to(tl.float32)
    valid = earlier | here
    sc = tl.where(valid, tl.sum(kk * q[None, :], axis=1) * scale, float("-inf"))
    mx = tl.max(sc, axis=0)
    p = tl.exp(sc - tl.where(mx == float("-inf"), 0.0, mx))  # a chunk past pos: all zeros
    tl.store(po_ptr + (mh * MAX_S + s) * D + d, tl.sum(p[:, None] * vv, axis=0))
    tl.store(pm_ptr + mh * MAX_S + s, mx)
    tl.store(pl_ptr + mh * MAX_S + s, tl.sum(p, axis=0))
    # every thread's stores above, then the count (acq_rel: released to the last program); the
    # barrier orders the other threads' stores before the one thread that does the atomic
    tl.debug_barrier()
    done = tl.atomic_add(cnt_ptr + mh, 1)
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


@triton.jit
def _matvec_kernel(x_ptr, g_ptr, w_ptr, res_ptr, out_ptr, M, K, N, eps,
                   NORM: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Columns ``program_id * BLOCK_N ...`` of ``out [M, N] = residual + x W^T`` (``RESIDUAL``; the
    product rounded to ``out``'s dtype before the add, as ``x + proj(a)`` rounds) or of
    ``RMSNorm(x) W^T`` (``NORM``). ``out`` may be ``res``: each program reads its columns first."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    rows = tl.arange(0, BLOCK_M)
    acc, _ = _project(x_ptr, g_ptr, w_ptr, rows, M, K, eps, cols, cols, cm, NORM, False, PDL,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    y = acc.to(dt)
    m = (rows[:, None] < M) & cm[None, :]
    off = rows[:, None] * N + cols[None, :]
    if RESIDUAL:
        r = tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
        y = (r + y.to(tl.float32)).to(dt)
    tl.store(out_ptr + off, y, mask=m)


@triton.jit
def _swiglu_kernel(x_ptr, g_ptr, w_ptr, h_ptr, M, K, hidden, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Columns ``program_id * BLOCK_N ...`` of ``h [M, hidden] = silu(gate) * up`` with
    ``[gate, up] = RMSNorm(x) W^T`` (``W [2 hidden, K]``): gate column ``c`` and up column
    ``c + hidden`` in one program. ``silu(gate)`` is rounded before the product, as torch's
    ``F.silu(gate) * up`` on the activation dtype rounds it."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < hidden
    rows = tl.arange(0, BLOCK_M)
    a, b = _project(x_ptr, g_ptr, w_ptr, rows, M, K, eps, cols, cols + hidden, cm, True, True, PDL,
                    BLOCK_M, BLOCK_N, BLOCK_K)
    dt = h_ptr.dtype.element_ty
    gate = a.to(dt).to(tl.float32)
    up = b.to(dt).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32)
    m = (rows[:, None] < M) & cm[None, :]
    tl.store(h_ptr + rows[:, None] * hidden + cols[None, :], (act * up).to(dt), mask=m)


def _pdl(tiles) -> dict:
    """The kernels' ``PDL`` flag and, where set, the launch option: programmatic dependent launch
    where the tiles ask for it."""
    return {"PDL": True, "launch_pdl": True} if tiles["pdl"] else {"PDL": False}


def qkv(x, g, w, q, kc, vc, f, pos, qn, kn, eps, n_heads, n_kv, qk_norm, tiles):
    m, k = x.shape
    half = q.shape[-1] // 2
    bp = half if qk_norm else tiles["qkv_p"]
    grid = ((n_heads + 2 * n_kv) * triton.cdiv(half, bp),)
    _qkv_kernel[grid](x, g, w, q, kc, vc, f, pos, qn, kn, m, k, eps, n_heads, n_kv, kc.stride(0), kc.stride(1),
                      HALF=half, QK_NORM=qk_norm, BLOCK_M=tiles["m"], BLOCK_P=bp, BLOCK_K=tiles["qkv_k"],
                      num_warps=tiles["warps"], **_pdl(tiles))


def attention(q, kc, vc, o, po, pm, pl, cnt, pos, n, scale, chunk, n_splits, max_s, tiles):
    m, h, d = q.shape
    _attn_kernel[(m * h, n_splits)](q, kc, vc, o, po, pm, pl, cnt, pos, n, scale, h, h // kc.shape[1],
                                    kc.stride(0), kc.stride(1), n_splits, D=d, CHUNK=chunk, MAX_S=max_s,
                                    num_warps=2, **_pdl(tiles))


def matvec(x, g, w, res, out, eps, norm, block_n, block_k, tiles):
    m, k = x.shape
    n = w.shape[0]
    _matvec_kernel[(triton.cdiv(n, block_n),)](x, w if g is None else g, w, out if res is None else res, out, m, k,
                                               n, eps, NORM=norm, RESIDUAL=res is not None, BLOCK_M=tiles["m"],
                                               BLOCK_N=block_n, BLOCK_K=block_k,
                                               num_warps=tiles["warps"], **_pdl(tiles))


def swiglu(x, g, w, h, eps, block_n, block_k, tiles):
    m, k = x.shape
    hidden = h.shape[1]
    _swiglu_kernel[(triton.cdiv(hidden, block_n),)](x, g, w, h, m, k, hidden, eps, BLOCK_M=tiles["m"],
                                                    BLOCK_N=block_n, BLOCK_K=block_k,
                                                    num_warps=tiles["warps"], **_pdl(tiles))
