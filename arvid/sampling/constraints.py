"""Constrained decoding: a vectorised state machine that keeps every sample well formed.

The sequence format (``arvid.generator.sequence``) is ``[LEN(k_1) c*k_1] ... [LEN(k_K) c*k_K]``.
Per sample the machine holds

- ``block``: how many length tokens were emitted so far (``0..K``),
- ``left``:  codes still due in the current block,
- ``used``:  codes committed so far (the sum of the counts chosen),
- ``length``: tokens emitted so far (a finished sample stops counting),

as ``LongTensor[B]``. The mask at a step is computed from these with tensor ops only (no
per-sample Python, no host sync), so it can run inside a captured CUDA graph:

- ``left > 0``: only codes;
- ``left == 0`` and ``block < K``: only the length tokens allowed for block ``block``
  (an allowed set per sample and block, which also expresses a fixed assignment), and, with an
  exact budget, only the counts that leave room for the remaining blocks at their minimum;
- finished (``block == K`` and ``left == 0``): the sample keeps stepping with a dummy code that
  is trimmed from the output.

A fixed prefix (frame prediction's context blocks) is not a mask: its tokens are prefilled or
forced, and the state is advanced over them like over sampled tokens (:meth:`advance`).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from arvid.data.types import TokenizedVideo
from arvid.generator.sequence import SequenceFormat

#: the code emitted by finished samples (never part of the output)
DUMMY_TOKEN = 0


@dataclass
class ConstraintState:
    """The per-sample decoding state, ``LongTensor[B]`` each (see the module docstring)."""

    block: torch.Tensor
    left: torch.Tensor
    used: torch.Tensor
    length: torch.Tensor

    @classmethod
    def initial(cls, batch_size: int, device: torch.device | str = "cpu") -> ConstraintState:
        z = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(z.clone(), z.clone(), z.clone(), z.clone())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.block, self.left, self.used, self.length

    def copy_(self, other: ConstraintState) -> ConstraintState:
        """In-place copy (static buffers of a captured graph must keep their storage)."""
        for a, b in zip(self.tensors(), other.tensors()):
            a.copy_(b)
        return self

    def clone(self) -> ConstraintState:
        return ConstraintState(*(t.clone() for t in self.tensors()))


class SequenceConstraint:
    """The static part of the constraints for one batch, and the step functions over a state.

    Args:
        fmt: the sequence format.
        batch_size: ``B``.
        allowed_counts: the token counts each block may take. Either one collection of counts for
            every block, a list of ``K`` collections (one per block), or a ``BoolTensor`` over
            candidates ``[K, C]`` or ``[B, K, C]``. None: every candidate.
        fixed_assignment: ``LongTensor[K]`` or ``[B, K]``: force these counts (intersected with
            ``allowed_counts``).
        budget: ``LongTensor[B]`` (or an int): an exact per-sample upper bound on the codes of a
            video. A length token is allowed only if the remaining blocks can still fit at their
            smallest allowed counts. A budget below the smallest possible total yields the
            smallest allowed counts (the sequence must stay well formed).
        device: where the tensors live.
    """

    def __init__(
        self,
        fmt: SequenceFormat,
        batch_size: int,
        allowed_counts: Sequence | torch.Tensor | None = None,
        fixed_assignment: Sequence | torch.Tensor | None = None,
        budget: int | torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.fmt = fmt
        self.batch_size = B = int(batch_size)
        K, C = fmt.layout.num_blocks, fmt.layout.num_candidates
        self.device = torch.device(device)
        cand = torch.tensor(fmt.layout.candidates, dtype=torch.long)
        allowed = torch.ones(B, K, C, dtype=torch.bool)
        if allowed_counts is not None:
            allowed &= _allowed_from_counts(fmt, allowed_counts, B)
        if fixed_assignment is not None:
            try:
                a = fmt.layout.validate(fixed_assignment, batch=B)  # [B, K], raises on non-candidates
            except ValueError as e:
                shown = (fixed_assignment.tolist() if isinstance(fixed_assignment, torch.Tensor)
                         else list(fixed_assignment))
                raise ValueError(f"fixed_assignment {shown}: {e}") from None
            allowed &= a[..., None] == cand  # [B, K, C]
        empty = ~allowed.any(-1)  # [B, K]
        if bool(empty.any()):
            b, k = (int(x) for x in empty.nonzero()[0])
            raise ValueError(f"constraints leave no allowed token count for sample {b}, block {k} "
                             f"(candidates {fmt.layout.candidates}): check allowed_counts / fixed_assignment")
        self.allowed = allowed  # [B, K, C] (CPU copy for checks)
        # Row K (past the last block) allows nothing: gathering with block == K needs no branch.
        allowed_pad = torch.cat([allowed, torch.zeros(B, 1, C, dtype=torch.bool)], 1)  # [B, K+1, C]
        big = torch.iinfo(torch.long).max // 4
        min_count = torch.where(allowed, cand, torch.full_like(cand, big)).amin(-1)  # [B, K]
        # min_rest[b, k]: the fewest codes blocks k..K-1 can take; min_rest[b, K] = 0.
        min_rest = torch.flip(torch.cumsum(torch.flip(min_count, [1]), 1), [1])
        min_rest = torch.cat([min_rest, torch.zeros(B, 1, dtype=torch.long)], 1)  # [B, K+1]
        min_onehot = torch.cat([allowed & (cand == min_count[..., None]),
                                torch.zeros(B, 1, C, dtype=torch.bool)], 1)  # [B, K+1, C]
        if budget is None:
            budget_t = torch.full((B,), big, dtype=torch.long)
        else:
            budget_t = torch.as_tensor(budget, dtype=torch.long).reshape(-1).cpu()
            if budget_t.numel() == 1:
                budget_t = budget_t.expand(B).clone()
            if budget_t.numel() != B:
                raise ValueError(f"budget must be an int or one value per sample ({B}), got {budget_t.numel()}")
            if bool((budget_t <= 0).any()):
                raise ValueError(f"budget must be positive, got {budget_t.tolist()[:8]}")
        self.has_budget = budget is not None
        dev = self.device
        self.cand = cand.to(dev)
        self.allowed_pad = allowed_pad.to(dev)
        self.min_rest = min_rest.to(dev)
        self.min_onehot = min_onehot.to(dev)
        self.budget = budget_t.to(dev)

    # ------------------------------------------------------------------ static buffers
    def buffers(self) -> dict[str, torch.Tensor]:
        """The tensors the step functions read (copied into a captured graph's static buffers)."""
        return {"allowed_pad": self.allowed_pad, "min_rest": self.min_rest,
                "min_onehot": self.min_onehot, "budget": self.budget}

    def load_(self, other: SequenceConstraint) -> SequenceConstraint:
        """Copy ``other``'s tensors into this one's storage (same batch size and format)."""
        if other.batch_size != self.batch_size or other.fmt != self.fmt:
            raise ValueError("load_ needs a constraint of the same batch size and sequence format")
        for name, t in self.buffers().items():
            t.copy_(other.buffers()[name])
        self.allowed = other.allowed
        self.has_budget = other.has_budget
        return self

    def check_prefix_counts(self, block_lengths: torch.Tensor) -> None:
        """Refuse a given prefix (frame prediction's context) whose block counts the constraints do
        not allow, naming the sample, the block, its count and the allowed counts.

        ``block_lengths``: ``LongTensor[P, n]`` of the ``n <= K`` leading blocks; ``P`` equals this
        constraint's batch, or either of the two is 1 (it applies to every row of the other)."""
        bl = torch.as_tensor(block_lengths, dtype=torch.long).cpu()
        if bl.dim() == 1:
            bl = bl[None]
        P, n = bl.shape
        K, B = self.fmt.layout.num_blocks, self.batch_size
        if n > K:
            raise ValueError(f"a prefix of {n} blocks is longer than the layout's {K}")
        if P != B and 1 not in (P, B):
            raise ValueError(f"prefix block counts for {P} samples do not fit a constraint over {B} samples")
        M = max(P, B)
        pos = self.fmt.layout.candidate_positions(bl)  # [P, n]; raises on a non-candidate count
        ok = self.allowed[:, :n].expand(M, n, -1).gather(2, pos.expand(M, n)[..., None])[..., 0]  # [M, n]
        if not bool(ok.all()):
            b, k = (int(x) for x in (~ok).nonzero()[0])
            count = int(bl[b if P > 1 else 0, k])
            allowed = [c for c, a in zip(self.fmt.layout.candidates, self.allowed[b if B > 1 else 0, k].tolist()) if a]
            raise ValueError(f"the prefix of sample {b} has {count} tokens in block {k}, which the constraints do not "
                             f"allow there (allowed counts of block {k}: {allowed}): check allowed_counts / "
                             "fixed_assignment against the prefix")

    # ------------------------------------------------------------------ step functions
    def done(self, state: ConstraintState) -> torch.Tensor:
        """``BoolTensor[B]``: the sample has emitted its whole sequence."""
        return (state.block >= self.fmt.layout.num_blocks) & (state.left == 0)

    def allowed_lengths(self, state: ConstraintState) -> torch.Tensor:
        """``BoolTensor[B, C]``: candidate counts the next length token may take (all False
        when the next token is not a length token)."""
        idx = state.block.clamp(max=self.fmt.layout.num_blocks)[:, None, None]
        idx = idx.expand(-1, 1, self.cand.numel())  # [B, 1, C]
        ok = self.allowed_pad.gather(1, idx).squeeze(1)  # [B, C]
        if self.has_budget:
            rest = self.min_rest.gather(1, (state.block + 1).clamp(max=self.fmt.layout.num_blocks)[:, None])
            fits = state.used[:, None] + self.cand[None, :] + rest <= self.budget[:, None]  # [B, C]
            fit_ok = ok & fits
            fallback = self.min_onehot.gather(1, idx).squeeze(1)
            ok = torch.where(fit_ok.any(-1, keepdim=True), fit_ok, fallback)
        at_len = (state.left == 0) & ~self.done(state)
        return ok & at_len[:, None]

    def mask(self, state: ConstraintState) -> torch.Tensor:
        """``BoolTensor[B, V]``: True where the token may come next. A finished sample may take
        only :data:`DUMMY_TOKEN`."""
        V = self.fmt.codebook_size
        done = self.done(state)
        codes_ok = (state.left > 0)[:, None].expand(-1, V)  # [B, V]
        dummy = torch.zeros_like(codes_ok)
        dummy[:, DUMMY_TOKEN] = True
        codes_ok = codes_ok | (dummy & done[:, None])
        return torch.cat([codes_ok, self.allowed_lengths(state)], 1)  # [B, V + C]

    def advance(self, state: ConstraintState, tokens: torch.Tensor) -> None:
        """Update ``state`` in place after ``tokens`` ``LongTensor[B]`` (any tokens: sampled,
        prefilled or forced). Finished samples do not change."""
        done = self.done(state)
        is_code = state.left > 0
        is_len = ~is_code & ~done
        # Count of a length token (garbage for codes, unused there); no host tensor: graph-safe.
        count = self.cand[(tokens - self.fmt.len_token_base).clamp(0, self.cand.numel() - 1)]
        state.length.add_((~done).long())
        state.left.copy_(torch.where(is_code, state.left - 1, torch.where(is_len, count, state.left)))
        state.used.add_(torch.where(is_len, count, torch.zeros_like(count)))
        state.block.add_(is_len.long())

    def state_after(self, prefix: torch.Tensor, prefix_lengths: torch.Tensor | None = None) -> ConstraintState:
        """The state (on this constraint's device) after ``prefix`` ``LongTensor[B, P]`` (entries past
        ``prefix_lengths`` are ignored). Checks that the prefix follows the format and the
        constraints, naming the first offending position.

        Computed on the host a block at a time (``K`` steps over ``[B]`` vectors, the codes of a
        block checked in one comparison), not token by token: the same state and the same first
        error as feeding the tokens one by one through :meth:`mask` and :meth:`advance`, which
        took 2.6 s for 64 two-block prefixes of ~500 tokens on a CPU."""
        B, P = prefix.shape
        if B != self.batch_size:
            raise ValueError(f"prefix batch {B} does not match the constraint batch {self.batch_size}")
        host = self._host()
        K, V = self.fmt.layout.num_blocks, self.fmt.codebook_size
        prefix = prefix.detach().to("cpu", torch.long)
        plen = torch.full((B,), P, dtype=torch.long) if prefix_lengths is None else (
            torch.as_tensor(prefix_lengths, dtype=torch.long).cpu().reshape(B))
        state = ConstraintState.initial(B)
        pos = torch.zeros(B, dtype=torch.long)  # where each row's next length token is
        rows, cols = torch.arange(B), torch.arange(P)
        # the first offending position of each row (P: none) and the state shown for it
        bad_at = torch.full((B,), P, dtype=torch.long)
        bad_block, bad_left = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)

        def flag(bad: torch.Tensor, at: torch.Tensor, block: torch.Tensor, left: torch.Tensor) -> None:
            new = bad & (at < bad_at)
            bad_at.copy_(torch.where(new, at, bad_at))
            bad_block.copy_(torch.where(new, block, bad_block))
            bad_left.copy_(torch.where(new, left, bad_left))

        zero = torch.zeros(B, dtype=torch.long)
        for _block in range(K):
            active = (pos < plen) & (bad_at == P)  # rows with a length token of this block in their prefix
            tok = prefix[rows, pos.clamp(max=max(P - 1, 0))] if P else zero
            c = tok - self.fmt.len_token_base
            is_len = (c >= 0) & (c < host.cand.numel())
            ok = is_len & host.allowed_lengths(state)[rows, c.clamp(0, host.cand.numel() - 1)]
            flag(active & ~ok, pos, state.block, state.left)
            active &= ok
            count = torch.where(active, host.cand[c.clamp(0, host.cand.numel() - 1)], zero)
            # the block's codes: positions pos+1 .. pos+count that lie inside the prefix
            span = (cols[None] > pos[:, None]) & (cols[None] <= (pos + count)[:, None]) & (cols[None] < plen[:, None])
            not_code = span & ((prefix < 0) | (prefix >= V))
            first = torch.where(not_code, cols[None], P).amin(1) if P else zero + P
            seen = (plen - pos - 1).clamp(min=0).minimum(count)  # codes of the block inside the prefix
            state.block.add_(active.long())
            state.used.add_(count)
            state.length.add_(active.long() + seen)
            state.left.copy_(torch.where(active, count - seen, state.left))
            flag(active & (first < P), first, state.block, count - (first - pos - 1))
            pos = torch.where(active, pos + 1 + count, pos)
        # a token after the last block (the sequence is complete there)
        flag((pos < plen) & (bad_at == P), pos, state.block, state.left)
        if bool((bad_at < P).any()):
            j = int(bad_at.min())
            b = int((bad_at == j).nonzero()[0])
            raise ValueError(f"prefix of sample {b} breaks the format or the constraints at position {j} "
                             f"(token {int(prefix[b, j])}, blocks begun {int(bad_block[b])}, codes left {int(bad_left[b])})")
        return ConstraintState(*(t.to(self.device) for t in state.tensors()))

    def _host(self) -> SequenceConstraint:
        """This constraint with its step functions' tensors on the host (itself on a CPU)."""
        if self.device.type == "cpu":
            return self
        twin = copy.copy(self)
        twin.device = torch.device("cpu")
        for name in ("cand", "allowed_pad", "min_rest", "min_onehot", "budget"):
            setattr(twin, name, getattr(self, name).cpu())
        return twin


