"""kill -9 at seeded random points of five stages, then rerun to completion.

One uninterrupted reference run per stage (tokenizer training -> curation -> tokenization ->
generator training -> sampling, each feeding the next), then, in a second output directory of
the same stage with the same config, N cycles of: start the stage as a subprocess, SIGKILL it
after a seeded random delay (counted from the start, or from the moment a new checkpoint /
shard / video file appears), and check that nothing under a final name is half-written. A last
run must complete, and its results must equal the reference run's: the trained weights
bit-for-bit (torch.equal) for both trainings, the labels, the token store and the sampled
tokens for the others.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("_reliability_runner.py")
SEED = 1234

# stage -> kill points: (trigger glob under the stage dir, or None: counted from the start; delay range in s).
# Start-up (imports, model building) takes ~2-3 s; the tiny stages' real work a fraction of a second
# (tokenize, sample; a training step takes ~0.1 s), so kills after a trigger come within 0-0.4 s of it.
CKPT = "checkpoints/step_*"
PLAN: dict[str, list[tuple[str | None, float, float]]] = {
    "tok": [(None, 0.5, 3.0), (CKPT, 0.0, 0.15), (CKPT, 0.0, 0.15), (CKPT, 0.0, 0.15), (CKPT, 0.0, 0.15),
            ("val_recon.gif", 0.0, 0.2)],
    "curate": [(None, 0.5, 3.0), ("parts/part_*.npz", 0.0, 0.3), ("parts/part_*.npz", 0.0, 0.3),
               ("parts/part_*.npz", 0.0, 0.3)],
    "tokenize": [(None, 0.3, 2.5), ("config.yaml", 0.0, 0.35), ("config.yaml", 0.0, 0.35)],
    "gen": [(None, 0.5, 3.0), (CKPT, 0.0, 0.15), (CKPT, 0.0, 0.15), (CKPT, 0.0, 0.15), (CKPT, 0.0, 0.15),
            ("gpt/model.safetensors", 0.0, 0.2)],
    "sample": [(None, 0.3, 2.5), ("config.yaml", 0.0, 0.4), ("config.yaml", 0.0, 0.4)],
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_stage(stage: str, work: Path, out: Path, timeout: float = 240) -> None:
    """Run ``stage`` to completion in a subprocess; fail with its stderr if it does not exit 0."""
    p = subprocess.run([sys.executable, str(RUNNER), stage, str(work), str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{stage} -> {out} exited {p.returncode}:\n{p.stderr[-3000:]}"


def _new_match(out: Path, pattern: str, since: float) -> bool:
    for p in out.glob(pattern):
        try:  # the stage may prune or rename it meanwhile
            if not _is_temporary(p.relative_to(out)) and p.stat().st_mtime >= since:
                return True
        except FileNotFoundError:
            continue
    return False


def kill_cycle(stage: str, work: Path, out: Path, trigger: str | None, delay: float, timeout: float = 120) -> str:
    """Start ``stage``; SIGKILL it ``delay`` s after the start (``trigger`` None) or after a new file
    matching ``trigger`` appears. Returns "killed" or "finished" (it completed before the kill)."""
    proc = subprocess.Popen([sys.executable, str(RUNNER), stage, str(work), str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    fire_at = t0 + delay if trigger is None else None
    try:
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read()
                assert proc.returncode == 0, f"{stage} exited {proc.returncode} before the kill:\n{err[-3000:]}"
                return "finished"
            now = time.time()
            if fire_at is None and trigger is not None and out.exists() and _new_match(out, trigger, t0 - 0.01):
                fire_at = now + delay
            if fire_at is not None and now >= fire_at:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return "killed"
            if now - t0 > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(f"{stage} did not finish or reach {trigger!r} within {timeout} s")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def _is_temporary(rel: Path) -> bool:
    # atomic_write / atomic_dir / TokenStoreWriter temporaries are hidden: ".<name>.<random>.tmp",
    # ".<name>.old-<pid>"; check_writable's probe is ".arvid-write-test-*"
    return any(part.startswith(".") for part in rel.parts)


def check_outputs(out: Path, finished: bool) -> dict[str, int]:
    """Every file under ``out`` that is not a temporary parses; returns counts per kind.

    A ``metrics.jsonl`` is an append-only log: after a kill its last line may be cut short (the
    Trainer drops it on resume), so that line is exempt unless ``finished``.
    """
    from safetensors.torch import load_file

    from arvid.data.token_store import TokenStore, is_token_store
    from arvid.io import torch_load_safe

    counts: dict[str, int] = {"temporary": 0}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if _is_temporary(rel):
            counts["temporary"] += 1
            continue
        if path.is_dir():
            if (path / "meta.json").exists() or (path / "codes.bin").exists():
                assert is_token_store(path), f"{rel}: a token store directory without all its files"
                store = TokenStore(path)  # opening checks codes.bin's size against the index
                assert len(store) > 0 and store[len(store) - 1]["codes"].numel() > 0
                counts["store"] = counts.get("store", 0) + 1
            continue
        assert not path.name.endswith(".tmp"), f"{rel}: a temporary name outside a hidden temporary"
        suffix = path.suffix
        try:
            if suffix == ".safetensors":
                assert len(load_file(str(path))) > 0
            elif suffix == ".json":
                json.loads(path.read_text())
            elif suffix == ".jsonl":
                lines = path.read_text().splitlines()
                body = lines if finished else lines[:-1]
                for line in body:
                    json.loads(line)
            elif suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    for k in z.files:
                        z[k]
            elif suffix == ".npy":
                np.load(path, allow_pickle=False)
            elif suffix == ".yaml":
                yaml.safe_load(path.read_text())
            elif suffix == ".pt":
                torch_load_safe(path)
            elif suffix in (".mp4", ".gif"):
                import av

                with av.open(str(path)) as c:
                    assert sum(1 for _ in c.decode(video=0)) > 0
            elif path.name == "done":
                assert path.read_text().strip()
            elif suffix == ".bin":
                assert is_token_store(path.parent), f"{rel}: codes without the rest of the store"
            else:
                raise AssertionError(f"{rel}: unexpected output file")
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is a half-written file
            raise AssertionError(f"{rel} is half-written or corrupt after a kill: {type(e).__name__}: {e}") from e
        counts[suffix or path.name] = counts.get(suffix or path.name, 0) + 1
    if finished:
        assert (out / "done").is_file(), f"{out}: no done marker after a completed run"
    return counts


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted chain: WORK/tok, WORK/curate, WORK/tokenize, WORK/gen, WORK/sample."""
    work = tmp_path_factory.mktemp("rel_ref")
    run_stage("tok", work, work / "tok")
    run_stage("curate", work, work / "curate")
    # tokenize reads the curated labels; gen reads the store
    (work / "labels.npy").write_bytes((work / "curate" / "labels.npy").read_bytes())
    run_stage("tokenize", work, work / "tokenize")
    (work / "tokens").symlink_to(work / "tokenize" / "tokens")
    run_stage("gen", work, work / "gen")
    run_stage("sample", work, work / "sample")
    return work


