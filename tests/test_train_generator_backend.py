"""`arvid train-generator` with an attention backend that cannot train here: a one-line error that
names the backend and what to install, before the run directory, the dataset or the model exist."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _toy_store import write_random_store

from arvid.cli import main
from arvid.config import load_config
from arvid.generator.attention import AttentionBackendUnavailable
from arvid.stages import train_generator
from arvid.stages.train_generator import TrainGeneratorConfig, check_attention_backend
from arvid.tokenizer.base import build_tokenizer

FLASH_MISSING = importlib.util.find_spec("flash_attn") is None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen_backend")
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug")
    tok.save_pretrained(root / "tok")
    write_random_store(root / "store", tok, 8, 2)
    return root


def overrides(root, out, *extra):
    return [f"token_store={root / 'store'}", f"tokenizer={root / 'tok'}", f"out_dir={out}", "preset=debug",
            "max_tokens=400", "trainer.max_steps=1", "trainer.batch_size=1", "trainer.precision=fp32",
            "trainer.device=cpu", "trainer.checkpoint_every=0", "trainer.progress=false", *extra]


def test_cli_unavailable_backend_is_one_line_and_writes_nothing(store, tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(train_generator, "PackedBatchDataset",
                        lambda *a, **k: built.append("dataset") or pytest.fail("the dataset was built"))
    out = tmp_path / "run"
    rc = main(["train-generator", "configs/generator/debug.yaml",
               *overrides(store, out, "gpt.attn_backend=flash_attn", "trainer.precision=bf16")])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("arvid train-generator: error: gpt.attn_backend=flash_attn cannot train here")
    assert "'flash_attn' needs a CUDA GPU (got device cpu)" in lines[0]
    if FLASH_MISSING:
        assert "pip install 'arvid[flash]'" in lines[0]
    assert "Traceback" not in err
    assert not out.exists() and built == []


def test_check_names_precision_and_flex_on_cpu(store, tmp_path, monkeypatch):
    cfg = load_config(TrainGeneratorConfig, None, overrides(store, tmp_path / "a"))
    assert check_attention_backend(cfg) == "sdpa"  # the GPTConfig default 'auto' on CPU
    cfg = load_config(TrainGeneratorConfig, None, overrides(store, tmp_path / "b", "gpt.attn_backend=flex"))
    with pytest.raises(AttentionBackendUnavailable, match="'flex' cannot train on cpu .*no backward pass"):
        check_attention_backend(cfg)
    # On a GPU machine: fp32 training with a half-precision-only kernel is named with its fix.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(TrainGeneratorConfig, None, overrides(
        store, tmp_path / "c", "gpt.attn_backend=torch_varlen", "trainer.device=auto"))
    with pytest.raises(ValueError, match=r"torch_varlen cannot train here \(device cuda, trainer.precision=fp32\)"
                                         r".*needs fp16/bf16 inputs.*precision=bf16"):
        check_attention_backend(cfg)
    if FLASH_MISSING:
        cfg = load_config(TrainGeneratorConfig, None, overrides(
            store, tmp_path / "d", "gpt.attn_backend=flash_attn", "trainer.device=auto", "trainer.precision=bf16"))
        with pytest.raises(AttentionBackendUnavailable, match=r"pip install 'arvid\[flash\]'"):
            train_generator.run(cfg)
        assert not (tmp_path / "d").exists()


def test_cli_non_finite_loss_is_one_line_naming_the_checkpoint(store, tmp_path, capsys, monkeypatch):
    """A run stopped by a non-finite loss says so in one line with the checkpoint to resume from
    (it printed a 30-line traceback before 2026-12-06); ARVID_DEBUG=1 still raises."""
    from pathlib import Path

    from arvid.training.trainer import NonFiniteLossError

    def stop(cfg):
        raise NonFiniteLossError(7, "main", float("nan"), Path("run/checkpoints/step_00000005"))

    monkeypatch.setattr(train_generator, "run", stop)
    monkeypatch.delenv("ARVID_DEBUG", raising=False)
    rc = main(["train-generator", "configs/generator/debug.yaml", *overrides(store, tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("arvid train-generator: error: non-finite loss at step 7: losses['main'] = nan")
    assert "step_00000005" in err and "resume=True" in err
    monkeypatch.setenv("ARVID_DEBUG", "1")
    with pytest.raises(NonFiniteLossError):
        main(["train-generator", "configs/generator/debug.yaml", *overrides(store, tmp_path / "run")])


def test_a_global_batch_of_more_packed_batches_than_the_store_packs_into_is_a_config_error(store, tmp_path):
    """The Trainer's "the dataset has 2 items, fewer than one global batch" counted packed batches
    while the store held 8 videos, and came after the run directory had its config (before 2026-12-08)."""
    from arvid.config import ConfigError

    out = tmp_path / "run"
    cfg = load_config(TrainGeneratorConfig, "configs/generator/debug.yaml",
                      overrides(store, out, "trainer.batch_size=40", "gpt.attn_backend=sdpa"))
    with pytest.raises(ConfigError, match=r"the 8 videos of .* pack into \d+ batches of <= max_tokens=400 positions, "
                                          r"fewer than trainer.batch_size=40"):
        train_generator.run(cfg)
    assert not (out / "config.yaml").exists()


def test_a_captions_file_that_is_not_utf8_is_named(store, tmp_path):
    """A non-UTF-8 captions file failed with the codec's message alone (no file named)."""
    from arvid.generator.text import train_spm

    (tmp_path / "names.txt").write_text("a cat\nthe dog\n")
    train_spm(tmp_path / "names.txt", tmp_path / "spm", 16)
    (tmp_path / "caps.txt").write_bytes(b"a cat\n\xff\xfe dog\n")
    cfg = load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", overrides(
        store, tmp_path / "run", "conditioning=text", f"spm_dir={tmp_path / 'spm'}",
        f"captions={tmp_path / 'caps.txt'}", "gpt.attn_backend=sdpa"))
    with pytest.raises(ValueError, match=r"captions file '.*caps.txt' is not UTF-8 text"):
        train_generator.run(cfg)


