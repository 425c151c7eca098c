"""Tokenizer throughput: EVATok proxy training, encode/decode, and the cost of mixed assignments.

    python benchmarks/bench_tokenizer.py                                # GPU, preset S, bf16
    python benchmarks/bench_tokenizer.py --device cpu --preset debug --steps 2   # CPU smoke run

Measures, on clips of the preset's size (S/B: 16 x 128 x 128):
1. proxy training: clips/s of full training steps (random assignment per sample, L1 + VQ +
   entropy losses, AdamW), in ``--precision``;
2. encode and decode: clips/s under the tokenizer's default assignment;
3. packing: the time of a forward+backward on a batch of random (mixed) assignments against a
   batch whose every video has the same assignment with the batch's mean token count
   (goal: ratio <= 1.3, i.e. mixed batches cost about what their token count costs).
Prints one JSON object (with the command, device and date) and appends it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from contextlib import nullcontext

import torch

from arvid.tokenizer.base import build_tokenizer
from arvid.tokenizer.losses import LossConfig, RandomAssignments, TokenizerTask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Mean seconds per call of ``fn`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / max(steps, 1)


def closest_uniform_batch(layout, totals: torch.Tensor, batch: int) -> torch.Tensor:
    """The single assignment whose token count is closest to ``totals.float().mean()``, for every video."""
    every = layout.all_assignments()
    best = (every.sum(1).float() - totals.float().mean()).abs().argmin()
    return every[best][None].expand(batch, -1).clone()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="S", help="evatok preset (debug, S, B)")
    p.add_argument("--batch", type=int, default=None, help="clips per batch (default: 16 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 3 GPU, 1 CPU)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--attention", default="auto", help="packed attention backend: auto, flex, loop, dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the JSON result to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    batch = args.batch or (16 if device.type == "cuda" else 2)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    tok = build_tokenizer("evatok", preset=args.preset, config={"attention": args.attention}).to(device)
    layout, cfg = tok.layout, tok.config

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    gen = torch.Generator().manual_seed(args.seed)
    video = (torch.rand(batch, cfg.in_channels, layout.num_frames, cfg.image_size, cfg.image_size,
                        generator=gen) * 2 - 1).to(device)

    # 1. proxy training steps
    task = TokenizerTask(tok, LossConfig(), RandomAssignments(layout)).to(device).train()
    opt = torch.optim.AdamW(task.optimizer_groups()["main"], lr=1e-4, fused=device.type == "cuda")

    def train_step():
        with amp():
            out = task.training_step({"video": video}, 0, gen)
        opt.zero_grad(set_to_none=True)
        out.losses["main"].backward()
        opt.step()

    t_train = _timed(train_step, device, args.steps, warmup)

    # 2. encode / decode under the default assignment
    tok.eval()
    with torch.no_grad():
        tokens = tok.encode(video)

        def enc():
            with amp():
                tok.encode(video)

        def dec():
            with amp():
                tok.decode(tokens)

        t_enc = _timed(enc, device, args.steps, warmup)
        t_dec = _timed(dec, device, args.steps, warmup)

    # 3. mixed assignments vs the same mean token count, uniform across the batch
    tok.train()
    mixed = layout.random_assignments(batch, generator=gen)
    same = closest_uniform_batch(layout, mixed.sum(1), batch)

    def fwd_bwd(a):
        def go():
            with amp():
                recon, qo = tok(video, a)
                loss = (recon.float() - video).abs().mean() + qo.losses["commit"]
            loss.backward()
            tok.zero_grad(set_to_none=True)
        return go

    t_mixed = _timed(fwd_bwd(mixed), device, args.steps, warmup)
    t_same = _timed(fwd_bwd(same), device, args.steps, warmup)

    result = {
        "benchmark": "bench_tokenizer",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset, "clip": [layout.num_frames, cfg.image_size, cfg.image_size],
        "params_M": round(sum(p.numel() for p in tok.parameters()) / 1e6, 2),
        "batch": batch, "precision": args.precision, "attention": args.attention,
        "train_clips_per_s": round(batch / t_train, 2),
        "encode_clips_per_s": round(batch / t_enc, 2),
        "decode_clips_per_s": round(batch / t_dec, 2),
        "default_tokens_per_clip": int(tokens.lengths[0]),
        "mixed_tokens_per_clip": [int(x) for x in mixed.sum(1)],
        "same_count_tokens_per_clip": int(same[0].sum()),
        "mixed_fwd_bwd_s": round(t_mixed, 4), "same_count_fwd_bwd_s": round(t_same, 4),
        "mixed_over_same": round(t_mixed / t_same, 3),
        "mixed_over_same_goal": 1.3,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
