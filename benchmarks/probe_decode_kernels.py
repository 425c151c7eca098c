"""Check the Triton decode step (arvid.generator.decode_kernels) on a GPU, beyond the GPU tests:
the GPT-L layout (``--layers`` of them, bf16) at several row counts, fills and ``kv_len`` buckets,
with grouped-query attention and QK-norm: the largest logit error against a float64 step, as a
ratio to the torch bf16 step's; whether repeated direct calls and CUDA-graph replays give the first
call's logits bit for bit; programmatic dependent launch on against off; each of the two launch
forms (``TILES["layer"]``: one launch a phase, or a layer's phases in one launch with grid
barriers); the merge counters and the barrier counter back at zero, no barrier given up. Exit 1
when a check fails.

    python3 benchmarks/probe_decode_kernels.py [--layers 3] [--reps 100]
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_decode_kernels import graph_of  # benchmarks/ is on the path when this runs as a script

from arvid.generator import decode_kernels as dk
from arvid.generator.gpt import GPT

CASES = [  # name, rows, fill, kv_len, GPT overrides
    ("rows 2, whole cache", 2, 797, None, {}),
    ("rows 2, bucket 832", 2, 797, 832, {}),
    ("rows 16, bucket 2052", 16, 2040, 2052, {}),
    ("rows 5, 4 KV heads, QK-norm", 5, 300, 320, dict(n_kv_heads=4, qk_norm=True)),
    ("rows 1, position 0", 1, 0, 64, {}),
]


def build(double: bool, layers: int, **kw) -> GPT:
    torch.manual_seed(0)
    m = GPT.from_preset("L", vocab_size=8197, max_seq_len=2052, num_classes=10, n_layers=layers, **kw).cuda().eval()
    for n, p in m.named_parameters():
        p.data.normal_(1.0 if "norm" in n else 0.0, 0.1 if "norm" in n else 0.02)
    return m.double() if double else m.cast_for_inference_(torch.bfloat16)


@torch.no_grad()
def case(name: str, rows: int, fill: int, kv_len: int | None, kw: dict, layers: int, reps: int) -> bool:
    m64, m = build(True, layers, **kw), build(False, layers, **kw)
    torch.manual_seed(1)
    c64, c1, c2 = (x.allocate_cache(rows, 2052) for x in (m64, m, m))
    for a, b, c in zip(c64.tensors(), c1.tensors(), c2.tensors()):
        a[:, :, :fill].normal_()
        b.copy_(a)
        c.copy_(a)
    tok = torch.randint(0, 8192, (rows,), device="cuda")
    pos = torch.tensor(fill, device="cuda")
    truth = m64.decode_step(c64, tok, pos, kv_len)
    e_torch = (m.decode_step(c1, tok, pos, kv_len).double() - truth).abs().max().item()
    default, ok = dict(dk.TILES), True
    for layer in (0, 1):  # one launch a phase; a layer's phases in one launch (grid barriers)
        dk.TILES["layer"] = layer
        try:
            first = dk.decode_step(m, c2, tok, pos, kv_len)
            e_kern = (first.double() - truth).abs().max().item()
            if dk.barrier_errors(pos.device):  # each barrier polled ~0.25 s: no repetitions
                print(f"{name}, one launch a layer: a grid barrier gave up -> FAILED", flush=True)
                ok = False
                continue
            direct_bad = sum(not torch.equal(dk.decode_step(m, c2, tok, pos, kv_len), first) for _ in range(reps))
            dk.TILES["pdl"] = 0
            pdl_same = torch.equal(dk.decode_step(m, c2, tok, pos, kv_len), first)
            dk.TILES["pdl"] = default["pdl"]
            res = {}
            graph = graph_of(lambda res=res: res.__setitem__("out", dk.decode_step(m, c2, tok, pos, kv_len)))
            out = res["out"]  # the captured call's output buffer (replays write it)
            graph_bad = 0
            for _ in range(reps):
                graph.replay()
                graph_bad += not torch.equal(out, first)
            torch.cuda.synchronize()
        finally:
            dk.TILES.update(default)
        ws = dk.workspace(rows, m.config.n_heads, m.config.head_dim, 2052, pos.device, create=False)
        clean = int(ws.counters.abs().sum()) == 0 and int(ws.sync[0]) == 0 and dk.barrier_errors(pos.device) == 0
        ratio = e_kern / max(e_torch, 1e-12)
        good = ratio <= 1.5 and direct_bad == graph_bad == 0 and pdl_same and clean
        ok = ok and good
        form = "one launch a layer" if layer else "one launch a phase"
        print(f"{name}, {form}: error vs float64 {e_kern:.4g} (torch bf16 {e_torch:.4g}, ratio {ratio:.2f}); changed "
              f"results direct {direct_bad}/{reps}, graph {graph_bad}/{reps}; PDL off == on {pdl_same}; counters "
              f"zero, no barrier given up {clean} -> {'ok' if good else 'FAILED'}", flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--reps", type=int, default=100)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_decode_kernels needs a CUDA device")
    print(f"# probe_decode_kernels {torch.cuda.get_device_name()} torch={torch.__version__}", flush=True)
    results = [case(name, rows, fill, kv_len, kw, a.layers, a.reps if rows < 16 else a.reps // 2)
               for name, rows, fill, kv_len, kw in CASES]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
