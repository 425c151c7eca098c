"""The types that cross stage boundaries (design.md, Contracts).

- :class:`BlockLayout`: causal temporal blocks and the candidate token counts per block.
  An *assignment* is one count per block, a ``LongTensor[B, K]``; assignments are enumerable
  and indexable (index <-> tuple), which gives the router its classes.
- :class:`TokenizedVideo`: packed codes of a batch of videos plus their per-block lengths.
  It goes tokenizer -> token store -> generator -> sampler -> tokenizer.decode unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from arvid.config import doc


@dataclass(frozen=True)
class BlockLayout:
    """How a clip is cut into causal temporal blocks, and what each block may cost in tokens.

    Assignment index order is lexicographic over candidate *positions*, first block most
    significant: index 0 is all-smallest, the last index all-largest, and the assignments that
    share a prefix of blocks are contiguous (block-causal search walks prefixes).
    """

    frames_per_block: tuple[int, ...] = doc((4, 4, 4, 4), "frames in each causal temporal block")
    candidates: tuple[int, ...] = doc((32, 64, 128, 256, 512), "allowed token counts per block, ascending")

    def __post_init__(self) -> None:
        fpb = tuple(int(x) for x in self.frames_per_block)
        cand = tuple(int(x) for x in self.candidates)
        object.__setattr__(self, "frames_per_block", fpb)
        object.__setattr__(self, "candidates", cand)
        if not fpb or any(f <= 0 for f in fpb):
            raise ValueError(f"frames_per_block must be positive integers, got {fpb}")
        if not cand or any(c <= 0 for c in cand):
            raise ValueError(f"candidates must be positive integers, got {cand}")
        if list(cand) != sorted(set(cand)):
            raise ValueError(f"candidates must be strictly ascending without repeats, got {cand}")

    # ------------------------------------------------------------------ sizes
    @property
    def num_blocks(self) -> int:
        return len(self.frames_per_block)

    @property
    def num_frames(self) -> int:
        return sum(self.frames_per_block)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    @property
    def num_assignments(self) -> int:
        return self.num_candidates**self.num_blocks

    @property
    def min_tokens(self) -> int:
        return self.candidates[0] * self.num_blocks

    @property
    def max_tokens(self) -> int:
        return self.candidates[-1] * self.num_blocks

    @property
    def block_starts(self) -> tuple[int, ...]:
        """First frame of each block."""
        return tuple(itertools.accumulate((0,) + self.frames_per_block[:-1]))

    def block_of_frame(self, frame: int) -> int:
        for k, (s, n) in enumerate(zip(self.block_starts, self.frames_per_block)):
            if s <= frame < s + n:
                return k
        raise IndexError(f"frame {frame} is outside the layout's {self.num_frames} frames")

    # ------------------------------------------------------------------ assignments
    @cached_property
    def _cand_tensor(self) -> torch.Tensor:
        return torch.tensor(self.candidates, dtype=torch.long)

    def uniform(self, count: int, batch: int = 1) -> torch.Tensor:
        """The assignment giving every block ``count`` tokens, ``LongTensor[batch, K]``."""
        if count not in self.candidates:
            raise ValueError(f"uniform count {count} is not a candidate {self.candidates}")
        return torch.full((batch, self.num_blocks), count, dtype=torch.long)

    def all_assignments(self) -> torch.Tensor:
        """Every assignment in index order, ``LongTensor[num_assignments, K]``."""
        return self.indices_to_assignments(torch.arange(self.num_assignments))

    def indices_to_assignments(self, idx: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B]`` of indices -> ``LongTensor[B, K]`` of token counts."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_assignments):
            raise ValueError(f"assignment index out of range [0, {self.num_assignments}): {idx.tolist()[:8]}")
        C, K = self.num_candidates, self.num_blocks
        powers = C ** torch.arange(K - 1, -1, -1, device=idx.device)  # first block most significant
        pos = (idx[..., None] // powers) % C  # [B, K] candidate positions
        return self._cand_tensor.to(idx.device)[pos]

    def candidate_positions(self, assignment: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, K]`` counts -> positions in ``candidates``; raises on a non-candidate count."""
        a = torch.as_tensor(assignment, dtype=torch.long)
        cand = self._cand_tensor.to(a.device)
        match = a[..., None] == cand  # [B, K, C]
        if not bool(match.any(-1).all()):
            bad = a[~match.any(-1)].unique().tolist()
            raise ValueError(f"token counts {bad} are not candidates of this layout {self.candidates}")
        return match.long().argmax(-1)

    def assignments_to_indices(self, assignment: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, K]`` counts -> ``LongTensor[B]`` indices."""
        a = self.validate(assignment)
        pos = self.candidate_positions(a)
        C, K = self.num_candidates, self.num_blocks
        powers = C ** torch.arange(K - 1, -1, -1, device=a.device)
        return (pos * powers).sum(-1)

    def validate(self, assignment: torch.Tensor | list | tuple, batch: int | None = None) -> torch.Tensor:
        """Return ``assignment`` as ``LongTensor[B, K]``; a clear error if it does not fit the layout."""
        a = torch.as_tensor(assignment, dtype=torch.long)
        if a.dim() == 1:
            a = a[None]
        if a.dim() != 2 or a.shape[1] != self.num_blocks:
            raise ValueError(
                f"an assignment must have shape [B, {self.num_blocks}] (one count per block), got {tuple(a.shape)}"
            )
        if batch is not None and a.shape[0] not in (1, batch):
            raise ValueError(f"assignment batch {a.shape[0]} does not match video batch {batch}")
        self.candidate_positions(a)
        if batch is not None and a.shape[0] == 1 and batch > 1:
            a = a.expand(batch, -1)
        return a

    def random_assignments(self, batch: int, generator: torch.Generator | None = None,
                           probs: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``batch`` assignments, uniform over all of them or from ``probs[num_assignments]``."""
        if probs is None:
            idx = torch.randint(self.num_assignments, (batch,), generator=generator)
        else:
            idx = torch.multinomial(probs.float(), batch, replacement=True, generator=generator)
        return self.indices_to_assignments(idx)

    def to_dict(self) -> dict:
        return {"frames_per_block": list(self.frames_per_block), "candidates": list(self.candidates)}


