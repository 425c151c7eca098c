"""metrics.jsonl writing and truncation on resume, tracker forwarding, device/precision helpers."""

import json

import pytest
import torch

from arvid.training.device import accelerate_precision, check_precision, setup_backends
from arvid.training.logging import MetricsLogger, read_metrics


class _FakeAccelerator:
    def __init__(self):
        self.calls = []

    def log(self, values, step):
        self.calls.append((step, values))


def test_metrics_jsonl_append_truncate_and_trackers(tmp_path):
    acc = _FakeAccelerator()
    log = MetricsLogger(tmp_path / "metrics.jsonl", accelerator=acc)
    for step in (1, 2, 3, 4):
        log.log({"loss/main": step / 10, "note": "x", "bad": float("nan")}, step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss/ma')  # a line cut short by a kill -9
    assert log.truncate_after(2) == 3
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and recs[1]["loss/main"] == 0.2 and recs[0]["bad"] == "nan"
    # trackers get the numeric values only (not "step", not strings)
    step, values = acc.calls[0]
    assert step == 1 and set(values) == {"loss/main", "bad"} and values["loss/main"] == 0.1
    assert values["bad"] != values["bad"]  # NaN reaches TensorBoard as a float
    log.log({"loss/main": 0.5}, 3)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    off = MetricsLogger(tmp_path / "other.jsonl", enabled=False)
    off.log({"a": 1.0}, 1)
    assert not (tmp_path / "other.jsonl").exists()


def test_precision_names_and_cpu_backends():
    assert accelerate_precision("fp32") == "no" and accelerate_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        accelerate_precision("fp16")
    check_precision("bf16", torch.device("cpu"))  # bf16 autocast runs on any CPU
    before = torch.backends.cuda.matmul.allow_tf32
    setup_backends(torch.device("cpu"), tf32=not before)  # CPU: no global flag changes
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_trainer_writes_tensorboard_scalars_equal_to_metrics_jsonl(tmp_path):
    """A real run logs every numeric metric to TensorBoard event files, the same values as metrics.jsonl."""
    pytest.importorskip("tensorboard")
    from _training_toy import run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, max_steps=6, checkpoint_every=0)
    events = sorted((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {tmp_path / 'tensorboard'}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("loss/main")}
    jl = {r["step"]: r["loss/main"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(tb) == sorted(jl) == [1, 2, 3, 4, 5, 6]
    for step, value in jl.items():
        assert tb[step] == pytest.approx(value, rel=1e-6)
    assert "lr/main" in acc.Tags()["scalars"]
