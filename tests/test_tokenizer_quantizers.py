"""Quantizers: straight-through gradients, dead-code restart, EMA updates, entropy loss, FSQ."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arvid.config import ConfigError, from_dict
from arvid.tokenizer.quantizers import (
    FSQ,
    QuantizerConfig,
    VectorQuantizer,
    build_quantizer,
    code_statistics,
    entropy_loss,
)


def test_vq_picks_nearest_by_cosine_and_straight_through():
    vq = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=4, restart_dead=False))
    codes = vq.normalized_codebook().detach()
    # a vector near code 5 (scaled: the lookup is by cosine, not by l2 distance of raw vectors)
    z = (codes[5] * 3.0 + 0.01 * torch.randn(4, generator=torch.Generator().manual_seed(0)))[None]
    z.requires_grad_(True)
    out = vq(z)
    assert out.indices.tolist() == [5]
    torch.testing.assert_close(out.z_q.detach(), codes[5:6])
    # straight-through: d(sum z_q * w)/dz is the gradient through l2-normalisation of z, nonzero
    w = torch.randn(1, 4, generator=torch.Generator().manual_seed(1))
    (out.z_q * w).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    expected = torch.autograd.grad((F.normalize(z, dim=-1) * w).sum(), z)[0]
    torch.testing.assert_close(z.grad, expected)


def test_vq_losses_and_codebook_gradient():
    vq = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=4, restart_dead=False))
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    out = vq(z)
    e = vq.normalized_codebook()[out.indices]
    zn = F.normalize(z, dim=-1)
    torch.testing.assert_close(out.losses["commit"], F.mse_loss(zn, e.detach()))
    out.losses["codebook"].backward()
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    # the codebook loss pulls each chosen code (l2-normalised) towards its (fixed) input: its value
    # and its gradient on the raw codebook, from a fresh leaf
    raw = vq.codebook.detach().clone().requires_grad_(True)
    ref = F.mse_loss(F.normalize(raw, dim=-1)[out.indices], zn)
    torch.testing.assert_close(out.losses["codebook"], ref)
    torch.testing.assert_close(vq.codebook.grad, torch.autograd.grad(ref, raw)[0])
    assert torch.equal(vq.lookup(out.indices), e.detach())


def test_usage_and_perplexity_values():
    stats = code_statistics(torch.tensor([0, 1, 2, 3]), 8)
    assert stats["usage"] == pytest.approx(0.5)
    assert stats["perplexity"] == pytest.approx(4.0, rel=1e-5)
    stats = code_statistics(torch.tensor([2, 2, 2]), 8)
    assert stats["usage"] == pytest.approx(1 / 8)
    assert stats["perplexity"] == pytest.approx(1.0)


def test_dead_code_restart_revives_unused_codes():
    cfg = QuantizerConfig(codebook_size=32, code_dim=4, restart_every=5, usage_decay=0.5, dead_threshold=0.05)
    vq = VectorQuantizer(cfg).train()
    # all inputs cluster around one direction: most codes are never chosen
    g = torch.Generator().manual_seed(0)
    center = F.normalize(torch.tensor([1.0, 0.5, -0.3, 0.2]), dim=0)
    before_used = set()
    for _ in range(4):
        z = center + 0.3 * torch.randn(64, 4, generator=g)
        before_used |= set(vq(z, generator=g).indices.tolist())
    assert len(before_used) < 16
    old = vq.codebook.detach().clone()
    z = center + 0.3 * torch.randn(64, 4, generator=g)
    vq(z, generator=g)  # 5th call: the restart check runs
    moved = (vq.codebook.detach() - old).abs().sum(1) > 1e-6
    dead = [i for i in range(32) if i not in before_used]
    assert moved[dead].float().mean() > 0.5, "unused codes must be replaced"
    # the revived codes now sit near the data: many more codes get used
    with torch.no_grad():
        vq.eval()
        after = set(vq(center + 0.3 * torch.randn(512, 4, generator=g)).indices.tolist())
    assert len(after) > len(before_used) + 5


def test_restart_is_deterministic_per_generator():
    def run(seed):
        vq = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=4, restart_every=1, usage_decay=0.0)).train()
        z = torch.ones(8, 4) + 0.1 * torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
        vq(z, generator=torch.Generator().manual_seed(seed))
        return vq.codebook.detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_ema_codebook_moves_towards_assigned_vectors():
    cfg = QuantizerConfig(codebook_size=4, code_dim=3, use_ema=True, ema_decay=0.5, restart_dead=False)
    vq = VectorQuantizer(cfg).train()
    assert not vq.codebook.requires_grad
    target = F.normalize(torch.tensor([0.2, 1.0, 0.1]), dim=0)
    idx = int(vq(target[None]).indices[0])
    before = float(vq.normalized_codebook()[idx] @ target)
    for _ in range(5):
        vq(target[None].repeat(8, 1))
    after = float(vq.normalized_codebook()[idx] @ target)
    assert after > before and after > 0.99
    assert vq(target[None]).losses["codebook"].item() == 0.0


def test_entropy_loss_prefers_confident_and_diverse():
    n, v = 64, 16
    confident_diverse = torch.full((n, v), -20.0)
    confident_diverse[torch.arange(n), torch.arange(n) % v] = 20.0
    collapsed = torch.full((n, v), -20.0)
    collapsed[:, 0] = 20.0
    uncertain = torch.zeros(n, v)
    l_good, l_collapsed, l_uncertain = (entropy_loss(x) for x in (confident_diverse, collapsed, uncertain))
    assert l_good == pytest.approx(-math.log(v), abs=1e-3)
    assert l_collapsed == pytest.approx(0.0, abs=1e-3)
    assert l_uncertain == pytest.approx(0.0, abs=1e-3)
    assert l_good < l_collapsed


@pytest.mark.parametrize("levels", [(8, 5, 4), (2, 3), (2, 2, 2)])  # a level of 2 gave NaN before 2026-12-07
def test_fsq_round_trip_and_grid(levels):
    fsq = FSQ(QuantizerConfig(kind="fsq", levels=levels))
    n, d = math.prod(levels), len(levels)
    assert fsq.codebook_size == n and fsq.code_dim == d
    idx = torch.arange(n)
    vecs = fsq.lookup(idx)
    assert vecs.abs().max() <= 1.0
    assert len({tuple(v) for v in vecs.tolist()}) == n  # a bijection
    out = fsq(torch.randn(160, d, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(out.z_q).all() and torch.equal(fsq.lookup(out.indices), out.z_q.detach())
    # quantizing a code's own value (pre-bound) gives back its index: invert the bound
    z = torch.randn(500, d, generator=torch.Generator().manual_seed(1)) * 2
    q = fsq(z)
    assert torch.equal(fsq(fsq_inverse(fsq, q.z_q.detach())).indices, q.indices)
    # every level value is reachable
    per_channel = [set(fsq.lookup(q.indices)[:, c].tolist()) for c in range(d)]
    assert [len(s) for s in per_channel] == list(levels)


def fsq_inverse(fsq: FSQ, unit: torch.Tensor) -> torch.Tensor:
    """Pre-image of grid values under FSQ's bound (for the round-trip test)."""
    half_l = fsq.levels.float() // 2
    q = unit * half_l
    half = (fsq.levels.float() - 1) * (1 + 1e-3) / 2
    offset = torch.where(fsq.levels % 2 == 0, 0.5, 0.0)
    shift = torch.atanh(offset / half)
    return torch.atanh(((q + offset) / half).clamp(-0.999999, 0.999999)) - shift


