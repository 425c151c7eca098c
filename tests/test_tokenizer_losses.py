"""Tokenizer losses: GAN terms, adaptive weight, the Trainer task's groups and gradients, samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arvid.data.types import BlockLayout
from arvid.tokenizer import build_tokenizer
from arvid.tokenizer.losses import (
    FixedAssignment,
    LossConfig,
    PatchDiscriminator,
    PrecomputedAssignments,
    RandomAssignments,
    RouterAssignments,
    TokenizerTask,
    adaptive_gan_weight,
    disc_loss,
    generator_loss,
    psnr,
)


def _batch(b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.rand(b, 3, 8, 32, 32, generator=g) * 2 - 1, "index": torch.arange(b), "label": torch.zeros(b)}


def test_gan_losses_values():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.0])
    # hinge: relu(1 - real) + relu(1 + fake) = mean(0, 0.5) + mean(0, 1) = 0.25 + 0.5
    assert disc_loss(real, fake, "hinge").item() == pytest.approx(0.75)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    sp = torch.nn.functional.softplus
    assert disc_loss(real, fake, "non_saturating").item() == pytest.approx(
        (sp(-real).mean() + sp(fake).mean()).item())
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(sp(-fake).mean().item())


def test_psnr_values():
    x = torch.zeros(2, 3, 2, 4, 4)
    y = x.clone()
    y[1] += 0.2  # mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    p = psnr(y, x)
    assert p[1].item() == pytest.approx(20.0, abs=1e-4)
    assert p[0].item() > 90


def test_adaptive_weight_is_grad_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (w * torch.tensor([3.0, 4.0])).sum()  # grad (3, 4), norm 5
    gan = (w * torch.tensor([0.0, 0.5])).sum()  # grad (0, 0.5), norm 0.5
    assert adaptive_gan_weight(rec, gan, w).item() == pytest.approx(5 / (0.5 + 1e-4), rel=1e-5)
    assert adaptive_gan_weight(rec, gan, w, max_weight=2.0).item() == pytest.approx(2.0)


@pytest.mark.parametrize("kind,patches", [("2d", 8 * 6 * 6), ("3d", 2 * 6 * 6)])
def test_discriminator_shapes(kind, patches):
    # by hand, 32 x 32 pixels: stride-2 k4 p1 convs 32 -> 16 -> 8, then k4 s1 p1 convs 8 -> 7 -> 6;
    # 2d: each of the 8 frames on its own; 3d: time (k3 p1) 8 -> 4 -> 2 (stride 2 twice), then 2 -> 2
    torch.manual_seed(0)
    d = PatchDiscriminator(3, 8, 2, kind)
    video = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    out = d(video)
    assert out.shape == (2, patches)
    # one row per video, from that video alone (GroupNorm, not BatchNorm: no mixing in a batch)
    torch.testing.assert_close(d(video[1:]), out[1:], atol=1e-5, rtol=1e-5)
    other = video.clone()
    other[0, :, 3] = 0.0  # change frame 3 of video 0
    changed = (d(other) - out).abs() > 1e-6
    assert not changed[1].any() and changed[0].any()
    if kind == "2d":  # frame t's logits are columns [36 t, 36 t + 36) of its video's row
        assert changed[0, 3 * 36:4 * 36].all() and not changed[0, :3 * 36].any() and not changed[0, 4 * 36:].any()


def test_task_groups_and_disjoint_gradients():
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug")
    cfg = LossConfig(gan_weight=0.5, gan_start=0, disc_channels=8, disc_layers=2, entropy_weight=0.02)
    task = TokenizerTask(tok, cfg, RandomAssignments(tok.layout))
    groups = task.optimizer_groups()
    assert set(groups) == {"main", "disc"}
    main_ids = {id(p) for p in groups["main"]}
    disc_ids = {id(p) for p in groups["disc"]["params"]}
    assert not main_ids & disc_ids and len(disc_ids) == len(list(task.discriminator.parameters()))
    out = task.training_step(_batch(), step=0, generator=torch.Generator().manual_seed(0))
    assert list(out.losses) == ["main", "disc"]
    for k in ("psnr", "usage", "perplexity", "gan_g", "gan_d", "gan_adaptive_w", "entropy_loss", "tokens"):
        assert k in out.metrics, k
    assert out.metrics["gan_adaptive_w"] > 0
    # the generator's loss reaches only the tokenizer; the discriminator's only the discriminator
    main_grads = torch.autograd.grad(out.losses["main"], list(task.discriminator.parameters()) + groups["main"],
                                     retain_graph=True, allow_unused=True)
    n_disc = len(disc_ids)
    assert all(g is None or g.abs().sum() == 0 for g in main_grads[:n_disc])
    assert sum(float(g.abs().sum()) for g in main_grads[n_disc:] if g is not None) > 0
    disc_grads = torch.autograd.grad(out.losses["disc"], groups["main"] + groups["disc"]["params"], allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in disc_grads[:len(groups["main"])])
    assert sum(float(g.abs().sum()) for g in disc_grads[len(groups["main"]):] if g is not None) > 0


def test_task_before_gan_start_and_without_gan():
    torch.manual_seed(0)
    tok = build_tokenizer("grid3d", preset="debug")
    layout = tok.layout
    task = TokenizerTask(tok, LossConfig(gan_weight=0.1, gan_start=100, disc_layers=2, disc_channels=8),
                         FixedAssignment(layout, layout.uniform(64)))
    out = task.training_step(_batch(), step=0, generator=torch.Generator().manual_seed(0))
    assert out.losses["disc"].item() == 0.0 and out.losses["disc"].requires_grad
    assert "gan_g" not in out.metrics
    plain = TokenizerTask(tok, LossConfig(gan_weight=0.0), FixedAssignment(layout, layout.uniform(64)))
    assert set(plain.optimizer_groups()) == {"main"} and plain.discriminator is None
    out = plain.training_step(_batch(), step=0, generator=torch.Generator().manual_seed(0))
    assert set(out.losses) == {"main"}
    assert out.metrics["tokens"] == 2 * 4 * 64
    # the main loss is exactly L1 + weighted VQ terms (no GAN, no LPIPS, no L2 by default)
    m = out.metrics
    expect = float(m["l1"] + 0.25 * m["commit"] + 1.0 * m["codebook"] + 0.02 * m["entropy_loss"])
    assert out.losses["main"].item() == pytest.approx(expect, rel=1e-5)


def test_samplers():
    layout = BlockLayout((2, 2), (4, 8, 16))
    batch = {"video": torch.zeros(5, 3, 4, 8, 8), "index": torch.tensor([0, 3, 1, 2, 3])}
    r = RandomAssignments(layout)
    a1 = r(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a1, r(batch, torch.Generator().manual_seed(1)))
    assert a1.shape == (5, 2) and set(a1.flatten().tolist()) <= {4, 8, 16}
    probs = torch.zeros(9)
    probs[5] = 1.0  # index 5 = (8, 16)
    assert RandomAssignments(layout, probs)(batch, torch.Generator()).tolist() == [[8, 16]] * 5
    with pytest.raises(ValueError, match="9 non-negative"):
        RandomAssignments(layout, torch.ones(4))
    assert FixedAssignment(layout, [16, 4])(batch, torch.Generator()).tolist() == [[16, 4]] * 5
    pre = PrecomputedAssignments(layout, np.array([0, 8, -1, 4]))
    out = pre(batch, torch.Generator().manual_seed(0))
    assert out[0].tolist() == [4, 4] and out[1].tolist() == [8, 8] and out[2].tolist() == [16, 16]
    assert out[4].tolist() == [8, 8] and set(out[3].tolist()) <= {4, 8, 16}  # -1: random
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        PrecomputedAssignments(layout, np.array([9]))
    with pytest.raises(ValueError, match="holds 2 assignments"):
        PrecomputedAssignments(layout, np.array([0, 1]))(batch, torch.Generator())

    class Router:
        def choose(self, video):
            return torch.tensor([[16, 8]]).expand(video.shape[0], -1)

    assert RouterAssignments(layout, Router())(batch, torch.Generator()).tolist() == [[16, 8]] * 5


def test_lpips_term_when_weights_are_installed():
    from arvid.eval import weights as W

    # only missing weights are a skip (LPIPS's constructor reads no file: probing it with a bare
    # `except Exception` could only turn a broken constructor into a skip)
    try:
        W.require(W.LPIPS_ALEX)
    except W.WeightsError as e:  # the weights package is not installed here
        pytest.skip(f"LPIPS weights unavailable: {e}")
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug")
    task = TokenizerTask(tok, LossConfig(lpips_weight=1.0, lpips_frames=2), RandomAssignments(tok.layout))
    out = task.training_step(_batch(), step=0, generator=torch.Generator().manual_seed(0))
    assert out.metrics["lpips"] > 0
    assert "_lpips" not in dict(task.named_modules()) and not any("lpips" in k for k in task.state_dict())
    out.losses["main"].backward()
    assert tok.head.weight.grad.abs().sum() > 0


def test_the_discriminator_takes_no_optimizer_step_before_gan_start(tmp_path):
    """Its zero loss gave zero gradients, yet AdamW decayed its weights and counted its steps, so it
    reached gan_start shrunk with Adam's bias correction spent (before 2026-12-07)."""
    from arvid.training import Trainer, TrainerConfig

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            b = _batch(1, seed=i)
            return {"video": b["video"][0], "index": i, "label": 0}

    torch.manual_seed(0)
    tok = build_tokenizer("grid3d", preset="debug")
    task = TokenizerTask(tok, LossConfig(gan_weight=0.1, gan_start=2, disc_layers=2, disc_channels=8),
                         FixedAssignment(tok.layout, tok.layout.uniform(64)))
    before = {k: v.clone() for k, v in task.discriminator.state_dict().items()}
    cfg = dict(batch_size=2, lr=1e-3, weight_decay=0.1, checkpoint_every=0, device="cpu", progress=False)
    trainer = Trainer(TrainerConfig(max_steps=2, **cfg), task, Clips(), tmp_path / "run")
    trainer.fit()
    after = task.discriminator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # steps 0 and 1: untouched
    assert not trainer.optimizers["disc"].state  # no Adam state, no step count
    Trainer(TrainerConfig(max_steps=3, **cfg), task, Clips(), tmp_path / "run2").fit()
    assert any(not torch.equal(before[k], task.discriminator.state_dict()[k]) for k in before)  # step 2 trains it


