"""benchmarks/gpu_agenda.sh, the background job of owed GPU measurements: its bookkeeping on the CPU."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_agenda.sh"


def agenda(*args, steps="none", timeout=60):
    env = {**os.environ, "AGENDA_STEPS": steps}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_wait_without_a_job_on_this_machine_exits_at_once(tmp_path):
    """A fresh machine (the last one was replaced) has no results folder: `wait` must say so and
    exit 4 at once, not wait its whole time for nothing."""
    r = agenda("wait", str(tmp_path / "absent"), "300", timeout=30)
    assert r.returncode == 4 and "never started here" in r.stderr


def test_run_with_no_steps_finishes_and_wait_reports_it(tmp_path):
    res = tmp_path / "agenda"
    r = agenda("run", str(res))
    assert r.returncode == 0, r.stderr
    assert (res / "finished").is_file()
    assert not [p.name for p in res.iterdir() if p.suffix in (".log", ".rc")]  # no step ran nor was marked
    w = agenda("wait", str(res), "5", steps="pipeline genprof")
    assert w.returncode == 0 and "agenda finished" in w.stdout
    assert "--- pipeline: not started" in w.stdout and "--- genprof: not started" in w.stdout


def test_unknown_command_is_refused():
    r = agenda("bogus")
    assert r.returncode == 2 and "usage" in r.stderr