def _is_count(x) -> bool:
    """An integer token count: a Python / NumPy int or a 0-d integer tensor (not a bool)."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_floating_point() and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _shown(counts) -> list:
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


def split_allowed_counts(counts) -> tuple[bool, list[list]]:
    """``allowed_counts`` as counts (not a mask) -> ``(flat, per_block)``: one list of counts for
    every block (``flat``, ``per_block`` holding it once) or one list per block. Counts are Python
    or NumPy ints or 0-d integer tensors; a mix of counts and lists, or an entry that is neither, is
    a ValueError naming it. (The layout's candidates are checked by :class:`SequenceConstraint`.)"""
    items = list(counts)
    scalar = [_is_count(x) for x in items]
    if items and all(scalar):
        return True, [items]
    if any(scalar):
        raise ValueError(f"allowed_counts {_shown(counts)} mixes counts and lists: give one list of counts for every "
                         "block, e.g. [64, 128], or one list per block, e.g. [[64], [64, 128], [128, 256], [256]]")
    per_block = []
    for k, x in enumerate(items):
        if not hasattr(x, "__iter__") or isinstance(x, (str, bytes)) or not all(_is_count(c) for c in x):
            raise ValueError(f"allowed_counts {_shown(counts)}: block {k}'s entry {x!r} is not a list of token counts")
        per_block.append(list(x))
    return False, per_block


def _allowed_from_counts(fmt: SequenceFormat, counts, B: int) -> torch.Tensor:
    """``allowed_counts`` in any accepted form -> ``BoolTensor[B, K, C]``."""
    K, C = fmt.layout.num_blocks, fmt.layout.num_candidates
    if isinstance(counts, torch.Tensor) and counts.dtype == torch.bool:
        t = counts.cpu()
        if t.shape == (K, C):
            return t[None].expand(B, K, C)
        if t.shape == (B, K, C):
            return t
        raise ValueError(f"allowed_counts as a mask must be [K, C] = [{K}, {C}] or [B, K, C], got {tuple(t.shape)}")
    flat, per_block = split_allowed_counts(counts)
    if flat:
        per_block = [per_block[0]] * K
    elif len(per_block) != K:
        raise ValueError(f"allowed_counts must give one set of counts per block ({K}), got {len(per_block)}")
    out = torch.zeros(K, C, dtype=torch.bool)
    for k, cs in enumerate(per_block):
        for c in cs:
            c = int(c)
            if c not in fmt.layout.candidates:
                raise ValueError(f"allowed_counts: {c} (block {k}) is not a candidate count {fmt.layout.candidates}")
            out[k, fmt.layout.candidates.index(c)] = True
    return out[None].expand(B, K, C)


def prefix_tokens(fmt: SequenceFormat, tokens: TokenizedVideo) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading blocks of a batch of videos in the sequence format.

    Args:
        tokens: ``TokenizedVideo`` holding the first ``n <= K`` blocks of each video
            (``block_lengths [B, n]``).

    Returns:
        ``LongTensor[B, P]`` right-padded with :data:`DUMMY_TOKEN` (``P`` the longest prefix) and the
        prefix lengths ``LongTensor[B]``.
    """
    bl = tokens.block_lengths
    B, n = bl.shape
    if n > fmt.layout.num_blocks:
        raise ValueError(f"a prefix of {n} blocks is longer than the layout's {fmt.layout.num_blocks}")
    if n == 0:
        return torch.zeros(B, 0, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    from arvid.data.types import BlockLayout

    sub = SequenceFormat(fmt.codebook_size, BlockLayout(fmt.layout.frames_per_block[:n], fmt.layout.candidates))
    packed, lengths = sub.to_sequences(tokens.to("cpu"))  # [sum P], [B]
    P = int(lengths.max())
    out = torch.full((B, P), DUMMY_TOKEN, dtype=torch.long)
    idx = torch.arange(P)
    valid = idx[None, :] < lengths[:, None]  # [B, P]
    out[valid] = packed
    return out, lengths
