"""A token store of random codes for a tokenizer: what the generator tests train on."""

from __future__ import annotations

from pathlib import Path

import torch

from arvid.data.token_store import TokenStoreWriter
from arvid.data.types import TokenizedVideo


def write_random_store(path: str | Path, tok, n: int, num_classes: int, seed: int = 0) -> None:
    """``n`` videos of random assignments and codes of ``tok`` at ``path``; video ``i`` has label
    ``i % num_classes`` and id ``i``."""
    g = torch.Generator().manual_seed(seed)
    asg = tok.layout.random_assignments(n, g)
    codes = torch.randint(0, tok.codebook_size, (int(asg.sum()),), generator=g)
    with TokenStoreWriter(path, tok.fingerprint(), tok.layout, tok.codebook_size) as w:
        w.append(TokenizedVideo(codes, asg), labels=[i % num_classes for i in range(n)], video_ids=list(range(n)))
