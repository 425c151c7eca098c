"""The cudnn_varlen attention backend on the GPU: agreement, fwd+bwd TFLOP/s against torch_varlen,
and the cost of new batch shapes.

    python benchmarks/probe_cudnn_varlen.py                 # CUDA, bf16, router-like lengths
    python benchmarks/probe_cudnn_varlen.py --tokens 32768 --json /tmp/probe.json

The generator's step on an H100 spends ~25% of its kernel time in FA2-class varlen attention at
~100 TFLOP/s (BENCHMARKS.md, 2026-12-06); the issue's 58% MFU goal needs that part faster. torch
(2.9 and later) reaches cuDNN's fused attention on packed sequences through nested tensors:
``aten._cudnn_attention_forward`` / ``_backward`` take ``[T, H, D]`` tensors with cumulative
sequence lengths (the THD layout, no padding), as arvid's packed batches are. arvid's
``cudnn_varlen`` backend wraps them as two custom ops (``arvid.generator.attention``); it was
written without device time and has not run on a GPU yet. This probe says whether it works and
pays:

- which dtype of the cumulative lengths cuDNN takes (int32, what the backend passes, else int64)
  and the layout of the log-sum-exp this torch returns;
- agreement of output and dq/dk/dv with the float32 dense reference of ``bench_attention.py``,
  eagerly, under ``torch.compile(fullgraph=True)`` and on strided q/k/v (views of a fused qkv);
- forward and forward+backward time and TFLOP/s against ``torch_varlen`` on the same batch;
- the cost of a new shape: cuDNN builds an execution plan per (sequence count, longest sequence,
  total tokens) and caches it. ``first_call_ms`` is the first call on a new sequence count;
  ``varying_ms`` the mean over batches whose sequence counts all differ (every call a new plan),
  ``bucketed_ms`` the same batches with the sequence count padded to a multiple of
  ``--count-bucket`` by zero-length sequences and ``max_seqlen`` fixed to a bound (one plan for
  all), with its own agreement check (zero-length sequences must be harmless).

Prints one row per measurement and a JSON line (``--json PATH`` also writes it). No number from
it is in BENCHMARKS.md until it has run on the GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arvid.data.types import BlockLayout  # noqa: E402
from arvid.generator import attention as A  # noqa: E402
from arvid.generator.attention import attention_flops, backend_unavailable_reason, varlen_causal_attention  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import make_lengths, reference, timed  # noqa: E402

# --------------------------------------------------------------------------- the ops


def cudnn_varlen(q, k, v, cu, max_seqlen):
    """The backend's op without its int32 cast, so that the probe can try other offset dtypes."""
    return A._cudnn_varlen_fwd(q, k, v, cu, max_seqlen)[0]


# --------------------------------------------------------------------------- batches


def pad_count(cu: torch.Tensor, bucket: int) -> torch.Tensor:
    """``cu_seqlens`` with zero-length sequences appended until the sequence count is a multiple of ``bucket``."""
    s = cu.numel() - 1
    extra = (-s) % bucket
    if extra == 0:
        return cu
    return torch.cat([cu, cu[-1:].expand(extra)])


def packed(lens: list[int], heads: int, head_dim: int, device, dtype, gen: torch.Generator, cu_dtype):
    n = sum(lens)
    q, k, v, g = (torch.randn(n, heads, head_dim, generator=gen).to(device, dtype) for _ in range(4))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=cu_dtype, device=device)
    return q, k, v, g, cu


def errors(fn, q, k, v, cu, m, g, ref) -> dict:
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv, cu, m)
    out.backward(g)
    got = (out, qq.grad, kk.grad, vv.grad)
    return {f"err_{n}": (a.float() - b).abs().max().item() for n, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}


#: the largest error against the float32 reference a bf16 kernel may show (the attention GPU tests' bound)
TOLERANCE = 6e-2


def verdict(errs: dict) -> str:
    """``ok``, or ``wrong: <field> <error>, ...`` for the errors above :data:`TOLERANCE` (the probe
    reported "ok" beside dq errors of 1e19 on torch 2.11 before 2026-12-06)."""
    bad = {k: v for k, v in errs.items() if k.startswith("err_") and not v <= TOLERANCE}  # NaN is bad too
    return "ok" if not bad else "wrong: " + ", ".join(f"{k[4:]} {v:.3g}" for k, v in bad.items())


