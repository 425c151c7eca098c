"""LR schedules: warmup, cosine, WSD and constant values against their formulas."""

import math

import pytest

from arvid.config import ConfigError, from_dict
from arvid.training import TrainerConfig, constant_schedule, cosine_schedule, make_schedule, wsd_schedule
from arvid.training.schedules import wsd_decay_steps


def test_warmup_is_linear_from_one_over_w_to_one():
    for sched in (make_schedule("cosine", 110, 10, min_lr_ratio=0.1), make_schedule("wsd", 110, 10),
                  make_schedule("constant", 110, 10)):
        assert [sched(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_values():
    w, t, m = 10, 110, 0.1
    assert cosine_schedule(10, t, w, m) == pytest.approx(1.0)  # p = 0
    assert cosine_schedule(60, t, w, m) == pytest.approx(m + (1 - m) * 0.5)  # p = 1/2
    p = (85 - w) / (t - w)
    assert cosine_schedule(85, t, w, m) == pytest.approx(m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p)))
    assert cosine_schedule(t, t, w, m) == pytest.approx(m)  # p clamped at 1
    assert cosine_schedule(10 * t, t, w, m) == pytest.approx(m)
    # monotone non-increasing after warmup
    vals = [cosine_schedule(s, t, w, m) for s in range(w, t)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_wsd_values():
    t, w, frac, m = 100, 5, 0.2, 0.1
    assert wsd_decay_steps(t, frac) == 20
    assert wsd_schedule(5, t, w, frac, m) == 1.0
    assert wsd_schedule(79, t, w, frac, m) == 1.0  # last stable step
    assert wsd_schedule(80, t, w, frac, m) == pytest.approx(1 - (1 - m) * 1 / 20)
    assert wsd_schedule(89, t, w, frac, m) == pytest.approx(1 - (1 - m) * 10 / 20)
    assert wsd_schedule(99, t, w, frac, m) == pytest.approx(m)  # the last step trains at min lr
    assert wsd_schedule(0, t, w, frac, m) == pytest.approx(1 / 5)


def test_constant_values():
    assert constant_schedule(0, 100, 4) == 0.25
    assert constant_schedule(3, 100, 4) == 1.0
    assert constant_schedule(50, 100, 0) == 1.0


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        make_schedule("linear", 10)
    with pytest.raises(ConfigError, match="schedule.*did you mean 'cosine'"):
        from_dict(TrainerConfig, {"schedule": "cosin"})


def test_trainer_applies_schedule_and_lr_scale(tmp_path):
    from _training_toy import ToyGANTask, toy_data

    from arvid.training import Trainer

    cfg = TrainerConfig(max_steps=10, batch_size=8, lr=0.01, schedule="wsd", warmup_steps=2,
                        decay_fraction=0.3, min_lr_ratio=0.2, log_every=1, checkpoint_every=0,
                        device="cpu", progress=False)
    result = Trainer(cfg, ToyGANTask(), toy_data(32), tmp_path).fit()
    lrs = [r["lr/main"] for r in result.history]
    expected = [0.01 * wsd_schedule(s, 10, 2, 0.3, 0.2) for s in range(10)]
    assert lrs == pytest.approx(expected)
    assert [r["lr/critic"] for r in result.history] == pytest.approx([0.5 * e for e in expected])
    assert expected[-1] == pytest.approx(0.01 * 0.2)


def test_a_wsd_warmup_into_the_decay_is_refused():
    """W = 9 of T = 10 with a 2-step decay gave factors ... 0.889 1.0 0.1: the decay cut short."""
    from arvid.config import ConfigError

    with pytest.raises(ConfigError, match=r"warmup_steps must be <= 8 under schedule wsd .* got 9"):
        TrainerConfig(max_steps=10, warmup_steps=9, schedule="wsd", decay_fraction=0.2)
    assert TrainerConfig(max_steps=10, warmup_steps=8, schedule="wsd", decay_fraction=0.2).warmup_steps == 8
    assert TrainerConfig(max_steps=10, warmup_steps=9, schedule="cosine").warmup_steps == 9
