"""Packing: targets and masks, the token-budget sampler, collate from token-store items."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.generator.packing import (
    IGNORE,
    PackingSpec,
    TokenBudgetBatchSampler,
    collate_token_items,
    concat_packed,
    pack_sequences,
)
from arvid.generator.sequence import SequenceFormat


def test_pack_layout_targets_and_positions():
    a, b = torch.tensor([10, 11, 12]), torch.tensor([20, 21])
    batch = pack_sequences([a, b], num_prefix=2, class_ids=torch.tensor([3, 4]))
    # seq a: [c, c, 10, 11] -> targets [-, 10, 11, 12]; seq b: [c, c, 20] -> [-, 20, 21]
    assert batch.tokens.tolist() == [0, 0, 10, 11, 0, 0, 20]
    assert batch.targets.tolist() == [IGNORE, 10, 11, 12, IGNORE, 20, 21]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch.prefix_mask.tolist() == [True, True, False, False, True, True, False]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 4, 7]
    assert batch.max_seqlen == 4 and batch.num_seqs == 2 and batch.num_loss_tokens == 5
    assert batch.seqlens().tolist() == [4, 3]


def test_pad_and_concat():
    p1 = pack_sequences([torch.tensor([1, 2, 3])], 1, torch.tensor([0]), pad_to=6)
    p2 = pack_sequences([torch.tensor([4, 5])], 1, torch.tensor([1]))
    assert p1.cu_seqlens.tolist() == [0, 3, 6] and p1.num_seqs == 1
    assert (p1.targets[3:] == IGNORE).all() and not p1.prefix_mask[3:].any()
    j = concat_packed([p1, p2])
    # real sequences first (conditioning is read at the first num_seqs starts), padding last
    assert j.cu_seqlens.tolist() == [0, 3, 5, 8] and j.num_seqs == 2
    assert j.class_ids.tolist() == [0, 1]
    assert j.targets.tolist() == [1, 2, 3, 4, 5, IGNORE, IGNORE, IGNORE]
    with pytest.raises(ValueError, match="pad_to"):
        pack_sequences([torch.arange(5)], 1, pad_to=3)
    # a fixed max_seqlen bound: reported as is, and padding is cut into segments that fit it
    b = pack_sequences([torch.arange(4), torch.arange(2)], 1, pad_to=20, max_seqlen=6)
    assert b.max_seqlen == 6 and b.cu_seqlens.tolist() == [0, 4, 6, 12, 18, 20] and b.num_seqs == 2
    assert b.seqlens().tolist() == [4, 2]
    with pytest.raises(ValueError, match="more than max_seqlen=3"):
        pack_sequences([torch.arange(4)], 1, max_seqlen=3)
    with pytest.raises(ValueError, match="loss mask 0"):
        pack_sequences([torch.arange(5)], 1, loss_masks=[torch.ones(4, dtype=torch.bool)])


def _pack_reference(seqs, num_prefix, masks, pad_to, max_seqlen):
    """pack_sequences written one sequence at a time, as the layout is defined."""
    toks, tgts, pos, pm, lens = [], [], [], [], []
    for i, seq in enumerate(seqs):
        L = len(seq)
        toks += [0] * num_prefix + seq[:-1]
        t = [IGNORE] * (num_prefix - 1) + list(seq)
        if masks is not None:
            t[num_prefix - 1:] = [x if m else IGNORE for x, m in zip(seq, masks[i])]
        tgts += t
        pos += list(range(num_prefix + L - 1))
        pm += [True] * num_prefix + [False] * (L - 1)
        lens.append(num_prefix + L - 1)
    left = (pad_to - sum(lens)) if pad_to else 0
    while left > 0:
        k = left if max_seqlen is None else min(left, max_seqlen)
        toks += [0] * k
        tgts += [IGNORE] * k
        pos += list(range(k))
        pm += [False] * k
        lens.append(k)
        left -= k
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return toks, tgts, pos, pm, cu


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), num_prefix=st.integers(1, 3),
       masked=st.booleans(), extra=st.integers(0, 90), bound=st.sampled_from([None, 45]), seed=st.integers(0, 99))
def test_pack_sequences_matches_the_per_sequence_definition(lengths, num_prefix, masked, extra, bound, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 1000, (n,), generator=g) for n in lengths]
    masks = [torch.rand(n, generator=g) < 0.7 for n in lengths] if masked else None
    total = sum(num_prefix + n - 1 for n in lengths)
    if bound is not None and max(num_prefix + n - 1 for n in lengths) > bound:
        bound = None
    pad_to = total + extra if extra else None
    b = pack_sequences(seqs, num_prefix, loss_masks=masks, pad_to=pad_to, max_seqlen=bound)
    toks, tgts, pos, pm, cu = _pack_reference([q.tolist() for q in seqs], num_prefix,
                                              [m.tolist() for m in masks] if masks else None, pad_to, bound)
    assert b.tokens.tolist() == toks and b.targets.tolist() == tgts
    assert b.position_ids.tolist() == pos and b.prefix_mask.tolist() == pm
    assert b.cu_seqlens.tolist() == cu and b.num_seqs == len(lengths)
    assert b.tokens.dtype == b.targets.dtype == b.position_ids.dtype == torch.long
    assert b.prefix_mask.dtype == torch.bool


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=120), budget=st.integers(100, 400),
       seed=st.integers(0, 5), window=st.integers(1, 64))
def test_sampler_respects_budget_and_covers_every_item_once(lengths, budget, seed, window):
    s = TokenBudgetBatchSampler(lengths, budget, shuffle=True, seed=seed, window=window)
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(sum(lengths[i] for i in b) <= budget for b in batches)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(lengths)))


def test_sampler_deterministic_per_seed_epoch_and_resumable():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(50, 1100, (500,), generator=g).tolist()
    s = TokenBudgetBatchSampler(lengths, 4096, seed=7, window=128)
    s.set_epoch(3)
    full = list(s)
    s2 = TokenBudgetBatchSampler(lengths, 4096, seed=7, window=128)
    s2.set_epoch(3)
    assert list(s2) == full
    s2.set_epoch(4)
    assert list(s2) != full
    assert list(TokenBudgetBatchSampler(lengths, 4096, seed=8, window=128)) != list(
        TokenBudgetBatchSampler(lengths, 4096, seed=7, window=128))
    # resume after 5 batches: the rest of the same epoch
    s3 = TokenBudgetBatchSampler(lengths, 4096, seed=7, window=128)
    s3.load_state_dict({"epoch": 3, "skip": 5, "seed": 7})
    assert list(s3) == full[5:]
    # a checkpoint taken mid-epoch records the batches yielded so far and resumes after them
    s4 = TokenBudgetBatchSampler(lengths, 4096, seed=7, window=128)
    s4.set_epoch(3)
    it = iter(s4)
    seen = [next(it) for _ in range(4)]
    assert seen == full[:4] and s4.state_dict() == {"epoch": 3, "skip": 4, "seed": 7}
    s5 = TokenBudgetBatchSampler(lengths, 4096, seed=7, window=128)
    s5.load_state_dict(s4.state_dict())
    assert len(s5) == len(full) - 4 and list(s5) == full[4:]
    # first-fit-decreasing fills the budget well on router-like lengths
    fill = sum(lengths) / (4096 * len(full))
    assert fill > 0.9, fill
    # works as a DataLoader batch sampler
    dl = torch.utils.data.DataLoader(list(range(500)), batch_sampler=s, collate_fn=list)
    assert sorted(i for b in dl for i in b) == list(range(500))


def test_sampler_errors_and_drop_last():
    with pytest.raises(ValueError, match="item 1 has 50 tokens, more than max_tokens=40"):
        TokenBudgetBatchSampler([10, 50, 60], 40)
    s = TokenBudgetBatchSampler([30, 30, 30, 5], 60, shuffle=False, drop_last=True)
    batches = list(s)
    kept = sorted(i for b in batches for i in b)
    # bins: [30, 30], [30, 5]: the last bin holds 35 >= 30 (half the budget), so nothing is dropped
    assert kept == [0, 1, 2, 3]
    s = TokenBudgetBatchSampler([30, 30, 30, 5, 20], 50, shuffle=False, drop_last=True)
    # bins (FFD): [30, 20], [30, 5], [30] -> the least-filled bin, 30 >= 25, is kept too
    assert sorted(i for b in s for i in b) == [0, 1, 2, 3, 4]
    # bins (FFD): [40, 8], [40, 8], [8]: the last holds 8 < 25 and is dropped
    s = TokenBudgetBatchSampler([40, 40, 8, 8, 8], 50, shuffle=False, drop_last=True)
    flat = sorted(i for b in s for i in b)
    assert flat == [0, 1, 2, 3] and len(list(s)) == 2


def make_items(fmt: SequenceFormat, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = fmt.layout.random_assignments(n, g)
    items = []
    for i in range(n):
        L = int(a[i].sum())
        items.append({"codes": torch.randint(0, fmt.codebook_size, (L,), generator=g), "block_lengths": a[i],
                      "label": i % 3, "video_id": i})
    return items


def test_collate_class_and_frames():
    layout = BlockLayout((2, 2, 2), (2, 4, 8))
    fmt = SequenceFormat(16, layout)
    items = make_items(fmt, 4)
    batch = collate_token_items(items, PackingSpec(fmt, num_prefix=1, conditioning="class"))
    assert batch.class_ids.tolist() == [0, 1, 2, 0]
    tv = TokenizedVideo(torch.cat([it["codes"] for it in items]), torch.stack([it["block_lengths"] for it in items]))
    seq, lengths = fmt.to_sequences(tv)
    # with one prefix slot, every sequence token is a target, in order
    assert torch.equal(batch.targets, seq) and batch.num_tokens == int(lengths.sum())
    # frame prediction: the first 2 blocks (length tokens included) are context without loss
    fb = collate_token_items(items, PackingSpec(fmt, num_prefix=1, conditioning="frames", context_blocks=2))
    assert fb.class_ids is None
    ctx = fmt.prefix_length(tv.block_lengths, 2)
    for i in range(4):
        a, L = int(fb.cu_seqlens[i]), int(lengths[i])
        t = fb.targets[a:a + L]
        c = int(ctx[i])
        assert (t[:c] == IGNORE).all() and (t[c:] != IGNORE).all()
        assert fmt.is_len_token(t[c:c + 1]).all()  # the first target is block 3's length token
    text = torch.tensor([[5, 6, 0], [7, 0, 0], [8, 9, 9]])
    tb = collate_token_items(items, PackingSpec(fmt, num_prefix=3, conditioning="text", text_table=text))
    assert torch.equal(tb.text_ids, text[[0, 1, 2, 0]]) and tb.class_ids is None
    with pytest.raises(ValueError, match="context_blocks"):
        PackingSpec(fmt, conditioning="frames")


def test_dataset_batches_from_a_token_store_equal_collating_its_items(tmp_path):
    """PackedBatchDataset gathers a TokenStore batch at once (get_batch, labels_of); the result is
    the per-item collate's, field by field, for class and frame conditioning."""
    from arvid.data.token_store import TokenStore, TokenStoreWriter
    from arvid.generator.packing import PackedBatchDataset

    layout = BlockLayout((2, 2), (2, 4, 8))
    g = torch.Generator().manual_seed(0)
    bl = torch.tensor([2, 4, 8])[torch.randint(0, 3, (40, 2), generator=g)]
    with TokenStoreWriter(tmp_path / "s", "fp", layout, 64) as w:
        w.append(TokenizedVideo(torch.randint(0, 64, (int(bl.sum()),), generator=g), bl),
                 labels=torch.randint(0, 5, (40,), generator=g))
    store = TokenStore(tmp_path / "s")
    fmt = SequenceFormat(64, layout)
    for spec in (PackingSpec(fmt, 1, "class", pad_to=160, static_max_seqlen=True),
                 PackingSpec(fmt, 1, "frames", context_blocks=1)):
        ds = PackedBatchDataset(store, spec, 160, seed=3)
        assert len(ds) > 2
        for i in range(len(ds)):
            got = ds[i]
            want = collate_token_items([store[j] for j in ds.batches[i]], spec)
            for name in ("tokens", "targets", "position_ids", "cu_seqlens", "prefix_mask"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (name, i)
            assert (got.class_ids is None) == (want.class_ids is None)
            if got.class_ids is not None:
                assert torch.equal(got.class_ids, want.class_ids)
            assert got.max_seqlen == want.max_seqlen and got.num_seqs == want.num_seqs
    assert store.labels_of([-1]).tolist() == [int(store.labels[-1])]
    with pytest.raises(IndexError, match="index 40 out of range"):
        store.get_batch([0, 40])


def test_token_store_labels_of_on_a_fresh_store(tmp_path):
    from arvid.data.token_store import TokenStore, TokenStoreWriter

    layout = BlockLayout((2, 2), (2, 4))
    with TokenStoreWriter(tmp_path / "s", "fp", layout, 16) as w:
        w.append(TokenizedVideo(torch.zeros(12, dtype=torch.long), torch.tensor([[2, 4], [4, 2]])), labels=[3, 1])
    assert TokenStore(tmp_path / "s").labels_of([1, 0]).tolist() == [1, 3]  # before any other access
