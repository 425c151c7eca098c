"""The GPT decode step as Triton kernels (arvid.generator.decode_kernels) against the torch step:
the same logits and KV cache (float32: to the summation order; bf16: no further from a float64
step than the torch step is), cache positions past the step never read, the split-KV merge, the
sampler's ``compile="triton"`` mode giving the eager mode's greedy samples, and the cases it
refuses. On the CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 must be set
before Triton is imported: a child process); on a GPU (``-m gpu``) as compiled kernels, captured
in a CUDA graph."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from arvid.generator import decode_kernels
from arvid.generator.gpt import GPT, PRESETS, GPTConfig

HAS_TRITON = decode_kernels.HAVE_TRITON


def _l_shape(**overrides) -> SimpleNamespace:
    """The L preset's config as tiles_for reads it (``.config`` only: no 325M weights to build)."""
    return SimpleNamespace(config=GPTConfig(**{**PRESETS["L"], "vocab_size": 8197, "max_seq_len": 2052,
                                               "num_classes": 10, **overrides}))

_INTERPRETED = r"""
import torch
from arvid.data.types import BlockLayout
from arvid.generator import decode_kernels as dk
from arvid.generator.conditioning import Conditioning
from arvid.generator.gpt import GPT, GPTConfig
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.sampler import Sampler, SamplerConfig

# few, wide programs: the interpreter pays per program
dk.PROGRAMS = 1
dk.TILES.update(qkv_p=8, o_n=64, up_n=64, down_n=64, head_n=64)
dk.CHUNK = 4  # several splits per (row, head) at these short lengths: the merge runs
calls = []
real = dk._kernels().layer
dk._kernels().layer = lambda *a: calls.append(a[-6]) or real(*a)  # the split count


def run_steps(m, rows, steps, pre_len=5, kv_len=None, garbage=float("nan")):
    torch.manual_seed(1)
    cond = Conditioning(torch.arange(rows) % 3)
    pre = torch.randint(0, m.config.vocab_size, (rows, pre_len))
    ref_cache, cache = m.allocate_cache(rows, 40), m.allocate_cache(rows, 40)
    ref_cache.fill_(7.0)  # finite garbage: the torch step masks it
    cache.fill_(garbage)  # NaN: the kernels must never read past the position
    out = []
    with torch.no_grad():
        m.prefill(ref_cache, cond, pre)
        m.prefill(cache, cond, pre)
        for i in range(steps):
            tok = torch.randint(0, m.config.vocab_size, (rows,))
            pos = torch.tensor(pre_len + 1 + i)
            kern = dk.decode_step(m, cache, tok, pos, kv_len) if m.tok_emb.weight.dtype != torch.float64 else None
            out.append((m.decode_step(ref_cache, tok, pos, kv_len), kern))
    last = pre_len + steps + 1
    return out, ref_cache, cache, last


for extra in (dict(n_kv_heads=2, qk_norm=True), dict(n_heads=4)):
    cfg = GPTConfig(vocab_size=37, max_seq_len=64, num_classes=3, dim=64, n_layers=2, **extra)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    out, ref_cache, cache, last = run_steps(m, rows=3, steps=3, kv_len=24)
    for a, b in out:
        assert b.shape == a.shape == (3, 37) and b.dtype == a.dtype
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * a.abs().max().item() + 1e-6, (extra, err)
    for x, y in zip(ref_cache.tensors(), cache.tensors()):
        assert torch.allclose(x[:, :, :last], y[:, :, :last], atol=1e-5, rtol=1e-5), extra
        assert torch.isnan(y[:, :, last:]).all()  # nothing written past the last position
    assert calls[-1] == 6, calls  # kv_len 24 over chunks of 4: six splits merged

# programs that take several tiles in turn, each loading its next tile first: two programs a
# launch, one launch a phase; then one program for a whole layer in one launch (the GPU default
# is one program an SM): its grid barriers met by its own arrivals, the counter back at zero
cfg = GPTConfig(vocab_size=37, max_seq_len=64, num_classes=3, dim=64, n_layers=2, n_kv_heads=2, qk_norm=True)
torch.manual_seed(0)
m = GPT(cfg).eval()
for p in m.parameters():
    p.data.normal_(0, 0.3)
for fused, programs in ((False, 2), (True, 1)):
    dk._kernels().layer = lambda *a: real(*a[:-2], fused, programs)
    out, ref_cache, cache, last = run_steps(m, rows=3, steps=2, kv_len=24)
    for a, b in out:
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item() + 1e-6, fused
    for x, y in zip(ref_cache.tensors(), cache.tensors()):
        assert torch.allclose(x[:, :, :last], y[:, :, :last], atol=1e-5, rtol=1e-5), fused
    ws = dk.workspace(3, cfg.n_heads, cfg.head_dim, 40, torch.device("cpu"), create=False)
    assert ws.sync.tolist() == [0, 0] and ws.counters.abs().sum() == 0, (fused, ws.sync)
dk._kernels().layer = lambda *a: calls.append(a[-6]) or real(*a)

# narrow tiles: heads split over programs (2 pairs each), every reduction in 16-wide steps (the
# weight tiles loaded one step ahead), 5 rows in an 8-row block
dk.TILES.update(qkv_p=2, qkv_k=16, o_k=16, up_k=16, down_k=16, head_k=16)
cfg = GPTConfig(vocab_size=37, max_seq_len=64, num_classes=3, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
torch.manual_seed(0)
m = GPT(cfg).eval()
for p in m.parameters():
    p.data.normal_(0, 0.3)
assert dk.tiles_for(m, 5)["qkv_k"] == 16 and dk.tiles_for(m, 5)["qkv_p"] == 2
out, ref_cache, cache, last = run_steps(m, rows=5, steps=2)
for a, b in out:
    assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item() + 1e-6
for x, y in zip(ref_cache.tensors(), cache.tensors()):
    assert torch.allclose(x[:, :, :last], y[:, :, :last], atol=1e-5, rtol=1e-5)
dk.TILES.update(qkv_p=8, qkv_k=1024, o_k=1024, up_k=512, down_k=1024, head_k=256)

# bf16: the kernels' step is no further from a float64 step than torch's own bf16 step
cfg = GPTConfig(vocab_size=37, max_seq_len=64, num_classes=3, dim=64, n_layers=2, n_heads=4)
torch.manual_seed(0)
m64 = GPT(cfg).eval()
for p in m64.parameters():
    p.data.normal_(0, 0.3)
m16 = GPT(cfg).eval()
m16.load_state_dict(m64.state_dict())
m16.cast_for_inference_(torch.bfloat16)
m64.double()
truth, _, _, _ = run_steps(m64, rows=2, steps=2, garbage=0.0)
got, _, _, _ = run_steps(m16, rows=2, steps=2)
for (t, _), (a, b) in zip(truth, got):
    assert b.dtype == torch.bfloat16
    e_torch, e_kern = ((x.double() - t).abs().max().item() for x in (a, b))
    # the interpreter rounds float32 to bf16 by truncation (the GPU rounds to nearest: the GPU test
    # holds the kernels to 1.5x), which about doubles each rounding's error
    assert e_kern <= 2.5 * e_torch + 1e-3, (e_kern, e_torch)

# the sampler's triton mode samples the eager mode's greedy tokens (guided: 4 rows)
FMT = SequenceFormat(24, BlockLayout((2, 2, 2), (2, 4)))
torch.manual_seed(0)
g = GPT.from_preset("debug", vocab_size=FMT.vocab_size, max_seq_len=FMT.max_length + 1, num_classes=4).eval()
torch.nn.init.normal_(g.head.weight, std=0.3, generator=torch.Generator().manual_seed(1))
cond = Conditioning(torch.tensor([0, 2]))
runs = []
for mode in ("eager", "triton"):
    s = Sampler(g, FMT, SamplerConfig(temperature=0, cfg_scale=2.0, kv_bucket=8, compile=mode))
    assert s.execution(torch.device("cpu")) == mode
    n = len(calls)
    runs.append(s.generate(cond, generator=torch.Generator().manual_seed(3)))
    assert (len(calls) > n) == (mode == "triton")
assert torch.equal(runs[0].sequences, runs[1].sequences) and torch.equal(runs[0].lengths, runs[1].lengths)
for seq in runs[1].unpacked():
    assert FMT.is_well_formed(seq)
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs the kernels on the CPU)")
def test_triton_decode_step_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_unsupported_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = GPT.from_preset("debug", vocab_size=30, max_seq_len=40, num_classes=2)
    cpu = torch.device("cpu")
    if not HAS_TRITON:
        assert "Triton is not installed" in decode_kernels.unsupported(m, 2, cpu)
        return
    assert decode_kernels.unsupported(m, 2, cpu) is None
    assert "1 to 16 rows" in decode_kernels.unsupported(m, 17, cpu)
    odd = GPT.from_preset("debug", vocab_size=30, max_seq_len=40, dim=48, n_heads=4, n_kv_heads=None)  # head_dim 12
    assert "power-of-two head_dim >= 4, got 12" in decode_kernels.unsupported(odd, 2, cpu)
    view = GPT.from_preset("debug", vocab_size=30, max_seq_len=40, num_classes=2)
    view.blocks[0].ffn.w2.weight.data = view.blocks[0].ffn.w2.weight.data.t().contiguous().t()
    assert "need contiguous weights; blocks.0.ffn.w2.weight has strides (1, 64)" in decode_kernels.unsupported(
        view, 2, cpu)
    tok, pos = torch.zeros(2, dtype=torch.long), torch.tensor(1)
    with pytest.raises(ValueError, match="KV cache in the weights' dtype torch.float32, got torch.bfloat16"):
        decode_kernels.decode_step(m, m.allocate_cache(2, 8, dtype=torch.bfloat16), tok, pos)
    bad = m.allocate_cache(2, 8)
    bad.k[1] = bad.k[1].transpose(2, 3)  # a view with another layout
    with pytest.raises(ValueError, match=r"cache tensor \[B, 2, max_len, 16\]"):
        decode_kernels.decode_step(m, bad, tok, pos)
    with pytest.raises(ValueError, match="kv_len must lie in"):
        decode_kernels.decode_step(m, m.allocate_cache(2, 8), tok, pos, kv_len=9)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "run on CUDA devices, not cpu" in decode_kernels.unsupported(m, 2, cpu)
    with pytest.raises(ValueError, match="run on CUDA devices"):
        decode_kernels.decode_step(m, m.allocate_cache(2, 8), torch.zeros(2, dtype=torch.long), torch.tensor(1))


def test_tiles_keep_programs_and_bound_the_reduction():
    m = _l_shape()
    t = decode_kernels.tiles_for(m, 2)
    assert t["m"] == 2 and t["qkv_k"] == 1024 and t["down_k"] == 1024
    # every matrix's kernel gets at least PROGRAMS programs at 2 rows
    assert 1024 // t["o_n"] >= decode_kernels.PROGRAMS and 2816 // t["up_n"] >= decode_kernels.PROGRAMS
    assert -(-8197 // t["head_n"]) >= decode_kernels.PROGRAMS
    assert 48 * 32 // t["qkv_p"] >= decode_kernels.PROGRAMS
    t16 = decode_kernels.tiles_for(m, 9)  # 16-row block: the reduction block shrinks 8x
    assert t16["m"] == 16 and t16["qkv_k"] == 128
    small = GPT.from_preset("debug", vocab_size=30, max_seq_len=40, qk_norm=False)
    assert decode_kernels.tiles_for(small, 1)["qkv_k"] == 64  # never wider than the reduced dimension
    # QK-norm: a program holds a whole head (8 pairs, not 4): half the reduction block
    tq = decode_kernels.tiles_for(GPT.from_preset("debug", vocab_size=30, max_seq_len=40), 1)
    assert tq["qkv_k"] == 32 and tq["qkv_p"] == 8
    # head_dim 128: the one-launch layer's programs get 8 warps (4 spill registers)
    assert t["layer_warps"] == 4 and decode_kernels.tiles_for(_l_shape(n_heads=8), 2)["layer_warps"] == 8
    assert t["pdl"] == 0 and decode_kernels.tiles_for(m, 2, torch.device("cpu"))["pdl"] == 0  # CUDA only


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [0, 1], ids=["launch-a-phase", "launch-a-layer"])
@pytest.mark.parametrize("extra", [{}, dict(n_kv_heads=4, qk_norm=True)], ids=["mha", "gqa-qknorm"])
def test_gpu_triton_decode_step_matches_torch_and_replays_in_a_graph(extra, layer, monkeypatch):
    if not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and Triton")
    # layer 1: each layer's phases in one launch, its programs meeting at grid barriers
    monkeypatch.setitem(decode_kernels.TILES, "layer", layer)

    def build(double: bool) -> GPT:
        torch.manual_seed(0)
        g = GPT.from_preset("L", vocab_size=8197, max_seq_len=300, num_classes=10, n_layers=4, **extra).cuda().eval()
        for n, p in g.named_parameters():
            p.data.normal_(1.0 if "norm" in n else 0.0, 0.1 if "norm" in n else 0.02)
        return g.double() if double else g.cast_for_inference_(torch.bfloat16)

    m64, m = build(True), build(False)
    rows, fill = 2, 150
    cond = m.null_conditioning(rows, "cuda")
    pre = torch.randint(0, 8192, (rows, fill), device="cuda")
    caches = [x.allocate_cache(rows, 300) for x in (m64, m, m)]
    with torch.no_grad():
        for x, c in zip((m64, m, m), caches):
            x.prefill(c, cond, pre)
        tok = torch.randint(0, 8192, (rows,), device="cuda")
        pos = torch.tensor(fill + 1, device="cuda")
        truth = m64.decode_step(caches[0], tok, pos, 256)
        ref = m.decode_step(caches[1], tok, pos, 256)
        assert decode_kernels.tiles_for(m, rows, pos.device)["layer"] == layer
        got = decode_kernels.decode_step(m, caches[2], tok, pos, 256)
        e_torch, e_kern = ((x.double() - truth).abs().max().item() for x in (ref, got))
        assert e_kern <= 1.5 * e_torch + 1e-3, (e_kern, e_torch)
        ws = decode_kernels.workspace(rows, m.config.n_heads, m.config.head_dim, 300, pos.device, create=False)
        assert ws.sync.tolist() == [0, 0] and decode_kernels.barrier_errors(pos.device) == 0
        # the cache: the prefill's positions (and those past the step) untouched; at the step's
        # position, every layer's new key and value no further from the float64 step's than torch's
        # bf16 step's are (deeper layers carry the residual stream's rounding, so not bit for bit)
        errs = []
        for t, a, b in zip(caches[0].tensors(), caches[1].tensors(), caches[2].tensors()):
            assert torch.equal(a[:, :, :fill + 1], b[:, :, :fill + 1]) and torch.equal(a[:, :, fill + 2:], b[:, :, fill + 2:])
            e_t, e_k = ((x[:, :, fill + 1].double() - t[:, :, fill + 1]).abs().max().item() for x in (a, b))
            errs.append((round(e_k, 5), round(e_t, 5)))
        print("new k/v per layer, error vs float64 (kernels, torch bf16):", errs)
        assert all(e_k <= 1.5 * e_t + 1e-2 for e_k, e_t in errs), errs
        # layer 0's new key and value are rounded where torch rounds them: bit for bit but for the
        # rare element whose float32 sum falls the other side of a bf16 rounding boundary
        for a, b in ((caches[1].k[0], caches[2].k[0]), (caches[1].v[0], caches[2].v[0])):
            same = (a[:, :, fill + 1] == b[:, :, fill + 1]).float().mean().item()
            assert same >= 0.95, same
        # captured: the replays give the direct call's logits, bit for bit; programmatic dependent
        # launch (on for sm_90+) changes when kernels start, not what they compute
        pos2 = torch.tensor(fill + 2, device="cuda")
        assert decode_kernels.tiles_for(m, rows, pos2.device)["pdl"] == int(torch.cuda.get_device_capability()[0] >= 9)
        direct = decode_kernels.decode_step(m, caches[2], tok, pos2, 256)
        decode_kernels.TILES["pdl"] = 0
        try:
            assert torch.equal(decode_kernels.decode_step(m, caches[2], tok, pos2, 256), direct)
        finally:
            decode_kernels.TILES["pdl"] = 1
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_kernels.decode_step(m, caches[2], tok, pos2, 256)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = decode_kernels.decode_step(m, caches[2], tok, pos2, 256)
        for i in range(30):  # a race between the kernels would show as a changed replay
            for t in caches[2].tensors():  # the q/k/v kernel rewrites this row: an early read sees NaN
                t[:, :, fill + 2] = float("nan")
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, direct), i
        assert decode_kernels.barrier_errors(pos.device) == 0


@pytest.mark.gpu
def test_gpu_sampler_triton_mode_samples_well_formed_sequences():
    if not torch.cuda.is_available() or not HAS_TRITON:
        pytest.skip("needs CUDA and Triton")
    from arvid.data.types import BlockLayout
    from arvid.generator.conditioning import Conditioning
    from arvid.generator.sequence import SequenceFormat
    from arvid.sampling.sampler import Sampler, SamplerConfig

    fmt = SequenceFormat(64, BlockLayout((2, 2, 2, 2), (4, 8, 16, 32)))
    torch.manual_seed(0)
    g = GPT.from_preset("debug", vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 1, num_classes=5,
                        qk_norm=False).cuda().eval()
    torch.nn.init.normal_(g.head.weight, std=0.3)
    cond = Conditioning(torch.tensor([0, 1, 2], device="cuda"))
    out = {}
    for mode in ("eager", "triton"):
        s = Sampler(g, fmt, SamplerConfig(temperature=0, cfg_scale=2.0, kv_bucket=16, compile=mode))
        out[mode] = s.generate(cond, generator=torch.Generator().manual_seed(1))
        if mode == "triton":
            dec = next(iter(s._decoders.values()))
            assert dec.graphs and sorted(dec.graphs) == dec.kv_lens()
    for seq in out["triton"].unpacked():
        assert fmt.is_well_formed(seq)
    # float32 weights: the kernels' step differs from torch's by summation order only
    assert torch.equal(out["eager"].sequences, out["triton"].sequences)


# --------------------------------------------------------------------------- compiled for sm_90

_LAYER_SIG = {**{f"{n}_ptr": "*bf16" for n in ("x", "wqkv", "q", "k", "v", "o", "wo", "w13", "h", "w2")},
              **{f"{n}_ptr": "*fp32" for n in ("an", "f", "qn", "kn", "po", "pm", "pl", "fn")},
              "pos_ptr": "*i64", "cnt_ptr": "*i32", "sync_ptr": "*i32"}
_LAYER_SIG = {n: _LAYER_SIG[n] for n in (  # the kernel's argument order
    "x_ptr an_ptr wqkv_ptr q_ptr k_ptr v_ptr f_ptr pos_ptr qn_ptr kn_ptr po_ptr pm_ptr pl_ptr cnt_ptr o_ptr wo_ptr "
    "fn_ptr w13_ptr h_ptr w2_ptr sync_ptr").split()}
_LAYER_SIG.update(M="i32", DIM="i32", HIDDEN="i32", eps="fp32", H="i32", HKV="i32", GROUP="i32", kv_b="i32",
                  kv_h="i32", n="i32", scale="fp32", S="i32")
_SIGS = {
    "_head_kernel": {"x_ptr": "*bf16", "g_ptr": "*fp32", "w_ptr": "*bf16", "out_ptr": "*bf16", "M": "i32", "K": "i32",
                     "N": "i32", "eps": "fp32"},
    "_layer_kernel": _LAYER_SIG,
}


def _l_tiles(**overrides) -> dict[str, int]:
    """decode_kernels.tiles_for for the L preset at 2 rows."""
    return decode_kernels.tiles_for(_l_shape(**overrides), 2)


def _layer(t: dict, first: int, last: int, qk_norm: bool = False, half: int = 32) -> dict:
    """The layer kernel's constants for phases first..last at tiles ``t`` (the L preset: head_dim 64)."""
    return dict(HALF=half, QK_NORM=qk_norm, CHUNK=decode_kernels.CHUNK, MAX_S=64, BLOCK_M=2,
                QKV_P=t["qkv_p"], QKV_K=t["qkv_k"], O_N=t["o_n"], O_K=t["o_k"], UP_N=t["up_n"],
                UP_K=t["up_k"], DOWN_N=t["down_n"], DOWN_K=t["down_k"], FIRST=first, LAST=last, NEXT=last > first,
                PDL=True, SPIN=1 << 22)