@dataclass
class TokenizedVideo:
    """A batch of tokenized videos, packed.

    ``codes``: ``LongTensor[sum of all lengths]``, video 0's blocks in order, then video 1's ...
    ``block_lengths``: ``LongTensor[B, K]``, tokens of block k of video b.
    Offsets are derived, never stored, so the two fields cannot disagree.
    """

    codes: torch.Tensor
    block_lengths: torch.Tensor

    def __post_init__(self) -> None:
        if self.codes.dim() != 1:
            raise ValueError(f"codes must be 1-D (packed), got shape {tuple(self.codes.shape)}")
        if self.block_lengths.dim() != 2:
            raise ValueError(f"block_lengths must be [B, K], got shape {tuple(self.block_lengths.shape)}")
        total = int(self.block_lengths.sum())
        if total != self.codes.numel():
            raise ValueError(f"block_lengths sum to {total} but there are {self.codes.numel()} codes")

    @property
    def batch_size(self) -> int:
        return self.block_lengths.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def num_blocks(self) -> int:
        return self.block_lengths.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per video, ``LongTensor[B]``."""
        return self.block_lengths.sum(1)

    @property
    def offsets(self) -> torch.Tensor:
        """Start of each video in ``codes`` plus the end, ``LongTensor[B + 1]``."""
        return torch.nn.functional.pad(self.lengths.cumsum(0), (1, 0))

    def video_codes(self, i: int) -> torch.Tensor:
        off = self.offsets
        return self.codes[int(off[i]):int(off[i + 1])]

    def block_codes(self, i: int, k: int) -> torch.Tensor:
        start = int(self.offsets[i]) + int(self.block_lengths[i, :k].sum())
        return self.codes[start:start + int(self.block_lengths[i, k])]

    def split(self) -> list[TokenizedVideo]:
        return [TokenizedVideo(self.video_codes(i).clone(), self.block_lengths[i:i + 1].clone())
                for i in range(self.batch_size)]

    def select(self, indices: list[int] | torch.Tensor) -> TokenizedVideo:
        """The videos ``indices`` (negative ones count from the end) in that order, by one gather
        of their codes (index arithmetic on the host)."""
        B = self.batch_size
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        idx = torch.where(idx < 0, idx + B, idx)
        if bool(((idx < 0) | (idx >= B)).any()):
            raise IndexError(f"video index {torch.as_tensor(indices).reshape(-1).tolist()} out of range for {B} videos")
        lengths = self.block_lengths.detach().cpu().sum(1).numpy()
        starts = np.cumsum(lengths) - lengths
        n = lengths[idx.numpy()]
        pos = torch.from_numpy(np.repeat(starts[idx.numpy()], n) + segment_positions(n))
        return TokenizedVideo(self.codes[pos.to(self.codes.device)], self.block_lengths[idx.to(self.block_lengths.device)])

    @staticmethod
    def cat(items: list[TokenizedVideo]) -> TokenizedVideo:
        if not items:
            raise ValueError("cannot concatenate an empty list of TokenizedVideo")
        return TokenizedVideo(torch.cat([t.codes for t in items]), torch.cat([t.block_lengths for t in items]))

    def to(self, device: torch.device | str) -> TokenizedVideo:
        return TokenizedVideo(self.codes.to(device), self.block_lengths.to(device))

    def equal(self, other: TokenizedVideo) -> bool:
        return torch.equal(self.codes.cpu(), other.codes.cpu()) and torch.equal(
            self.block_lengths.cpu(), other.block_lengths.cpu())


def segment_positions(lengths: np.ndarray) -> np.ndarray:
    """``int64[sum(lengths)]``: each element's position inside its segment, for segments of
    ``lengths`` laid end to end (``[2, 3] -> [0, 1, 0, 1, 2]``). Host index arithmetic of packed
    sequences, in numpy: torch's CPU ``repeat_interleave`` waits on its intra-op thread pool."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
