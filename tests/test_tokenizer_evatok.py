"""EVATok: token counts, block causality, packed mixed batches, prefixes, save/load, router, errors."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arvid.config import ConfigError
from arvid.data.types import TokenizedVideo
from arvid.tokenizer import EVATok, EVATokConfig, build_tokenizer, load_tokenizer


def _video(b: int, t: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def tok() -> EVATok:
    torch.manual_seed(0)
    return build_tokenizer("evatok", preset="debug").eval()


@functools.lru_cache(maxsize=1)
def _shared_debug() -> EVATok:
    # hypothesis runs many examples per test: build the model once (fixtures are per test)
    torch.manual_seed(0)
    return build_tokenizer("evatok", preset="debug").eval()


@settings(max_examples=10, deadline=None)
@given(st.lists(st.lists(st.sampled_from([4, 8, 16, 32]), min_size=4, max_size=4), min_size=1, max_size=3))
def test_any_assignment_gives_sum_codes_and_input_shape(assign):
    tok = _shared_debug()
    a = torch.tensor(assign)
    video = _video(a.shape[0])
    tv = tok.encode(video, a)
    assert tv.codes.numel() == int(a.sum())
    assert torch.equal(tv.block_lengths, a)
    assert int(tv.codes.min()) >= 0 and int(tv.codes.max()) < tok.codebook_size
    out = tok.decode(tv)
    assert out.shape == video.shape
    assert torch.isfinite(out).all()


def test_block_causality_of_codes_and_decoded_frames(tok):
    video = _video(2, seed=1)
    a = torch.tensor([[8, 16, 4, 32], [32, 4, 8, 8]])
    base = tok.encode(video, a)
    fpb = tok.layout.frames_per_block
    for t in range(tok.layout.num_blocks - 1):
        changed = video.clone()
        start = sum(fpb[:t + 1])
        changed[:, :, start:] = torch.rand_like(changed[:, :, start:])  # blocks > t
        other = tok.encode(changed, a)
        for b in range(2):
            for k in range(tok.layout.num_blocks):
                same = torch.equal(base.block_codes(b, k), other.block_codes(b, k))
                if k <= t:
                    assert same, f"codes of block {k} changed when frames of blocks > {t} changed"
        # later blocks must actually react, or the test would pass vacuously
        assert not all(torch.equal(base.block_codes(b, t + 1), other.block_codes(b, t + 1)) for b in range(2))
    # decoder: changing the codes of the last block leaves earlier frames exactly equal
    codes = base.codes.clone()
    for b in range(2):
        off = int(base.offsets[b]) + int(a[b, :3].sum())
        codes[off:off + int(a[b, 3])] = (codes[off:off + int(a[b, 3])] + 1) % tok.codebook_size
    d0 = tok.decode(base)
    d1 = tok.decode(TokenizedVideo(codes, base.block_lengths))
    last = sum(fpb[:3])
    assert torch.equal(d0[:, :, :last], d1[:, :, :last])
    assert (d0[:, :, last:] - d1[:, :, last:]).abs().max() > 1e-4


def test_later_block_counts_do_not_change_earlier_codes(tok):
    video = _video(1, seed=2)
    a1 = torch.tensor([[8, 16, 4, 4]])
    a2 = torch.tensor([[8, 16, 32, 8]])
    t1, t2 = tok.encode(video, a1), tok.encode(video, a2)
    for k in (0, 1):
        assert torch.equal(t1.block_codes(0, k), t2.block_codes(0, k))


@pytest.mark.parametrize("backend", ["loop", "dense"])
def test_mixed_batch_equals_each_video_alone(backend):
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug", config={"attention": backend}).eval()
    video = _video(4, seed=3)
    a = torch.tensor([[4, 8, 16, 32], [32, 32, 32, 32], [4, 4, 4, 4], [16, 4, 32, 8]])
    batch = tok.encode(video, a)
    recon = tok.decode(batch)
    for i in range(4):
        alone = tok.encode(video[i:i + 1], a[i:i + 1])
        assert torch.equal(alone.codes, batch.video_codes(i))
        torch.testing.assert_close(tok.decode(alone), recon[i:i + 1], atol=1e-5, rtol=1e-5)


def test_loop_and_dense_backends_agree():
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug").eval()
    video = _video(3, seed=4)
    a = torch.tensor([[4, 8, 16, 32], [32, 4, 8, 16], [8, 8, 8, 8]])
    tok.config.attention = "loop"
    r1, q1 = tok(video, a)
    tok.config.attention = "dense"
    r2, q2 = tok(video, a)
    assert torch.equal(q1.indices, q2.indices)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)


def test_prefix_encode_and_decode_match_full(tok):
    video = _video(2, seed=5)
    a = torch.tensor([[16, 4, 32, 8], [4, 32, 8, 16]])
    full = tok.encode(video, a)
    recon = tok.decode(full)
    for t in (1, 2, 3):
        frames = sum(tok.layout.frames_per_block[:t])
        pre = tok.encode(video[:, :, :frames], a[:, :t])
        assert pre.block_lengths.shape == (2, t)
        for b in range(2):
            expect = torch.cat([full.block_codes(b, k) for k in range(t)])
            assert torch.equal(pre.video_codes(b), expect)
        dec = tok.decode(pre)
        assert dec.shape[2] == frames
        torch.testing.assert_close(dec, recon[:, :, :frames], atol=1e-5, rtol=1e-5)


def test_default_assignment_and_router(tok):
    video = _video(2, seed=6)
    tv = tok.encode(video)
    mid = tok.layout.candidates[tok.layout.num_candidates // 2]
    assert torch.equal(tv.block_lengths, torch.full((2, 4), mid))

    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def choose(self, v):
            return torch.tensor([[4, 8, 16, 32]]).expand(v.shape[0], -1)

    keys = set(tok.state_dict())
    fp = tok.fingerprint()
    tok.router = Router()
    try:
        assert set(tok.state_dict()) == keys, "the router must not become part of the tokenizer's weights"
        assert tok.fingerprint() == fp
        tv = tok.encode(video)
        assert torch.equal(tv.block_lengths, torch.tensor([[4, 8, 16, 32]] * 2))
        # a block prefix cannot be routed (the router sees whole clips): said so, not a shape error
        prefix = video[:, :, : tok.layout.frames_per_block[0]]
        with pytest.raises(ValueError, match="router chooses from whole clips .* explicit assignment"):
            tok.encode(prefix)
        part, whole = tok.encode(prefix, tv.block_lengths[:, :1]), tok.encode(video, tv.block_lengths)
        assert all(torch.equal(part.video_codes(i), whole.video_codes(i)[:4]) for i in range(2))
    finally:
        tok.router = None
    with pytest.raises(TypeError, match="choose"):
        tok.router = object()


def test_config_default_assignment():
    tok = build_tokenizer("evatok", preset="debug", config={"default_assignment": [4, 32, 4, 32]}).eval()
    assert tok.encode(_video(1)).block_lengths.tolist() == [[4, 32, 4, 32]]
    with pytest.raises(ConfigError, match="not candidates"):
        build_tokenizer("evatok", preset="debug", config={"default_assignment": [5, 32, 4, 32]})


def test_save_load_round_trip_exact(tok, tmp_path):
    video = _video(2, seed=7)
    a = torch.tensor([[8, 16, 4, 32], [32, 4, 8, 8]])
    tv = tok.encode(video, a)
    rec = tok.decode(tv)
    tok.save_pretrained(tmp_path / "tok")
    for loaded in (EVATok.from_pretrained(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert isinstance(loaded, EVATok)
        loaded.eval()
        assert loaded.fingerprint() == tok.fingerprint()
        tv2 = loaded.encode(video, a)
        assert tv2.equal(tv)
        assert torch.equal(loaded.decode(tv2), rec)
    # a different model has a different fingerprint
    torch.manual_seed(123)
    assert build_tokenizer("evatok", preset="debug").fingerprint() != tok.fingerprint()


def test_bad_inputs_are_clear(tok):
    with pytest.raises(ValueError, match="frames"):
        tok.encode(_video(1, t=7))
    with pytest.raises(ValueError, match="32x32"):
        tok.encode(_video(1, size=16))
    with pytest.raises(ValueError, match="not candidates"):
        tok.encode(_video(1), torch.tensor([[4, 8, 5, 4]]))
    with pytest.raises(ValueError, match="shape"):
        tok.encode(_video(1), torch.tensor([[4, 8, 16]]))
    with pytest.raises(ValueError, match="indices"):
        tok.decode(TokenizedVideo(torch.full((16,), 10**6), torch.tensor([[4, 4, 4, 4]])))
    with pytest.raises(ConfigError, match="patch_time"):
        build_tokenizer("evatok", preset="debug", config={"frames_per_block": [3, 3]})


def test_general_layout_two_latent_frames_per_block():
    # frames_per_block a multiple (not equal) of patch_time, and unequal blocks
    cfg = dict(EVATok.presets()["debug"], frames_per_block=(4, 2, 2), candidates=(2, 8), patch_time=2)
    tok = EVATok(EVATokConfig(**{**cfg, "quantizer": EVATokConfig().quantizer.__class__(
        **cfg["quantizer"])})).eval()
    video = _video(2, t=8)
    a = torch.tensor([[2, 8, 2], [8, 2, 8]])
    tv = tok.encode(video, a)
    assert tv.codes.numel() == 30
    assert tok.decode(tv).shape == video.shape
    changed = video.clone()
    changed[:, :, 4:] = 0
    tv2 = tok.encode(changed, a)
    for b in range(2):
        assert torch.equal(tv.block_codes(b, 0), tv2.block_codes(b, 0))


def test_presets_sizes():
    # Built on the meta device: no memory, no init cost; only the parameter count matters.
    with torch.device("meta"):
        b = build_tokenizer("evatok", preset="B")
        s = build_tokenizer("evatok", preset="S")
    nb = sum(p.numel() for p in b.parameters())
    ns = sum(p.numel() for p in s.parameters())
    assert 135e6 < nb < 155e6, nb  # the paper's ~145M
    assert 30e6 < ns < 70e6, ns
    assert b.layout.candidates == (32, 64, 128, 256, 512) and b.layout.frames_per_block == (4, 4, 4, 4)
    assert b.codebook_size == 16384


def test_training_forward_has_gradients_and_losses(tok):
    tok.train()
    try:
        video = _video(2, seed=8)
        a = torch.tensor([[4, 8, 16, 32], [8, 8, 8, 8]])
        recon, qo = tok(video, a, generator=torch.Generator().manual_seed(0), entropy=True)
        assert recon.shape == video.shape
        assert qo.indices.numel() == int(a.sum())
        assert set(qo.losses) == {"commit", "codebook", "entropy"}
        loss = (recon - video).abs().mean() + qo.losses["commit"]
        loss.backward()
        assert tok.patch_embed.weight.grad is not None and tok.patch_embed.weight.grad.abs().sum() > 0
        assert tok.head.weight.grad.abs().sum() > 0
    finally:
        tok.zero_grad(set_to_none=True)
        tok.eval()


def test_training_forward_shares_the_encoders_tags_with_the_decoder(tok, monkeypatch):
    """forward hands the encoder's TokenMeta (and its group plan) to the decoder: one tag build
    and one plan per step, the same reconstruction as a decoder that builds its own."""
    video = _video(3, seed=2)
    a = torch.tensor([[4, 8, 16, 32], [8, 8, 8, 8], [4, 8, 16, 8]])
    calls = {"meta": 0, "plan": 0}
    meta_fn = tok._token_meta

    def counting_meta(*args, **kwargs):
        calls["meta"] += 1
        return meta_fn(*args, **kwargs)

    monkeypatch.setattr(tok, "_token_meta", counting_meta)
    with torch.no_grad():
        recon, qo = tok(video, a)
        assert calls["meta"] == 1
        alone = tok.decode_features(qo.z_q, a)  # builds its own tags
        assert calls["meta"] == 2
    torch.testing.assert_close(recon, alone, rtol=0, atol=0)
    meta = meta_fn(a, torch.device("cpu"))
    plan = tok._groups(a, meta, torch.device("cpu"))
    assert tok._groups(a, meta, torch.device("cpu")) is plan  # kept on the meta
    assert sorted((k, c, sel.tolist()) for k, c, sel, _ in plan) == sorted(
        (k, c, [b for b in range(3) if int(a[b, k]) == c]) for k in range(4) for c in set(a[:, k].tolist()))


def test_token_meta_matches_a_per_video_reference(tok):
    a = torch.tensor([[8, 16, 4, 32], [32, 4, 8, 8], [4, 4, 4, 4]])
    meta = tok._token_meta(a, torch.device("cpu"))
    cands = list(tok.layout.candidates)
    vid, blk, pos, cand, starts = [], [], [], [], []
    for b in range(a.shape[0]):
        for k in range(a.shape[1]):
            n = int(a[b, k])
            starts.append(len(vid))
            vid += [b] * n
            blk += [k] * n
            pos += list(range(n))
            cand += [cands.index(n)] * n
    assert meta.segments.vid.tolist() == vid and meta.segments.blk.tolist() == blk
    assert meta.pos.tolist() == pos and meta.cand.tolist() == cand
    assert meta.block_start.reshape(-1).tolist() == starts == meta.block_start_cpu.reshape(-1).tolist()
    assert meta.segments.counts == a.sum(1).tolist()
    with pytest.raises(ValueError, match=r"token counts \[5\] are not candidates"):
        tok._token_meta(torch.tensor([[4, 5, 4, 4]]), torch.device("cpu"))


def test_decoder_inputs_match_plain_indexing_in_value_and_gradient():
    """The decoder's first-token spread, unpooling and learned-table lookups (index_select, expand,
    F.embedding, index_copy slabs) give the values and gradients of a direct per-video loop."""
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", {"decoder_init": "first_unpooled", "token_pos": "pooled"}, preset="debug")
    a = torch.tensor([[8, 16, 4, 32], [32, 4, 8, 8], [8, 16, 16, 4]])
    B, K = a.shape
    D = tok.config.dim
    meta = tok._token_meta(a, torch.device("cpu"))
    ranges = tok._block_ranges(K)
    Np = ranges[-1][1]
    t = torch.randn(int(a.sum()), D, requires_grad=True)
    y0 = torch.randn(B, Np, D, requires_grad=True)

    def reference(t, y0):
        out = []
        for b in range(B):
            rows = []
            for k, (s, e) in enumerate(ranges):
                st, n = int(meta.block_start_cpu[b, k]), int(a[b, k])
                tok_k = t[st:st + n]  # [n, D]
                up = torch.nn.functional.adaptive_avg_pool1d(tok_k.T[None], e - s)[0].T  # [n_k, D]
                rows.append(y0[b, s:e] + tok_k[0] + up)
            out.append(torch.cat(rows))
        return torch.stack(out)

    first = t.index_select(0, meta.block_start.reshape(-1)).reshape(B, K, -1)
    spread = torch.cat([first[:, k:k + 1].expand(-1, e - s, -1) for k, (s, e) in enumerate(ranges)], dim=1)
    got = tok._unpool_tokens(y0 + spread, t, a, meta)
    want = reference(t, y0)
    torch.testing.assert_close(got, want)
    w = torch.randn_like(want)
    g_got = torch.autograd.grad((got * w).sum(), (t, y0))
    g_want = torch.autograd.grad((want * w).sum(), (t, y0))
    for x, y in zip(g_got, g_want):
        torch.testing.assert_close(x, y)
    # the learned tables: F.embedding's gradient is plain indexing's
    table = torch.randn(7, D, requires_grad=True)
    idx = torch.tensor([0, 3, 3, 3, 6, 0, 1])
    from arvid.tokenizer.evatok import _rows
    ga = torch.autograd.grad((_rows(table, idx) * w[0, :7]).sum(), table)[0]
    gb = torch.autograd.grad((table[idx] * w[0, :7]).sum(), table)[0]
    torch.testing.assert_close(ga, gb)


def test_vq_losses_weigh_each_video_the_same_whatever_the_split(tok):
    """The commitment loss was a plain mean over packed tokens: a 4 x 16-token video weighed 16x a
    4 x 1-token one, and the batch's loss changed when split into micro-batches (before 2026-12-07)."""
    lay = tok.layout
    v = _video(4, seed=11)
    big, small = [lay.candidates[-1]] * lay.num_blocks, [lay.candidates[0]] * lay.num_blocks
    a = torch.tensor([big, big, small, small])
    with torch.no_grad():
        _, whole = tok(v, a)
        _, first = tok(v[:2], a[:2])
        _, second = tok(v[2:], a[2:])
        per_video = [float(tok(v[i:i + 1], a[i:i + 1])[1].losses["commit"]) for i in range(4)]
    halves = (float(first.losses["commit"]) + float(second.losses["commit"])) / 2
    assert float(whole.losses["commit"]) == pytest.approx(halves, rel=1e-5)
    assert float(whole.losses["commit"]) == pytest.approx(sum(per_video) / 4, rel=1e-5)
