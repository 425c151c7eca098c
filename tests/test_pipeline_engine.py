"""The pipeline engine: skip finished stages, resume interrupted ones, refuse mixed outputs."""

import json
from dataclasses import dataclass

import pytest

from arvid.pipeline_engine import Pipeline, PipelineError, Stage


@dataclass
class Cfg:
    value: int = 1


def make(tmp_path, calls, v1=1, v2=2, fail_b=False):
    def run_a(d):
        calls.append("a")
        (d / "out.txt").write_text(str(v1))

    def run_b(d):
        calls.append("b")
        if fail_b:
            (d / "partial").write_text("x")
            raise RuntimeError("killed")
        assert (tmp_path / "out" / "a" / "out.txt").exists()
        (d / "out.txt").write_text(str(v2))

    return Pipeline([Stage("a", Cfg(v1), run_a), Stage("b", Cfg(v2), run_b, deps=["a"])], tmp_path / "out")


def test_skip_resume_refuse_redo(tmp_path):
    calls = []
    with pytest.raises(RuntimeError):
        make(tmp_path, calls, fail_b=True).run()
    assert calls == ["a", "b"]
    assert (tmp_path / "out/a/pipeline_done.json").exists() and not (tmp_path / "out/b/pipeline_done.json").exists()
    plan = make(tmp_path, []).plan()
    assert [p.action for p in plan] == ["skip", "resume"]
    calls = []
    make(tmp_path, calls).run()
    assert calls == ["b"]  # a was skipped, b resumed in place
    assert (tmp_path / "out/b/partial").exists()  # resume keeps what the stage wrote
    calls = []
    make(tmp_path, calls).run()
    assert calls == []
    # an upstream change changes b's fingerprint too: refused, not silently mixed
    with pytest.raises(PipelineError, match="refusing to mix"):
        make(tmp_path, [], v1=5).run()
    calls = []
    make(tmp_path, calls, v1=5).run(from_="a")
    assert calls == ["a", "b"]
    assert (tmp_path / "out/a/out.txt").read_text() == "5"
    assert any(p.name.startswith("a.old-") for p in (tmp_path / "out").iterdir())


def test_until_dry_run_and_bad_names(tmp_path):
    calls = []
    items = make(tmp_path, calls).run(until="a", dry_run=True)
    assert [i.stage.name for i in items] == ["a"] and calls == []
    make(tmp_path, calls).run(until="a")
    assert calls == ["a"]
    with pytest.raises(PipelineError, match="did you mean 'b'"):
        make(tmp_path, []).plan(until="bb")
    with pytest.raises(PipelineError, match="does not run before"):
        Pipeline([Stage("x", Cfg(), lambda d: None, deps=["y"])], tmp_path)
    # --from after --until would redo nothing: refused instead of silently doing nothing
    with pytest.raises(PipelineError, match="--from 'b' would redo nothing.*--until 'a'"):
        make(tmp_path, []).plan(until="a", from_="b")
    with pytest.raises(PipelineError, match="--only 'a'"):
        make(tmp_path, []).plan(only="a", from_="b")
    assert [i.action for i in make(tmp_path, []).plan(until="a", from_="a")] == ["redo"]


def test_a_second_process_waits_for_a_running_stage_then_skips_it(tmp_path):
    """Two pipelines on one out_dir (threads here; each takes the stage lock through its own open
    file, as two processes do): the second waits for the stage the first is running, then finds it
    finished with the same fingerprint and skips it instead of running it twice."""
    import threading

    started, release = threading.Event(), threading.Event()
    calls = []

    def run_a(d):
        calls.append("a")
        started.set()
        assert release.wait(30)
        (d / "out.txt").write_text("1")

    def pipe():
        return Pipeline([Stage("a", Cfg(1), run_a)], tmp_path / "out")

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", pipe().run()))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: results.setdefault("second", pipe().run()))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "the second pipeline must wait while the first runs the stage"
    release.set()
    first.join(30)
    second.join(30)
    assert calls == ["a"]
    assert [i.action for i in results["first"]] == ["run"]
    assert [(i.action, i.reason) for i in results["second"]] == [("skip", "finished by another process")]
    # the lock is free again: a later run plans a skip without waiting
    assert [i.action for i in pipe().run()] == ["skip"]


