"""Time the Triton decode step (arvid.generator.decode_kernels) of a GPT preset, captured in a CUDA
graph, against its memory floor (weights + the filled KV cache read once at ``--bandwidth``), for
tile-size variants; ``--profile`` prints where the best variant's step goes, by kernel.

    python3 benchmarks/bench_decode_kernels.py --preset L --rows 2 --fill 797 --kv-len 832 \
        --variants "default;pdl=0;warps=8" --profile --json out.json

A variant is ``key=value,...`` over ``decode_kernels.TILES`` and ``programs`` (``decode_kernels.PROGRAMS``,
below which a column block shrinks; ``default``: as set). The step
feeds ``--rows`` rows (batch x 2 with guidance) at position ``--fill`` and attends over
``--kv-len`` positions (the sampler's bucket)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

import torch

from arvid.generator import decode_kernels
from arvid.generator.gpt import GPT


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="L")
    p.add_argument("--vocab", type=int, default=8197)
    p.add_argument("--max-len", type=int, default=2052, help="KV cache positions (the L layout's 2,052)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--fill", type=int, default=797)
    p.add_argument("--kv-len", type=int, default=832)
    p.add_argument("--variants", default="default", help="';'-separated TILES overrides (key=value,...)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s of the floor (H100: 3.0e12)")
    p.add_argument("--torch", action="store_true", help="also time the torch step (compiled, captured)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def variant(spec: str) -> dict[str, int]:
    if spec.strip() in ("", "default"):
        return {}
    out = {}
    for kv in spec.split(","):
        k, _, v = kv.partition("=")
        if k.strip() not in (*decode_kernels.TILES, "programs"):
            raise SystemExit(f"unknown tile key {k!r} in variant {spec!r}; known: {', '.join(decode_kernels.TILES)}")
        out[k.strip()] = int(v)
    return out


def graph_of(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def time_graph(g: torch.cuda.CUDAGraph, reps: int) -> float:
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main(argv=None) -> int:
    a = parse(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_kernels needs a CUDA device")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m = GPT.from_preset(a.preset, vocab_size=a.vocab, max_seq_len=a.max_len, num_classes=10)
    torch.nn.init.normal_(m.head.weight, std=0.02)
    m = m.to(dev).cast_for_inference_(torch.bfloat16).eval()
    cache = m.allocate_cache(a.rows, a.max_len)
    for t in cache.tensors():
        t.normal_()
    tok = torch.randint(0, a.vocab, (a.rows,), device=dev)
    pos = torch.tensor(a.fill, device=dev)
    weights = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if not n.startswith("tok_emb"))
    kv = 2 * m.config.n_layers * a.rows * m.config.kv_heads * m.config.head_dim * 2 * (a.fill + 1)
    floor = (weights + kv) / a.bandwidth * 1e3
    name = torch.cuda.get_device_name(dev)
    print(f"# bench_decode_kernels {datetime.now(timezone.utc).isoformat(timespec='seconds')} {name} "
          f"torch={torch.__version__} preset={a.preset} rows={a.rows} fill={a.fill} kv_len={a.kv_len} "
          f"floor={floor:.3f} ms ({(weights + kv) / 1e6:.0f} MB at {a.bandwidth:.2e} B/s)", flush=True)
    print(f"# command: {' '.join(sys.argv)}")
    results = []
    base = dict(decode_kernels.TILES)
    programs = decode_kernels.PROGRAMS

    def use(spec: str) -> None:
        v = variant(spec)
        decode_kernels.PROGRAMS = v.pop("programs", programs)
        decode_kernels.TILES.clear()
        decode_kernels.TILES.update({**base, **v})

    with torch.no_grad():
        if a.torch:
            step = torch.compile(m.decode_step, dynamic=False)
            g = graph_of(lambda: step(cache, tok, pos, a.kv_len))
            ms = time_graph(g, a.reps)
            results.append({"variant": "torch (compiled, graph)", "step_ms": ms, "x_floor": ms / floor})
            print(json.dumps(results[-1]), flush=True)
        best = None
        for spec in a.variants.split(";"):
            use(spec)
            try:
                g = graph_of(lambda: decode_kernels.decode_step(m, cache, tok, pos, a.kv_len))
                error = None
            except Exception as e:  # a tile variant Triton cannot compile (e.g. out of shared memory): keep going
                error = f"{type(e).__name__}: {str(e)[:300]}"
            if error is None and decode_kernels.barrier_errors(dev):  # a one-launch layer's programs not all resident
                error = "a grid barrier gave up (programs not all resident)"
            if error is not None:
                results.append({"variant": spec, "error": error})
                print(json.dumps(results[-1]), flush=True)
                continue
            ms = time_graph(g, a.reps)
            row = {"variant": spec, "tiles": decode_kernels.tiles_for(m, a.rows, dev), "step_ms": ms, "x_floor": ms / floor,
                   "GB_per_s": (weights + kv) / ms / 1e6}
            results.append(row)
            print(json.dumps(row), flush=True)
            if best is None or ms < best[1]:
                best = (spec, ms, g)
        if a.profile and best is not None:
            from torch.profiler import ProfilerActivity, profile

            use(best[0])
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(4):
                    best[2].replay()
                torch.cuda.synchronize()
            print(f"# kernels of the best variant ({best[0]}), 4 steps:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    print(f"\n{'variant':>40} {'step ms':>8} {'x floor':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['variant'][:40]:>40} failed: {r['error'][:80]}")
        else:
            print(f"{r['variant'][:40]:>40} {r['step_ms']:>8.3f} {r['x_floor']:>8.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device": name, "torch": torch.__version__, "floor_ms": floor,
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
