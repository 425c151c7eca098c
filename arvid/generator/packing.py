"""Packed variable-length training batches: no padding, one row of all sequences.

For a sequence ``s_1..s_L`` behind ``n`` conditioning prefix slots the model input is
``[cond_1..cond_n, s_1, ..., s_{L-1}]`` (``n + L - 1`` positions) and the target at input index
``n - 1 + i`` is ``s_{i+1}``: the last prefix slot predicts the first token. Prefix slots before
the last have no target (-100); so do tokens excluded by a loss mask (frame prediction's
context blocks) and padding.

:class:`TokenBudgetBatchSampler` groups sequences into batches that fill a token budget
(first-fit-decreasing inside a shuffled window), deterministic per (seed, epoch).
:func:`collate_token_items` turns token-store items into a :class:`PackedBatch`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from arvid.data.types import BlockLayout, TokenizedVideo, segment_positions
from arvid.generator.sequence import SequenceFormat

IGNORE = -100


@dataclass
class PackedBatch:
    """All sequences of a batch concatenated; ``N`` packed positions, ``S`` sequences.

    tokens ``LongTensor[N]`` (0 at prefix slots), targets ``LongTensor[N]`` (-100: no loss),
    position_ids ``LongTensor[N]`` (restart at 0 per sequence), cu_seqlens ``IntTensor[S+1]``,
    max_seqlen, class_ids ``LongTensor[S]`` | None, text_ids ``LongTensor[S, Lt]`` | None,
    prefix_mask ``BoolTensor[N]`` (True at the conditioning slots, which start every sequence).
    A trailing padding segment (``pad_to``) is an extra entry of ``cu_seqlens`` beyond the first
    ``num_seqs`` sequences, with no prefix and no targets.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    class_ids: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    prefix_mask: torch.Tensor | None = None
    num_prefix: int = 1
    num_seqs: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.num_seqs < 0:
            self.num_seqs = self.cu_seqlens.numel() - 1
        n = self.tokens.shape[0]
        for name in ("targets", "position_ids"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"PackedBatch.{name} must have shape [{n}], got {tuple(getattr(self, name).shape)}")
        if self.prefix_mask is None:
            self.prefix_mask = torch.zeros(n, dtype=torch.bool, device=self.tokens.device)

    @property
    def num_tokens(self) -> int:
        """Packed positions ``N`` (prefix slots and padding included)."""
        return self.tokens.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def seqlens(self) -> torch.Tensor:
        """Lengths of the real sequences (padding excluded), ``LongTensor[S]``."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()[: self.num_seqs]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return PackedBatch(**kw)

    def pin_memory(self) -> PackedBatch:
        kw = {f.name: (getattr(self, f.name).pin_memory() if isinstance(getattr(self, f.name), torch.Tensor)
                       else getattr(self, f.name)) for f in fields(self)}
        return PackedBatch(**kw)


class LastBatchMemo:
    """Values derived from one batch's ``cu_seqlens``, kept while that tensor is the last one seen.

    Every layer of a forward (and backward) pass gets the same ``cu_seqlens``, so what an
    attention backend derives from it (xformers' mask, a host sync each; cudnn_fe's lengths and
    offsets, a few small kernels each) is made once per batch with ``get(cu, name, build)``. A
    tensor matches by data pointer, shape, strides, dtype, device and version counter while the
    memo holds a reference to it, so no other live tensor can match with other contents, and an
    in-place change is seen; an inference tensor (no version counter) never matches."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._cu: torch.Tensor | None = None
        self._values: dict = {}

    def get(self, cu: torch.Tensor, name, build):
        key = None if cu.is_inference() else (cu.data_ptr(), tuple(cu.shape), cu.stride(), cu.dtype, cu.device,
                                                cu._version)
        if key is None or key != self._key:
            self._key, self._cu, self._values = key, cu, {}
        if name not in self._values:
            self._values[name] = build()
        return self._values[name]


