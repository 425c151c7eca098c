"""Frame prediction and class -> video through a tiny real tokenizer (evatok debug) and GPT."""

from __future__ import annotations

import pytest
import torch

from arvid.data.types import BlockLayout
from arvid.generator.conditioning import Conditioning
from arvid.generator.gpt import GPT
from arvid.generator.sequence import SequenceFormat
from arvid.sampling import (
    Sampler,
    SamplerConfig,
    context_blocks_for,
    encode_context,
    iter_sample_batches,
    pad_frames,
    predict_frames,
    sample_videos,
)
from arvid.tokenizer.base import build_tokenizer


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", {"candidates": (4, 8)}, preset="debug").eval()  # 4 blocks of 2 frames, 32x32
    fmt = SequenceFormat(tok.codebook_size, tok.layout)
    gpt = GPT.from_preset("debug", vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 1, num_classes=3).eval()
    torch.nn.init.normal_(gpt.head.weight, std=0.3, generator=torch.Generator().manual_seed(2))
    return tok, fmt, gpt


def test_pad_frames_and_context_blocks():
    v = torch.arange(3.0).reshape(1, 1, 3, 1, 1).expand(2, 3, 3, 4, 4)
    p = pad_frames(v, 8)
    assert p.shape == (2, 3, 8, 4, 4)
    assert p[0, 0, :, 0, 0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2]
    k600 = BlockLayout((4, 4, 4, 4), (32, 64, 128, 256, 512))
    assert context_blocks_for(k600, 5) == 2  # Kinetics-600: 5 frames -> the first two blocks
    assert context_blocks_for(k600, 4) == 1
    with pytest.raises(ValueError, match="context frames"):
        context_blocks_for(k600, 16)
    with pytest.raises(ValueError, match="already longer"):
        pad_frames(v, 2)


def test_context_tokens_are_those_of_the_real_clip(models):
    tok, fmt, _ = models
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(2, 3, 8, 32, 32, generator=g) * 2 - 1
    ctx = clip[:, :, :3]  # 3 frames -> blocks 0 and 1 (4 frames), frame 3 padded
    real = clip.clone()
    real[:, :, 3] = real[:, :, 2]  # the padded context inside an otherwise different clip
    got = encode_context(tok, ctx, 2, counts=[8, 4])
    assert got.block_lengths.tolist() == [[8, 4], [8, 4]]
    full = tok.encode(real, torch.tensor([[8, 4, 4, 8]]))
    for i in range(2):
        want = torch.cat([full.block_codes(i, 0), full.block_codes(i, 1)])
        assert torch.equal(got.video_codes(i), want)  # block-causal: later frames do not matter


def test_predict_frames_keeps_the_context_and_fills_the_rest(models):
    tok, fmt, gpt = models
    ctx = torch.rand(3, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    s = Sampler(gpt, fmt, SamplerConfig(cfg_scale=1.5))
    want = encode_context(tok, ctx, 2, counts=4)
    videos, out = predict_frames(s, tok, ctx, counts=4, cond=Conditioning(torch.tensor([0, 1, 2])),
                                 generator=torch.Generator().manual_seed(0), allowed_counts=[[4], [4], [8], [4, 8]])
    assert videos.shape == (3, 3, 8, 32, 32)
    bl = out.tokens.block_lengths
    assert bl[:, :2].tolist() == [[4, 4]] * 3 and bool((bl[:, 2] == 8).all())
    for i in range(3):
        assert torch.equal(out.tokens.video_codes(i)[:8], want.video_codes(i))
        assert fmt.is_well_formed(out.unpacked()[i])
    # The decoded video is the tokenizer's decode of the sampled tokens.
    torch.testing.assert_close(videos, tok.decode(out.tokens))


def test_sample_videos_batches_are_independent_of_sharding(models):
    tok, fmt, gpt = models
    cfg = SamplerConfig(cfg_scale=2.0, top_k=50)
    classes = torch.tensor([0, 1, 2, 0, 1])
    videos, tokens = sample_videos(gpt, tok, cfg, classes, batch_size=2, seed=3)
    assert videos.shape == (5, 3, 8, 32, 32) and tokens.batch_size == 5
    assert float(videos.abs().max()) <= 1.0
    # Batch 2 alone (what a second process would run) holds the same sample as the full run.
    (j, v, t), = list(iter_sample_batches(gpt, tok, cfg, classes, batch_size=2, seed=3, batches=[2]))
    assert j == 2 and t.batch_size == 1  # the padded last batch is trimmed
    assert torch.equal(t.codes, tokens.video_codes(4)) and torch.allclose(v[0], videos[4])
    # Another seed gives other samples.
    _, other = sample_videos(gpt, tok, cfg, classes, batch_size=2, seed=4, decode=False)
    assert not torch.equal(other.block_lengths, tokens.block_lengths) or not torch.equal(other.codes, tokens.codes)
    with pytest.raises(ValueError, match="vocab_size"):
        sample_videos(GPT.from_preset("debug", vocab_size=10, max_seq_len=40, num_classes=3), tok, cfg, classes)


def test_encode_context_names_a_context_that_does_not_fit_its_blocks(models):
    """An explicit ``context_blocks`` that the clip does not fit (more frames than the blocks hold),
    or that leaves no block to generate, is named up front; it failed deep inside with 'cannot pad 5
    frames to 2: already longer' or, after encoding, 'the prefix (36 tokens) leaves nothing to
    generate' (review 2026-12-08)."""
    tok, fmt, gpt = models
    ctx = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.raises(ValueError, match=r"context of 5 frames does not fit context_blocks=1 \(2 frames"):
        encode_context(tok, ctx, 1)
    for k in (0, 4):
        with pytest.raises(ValueError, match=rf"context_blocks must lie in \[1, 3\].*got {k}"):
            encode_context(tok, ctx, k)
    s = Sampler(gpt, fmt, SamplerConfig())
    with pytest.raises(ValueError, match=r"context_blocks must lie in \[1, 3\].*got 4"):
        predict_frames(s, tok, ctx, context_blocks=4, cond=Conditioning(class_ids=torch.tensor([0, 1])), decode=False)
    assert encode_context(tok, ctx, 3).block_lengths.shape == (2, 3)
