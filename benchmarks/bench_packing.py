"""How fast the generator's training batches are built on the host (issue [E]).

Writes a token store of synthetic clips with EVATok-like lengths, then times
``PackedBatchDataset[i]`` (one gather from the store, whole-batch packing) and the per-item path
(``collate_token_items`` of ``store[j]`` dicts) over the same batches:

    python benchmarks/bench_packing.py --videos 20000 --max-tokens 32768
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from arvid.data.token_store import TokenStore, TokenStoreWriter
from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.generator.packing import PackedBatchDataset, PackingSpec, collate_token_items
from arvid.generator.sequence import SequenceFormat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=20000)
    ap.add_argument("--max-tokens", type=int, default=32768, help="packed positions per batch")
    ap.add_argument("--candidates", default="16,32,64,128", help="token counts per block")
    ap.add_argument("--probs", default="0.7,0.25,0.04,0.01", help="how often each count is drawn")
    ap.add_argument("--batches", type=int, default=20, help="batches timed per path")
    ap.add_argument("--json", default=None, help="append the result as one JSON line")
    args = ap.parse_args()
    cands = [int(c) for c in args.candidates.split(",")]
    probs = torch.tensor([float(p) for p in args.probs.split(",")])
    layout = BlockLayout((4, 4, 4, 4), tuple(cands))
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        with TokenStoreWriter(Path(tmp) / "store", "bench", layout, 1024) as w:
            for lo in range(0, args.videos, 1000):
                b = min(1000, args.videos - lo)
                bl = torch.tensor(cands)[torch.multinomial(probs, b * 4, replacement=True, generator=g).view(b, 4)]
                codes = torch.randint(0, 1024, (int(bl.sum()),), generator=g)
                w.append(TokenizedVideo(codes, bl), labels=torch.randint(0, 8, (b,), generator=g))
        store = TokenStore(Path(tmp) / "store")
        spec = PackingSpec(SequenceFormat(1024, layout), 1, "class", pad_to=args.max_tokens, static_max_seqlen=True)
        ds = PackedBatchDataset(store, spec, args.max_tokens, seed=0)
        n = min(args.batches, len(ds))
        ds[0], collate_token_items([store[j] for j in ds.batches[0]], spec)  # warm the page cache
        t = time.perf_counter()
        for i in range(n):
            ds[i]
        batch_ms = (time.perf_counter() - t) / n * 1e3
        t = time.perf_counter()
        for i in range(n):
            collate_token_items([store[j] for j in ds.batches[i]], spec)
        item_ms = (time.perf_counter() - t) / n * 1e3
        videos = sum(len(ds.batches[i]) for i in range(n)) / n
    row = {"bench": "packing", "date": time.strftime("%Y-%m-%d"), "videos": args.videos,
           "max_tokens": args.max_tokens, "videos_per_batch": videos, "threads": torch.get_num_threads(),
           "dataset_ms": batch_ms, "per_item_ms": item_ms}
    print(f"{args.max_tokens} positions, {videos:.0f} videos per batch: PackedBatchDataset {batch_ms:.2f} ms, "
          f"per-item collate {item_ms:.2f} ms ({item_ms / batch_ms:.1f}x)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
