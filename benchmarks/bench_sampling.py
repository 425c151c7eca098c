"""Sampling speed: samples/s, decode-step time vs its memory-bandwidth floor, cache vs recompute.

    python benchmarks/bench_sampling.py                                   # GPU: preset L, batch 1 and 64, CFG
    python benchmarks/bench_sampling.py --device cpu --preset debug --steps 4   # CPU smoke
    python benchmarks/bench_sampling.py --kv-bucket 256                   # attend over the filled cache in 256-position buckets

For each batch size and each step execution (eager, cuda_graph, compile) it reports

- ``step_ms``: one decode step (model.decode_step + guidance + constraint mask + sampling),
  measured over ``--steps`` steps after a prefill, the cache filled to ``--fill`` positions;
- ``floor_ms``: bytes that one step must read (every weight once + the KV cache) / bandwidth,
  for the full static cache (what a masked attention over the preallocated cache reads, and
  what ``--kv-bucket 0`` attends over), for the buckets the timed steps attend over
  (``kv_len``: the filled part rounded up to ``--kv-bucket`` positions; the column gives the first
  step's) and for the filled part only (an ideal paged/varlen decode); the bucket and filled
  floors are the mean over the ``--steps`` timed steps, whose positions advance from ``--fill``
  (``step_ms`` is their mean too);
- ``samples_per_s``: whole videos from ``Sampler.generate``, batch * runs / total seconds
  (measured on CUDA; on CPU estimated as batch / (prefill + mean length * step time));
- ``recompute_speedup``: time to generate one mean-length sequence by full recompute without a
  cache (``forward_dense`` at every length, integrated over lengths measured at a few points)
  over the cached decode time. An estimate with biases both ways (a 2026-12-08 review): the cached
  side counts a prefill of all ``--fill`` tokens (a generation prefills its prefix only) and
  charges every step the time measured near ``--fill``; the integral takes lengths below
  ``fill / 4`` at the time of ``fill / 4`` (at most +6.25% where forward time grows linearly).

Untrained weights with a random output head: the lengths follow random length-token logits
(mean ~ middle of the candidate range). Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from arvid.data.types import BlockLayout
from arvid.generator.conditioning import Conditioning
from arvid.generator.gpt import GPT
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.sampler import Sampler, SamplerConfig, cat_conditioning, mean_tokens


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="L", help="GPT preset: debug, B, L, XL")
    p.add_argument("--batch-sizes", default=None, help="default 1,64 on CUDA, 1,4 on CPU")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="guidance (2 rows per sample); 1 = off")
    p.add_argument("--modes", default=None, help="eager,cuda_graph,compile,triton (default: the first three on CUDA, "
                   "eager on CPU; triton: at most 16 rows)")
    p.add_argument("--compile-mode", default=SamplerConfig().compile_mode,
                   help="torch.compile mode of mode 'compile': default | max-autotune-no-cudagraphs")
    p.add_argument("--codebook", type=int, default=8192)
    p.add_argument("--frames-per-block", default="4,4,4,4")
    p.add_argument("--candidates", default="32,64,128,256,512")
    p.add_argument("--num-classes", type=int, default=101)
    p.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per measurement")
    p.add_argument("--fill", type=int, default=None,
                   help="tokens in the cache before timing, also the length of the recompute comparison "
                        "(default: the mean length on CUDA, 64 on CPU)")
    p.add_argument("--full-runs", type=int, default=None, help="whole-batch generate() runs (default 3 on CUDA, 0 on CPU)")
    p.add_argument("--kv-bucket", type=int, default=SamplerConfig().kv_bucket,
                   help="decode attends over the filled cache rounded up to a multiple of this; 0 = the whole cache")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="bytes/s for the floor (default: the device-to-device copy rate measured on the lent "
                        "machines: 4.3e12 on an H200, 3.0e12 on an H100 or anything else)")
    p.add_argument("--profile", action="store_true",
                   help="print the CUDA kernels of the decode step (eager, CUDA-graph or compiled: the profiler "
                        "traces the kernels inside a graph replay)")
    p.add_argument("--decode-attention", default="sdpa",
                   help="comma-separated decode attentions to time under the compile mode (sdpa, flex; "
                        "SamplerConfig.decode_attention); the other modes use sdpa")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int = 1) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def bench_mode(gpt, fmt, layout, cond, full_cond, B, rows, mode, a, device, fill, full_runs, mean_len,
               attention: str = "sdpa") -> dict:
    """Step time (cache filled to ``fill``) and samples/s of one step execution mode."""
    sampler = Sampler(gpt, fmt, SamplerConfig(cfg_scale=a.cfg_scale, compile=mode, kv_bucket=a.kv_bucket,
                                              compile_mode=a.compile_mode, decode_attention=attention))
    n_prefix = gpt.config.num_prefix
    # prepare() builds the decoder's static buffers and, for graph modes, compiles and captures the step.
    t0 = time.perf_counter()
    prep = sampler.prepare(cond, generator=torch.Generator().manual_seed(0))
    sync(device)
    t_setup = time.perf_counter() - t0
    dec = prep.decoder
    prefix = torch.randint(0, fmt.codebook_size, (rows, fill), device=device)
    dec.cache.reset()
    gpt.prefill(dec.cache, full_cond, prefix)  # warm (kernel selection, lazy init)
    t_prefill = timed(lambda: gpt.prefill(dec.cache, full_cond, prefix), device)
    # A step feeds position i + n - 1: start at i = fill + 1, the first position after the prefill.
    # Each step attends over its own KV length bucket, as in Sampler.run.
    steps = max(1, min(a.steps, dec.G - fill - 2))
    chosen = [fill + 1]

    def run() -> None:
        dec.advance(chosen[0])
        chosen[0] += 1

    dec.i.fill_(fill + 1)
    run()  # warm
    dec.i.fill_(fill + 1)
    chosen[0] = fill + 1
    step_s = timed(run, device, steps)
    if a.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        dec.i.fill_(fill + 1)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for j in range(4):
                dec.advance(fill + 1 + j)
            sync(device)
        print(f"# decode step kernels, {sampler.execution(device)} ({attention} attention), batch {B} (4 steps):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    row = {"batch": B, "rows": rows, "mode": sampler.execution(device), "decode_attention": attention,
           "step_ms": step_s * 1e3,
           "prefill_ms": t_prefill * 1e3, "setup_s": t_setup, "fill": fill, "n_prefix": n_prefix,
           "kv_bucket": a.kv_bucket, "kv_len": dec.kv_len(fill + 1), "graphs": len(dec.graphs),
           # what the timed steps read, on average: the step after c chosen tokens attends over its
           # bucket dec.kv_len(c), of which n + c positions are filled (its own key included)
           "timed_steps": steps,
           "kv_len_mean": sum(dec.kv_len(c) for c in range(fill + 1, fill + 1 + steps)) / steps,
           "filled_mean": n_prefix + fill + (steps + 1) / 2,
           "sampling_part_compiled": dec.choose_fn != dec.choose}
    if full_runs:
        times, toks = [], []
        for r in range(full_runs):
            g = torch.Generator().manual_seed(100 + r)
            sync(device)
            t0 = time.perf_counter()
            out = sampler.generate(cond, generator=g)
            sync(device)
            times.append(time.perf_counter() - t0)
            toks.append(mean_tokens(out))
        t = sum(times) / len(times)
        mean_tok = sum(toks) / len(toks)
        row.update(samples_per_s=B / t, samples_per_s_kind="measured", seconds_per_batch=t, mean_tokens=mean_tok,
                   ms_per_token_step=t * 1e3 / (mean_tok + layout.num_blocks),
                   # each run's own: the first run replays each bucket's graph for the first time
                   runs_ms_per_token_step=[s * 1e3 / (k + layout.num_blocks) for s, k in zip(times, toks)])
    else:
        t = t_prefill + mean_len * step_s
        row.update(samples_per_s=B / t, samples_per_s_kind="estimated", seconds_per_batch=t,
                   mean_tokens=mean_len - layout.num_blocks)
    sampler.clear()
    return row


def default_bandwidth(device_name: str) -> float:
    """The floor's memory bandwidth for ``device_name`` (bytes/s): the device-to-device copy rate
    measured on the lent machines (H100 ~3.0 TB/s, gpu-notes; H200 ~4.3 TB/s, KINDS.md 2026-10-28),
    not the datasheet's 3.35 / 4.8."""
    return 4.3e12 if "H200" in device_name else 3.0e12


