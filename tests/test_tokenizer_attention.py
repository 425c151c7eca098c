"""Packed block-causal attention: the backends agree, and the mask is the packed rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arvid.tokenizer.attention import Segments, flex_block_mask, packed_attention, packed_mask


def _qkv(nq: int, nk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, nq, 8, generator=g), torch.randn(2, nk, 8, generator=g), torch.randn(2, nk, 8, generator=g))


def test_segments_and_mask():
    seg = Segments.from_block_lengths(torch.tensor([[2, 1], [1, 3]]))
    assert seg.vid.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert seg.blk.tolist() == [0, 0, 1, 0, 1, 1, 1]
    assert seg.counts == [3, 4]
    m = packed_mask(seg, seg)
    assert m[2].tolist() == [True, True, True, False, False, False, False]  # block 1 of video 0
    assert m[0].tolist() == [True, True, False, False, False, False, False]  # block 0 of video 0
    assert m[4].tolist() == [False, False, False, True, True, True, True]


def test_backends_agree_with_per_video_reference():
    qs = Segments.from_block_lengths(torch.tensor([[2, 3, 1], [4, 1, 2], [1, 1, 1]]))
    ks = Segments.uniform(3, torch.tensor([0, 0, 1, 1, 2, 2]))
    q, k, v = _qkv(qs.total, ks.total)
    loop = packed_attention(q, k, v, qs, ks, backend="loop")
    dense = packed_attention(q, k, v, qs, ks, backend="dense")
    torch.testing.assert_close(loop, dense, atol=1e-5, rtol=1e-5)
    # reference: plain softmax attention for each query row over its allowed keys
    allowed = packed_mask(qs, ks)
    scores = torch.einsum("hqd,hkd->hqk", q, k) / 8**0.5
    ref = torch.einsum("hqk,hkd->hqd", F.softmax(scores.masked_fill(~allowed, float("-inf")), -1), v)
    torch.testing.assert_close(loop, ref, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_the_packed_rule():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    qs = Segments.from_block_lengths(torch.tensor([[2, 3, 1], [4, 1, 2]]))
    ks = Segments.from_block_lengths(torch.tensor([[3, 2, 2], [1, 2, 1]]))
    q, k, v = _qkv(qs.total, ks.total, seed=1)
    try:
        out = flex_attention(q[None], k[None], v[None], block_mask=flex_block_mask(qs, ks))[0]
    except Exception as e:  # eager flex on this CPU build
        pytest.skip(f"FlexAttention unavailable on CPU here: {e}")
    torch.testing.assert_close(out, packed_attention(q, k, v, qs, ks, backend="loop"), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_evatok_flex_matches_loop_on_cuda():
    from arvid.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug").cuda().eval()
    video = torch.rand(3, 3, 8, 32, 32, device="cuda") * 2 - 1
    a = torch.tensor([[4, 8, 16, 32], [32, 4, 8, 16], [8, 8, 8, 8]])
    tok.config.attention = "flex"
    r1, q1 = tok(video, a)
    tok.config.attention = "loop"
    r2, q2 = tok(video, a)
    assert (q1.indices == q2.indices).float().mean() > 0.99
    torch.testing.assert_close(r1, r2, atol=2e-3, rtol=2e-3)
