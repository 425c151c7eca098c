"""Packed causal attention backends: agreement with a dense reference, and fwd+bwd TFLOP/s.

    python benchmarks/bench_attention.py                       # CUDA, bf16, router-like lengths
    python benchmarks/bench_attention.py --lengths fixed       # every sequence 1028 tokens
    python benchmarks/bench_attention.py --tiny --device cpu   # CPU smoke run

For each backend (and, where torch offers them, the FA3/FA4 flash implementations behind
``torch.nn.attention.activate_flash_attention_impl``) it reports the max abs error of the
output and of dq/dk/dv against SDPA with a dense document-causal mask in float32, and the
time and TFLOP/s of forward+backward. FLOPs use flash-attention accounting (causal half of
4*L^2*H*D forward, backward 2.5x forward), counted over the real sequences only.
Prints a table and a JSON line (``--json PATH`` also writes it).
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
from arvid.generator.attention import (  # noqa: E402
    BACKENDS,
    _sdpa_dense,
    attention_flops,
    backend_unavailable_reason,
    document_block_mask,
    padded_causal_attention,
    varlen_causal_attention,
)
from arvid.generator.packing import LastBatchMemo, router_like_lengths  # noqa: E402


def make_lengths(kind: str, total: int, gen: torch.Generator, layout: BlockLayout) -> list[int]:
    """Sequence lengths that fill ``total`` tokens: router-like draws (the last one trimmed) or fixed."""
    if kind == "fixed":
        L = layout.num_blocks + 256 * layout.num_blocks if 256 in layout.candidates else layout.max_tokens
        return [L] * max(1, total // L)
    lens: list[int] = []
    while sum(lens) < total:
        lens.append(int(router_like_lengths(1, layout, gen)[0]))
    lens[-1] -= sum(lens) - total
    return [x for x in lens if x > 0]


def reference(q, k, v, cu, grad_out):
    """float32 SDPA with a dense [N, N] mask: outputs and gradients."""
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    out = _sdpa_dense(q32, k32, v32, cu, 0)
    out.backward(grad_out.float())
    return out.detach(), q32.grad, k32.grad, v32.grad


def timed(fn, iters: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after 2 warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def variants(device: torch.device, dtype: torch.dtype, flex_options: list[dict] = (),
             flex_modes: list[str] = ()) -> list[tuple[str, object, str | None]]:
    """(name, callable(q, k, v, cu, max_seqlen), flash impl to activate or None). ``flex_options``:
    FlexAttention kernel options (``torch.nn.attention.flex_attention.FlexKernelOptions``), one
    ``flex[shared mask, ...]`` row each; ``flex_modes``: ``torch.compile`` modes for flex, likewise."""
    out: list[tuple[str, object, str | None]] = []
    for b in BACKENDS[1:]:
        reason = backend_unavailable_reason(b, device, dtype)
        out.append((b, (lambda q, k, v, cu, m, _b=b: varlen_causal_attention(q, k, v, cu, m, _b)), reason))
    # flex as the GPT runs it: the batch's block mask built once and shared by every layer, so the
    # time is the attention's alone (the row above builds it in every call); then with kernel options
    # or a torch.compile mode of its own
    from arvid.generator import attention as A

    masks = LastBatchMemo()

    def flex_with(opts, mode):
        def fn(q, k, v, cu, m):
            mask = masks.get(cu, ("flex", q.shape[0]), lambda: document_block_mask(cu, q.shape[0]))
            return A._flex(q, k, v, cu, m, mask, kernel_options=opts, mode=mode)
        return fn

    flex_reason = backend_unavailable_reason("flex", device, dtype)
    out.append(("flex[shared mask]", flex_with(None, None), flex_reason))
    out += [(f"flex[shared mask, {json.dumps(o, separators=(',', ':'))}]", flex_with(o, None), flex_reason)
            for o in flex_options]
    out += [(f"flex[shared mask, {m}]", flex_with(None, m), flex_reason) for m in flex_modes]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for name, kern in (("sdpa_padded_flash", SDPBackend.FLASH_ATTENTION),
                           ("sdpa_padded_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            out.append((name, (lambda q, k, v, cu, m, _k=kern: padded_causal_attention(q, k, v, cu, m, [_k])), None))
        try:
            from torch.nn.attention import list_flash_attention_impls

            for impl in list_flash_attention_impls():
                for b in ("torch_varlen", "sdpa_padded_flash"):
                    base = next(f for n, f, _ in out if n == b)
                    out.append((f"{b}[{impl}]", base, f"impl:{impl}"))
        except ImportError:
            pass
    return out


def run_one(name, fn, note, q, k, v, cu, max_seqlen, grad_out, ref, iters, device):
    row = {"backend": name}
    if note is not None and not str(note).startswith("impl:"):
        row["status"] = f"unavailable: {note}"
        return row
    impl = str(note)[5:] if note else None
    try:
        if impl:
            from torch.nn.attention import activate_flash_attention_impl

            activate_flash_attention_impl(impl)
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

        def fwd():
            with torch.no_grad():
                fn(qq, kk, vv, cu, max_seqlen)

        out = fn(qq, kk, vv, cu, max_seqlen)
        row["err_out"] = (out.float() - ref[0]).abs().max().item()
        row["fwd_ms"] = timed(fwd, iters, device) * 1e3
        try:  # a kernel with a forward but no backward here (fa4 on Hopper) still gets its forward row
            out.backward(grad_out)
        except Exception as e:  # noqa: BLE001
            row["status"] = f"forward only (backward: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
            return row
        errs = [(a.float() - b).abs().max().item() for a, b in zip((qq.grad, kk.grad, vv.grad), ref[1:])]
        row.update(err_dq=errs[0], err_dk=errs[1], err_dv=errs[2])

        def step():
            qq.grad = kk.grad = vv.grad = None
            fn(qq, kk, vv, cu, max_seqlen).backward(grad_out)

        row["fwd_bwd_ms"] = timed(step, iters, device) * 1e3
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - a benchmark reports every failure and goes on
        row["status"] = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    finally:
        if impl:
            from torch.nn.attention import restore_flash_attention_impl

            restore_flash_attention_impl()
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--tokens", type=int, default=16384, help="packed tokens N")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lengths", choices=("router", "fixed"), default="router")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--flex-options", action="append", default=[], type=json.loads, metavar="JSON",
                   help='FlexAttention kernel options to time as a row of their own, e.g. \'{"USE_TMA": true}\' '
                        "(repeatable)")
    p.add_argument("--flex-modes", default="", help="torch.compile modes for flex rows of their own, comma "
                                                     "separated, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--only", action="append", default=[], metavar="ROW",
                   help="a row to run (repeatable; default: all); 'flex*': every --flex-options/--flex-modes row")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    layout = BlockLayout()
    if args.tiny:
        args.tokens, args.heads, args.kv_heads, args.head_dim, args.iters = 600, 2, 1, 16, 2
        layout = BlockLayout((4, 4), (16, 32, 64, 128, 256))
        if device.type == "cpu":
            dtype = torch.float32
    gen = torch.Generator().manual_seed(args.seed)
    lens = make_lengths(args.lengths, args.tokens, gen, layout)
    n = sum(lens)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(device)
    q = torch.randn(n, args.heads, args.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(n, args.kv_heads, args.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(n, args.kv_heads, args.head_dim, generator=gen).to(device, dtype)
    grad_out = torch.randn(n, args.heads, args.head_dim, generator=gen).to(device, dtype)
    ref = reference(q, k, v, cu, grad_out)
    flops = attention_flops(lens, args.heads, args.head_dim, backward=True)
    flops_fwd = attention_flops(lens, args.heads, args.head_dim, backward=False)
    rows = []
    only = set(args.only)
    modes = [m for m in args.flex_modes.split(",") if m]
    all_variants = variants(device, dtype, args.flex_options, modes)
    unknown = only - {n for n, _, _ in all_variants} - {"flex*"}
    if unknown:
        p.error(f"--only names no row {sorted(unknown)}; the rows: {[n for n, _, _ in all_variants]}")
    for name, fn, note in all_variants:
        if only and name not in only and not (name.startswith("flex[shared mask, ") and "flex*" in only):
            continue
        row = run_one(name, fn, note, q, k, v, cu, max(lens), grad_out, ref, args.iters, device)
        if "fwd_ms" in row:
            row["fwd_tflops"] = flops_fwd / (row["fwd_ms"] / 1e3) / 1e12
        if row["status"] == "ok":
            row["fwd_bwd_tflops"] = flops / (row["fwd_bwd_ms"] / 1e3) / 1e12
        rows.append(row)
    result = {
        "bench": "attention", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": str(dtype), "tokens": n, "sequences": len(lens),
        "mean_len": n / len(lens), "max_len": max(lens), "heads": args.heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "lengths": args.lengths, "rows": rows,
    }
    print(f"# {result['device']}, torch {result['torch']}, {result['dtype']}, N={n} in {len(lens)} sequences "
          f"(mean {n / len(lens):.0f}, max {max(lens)}), H={args.heads}/{args.kv_heads}, D={args.head_dim}")
    print(f"{'backend':28s} {'err out':>9s} {'err dq':>9s} {'fwd ms':>8s} {'fwd TF/s':>9s} {'f+b ms':>8s} {'f+b TF/s':>9s}")
    for r in rows:
        if r["status"].startswith("forward only"):
            print(f"{r['backend']:28s} {r['err_out']:9.2e} {'-':>9s} {r['fwd_ms']:8.3f} {r['fwd_tflops']:9.1f} "
                  f"{'-':>8s} {'-':>9s}  {r['status']}")
            continue
        if r["status"] != "ok":
            print(f"{r['backend']:28s} {r['status']}")
            continue
        print(f"{r['backend']:28s} {r['err_out']:9.2e} {r['err_dq']:9.2e} {r['fwd_ms']:8.3f} {r['fwd_tflops']:9.1f} "
              f"{r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:9.1f}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
