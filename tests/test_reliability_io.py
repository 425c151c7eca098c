"""Unwritable outputs and a full disk: a clear error before work is lost, never a half-written file.

Tests run as root, so ``chmod`` does not block writes: an unwritable directory is a path under a
regular file (``file/sub``: NotADirectoryError); a full disk is an ``ENOSPC`` raised from the
write / fsync calls, or a mocked ``shutil.disk_usage`` for the free-space check.
"""

from __future__ import annotations

import errno
import json
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from arvid import io as aio
from arvid.io import ArvidIOError


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture()
def blocked(tmp_path) -> Path:
    """A path whose parent is a regular file: nothing can be created under it (even as root)."""
    f = tmp_path / "a_file"
    f.write_text("x")
    return f / "sub"


def test_check_writable_names_the_path(blocked, tmp_path, monkeypatch):
    with pytest.raises(ArvidIOError, match=r"'.*a_file/sub' is not writable"):
        aio.check_writable(blocked)
    # free space: fail early when the file system has less than the step needs
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(aio.shutil, "disk_usage", lambda p: Usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    with pytest.raises(ArvidIOError, match=r"5\.0 MiB free, but this step needs about 100\.0 MiB"):
        aio.check_writable(tmp_path / "ok", need_bytes=100 << 20)
    assert aio.check_writable(tmp_path / "ok", need_bytes=1 << 20) == tmp_path / "ok"
    # the probe file is gone: a writable check leaves nothing behind
    assert list((tmp_path / "ok").iterdir()) == []


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    p = tmp_path / "result.json"
    aio.write_json(p, {"v": 1})
    # disk full while writing: the error names the file, the old content stays, no temporary remains
    with pytest.raises(ArvidIOError, match=r"could not write '.*result\.json': No space left"):
        with aio.atomic_write(p, "w") as f:
            f.write('{"v": 2, "half')
            _enospc()
    assert json.loads(p.read_text()) == {"v": 1}
    monkeypatch.setattr(aio.os, "fsync", _enospc)  # disk full at the flush
    with pytest.raises(ArvidIOError, match="No space left"):
        aio.save_weights({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    with pytest.raises(ArvidIOError, match="result.json"):
        aio.write_json(p, {"v": 3})
    assert json.loads(p.read_text()) == {"v": 1}
    assert not (tmp_path / "w.safetensors").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["result.json"]
    # any other exception (e.g. KeyboardInterrupt) also leaves the old file and no temporary
    monkeypatch.undo()
    with pytest.raises(KeyboardInterrupt):
        with aio.atomic_write(p, "w") as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert json.loads(p.read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from arvid.training.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

    def save(step: int) -> Path:
        return save_checkpoint(tmp_path / f"checkpoints/step_{step:08d}", model_state={"w": torch.full((4,), step * 1.0)},
                               optimizer_states={"main": {"state": {}, "param_groups": []}}, rng_states=[{}],
                               trainer_state={"step": step}, config={"max_steps": 9})

    save(1)
    calls = {"n": 0}
    real_fsync = aio.os.fsync

    def fsync_then_full(fd):
        # the disk fills during the second checkpoint, after some of its files were written
        calls["n"] += 1
        if calls["n"] > 2:
            _enospc()
        real_fsync(fd)

    monkeypatch.setattr(aio.os, "fsync", fsync_then_full)
    with pytest.raises(ArvidIOError, match="No space left"):
        save(2)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    ckpt = latest_checkpoint(tmp_path)
    assert torch.equal(aio.load_weights(ckpt / "model.safetensors")["w"], torch.ones(4))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # no temporary left


def _stage_configs(blocked: Path, tmp_path: Path):
    """Every stage's config with its output under ``blocked`` (inputs need not exist: the check comes first)."""
    from arvid.data.datasets import DataConfig
    from arvid.stages import curate, sample, tokenize, train_generator, train_tokenizer

    data = DataConfig(source="synthetic", frames=8, size=16, num_videos=4, num_val_videos=2)
    tok = tmp_path / "no_tokenizer"
    return {
        "train-tokenizer": (train_tokenizer.run, train_tokenizer.TrainTokenizerConfig(data=data, out_dir=str(blocked))),
        "curate": (curate.run, curate.CurateConfig(data=data, tokenizer=str(tok), out_dir=str(blocked))),
        "tokenize": (tokenize.run, tokenize.TokenizeConfig(data=data, tokenizer=str(tok), out_dir=str(blocked))),
        "train-generator": (train_generator.run, train_generator.TrainGeneratorConfig(
            token_store=str(tmp_path / "no_store"), tokenizer=str(tok), out_dir=str(blocked))),
        "sample": (sample.run, sample.SampleConfig(generator=str(tmp_path / "no_gpt"), tokenizer=str(tok),
                                                   out=str(blocked), device="cpu")),
    }


def test_every_stage_refuses_an_unwritable_out_dir_before_working(blocked, tmp_path):
    for name, (run, cfg) in _stage_configs(blocked, tmp_path).items():
        t0 = time.perf_counter()
        with pytest.raises(ArvidIOError, match=r"a_file/sub' is not writable") as e:
            run(cfg)
        # before any work: no model was trained or loaded (the inputs do not even exist)
        assert time.perf_counter() - t0 < 20, name
        assert "a_file' is a file, not a folder" in str(e.value), (name, str(e.value))


def test_cli_reports_an_unwritable_out_dir_in_one_line(blocked, tmp_path, capsys):
    from arvid.cli import main

    cfg = tmp_path / "tok.yaml"
    cfg.write_text(f"out_dir: {blocked}\ndata: {{frames: 8, size: 16}}\n")
    rc = main(["train-tokenizer", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "arvid train-tokenizer: error:" in err and "a_file/sub" in err and "Traceback" not in err