def test_a_stage_finished_elsewhere_with_another_config_is_refused(tmp_path):
    """The lock's re-check keeps the refusal: a stage that another process finished with a different
    config between this plan and this run is not overwritten (here stage a's run plays the other
    process and finishes b with another config before b's turn)."""
    calls = []

    def run_a(d):
        calls.append("a")
        Pipeline([Stage("b", Cfg(9), lambda d: calls.append("b9"))], tmp_path / "out").run()

    p = Pipeline([Stage("a", Cfg(1), run_a), Stage("b", Cfg(2), lambda d: calls.append("b"), deps=["a"])],
                 tmp_path / "out")
    with pytest.raises(PipelineError, match="another process finished .* different config"):
        p.run()
    assert calls == ["a", "b9"]


def test_an_interrupted_stage_of_another_config_is_not_run_over(tmp_path):
    """Under the lock the plan's whole check is repeated: a partial stage another process left
    (its start marker, no done marker) with a different config is refused, not overwritten."""
    calls = []

    def fail(d):
        (d / "partial").write_text("theirs")
        raise RuntimeError("killed")

    def run_a(d):
        calls.append("a")
        with pytest.raises(RuntimeError):
            Pipeline([Stage("b", Cfg(9), fail)], tmp_path / "out").run()

    p = Pipeline([Stage("a", Cfg(1), run_a), Stage("b", Cfg(2), lambda d: calls.append("b"), deps=["a"])],
                 tmp_path / "out")
    assert [i.action for i in p.plan()] == ["run", "run"]
    with pytest.raises(PipelineError, match="interrupted run of a different config"):
        p.run()
    assert calls == ["a"]
    assert (tmp_path / "out/b/partial").read_text() == "theirs"


def test_an_interrupted_stage_of_the_same_config_is_resumed_not_restarted(tmp_path):
    """Planned as 'run', found interrupted with the same fingerprint under the lock (another process
    started it after this plan and died): resumed in place, its start marker and files kept."""
    from arvid.io import write_json

    calls = []
    fp_b = {}

    def run_a(d):  # plays the other process: it starts b with this config, then dies
        (tmp_path / "out/b").mkdir(parents=True)
        write_json(tmp_path / "out/b/pipeline_stage.json", {"fingerprint": fp_b["b"], "started": 1.0})
        (tmp_path / "out/b/partial").write_text("x")

    p = Pipeline([Stage("a", Cfg(1), run_a), Stage("b", Cfg(2), lambda d: calls.append("b"), deps=["a"])],
                 tmp_path / "out")
    fp_b["b"] = p.plan()[1].fingerprint
    items = p.run()
    assert [(i.action, i.reason) for i in items][1] == ("resume", "interrupted in another process; resuming in place")
    assert calls == ["b"]
    assert '"started": 1.0' in (tmp_path / "out/b/pipeline_stage.json").read_text()
    assert (tmp_path / "out/b/partial").exists()


def test_two_redos_at_once_run_the_stage_once(tmp_path):
    """`--from a` in two processes: the second waits for the first's redo, then finds a done marker
    written after its own plan with its fingerprint and reuses it instead of redoing it again."""
    import threading

    Pipeline([Stage("a", Cfg(1), lambda d: None)], tmp_path / "out").run()
    started, release = threading.Event(), threading.Event()
    calls = []

    def run_a(d):
        calls.append("a")
        started.set()
        assert release.wait(30)

    def pipe():
        return Pipeline([Stage("a", Cfg(1), run_a)], tmp_path / "out")

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", pipe().run(from_="a")))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: results.setdefault("second", pipe().run(from_="a")))
    second.start()
    second.join(0.5)
    assert second.is_alive()
    release.set()
    first.join(30)
    second.join(30)
    assert calls == ["a"]
    assert [i.action for i in results["first"]] == ["redo"]
    assert [(i.action, i.reason) for i in results["second"]] == [("skip", "redone by another process after this one planned")]
    assert len([p for p in (tmp_path / "out").iterdir() if p.name.startswith("a.old-")]) == 1
    # a later --from run (planned after that done marker) redoes it again, as asked
    calls.clear()
    pipe_now = Pipeline([Stage("a", Cfg(1), lambda d: calls.append("again"))], tmp_path / "out")
    assert [i.action for i in pipe_now.run(from_="a")] == ["redo"] and calls == ["again"]


