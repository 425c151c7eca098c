"""Text conditioning: a SentencePiece model trained on captions or class names.

``train_spm(input, out_dir, vocab_size)`` writes ``out_dir/spm.model`` (+ ``spm.vocab`` and
``text.yaml`` with the ids); ``TextEncoder(out_dir).encode(texts, max_len)`` gives
``LongTensor[B, max_len]`` padded with the pad id (0). The GPT embeds those ids as prefix slots
(``GPTConfig.text_vocab_size = encoder.vocab_size``, ``max_text_len``, ``text_pad_id``); an
all-pad row is the empty text, the unconditional row of classifier-free guidance.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from arvid.config import dump_yaml
from arvid.io import atomic_dir

MODEL_NAME = "spm.model"
META_NAME = "text.yaml"
PAD_ID, UNK_ID = 0, 1


def train_spm(input_path: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int,
              model_type: str = "unigram", character_coverage: float = 1.0) -> Path:
    """Train a SentencePiece model on ``input_path`` (one caption or class name per line).

    ``vocab_size`` is an upper bound: a small corpus (a list of class names) cannot support a
    large vocabulary, so SentencePiece may produce fewer pieces (``hard_vocab_limit=False``).
    Ids: 0 pad, 1 unknown; no bos/eos (a prefix of fixed slots needs neither).
    """
    import sentencepiece as spm

    input_path, out_dir = Path(input_path), Path(out_dir)
    if input_path.is_dir():
        raise IsADirectoryError(f"caption file {str(input_path)!r} is a folder: give a text file, one caption or "
                                "class name per line")
    if not input_path.is_file():
        raise FileNotFoundError(f"caption file {str(input_path)!r} does not exist")
    try:
        text = input_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {str(input_path)!r} is not UTF-8 text (one caption or class name per "
                         f"line expected): {e}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"caption file {str(input_path)!r} has no non-empty lines")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"model_type must be unigram|bpe|char|word, got {model_type!r}")
    # the model folder is replaced as a whole: never a folder (or file) holding anything else
    # (before 2026-12-07 `--out outputs/ucf` deleted that experiment)
    ours = {MODEL_NAME, "spm.vocab", META_NAME}
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file, not a folder for the SentencePiece model")
    if out_dir.is_dir():
        other = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
        if other:
            raise ValueError(f"--out {str(out_dir)!r} holds other files ({', '.join(other[:5])}): give an empty or "
                             "new folder (the model's folder is replaced as a whole)")
    with atomic_dir(out_dir) as tmp:
        # Underscores separate words in UCF-style class names ("Apply_Eye_Makeup").
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n".join(_normalise(t) for t in lines) + "\n", encoding="utf-8")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(tmp / "spm"), vocab_size=int(vocab_size),
                model_type=model_type, character_coverage=character_coverage, hard_vocab_limit=False,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1, num_threads=1, minloglevel=2,
            )
        except RuntimeError as e:  # SentencePiece's own checks, e.g. a vocabulary below the corpus's characters
            why = str(e).split(")", 1)[-1].strip(" :") if ")" in str(e) else str(e)
            raise ValueError(f"SentencePiece could not train on {str(input_path)!r} with vocab_size {vocab_size} "
                             f"({model_type}): {why}") from None
        corpus.unlink()
        sp = spm.SentencePieceProcessor(model_file=str(tmp / MODEL_NAME))
        longest = max(len(sp.encode(_normalise(t))) for t in lines)
        meta = {"vocab_size": sp.get_piece_size(), "pad_id": PAD_ID, "unk_id": UNK_ID, "model_type": model_type,
                "longest_line_tokens": longest, "lines": len(lines)}
        (tmp / META_NAME).write_text(dump_yaml(meta))
    return out_dir


def _normalise(text: str) -> str:
    return " ".join(text.replace("_", " ").split())


class TextEncoder:
    """A trained SentencePiece model: texts -> ``LongTensor[B, max_len]`` padded with ``pad_id``."""

    def __init__(self, spm_dir: str | os.PathLike, max_len: int | None = None) -> None:
        import sentencepiece as spm

        self.dir = Path(spm_dir)
        path = self.dir / MODEL_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist; train one with `arvid text train-spm "
                                    f"--input captions.txt --out {self.dir} --vocab-size N`")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        meta_path = self.dir / META_NAME
        meta = yaml.safe_load(meta_path.read_text()) if meta_path.is_file() else {}
        self.pad_id = int(meta.get("pad_id", self.sp.pad_id()))
        if self.pad_id < 0:
            raise ValueError(f"{str(path)!r} has no pad id; retrain it with `arvid text train-spm`")
        self.max_len = int(max_len if max_len is not None else meta.get("longest_line_tokens", 16))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """sha256 of the model file: train-generator records it, and sampling refuses another model
        (a model retrained into the same folder gives other ids for the same words)."""
        from arvid.io import sha256_file

        return sha256_file(self.dir / MODEL_NAME)

    def encode(self, texts: list[str], max_len: int | None = None) -> torch.Tensor:
        """``list[str]`` -> ``LongTensor[B, max_len]``: ids, truncated, right-padded with ``pad_id``;
        the empty string gives an all-pad row (the unconditional text)."""
        if isinstance(texts, str):
            raise TypeError("TextEncoder.encode takes a list of strings, got one string")
        n = self.max_len if max_len is None else int(max_len)
        out = torch.full((len(texts), n), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = self.sp.encode(_normalise(t))[:n]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: torch.Tensor) -> list[str]:
        """``LongTensor[B, L]`` -> texts (pad ids dropped)."""
        return [self.sp.decode([int(i) for i in row if int(i) != self.pad_id]) for row in ids]
