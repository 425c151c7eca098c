"""The constraint state machine: every walk it allows is a well-formed sequence that honours the
allowed sets, the fixed assignment and the exact budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.constraints import DUMMY_TOKEN, ConstraintState, SequenceConstraint, prefix_tokens

FMT = SequenceFormat(10, BlockLayout((1, 2, 1), (1, 3, 5)))


def walk(c: SequenceConstraint, gen: torch.Generator, steps: int | None = None,
         state: ConstraintState | None = None) -> tuple[torch.Tensor, ConstraintState]:
    """Choose uniformly among allowed tokens until every row is done; returns the emitted tokens [B, S]."""
    state = state or ConstraintState.initial(c.batch_size)
    out = []
    for _ in range(steps or c.fmt.max_length + 3):
        m = c.mask(state)
        assert bool(m.any(-1).all()), "a row has no allowed token"
        w = torch.rand(m.shape, generator=gen) * m
        tok = w.argmax(-1)
        assert bool(m.gather(1, tok[:, None]).all())
        out.append(tok)
        c.advance(state, tok)
    return torch.stack(out, 1), state


def trim(seqs: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return [s[:int(n)] for s, n in zip(seqs, lengths)]


def test_mask_semantics():
    c = SequenceConstraint(FMT, 1)
    s = ConstraintState.initial(1)
    m = c.mask(s)[0]
    assert m[:10].sum() == 0 and m[10:].all()  # first token: a length token
    c.advance(s, torch.tensor([FMT.len_token(3)]))
    assert (int(s.block), int(s.left), int(s.used), int(s.length)) == (1, 3, 3, 1)
    for _ in range(3):
        m = c.mask(s)[0]
        assert m[:10].all() and m[10:].sum() == 0
        c.advance(s, torch.tensor([4]))
    m = c.mask(s)[0]
    assert m[:10].sum() == 0 and m[10:].all()
    for tok in [FMT.len_token(1), 2, FMT.len_token(1), 7]:
        c.advance(s, torch.tensor([tok]))
    assert bool(c.done(s)[0]) and int(s.length) == 8
    m = c.mask(s)[0]
    assert m.sum() == 1 and m[DUMMY_TOKEN]  # finished: only the dummy
    c.advance(s, torch.tensor([DUMMY_TOKEN]))
    assert int(s.length) == 8  # the dummy does not count


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 12))
def test_random_walks_are_well_formed(seed, batch):
    g = torch.Generator().manual_seed(seed)
    c = SequenceConstraint(FMT, batch)
    seqs, state = walk(c, g)
    assert bool(c.done(state).all())
    for s in trim(seqs, state.length):
        codes, bl = FMT.parse_one(s)  # raises MalformedSequence if ill formed
        assert int(bl.sum()) == codes.numel()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), budget=st.integers(1, 16))
def test_exact_budget_is_never_exceeded(seed, budget):
    g = torch.Generator().manual_seed(seed)
    B = 8
    c = SequenceConstraint(FMT, B, budget=budget)
    seqs, state = walk(c, g)
    min_total = 3 * FMT.layout.candidates[0]
    for s in trim(seqs, state.length):
        _, bl = FMT.parse_one(s)
        if budget >= min_total:
            assert int(bl.sum()) <= budget
        else:
            assert bl.tolist() == [1, 1, 1]  # infeasible budget: the smallest counts
    assert torch.equal(state.used, torch.tensor([int(FMT.parse_one(s)[1].sum()) for s in trim(seqs, state.length)]))


def test_exact_budget_per_sample_tight():
    # Budgets that allow exactly one assignment force it.
    budgets = torch.tensor([3, 15, 7])
    c = SequenceConstraint(FMT, 3, budget=budgets, allowed_counts=[[1, 5], [1, 5], [1, 5]])
    g = torch.Generator().manual_seed(0)
    tot = torch.zeros(3, dtype=torch.long)
    for _ in range(20):
        seqs, state = walk(c, g)
        tot = torch.maximum(tot, state.used)
        assert bool((state.used <= budgets).all())
    assert tot[1] == 15  # the top of the range is reachable


def test_allowed_sets_and_fixed_assignment():
    g = torch.Generator().manual_seed(1)
    c = SequenceConstraint(FMT, 16, allowed_counts=[[1], [3, 5], [5]])
    seqs, state = walk(c, g)
    seen = set()
    for s in trim(seqs, state.length):
        bl = FMT.parse_one(s)[1].tolist()
        assert bl[0] == 1 and bl[1] in (3, 5) and bl[2] == 5
        seen.add(bl[1])
    assert seen == {3, 5}
    fixed = torch.tensor([[5, 1, 3], [1, 1, 1]])
    c = SequenceConstraint(FMT, 2, fixed_assignment=fixed)
    seqs, state = walk(c, g)
    got = torch.stack([FMT.parse_one(s)[1] for s in trim(seqs, state.length)])
    assert torch.equal(got, fixed)
    # A single set of counts applies to every block; a bool mask [K, C] works too.
    c = SequenceConstraint(FMT, 4, allowed_counts=[3])
    seqs, state = walk(c, g)
    assert all(FMT.parse_one(s)[1].tolist() == [3, 3, 3] for s in trim(seqs, state.length))
    mask = torch.tensor([[True, False, False], [False, False, True], [False, True, False]])
    c = SequenceConstraint(FMT, 4, allowed_counts=mask)
    seqs, state = walk(c, g)
    assert all(FMT.parse_one(s)[1].tolist() == [1, 5, 3] for s in trim(seqs, state.length))


def test_bad_constraints_are_named():
    with pytest.raises(ValueError, match="not a candidate"):
        SequenceConstraint(FMT, 2, allowed_counts=[[2], [3], [5]])
    with pytest.raises(ValueError, match="no allowed token count for sample 0, block 1"):
        SequenceConstraint(FMT, 2, allowed_counts=[[1], [3], [5]], fixed_assignment=[1, 5, 5])
    with pytest.raises(ValueError, match="one set of counts per block"):
        SequenceConstraint(FMT, 2, allowed_counts=[[1], [3]])
    with pytest.raises(ValueError, match="budget"):
        SequenceConstraint(FMT, 2, budget=torch.tensor([3, 4, 5]))
    # a mix of counts and lists is named (it raised a TypeError from list(3) before 2026-12-06)
    with pytest.raises(ValueError, match=r"\[1, \[1, 3\], 5\] mixes counts and lists"):
        SequenceConstraint(FMT, 2, allowed_counts=[1, [1, 3], 5])
    with pytest.raises(ValueError, match="block 1's entry 'ab' is not a list of token counts"):
        SequenceConstraint(FMT, 2, allowed_counts=[[1], "ab", [5]])


def test_allowed_counts_accept_numpy_and_tensor_ints():
    import numpy as np

    ref = SequenceConstraint(FMT, 2, allowed_counts=[1, 5]).allowed
    assert int(ref.sum()) == 2 * 3 * 2
    for counts in ([np.int64(1), np.int32(5)], np.array([1, 5]), torch.tensor([1, 5]),
                   [[np.int64(1), 5]] * 3, np.array([[1, 5]] * 3), [np.array([1, 5])] * 3, [(1, 5)] * 3):
        assert torch.equal(SequenceConstraint(FMT, 2, allowed_counts=counts).allowed, ref), counts


def stepwise_state_after(c: SequenceConstraint, prefix: torch.Tensor, plen: torch.Tensor):
    """Reference: feed the prefix token by token through mask/advance; the first bad (position,
    row) with the state before it, or the final state."""
    B, P = prefix.shape
    state = ConstraintState.initial(B)
    for j in range(P):
        active = j < plen
        tok = prefix[:, j]
        in_vocab = (tok >= 0) & (tok < c.fmt.vocab_size)
        ok = c.mask(state).gather(1, tok.clamp(0, c.fmt.vocab_size - 1)[:, None]).squeeze(1)
        bad = active & ~(ok & in_vocab & ~c.done(state))
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            return (f"prefix of sample {b} breaks the format or the constraints at position {j} "
                    f"(token {int(tok[b])}, blocks begun {int(state.block[b])}, codes left {int(state.left[b])})")
        before = state.clone()
        c.advance(state, tok)
        for a, b_ in zip(state.tensors(), before.tensors()):
            a.copy_(torch.where(active, a, b_))
    return state


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.sampled_from(["none", "allowed", "fixed", "budget"]),
       st.integers(0, 3))
def test_state_after_matches_a_token_by_token_walk(seed, B, kind, corrupt):
    """The block-at-a-time state_after gives the state (or the first error, word for word) of
    feeding the prefix token by token, on well-formed walks cut anywhere, with corrupted tokens."""
    g = torch.Generator().manual_seed(seed)
    kw = {"none": {}, "allowed": {"allowed_counts": [[1, 3], [3, 5], [1, 5]]},
          "fixed": {"fixed_assignment": [3, 1, 5]}, "budget": {"budget": 7}}[kind]
    c = SequenceConstraint(FMT, B, **kw)
    free = SequenceConstraint(FMT, B)  # walks that the constrained kinds may refuse
    seqs, state = walk(free if torch.rand(1, generator=g).item() < 0.5 else c, g)
    P = seqs.shape[1]
    plen = torch.randint(0, P + 1, (B,), generator=g)
    prefix = seqs.clone()
    for _ in range(corrupt):  # a random token anywhere: a code, a length token, or out of range
        b, j = int(torch.randint(0, B, (1,), generator=g)), int(torch.randint(0, P, (1,), generator=g))
        prefix[b, j] = int(torch.randint(-1, FMT.vocab_size + 1, (1,), generator=g))
    ref = stepwise_state_after(c, prefix, plen)
    if isinstance(ref, str):
        with pytest.raises(ValueError) as e:
            c.state_after(prefix, plen)
        assert str(e.value) == ref
    else:
        got = c.state_after(prefix, plen)
        assert [t.tolist() for t in got.tensors()] == [t.tolist() for t in ref.tensors()]


def test_prefix_state_and_validation():
    tv = TokenizedVideo(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 0]), torch.tensor([[3, 1], [1, 5]]))
    pre, plen = prefix_tokens(FMT, tv)
    assert plen.tolist() == [6, 8]
    assert pre[0].tolist() == [FMT.len_token(3), 1, 2, 3, FMT.len_token(1), 4, DUMMY_TOKEN, DUMMY_TOKEN]
    assert pre[1].tolist() == [FMT.len_token(1), 5, FMT.len_token(5), 6, 7, 8, 9, 0]
    c = SequenceConstraint(FMT, 2)
    st_ = c.state_after(pre, plen)
    assert st_.block.tolist() == [2, 2] and st_.left.tolist() == [0, 0]
    assert st_.used.tolist() == [4, 6] and st_.length.tolist() == [6, 8]
    # Continuing from the prefix state gives well-formed sequences that start with the prefix.
    seqs, state = walk(c, torch.Generator().manual_seed(3), state=st_)
    for i in range(2):
        full = torch.cat([pre[i, :int(plen[i])], seqs[i, :int(state.length[i] - plen[i])]])
        _, bl = FMT.parse_one(full)
        assert bl[:2].tolist() == tv.block_lengths[i].tolist()
    # A prefix that breaks the constraints is refused with the position.
    c = SequenceConstraint(FMT, 2, allowed_counts=[[1], [1, 3, 5], [1, 3, 5]])
    with pytest.raises(ValueError, match="sample 0 .* position 0"):
        c.state_after(pre, plen)
    with pytest.raises(ValueError, match="position 1"):
        SequenceConstraint(FMT, 1).state_after(torch.tensor([[FMT.len_token(1), FMT.len_token(1)]]))