def test_only_runs_one_stage_and_needs_its_upstream(tmp_path):
    calls = []
    with pytest.raises(PipelineError, match="upstream stage.*'a'.*not finished"):
        make(tmp_path, calls).run(only="b")
    assert calls == []
    items = make(tmp_path, calls).run(only="a")
    assert [i.stage.name for i in items] == ["a"] and calls == ["a"]
    items = make(tmp_path, calls).run(only="b")
    assert [(i.stage.name, i.action) for i in items] == [("b", "run")] and calls == ["a", "b"]
    with pytest.raises(PipelineError, match="--only 'c' is not a stage"):
        make(tmp_path, calls).run(only="c")


class _Proc:
    """A stage 'process' for run_parallel's tests: the stage runs in a thread of this process."""

    def __init__(self, pipe, item, log):
        import threading

        self.pid, self.rc = item.stage.name, None

        def target():
            log.append(("start", item.stage.name))
            try:
                pipe.run(only=item.stage.name, from_=item.stage.name if item.action == "redo" else None)
                self.rc = 0
            except Exception:  # noqa: BLE001 - a failing stage is an exit code here
                self.rc = 1
            log.append(("end", item.stage.name))

        self.thread = threading.Thread(target=target)
        self.thread.start()

    def poll(self):
        return None if self.thread.is_alive() else self.rc

    def terminate(self):
        pass

    def wait(self, timeout=None):
        self.thread.join(timeout)


def _graph(tmp_path, gate, fail=()):
    """a -> b -> d and a -> c (b, c independent); each stage waits on its gate event."""
    def run(name):
        def f(d):
            assert gate[name].wait(30), name
            if name in fail:
                raise RuntimeError(name)
            (d / "out.txt").write_text(name)
        return f

    return Pipeline([Stage("a", Cfg(1), run("a")), Stage("b", Cfg(2), run("b"), deps=["a"]),
                     Stage("c", Cfg(3), run("c"), deps=["a"]), Stage("d", Cfg(4), run("d"), deps=["b"])],
                    tmp_path / "out")


def test_run_parallel_starts_independent_stages_together(tmp_path):
    import threading

    gate = {k: threading.Event() for k in "abcd"}
    log = []
    pipe = _graph(tmp_path, gate)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("items", pipe.run_parallel(
        lambda it: _Proc(pipe, it, log), jobs=3, poll_s=0.01)))
    t.start()
    gate["a"].set()
    deadline = __import__("time").time() + 30
    while ("start", "c") not in log and __import__("time").time() < deadline:
        __import__("time").sleep(0.01)
    # b and c both started once a finished, before either of them ended
    assert ("start", "b") in log and ("start", "c") in log
    assert ("start", "d") not in log and not any(e == "end" and n in "bc" for e, n in log)
    gate["c"].set()
    gate["b"].set()
    gate["d"].set()
    t.join(30)
    assert [i.action for i in result["items"]] == ["run"] * 4
    assert all((tmp_path / "out" / n / "pipeline_done.json").exists() for n in "abcd")
    assert log.index(("start", "d")) > log.index(("end", "b"))
    # everything finished: a second parallel run skips every stage and launches nothing
    launched = []
    items = pipe.run_parallel(lambda it: launched.append(it) or _Proc(pipe, it, log), jobs=3, poll_s=0.01)
    assert launched == [] and [i.action for i in items] == ["skip"] * 4


