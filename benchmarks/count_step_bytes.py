"""Bytes that the compiled GPT training step's fused (non-matmul) kernels read and write, per layer.

    python benchmarks/count_step_bytes.py                                  # preset L, both residual dtypes
    python benchmarks/count_step_bytes.py --residual-dtypes compute --tokens 4096

The step of ``bench_generator.py`` (packed batch, bf16 autocast, forward + loss under
torch.compile, backward) is compiled with inductor on this machine and inductor's own count of
each scheduled kernel's buffer reads and writes is summed (``GraphLowering.count_bytes``, the
``inductor_metrics`` log). Matmuls and attention (extern kernels) are counted apart. The model
is built with 1 and with 3 layers: half the difference is one layer's share, without the
embedding, the loss and the per-step weight casts. On a GPU these kernels are memory-bound, so
bytes / bandwidth is their floor; ``--scale-tokens`` / ``--scale-layers`` / ``--bandwidth``
turn the per-token figure into milliseconds for a real step (default: 16,448 positions, 24
layers, 4.3 TB/s: the H200 of BENCHMARKS.md's profile).

Inductor's CPU code generator fuses somewhat differently from its Triton one, so the figures
are an estimate of the GPU's bytes, good for comparing variants of the model, not a measurement.
No GPU is needed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arvid.generator.gpt import GPT  # noqa: E402
from arvid.generator.packing import IGNORE, pack_sequences  # noqa: E402


def step_bytes(preset: str, layers: int, tokens: int, residual_dtype: str) -> dict[str, float]:
    """Fused and extern bytes of one compiled training step (fresh compilation, caches off)."""
    import torch._functorch.config as fconfig
    import torch._inductor.config as iconfig
    import torch._inductor.graph as igraph

    torch._dynamo.reset()
    counted = {"fused": 0.0, "extern": 0.0}
    orig = igraph.GraphLowering.count_bytes

    def count_bytes(self):
        total, counts, runtimes = orig(self)
        for node, n4 in counts:
            kind = type(node).__name__
            if "Nop" not in kind:
                counted["extern" if "Extern" in kind else "fused"] += 4.0 * n4
        return total, counts, runtimes

    old = (iconfig.fx_graph_cache, fconfig.enable_autograd_cache)
    iconfig.fx_graph_cache, fconfig.enable_autograd_cache = False, False
    igraph.GraphLowering.count_bytes = count_bytes
    torch._logging.set_logs(inductor_metrics=True)  # count_bytes runs only with this log on
    try:
        torch.manual_seed(0)
        model = GPT.from_preset(preset, n_layers=layers, vocab_size=8197, max_seq_len=1100, num_classes=101,
                                attn_backend="sdpa", residual_dtype=residual_dtype)
        g = torch.Generator().manual_seed(0)
        lens, left = [], tokens
        while left > 2:
            n = min(left - 1, 700 + int(torch.randint(0, 300, (1,), generator=g)))
            lens.append(n)
            left -= n + 1
        seqs = [torch.randint(0, 8197, (n,), generator=g) for n in lens]
        batch = pack_sequences(seqs, 1, torch.arange(len(seqs)) % 101, pad_to=tokens, max_seqlen=1100)

        def loss_fn(b):
            return F.cross_entropy(model(b).float(), b.targets, ignore_index=IGNORE)

        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.compile(loss_fn)(batch)
        loss.backward()
    finally:
        igraph.GraphLowering.count_bytes = orig
        iconfig.fx_graph_cache, fconfig.enable_autograd_cache = old
        torch._logging.set_logs()
    return counted


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="L")
    p.add_argument("--tokens", type=int, default=2048, help="packed positions of the counted step")
    p.add_argument("--residual-dtypes", default="float32,compute")
    p.add_argument("--scale-tokens", type=int, default=16448)
    p.add_argument("--scale-layers", type=int, default=24)
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s for the ms estimate")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    rows = []
    for rd in args.residual_dtypes.split(","):
        one, three = step_bytes(args.preset, 1, args.tokens, rd), step_bytes(args.preset, 3, args.tokens, rd)
        per_layer = (three["fused"] - one["fused"]) / 2
        per_token = per_layer / args.tokens  # includes the layer's weight casts (not per token: small at 16k)
        est = per_token * args.scale_tokens * args.scale_layers
        rows.append({"residual_dtype": rd, "fused_bytes_per_layer": per_layer, "fused_bytes_per_token_layer": per_token,
                     "extern_bytes_per_layer": (three["extern"] - one["extern"]) / 2,
                     "scaled_fused_GB": est / 1e9, "scaled_fused_ms_at_bandwidth": est / args.bandwidth * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        base = rows[0]["fused_bytes_per_layer"]
        for r in rows[1:]:
            r["vs_first"] = r["fused_bytes_per_layer"] / base
    result = {"command": " ".join(["python", "benchmarks/count_step_bytes.py", *(argv or sys.argv[1:])]),
              "host": platform.node(), "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "preset": args.preset, "tokens": args.tokens, "rows": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
