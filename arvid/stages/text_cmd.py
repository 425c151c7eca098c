"""`arvid text train-spm`: train the SentencePiece model that text conditioning uses.

    arvid text train-spm --input captions.txt --out spm/ --vocab-size 1000

The input has one caption (or one class name) per line. The output folder holds
``spm.model`` and ``text.yaml`` (vocabulary size, pad id, longest line in tokens); point
``TrainGeneratorConfig.spm_dir`` at it.
"""

from __future__ import annotations

import argparse
import logging

from arvid.config import int_at_least
from arvid.generator.text import TextEncoder, train_spm

log = logging.getLogger(__name__)


def run_train_spm(input_path: str, out: str, vocab_size: int, model_type: str = "unigram") -> dict:
    """Train, then load back and report what the model does with the first lines."""
    out_dir = train_spm(input_path, out, vocab_size, model_type=model_type)
    enc = TextEncoder(out_dir)
    info = {"out": str(out_dir), "vocab_size": enc.vocab_size, "pad_id": enc.pad_id, "max_len": enc.max_len}
    print(f"wrote {out_dir}/spm.model: {enc.vocab_size} pieces (asked for at most {vocab_size}), "
          f"pad id {enc.pad_id}, longest line {enc.max_len} tokens")
    return info


def _run(args: argparse.Namespace) -> int:
    run_train_spm(args.input, args.out, args.vocab_size, args.model_type)
    return 0


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register ``text train-spm`` under a ``text`` command group."""
    text = subparsers.add_parser("text", help="text conditioning: train a SentencePiece model")
    text.set_defaults(func=lambda args, _p=text: _p.print_help() or 2)
    sub = text.add_subparsers(dest="text_command", metavar="SUBCOMMAND")
    p = sub.add_parser("train-spm", help="train SentencePiece on captions or class names (one per line)")
    p.add_argument("--input", required=True, help="text file, one caption or class name per line")
    p.add_argument("--out", required=True, help="output folder (spm.model, text.yaml)")
    p.add_argument("--vocab-size", type=int_at_least(4), required=True, help="at most this many pieces (at least 4)")
    p.add_argument("--model-type", choices=("unigram", "bpe", "char", "word"), default="unigram",
                   help="SentencePiece model type (default unigram)")
    p.set_defaults(func=_run)


__all__ = ["add_arguments", "run_train_spm"]