def pack_sequences(
    seqs: Sequence[torch.Tensor],
    num_prefix: int = 1,
    class_ids: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    loss_masks: Sequence[torch.Tensor] | None = None,
    pad_to: int | None = None,
    max_seqlen: int | None = None,
) -> PackedBatch:
    """Pack token sequences (each ``LongTensor[L_i]``, ``L_i >= 1``) behind ``num_prefix`` slots each.

    ``loss_masks``: per sequence ``BoolTensor[L_i]``, True where the token is a training target
    (None: all). ``pad_to``: append padding so ``N == pad_to`` (static shapes for torch.compile);
    an error if the batch is already longer. ``max_seqlen``: report this fixed bound instead of
    the batch's longest sequence (so a compiled step does not specialise on it); every sequence
    must fit, and padding is cut into segments no longer than it.
    """
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence")
    if loss_masks is not None and len(loss_masks) != len(seqs):
        raise ValueError(f"{len(loss_masks)} loss masks for {len(seqs)} sequences")
    s = len(seqs)
    for name, c in (("class_ids", class_ids), ("text_ids", text_ids)):
        if c is not None and c.shape[0] != s:
            raise ValueError(f"{name} has {c.shape[0]} rows for {s} sequences")
    flat_seqs = [np.asarray(torch.as_tensor(q, dtype=torch.long).reshape(-1)) for q in seqs]
    L = np.fromiter((q.size for q in flat_seqs), dtype=np.int64, count=s)
    if (L < 1).any():
        raise ValueError(f"sequence {int(np.argmax(L < 1))} is empty")
    mask = None
    if loss_masks is not None:
        ms = [np.asarray(torch.as_tensor(m, dtype=torch.bool).reshape(-1)) for m in loss_masks]
        for i, m in enumerate(ms):
            if m.size != L[i]:
                raise ValueError(f"loss mask {i} has {m.size} entries for a sequence of {int(L[i])} tokens")
        mask = np.concatenate(ms)
    return _pack_flat(np.concatenate(flat_seqs), L, num_prefix, class_ids, text_ids, mask, pad_to, max_seqlen)


def _pack_flat(flat: np.ndarray, L: np.ndarray, num_prefix: int, class_ids: torch.Tensor | None,
               text_ids: torch.Tensor | None, mask: np.ndarray | None, pad_to: int | None,
               max_seqlen: int | None) -> PackedBatch:
    """:func:`pack_sequences` of the sequences ``flat int64[sum L]`` cut at ``L int64[S]`` (all >= 1),
    with the loss mask ``mask bool[sum L]`` or None. Whole-batch numpy ops, no per-sequence tensors
    (``benchmarks/bench_packing.py``: 17.1 -> 1.4-2.0 ms per 32k-position batch, 2-core CPU,
    2026-12-05)."""
    if num_prefix < 1:
        raise ValueError(f"num_prefix must be >= 1 (the last prefix slot predicts the first token), got {num_prefix}")
    lens = (num_prefix + L - 1).tolist()  # positions per sequence: [cond_1..cond_n, s_1..s_{L-1}]
    total = int(sum(lens))
    if max_seqlen is not None and max(lens) > max_seqlen:
        raise ValueError(f"a packed sequence has {max(lens)} positions, more than max_seqlen={max_seqlen}")
    if pad_to is not None:  # padding segments, each no longer than max_seqlen
        if total > pad_to:
            raise ValueError(f"packed batch has {total} positions, more than pad_to={pad_to}")
        left = pad_to - total
        while left > 0:
            lens.append(left if max_seqlen is None else min(left, max_seqlen))
            left -= lens[-1]
    pos = segment_positions(lens)  # position in its sequence, padding segments included
    real = np.arange(pos.size) < total
    prefix = (pos < num_prefix) & real
    # each sequence's tokens but its last fill the non-prefix slots; all its tokens are the targets
    # of the positions from its last prefix slot on
    tokens = np.zeros(pos.size, dtype=np.int64)
    tokens[~prefix & real] = flat[segment_positions(L) < np.repeat(L - 1, L)]
    targets = np.full(pos.size, IGNORE, dtype=np.int64)
    targets[(pos >= num_prefix - 1) & real] = flat if mask is None else np.where(mask, flat, IGNORE)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return PackedBatch(
        tokens=torch.from_numpy(tokens), targets=torch.from_numpy(targets), position_ids=torch.from_numpy(pos),
        cu_seqlens=cu, max_seqlen=max(lens) if max_seqlen is None else int(max_seqlen), class_ids=class_ids,
        text_ids=text_ids, prefix_mask=torch.from_numpy(prefix), num_prefix=num_prefix, num_seqs=int(L.size),
    )


