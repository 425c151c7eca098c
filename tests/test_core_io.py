"""Atomic writes, strict weight loading, and refusal of code-running pickles."""

import os
import pickle

import pytest
import torch

from arvid.io import (
    ArvidIOError,
    atomic_dir,
    atomic_write,
    check_writable,
    load_state_strict,
    load_weights,
    restricted_load,
    save_weights,
    torch_load_safe,
)


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as f:
            f.write("new, half")
            raise RuntimeError("crash")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_replaces_whole(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as t:
        (t / "w").write_text("1")
    with pytest.raises(KeyError):
        with atomic_dir(d) as t:
            (t / "w").write_text("2")
            raise KeyError("boom")
    assert (d / "w").read_text() == "1"
    with atomic_dir(d) as t:
        (t / "w").write_text("3")
    assert (d / "w").read_text() == "3" and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_dir_flushes_its_entries_before_it_is_put_in_place(tmp_path, monkeypatch):
    """The files' data was fsynced but not the temporary directory's entries: after a power cut the
    directory could be in place without a file written into it with a plain open()."""
    import arvid.io as aio

    events = []
    real_fsync_dir, real_replace_dir = aio._fsync_dir, aio.replace_dir
    monkeypatch.setattr(aio, "_fsync_dir", lambda p: (events.append(("fsync", str(p))), real_fsync_dir(p)))
    monkeypatch.setattr(aio, "replace_dir", lambda t, f: (events.append(("replace", str(t))), real_replace_dir(t, f)))
    with atomic_dir(tmp_path / "d") as t:
        with open(t / "config.yaml", "w") as f:
            f.write("x: 1\n")
    assert ("fsync", str(t)) in events and events.index(("fsync", str(t))) < events.index(("replace", str(t)))
    assert (tmp_path / "d" / "config.yaml").read_text() == "x: 1\n"


def test_weights_strict_load_names_keys(tmp_path):
    m = torch.nn.Linear(3, 2)
    save_weights(m.state_dict(), tmp_path / "m.safetensors")
    state = load_weights(tmp_path / "m.safetensors")
    m2 = torch.nn.Linear(3, 2)
    load_state_strict(m2, state, "m.safetensors")
    assert torch.equal(m2.weight, m.weight)
    with pytest.raises(ArvidIOError, match=r"weight: file \(2, 3\) vs model \(4, 3\)"):
        load_state_strict(torch.nn.Linear(3, 4), state, "m.safetensors")
    with pytest.raises(ArvidIOError, match="missing keys"):
        load_state_strict(torch.nn.Linear(3, 2), {"weight": state["weight"]}, "x")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArvidIOError, match="bad.safetensors"):
        load_weights(tmp_path / "bad.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_crafted_pickle_is_refused(tmp_path):
    blob = pickle.dumps({"w": _Evil()})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        restricted_load(blob)
    p = tmp_path / "evil.pt"
    p.write_bytes(blob)
    with pytest.raises(pickle.UnpicklingError):
        torch_load_safe(p)
    import numpy as np

    ok = restricted_load(pickle.dumps({"a": np.arange(4, dtype=np.float32), "b": [1, 2]}))
    assert ok["a"].tolist() == [0, 1, 2, 3] and ok["b"] == [1, 2]


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new") == tmp_path / "new"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere; the read-only case cannot be shown as root")
        with pytest.raises(ArvidIOError, match="not writable"):
            check_writable(ro)
    finally:
        ro.chmod(0o700)
    with pytest.raises(ArvidIOError, match="MiB free"):
        check_writable(tmp_path, need_bytes=1 << 60)


def test_replacing_a_directory_swaps_it_in_one_step(tmp_path, monkeypatch):
    """atomic_dir over an existing directory: two renames left nothing under the final name if
    the process died between them (before 2026-12-07). On Linux the two are swapped in one
    renameat2(RENAME_EXCHANGE); os.replace, the two-step fallback, is not called."""
    import sys

    from arvid import io as aio

    final = tmp_path / "tokenizer"
    with aio.atomic_dir(final) as d:
        (d / "w.txt").write_text("old")
    if aio._renameat2() is None:
        pytest.skip("no renameat2 here (not Linux or an old libc): the fallback is the two renames")
    assert sys.platform.startswith("linux")

    def killed(*a, **k):
        raise KeyboardInterrupt  # a two-step replace would have died between its renames

    monkeypatch.setattr(aio.os, "replace", killed)
    with aio.atomic_dir(final) as d:
        (d / "w.txt").write_text("new")
    assert (final / "w.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]
    monkeypatch.undo()
    # where the system cannot swap: the two renames, same result
    monkeypatch.setattr(aio, "_exchange", lambda a, b: False)
    with aio.atomic_dir(final) as d:
        (d / "w.txt").write_text("newer")
    assert (final / "w.txt").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]