def test_run_parallel_jobs_1_is_sequential_and_a_failure_stops_new_starts(tmp_path):
    import threading

    gate = {k: threading.Event() for k in "abcd"}
    for g in gate.values():
        g.set()
    log = []
    pipe = _graph(tmp_path, gate, fail={"b"})
    with pytest.raises(PipelineError, match=r"stage\(s\) 'b' \(exit code 1\) failed; not started: c, d"):
        pipe.run_parallel(lambda it: _Proc(pipe, it, log), jobs=1, poll_s=0.01)
    # one at a time, in plan order: b fails, and c (independent of b) is not started after it
    assert log == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]
    assert not (tmp_path / "out/c/pipeline_done.json").exists()
    with pytest.raises(PipelineError, match="--jobs must be at least 1"):
        pipe.run_parallel(lambda it: None, jobs=0)
    # the rerun (b fixed) resumes b and runs c and d
    log.clear()
    pipe = _graph(tmp_path, gate)
    items = pipe.run_parallel(lambda it: _Proc(pipe, it, log), jobs=2, poll_s=0.01)
    assert [(i.stage.name, i.action) for i in items] == [("a", "skip"), ("b", "resume"), ("c", "run"), ("d", "run")]


def test_run_parallel_on_sigterm_stops_its_stage_processes(tmp_path):
    """`timeout` or a scheduler ends the parent with SIGTERM: the stage processes it started are
    terminated too (they resume on the next run), not left running as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    procs = []

    def launch(it):
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        procs.append(p)
        return p

    pipe = Pipeline([Stage("a", Cfg(1), lambda d: None), Stage("b", Cfg(2), lambda d: None)], tmp_path / "out")
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(SystemExit) as e:
        pipe.run_parallel(launch, jobs=2, poll_s=0.05)
    timer.join()
    assert e.value.code == 128 + signal.SIGTERM
    assert len(procs) == 2 and all(p.poll() is not None for p in procs)
    assert signal.getsignal(signal.SIGTERM) is before


def test_execution_only_fields_do_not_change_the_fingerprint(tmp_path):
    """Tuning how a stage runs (workers, compile mode) reuses its finished output; changing what it
    computes is refused."""
    from arvid.config import doc

    @dataclass
    class Run:
        value: int = doc(1, "what the stage computes")
        num_workers: int = doc(0, "loader workers", execution=True)

    calls = []
    mk = lambda cfg: Pipeline([Stage("a", cfg, lambda d: calls.append(cfg))], tmp_path / "out")  # noqa: E731
    mk(Run()).run()
    assert [i.action for i in mk(Run(num_workers=8)).run()] == ["skip"]
    with pytest.raises(PipelineError, match="refusing to mix"):
        mk(Run(value=2)).run()
    assert len(calls) == 1


def test_only_plans_its_upstream_alone(tmp_path):
    """A `--only b` process checks b and what b depends on, not a stage beside it in plan order that
    another process is redoing (here c, finished with another config)."""
    calls = []
    p = lambda c=3: Pipeline([Stage("a", Cfg(1), lambda d: calls.append("a")),  # noqa: E731
                              Stage("c", Cfg(c), lambda d: calls.append("c")),
                              Stage("b", Cfg(2), lambda d: calls.append("b"), deps=["a"])], tmp_path / "out")
    p().run()
    (tmp_path / "out/b/pipeline_done.json").unlink()
    with pytest.raises(PipelineError, match="'c'.*refusing"):
        p(c=9).plan()
    calls.clear()
    items = p(c=9).run(only="b")
    assert [(i.stage.name, i.action) for i in items] == [("b", "resume")] and calls == ["b"]
    assert [i.stage.name for i in p(c=9).plan(only="b")] == ["a", "b"]
    with pytest.raises(PipelineError, match="--from may only name it"):
        p().run(only="b", from_="a")


def test_only_refuses_a_fingerprint_other_than_the_expected(tmp_path):
    calls = []
    p = Pipeline([Stage("a", Cfg(1), lambda d: calls.append("a"))], tmp_path / "out")
    fp = p.plan()[0].fingerprint
    with pytest.raises(PipelineError, match="fingerprint is .* but 0000 was expected"):
        p.run(only="a", expect_fingerprint="0000")
    assert calls == []
    p.run(only="a", expect_fingerprint=fp)
    assert calls == ["a"]


def test_outputs_fingerprinted_before_execution_fields_left_out_are_reused(tmp_path):
    """Done markers written with the old fingerprint (the whole config) still count as finished."""
    from arvid.io import write_json
    from arvid.pipeline_engine import _fingerprint

    (tmp_path / "out/a").mkdir(parents=True)
    write_json(tmp_path / "out/a/pipeline_done.json", {"fingerprint": _fingerprint(Cfg(1), [], legacy=True)})
    (tmp_path / "out/b").mkdir(parents=True)
    legacy_b = _fingerprint(Cfg(2), [_fingerprint(Cfg(1), [], legacy=True)], legacy=True)
    write_json(tmp_path / "out/b/pipeline_done.json", {"fingerprint": legacy_b})
    assert [i.action for i in make(tmp_path, []).plan()] == ["skip", "skip"]
    write_json(tmp_path / "out/b/pipeline_done.json", {"fingerprint": "something else"})
    with pytest.raises(PipelineError, match="'b'.*refusing"):
        make(tmp_path, []).plan()


def test_without_flock_stages_run_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    """Some NFS mounts refuse flock (ENOLCK): the stage runs unlocked, and its own error is not
    reported as raised while handling the lock's."""
    import errno

    import arvid.pipeline_engine as eng

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(eng.fcntl, "flock", no_locks)

    def boom(d):
        raise RuntimeError("stage failed")

    with caplog.at_level("WARNING", logger="arvid.pipeline"):
        with pytest.raises(RuntimeError, match="stage failed") as e:
            Pipeline([Stage("a", Cfg(1), boom)], tmp_path / "out").run()
    assert "running the stage unlocked" in caplog.text
    assert e.value.__context__ is None
    calls = []
    make(tmp_path / "x", calls).run()
    assert calls == ["a", "b"]