def concat_packed(batches: Sequence[PackedBatch]) -> PackedBatch:
    """Join packed batches into one: all real sequences first (the model reads their conditioning
    at the first ``num_seqs`` starts), then the padding segments."""
    if not batches:
        raise ValueError("concat_packed needs at least one batch")
    if len(batches) == 1:
        return batches[0]
    n_prefix = {b.num_prefix for b in batches}
    if len(n_prefix) != 1:
        raise ValueError(f"cannot join packed batches with different prefix lengths {sorted(n_prefix)}")
    # Real sequences first (the model puts conditioning at the first num_seqs starts), then padding.
    real, pad = [], []
    for b in batches:
        cu = b.cu_seqlens.long()
        for j in range(cu.numel() - 1):
            seg = slice(int(cu[j]), int(cu[j + 1]))
            (real if j < b.num_seqs else pad).append((b, seg))
    segs = real + pad
    cat = lambda name: torch.cat([getattr(b, name)[seg] for b, seg in segs])  # noqa: E731
    lens = [seg.stop - seg.start for _, seg in segs]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)

    def cond(name: str) -> torch.Tensor | None:
        vals = [getattr(b, name) for b in batches]
        if all(v is None for v in vals):
            return None
        if any(v is None for v in vals):
            raise ValueError(f"cannot join packed batches where only some have {name}")
        return torch.cat(vals)

    return PackedBatch(tokens=cat("tokens"), targets=cat("targets"), position_ids=cat("position_ids"),
                       cu_seqlens=cu, max_seqlen=max(max(lens), *(b.max_seqlen for b in batches)),
                       class_ids=cond("class_ids"),
                       text_ids=cond("text_ids"), prefix_mask=cat("prefix_mask"),
                       num_prefix=batches[0].num_prefix, num_seqs=sum(b.num_seqs for b in batches))