def test_fsq_straight_through_gradient():
    fsq = FSQ(QuantizerConfig(kind="fsq", levels=(5, 4)))
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    fsq(z).z_q.sum().backward()
    assert z.grad is not None and (z.grad > 0).all()
    # straight through the rounding: the derivative of the bound, tanh(z + shift) * half, over the
    # unit scale L // 2, by hand per level: L = 5: half 2 * 1.001, no shift; L = 4: half 1.5 * 1.001,
    # shift atanh(0.5 / half) (the half-step offset)
    half = torch.tensor([2 * 1.001, 1.5 * 1.001], dtype=torch.float64)
    shift = torch.tensor([0.0, math.atanh(0.5 / (1.5 * 1.001))], dtype=torch.float64)
    want = (1 - torch.tanh(z.detach().double() + shift) ** 2) * half / torch.tensor([2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(z.grad.double(), want, atol=1e-6, rtol=1e-5)


def test_config_validation_and_build():
    assert isinstance(build_quantizer(QuantizerConfig(kind="fsq")), FSQ)
    assert QuantizerConfig(kind="fsq", levels=(8, 8, 8, 5, 5, 5)).num_codes == 64000
    with pytest.raises(ConfigError, match="codebook_size"):
        from_dict(QuantizerConfig, {"codebook_size": 1})
    with pytest.raises(ConfigError, match="kind"):
        from_dict(QuantizerConfig, {"kind": "rvq"})
    with pytest.raises(ValueError, match="indices"):
        VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=2)).lookup(torch.tensor([8]))