def fwd_bwd_ms(fn, q, k, v, cu, m, g, iters, device) -> tuple[float, float]:
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            fn(qq, kk, vv, cu, m)

    def step():
        qq.grad = kk.grad = vv.grad = None
        fn(qq, kk, vv, cu, m).backward(g)

    return timed(fwd, iters, device) * 1e3, timed(step, iters, device) * 1e3


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=16384, help="packed tokens per batch")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batches", type=int, default=6, help="batches of distinct sequence counts (varying/bucketed)")
    p.add_argument("--count-bucket", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--plumbing-check", action="store_true", help=argparse.SUPPRESS)  # a CPU test's stand-in ops
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), torch.bfloat16
    result = {"probe": "cudnn_varlen", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "tokens": a.tokens, "heads": a.heads, "head_dim": a.head_dim, "rows": []}
    if device.type != "cuda" and not a.plumbing_check:
        result["status"] = "skipped: cuDNN attention needs CUDA"
        print(json.dumps(result))
        return result
    layout = BlockLayout()
    gen = torch.Generator().manual_seed(a.seed)
    lens = make_lengths("router", a.tokens, gen, layout)
    flops = attention_flops(lens, a.heads, a.head_dim)
    rows = result["rows"]

    def add(row):
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    # the cumulative lengths' dtype: the nested path passes int64 offsets; int32 is what arvid has
    cu_dtype = None
    for dt in (torch.int32, torch.int64):
        q, k, v, g, cu = packed(lens, a.heads, a.head_dim, device, dtype, gen, dt)
        try:
            out, lse = A._cudnn_varlen_fwd(q, k, v, cu, max(lens))
            sync(device)
            cu_dtype = dt
            add({"what": "forward runs", "cu_dtype": str(dt), "lse_numel_ok": lse.numel() == q.shape[0] * q.shape[1],
                 "lse_heads_first": A._CUDNN_LSE_HEADS_FIRST[0], "out_contiguous": out.is_contiguous()})
            break
        except Exception as e:  # noqa: BLE001 - the probe reports what fails and goes on
            add({"what": "forward runs", "cu_dtype": str(dt), "status": f"error: {type(e).__name__}: {str(e)[:200]}"})
    if cu_dtype is None:
        result["status"] = "cuDNN ragged forward failed with int32 and int64 lengths"
        print(json.dumps(result))
        return result
    result["cu_dtype"] = str(cu_dtype)
    m = max(lens)
    ref = reference(q, k, v, cu.to(torch.int32), g)
    compiled = torch.compile(cudnn_varlen, fullgraph=True)
    fns = [("torch_varlen", lambda q, k, v, cu, m: varlen_causal_attention(q, k, v, cu, m, "torch_varlen")),
           ("cudnn_varlen", cudnn_varlen), ("cudnn_varlen[compiled]", compiled)]
    for name, fn in fns:
        row = {"what": "agreement+time", "backend": name}
        if name == "torch_varlen" and backend_unavailable_reason(name, device, dtype):
            row["status"] = f"unavailable: {backend_unavailable_reason(name, device, dtype)}"
            add(row)
            continue
        try:
            row.update(errors(fn, q, k, v, cu if name != "torch_varlen" else cu.to(torch.int32), m, g, ref))
            f_ms, fb_ms = fwd_bwd_ms(fn, q, k, v, cu if name != "torch_varlen" else cu.to(torch.int32), m, g,
                                     a.iters, device)
            row.update(fwd_ms=f_ms, fwd_bwd_ms=fb_ms, fwd_bwd_tflops=flops / (fb_ms * 1e-3) / 1e12,
                       status=verdict(row))
        except Exception as e:  # noqa: BLE001
            row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
        add(row)
    # views of a fused qkv projection (the GPT's layout): strided in the token dimension
    try:
        qkv = torch.cat([q, k, v], dim=1)
        qv, kv_, vv = qkv.split([a.heads, a.heads, a.heads], dim=1)
        e = errors(cudnn_varlen, qv, kv_, vv, cu, m, g, ref)
        add({"what": "qkv views", **e, "status": verdict(e)})
    except Exception as e:  # noqa: BLE001
        add({"what": "qkv views", "status": f"error: {type(e).__name__}: {str(e)[:200]}"})

    # new shapes: one batch per sequence count, each count new to cuDNN's plan cache
    batches = []
    while len(batches) < a.batches:
        lb = make_lengths("router", a.tokens, gen, layout)
        if all(len(lb) != len(x[0]) for x in batches) and len(lb) != len(lens):
            batches.append((lb, *packed(lb, a.heads, a.head_dim, device, dtype, gen, cu_dtype)))
    layout_max = max(layout.max_tokens + layout.num_blocks + 8, max(max(b[0]) for b in batches))  # a bound
    for mode in ("varying", "bucketed"):
        times, worst = [], {}
        for i, (lb, bq, bk, bv, bg, bcu) in enumerate(batches):
            bm = max(lb)
            if mode == "bucketed":
                bcu, bm = pad_count(bcu, a.count_bucket), layout_max
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (bq, bk, bv))
            sync(device)
            t0 = time.perf_counter()
            try:
                cudnn_varlen(qq, kk, vv, bcu, bm).backward(bg)
                sync(device)
            except Exception as e:  # noqa: BLE001
                add({"what": mode, "batch": i, "status": f"error: {type(e).__name__}: {str(e)[:200]}"})
                break
            times.append((time.perf_counter() - t0) * 1e3)
            if mode == "bucketed" and i < 2:  # zero-length tail sequences and a loose max must not change anything
                e = errors(cudnn_varlen, bq, bk, bv, bcu, bm, bg, reference(bq, bk, bv, bcu[: len(lb) + 1].to(
                    torch.int32), bg))
                worst = {k: max(worst.get(k, 0.0), v) for k, v in e.items()}
        if times:
            add({"what": mode, "first_call_ms": times[0], f"{mode}_ms": sum(times) / len(times),
                 "counts": [len(b[0]) for b in batches], **worst, "status": verdict(worst)})
    wrong = [r for r in result["rows"] if str(r.get("status", "")).startswith("wrong")]
    result["status"] = "wrong: the cuDNN kernels disagree with the reference" if wrong else "ok"
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["status"] == "ok" else 1)
