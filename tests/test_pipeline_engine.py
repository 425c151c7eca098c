"""The pipeline engine: skip finished stages, resume interrupted ones, refuse mixed outputs."""

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
    config between this plan and this run is not overwritten."""
    p = Pipeline([Stage("a", Cfg(1), lambda d: None)], tmp_path / "out")
    plan = p.plan()
    Pipeline([Stage("a", Cfg(2), lambda d: None)], tmp_path / "out").run()
    import arvid.pipeline_engine as eng

    with pytest.raises(PipelineError, match="another process finished .* different config"):
        with eng.stage_lock(tmp_path / "out", "a"):
            p._finished_meanwhile(plan[0])
