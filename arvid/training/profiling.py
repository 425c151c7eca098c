"""Profile a few optimizer steps of a training run with ``torch.profiler`` (``trainer.profile_start``).

Where a step's time goes is the first question when a run is slow: waiting for data, the host
launching kernels (the device idles), or the kernels themselves. The profiler records steps
``profile_start .. profile_start + profile_steps - 1`` (0-based optimizer steps) and writes to the
run's directory:

- ``profile.txt``: wall time per step, the device's busy time (sum of kernel times, CUDA only) as
  a fraction of it (kernels on several streams may overlap: then the sum can pass 100%), and the
  top operators by device time and by host (CPU) time;
- ``profile_trace.json``: the whole timeline, for ``chrome://tracing`` or Perfetto.

The data loader's wait is outside the profiler's reach (worker processes); the Trainer logs it
every ``log_every`` steps as ``data_wait_fraction``.

:func:`measure_matmul_peak` times a large matmul: the measured ceiling MFU can be taken against
(``train-generator``'s ``peak_tflops: 0``, ``bench_generator.py --measure-peak``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from arvid.io import write_text


def measure_matmul_peak(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                        reps: int | None = None) -> float:
    """TFLOP/s of a square ``n x n`` matmul in ``dtype`` on ``device``: the best of three timed runs
    of ``reps`` products after a warm-up. Defaults: ``n`` 8192 and 20 products on CUDA (~1-2 s on an
    H100, 790-803 TFLOP/s there in bf16), 1024 and 3 on other devices."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    reps = reps or (20 if cuda else 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * n**3 / best / 1e12


def _device_key(avgs: Any) -> str:
    """The attribute holding self device time (``self_cuda_time_total`` before torch 2.4)."""
    first = next(iter(avgs), None)
    return "self_device_time_total" if first is None or hasattr(first, "self_device_time_total") else \
        "self_cuda_time_total"


def device_busy_seconds(avgs: Any) -> float:
    """Kernel time in a profile: the self device time of the device's own events (kernels, copies),
    as torch's table totals it; CPU operators also carry their kernels' time and are skipped so that
    nothing counts twice."""
    from torch.autograd import DeviceType

    key = _device_key(avgs)
    total = 0.0
    for e in avgs:
        if getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            total += float(getattr(e, key, 0.0))
    return total / 1e6


class StepProfiler:
    """Starts ``torch.profiler`` before step ``start`` and writes its report after ``start + steps - 1``.

    Args:
        out_dir: where ``profile.txt`` and ``profile_trace.json`` go.
        start: the first profiled optimizer step (0-based; ``0`` profiles from the first step).
        steps: how many steps to record.
        enabled: False on every process but the main one (and when profiling is off).
        device: the training device (CUDA adds device activity and a sync at the window's ends).
    """

    def __init__(self, out_dir: str | Path, start: int, steps: int, enabled: bool, device: torch.device) -> None:
        self.out_dir = Path(out_dir)
        self.start, self.steps = int(start), int(steps)
        self.enabled = bool(enabled) and self.steps > 0
        self.cuda = torch.device(device).type == "cuda"
        self._prof = None
        self._t0 = 0.0
        self.written: Path | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def before_step(self, step: int) -> None:
        """Call before optimizer step ``step`` (0-based) runs."""
        if not self.enabled or step != self.start or self._prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._sync()
        self._prof = profile(activities=acts)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> Path | None:
        """Call after optimizer step ``step`` (0-based) finished; writes the report after the last one."""
        if self._prof is None or step != self.start + self.steps - 1:
            return None
        self._sync()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.enabled = False
        self.written = self._write(prof, wall)
        return self.written

    def close(self) -> str | None:
        """Stop a profile left open; nothing is written. Returns why no report was written, when
        one was asked for and none was (None otherwise)."""
        why = None
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
            why = "the run ended inside the profile window"
        elif self.enabled:
            why = "the run never reached the profile window (it ended before, or resumed after, its start)"
        self.enabled = False
        return why

    def _write(self, prof: Any, wall: float) -> Path:
        avgs = prof.key_averages()
        lines = [f"# steps {self.start}..{self.start + self.steps - 1} ({self.steps} optimizer steps), "
                 f"device {'cuda' if self.cuda else 'cpu'}",
                 f"wall time: {wall:.4f} s, {wall / self.steps * 1e3:.2f} ms per step"]
        if self.cuda:
            # top-level events only would miss kernels; self device time sums each kernel once
            busy = device_busy_seconds(avgs)
            lines.append(f"device busy (sum of kernel times): {busy:.4f} s = {busy / wall:.1%} of wall time; "
                         "the rest the device waited for the host (launches, syncs, data)")
            lines += ["", "## top operators by device time", "",
                      avgs.table(sort_by=_device_key(avgs), row_limit=25, max_name_column_width=70)]
        lines += ["", "## top operators by host (CPU) time", "",
                  avgs.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / "profile.txt"
        write_text(out, "\n".join(lines) + "\n")
        trace = self.out_dir / "profile_trace.json"
        tmp = trace.with_name(trace.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(trace)
        return out