def test_bad_sampler_inputs_are_refused_when_made():
    """Found in a correctness review: a [N, K] array of token counts given as the final stage's
    assignments file was flattened into 2N assignment indices (and a float array truncated), both
    silently; NaN / inf assignment_probs or loss weights failed (or trained on NaN) only later,
    in torch.multinomial or the NaN-loss check, without naming the field."""
    layout = BlockLayout((2, 2), (4, 8, 16))
    batch = {"video": torch.zeros(2, 3, 4, 8, 8), "index": torch.tensor([0, 1])}
    counts = np.array([[4, 8], [8, 4]])  # token counts, not indices (each < 9: they passed the range check)
    with pytest.raises(ValueError, match=r"labels\.npy: expected a 1-D integer array .* shape \(2, 2\)"):
        PrecomputedAssignments(layout, counts, source="labels.npy")
    with pytest.raises(ValueError, match="dtype float64"):
        PrecomputedAssignments(layout, np.array([3.7, 1.2]), source="labels.npy")
    # the good input still maps index -> assignment: 5 = (8, 16), 0 = (4, 4)
    assert PrecomputedAssignments(layout, np.array([5, 0]))(batch, torch.Generator()).tolist() == [[8, 16], [4, 4]]
    for bad in (float("nan"), float("inf")):
        probs = torch.ones(9)
        probs[2] = bad
        with pytest.raises(ValueError, match="assignment_probs must be 9 non-negative finite"):
            RandomAssignments(layout, probs)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="l1_weight must be a finite number >= 0"):
            LossConfig(l1_weight=bad)
    assert LossConfig(l1_weight=0.0, gan_weight=0.1).gan_weight == 0.1
