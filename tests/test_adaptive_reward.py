"""Reward math, curation records, brute-force vs block-causal beam search (with a fake tokenizer),
and the router model. The real-tokenizer pipeline is in test_adaptive_pipeline.py."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.tokenizer.reward import (
    CurationRecords,
    Distortion,
    ProxyScorer,
    RewardStats,
    beam_search,
    block_weights,
    brute_force_search,
    calibration_samples,
    complete_records,
    compute_reward,
    labels_for,
    per_block,
    reward_percentile,
    threshold_search,
)
from arvid.tokenizer.router import Router, RouterConfig


class FakeBlockCausalTokenizer:
    """A tiny deterministic block-causal tokenizer for search tests.

    Block t with n codes stores the block's gray frames average-pooled to a sqrt(n) x sqrt(n) grid,
    quantised to 256 levels. Decoding block t upsamples its grid and mixes in 30% of the mean of
    the previous decoded block, so block t's reconstruction depends on the whole prefix a_1..a_t
    (like a real decoder) and never on later blocks.
    """

    codebook_size = 256

    def __init__(self, layout: BlockLayout, size: int):
        self.layout = layout
        self.size = size

    def encode(self, video, assignment=None):
        B = video.shape[0]
        a = self.layout.validate(assignment, batch=B)
        gray = video.mean(1)  # [B, T, H, W]
        codes = []
        for b in range(B):
            for k, (s, n) in enumerate(zip(self.layout.block_starts, self.layout.frames_per_block)):
                g = math.isqrt(int(a[b, k]))
                blk = gray[b, s:s + n].mean(0)[None, None]  # [1, 1, H, W]
                pooled = F.adaptive_avg_pool2d(blk, g).reshape(-1)  # [g*g]
                codes.append(((pooled.clamp(-1, 1) + 1) * 127.5).round().long())
        return TokenizedVideo(torch.cat(codes), a.clone())

    def decode(self, tokens):
        B, K = tokens.block_lengths.shape
        T, S = self.layout.num_frames, self.size
        out = torch.zeros(B, 3, T, S, S)
        for b in range(B):
            prev = torch.zeros(S, S)
            for k, (s, n) in enumerate(zip(self.layout.block_starts, self.layout.frames_per_block)):
                c = tokens.block_codes(b, k).float() / 127.5 - 1
                g = math.isqrt(c.numel())
                up = F.interpolate(c.reshape(1, 1, g, g), size=(S, S), mode="nearest")[0, 0]
                rec = 0.7 * up + 0.3 * prev.mean()
                out[b, :, s:s + n] = rec
                prev = rec
        return out


def _videos(n, layout, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per-video detail level: smooth low-frequency field plus a video-dependent amount of texture
    base = F.interpolate(torch.rand(n, 3, layout.num_frames, 2, 2, generator=g) * 2 - 1,
                         size=(layout.num_frames, size, size), mode="trilinear", align_corners=False)
    detail = torch.rand(n, 1, 1, 1, 1, generator=g) ** 2
    tex = torch.rand(n, 3, layout.num_frames, size, size, generator=g) * 2 - 1
    return (0.7 * base + detail * tex).clamp(-1, 1)


def _direct_block_distortion(tok, video, assignment):
    """Reference: decode one full assignment and average the per-frame MSE over each block."""
    rec = tok.decode(tok.encode(video[None], torch.tensor([assignment])))
    frame = (rec - video[None]).pow(2).mean(dim=(1, 3, 4))[0]  # [T]
    return np.array([frame[s:s + n].mean().item()
                     for s, n in zip(tok.layout.block_starts, tok.layout.frames_per_block)])


STATS = RewardStats("mse", mean_distortion=0.05, std_distortion=0.02, mean_length=40.0, std_length=15.0,
                    num_samples=100)


def test_reward_formula_matches_direct_computation():
    d = np.array([0.01, 0.05, 0.09])
    n = np.array([12.0, 40.0, 70.0])
    for w_q in (0.4, 1.2, 2.0):
        w_l = 2 - w_q
        got = compute_reward(d, n, STATS, w_q, w_l)
        want = [w_q * (0.05 - di) / 0.02 - w_l * (ni - 40.0) / 15.0 for di, ni in zip(d, n)]
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # the main setting, by hand: Q = 2, L = -28/15
    assert compute_reward(0.01, 12.0, STATS, 1.2, 0.8) == pytest.approx(1.2 * 2.0 + 0.8 * 28 / 15)


def test_stats_from_samples_and_roundtrip():
    rng = np.random.default_rng(0)
    d, n = rng.random(50), rng.integers(4, 100, 50)
    s = RewardStats.from_samples(d, n, "ssim")
    assert s.mean_distortion == pytest.approx(d.mean()) and s.std_distortion == pytest.approx(d.std(ddof=1))
    assert s.mean_length == pytest.approx(n.mean()) and s.std_length == pytest.approx(n.std(ddof=1))
    assert RewardStats.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="std_distortion"):
        RewardStats("mse", 0.1, 0.0, 1.0, 1.0, 3)
    with pytest.raises(ValueError, match="mean_length"):
        RewardStats.from_dict({"quality": "mse", "mean_distortion": 1, "std_distortion": 1})


def test_distortions_order_and_zero():
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    g = torch.Generator().manual_seed(1)
    small = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    big = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    for q in ("mse", "ssim"):
        dist = Distortion(q)
        z = dist.per_frame(x, x)
        assert z.shape == (2, 4) and z.abs().max() < 1e-5
        assert (dist.per_frame(x, small) < dist.per_frame(x, big)).all()
    np.testing.assert_allclose(Distortion("mse").per_frame(x, big).numpy(),
                               (x - big).pow(2).mean(dim=(1, 3, 4)).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="quality"):
        Distortion("psnr")
    with pytest.raises(ValueError, match="at least 11x11"):
        Distortion("ssim").per_frame(x[..., :8, :8], x[..., :8, :8])


def test_block_weights_make_distortion_the_frame_mean():
    layout = BlockLayout((1, 3, 2), (1, 4))
    frames = torch.rand(5, 6)
    blocks = per_block(frames, layout).double().numpy()
    np.testing.assert_allclose(blocks @ block_weights(layout), frames.double().mean(1).numpy(), rtol=1e-6)


def test_brute_force_records_are_exact_and_labels_are_argmax():
    layout = BlockLayout((2, 2, 2), (1, 4, 16))
    tok = FakeBlockCausalTokenizer(layout, 8)
    vids = _videos(3, layout, 8)
    scorer = ProxyScorer(tok, Distortion("mse"), batch_size=10)
    res = brute_force_search(scorer, vids)
    assert scorer.num_decoded == 3 * 27 and res.num_decoded.tolist() == [27] * 3
    rec = res.to_records(torch.tensor([10, 20, 30]), layout, "mse", "brute")
    all_a = layout.all_assignments()
    for i in (0, 13, 26):  # a few records against a direct single decode
        j = 27 + i  # second video
        assert rec.video[j] == 20 and rec.assignment[j] == i
        np.testing.assert_allclose(rec.block_distortion[j], _direct_block_distortion(tok, vids[1], all_a[i].tolist()),
                                   rtol=1e-6, atol=1e-9)
    for w_q in (0.4, 1.2, 2.0):
        vid, lab, best = labels_for(rec, STATS, w_q, 2 - w_q)
        assert vid.tolist() == [10, 20, 30]
        _, table = rec.reward_table(STATS, w_q, 2 - w_q)
        direct = np.array([[compute_reward(rec.block_distortion[v * 27 + a] @ block_weights(layout),
                                           float(all_a[a].sum()), STATS, w_q, 2 - w_q) for a in range(27)]
                           for v in range(3)])
        np.testing.assert_allclose(table, direct, rtol=1e-12)
        assert lab.tolist() == direct.argmax(1).tolist()
        np.testing.assert_allclose(best, direct.max(1))
    # a heavier length weight never picks a longer label
    _, lab_q, _ = labels_for(rec, STATS, 2.0, 0.0)
    _, lab_l, _ = labels_for(rec, STATS, 0.4, 1.6)
    assert (all_a[lab_l].sum(1) <= all_a[lab_q].sum(1)).all()


def test_beam_search_exhaustive_width_equals_brute_force_and_is_cheaper():
    layout = BlockLayout((2, 2, 2), (1, 4, 16, 64))  # 64 assignments
    tok = FakeBlockCausalTokenizer(layout, 8)
    vids = _videos(6, layout, 8, seed=3)
    s_brute = ProxyScorer(tok, Distortion("mse"), batch_size=64)
    brute = brute_force_search(s_brute, vids)
    stats = RewardStats.from_samples(*calibration_samples(s_brute, vids, 8, torch.Generator().manual_seed(0)),
                                     quality="mse")
    best_b, r_b = brute.best(layout, stats, 1.2, 0.8)
    # width C**(K-1) keeps every prefix: the search is exhaustive
    s_full = ProxyScorer(tok, Distortion("mse"), batch_size=64)
    full = beam_search(s_full, vids, stats, 1.2, 0.8, beam_width=16)
    assert full.num_decoded.tolist() == [64] * 6
    assert torch.equal(full.best(layout, stats, 1.2, 0.8)[0], best_b)
    # narrow beam: records are exact and the cost is C + (K-1) * b * (C-1) per video
    s_beam = ProxyScorer(tok, Distortion("mse"), batch_size=64)
    beam = beam_search(s_beam, vids, stats, 1.2, 0.8, beam_width=1)
    assert (beam.num_decoded <= 4 + 2 * 1 * 3).all() and s_beam.num_decoded == int(beam.num_decoded.sum())
    brute_d = brute.block_distortion.reshape(6, 64, 3)
    for m in range(beam.row.numel()):
        np.testing.assert_allclose(beam.block_distortion[m].numpy(),
                                   brute_d[beam.row[m], beam.assignment[m]].numpy(), rtol=1e-6, atol=1e-9)
    _, r_beam = beam.best(layout, stats, 1.2, 0.8)
    assert (r_beam <= r_b + 1e-9).all()


def test_records_save_load_select_concat(tmp_path):
    layout = BlockLayout((2, 2), (1, 4))
    rec = CurationRecords(layout, [5, 5, 7], [0, 3, 1], np.arange(6.0).reshape(3, 2) / 10, [5, 7], [2, 1],
                          "ssim", "beam")
    rec.save(tmp_path / "r.npz")
    back = CurationRecords.load(tmp_path / "r.npz")
    assert back.layout == layout and back.quality == "ssim" and back.mode == "beam"
    np.testing.assert_array_equal(back.block_distortion, rec.block_distortion)
    np.testing.assert_array_equal(back.length, [2, 8, 5])
    vids, table = back.distortion_table()
    assert vids.tolist() == [5, 7] and np.isnan(table[1, 0]) and table[0, 3] == pytest.approx(0.25)
    both = CurationRecords.concat([rec.select_videos(np.array([7])), rec.select_videos(np.array([5]))])
    assert sorted(both.video.tolist()) == [5, 5, 7] and both.searched_videos.tolist() == [7, 5]
    with pytest.raises(ValueError, match="out of range"):
        CurationRecords(layout, [1], [4], [[0.0, 0.0]], [1], [1])
    with pytest.raises(ValueError, match="quality"):
        labels_for(rec, STATS, 1.2, 0.8)  # stats for mse, records for ssim
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        CurationRecords.load(tmp_path / "nope.npz")


def test_router_shapes_choose_bias_and_roundtrip(tmp_path):
    layout = BlockLayout((2, 2, 2), (2, 4, 8))
    torch.manual_seed(0)
    r = Router.from_preset("debug", layout, image_size=16)
    torch.nn.init.normal_(r.head.weight, std=0.5)  # a non-trivial head so choices vary
    x = torch.rand(3, 3, 6, 16, 16) * 2 - 1
    logits = r(x)
    assert logits.shape == (3, 27)
    a = r.choose(x)
    assert a.shape == (3, 3) and torch.equal(layout.indices_to_assignments(logits.argmax(-1)), a)
    assert (r.choose(x, budget_bias=1e4) == 2).all()  # huge bias: the cheapest assignment
    assert (r.choose(x, budget_bias=-1e4) == 8).all()
    r.save_pretrained(tmp_path / "router")
    r2 = Router.from_pretrained(tmp_path / "router")
    assert torch.equal(r2(x), logits) and r2.fingerprint() == r.fingerprint()
    with pytest.raises(ValueError, match="expects video"):
        r(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="patch_size"):
        RouterConfig(frames_per_block=(3,), candidates=(1,), image_size=16, patch_size=(2, 4, 4), dim=8, heads=2)


def test_router_S_is_vit_small_size():
    r = Router.from_preset("S", BlockLayout(), image_size=128)
    n = sum(p.numel() for p in r.parameters())
    assert 19e6 < n < 24e6, n


def test_reward_percentile_by_hand():
    table = np.array([[0.0, 1.0, 4.0], [2.0, 2.0, 2.0], [-1.0, 3.0, 1.0]])
    p = reward_percentile(table, np.array([1, 0, 2]))
    np.testing.assert_allclose(p, [0.25, 1.0, 0.5])
    with pytest.raises(ValueError, match="complete"):
        reward_percentile(np.array([[0.0, np.nan]]), np.array([0]))


def test_complete_records_fills_beam_records_to_brute_force():
    layout = BlockLayout((2, 2, 2), (1, 4, 16))
    tok = FakeBlockCausalTokenizer(layout, 8)
    vids = _videos(3, layout, 8, seed=5)
    beam = beam_search(ProxyScorer(tok, Distortion("mse")), vids, STATS, 1.2, 0.8, beam_width=1)
    rec = beam.to_records(torch.tensor([4, 5, 6]), layout, "mse", "beam")
    assert len(rec) < 3 * 27
    full = complete_records(rec, ProxyScorer(tok, Distortion("mse")), lambda ids: vids[[i - 4 for i in ids]])
    brute = brute_force_search(ProxyScorer(tok, Distortion("mse")), vids).to_records(
        torch.tensor([4, 5, 6]), layout, "mse", "brute")
    np.testing.assert_allclose(full.distortion_table()[1], brute.distortion_table()[1], rtol=1e-6, atol=1e-9)


def test_threshold_baseline_picks_fewest_tokens_meeting_threshold():
    layout = BlockLayout((2, 2, 2), (1, 4, 16))
    tok = FakeBlockCausalTokenizer(layout, 8)
    vids = _videos(4, layout, 8, seed=2)
    scorer = ProxyScorer(tok, Distortion("mse"))
    mid = float(brute_force_search(ProxyScorer(tok, Distortion("mse")), vids).block_distortion.median())
    a = threshold_search(scorer, vids, [1e9, -1.0, mid])
    assert (a[0] == 1).all() and (a[1] == 16).all()
    for v in range(4):  # the rule, checked block by block with direct decodes
        prefix = []
        for t in range(3):
            ok = [c for c in (1, 4, 16)
                  if _direct_block_distortion(tok, vids[v], prefix + [c] + [1] * (2 - t))[t] <= mid]
            prefix.append(ok[0] if ok else 16)
        assert a[2, v].tolist() == prefix


def test_soft_targets_softmax_over_rewards():
    from arvid.stages.train_router import soft_targets

    table = np.array([[1.0, 2.0, np.nan], [0.0, 0.0, 3.0]])
    p = soft_targets(table, tau=0.5)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p[0, 2] == 0.0
    np.testing.assert_allclose(p[0, :2], np.exp([2.0, 4.0]) / np.exp([2.0, 4.0]).sum())
    assert soft_targets(table, tau=1e-3)[1].argmax() == 2 and soft_targets(table, tau=1e-3)[1, 2] > 0.999


def test_lpips_quality_term():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 2, 32, 32, generator=g) * 2 - 1
    small = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    big = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    d = Distortion("lpips")
    assert d.name == "lpips[alex]"
    assert d.per_frame(x, x).abs().max() < 1e-6
    assert (d.per_frame(x, small) < d.per_frame(x, big)).all()
    from arvid.eval.weights import WeightsError

    with pytest.raises(WeightsError, match="does not exist"):  # fails before any work, naming the file
        Distortion("lpips", lpips_weights="/nonexistent/lpips.safetensors").check()


def test_router_task_losses():
    from arvid.stages.train_router import RouterTask

    layout = BlockLayout((2, 2), (1, 4))
    torch.manual_seed(0)
    r = Router.from_preset("debug", layout, image_size=8)
    torch.nn.init.normal_(r.head.weight, std=0.5)
    x = torch.rand(3, 3, 4, 8, 8) * 2 - 1
    label = torch.tensor([0, 3, 1])
    target = torch.softmax(torch.randn(3, 4), -1)
    logits = r(x)
    hard = RouterTask(r).training_step({"video": x, "label": label}, 0, torch.Generator())
    assert torch.allclose(hard.losses["main"], F.cross_entropy(logits, label))
    assert hard.metrics["top1"] == pytest.approx((logits.argmax(-1) == label).float().mean().item())
    soft = RouterTask(r, soft=True).training_step({"video": x, "label": label, "target": target}, 0, torch.Generator())
    assert torch.allclose(soft.losses["main"], -(target * logits.log_softmax(-1)).sum(-1).mean())
    assert set(RouterTask(r).optimizer_groups()) == {"main"}
