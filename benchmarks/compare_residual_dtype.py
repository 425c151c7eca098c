"""Train the same GPT twice, float32 vs bf16 residual stream (``GPTConfig.residual_dtype``), and
compare the loss curves: the check ``residual_dtype: compute`` waits for before it can be a default.

    python benchmarks/compare_residual_dtype.py                  # CPU, ~4 min on 2 cores
    python benchmarks/compare_residual_dtype.py --device cuda --dim 512 --layers 8 --steps 2000

Both runs share the initial weights, the batches and the optimizer settings; only the residual
stream's dtype differs (bf16 autocast in both). The data is learnable, so the curves mean
something: every class has its own first-order Markov chain over the codes (a random sparse
transition table), and the sequences have router-like lengths, packed into token-budget batches.
Every step gets a fresh batch (``--batches 0``), so the training loss is also the held-out loss;
the loss a model can reach is about the chains' entropy, printed as ``floor``. Prints one JSON object
with the mean loss over windows of steps for both runs and their relative difference.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arvid.generator.gpt import GPT, GPTConfig  # noqa: E402
from arvid.generator.packing import IGNORE, pack_sequences  # noqa: E402


def markov_tables(classes: int, vocab: int, fanout: int, gen: torch.Generator) -> torch.Tensor:
    """``[classes, vocab, vocab]`` transition probabilities: each code may be followed by ``fanout``
    codes, with random weights."""
    probs = torch.zeros(classes, vocab, vocab)
    for c in range(classes):
        nxt = torch.stack([torch.randperm(vocab, generator=gen)[:fanout] for _ in range(vocab)])  # [V, fanout]
        w = torch.rand(vocab, fanout, generator=gen) + 0.1
        probs[c].scatter_(1, nxt, w / w.sum(1, keepdim=True))
    return probs


def entropy_floor(probs: torch.Tensor) -> float:
    """Mean per-token entropy of the chains (uniform start and stationary-ish mixing: the average
    over rows is the floor a perfect model reaches on long sequences)."""
    p = probs.clamp_min(1e-12)
    return float(-(probs * p.log()).sum(-1).mean())


def make_batches(probs: torch.Tensor, count: int, max_tokens: int, gen: torch.Generator) -> list:
    """``count`` packed batches of fresh sequences (lengths uniform in [max_tokens/8, max_tokens/3)),
    sampled from the chains of random classes, all rows of a batch stepped together."""
    classes, vocab, _ = probs.shape
    batches = []
    for _ in range(count):
        lens, used = [], 0
        while True:
            n = int(torch.randint(max_tokens // 8, max_tokens // 3, (1,), generator=gen))
            if used + n + 1 > max_tokens:
                break
            lens.append(n)
            used += n + 1
        cls = torch.randint(0, classes, (len(lens),), generator=gen)
        seq = torch.empty(len(lens), max(lens), dtype=torch.long)
        seq[:, 0] = torch.randint(0, vocab, (len(lens),), generator=gen)
        for i in range(1, seq.shape[1]):
            seq[:, i] = torch.multinomial(probs[cls, seq[:, i - 1]], 1, generator=gen)[:, 0]
        seqs = [seq[j, :n] for j, n in enumerate(lens)]
        batches.append(pack_sequences(seqs, 1, cls, pad_to=max_tokens, max_seqlen=max_tokens))
    return batches


def train(residual_dtype: str, args, init: dict, batches: list, device: torch.device) -> list[float]:
    cfg = GPTConfig(vocab_size=args.vocab, max_seq_len=args.max_tokens, num_classes=args.classes, dim=args.dim,
                    n_layers=args.layers, n_heads=args.heads, attn_backend="sdpa" if device.type == "cpu" else "auto",
                    residual_dtype=residual_dtype, class_dropout=0.0)
    model = GPT(cfg).to(device)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(args.steps):
        b = batches[step % len(batches)].to(device)
        for g in opt.param_groups:  # linear warm-up over the first 5% of the steps
            g["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.steps // 20))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(b)
        loss = F.cross_entropy(logits.float(), b.targets, ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--fanout", type=int, default=4, help="codes that may follow each code")
    p.add_argument("--max-tokens", type=int, default=512, help="packed positions per batch")
    p.add_argument("--batches", type=int, default=0, help="distinct batches, cycled (0: a fresh batch every step)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--window", type=int, default=50, help="steps per reported mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    probs = markov_tables(args.classes, args.vocab, args.fanout, gen)
    batches = make_batches(probs, args.batches or args.steps, args.max_tokens, gen)
    torch.manual_seed(args.seed)
    init = GPT(GPTConfig(vocab_size=args.vocab, max_seq_len=args.max_tokens, num_classes=args.classes,
                         dim=args.dim, n_layers=args.layers, n_heads=args.heads)).state_dict()
    t0 = time.perf_counter()
    curves = {rd: train(rd, args, init, batches, device) for rd in ("float32", "compute")}
    w = args.window
    windows = []
    for i in range(0, args.steps, w):
        a, b = (sum(curves[rd][i:i + w]) / len(curves[rd][i:i + w]) for rd in ("float32", "compute"))
        windows.append({"steps": f"{i}-{min(i + w, args.steps) - 1}", "float32": a, "compute": b,
                        "rel_diff": (b - a) / a})
    result = {"bench": "compare_residual_dtype",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "floor": entropy_floor(probs), "log_vocab": float(torch.tensor(args.vocab).log()),
              "seconds": time.perf_counter() - t0, "windows": windows}
    print(f"# floor (the chains' entropy) {result['floor']:.3f}, log(vocab) {result['log_vocab']:.3f}")
    print(f"{'steps':>10s} {'float32':>9s} {'compute':>9s} {'rel diff':>9s}")
    for r in windows:
        print(f"{r['steps']:>10s} {r['float32']:9.4f} {r['compute']:9.4f} {r['rel_diff']:9.2%}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
