"""EMA: ema = decay * ema + (1 - decay) * param, float32 shadow, buffers copied, and in the Trainer."""

import pytest
import torch
from torch import nn

from arvid.training import EMA, StepOutput, Trainer, TrainerConfig


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    ema = EMA(m, 0.9)
    expected = {k: v.detach().clone() for k, v in m.named_parameters()}
    for _ in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update(m)
        for k, p in m.named_parameters():
            expected[k] = 0.9 * expected[k] + 0.1 * p.detach()
    for k, v in expected.items():
        torch.testing.assert_close(ema.shadow[k], v, rtol=0, atol=1e-6)
    # the shadow moved away from the weights: the test can tell EMA from a copy
    assert not torch.allclose(ema.shadow["weight"], m.weight)


def test_ema_shadow_is_float32_for_bf16_model_and_copies_buffers():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    ema = EMA(m, 0.999)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[1].running_mean.fill_(3.0)
    before = ema.shadow["0.weight"].clone()
    ema.update(m)
    # a 0.001 step survives in float32 (it would round away in bf16 near 1)
    torch.testing.assert_close(ema.shadow["0.weight"], 0.999 * before + 0.001, rtol=0, atol=1e-6)
    assert torch.equal(ema.copied["1.running_mean"], torch.full((4,), 3.0, dtype=torch.bfloat16))
    out = ema.averaged_model(m)
    assert not out.training and out[0].weight.dtype == torch.bfloat16
    assert torch.equal(out[0].weight, ema.shadow["0.weight"].to(torch.bfloat16))
    assert torch.equal(m[0].weight, torch.ones_like(m[0].weight))  # the original is untouched


def test_ema_state_roundtrip_and_mismatch():
    m = nn.Linear(3, 2)
    a, b = EMA(m, 0.5), EMA(nn.Linear(3, 2), 0.5)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.shadow[k], b.shadow[k]) for k in a.shadow)
    with pytest.raises(ValueError, match="missing"):
        EMA(nn.Linear(3, 3), 0.5).load_state_dict({"weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="decay"):
        EMA(m, 1.0)


class _Recorder(nn.Module):
    """Linear regression that records its weights at every step it trains on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)
        self.snapshots = []

    def training_step(self, batch, step, generator):
        self.snapshots.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        x, y = batch
        return StepOutput({"main": ((self.net(x) - y) ** 2).mean()})

    def ema_model(self):
        return self.net


def test_trainer_ema_follows_the_weights(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 2)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    task = _Recorder()
    cfg = TrainerConfig(max_steps=5, batch_size=4, lr=0.1, ema_decay=0.7, schedule="constant",
                        checkpoint_every=0, device="cpu", progress=False)
    trainer = Trainer(cfg, task, data, tmp_path)
    with pytest.raises(RuntimeError, match="fit"):
        trainer.final_model()
    trainer.fit()
    weights = task.snapshots + [{k: v.detach().clone() for k, v in task.net.state_dict().items()}]
    expected = dict(weights[0])
    for w in weights[1:]:
        expected = {k: 0.7 * expected[k] + 0.3 * w[k] for k in expected}
    final = trainer.final_model()
    assert final is not task.net
    for k, v in final.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)
    assert not torch.allclose(final.weight, task.net.weight)
    # without EMA, final_model() is task.ema_model() itself
    trainer2 = Trainer(TrainerConfig(max_steps=1, batch_size=4, device="cpu"), task, data, tmp_path / "b")
    assert trainer2.final_model() is task.net