def test_run_parallel_waits_for_after_stages(tmp_path):
    """`after` orders without entering the fingerprint: d reads c's output, so it starts after c."""
    import threading

    gate = {k: threading.Event() for k in "abcd"}
    for k in "abd":
        gate[k].set()
    log = []
    base = _graph(tmp_path, gate)
    stages = [s if s.name != "d" else Stage("d", s.config, s.run, deps=s.deps, after=["c"]) for s in base.stages]
    pipe = Pipeline(stages, tmp_path / "out")
    assert [i.fingerprint for i in pipe.plan()] == [i.fingerprint for i in base.plan()]
    t = threading.Thread(target=lambda: pipe.run_parallel(lambda it: _Proc(pipe, it, log), jobs=4, poll_s=0.01))
    t.start()
    deadline = __import__("time").time() + 30
    while ("end", "b") not in log and __import__("time").time() < deadline:
        __import__("time").sleep(0.01)
    __import__("time").sleep(0.1)
    assert ("start", "d") not in log  # b is done, but c is not
    gate["c"].set()
    t.join(30)
    assert log.index(("start", "d")) > log.index(("end", "c"))
    with pytest.raises(PipelineError, match="depends on 'x'"):
        Pipeline([Stage("d", Cfg(1), lambda d: None, after=["x"])], tmp_path / "y")


def test_run_parallel_reports_a_stage_its_child_found_finished_as_skipped(tmp_path):
    """A child that finds its stage finished by another process meanwhile (done marker older than the
    launch) is summarised as skipped, not as ran."""
    import threading

    gate = {k: threading.Event() for k in "abcd"}
    for g in gate.values():
        g.set()
    pipe = _graph(tmp_path, gate)
    plan_fps = {i.stage.name: i.fingerprint for i in pipe.plan()}

    def launch(it):
        if it.stage.name == "c":  # another process finished c just before this child started
            from arvid.io import write_json

            it.directory.mkdir(parents=True, exist_ok=True)
            write_json(it.directory / "pipeline_done.json", {"fingerprint": plan_fps["c"], "finished": 1.0})
        return _Proc(pipe, it, [])

    items = pipe.run_parallel(launch, jobs=2, poll_s=0.01)
    assert [(i.stage.name, i.action) for i in items] == [("a", "run"), ("b", "run"), ("c", "skip"), ("d", "run")]


