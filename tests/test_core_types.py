"""BlockLayout, assignments, TokenizedVideo and the generator's sequence format."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.data.video import to_file, to_model
from arvid.generator.sequence import MalformedSequence, SequenceFormat


def test_paper_layout_enumeration():
    L = BlockLayout()
    assert L.num_assignments == 625 and L.num_frames == 16
    a = L.all_assignments()
    assert a.shape == (625, 4)
    assert a[0].tolist() == [32] * 4 and a[-1].tolist() == [512] * 4
    assert a[1].tolist() == [32, 32, 32, 64]  # last block least significant
    assert torch.equal(L.assignments_to_indices(a), torch.arange(625))
    assert a.sum(1).min() == 128 and a.sum(1).max() == 2048
    assert len({tuple(r) for r in a.tolist()}) == 625


def test_layout_validation_errors():
    with pytest.raises(ValueError, match="ascending"):
        BlockLayout((4, 4), (64, 32))
    L = BlockLayout((2, 2), (4, 8))
    with pytest.raises(ValueError, match="not candidates"):
        L.validate([[4, 5]])
    with pytest.raises(ValueError, match=r"shape \[B, 2\]"):
        L.validate([[4, 4, 4]])
    assert L.block_of_frame(3) == 1 and L.block_starts == (0, 2)


def test_tokenized_video_views():
    bl = torch.tensor([[2, 4], [4, 4]])
    tv = TokenizedVideo(torch.arange(14), bl)
    assert tv.offsets.tolist() == [0, 6, 14]
    assert tv.block_codes(1, 1).tolist() == [10, 11, 12, 13]
    parts = tv.split()
    assert TokenizedVideo.cat(parts).equal(tv)
    assert tv.select([1]).codes.tolist() == list(range(6, 14))
    picked = tv.select(torch.tensor([1, 0, -1]))  # any order, repeats, negative from the end
    assert picked.equal(TokenizedVideo.cat([parts[1], parts[0], parts[1]]))
    assert tv.select([]).batch_size == 0 and tv.select([]).codes.numel() == 0
    with pytest.raises(IndexError, match="out of range for 2 videos"):
        tv.select([2])
    with pytest.raises(ValueError, match="sum to"):
        TokenizedVideo(torch.arange(5), bl)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=5),
       st.integers(0, 2**31 - 1))
def test_sequence_roundtrip(assign_pos, seed):
    L = BlockLayout((1, 1, 1), (1, 3, 5))
    fmt = SequenceFormat(codebook_size=11, layout=L)
    bl = torch.tensor([[L.candidates[p] for p in row] for row in assign_pos])
    g = torch.Generator().manual_seed(seed)
    tv = TokenizedVideo(torch.randint(0, 11, (int(bl.sum()),), generator=g), bl)
    seq, lengths = fmt.to_sequences(tv)
    assert lengths.tolist() == (bl.sum(1) + 3).tolist()
    for s in torch.split(seq, lengths.tolist()):
        assert fmt.is_well_formed(s)
    assert fmt.from_sequences(seq, lengths).equal(tv)


def test_sequence_malformed_messages():
    fmt = SequenceFormat(codebook_size=4, layout=BlockLayout((1, 1), (1, 2)))
    assert fmt.vocab_size == 6 and fmt.len_token(2) == 5
    with pytest.raises(MalformedSequence, match="length token"):
        fmt.parse_one(torch.tensor([0, 1]))
    with pytest.raises(MalformedSequence, match="block 1 should hold 2"):
        fmt.parse_one(torch.tensor([4, 0, 5, 1]))
    with pytest.raises(MalformedSequence, match="after the last block"):
        fmt.parse_one(torch.tensor([4, 0, 4, 1, 2]))
    ctx = fmt.context_mask(torch.tensor([[1, 2], [2, 2]]), 1)
    assert ctx.tolist() == [True, True, False, False, False] + [True, True, True, False, False, False]


def test_video_conversion_roundtrip():
    x = torch.randint(0, 256, (5, 6, 7, 3), dtype=torch.uint8)
    m = to_model(x)
    assert m.shape == (3, 5, 6, 7) and m.min() >= -1 and m.max() <= 1
    assert torch.equal(to_file(m), x)
    assert torch.equal(to_file(to_model(x[None])), x[None])


def test_segment_positions():
    from arvid.data.types import segment_positions

    assert segment_positions([2, 3]).tolist() == [0, 1, 0, 1, 2]
    assert segment_positions([1, 0, 2]).tolist() == [0, 0, 1]
    assert segment_positions([]).tolist() == []
