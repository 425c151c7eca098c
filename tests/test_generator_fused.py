"""arvid.generator.fused: the RoPE and SwiGLU kernels (torch fallback on the CPU; the Triton kernels
through Triton's interpreter where Triton is installed, and on a GPU), and the cudnn_fe ops that
rotate q and k inside cuDNN's graphs and write d[qkv] in one buffer."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import _cudnn_fe_standin
import pytest
import torch
from _attention_ref import reference, router_like_qkv

from arvid.generator import fused
from arvid.generator.gpt import rope_tables

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _tables(n: int, d: int, seed: int = 0):
    pos = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))
    c, s = rope_tables(pos, d, 10000.0)
    return pos, c.contiguous(), s.contiguous()


def _rotate_pairs(x: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """RoPE from its definition, float64: each pair (x_i, x_{i + D/2}) rotated by pos * theta_i."""
    d = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None, None] * theta  # [N, 1, D/2]
    if inverse:
        ang = -ang
    x1, x2 = x.double()[..., : d // 2], x.double()[..., d // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_rotates_pairs_out_of_place_and_in_place(inverse):
    """fused.rope on a strided view (q and k columns of a fused projection) matches the pairwise
    definition; in place it overwrites exactly the view (the v columns stay); the inverse undoes
    the forward."""
    n, h, hkv, d = 29, 4, 2, 16
    pos, c, s = _tables(n, d)
    qkv = torch.randn(n, h + 2 * hkv, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    view = qkv[:, :h + hkv]
    orig = view.clone()
    out = fused.rope(view, c.double(), s.double(), inverse=inverse)
    assert out.is_contiguous() and out.shape == view.shape
    # (the tables are float32: angles of positions up to 1,000 carry ~6e-5 of rounding)
    torch.testing.assert_close(out, _rotate_pairs(view, pos, inverse), atol=1e-3, rtol=0)
    before_v = qkv[:, h + hkv:].clone()
    expected = _rotate_pairs(view, pos, inverse)
    fused.rope(view, c.double(), s.double(), out=view, inverse=inverse)
    torch.testing.assert_close(qkv[:, :h + hkv], expected, atol=1e-3, rtol=0)
    assert torch.equal(qkv[:, h + hkv:], before_v)
    back = fused.rope(qkv[:, :h + hkv], c.double(), s.double(), inverse=not inverse)
    torch.testing.assert_close(back, orig)  # the inverse undoes the rotation


def test_swiglu_matches_autograd_of_the_definition():
    a = torch.randn(3, 11, 2 * 24, dtype=torch.float64, requires_grad=True)
    h = fused.swiglu(a)
    g, u = a.chunk(2, -1)
    ref = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(h, ref)
    w = torch.randn_like(h)
    (got,) = torch.autograd.grad((h * w).sum(), a)
    (want,) = torch.autograd.grad((ref * w).sum(), a)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"last dimension \(7\)"):
        fused.swiglu(torch.randn(2, 7))


def test_swiglu_is_used_only_on_cuda_and_can_be_turned_off(monkeypatch):
    assert not fused.use_swiglu(torch.zeros(2, 4))  # CPU: inductor's own code
    if torch.cuda.is_available() and HAS_TRITON:
        assert fused.use_swiglu(torch.zeros(2, 4, device="cuda"))
        with torch.no_grad():  # sampling keeps inductor's code
            assert not fused.use_swiglu(torch.zeros(2, 4, device="cuda"))
        monkeypatch.setattr(fused, "SWIGLU", False)
        assert not fused.use_swiglu(torch.zeros(2, 4, device="cuda"))


@pytest.mark.parametrize("copied", [0, 1])
def test_rope_pairs_rotates_each_pair_and_copies_the_last(copied):
    """rope_pairs on three pairs (columns of a fused projection into separate tensors, and back into
    the columns of one buffer) equals rope on each pair; the copied pair is copied exactly."""
    n, h, hkv, d = 23, 4, 2, 8
    pos, c, s = _tables(n, d, seed=3)
    src = torch.randn(n, h + 2 * hkv, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xs = (src[:, :h], src[:, h:h + hkv], src[:, h + hkv:])
    outs = tuple(torch.full(x.shape, float("nan"), dtype=torch.float64) for x in xs)
    fused.rope_pairs(xs, outs, c.double(), s.double(), inverse=True, copied=copied)
    for i, (x, out) in enumerate(zip(xs, outs)):
        if i >= 3 - copied:
            assert torch.equal(out, x)
        else:
            torch.testing.assert_close(out, _rotate_pairs(x, pos, inverse=True), atol=1e-3, rtol=0)
    back = torch.full_like(src, float("nan"))
    fused.rope_pairs(outs, (back[:, :h], back[:, h:h + hkv], back[:, h + hkv:]), c.double(), s.double(),
                     copied=copied)
    torch.testing.assert_close(back, src)


def test_rope_pairs_refuses_mismatched_pairs():
    n, d = 5, 8
    _, c, s = _tables(n, d)
    x = torch.randn(n, 2, d)
    with pytest.raises(ValueError, match="1 to 3"):
        fused.rope_pairs((x, x), (x,), c, s)
    with pytest.raises(ValueError, match="copied=1"):
        fused.rope_pairs((x,), (torch.empty_like(x),), c, s, copied=1)
    with pytest.raises(ValueError, match=r"\(5, 3, 8\)"):
        fused.rope_pairs((x,), (torch.empty(n, 3, d),), c, s)
    with pytest.raises(ValueError, match=r"tables must be \[N, 1, D\] = \[5, 1, 4\].*\[5, 1, 8\]"):
        fused.rope_pairs((x[..., :4],), (torch.empty(n, 2, 4),), c, s)  # tables of another head size
    with pytest.raises(ValueError, match=r"got \(5, 16\)"):
        fused.rope_pairs((x.view(n, 16),), (torch.empty(n, 16),), c, s)


_INTERPRETED = r"""
import torch
from arvid.generator import fused
from arvid.generator.gpt import rope_tables
assert fused._triton_ok(torch.zeros(1))
kernel_calls = []
real_rope = fused._kernels().rope
fused._kernels().rope = lambda xs, *a: kernel_calls.append(len(xs)) or real_rope(xs, *a)
for name in ("swiglu_fwd", "swiglu_bwd"):
    real = getattr(fused._kernels(), name)
    setattr(fused._kernels(), name, lambda *a, real=real, name=name: kernel_calls.append(name) or real(*a))
