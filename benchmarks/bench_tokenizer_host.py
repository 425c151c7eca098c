"""Host time of EVATok's per-batch index arithmetic (issue [C]): the packed tokens' tags
(``_token_meta``) and the patches' block ids (``_patch_blocks``) for a batch of mixed assignments,
on the CPU, under a given number of torch intra-op threads. On a GPU host these run on the CPU
before every encode and decode; with torch's ``repeat_interleave`` they waited on the intra-op
thread pool (H100 profile, 2026-12-05), with numpy they do not.

    python benchmarks/bench_tokenizer_host.py --threads 2,16 --batch 64
"""

from __future__ import annotations

import argparse
import time

import torch

from arvid.tokenizer import build_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2,16", help="torch intra-op thread counts to try")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    tok = build_tokenizer("evatok", {"frames_per_block": [4, 4, 4, 4], "candidates": [16, 32, 64, 128]},
                          preset="debug")
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([16, 32, 64, 128])[torch.randint(0, 4, (args.batch, 4), generator=g)]
    dev = torch.device("cpu")
    for th in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(th)
        for _ in range(20):
            tok._token_meta(a, dev), tok._patch_blocks(4, dev)
        t = time.perf_counter()
        for _ in range(args.iters):
            tok._token_meta(a, dev), tok._patch_blocks(4, dev)
        ms = (time.perf_counter() - t) / args.iters * 1e3
        print(f"threads {th}: {ms:.3f} ms per _token_meta + _patch_blocks (batch {args.batch}, "
              f"{int(a.sum())} tokens)")


if __name__ == "__main__":
    main()
