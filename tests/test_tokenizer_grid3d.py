"""grid3d: causal 3D-CNN VQ tokenizer behind the same protocol."""

from __future__ import annotations

import pytest
import torch

from arvid.data.types import TokenizedVideo
from arvid.tokenizer import Grid3D, build_tokenizer, load_tokenizer


def _video(b: int, t: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tok() -> Grid3D:
    torch.manual_seed(0)
    return build_tokenizer("grid3d", preset="debug").eval()


def test_layout_and_counts(tok):
    # debug: 8 frames, time /2 -> 4 blocks of 2 frames; 32 px / 4 -> 8x8 = 64 codes per block
    assert tok.layout.frames_per_block == (2, 2, 2, 2)
    assert tok.layout.candidates == (64,)
    video = _video(2)
    tv = tok.encode(video)
    assert tv.codes.numel() == 2 * 4 * 64
    assert tv.block_lengths.tolist() == [[64] * 4] * 2
    assert tok.decode(tv).shape == video.shape
    assert tok.encode(video, tok.layout.uniform(64, 2)).equal(tv)


def test_only_the_uniform_assignment_is_accepted(tok):
    with pytest.raises(ValueError, match="fixed-length"):
        tok.encode(_video(1), torch.tensor([[32, 64, 64, 64]]))
    with pytest.raises(ValueError, match="64 codes per block"):
        tok.decode(TokenizedVideo(torch.zeros(4 * 32, dtype=torch.long), torch.tensor([[32] * 4])))
    with pytest.raises(ValueError, match="frames"):
        tok.encode(_video(1, t=7))


def test_block_causality_encoder_and_decoder(tok):
    video = _video(2, seed=1)
    base = tok.encode(video)
    for t in range(3):
        changed = video.clone()
        start = 2 * (t + 1)
        changed[:, :, start:] = torch.rand_like(changed[:, :, start:])
        other = tok.encode(changed)
        for b in range(2):
            for k in range(t + 1):
                assert torch.equal(base.block_codes(b, k), other.block_codes(b, k)), (t, b, k)
        assert not all(torch.equal(base.block_codes(b, t + 1), other.block_codes(b, t + 1)) for b in range(2))
    # the decoder: new codes in block 3 leave frames of blocks 0..2 unchanged
    codes = base.codes.clone().reshape(2, 4, 64)
    codes[:, 3] = (codes[:, 3] + 7) % tok.codebook_size
    d0 = tok.decode(base)
    d1 = tok.decode(TokenizedVideo(codes.reshape(-1), base.block_lengths))
    assert torch.equal(d0[:, :, :6], d1[:, :, :6])
    assert (d0[:, :, 6:] - d1[:, :, 6:]).abs().max() > 1e-5


def test_prefix_matches_full(tok):
    video = _video(1, seed=2)
    full = tok.encode(video)
    pre = tok.encode(video[:, :, :4])
    assert torch.equal(pre.codes, full.codes[:128])
    torch.testing.assert_close(tok.decode(pre), tok.decode(full)[:, :, :4], atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tok, tmp_path):
    video = _video(2, seed=3)
    tv = tok.encode(video)
    rec = tok.decode(tv)
    tok.save_pretrained(tmp_path / "g")
    loaded = load_tokenizer(tmp_path / "g").eval()
    assert isinstance(loaded, Grid3D)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(video).equal(tv)
    assert torch.equal(loaded.decode(tv), rec)


def test_training_forward(tok):
    tok.train()
    try:
        video = _video(2, seed=4)
        recon, qo = tok(video, None, generator=torch.Generator().manual_seed(0), entropy=True)
        assert recon.shape == video.shape
        assert qo.indices.numel() == 2 * 4 * 64
        ((recon - video).abs().mean() + qo.losses["commit"] + qo.losses["entropy"]).backward()
        assert tok.encoder[0].conv.weight.grad.abs().sum() > 0
    finally:
        tok.zero_grad(set_to_none=True)
        tok.eval()


def test_preset_b_size():
    with torch.device("meta"):
        b = build_tokenizer("grid3d", preset="B")
    n = sum(p.numel() for p in b.parameters())
    assert 100e6 < n < 180e6, n
    assert b.layout.frames_per_block == (4, 4, 4, 4) and b.layout.candidates == (256,)
