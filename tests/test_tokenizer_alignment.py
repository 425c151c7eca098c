"""Representation alignment to a frozen video encoder: wiring, gradients, and the encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from arvid.tokenizer.base import build_tokenizer
from arvid.tokenizer.losses import LossConfig, RandomAssignments, TokenizerTask

LAYOUT = dict(frames_per_block=(4, 4, 4, 4), patch_time=4)


class _Encoder(nn.Module):
    """A tiny frozen 'video encoder': one strided conv, [B, 3, T, H, W] -> [B, 8, T/4, H/8, W/8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, (4, 8, 8), stride=(4, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.fixture()
def scripted(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "enc.pt"
    torch.jit.script(_Encoder()).save(str(path))
    return str(path)


def _task(scripted: str, weight: float = 0.7) -> TokenizerTask:
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", LAYOUT, preset="debug")
    return TokenizerTask(tok, LossConfig(align_weight=weight, align_encoder=scripted), RandomAssignments(tok.layout))


def test_alignment_term_trains_the_encoder_side_only(scripted):
    task = _task(scripted)
    video = torch.rand(2, 3, 16, 32, 32) * 2 - 1
    g = torch.Generator().manual_seed(0)
    out = task.training_step({"video": video}, 0, g)
    assert 0.0 < out.metrics["align"] <= 2.0
    # the projector trains with the tokenizer, in the main group
    main = task.optimizer_groups()["main"]
    assert all(any(p is q for q in main) for p in task.align.parameters())
    # the frozen encoder is neither trained nor checkpointed
    assert not any(k.startswith("_align_encoder") for k in task.state_dict())
    assert any(k.startswith("align.proj") for k in task.state_dict())
    # gradients of the alignment term alone: the patch layers and the projector, not the decoder
    task.zero_grad()
    task.tokenizer(video, task.tokenizer.layout.random_assignments(2, generator=g))
    task._align_loss(video).backward()
    tok = task.tokenizer
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.patch_layers.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tok.decoder_layers.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.align.parameters())


def test_alignment_loss_falls_when_trained(scripted):
    task = _task(scripted)
    video = torch.rand(2, 3, 16, 32, 32) * 2 - 1
    a = task.tokenizer.layout.random_assignments(2, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(list(task.tokenizer.patch_layers.parameters()) + list(task.align.parameters()), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        task.tokenizer(video, a)
        loss = task._align_loss(video)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_alignment_config_errors(scripted, tmp_path):
    with pytest.raises(ValueError, match="align_weight > 0 needs align_encoder"):
        LossConfig(align_weight=0.7)
    with pytest.raises(FileNotFoundError, match="neither 'i3d' nor an existing TorchScript file"):
        _task(str(tmp_path / "missing.pt"))
    grid = build_tokenizer("grid3d", preset="debug")
    with pytest.raises(ValueError, match="needs a tokenizer with patch layers"):
        TokenizerTask(grid, LossConfig(align_weight=0.7, align_encoder=scripted), RandomAssignments(grid.layout))
    off = _task(scripted, weight=0.0)
    assert off.align is None and "align" not in off.training_step(
        {"video": torch.zeros(1, 3, 16, 32, 32)}, 0, torch.Generator().manual_seed(0)).metrics


def test_i3d_feature_grid_is_mixed_4f():
    from arvid.eval.i3d import I3D
    from arvid.tokenizer.alignment import I3DFeatureGrid

    enc = I3DFeatureGrid(I3D.pretrained())
    with torch.no_grad():
        f = enc(torch.zeros(1, 3, 16, 32, 32))
    assert tuple(f.shape) == (1, 832, 4, 14, 14)
    with pytest.raises(ValueError, match="not one of"):
        I3DFeatureGrid(I3D(), layer="Mixed_9z")