# the L preset's kernels at 2 rows with the tiles decode_kernels.tiles_for gives them: the layer in
# one launch (with and without QK-norm, head_dim 64 and 128), each phase alone, and the output head
_T, _TQ, _T128 = _l_tiles(qk_norm=False), _l_tiles(qk_norm=True), _l_tiles(n_heads=8)  # head_dim 64, 64, 128
_LDIV = ("DIM", "HIDDEN", "kv_b", "kv_h")
# (kernel, constants, arguments divisible by 16, warps: as decode_kernels launches it)
_CASES = [
    ("_layer_kernel", _layer(_T, 0, 4), _LDIV, _T["layer_warps"]),
    ("_layer_kernel", _layer(_TQ, 0, 4, qk_norm=True), _LDIV, _TQ["layer_warps"]),
    ("_layer_kernel", _layer(_T128, 0, 4, half=64), _LDIV, _T128["layer_warps"]),
    *[("_layer_kernel", {**_layer(_T, p, p), "PDL": p != 2}, _LDIV, _T["warps"]) for p in range(5)],
    ("_layer_kernel", _layer(_TQ, 0, 0, qk_norm=True), _LDIV, max(4, _TQ["warps"])),
    ("_head_kernel", dict(BLOCK_M=2, BLOCK_N=_T["head_n"], BLOCK_K=_T["head_k"], PDL=True), ("K",), _T["warps"]),
]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its compiler and ptxas)")
@pytest.mark.parametrize("name,consts,div,warps", _CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(_CASES)])
def test_kernels_compile_for_hopper_with_wide_loads_and_no_spills(name, consts, div, warps, tmp_path):
    """Each kernel compiled ahead of time for sm_90 (no GPU needed: Triton's compiler and the ptxas it
    ships), with the specialisation a launch gets (pointers and multiples of 16 marked divisible by
    16): the weight and cache reads are 128-bit loads (16-bit ones would read a matrix at a fraction
    of the bandwidth) and no register spills (ptxas -v); a one-launch layer has its grid barriers
    and merge's acquire-release atomics."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arvid.generator import _triton_decode

    sig = dict(_SIGS[name])
    names = [*sig, *consts]
    sig.update({c: "constexpr" for c in consts})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*") or n in div}
    try:
        src = ASTSource(fn=getattr(_triton_decode, name), signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except (TypeError, ImportError) as e:  # another Triton's AOT interface
        pytest.skip(f"this Triton ({triton.__version__}) compiles ahead of time differently: {e}")
    ptx = k.asm["ptx"]
    wide = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx))
    assert wide >= 4, f"{name}: {wide} 128-bit global loads in the PTX"
    # under PDL: the next kernel may launch at once, and this one waits before reading its inputs
    assert ("griddepcontrol.wait" in ptx) == consts["PDL"] == ("griddepcontrol.launch_dependents" in ptx)
    if consts["PDL"]:  # the first weight tile (the attention: the earlier cache positions) is read before the wait
        early = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx[:ptx.index("griddepcontrol.wait")]))
        assert early >= 4, f"{name}: {early} 128-bit loads before the wait"
    if name == "_layer_kernel" and consts["FIRST"] == 0:  # RoPE's cos/sin: libdevice's accurate ones, as torch's
        assert "sin.approx" not in ptx and "cos.approx" not in ptx
    fused = name == "_layer_kernel" and consts["LAST"] > consts["FIRST"]
    if name == "_layer_kernel":  # the barriers' acquire/release counts (and the merges' counts), none alone
        acq_rel = len(re.findall(r"atom\.(?:\w+\.)*acq_rel", ptx))
        assert (acq_rel >= 5) if fused else (acq_rel == (1 if consts["FIRST"] == 1 else 0)), acq_rel
    # ptxas -v on the PTX: the bundled ptxas that takes this Triton's PTX version
    ptx_file = tmp_path / "k.ptx"
    ptx_file.write_text(ptx)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / tool).exists():
            r = subprocess.run([str(bin_dir / tool), "--gpu-name", "sm_90a", "-v", str(ptx_file), "-o", os.devnull],
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
    else:
        pytest.skip(f"no bundled ptxas takes this Triton's PTX: {r.stderr[-300:]}")
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    assert spills, r.stderr
    assert int(spills.group(1)) == 0, f"{name} spills registers: {r.stderr}"