def test_restart_interval_counts_from_the_loaded_steps(monkeypatch):
    """The restart interval is counted on the host (reading the step buffer every call would sync
    with the GPU); a loaded state replaces the count, also in a quantizer that had already run."""
    cfg = QuantizerConfig(codebook_size=16, code_dim=4, restart_every=5)
    calls = []
    monkeypatch.setattr(VectorQuantizer, "restart_dead_codes", lambda self, z, g=None: calls.append(int(self.steps)))
    z = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    src = VectorQuantizer(cfg).train()
    for _ in range(3):
        src(z)
    vq = VectorQuantizer(cfg).train()
    vq(z)  # its own count is 1
    vq.load_state_dict(src.state_dict())  # ... and now 3
    for _ in range(8):
        vq(z)
    assert calls == [5, 10] and int(vq.steps) == 11


def test_ema_codebook_update_touches_only_used_codes():
    cfg = QuantizerConfig(codebook_size=8, code_dim=4, use_ema=True, restart_dead=False)
    vq = VectorQuantizer(cfg).train()
    with torch.no_grad():
        vq.ema_count.zero_()
        vq.ema_count[2] = 5.0
        vq.ema_sum[2] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    old = vq.codebook.detach().clone()
    vq._update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None)  # no new vectors: decay only
    new = vq.codebook.detach()
    assert torch.allclose(new[2], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # normalised EMA sum
    assert torch.equal(torch.cat([new[:2], new[3:]]), torch.cat([old[:2], old[3:]]))  # unused rows untouched


@pytest.mark.parametrize("levels", [(1001,), (1002, 3), (2000,)])
def test_fsq_many_levels_stay_on_the_grid(levels):
    """Found in a correctness review: _bound widens the range by 1e-3 of (L-1)/2, so for L > 1000 a
    saturated channel rounded one value past either end: indices outside [0, codebook_size) (an
    IndexError in the usage statistics, a device assert on CUDA)."""
    q = FSQ(QuantizerConfig(kind="fsq", levels=levels))
    z = torch.tensor([[-50.0] * len(levels), [50.0] * len(levels), [0.0] * len(levels)])
    out = q(z)
    L = levels[0]
    assert out.indices[0].item() == 0 and out.indices[1].item() == q.codebook_size - 1
    assert out.z_q[0, 0].item() == -1.0 and out.z_q[1, 0].item() == pytest.approx((L - 1 - L // 2) / (L // 2))
    torch.testing.assert_close(q.lookup(out.indices), out.z_q)