torch.manual_seed(0)
n, g, d = 45, 6, 32
pos = torch.randint(0, 4000, (n,))
c, s = (t.contiguous() for t in rope_tables(pos, d, 10000.0))
qkv = torch.randn(n, g + 2, d, dtype=torch.bfloat16)
view = qkv[:, :g]
for inverse in (False, True):
    want = fused.rotate(view.double(), c.double(), (-s if inverse else s).double())
    got = fused.rope(view, c, s, inverse=inverse)
    # the interpreter rounds float32 to bfloat16 by truncation: one bf16 ulp
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all(), inverse
    before = qkv[:, g:].clone()
    fused.rope(view, c, s, out=view, inverse=inverse)
    assert torch.equal(view, got) and torch.equal(qkv[:, g:], before)
# several pairs in one launch: q and k rotated out of a fused projection; dq, dk rotated and dv
# copied into the columns of one d[qkv]
q, k = torch.empty(n, g - 2, d, dtype=torch.bfloat16), torch.empty(n, 2, d, dtype=torch.bfloat16)
fused.rope_pairs((qkv[:, :g - 2], qkv[:, g - 2:g]), (q, k), c, s)
for x, y in ((qkv[:, :g - 2], q), (qkv[:, g - 2:g], k)):
    want = fused.rotate(x.double(), c.double(), s.double())
    assert ((y.double() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
dq, dk, dv = (torch.randn(n, m, d, dtype=torch.bfloat16) for m in (g - 2, 2, 2))
dqkv = torch.full((n, g + 2, d), float("nan"), dtype=torch.bfloat16)
fused.rope_pairs((dq, dk, dv), (dqkv[:, :g - 2], dqkv[:, g - 2:g], dqkv[:, g:]), c, s, inverse=True, copied=1)
for x, y in ((dq, dqkv[:, :g - 2]), (dk, dqkv[:, g - 2:g])):
    want = fused.rotate(x.double(), c.double(), -s.double())
    assert ((y.double() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
assert torch.equal(dqkv[:, g:], dv)
# every call above ran the kernel (1 pair x 4, then 2 and 3 pairs), none the torch fallback
assert kernel_calls == [1, 1, 1, 1, 2, 3], kernel_calls
a = torch.randn(9, 2 * 80, dtype=torch.bfloat16, requires_grad=True)
h = fused.swiglu(a)
af = a.detach().double().requires_grad_(True)
gate, up = af.chunk(2, -1)
ref = torch.nn.functional.silu(gate) * up
assert ((h.double() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()
dh = torch.randn(9, 80, dtype=torch.bfloat16)
(da,) = torch.autograd.grad(h, a, dh)
(want,) = torch.autograd.grad(ref, af, dh.double())
assert ((da.double() - want).abs() <= want.abs() * 2 ** -6 + 1e-3).all()
assert kernel_calls[-2:] == ["swiglu_fwd", "swiglu_bwd"], kernel_calls  # the kernels, not the fallback
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs the kernels on the CPU)")
def test_triton_kernels_under_the_interpreter():
    """The Triton kernels themselves, run by Triton's CPU interpreter (TRITON_INTERPRET=1, set
    before Triton is imported, hence a child process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.parametrize("dv_in_place", [False, True])
@pytest.mark.parametrize("lens,heads", [([7, 1, 13, 4], (4, 2)), ([33, 20], (2, 2))])
def test_cudnn_fe_rope_ops_give_the_rotated_attention_and_dqkv(monkeypatch, lens, heads, dv_in_place):
    """cudnn_fe_rope_attention on the CPU with the stand-in cuDNN frontend (it reads and writes
    only through the declared dims, strides and ragged offsets): the output is attention of the
    rotated q and k, and the one gradient, d[qkv], is the float64 reference's, so cuDNN reads the
    rotated q, k and the in-place v with the right token strides and offsets and the inverse
    rotation covers exactly the q and k columns. With DV_IN_PLACE cuDNN writes dv into d[qkv]'s v
    columns itself, through v's token stride and offsets."""
    from arvid.generator import cudnn_fe

    _cudnn_fe_standin.install(monkeypatch)
    monkeypatch.setattr(cudnn_fe, "DV_IN_PLACE", dv_in_place)
    h, hkv = heads
    n, d = sum(lens), 16
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    c, s = _tables(n, d, seed=3)[1:]
    qkv = torch.randn(n, h + 2 * hkv, d, generator=torch.Generator().manual_seed(1))
    w = torch.randn(n, h, d, generator=torch.Generator().manual_seed(2))

    x = qkv.clone().requires_grad_(True)
    out = cudnn_fe.cudnn_fe_rope_attention(x, (c, s), cu, max(lens), h)
    (grad,) = torch.autograd.grad((out * w).sum(), x)

    xr = qkv.double().requires_grad_(True)
    # rotated with the same (float32) tables: the rotation itself is checked above
    q, k = (fused.rotate(t, c.double(), s.double()) for t in (xr[:, :h], xr[:, h:h + hkv]))
    ref = reference(q, k, xr[:, h + hkv:], cu)
    (ref_grad,) = torch.autograd.grad((ref * w.double()).sum(), xr)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)
    # q and k contiguous (cuDNN writes dq, dk with their strides), v in place from the projection
    (bwd_key,) = [key for kind, key in cudnn_fe.BUILT if kind == "backward"]
    assert bwd_key[6:9] == (h * d, hkv * d, (h + 2 * hkv) * d)
    assert bwd_key[10] == ((h + 2 * hkv) * d if dv_in_place else hkv * d)  # dv's token stride


def test_cudnn_fe_backward_refuses_a_dv_out_it_cannot_write(monkeypatch):
    from arvid.generator import cudnn_fe

    _cudnn_fe_standin.install(monkeypatch)
    n, h, d = 6, 2, 8
    cu = torch.tensor([0, 6], dtype=torch.int32)
    q, k, v, o = (torch.randn(n, h, d) for _ in range(4))
    stats = torch.zeros(8, h, 512, 1)
    with pytest.raises(ValueError, match=r"dv_out must be \[6, 2, 8\].*got shape \(6, 8, 2\)"):
        cudnn_fe._backward(o, q, k, v, o, stats, cu, n, dv_out=torch.empty(n, h, d).transpose(1, 2))
    with pytest.raises(ValueError, match=r"got shape \(6, 2, 8\) strides \(16, 1, 2\)"):  # heads not adjacent
        cudnn_fe._backward(o, q, k, v, o, stats, cu, n, dv_out=torch.empty(n, d, h).transpose(1, 2))
    with pytest.raises(ValueError, match="torch.float64 on cpu"):
        cudnn_fe._backward(o, q, k, v, o, stats, cu, n, dv_out=torch.empty(n, h, d, dtype=torch.float64))


def test_cudnn_fe_rope_refuses_a_projection_that_does_not_split(monkeypatch):
    from arvid.generator import cudnn_fe

    _cudnn_fe_standin.install(monkeypatch)
    c, s = _tables(4, 16)[1:]
    with pytest.raises(ValueError, match="5 heads cannot hold 4 query heads"):
        cudnn_fe.cudnn_fe_rope_attention(torch.randn(4, 5, 16), (c, s), torch.tensor([0, 4], dtype=torch.int32), 4, 4)


def test_gpt_cudnn_fe_takes_the_rope_ops_unless_turned_off(monkeypatch):
    """A GPT layer on the cudnn_fe backend (stand-in frontend) gives the same output and gradients
    (input, fused projection weight) through the fused RoPE ops as through the plain route
    (fused.ROPE off), and calls them only when on."""
    from arvid.generator import cudnn_fe
    from arvid.generator.gpt import Attention, GPTConfig, rope_tables_saved

    _cudnn_fe_standin.install(monkeypatch)
    cfg = GPTConfig(vocab_size=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64)
    attn = Attention(cfg)
    lens = [9, 15, 2]
    n = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(L) for L in lens])
    rope = rope_tables_saved(pos, cfg.head_dim, cfg.rope_theta)
    x = torch.randn(n, 64)
    calls = []
    monkeypatch.setattr(fused, "ROPE", True)  # (ARVID_FUSED_ROPE=0 in the environment would turn it off)
    real = cudnn_fe.cudnn_fe_rope_attention
    monkeypatch.setattr(cudnn_fe, "cudnn_fe_rope_attention", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(n, 64)
    x_on = x.clone().requires_grad_(True)
    on = attn.forward_packed(x_on, rope, cu, max(lens), "cudnn_fe")
    grads_on = torch.autograd.grad((on * w).sum(), (x_on, attn.wqkv.weight))
    assert calls == [1]
    monkeypatch.setattr(fused, "ROPE", False)
    x_off = x.clone().requires_grad_(True)
    off = attn.forward_packed(x_off, rope, cu, max(lens), "cudnn_fe")
    grads_off = torch.autograd.grad((off * w).sum(), (x_off, attn.wqkv.weight))
    assert calls == [1]
    torch.testing.assert_close(on, off, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_on, grads_off):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_kernels_match_torch(monkeypatch):
    """On the GPU (Triton): fused.rope (in place on strided columns, both directions), rope_pairs
    and SwiGLU's forward and backward within bf16 rounding of the float64 definitions; every RoPE
    call ran the Triton kernel, not the torch fallback."""
    if not HAS_TRITON:
        pytest.skip("needs triton")
    kernel_calls, kernels = [], fused._kernels()
    real = {name: getattr(kernels, name) for name in ("rope", "swiglu_fwd", "swiglu_bwd")}
    monkeypatch.setattr(kernels, "rope", lambda xs, *a: kernel_calls.append(len(xs)) or real["rope"](xs, *a))
    for name in ("swiglu_fwd", "swiglu_bwd"):
        monkeypatch.setattr(kernels, name, lambda *a, name=name: kernel_calls.append(name) or real[name](*a))
    n, g, d = 20000, 24, 128
    pos, c, s = _tables(n, d)
    c, s = c.cuda(), s.cuda()
    qkv = torch.randn(n, g + 8, d, device="cuda", dtype=torch.bfloat16)
    view = qkv[:, :g]
    for inverse in (False, True):
        want = _rotate_pairs(view.cpu(), pos, inverse)
        got = fused.rope(view, c, s, inverse=inverse).cpu().double()
        assert (got - want).abs().max().item() <= 2 ** -7 * want.abs().max().item()
        before = qkv[:, g:].clone()
        fused.rope(view, c, s, out=view, inverse=inverse)
        assert torch.equal(view.cpu().double(), got) and torch.equal(qkv[:, g:], before)
    # three pairs in one launch (cudnn_fe's backward: dq, dk rotated, dv copied into d[qkv])
    dq, dk, dv = (torch.randn(n, m, d, device="cuda", dtype=torch.bfloat16) for m in (16, 8, 8))
    dqkv = torch.full((n, 32, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    fused.rope_pairs((dq, dk, dv), (dqkv[:, :16], dqkv[:, 16:24], dqkv[:, 24:]), c, s, inverse=True, copied=1)
    for x, y in ((dq, dqkv[:, :16]), (dk, dqkv[:, 16:24])):
        want = _rotate_pairs(x.cpu(), pos, inverse=True)
        assert (y.cpu().double() - want).abs().max().item() <= 2 ** -7 * want.abs().max().item()
    assert torch.equal(dqkv[:, 24:], dv)
    assert kernel_calls == [1, 1, 1, 1, 3]
    a = torch.randn(5000, 2 * 2816, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = fused.swiglu(a)
    af = a.detach().double().requires_grad_(True)
    gate, up = af.chunk(2, -1)
    ref = torch.nn.functional.silu(gate) * up
    assert (h.double() - ref).abs().max().item() <= 2 ** -7 * ref.abs().max().item()
    dh = torch.randn_like(h)
    (da,) = torch.autograd.grad(h, a, dh)
    (want,) = torch.autograd.grad(ref, af, dh.double())
    assert (da.double() - want).abs().max().item() <= 2 ** -6 * want.abs().max().item()
    assert kernel_calls[-2:] == ["swiglu_fwd", "swiglu_bwd"]  # the kernels ran, not the torch fallback


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dv_in_place", [False, True])
def test_gpu_cudnn_fe_rope_matches_the_plain_route(monkeypatch, dv_in_place):
    """cudnn_fe with RoPE inside its ops against rotating q and k first and calling cudnn_fe: the
    GPT's shapes (8 heads of 128), ~16k router-like tokens, bf16; output and d[qkv] within bf16
    rounding of each other; with cuDNN writing dv into d[qkv] itself (DV_IN_PLACE) too."""
    from arvid.generator import cudnn_fe
    from arvid.generator.attention import backend_unavailable_reason

    monkeypatch.setattr(cudnn_fe, "DV_IN_PLACE", dv_in_place)

    reason = backend_unavailable_reason("cudnn_fe", "cuda", torch.bfloat16)
    if reason is not None:
        pytest.skip(reason)
    h, d = 8, 128
    lens, cu, qkv, w = router_like_qkv(h, d)
    pos = torch.cat([torch.arange(L) for L in lens]).cuda()
    c, s = (t.contiguous() for t in rope_tables(pos, d, 10000.0))
    x = qkv.clone().requires_grad_(True)
    out = cudnn_fe.cudnn_fe_rope_attention(x, (c, s), cu, max(lens), h)
    (grad,) = torch.autograd.grad((out.float() * w).sum(), x)
    y = qkv.clone().requires_grad_(True)
    q, k = fused.rotate(y[:, :h], c, s), fused.rotate(y[:, h:2 * h], c, s)
    ref = cudnn_fe.cudnn_fe_attention(q, k, y[:, 2 * h:], cu, max(lens))
    (ref_grad,) = torch.autograd.grad((ref.float() * w).sum(), y)
    for a, b, what in ((out, ref, "out"), (grad, ref_grad, "dqkv")):
        err = (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()
        assert err < 2e-2, f"{what}: max error {err:.3g} relative to the largest value"


def test_cudnn_fe_backward_gets_q_and_k_contiguous(monkeypatch):
    """q and k as strided views of one buffer: the forward graph reads them in place, the backward
    graph gets contiguous copies (the layout cuDNN's backward handled on the H100; strided, it gave
    wrong gradients or read out of bounds), and the gradients are still the reference's."""
    from arvid.generator import cudnn_fe

    _cudnn_fe_standin.install(monkeypatch)
    lens, h, hkv, d = [9, 4, 12], 4, 2, 16
    n = sum(lens)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    buf = torch.randn(n, h + 2 * hkv, d, generator=torch.Generator().manual_seed(7), requires_grad=True)
    q, k, v = buf[:, :h], buf[:, h:h + hkv], buf[:, h + hkv:]
    out = cudnn_fe.cudnn_fe_attention(q, k, v, cu, max(lens))
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    (grad,) = torch.autograd.grad((out * w).sum(), buf)
    ref_buf = buf.detach().double().requires_grad_(True)
    ref = reference(ref_buf[:, :h], ref_buf[:, h:h + hkv], ref_buf[:, h + hkv:], cu)
    (ref_grad,) = torch.autograd.grad((ref * w.double()).sum(), ref_buf)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)
    keys = dict(cudnn_fe.BUILT)
    g = (h + 2 * hkv) * d
    assert keys["forward"][6:9] == (g, g, g)
    assert keys["backward"][6:9] == (h * d, hkv * d, g)
