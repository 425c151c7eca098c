"""Token-budget control: the calibrated length bias meets the asked mean; the exact mode caps each video."""

from __future__ import annotations

import pytest
import torch
from test_sampling_fake_model import FakeGPT, make_cond

from arvid.data.types import BlockLayout
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.budget import bisect_bias, calibrate_budget_bias
from arvid.sampling.sampler import Sampler, SamplerConfig, mean_tokens

FMT = SequenceFormat(16, BlockLayout((1, 1, 1, 1), (2, 4, 8, 16)))


def model(len_offset: float = 1.0) -> FakeGPT:
    # Random logits, with a preference between length tokens that the bias must overcome.
    return FakeGPT(FMT.vocab_size, num_classes=4, seed=3, scale=0.5, len_offset=len_offset,
                   codebook_size=FMT.codebook_size)


@pytest.mark.parametrize("target,cfg", [(14.0, SamplerConfig()), (40.0, SamplerConfig(cfg_scale=2.0, budget_fn="linear"))])
def test_calibrated_bias_meets_the_mean_within_5_percent(target, cfg):
    s = Sampler(model(), FMT, cfg)
    calib = make_cond(torch.arange(4).repeat(32))  # 128 videos
    free = mean_tokens(s.generate(calib, generator=torch.Generator().manual_seed(0)))
    assert abs(free - target) / target > 0.15  # the unbiased sampler is far from the target
    res = calibrate_budget_bias(s, target, calib, seed=0)
    assert res.relative_error <= 0.05, res
    # The calibration set itself, re-sampled with the found beta and the calibration seed:
    again = s.generate(calib, generator=torch.Generator().manual_seed(0), budget_bias=res.beta)
    assert abs(mean_tokens(again) - target) / target <= 0.05
    # A held-out batch (other seed, more videos) lands close too.
    held = s.generate(make_cond(torch.arange(4).repeat(64)), generator=torch.Generator().manual_seed(99),
                      budget_bias=res.beta)
    assert abs(mean_tokens(held) - target) / target <= 0.10
    # Sign: fewer tokens asked than the free mean -> negative beta, and vice versa.
    assert (res.beta < 0) == (target < free)


def test_bisection_on_a_known_monotone_function():
    res = bisect_bias(lambda b: 100.0 + 10.0 * b, 137.0, lo=-1, hi=1, rel_tol=1e-4)
    assert abs(res.beta - 3.7) < 0.01 and res.relative_error <= 1e-4
    with pytest.raises(ValueError, match="out of reach"):
        bisect_bias(lambda b: min(max(b, 0.0), 1.0) + 8.0, 50.0)  # saturates below the target


def test_unreachable_target_is_refused():
    s = Sampler(model(), FMT, SamplerConfig())
    with pytest.raises(ValueError, match="out of reach"):
        calibrate_budget_bias(s, 4.0, make_cond(torch.arange(4)), seed=0, iters=2)  # minimum is 8


def test_exact_budget_caps_every_video():
    s = Sampler(model(len_offset=3.0), FMT, SamplerConfig(budget_bias=2.0))
    cond = make_cond(torch.arange(4).repeat(16))
    free = s.generate(cond, generator=torch.Generator().manual_seed(1))
    cap = 20
    capped = s.generate(cond, generator=torch.Generator().manual_seed(1), budget=cap)
    assert int(free.tokens.lengths.max()) > cap
    assert int(capped.tokens.lengths.max()) <= cap
    assert float(capped.tokens.lengths.float().mean()) > 0.5 * cap  # it uses the room it has


def _calibration_worker(rank: int, init: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    # a short timeout: without the shared failure, process 1 would wait in the broadcast
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        s = Sampler(model(), FMT, SamplerConfig())
        try:
            calibrate_budget_bias(s, 4.0, make_cond(torch.arange(4)), seed=0, iters=2)  # out of reach
            msg = "no error"
        except (ValueError, RuntimeError) as e:
            msg = f"{type(e).__name__}: {e}"
        with open(f"{out}.{rank}", "w") as f:
            f.write(msg)
    finally:
        dist.destroy_process_group()


def test_a_failed_calibration_on_process_0_reaches_every_process(tmp_path):
    """Rank 0 calibrates for all; when it fails (a target out of reach) the others get the failure
    instead of waiting forever for its result."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "msg")
    mp.start_processes(_calibration_worker, args=(f"tcp://127.0.0.1:{port}", out), nprocs=2, join=True,
                       start_method="spawn")
    zero, one = (open(f"{out}.{r}").read() for r in (0, 1))
    assert zero.startswith("ValueError") and "out of reach" in zero
    assert one.startswith("RuntimeError: budget calibration failed on process 0") and "out of reach" in one


def test_calibration_rows_spread_over_the_run():
    from arvid.sampling.budget import calibration_rows

    assert calibration_rows(10, 10).tolist() == list(range(10))
    assert calibration_rows(64, 4).tolist() == [0, 21, 42, 63]
    assert calibration_rows(7, 1).tolist() == [0]
    rows = calibration_rows(1000, 333)
    assert rows.unique().numel() == 333 and rows[0] == 0 and rows[-1] == 999
    with pytest.raises(ValueError, match="n=5, total=4"):
        calibration_rows(4, 5)
