"""The machinery of `arvid pipeline`: run stages in order, skip finished ones, resume the
interrupted one, refuse to mix outputs made from different upstream configs.

Each stage runs in its own directory ``<out_dir>/<name>``. Its identity is a fingerprint over
its own resolved config and its upstream stages' fingerprints. Two files record its state:

- ``pipeline_stage.json``: written before the stage starts (fingerprint, start time). A directory that
  has it but no ``pipeline_done.json`` holds an interrupted run: the stage is rerun in place and resumes
  from its own checkpoints or shards.
- ``pipeline_done.json``: written atomically after the stage finished, holding the fingerprint. A rerun
  with the same fingerprint skips the stage; a different one is refused unless the user asks
  to redo it (``--from``), which moves the old directory aside instead of deleting it.

Several processes may run pipelines on one ``out_dir`` at once (say, the fixed-length branch
beside the main chain on one GPU: ``stages=[fixed,fixed_tokenize,fixed_generator]`` in a second
process). Each stage runs under an exclusive lock, ``<out_dir>/.<name>.lock`` (``flock``; the
kernel drops it when its process dies, so a killed run leaves no stale lock). A process that
finds the stage locked waits, then checks the stage's markers again as the plan did: a stage
another process finished with the same fingerprint is skipped, not run twice (a ``--from`` redo
too, when another process redid it after this one planned); one finished or left interrupted
with a different fingerprint is refused. On a file system without ``flock`` (some NFS mounts) the
stages run unlocked, with a warning.

``Pipeline.run_parallel`` runs independent branches of the graph at once: each stage whose
upstream stages are finished is launched in its own process (``arvid pipeline CFG --only STAGE``),
up to ``jobs`` at a time, under the same locks and markers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # POSIX; elsewhere stages run unlocked (one pipeline per out_dir at a time)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from arvid.config import fingerprint_dict, relocate_paths, to_dict
from arvid.io import check_writable, read_json, write_json

log = logging.getLogger("arvid.pipeline")

# The engine's own markers; a stage may write its own ``done`` file beside them.
STATE_FILE = "pipeline_stage.json"
DONE_FILE = "pipeline_done.json"


class PipelineError(RuntimeError):
    """A stage's outputs do not belong to this pipeline's config, or the plan is invalid."""


def read_marker(path: Path) -> dict:
    """A stage's ``pipeline_stage.json`` or ``pipeline_done.json``; one that holds no JSON object
    (edited by hand, written by another tool) is a :class:`PipelineError` naming it."""
    rec = read_json(path)
    if not isinstance(rec, dict):
        raise PipelineError(f"{str(path)!r} is not a pipeline marker: expected a JSON object, got "
                            f"{type(rec).__name__}. Rerun with `--from {path.parent.name}` to redo that stage "
                            "(its directory is kept aside)")
    return rec


@dataclass
class Stage:
    name: str
    #: the stage's resolved config (a dataclass); its fingerprint identifies the stage's output
    config: Any
    #: runs the stage; it must write its outputs under ``directory`` and may resume from it
    run: Callable[[Path], Any]
    deps: list[str] = field(default_factory=list)
    description: str = ""
    #: stages that must finish before this one starts under ``run_parallel``, beyond ``deps``: what it
    #: reads without depending on it (the report's curve), or the selected stages a dropped dependency
    #: stood for. Order only: not part of the fingerprint.
    after: list[str] = field(default_factory=list)


def _fingerprint(config: Any, upstream: list[str], legacy: bool = False, root: str | None = None) -> str:
    """A stage's identity: its config less the execution-only fields, with paths under ``root`` (the
    pipeline's out_dir) made relative to it, and its upstream fingerprints. ``root`` None: the paths
    as they are, as fingerprints were before 2026-12-07; ``legacy``: the whole config, as they were
    before 2026-12-04 (both accepted as a match, so that outputs made then are still reused)."""
    cfg = to_dict(config) if legacy else fingerprint_dict(config)
    if root is not None:
        cfg = relocate_paths(cfg, root)
    blob = json.dumps({"config": cfg, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def stage_lock(out_dir: Path, name: str) -> Iterator[bool]:
    """Hold the exclusive lock of stage ``name`` under ``out_dir``; yields whether it had to wait
    for another process (which is then named in the log, with its pid)."""
    if fcntl is None:  # pragma: no cover
        yield False
        return
    path = out_dir / f".{name}.lock"
    with open(path, "a+") as f:
        waited = False
        unlocked = None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            log.info("[%s] waiting: another process (pid %s) is running this stage on %s", name, holder, out_dir)
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
        except OSError as e:  # no flock on this file system (some NFS mounts): run unlocked
            unlocked = e
        if unlocked is not None:  # outside the except: the stage's own errors are not chained to it
            log.warning("[%s] cannot lock %s (%s): running the stage unlocked; run one pipeline per "
                        "out_dir at a time on this file system", name, path, unlocked)
            yield False
            return
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield waited
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class PlanItem:
    stage: Stage
    directory: Path
    fingerprint: str
    action: str  # "skip" | "run" | "resume" | "redo"
    reason: str
    #: when the plan was made (``time.time()``): a redo another process finished after it is reused
    planned_at: float = 0.0
    #: the fingerprints as computed before 2026-12-07 (paths as they are) and before 2026-12-04 (the
    #: whole config): markers holding one of them match too
    older_fingerprints: tuple[str, ...] = ()


class Pipeline:
    def __init__(self, stages: list[Stage], out_dir: str | os.PathLike):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise PipelineError(f"duplicate stage names in {names}")
        for s in stages:
            for d in [*s.deps, *s.after]:
                if d not in names[: names.index(s.name)]:
                    raise PipelineError(f"stage {s.name!r} depends on {d!r}, which does not run before it")
        self.stages = stages
        self.out_dir = Path(out_dir)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def _check_name(self, name: str | None, flag: str) -> None:
        if name is not None and name not in self.names:
            import difflib

            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise PipelineError(f"{flag} {name!r} is not a stage{hint} (stages: {', '.join(self.names)})")

    def ancestors(self, name: str) -> set[str]:
        """The stages ``name`` depends on, directly or through others (its fingerprint's inputs)."""
        by_name = {s.name: s for s in self.stages}
        seen: set[str] = set()
        todo = list(by_name[name].deps)
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo.extend(by_name[d].deps)
        return seen

    def downstream(self, name: str) -> set[str]:
        """``name`` and every stage that depends on it or reads it (``deps`` or ``after``), directly or
        through others: what ``--from name`` redoes."""
        out = {name}
        for s in self.stages:  # plan order: a stage's dependencies come before it
            if out & {*s.deps, *s.after}:
                out.add(s.name)
        return out

    def plan(self, until: str | None = None, from_: str | None = None, only: str | None = None) -> list[PlanItem]:
        """What a run would do, stage by stage, without doing it. ``only``: plan that stage and the
        stages it depends on, nothing else (stages beside it may be running in other processes).
        ``from_``: redo that stage and those downstream of it; other finished stages are skipped."""
        self._check_name(until, "--until")
        self._check_name(from_, "--from")
        self._check_name(only, "--only")
        if only is not None:
            until = only
        last = self.names.index(until) if until else len(self.stages) - 1
        redo = self.downstream(from_) if from_ else set()
        keep = None if only is None else self.ancestors(only) | {only}
        planned = [s.name for s in self.stages[: last + 1] if keep is None or s.name in keep]
        if from_ and not redo & set(planned):
            limit = f"--only {only!r}" if only is not None else f"--until {until!r}"
            raise PipelineError(
                f"--from {from_!r} would redo nothing: it and the stages after it ({', '.join(sorted(redo))}) "
                f"are outside what {limit} plans ({', '.join(planned)}). Give a --from stage at or "
                f"before the last planned one.")
        now = time.time()
        fps: dict[str, str] = {}
        with_paths: dict[str, str] = {}
        legacy: dict[str, str] = {}
        items = []
        by_name: dict[str, PlanItem] = {}
        refreshed: set[str] = set()  # stages redone because what they read changed, and their dependents
        for s in self.stages[: last + 1]:
            if keep is not None and s.name not in keep:
                continue
            fp = _fingerprint(s.config, [fps[d] for d in s.deps], root=str(self.out_dir))
            fps[s.name] = fp
            with_paths[s.name] = _fingerprint(s.config, [with_paths[d] for d in s.deps])
            legacy[s.name] = _fingerprint(s.config, [legacy[d] for d in s.deps], legacy=True)
            older = (with_paths[s.name], legacy[s.name])
            d = self.stage_dir(s.name)
            done = d / DONE_FILE
            state = d / STATE_FILE
            if s.name in redo and d.exists():
                items.append(PlanItem(s, d, fp, "redo", f"--from {from_}: the old output is moved aside"))
            elif done.exists():
                rec = read_marker(done)
                old = rec.get("fingerprint")
                if old not in (fp, *older):
                    raise PipelineError(
                        f"stage {s.name!r}: {str(d)!r} was made with a different config or upstream "
                        f"(fingerprint {old} there, {fp} now); refusing to mix outputs. Rerun with "
                        f"`--from {s.name}` to redo it (the old directory is kept aside), or use another out_dir."
                    )
                stale = ", ".join(x for x in (self._stale_reads(s, rec, by_name, "deps"),
                                              self._stale_reads(s, rec, by_name, "after")) if x)
                upstream = [x for x in s.deps if x in refreshed]
                if stale or upstream:
                    why = f"its upstream {', '.join(upstream)} is refreshed" if upstream else f"{stale} changed since it ran"
                    items.append(PlanItem(s, d, fp, "redo", f"refresh: {why}"))
                    refreshed.add(s.name)
                else:
                    items.append(PlanItem(s, d, fp, "skip", "finished with the same config"))
            elif state.exists():
                old = read_marker(state).get("fingerprint")
                if old not in (fp, *older):
                    raise PipelineError(
                        f"stage {s.name!r}: {str(d)!r} holds an interrupted run of a different config "
                        f"(fingerprint {old} there, {fp} now). Rerun with `--from {s.name}` to start it over."
                    )
                started = read_marker(state).get("started")
                moved = [x for x in s.deps if x in by_name and (
                    x in refreshed or by_name[x].action != "skip"
                    or (started is not None and (self._finished(x) or 0) > float(started)))]
                if moved:  # its partial output was made from an upstream run that has since been replaced
                    items.append(PlanItem(s, d, fp, "redo", f"interrupted, and its upstream {', '.join(moved)} ran "
                                                            "again since: starting over (the old output is moved aside)"))
                    refreshed.add(s.name)
                else:
                    items.append(PlanItem(s, d, fp, "resume", "interrupted before; resuming in place"))
            else:
                items.append(PlanItem(s, d, fp, "run", "not run yet"))
            by_name[s.name] = items[-1]
        for it in items:
            it.planned_at, it.older_fingerprints = now, (with_paths[it.stage.name], legacy[it.stage.name])
        return items

    def _stale_reads(self, stage: Stage, done: dict, planned: dict[str, PlanItem], kind: str = "after") -> str:
        """The ``kind`` (``deps`` or ``after``) stages of a finished ``stage`` whose output is not the
        one it read: ones that are (re)run in this plan, or whose current run is not the one it read
        (each run is identified by its marker's ``finished`` time, so a rerun with the same config
        counts too, and so does one finished only since: the report made before the curve was
        added; an upstream stage redone alone with ``--from X --until X``). Stages outside the plan
        (``--only``) and markers that hold no record of what was read (``after``: before 2026-12-04;
        ``deps``: before 2026-12-07) are not judged. Returns their names, comma-separated ("" when
        none)."""
        read = done.get(kind)
        if read is None:
            return ""
        stale = []
        for a in getattr(stage, kind):
            it = planned.get(a)
            if it is None:
                continue
            if it.action != "skip" or read.get(a) != self._finished(a):
                stale.append(a)
        return ", ".join(stale)

    def _finished(self, name: str) -> float | None:
        """When stage ``name``'s output on disk was finished (its marker's time; identifies the run),
        or None when it is not finished."""
        marker = self.stage_dir(name) / DONE_FILE
        return read_marker(marker).get("finished") if marker.exists() else None

    def run(self, until: str | None = None, from_: str | None = None, dry_run: bool = False,
            preflight: Callable[[list[PlanItem]], None] | None = None, only: str | None = None,
            expect_fingerprint: str | None = None, planned_at: float | None = None) -> list[PlanItem]:
        """Plan, then run every stage that is not skipped. ``preflight(plan)`` runs between the two
        (not on a dry run): a check that raises stops the pipeline before its first stage.

        ``only``: run that one stage (planned with its upstream stages alone); they must be finished
        already. ``expect_fingerprint``: refuse unless the stage's fingerprint is this one (a
        ``run_parallel`` child checks that it computes its parent's). ``planned_at``: when the plan
        this run carries out was made (default: now; a child gets its parent's). Returns the plan, or
        with ``only`` that stage's item alone."""
        self._check_name(only, "--only")
        if only is not None:
            if until is not None and until != only:
                raise PipelineError(f"--only {only!r} and --until {until!r} disagree; give one of them")
            if from_ is not None and from_ != only:
                raise PipelineError(f"--only {only!r} runs one stage: --from may only name it, not {from_!r}")
        items = self.plan(until, from_, only=only)
        if planned_at is None:
            planned_at = items[0].planned_at if items else time.time()
        if only is not None:
            target = items[-1]
            if expect_fingerprint is not None and target.fingerprint != expect_fingerprint:
                raise PipelineError(
                    f"--only {only!r}: the stage's fingerprint is {target.fingerprint} here, but "
                    f"{expect_fingerprint} was expected (its config changed since the parent planned)")
            by_name = {it.stage.name: it for it in items}
            waiting = [d for d in target.stage.deps if by_name[d].action != "skip"]
            if waiting and not dry_run:
                raise PipelineError(
                    f"--only {only!r}: its upstream stage(s) {', '.join(repr(w) for w in waiting)} are not "
                    f"finished under {str(self.out_dir)!r}; run them first (or run the pipeline without --only)")
            items = [target]
        if dry_run:
            return items
        if preflight is not None:
            preflight(items)
        check_writable(self.out_dir)
        for it in items:
            if it.action == "skip":
                log.info("[%s] skip: %s", it.stage.name, it.reason)
                continue
            with stage_lock(self.out_dir, it.stage.name):
                if self._recheck(it, planned_at):
                    self._run_item(it)
        return items

    def _recheck(self, it: PlanItem, planned_at: float) -> bool:
        """Under the stage's lock, the plan's check once more: another process may have run the stage
        since this one planned (a plan made at ``planned_at``). Returns whether to run it; a stage that
        is now finished with the same fingerprint is skipped, one finished or left interrupted with a
        different fingerprint is refused as in :meth:`plan`."""
        name, d = it.stage.name, it.directory
        done, state = d / DONE_FILE, d / STATE_FILE
        if it.action == "redo":
            # `--from` in two processes: the one that got the lock second reuses the first's fresh output
            if done.exists():
                try:
                    rec = read_marker(done)
                except (PipelineError, OSError):  # a damaged marker: what this redo replaces
                    rec = {}
                if rec.get("fingerprint") == it.fingerprint and float(rec.get("finished", 0)) >= planned_at:
                    it.action, it.reason = "skip", "redone by another process after this one planned"
                    log.info("[%s] skip: %s", name, it.reason)
                    return False
            return True
        accepted = (it.fingerprint, *it.older_fingerprints)
        if done.exists():
            old = read_marker(done).get("fingerprint")
            if old not in accepted:
                raise PipelineError(
                    f"stage {name!r}: another process finished {str(d)!r} with a different "
                    f"config (fingerprint {old} there, {it.fingerprint} here); refusing to mix outputs.")
            it.action, it.reason = "skip", "finished by another process"
            log.info("[%s] skip: %s", name, it.reason)
            return False
        if state.exists():
            old = read_marker(state).get("fingerprint")
            if old not in accepted:
                raise PipelineError(
                    f"stage {name!r}: {str(d)!r} holds an interrupted run of a different config, left by "
                    f"another process (fingerprint {old} there, {it.fingerprint} here). Rerun with "
                    f"`--from {name}` to start it over.")
            if it.action == "run":
                it.action, it.reason = "resume", "interrupted in another process; resuming in place"
        return True

    def run_parallel(self, launch: Callable[[PlanItem], Any], jobs: int, until: str | None = None,
                     from_: str | None = None, preflight: Callable[[list[PlanItem]], None] | None = None,
                     poll_s: float = 0.5) -> list[PlanItem]:
        """Like :meth:`run`, but every stage whose upstream stages are finished starts at once in a
        process of its own, up to ``jobs`` at a time, in plan order (on synthetic_gpu: the fixed-length
        branch beside the main chain, ``curve`` beside ``final``).

        ``launch(item)`` starts the stage's process and returns a ``subprocess.Popen``-like object
        (``poll``, ``terminate``, ``wait``, ``pid``); the process runs that stage alone (the CLI's
        ``--only``) under the stage's lock and writes its markers. After a stage fails no new stage
        starts; those already running finish, then the failure is raised. An interrupt stops them all
        (each resumes on the next run)."""
        if jobs < 1:
            raise PipelineError(f"--jobs must be at least 1, got {jobs}")
        items = self.plan(until, from_)
        if preflight is not None:
            preflight(items)
        check_writable(self.out_dir)
        finished = {it.stage.name for it in items if it.action == "skip"}
        for it in items:
            if it.action == "skip":
                log.info("[%s] skip: %s", it.stage.name, it.reason)
        pending = [it for it in items if it.action != "skip"]
        running: dict[str, tuple[PlanItem, Any, float]] = {}
        failed: list[tuple[PlanItem, int]] = []
        old_term = None
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (`timeout`, a scheduler) must stop the stage processes too, through `finally`
            def _term(signum, frame):
                raise SystemExit(128 + signum)

            old_term = signal.signal(signal.SIGTERM, _term)
        try:
            while pending or running:
                if not failed:
                    for it in list(pending):
                        if len(running) >= jobs:
                            break
                        if all(dep in finished for dep in [*it.stage.deps, *it.stage.after]):
                            pending.remove(it)
                            t0 = time.time()  # before the launch: a fast child may finish before it returns
                            proc = launch(it)
                            running[it.stage.name] = (it, proc, t0)
                            log.info("[%s] started (%s) in process %s", it.stage.name, it.action, proc.pid)
                if not running:
                    break  # a failure left the rest pending
                time.sleep(poll_s)
                for name, (it, proc, t0) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[name]
                    if rc != 0:
                        failed.append((it, rc))
                        log.error("[%s] failed (exit code %s) after %.1f s", name, rc, time.time() - t0)
                        continue
                    done = it.directory / DONE_FILE
                    got = read_marker(done).get("fingerprint") if done.exists() else None
                    if got != it.fingerprint:
                        failed.append((it, rc))
                        log.error("[%s] its process exited without finishing the stage: %s", name,
                                  f"no {DONE_FILE}" if got is None else
                                  f"{DONE_FILE} holds fingerprint {got}, the plan {it.fingerprint}")
                        continue
                    finished.add(name)
                    if float(read_marker(done).get("finished", t0)) < t0:  # the child found it done
                        it.action, it.reason = "skip", "finished by another process"
                        log.info("[%s] skip: %s", name, it.reason)
                    else:  # the summary's time is the stage's own; this one adds its process's start-up
                        log.info("[%s] finished in %.1f s (its process's start-up included)", name, time.time() - t0)
        finally:
            for _it, proc, _t0 in running.values():  # an interrupt or an error here: stop the others
                proc.terminate()
            for _it, proc, _t0 in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
        if failed:
            names = ", ".join(f"{it.stage.name!r} (exit code {rc})" for it, rc in failed)
            left = [it.stage.name for it in pending]
            raise PipelineError(f"stage(s) {names} failed; not started: {', '.join(left) or 'none'}. "
                                f"Each stage's log is in {str(self.out_dir / 'logs')!r}; rerun to resume.")
        return items

    def _run_item(self, it: PlanItem) -> None:
        if it.action == "redo":
            stamp = f"{it.directory.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            aside, n = it.directory.with_name(stamp), 1
            while aside.exists():  # two redos within one second
                aside, n = it.directory.with_name(f"{stamp}.{n}"), n + 1
            os.replace(it.directory, aside)
            log.info("[%s] moved the previous output to %s", it.stage.name, aside)
        it.directory.mkdir(parents=True, exist_ok=True)
        if it.action != "resume":
            write_json(it.directory / STATE_FILE, {"fingerprint": it.fingerprint, "started": time.time(),
                                                     "stage": it.stage.name})
        log.info("[%s] %s: %s", it.stage.name, it.action, it.stage.description or it.reason)
        # which run of each `after` stage it reads (that marker's finish time, null where unfinished): a
        # later plan refreshes it when another run of one of them has taken its place. Taken before the
        # stage starts: an upstream stage redone by another process while this one runs is not what it read
        read = {a: self._finished(a) for a in it.stage.after}
        deps = {d: self._finished(d) for d in it.stage.deps}  # likewise the runs of its upstream stages
        t0 = time.time()
        it.stage.run(it.directory)
        write_json(it.directory / DONE_FILE, {"fingerprint": it.fingerprint, "seconds": time.time() - t0,
                                           "finished": time.time(), "after": read, "deps": deps})
        log.info("[%s] finished in %.1f s", it.stage.name, time.time() - t0)


def format_summary(items: list[PlanItem]) -> str:
    """After a run: what each stage did (ran, resumed, redone, skipped) and its time from ``pipeline_done.json``."""
    import json

    w = max((len(it.stage.name) for it in items), default=5)
    lines = [f"{'stage':<{w}}  {'did':<7}  {'seconds':>8}  directory"]
    for it in items:
        did = {"run": "ran", "resume": "resumed", "redo": "redone", "skip": "skipped"}.get(it.action, it.action)
        try:
            secs = f"{json.loads((it.directory / DONE_FILE).read_text())['seconds']:8.1f}"
        except (OSError, ValueError, KeyError):
            secs = f"{'-':>8}"
        lines.append(f"{it.stage.name:<{w}}  {did:<7}  {secs}  {it.directory}")
    return "\n".join(lines)


def format_plan(items: list[PlanItem]) -> str:
    w = max((len(it.stage.name) for it in items), default=5)
    lines = [f"{'stage':<{w}}  action  fingerprint       directory / reason"]
    for it in items:
        lines.append(f"{it.stage.name:<{w}}  {it.action:<6}  {it.fingerprint}  {it.directory}  ({it.reason})")
    return "\n".join(lines)
