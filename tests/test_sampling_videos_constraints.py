"""`iter_sample_batches` / `sample_videos` with constraints: a fixed assignment (one for every sample or
one row per sample), an allowed set per block, a given prefix; bad values refused before any batch."""

from __future__ import annotations

import pytest
import torch

from arvid.data.types import TokenizedVideo
from arvid.generator.gpt import GPT
from arvid.generator.sequence import SequenceFormat
from arvid.sampling import SamplerConfig, encode_context, iter_sample_batches, sample_videos
from arvid.tokenizer.base import build_tokenizer


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", {"candidates": (4, 8)}, preset="debug").eval()  # 4 blocks, candidates 4, 8
    fmt = SequenceFormat(tok.codebook_size, tok.layout)
    gpt = GPT.from_preset("debug", vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 1, num_classes=3).eval()
    torch.nn.init.normal_(gpt.head.weight, std=0.3, generator=torch.Generator().manual_seed(2))
    return tok, fmt, gpt


CLASSES = torch.tensor([0, 1, 2, 0, 1, 2, 0])


def test_free_sampling_varies_the_counts(models):
    """The reference for the tests below: without constraints the counts differ between samples."""
    tok, _, gpt = models
    _, t = sample_videos(gpt, tok, SamplerConfig(), CLASSES, batch_size=3, seed=0, decode=False)
    assert len({tuple(r) for r in t.block_lengths.tolist()}) > 1


def test_fixed_assignment_for_every_sample_and_per_sample(models):
    tok, _, gpt = models
    _, t = sample_videos(gpt, tok, SamplerConfig(), CLASSES, batch_size=3, seed=0, decode=False,
                         fixed_assignment=[8, 4, 4, 8])
    assert t.block_lengths.tolist() == [[8, 4, 4, 8]] * 7
    # One row per sample: split into batches like the classes (7 samples in batches of 3, the last padded).
    rows = torch.tensor([[4, 4, 4, 4], [8, 8, 8, 8], [4, 8, 4, 8], [8, 4, 8, 4], [4, 4, 8, 8], [8, 8, 4, 4],
                         [4, 8, 8, 4]])
    _, t = sample_videos(gpt, tok, SamplerConfig(), CLASSES, batch_size=3, seed=0, decode=False,
                         fixed_assignment=rows)
    assert torch.equal(t.block_lengths, rows)
    # Batch 2 alone (another process's share) gets its own rows.
    (_, _, t2), = list(iter_sample_batches(gpt, tok, SamplerConfig(), CLASSES, batch_size=3, seed=0, batches=[2],
                                           decode=False, fixed_assignment=rows))
    assert t2.block_lengths.tolist() == [[4, 8, 8, 4]]


def test_allowed_counts_bound_every_sample(models):
    tok, _, gpt = models
    allowed = [[4], [4, 8], [8], [4, 8]]
    _, t = sample_videos(gpt, tok, SamplerConfig(), CLASSES, batch_size=4, seed=1, decode=False,
                         allowed_counts=allowed)
    for row in t.block_lengths.tolist():
        assert all(c in a for c, a in zip(row, allowed)), row
    assert {r[1] for r in t.block_lengths.tolist()} | {r[3] for r in t.block_lengths.tolist()} == {4, 8}
    _, t = sample_videos(gpt, tok, SamplerConfig(), CLASSES, batch_size=4, seed=1, decode=False, allowed_counts=[8])
    assert t.block_lengths.tolist() == [[8, 8, 8, 8]] * 7


def test_prefix_one_row_or_one_per_sample(models):
    tok, _, gpt = models
    g = torch.Generator().manual_seed(3)
    ctx = torch.rand(3, 3, 2, 32, 32, generator=g) * 2 - 1  # 2 frames: block 0
    prefixes = encode_context(tok, ctx, 1, counts=[8])  # [3, 1]
    classes = torch.tensor([0, 1, 2])
    _, t = sample_videos(gpt, tok, SamplerConfig(), classes, batch_size=2, seed=0, decode=False, prefix=prefixes,
                         allowed_counts=[[8], [4], [4, 8], [4, 8]])
    for i in range(3):
        assert torch.equal(t.video_codes(i)[:8], prefixes.video_codes(i))  # each sample its own context
        assert t.block_lengths[i, :2].tolist() == [8, 4]
    one = prefixes.select([1])
    _, t = sample_videos(gpt, tok, SamplerConfig(), classes, batch_size=2, seed=0, decode=False, prefix=one)
    assert all(torch.equal(t.video_codes(i)[:8], one.codes) for i in range(3))


def test_bad_constraints_are_refused_before_any_batch(models):
    tok, _, gpt = models
    kw = dict(batch_size=3, decode=False)

    def first(**extra):
        return next(iter_sample_batches(gpt, tok, SamplerConfig(), CLASSES, **kw, **extra))

    with pytest.raises(ValueError, match=r"fixed_assignment \[8, 4, 4, 16\]: token counts \[16\] are not candidates "
                                         r"of this layout \(4, 8\)"):
        first(fixed_assignment=[8, 4, 4, 16])
    with pytest.raises(ValueError, match=r"fixed_assignment must be \[K=4\] counts .*\[N=7, K=4\].*got shape \(3, 4\)"):
        first(fixed_assignment=[[4] * 4] * 3)
    with pytest.raises(ValueError, match=r"allowed_counts: 16 \(block 0\) is not a candidate count \(4, 8\)"):
        first(allowed_counts=[16])
    with pytest.raises(ValueError, match=r"one set of counts per block \(4\), got 2"):
        first(allowed_counts=[[4], [8]])
    with pytest.raises(ValueError, match="no allowed token count for sample 0, block 1"):
        first(allowed_counts=[[4], [8], [4, 8], [4, 8]], fixed_assignment=[4, 4, 4, 4])
    prefix = TokenizedVideo(torch.zeros(4, dtype=torch.long), torch.tensor([[4]]))
    with pytest.raises(ValueError, match=r"prefix of sample 0 has 4 tokens in block 0.*allowed counts of block 0: \[8\]"):
        first(prefix=prefix, fixed_assignment=[8, 8, 8, 8])
