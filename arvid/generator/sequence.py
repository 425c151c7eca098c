"""The generator's sequence format (design.md, Contracts).

A video with assignment ``(k_1, ..., k_K)`` becomes

    [LEN(k_1) c c ... c] [LEN(k_2) c ... c] ... [LEN(k_K) c ... c]

with ``k_t`` codes after each length token: ``K + sum(k)`` tokens. Conditioning (class, text,
context) is not in this sequence: the model puts it in front as a prefix of embeddings, and
frame prediction loss-masks the context blocks of the sequence itself.

One vocabulary: codes ``0 .. V-1``, then one length token per candidate count
(``V + i`` for ``candidates[i]``). The structure fully determines where a sequence ends, so
no end token is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arvid.data.types import BlockLayout, TokenizedVideo


class MalformedSequence(ValueError):
    """A token sequence does not follow the format; the message says where and why."""


@dataclass(frozen=True)
class SequenceFormat:
    codebook_size: int
    layout: BlockLayout

    def __post_init__(self) -> None:
        if self.codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {self.codebook_size}")

    # ------------------------------------------------------------------ vocabulary
    @property
    def len_token_base(self) -> int:
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.layout.num_candidates

    @property
    def max_length(self) -> int:
        """Longest sequence: every block at the largest count."""
        return self.layout.num_blocks + self.layout.max_tokens

    def len_token(self, count: int) -> int:
        try:
            return self.codebook_size + self.layout.candidates.index(int(count))
        except ValueError:
            raise ValueError(f"{count} is not a candidate count {self.layout.candidates}") from None

    def len_tokens(self) -> torch.Tensor:
        """Ids of all length tokens, in candidate order, ``LongTensor[C]``."""
        return torch.arange(self.codebook_size, self.vocab_size)

    def count_of(self, token: torch.Tensor) -> torch.Tensor:
        """Length-token ids -> token counts (elementwise); undefined for code ids."""
        cand = torch.tensor(self.layout.candidates, device=token.device)
        return cand[(token - self.codebook_size).clamp(0, self.layout.num_candidates - 1)]

    def is_len_token(self, token: torch.Tensor) -> torch.Tensor:
        return (token >= self.codebook_size) & (token < self.vocab_size)

    # ------------------------------------------------------------------ lengths
    def sequence_lengths(self, block_lengths: torch.Tensor) -> torch.Tensor:
        """``LongTensor[B, K]`` -> ``LongTensor[B]``: ``K + sum(k)``."""
        return block_lengths.shape[1] + block_lengths.sum(1)

    def prefix_length(self, block_lengths: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Tokens of the first ``num_blocks`` blocks (their length tokens included), ``LongTensor[B]``."""
        return num_blocks + block_lengths[:, :num_blocks].sum(1)

    # ------------------------------------------------------------------ conversion
    def to_sequences(self, tokens: TokenizedVideo) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed codes -> packed sequences ``LongTensor[sum L]`` and their lengths ``LongTensor[B]``."""
        bl = tokens.block_lengths
        B, K = bl.shape
        if K != self.layout.num_blocks:
            raise ValueError(f"tokens have {K} blocks, the format expects {self.layout.num_blocks}")
        self.layout.validate(bl)
        if tokens.codes.numel() and (int(tokens.codes.min()) < 0 or int(tokens.codes.max()) >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range "
                             f"[{int(tokens.codes.min())}, {int(tokens.codes.max())}]")
        lengths = self.sequence_lengths(bl)
        out = torch.empty(int(lengths.sum()), dtype=torch.long, device=tokens.codes.device)
        # Positions of length tokens: each block occupies 1 + k_t slots.
        slots = (bl + 1).reshape(-1)  # [B*K]
        starts = torch.nn.functional.pad(slots.cumsum(0), (1, 0))[:-1]  # [B*K]
        is_len = torch.zeros_like(out, dtype=torch.bool)
        is_len[starts] = True
        out[starts] = self.codebook_size + self.layout.candidate_positions(bl).reshape(-1)
        out[~is_len] = tokens.codes
        return out, lengths

    def from_sequences(self, seq: torch.Tensor, lengths: torch.Tensor) -> TokenizedVideo:
        """Packed sequences -> :class:`TokenizedVideo`; raises :class:`MalformedSequence` if any is ill-formed."""
        seqs = torch.split(seq.cpu(), [int(x) for x in lengths.tolist()])
        all_codes, all_bl = [], []
        for i, s in enumerate(seqs):
            codes, bl = self.parse_one(s, where=f"sequence {i}")
            all_codes.append(codes)
            all_bl.append(bl)
        return TokenizedVideo(torch.cat(all_codes) if all_codes else seq[:0],
                              torch.stack(all_bl) if all_bl else torch.zeros(0, self.layout.num_blocks, dtype=torch.long))

    def parse_one(self, s: torch.Tensor, where: str = "sequence") -> tuple[torch.Tensor, torch.Tensor]:
        """One unpacked sequence -> (codes, block lengths ``LongTensor[K]``)."""
        s = s.tolist()
        pos, codes, bl = 0, [], []
        for k in range(self.layout.num_blocks):
            if pos >= len(s):
                raise MalformedSequence(f"{where}: ends after {k} of {self.layout.num_blocks} blocks")
            tok = s[pos]
            if not (self.codebook_size <= tok < self.vocab_size):
                raise MalformedSequence(f"{where}: position {pos} should be a length token, got id {tok}")
            n = self.layout.candidates[tok - self.codebook_size]
            block = s[pos + 1:pos + 1 + n]
            if len(block) != n or any(not (0 <= c < self.codebook_size) for c in block):
                raise MalformedSequence(f"{where}: block {k} should hold {n} codes after position {pos}")
            codes.extend(block)
            bl.append(n)
            pos += 1 + n
        if pos != len(s):
            raise MalformedSequence(f"{where}: {len(s) - pos} tokens after the last block")
        return torch.tensor(codes, dtype=torch.long), torch.tensor(bl, dtype=torch.long)

    def is_well_formed(self, s: torch.Tensor) -> bool:
        try:
            self.parse_one(s)
            return True
        except MalformedSequence:
            return False

    def context_mask(self, block_lengths: torch.Tensor, num_context_blocks: int) -> torch.Tensor:
        """``BoolTensor[sum L]`` over packed sequences: True on tokens of the first ``num_context_blocks``
        blocks (frame prediction's context, excluded from the loss)."""
        lengths = self.sequence_lengths(block_lengths)
        ctx = self.prefix_length(block_lengths, num_context_blocks)
        idx = torch.arange(int(lengths.max()) if lengths.numel() else 0, device=block_lengths.device)
        mask = idx[None, :] < ctx[:, None]  # [B, Lmax]
        valid = idx[None, :] < lengths[:, None]
        return mask[valid]
