"""What the generator is conditioned on, and the training-time dropout that makes CFG possible.

A :class:`Conditioning` holds one row per sample. The GPT embeds it as a prefix of ``n``
slots in front of the token sequence (``GPT.num_prefix``): a class slot (an embedding with
one extra *null* class, id ``num_classes``, for unconditional / CFG rows), then
``max_text_len`` text slots (SentencePiece ids, padded with the pad id), or, for a model with
neither, one learned start slot. Frame prediction needs no entry here: its context is the
first blocks of the token sequence itself, loss-masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """``class_ids``: ``LongTensor[B]`` (null id == ``num_classes``); ``text_ids``: ``LongTensor[B, Lt]``."""

    class_ids: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.class_ids is not None and self.class_ids.dim() != 1:
            raise ValueError(f"class_ids must be LongTensor[B], got shape {tuple(self.class_ids.shape)}")
        if self.text_ids is not None and self.text_ids.dim() != 2:
            raise ValueError(f"text_ids must be LongTensor[B, Lt], got shape {tuple(self.text_ids.shape)}")
        if self.class_ids is not None and self.text_ids is not None and (
                self.class_ids.shape[0] != self.text_ids.shape[0]):
            raise ValueError(f"class_ids has {self.class_ids.shape[0]} rows but text_ids has {self.text_ids.shape[0]}")

    @property
    def batch_size(self) -> int | None:
        """Rows, or None when the conditioning is empty (an unconditional model)."""
        if self.class_ids is not None:
            return int(self.class_ids.shape[0])
        if self.text_ids is not None:
            return int(self.text_ids.shape[0])
        return None

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(
            None if self.class_ids is None else self.class_ids.to(device),
            None if self.text_ids is None else self.text_ids.to(device),
        )

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated ``n`` times in place (row i -> rows i*n .. i*n+n-1)."""
        return Conditioning(
            None if self.class_ids is None else self.class_ids.repeat_interleave(n, 0),
            None if self.text_ids is None else self.text_ids.repeat_interleave(n, 0),
        )

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Rows of all items, in order (e.g. cond rows then uncond rows for CFG)."""
        def cat_field(name: str) -> torch.Tensor | None:
            vals = [getattr(c, name) for c in items]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"cannot concatenate conditionings where only some have {name}")
            return torch.cat(vals)

        return Conditioning(cat_field("class_ids"), cat_field("text_ids"))


def drop_classes(class_ids: torch.Tensor, p: float, null_id: int,
                 generator: torch.Generator | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Replace each class id by ``null_id`` with probability ``p`` (classifier-free guidance training).

    ``class_ids``: ``LongTensor[S]`` -> ``LongTensor[S]``. The draw uses ``generator`` (on the CPU,
    so the same seed drops the same rows on every device). ``drop``: a given ``BoolTensor[S]``
    instead of a draw (one draw shared with the text, see ``GPT.drop_condition``).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"class dropout must lie in [0, 1], got {p}")
    if p == 0.0 or class_ids.numel() == 0:
        return class_ids
    if drop is None:
        drop = torch.rand(class_ids.shape, generator=generator) < p  # [S] on CPU
    return torch.where(drop.to(class_ids.device), torch.full_like(class_ids, null_id), class_ids)


def drop_text(text_ids: torch.Tensor, p: float, pad_id: int,
              generator: torch.Generator | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Replace each row of ``text_ids`` ``LongTensor[S, Lt]`` by all-pad (the empty text) with probability
    ``p`` (or where a given ``drop`` ``BoolTensor[S]`` is True)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"text dropout must lie in [0, 1], got {p}")
    if p == 0.0 or text_ids.numel() == 0:
        return text_ids
    if drop is None:
        drop = torch.rand(text_ids.shape[:1], generator=generator) < p  # [S]
    return torch.where(drop.to(text_ids.device)[:, None], torch.full_like(text_ids, pad_id), text_ids)
