"""Building the tokenizer's FlexAttention BlockMask: per-tile tag ranges vs create_block_mask.

    python benchmarks/bench_block_mask.py                 # CPU (or --device cuda)

``create_block_mask`` evaluates the packed rule on every (query, key) pair, so its cost grows with
``Nq x Nk`` (a curation batch of 128 clips of 256 patches: 32,768^2 pairs per mask);
:func:`arvid.tokenizer.attention.flex_block_mask` works on 128 x 128 tiles from per-tile ranges.
Prints one JSON object (command, device, date) per size and appends them to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch


def _timed(fn, device: torch.device, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask

    from arvid.tokenizer.attention import Segments, flex_block_mask

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clips", default="16,64", help="comma-separated batch sizes (clips of 4 blocks x 64 patches)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None, help="append the JSON results to this file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(max(torch.get_num_threads(), 1))
    rows = []
    for clips in (int(c) for c in a.clips.split(",")):
        seg = Segments.from_block_lengths(torch.full((clips, 4), 64), device)

        def rule(b, h, qi, ki, s=seg):
            return (s.vid[qi] == s.vid[ki]) & (s.blk[ki] <= s.blk[qi])

        ref = _timed(lambda s=seg: create_block_mask(rule, None, None, s.total, s.total, device=device), device, a.repeat)
        ours = _timed(lambda s=seg: flex_block_mask(s, s), device, a.repeat)
        rows.append({"benchmark": "bench_block_mask", "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                     or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "tokens": seg.total, "create_block_mask_s": round(ref, 5), "tiles_s": round(ours, 5),
                     "speedup": round(ref / ours, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        from pathlib import Path

        from arvid.io import atomic_write

        old = Path(a.out).read_text() if Path(a.out).is_file() else ""
        with atomic_write(a.out, "w") as f:  # the old lines and the new ones, or the old file untouched
            f.write(old + "".join(json.dumps(r) + "\n" for r in rows))
    return rows


if __name__ == "__main__":
    main()