def test_an_interrupted_stage_with_the_old_fingerprint_resumes(tmp_path):
    """A start marker written before 2026-12-04 (legacy fingerprint) is resumed, through the plan
    and through the re-check under the lock."""
    from arvid.io import write_json
    from arvid.pipeline_engine import _fingerprint

    calls = []
    (tmp_path / "out/a").mkdir(parents=True)
    write_json(tmp_path / "out/a/pipeline_stage.json", {"fingerprint": _fingerprint(Cfg(1), [], legacy=True)})
    (tmp_path / "out/a/partial").write_text("x")
    items = Pipeline([Stage("a", Cfg(1), lambda d: calls.append("a"))], tmp_path / "out").run()
    assert [i.action for i in items] == ["resume"] and calls == ["a"]
    assert (tmp_path / "out/a/partial").exists()


def test_a_stage_is_refreshed_when_what_it_reads_appears_or_changes(tmp_path):
    """`after` stages are read, not depended on (the report copies the curve): a finished stage is
    redone when one of them is added later or rerun, and skipped while they are unchanged."""
    calls = []

    def stage(name, value=1, after=()):
        def run(d):
            calls.append(name)
            (d / "out.txt").write_text(str(value))
        return Stage(name, Cfg(value), run, after=list(after))

    out = tmp_path / "out"
    Pipeline([stage("report")], out).run()  # made before the curve existed
    assert calls == ["report"]
    calls.clear()
    pipe = Pipeline([stage("curve"), stage("report", after=["curve"])], out)
    plan = pipe.plan()
    assert [(i.stage.name, i.action) for i in plan] == [("curve", "run"), ("report", "redo")]
    assert "refresh: curve" in plan[1].reason
    pipe.run()
    assert calls == ["curve", "report"]
    curve_run = json.loads((out / "curve/pipeline_done.json").read_text())["finished"]
    assert json.loads((out / "report/pipeline_done.json").read_text())["after"] == {"curve": curve_run}
    calls.clear()
    assert [i.action for i in pipe.run()] == ["skip", "skip"] and calls == []
    # --only does not plan the curve, so it cannot judge it: the report is left alone
    assert Pipeline([stage("curve"), stage("report", after=["curve"])], out).plan(only="report")[-1].action == "skip"
    # the curve redone (another config, another process): the report no longer matches it
    Pipeline([stage("curve", value=2)], out).run(from_="curve")
    calls.clear()
    items = Pipeline([stage("curve", value=2), stage("report", after=["curve"])], out).run()
    assert [i.action for i in items] == ["skip", "redo"] and calls == ["report"]
    # a marker written before the record existed is not judged
    done = out / "report/pipeline_done.json"
    rec = json.loads(done.read_text())
    del rec["after"]
    done.write_text(json.dumps(rec))
    Pipeline([stage("curve", value=3)], out).run(from_="curve")
    calls.clear()
    items = Pipeline([stage("curve", value=3), stage("report", after=["curve"])], out).run()
    assert [i.action for i in items] == ["skip", "skip"] and calls == []
    # --from still redoes what reads it
    Pipeline([stage("curve", value=4), stage("report", after=["curve"])], out).run(from_="curve")
    assert calls == ["curve", "report"]