def _same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{b} differs from the uninterrupted run in {diff[:5]}"


def _compare(stage: str, ref: Path, got: Path) -> None:
    if stage == "tok":
        _same_weights(ref / "tokenizer" / "model.safetensors", got / "tokenizer" / "model.safetensors")
        assert json.loads((got / "val_metrics.json").read_text())["psnr"] == pytest.approx(
            json.loads((ref / "val_metrics.json").read_text())["psnr"], abs=0)
        steps = [json.loads(x)["step"] for x in (got / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 6, steps
    elif stage == "gen":
        _same_weights(ref / "gpt" / "model.safetensors", got / "gpt" / "model.safetensors")
        steps = [json.loads(x)["step"] for x in (got / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 12, steps
    elif stage == "curate":
        np.testing.assert_array_equal(np.load(ref / "labels.npy"), np.load(got / "labels.npy"))
        with np.load(ref / "curation.npz") as a, np.load(got / "curation.npz") as b:
            assert a.files == b.files
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    elif stage == "tokenize":
        from arvid.data.token_store import TokenStore

        a, b = TokenStore(ref / "tokens"), TokenStore(got / "tokens")
        assert len(a) == len(b) == 12
        for i in range(len(a)):
            assert torch.equal(a[i]["codes"], b[i]["codes"]) and a[i]["video_id"] == b[i]["video_id"]
        np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    elif stage == "sample":
        with np.load(ref / "tokens.npz") as a, np.load(got / "tokens.npz") as b:
            for k in ("sequences", "lengths", "block_lengths", "classes"):
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert len(list((got / "videos").glob("*.mp4"))) == 6


@pytest.mark.parametrize("stage", list(PLAN))
def test_kill9_then_resume_matches_uninterrupted(stage, reference, tmp_path):
    """SIGKILL ``stage`` at seeded random points, rerun to completion, compare with the reference run."""
    work, out = reference, tmp_path / stage
    n = len(PLAN[stage])
    rng = random.Random(f"{SEED}-{stage}")
    outcomes = []
    for trigger, lo, hi in PLAN[stage]:
        delay = rng.uniform(lo, hi)
        outcome = kill_cycle(stage, work, out, trigger, delay)
        outcomes.append(outcome)
        if out.exists():
            check_outputs(out, finished=outcome == "finished")
    assert outcomes.count("killed") >= n - 1, outcomes  # the kills land before the run ends
    run_stage(stage, work, out)
    counts = check_outputs(out, finished=True)
    assert counts.get(".safetensors", 0) + counts.get(".npz", 0) + counts.get("store", 0) > 0
    _compare(stage, work / stage, out)
