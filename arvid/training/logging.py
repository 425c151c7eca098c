"""Metric logging: ``metrics.jsonl`` always, TensorBoard through accelerate when installed.

``metrics.jsonl`` holds one JSON object per log step (``{"step": 10, "loss/main": 0.5, ...}``),
appended, written by the main process only. On resume the lines past the resumed step are
dropped first, so each step appears once even after a crash between a log and a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from arvid.io import write_text


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": keep the file valid JSON
    return value


class MetricsLogger:
    """Append log records to ``path`` (JSON lines) and, if given, to accelerate's trackers.

    ``enabled=False`` (non-main processes) makes every call a no-op.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True, accelerator: Any = None):
        self.path = Path(path)
        self.enabled = enabled
        self.accelerator = accelerator

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step > step`` (left by a run that died after logging them); returns how many."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut short by a kill
                continue
            if int(rec.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            write_text(self.path, "".join(line + "\n" for line in kept))
        return dropped

    def log(self, record: dict[str, Any], step: int) -> None:
        """Write one record (``step`` is stored under ``"step"``)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in record.items()}}) + "\n")
        if self.accelerator is not None:
            scalars = {k: v for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
            self.accelerator.log(scalars, step=step)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out
