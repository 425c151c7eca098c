"""How long the sampler takes to check a frame-prediction prefix and find the state after it ([F]).

``Sampler.prepare`` calls ``SequenceConstraint.state_after`` twice per batch (the whole prefixes,
then their common part). This times it on ``--batch`` prefixes of the first ``--blocks`` blocks at
random candidate counts (the K600 protocol's context is the first two blocks):

    python benchmarks/bench_prefix_state.py --batch 64 --blocks 2 --candidates 16,32,64,128,256

Prints one JSON line (and appends it to ``--json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.constraints import SequenceConstraint, prefix_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2, help="context blocks in the prefix")
    ap.add_argument("--candidates", default="16,32,64,128,256")
    ap.add_argument("--codebook", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the constraint's tables live (cpu, cuda)")
    ap.add_argument("--json", default=None, help="append the result as one JSON line")
    args = ap.parse_args()
    cands = tuple(int(c) for c in args.candidates.split(","))
    fmt = SequenceFormat(args.codebook, BlockLayout((5, 4, 4, 4), cands))
    g = torch.Generator().manual_seed(0)
    bl = torch.tensor(cands)[torch.randint(0, len(cands), (args.batch, args.blocks), generator=g)]
    tv = TokenizedVideo(torch.randint(0, args.codebook, (int(bl.sum()),), generator=g), bl)
    prefix, lengths = prefix_tokens(fmt, tv)
    c = SequenceConstraint(fmt, args.batch, device=args.device)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        state = c.state_after(prefix, lengths)
        state.length.cpu()  # wait for the device
        times.append(time.perf_counter() - t)
    assert state.length.cpu().tolist() == lengths.tolist()
    row = {"bench": "prefix_state", "batch": args.batch, "blocks": args.blocks, "prefix_tokens": prefix.shape[1],
           "device": args.device, "ms": round(min(times) * 1e3, 2), "ms_all": [round(t * 1e3, 2) for t in times],
           "host": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat()}
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