@pytest.mark.parametrize("field", ["max_text_len", "num_classes"])
def test_negative_counts_are_config_errors(store, tmp_path, field):
    """max_text_len=-2 crashed in torch.full (a RuntimeError and a traceback) once the text table was built."""
    with pytest.raises(ValueError, match=r"max_text_len and num_classes must be >= 0 .*-2"):
        load_config(TrainGeneratorConfig, None, overrides(store, tmp_path / "run", f"{field}=-2"))


def test_gpt_overrides_of_what_the_data_fixes_are_refused(store, tmp_path):
    """gpt.num_classes (or the vocabulary) overridden against the token store's was taken, and the
    run failed at its first forward with a shape error (review 2026-12-08); an override equal to the
    data's value is harmless."""
    from arvid.config import ConfigError
    from arvid.generator.sequence import SequenceFormat

    tok = build_tokenizer("evatok", preset="debug")
    fmt = SequenceFormat(tok.codebook_size, tok.layout)
    cfg = load_config(TrainGeneratorConfig, None, overrides(store, tmp_path / "a", "gpt.num_classes=5"))
    with pytest.raises(ConfigError, match=r"gpt.num_classes=5 contradicts the data's 2 .*drop the override"):
        train_generator.build_gpt_config(cfg, fmt, 2, None)
    cfg = load_config(TrainGeneratorConfig, None, overrides(store, tmp_path / "b", f"gpt.vocab_size={fmt.vocab_size + 1}"))
    with pytest.raises(ConfigError, match=r"gpt.vocab_size="):
        train_generator.build_gpt_config(cfg, fmt, 2, None)
    cfg = load_config(TrainGeneratorConfig, None, overrides(store, tmp_path / "c", "gpt.num_classes=2"))
    assert train_generator.build_gpt_config(cfg, fmt, 2, None).num_classes == 2