def test_a_refresh_is_not_lost_and_reaches_dependents(tmp_path):
    """Review findings: a curve rerun with the same config in a run that stops before the report
    still refreshes the report next time; and stages depending on a refreshed stage are redone too."""
    calls = []

    def stage(name, after=(), deps=()):
        def run(d):
            calls.append(name)
            (d / "out.txt").write_text(name)
        return Stage(name, Cfg(1), run, deps=list(deps), after=list(after))

    out = tmp_path / "out"

    def pipe():
        return Pipeline([stage("curve"), stage("report", after=["curve"]), stage("publish", deps=["report"])], out)

    pipe().run()
    calls.clear()
    pipe().run(from_="curve", until="curve")  # same config, another run of the curve
    assert calls == ["curve"]
    calls.clear()
    items = pipe().run()
    assert [i.action for i in items] == ["skip", "redo", "redo"] and calls == ["report", "publish"]
    assert "upstream report" in items[2].reason
    calls.clear()
    assert [i.action for i in pipe().run()] == ["skip", "skip", "skip"] and calls == []


def test_run_parallel_a_stage_finished_before_its_launch_returns_counts_as_run(tmp_path):
    """A child that finishes the stage before ``launch`` returns (a fast stage, a slow parent) ran
    it: its marker is newer than the launch, so the plan says 'run', not 'finished by another
    process' (CI saw 'skip' here once when the launch time was taken after ``launch``)."""
    import threading

    class Done:  # the stage ran to completion inside launch()
        def __init__(self, pipe, item):
            self.pid, self.rc = item.stage.name, 0
            pipe.run(only=item.stage.name)

        def poll(self):
            return self.rc

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return self.rc

    gate = {k: threading.Event() for k in "abcd"}
    for g in gate.values():
        g.set()
    pipe = _graph(tmp_path, gate)
    items = pipe.run_parallel(lambda it: Done(pipe, it), jobs=1, poll_s=0.01)
    assert [i.action for i in items] == ["run"] * 4


def test_a_stage_is_refreshed_when_its_upstream_was_redone_alone(tmp_path):
    """`--from a --until a` redoes a alone; the next full run kept b, made from the old a (before
    2026-12-07 only `after` reads were tracked). b now records which run of a it was made from."""
    calls = []
    make(tmp_path, calls).run()
    assert calls == ["a", "b"]
    assert set(json.loads((tmp_path / "out/b/pipeline_done.json").read_text())["deps"]) == {"a"}
    calls = []
    make(tmp_path, calls).run(from_="a", until="a")
    assert calls == ["a"]
    plan = make(tmp_path, []).plan()
    assert [(p.stage.name, p.action) for p in plan] == [("a", "skip"), ("b", "redo")]
    assert "a changed since it ran" in plan[1].reason
    calls = []
    make(tmp_path, calls).run()
    assert calls == ["b"]
    assert [p.action for p in make(tmp_path, []).plan()] == ["skip", "skip"]
    # a marker that records no upstream runs (older versions) is not judged
    marker = tmp_path / "out/b/pipeline_done.json"
    rec = json.loads(marker.read_text())
    del rec["deps"]
    marker.write_text(json.dumps(rec))
    make(tmp_path, []).run(from_="a", until="a")
    assert [p.action for p in make(tmp_path, []).plan()] == ["skip", "skip"]


@dataclass
class PathCfg:
    out_dir: str = ""
    reads: str = ""


def test_a_moved_experiment_is_still_recognised(tmp_path):
    """Stage configs hold paths under the pipeline's out_dir (their own, their upstream's); a copy
    of the experiment elsewhere, or the same directory spelled another way, was 'a different
    config' (before 2026-12-07). Paths under out_dir now count relative to it; paths outside it
    (the data) still count as they are. Markers holding the older, path-bound fingerprints match."""
    import shutil

    from arvid.pipeline_engine import _fingerprint

    def pipe(root, data="/data/ucf"):
        root = str(root)
        return Pipeline([Stage("a", PathCfg(f"{root}/a", data), lambda d: (d / "x").write_text("a")),
                         Stage("b", PathCfg(f"{root}/b", f"{root}/a/x"), lambda d: (d / "y").write_text("b"),
                               deps=["a"])], root)

    pipe(tmp_path / "exp").run()
    shutil.copytree(tmp_path / "exp", tmp_path / "moved")
    assert [p.action for p in pipe(tmp_path / "moved").plan()] == ["skip", "skip"]
    with pytest.raises(PipelineError, match="refusing to mix"):  # other data: another config
        pipe(tmp_path / "moved", data="/data/k600").plan()
    # markers written before 2026-12-07 hold the path-bound fingerprints: still reused in place
    old = tmp_path / "old"
    p = pipe(old)
    p.run()
    fa = _fingerprint(p.stages[0].config, [])
    fb = _fingerprint(p.stages[1].config, [fa])
    for name, fp in (("a", fa), ("b", fb)):
        marker = old / name / "pipeline_done.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "fingerprint": fp}))
    assert [i.action for i in pipe(old).plan()] == ["skip", "skip"]