# --------------------------------------------------------------------------- batching by token budget


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices whose lengths sum to at most ``max_tokens``.

    Each epoch: a permutation from ``(seed, epoch)`` (when ``shuffle``), cut into windows of
    ``window`` sequences; inside a window, first-fit-decreasing bins of capacity
    ``max_tokens``; the bins of a window are yielded in an order also drawn from the generator.
    Every index appears exactly once per epoch (``drop_last`` drops only the epoch's final,
    least-filled batch when it is below half the budget). ``lengths[i]`` must be the packed
    length of item i (prefix slots included: ``num_prefix + L_i - 1``).

    Resumable: ``set_epoch(e)`` then ``skip(k)`` (or ``load_state_dict``) resumes after the
    k-th batch of epoch e. Use with ``DataLoader(ds, batch_sampler=sampler, collate_fn=...)``.
    """

    def __init__(self, lengths: Sequence[int] | torch.Tensor, max_tokens: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, window: int = 4096) -> None:
        self.lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
        if self.lengths.numel() == 0:
            raise ValueError("TokenBudgetBatchSampler needs at least one length")
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        too_long = (self.lengths > max_tokens).nonzero().flatten()
        if too_long.numel():
            i = int(too_long[0])
            raise ValueError(f"item {i} has {int(self.lengths[i])} tokens, more than max_tokens={max_tokens} "
                             f"({too_long.numel()} items do not fit); raise max_tokens")
        if int(self.lengths.min()) <= 0:
            raise ValueError("every length must be positive")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.window = int(window)
        self.epoch = 0
        self._skip = 0  # batches of this epoch to leave out at the next __iter__
        self._consumed = 0  # batches of this epoch yielded (or skipped) so far

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._skip = self._consumed = 0

    def skip(self, num_batches: int) -> None:
        """The next ``__iter__`` starts after ``num_batches`` batches of the current epoch."""
        self._skip = self._consumed = int(num_batches)

    def state_dict(self) -> dict:
        """Where this epoch stands: ``skip`` counts the batches already yielded (a checkpoint taken
        mid-epoch resumes after them, not at batch 0). Under a ``DataLoader`` with workers, the
        loader draws batches ahead of the training loop (``prefetch_factor`` per worker), so
        ``skip`` runs ahead of the batches trained on: resuming from it would leave those out. For
        an exact resume count the batches your loop consumed and call :meth:`skip` with that
        (``arvid train-generator`` does not use this sampler's state: its Trainer orders packed
        batches by step)."""
        return {"epoch": self.epoch, "skip": self._consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self._skip = self._consumed = int(state["skip"])

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), in yield order."""
        epoch = self.epoch if epoch is None else int(epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        n = self.lengths.numel()
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        batches: list[list[int]] = []
        for w0 in range(0, n, self.window):
            idx = order[w0:w0 + self.window]
            lens = self.lengths[idx]
            # Decreasing length; stable so equal lengths keep the (shuffled) order.
            srt = torch.sort(lens, descending=True, stable=True).indices
            bins: list[list[int]] = []
            free: list[int] = []
            for j in srt.tolist():
                item, length = int(idx[j]), int(lens[j])
                for b, room in enumerate(free):
                    if length <= room:
                        bins[b].append(item)
                        free[b] -= length
                        break
                else:
                    bins.append([item])
                    free.append(self.max_tokens - length)
            if self.shuffle:
                bins = [bins[i] for i in torch.randperm(len(bins), generator=g).tolist()]
            batches.extend(bins)
        if self.drop_last and batches:
            fill = [sum(int(self.lengths[i]) for i in b) for b in batches]
            last = min(range(len(batches)), key=lambda b: (fill[b], -b))
            if fill[last] < self.max_tokens / 2:
                batches.pop(last)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan()
        skip, self._skip = self._skip, 0
        self._consumed = skip
        for batch in plan[skip:]:
            self._consumed += 1
            yield batch

    def __len__(self) -> int:
        """Batches the next ``__iter__`` yields (after a pending :meth:`skip`)."""
        return max(0, len(self.plan()) - self._skip)


# --------------------------------------------------------------------------- collate from the token store


@dataclass
class PackingSpec:
    """How token-store items become a packed batch.

    conditioning: ``class`` (label -> class id), ``text`` (label -> the text ids of
    ``text_table``), ``frames`` (the first ``context_blocks`` blocks are loss-masked context),
    ``none``. ``num_prefix`` is the model's prefix slots (``GPT.num_prefix``). ``pad_to`` and
    ``static_max_seqlen`` give every batch the same shapes (for torch.compile).
    """

    fmt: SequenceFormat
    num_prefix: int = 1
    conditioning: str = "class"
    context_blocks: int = 0
    text_table: torch.Tensor | None = None  # [num_labels, Lt]
    pad_to: int | None = None
    static_max_seqlen: bool = False  # report the format's bound as max_seqlen (torch.compile)

    def __post_init__(self) -> None:
        if self.conditioning not in ("class", "text", "frames", "none"):
            raise ValueError(f"conditioning must be class|text|frames|none, got {self.conditioning!r}")
        if self.conditioning == "text" and self.text_table is None:
            raise ValueError("conditioning='text' needs text_table (the text ids of every label)")
        if not 0 <= self.context_blocks < self.fmt.layout.num_blocks:
            raise ValueError(f"context_blocks must lie in [0, {self.fmt.layout.num_blocks}), got {self.context_blocks}")
        if self.conditioning == "frames" and self.context_blocks == 0:
            raise ValueError("conditioning='frames' needs context_blocks >= 1")

    def packed_length(self, sequence_length: int | torch.Tensor) -> int | torch.Tensor:
        """Packed positions of a sequence of the given token length."""
        return self.num_prefix + sequence_length - 1


def collate_token_items(items: Sequence[dict], spec: PackingSpec) -> PackedBatch:
    """Token-store items (dicts with ``codes LongTensor[L]``, ``block_lengths LongTensor[K]``,
    ``label``) -> one :class:`PackedBatch` (sequences in the :class:`SequenceFormat`)."""
    if not items:
        raise ValueError("collate_token_items got an empty batch")
    tv = TokenizedVideo(torch.cat([torch.as_tensor(it["codes"], dtype=torch.long) for it in items]),
                        torch.stack([torch.as_tensor(it["block_lengths"], dtype=torch.long) for it in items]))
    labels = torch.tensor([int(it.get("label", 0) if it.get("label") is not None else 0) for it in items])
    return collate_tokenized(tv, labels, spec)


def collate_tokenized(tv: TokenizedVideo, labels: torch.Tensor, spec: PackingSpec) -> PackedBatch:
    """Videos ``tv`` (``B`` of them) with ``labels LongTensor[B]`` -> one :class:`PackedBatch`."""
    if tv.batch_size == 0:
        raise ValueError("collate_tokenized got an empty batch")
    seq, lengths = spec.fmt.to_sequences(tv)
    mask = None
    if spec.context_blocks > 0:
        mask = ~np.asarray(spec.fmt.context_mask(tv.block_lengths, spec.context_blocks))  # [sum L]
    class_ids = labels if spec.conditioning == "class" else None
    text_ids = None
    if spec.conditioning == "text":
        if int(labels.max()) >= spec.text_table.shape[0] or int(labels.min()) < 0:
            raise ValueError(f"labels {labels.tolist()} outside the text table of {spec.text_table.shape[0]} rows")
        text_ids = spec.text_table[labels]
    bound = spec.packed_length(spec.fmt.max_length) if spec.static_max_seqlen else None
    return _pack_flat(np.asarray(seq, dtype=np.int64), np.asarray(lengths, dtype=np.int64), spec.num_prefix,
                      class_ids, text_ids, mask, spec.pad_to, bound)


class PackedBatchDataset(torch.utils.data.Dataset):
    """A dataset whose item ``i`` is the ``i``-th token-budget batch, already packed.

    For trainers that take a dataset and a batch size: with ``batch_size = k`` each step
    trains on ``k`` budget-filled batches (joined by :func:`concat_packed`, the collate fn).
    The batch plan is the sampler's plan for epoch 0 (the trainer reshuffles the batches).
    """

    def __init__(self, store, spec: PackingSpec, max_tokens: int, seed: int = 0, window: int = 4096) -> None:
        self.store = store
        self.spec = spec
        lengths = spec.packed_length(torch.as_tensor(store.lengths, dtype=torch.long)
                                     + spec.fmt.layout.num_blocks)
        self.sampler = TokenBudgetBatchSampler(lengths, max_tokens, shuffle=True, seed=seed, window=window)
        self.batches = self.sampler.plan(0)
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> PackedBatch:
        idx = self.batches[i]  # one gather from the TokenStore for the whole batch
        return collate_tokenized(self.store.get_batch(idx), self.store.labels_of(idx), self.spec)

    @staticmethod
    def collate(items: Sequence[PackedBatch]) -> PackedBatch:
        return concat_packed(list(items))


#: Candidate-count probabilities that give EVATok-like sequence lengths (mean ~764 tokens with
#: candidates (32, 64, 128, 256, 512) over 4 blocks), for benchmarks and tests without a router.
ROUTER_LIKE_PROBS = (0.10, 0.20, 0.30, 0.27, 0.13)


def router_like_lengths(n: int, layout: BlockLayout, generator: torch.Generator | None = None,
                        probs: Sequence[float] | None = None) -> torch.Tensor:
    """Sequence lengths ``LongTensor[n]`` (length tokens included) of ``n`` random assignments drawn
    per block from ``probs`` over the candidates (default :data:`ROUTER_LIKE_PROBS`, else uniform)."""
    if probs is None:
        probs = ROUTER_LIKE_PROBS if layout.num_candidates == len(ROUTER_LIKE_PROBS) else [1.0] * layout.num_candidates
    p = torch.as_tensor(probs, dtype=torch.float)
    if p.numel() != layout.num_candidates:
        raise ValueError(f"{p.numel()} probabilities for {layout.num_candidates} candidates")
    pos = torch.multinomial(p, n * layout.num_blocks, replacement=True, generator=generator)
    counts = torch.tensor(layout.candidates)[pos].reshape(n, layout.num_blocks)  # [n, K]
    return layout.num_blocks + counts.sum(1)


def packing_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]], max_tokens: int) -> float:
    """Fraction of the budget filled by real tokens over all batches."""
    used = sum(int(lengths[i]) for b in batches for i in b)
    return used / (max_tokens * max(1, len(batches))) if batches else math.nan


__all__ = [
    "IGNORE", "PackedBatch", "pack_sequences", "concat_packed", "TokenBudgetBatchSampler", "PackingSpec",
    "collate_token_items", "PackedBatchDataset", "packing_efficiency", "router_like_lengths", "ROUTER_LIKE_PROBS",
]
