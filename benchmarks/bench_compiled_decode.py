"""The GPT's decode step, eager vs ``torch.compile``, at several KV-cache lengths.

    python benchmarks/bench_compiled_decode.py                         # debug GPT on the CPU
    python benchmarks/bench_compiled_decode.py --preset L --device cuda --dtype bf16 --cache-lens 1024,2052

A compiled step that copies the cache (rather than writing the new key and value in place) costs
time in proportion to the cache's length; one that writes in place does not. The step attends over
the first ``--kv-len`` positions in every case, so only the cache's allocated length changes between
rows. Prints one line per length and a JSON line (``--json PATH`` also writes it). On CUDA the times
include the launches (no CUDA graph): compare rows with each other, not with ``bench_sampling.py``.

It also counts the kernel launches of one step: in inductor's generated code for the compiled step
(fused kernels, library calls such as matmuls, aten fallbacks such as attention) and, for the eager
step, the compute operators dispatched (aten ops that are not views; on CUDA each is about one
kernel). At batch 1 a CUDA-graph step costs a few microseconds per kernel, so the ratio of the two
counts bounds what compiling can save there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arvid.generator.conditioning import Conditioning  # noqa: E402
from arvid.generator.gpt import GPT  # noqa: E402


def timed(fn, iters: int, device: torch.device) -> float:
    """Mean seconds per call over ``iters`` calls, after the caller's warm-up."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / iters


_VIEWS = {"view", "_unsafe_view", "t", "select", "slice", "permute", "unsqueeze", "split", "split_with_sizes",
          "expand", "reshape", "unflatten", "transpose", "alias", "detach", "squeeze", "chunk", "as_strided"}


def eager_ops(fn) -> int:
    """Compute (non-view) aten operators dispatched by ``fn()``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in _VIEWS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def compiled_launches(codes: list[str]) -> dict[str, int]:
    """Kernel launches in the ``call`` functions of inductor's generated code: fused (Triton or C++)
    kernels, library calls (``extern_kernels.mm`` ...) and aten fallbacks (attention ...)."""
    import re

    out = {"fused": 0, "library": 0, "aten": 0}
    for code in codes:
        if "def call(" not in code:
            continue
        body = code[code.index("def call("):]
        out["fused"] += len(re.findall(r"^\s+(?:cpp_fused_\w+\(|\w+\.run\()", body, re.M))
        out["library"] += len(re.findall(r"^\s+(?:\w+ = )?extern_kernels\.\w+\(", body, re.M))
        out["aten"] += len(re.findall(r"^\s+(?:\w+ = )?torch\.ops\.aten\.\w+\.\w+\(", body, re.M))
    out["total"] = out["fused"] + out["library"] + out["aten"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--rows", type=int, default=2, help="cache rows (batch 1 with CFG = 2)")
    p.add_argument("--cache-lens", default="512,8192", help="allocated cache lengths to compare")
    p.add_argument("--kv-len", type=int, default=256, help="positions each step attends over")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    lens = [int(x) for x in a.cache_lens.split(",")]
    torch.manual_seed(0)
    gpt = GPT.from_preset(a.preset, vocab_size=1000, max_seq_len=max(lens), num_classes=10).to(device).eval()
    gpt.cast_for_inference_(dtype)
    step = torch.compile(gpt.decode_step, dynamic=False)
    tok = torch.arange(a.rows, device=device) % 10
    pos = torch.tensor(a.kv_len // 2, device=device)
    rows = []
    launches = None
    with torch.no_grad():
        for n in lens:
            cache = gpt.allocate_cache(a.rows, n, device, dtype)
            gpt.prefill(cache, Conditioning(torch.arange(a.rows, device=device) % 10))
            if launches is None:  # the first compilation: read its generated code
                from torch._inductor.utils import run_and_get_code

                _, codes = run_and_get_code(step, cache, tok, pos, a.kv_len)
                launches = compiled_launches(codes)
                launches["eager_ops"] = eager_ops(lambda c=cache: gpt.decode_step(c, tok, pos, a.kv_len))
                print(f"one step: eager {launches['eager_ops']} compute ops; compiled {launches['total']} launches "
                      f"({launches['fused']} fused, {launches['library']} library, {launches['aten']} aten)", flush=True)
            for _ in range(3):  # warm-up (compilation for this cache shape)
                step(cache, tok, pos, a.kv_len)
                gpt.decode_step(cache, tok, pos, a.kv_len)
            compiled = timed(lambda c=cache: step(c, tok, pos, a.kv_len), a.iters, device)
            eager = timed(lambda c=cache: gpt.decode_step(c, tok, pos, a.kv_len), a.iters, device)
            rows.append({"cache_len": n, "cache_mb": cache.nbytes() / 1e6, "compiled_ms": compiled * 1e3,
                         "eager_ms": eager * 1e3})
            print(f"cache {n:6d} positions ({cache.nbytes() / 1e6:7.1f} MB): compiled {compiled * 1e3:7.3f} ms, "
                  f"eager {eager * 1e3:7.3f} ms", flush=True)
    result = {"bench": "compiled_decode", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "preset": a.preset, "dtype": a.dtype, "launches": launches, "rows": rows}
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