def main() -> int:
    a = parse()
    with torch.no_grad():  # inference only; scoped, so a caller in the same process keeps its grad mode
        return run(a)


def run(a: argparse.Namespace) -> int:
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    layout = BlockLayout(tuple(int(x) for x in a.frames_per_block.split(",")),
                         tuple(int(x) for x in a.candidates.split(",")))
    fmt = SequenceFormat(a.codebook, layout)
    torch.manual_seed(0)
    gpt = GPT.from_preset(a.preset, vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 1,
                          num_classes=a.num_classes)
    torch.nn.init.normal_(gpt.head.weight, std=0.02)
    gpt = gpt.to(device).cast_for_inference_(dtype).eval()
    modes = a.modes.split(",") if a.modes else (["eager", "cuda_graph", "compile"] if device.type == "cuda" else ["eager"])
    full_runs = a.full_runs if a.full_runs is not None else (3 if device.type == "cuda" else 0)
    mean_len = layout.num_blocks + layout.num_blocks * sum(layout.candidates) / len(layout.candidates)
    fill = a.fill or (int(mean_len) if device.type == "cuda" else 64)
    batch_sizes = a.batch_sizes or ("1,64" if device.type == "cuda" else "1,4")
    if a.bandwidth is None:
        a.bandwidth = default_bandwidth(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    # Every weight is read once per step; the token embedding only one row per sample (left out).
    weight_bytes = sum(p.numel() * p.element_size() for n, p in gpt.named_parameters() if not n.startswith("tok_emb"))
    print(f"# bench_sampling {datetime.now(timezone.utc).isoformat(timespec='seconds')} device={device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor()}) "
          f"torch={torch.__version__} preset={a.preset} params={gpt.num_params() / 1e6:.1f}M dtype={dtype} "
          f"vocab={fmt.vocab_size} max_len={fmt.max_length} cfg={a.cfg_scale} bandwidth={a.bandwidth:.2e}", flush=True)
    print(f"# command: {' '.join(sys.argv)}")
    results = []
    n_prefix = gpt.config.num_prefix
    for B in [int(x) for x in batch_sizes.split(",")]:
        guided = a.cfg_scale != 1.0
        rows = 2 * B if guided else B
        cond = Conditioning(torch.arange(B, device=device) % a.num_classes)
        kv_elems_per_pos = 2 * gpt.config.n_layers * rows * gpt.config.kv_heads * gpt.config.head_dim
        kv_full = kv_elems_per_pos * (n_prefix + fmt.max_length - 1) * torch.finfo(dtype).bits // 8
        floor_full = (weight_bytes + kv_full) / a.bandwidth * 1e3
        full_cond = cat_conditioning(cond, gpt.null_conditioning(B, device)) if guided else cond
        runs = [(m, att) for m in modes for att in (a.decode_attention.split(",") if m == "compile" else ["sdpa"])]
        for mode, att in runs:
            row = bench_mode(gpt, fmt, layout, cond, full_cond, B, rows, mode, a, device, fill, full_runs, mean_len,
                             att)
            # the buckets and filled positions of the timed steps, averaged as step_ms is (the
            # positions advance over the --steps steps; until 2026-12-08 both floors were the first
            # step's, so a step crossing into the next bucket was held to the smaller one)
            kv_bucket_bytes = kv_elems_per_pos * row["kv_len_mean"] * torch.finfo(dtype).bits / 8
            floor_bucket = (weight_bytes + kv_bucket_bytes) / a.bandwidth * 1e3
            kv_fill = kv_elems_per_pos * row["filled_mean"] * torch.finfo(dtype).bits / 8
            floor_fill = (weight_bytes + kv_fill) / a.bandwidth * 1e3
            row.update(floor_ms_full_cache=floor_full, floor_ms_bucket=floor_bucket, floor_ms_filled=floor_fill,
                       step_over_floor=row["step_ms"] / floor_full,
                       step_over_floor_filled=row["step_ms"] / floor_fill)
            results.append(row)
            print(json.dumps(row), flush=True)
            save(a, device, results)  # after every row: a run cut short keeps what it measured
        # Recompute without a cache: forward_dense at a few lengths, integrated over 1..mean length.
        L = fill
        pts = sorted({max(1, L * k // 4) for k in range(1, 5)})
        dense_ms = []
        for t in pts:
            toks = torch.randint(0, fmt.codebook_size, (rows, t), device=device)
            gpt.forward_dense(full_cond, toks)  # warm: kernel selection for this length
            dense_ms.append(timed(lambda toks=toks, c=full_cond: gpt.forward_dense(c, toks), device, 2) * 1e3)
        xs = [0] + pts
        ys = [dense_ms[0]] + dense_ms
        dense_total = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(pts)))  # ms
        for row in results:
            if row["batch"] == B:
                cached_total = row["prefill_ms"] + L * row["step_ms"]
                row["recompute_ms_per_sequence"] = dense_total
                row["recompute_speedup"] = dense_total / cached_total
    print()
    print(f"{'batch':>5} {'mode':>10} {'kv_len':>6} {'step ms':>8} {'floor ms':>9} {'(bucket)':>9} {'(filled)':>9} "
          f"{'x floor':>7} {'(filled)':>8} {'samples/s':>10} {'kind':>9} {'vs recompute':>12}")
    for r in results:
        print(f"{r['batch']:>5} {r['mode'] + ('+flex' if r['decode_attention'] == 'flex' else ''):>10} {r['kv_len']:>6} {r['step_ms']:>8.3f} {r['floor_ms_full_cache']:>9.3f} "
              f"{r['floor_ms_bucket']:>9.3f} {r['floor_ms_filled']:>9.3f} {r['step_over_floor']:>7.1f} "
              f"{r['step_over_floor_filled']:>8.1f} {r['samples_per_s']:>10.2f} "
              f"{r['samples_per_s_kind']:>9} {r.get('recompute_speedup', float('nan')):>11.1f}x")
    save(a, device, results)
    return 0


def save(a: argparse.Namespace, device: torch.device, results: list[dict]) -> None:
    if a.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device": f"{device} ({name})", "torch": torch.__version__,
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": results}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