def test_an_interrupted_stage_whose_upstream_ran_again_starts_over(tmp_path):
    """b killed mid-run, then `--from a --until a`: b was resumed on partial output made from the old
    a (review of 2026-12-07); it is now redone, its partial output moved aside."""
    with pytest.raises(RuntimeError):
        make(tmp_path, [], fail_b=True).run()
    assert [p.action for p in make(tmp_path, []).plan()] == ["skip", "resume"]  # nothing changed: resumed
    calls = []
    make(tmp_path, calls).run(from_="a", until="a")
    assert calls == ["a"]
    plan = make(tmp_path, []).plan()
    assert [(p.stage.name, p.action) for p in plan] == [("a", "skip"), ("b", "redo")]
    assert "upstream a ran again since" in plan[1].reason
    calls = []
    make(tmp_path, calls).run()
    assert calls == ["b"] and not (tmp_path / "out/b/partial").exists()


def test_a_stage_records_the_upstream_run_it_started_from(tmp_path):
    """b records which run of a it read when it starts, not when it ends: a redone by another process
    (`--from a --until a`) while b runs leaves b made from the old a, refreshed by the next plan (it
    was recorded as made from the new a, and skipped)."""
    calls = []
    make(tmp_path, calls).run(until="a")

    def run_b(d):
        calls.append("b")
        make(tmp_path, calls).run(from_="a", until="a")  # another process redoes a meanwhile

    Pipeline([Stage("a", Cfg(1), lambda d: None), Stage("b", Cfg(2), run_b, deps=["a"])], tmp_path / "out").run()
    assert calls == ["a", "b", "a"]
    plan = make(tmp_path, []).plan()
    assert [(p.stage.name, p.action) for p in plan] == [("a", "skip"), ("b", "redo")]
    assert "a changed since it ran" in plan[1].reason


def test_a_marker_that_is_not_a_json_object_is_refused_with_its_path(tmp_path):
    """A marker holding JSON other than an object (edited by hand) was an AttributeError traceback."""
    make(tmp_path, []).run()
    (tmp_path / "out/a/pipeline_done.json").write_text("[]\n")
    with pytest.raises(PipelineError, match=r"a/pipeline_done.json' is not a pipeline marker.*got list.*--from a"):
        make(tmp_path, []).plan()
    calls = []
    make(tmp_path, calls).run(from_="a")  # the way out the message names
    assert calls == ["a", "b"] and [p.action for p in make(tmp_path, []).plan()] == ["skip", "skip"]
    (tmp_path / "out/b/pipeline_done.json").unlink()
    (tmp_path / "out/b/pipeline_stage.json").write_text("null\n")
    with pytest.raises(PipelineError, match=r"b/pipeline_stage.json' is not a pipeline marker.*got NoneType"):
        make(tmp_path, []).plan()
    (tmp_path / "out/a/pipeline_done.json").write_text("{")  # not JSON: named too, and redone by --from
    with pytest.raises(OSError, match=r"a/pipeline_done.json' is not valid JSON"):
        make(tmp_path, []).plan()
    calls = []
    make(tmp_path, calls).run(from_="a")
    assert calls == ["a", "b"] and [p.action for p in make(tmp_path, []).plan()] == ["skip", "skip"]
