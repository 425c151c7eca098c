"""`arvid train-generator` end to end on a tiny token store; `arvid text train-spm`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from _toy_store import write_random_store

from arvid.config import ConfigError, load_config
from arvid.data.token_store import TokenStoreError
from arvid.generator import GPT, Conditioning
from arvid.generator.text import TextEncoder, train_spm
from arvid.stages import text_cmd, train_generator
from arvid.stages.train_generator import TrainGeneratorConfig
from arvid.tokenizer.base import build_tokenizer

CLASSES = ["Apply_Eye_Makeup", "Band Marching", "playing guitar", "Baby Crawling"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug")
    tok.save_pretrained(root / "tok")
    write_random_store(root / "store", tok, 24, 4)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root, tok


def parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    train_generator.add_arguments(sub)
    text_cmd.add_arguments(sub)
    return parser.parse_args(argv)


def overrides(root, out, *extra):
    return [f"token_store={root / 'store'}", f"tokenizer={root / 'tok'}", f"out_dir={out}", "preset=debug",
            "max_tokens=400", "trainer.max_steps=3", "trainer.batch_size=2", "trainer.precision=fp32",
            "trainer.device=cpu", "trainer.checkpoint_every=0", "trainer.log_every=1", "trainer.progress=false",
            "gpt.attn_backend=sdpa", *extra]


def test_train_generator_class_conditional_cli(setup, tmp_path):
    root, tok = setup
    out = tmp_path / "run"
    args = parse(["train-generator", "configs/generator/debug.yaml", *overrides(root, out)])
    assert args.func(args) == 0
    gpt = GPT.from_pretrained(out / "gpt")
    assert gpt.config.num_classes == 4 and gpt.config.vocab_size == tok.codebook_size + 4
    assert gpt.config.max_seq_len == 1 + tok.layout.num_blocks + tok.layout.max_tokens
    meta = (out / "gpt" / "config.yaml").read_text()
    assert tok.fingerprint() in meta
    done = json.loads((out / "done").read_text())
    assert done["step"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["tokens_per_s"] > 0 and "mfu" in records[-1] and records[-1]["mfu"] > 0
    # training moved the weights away from the zero-init head
    assert gpt.head.weight.abs().sum() > 0
    logits = gpt.forward_dense(Conditioning(torch.tensor([1])), torch.zeros(1, 3, dtype=torch.long))
    assert torch.isfinite(logits).all()
    # a second run sees the done marker and leaves the result alone
    before = (out / "gpt" / "model.safetensors").stat().st_mtime_ns
    train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", overrides(root, out)))
    assert (out / "gpt" / "model.safetensors").stat().st_mtime_ns == before
    # ... nor when only execution settings differ (log interval, loader workers)
    train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml",
                                    overrides(root, out, "trainer.log_every=5", "trainer.num_workers=1")))
    assert (out / "gpt" / "model.safetensors").stat().st_mtime_ns == before
    # ... but not for another tokenizer's store (consistent with it): refused, naming both
    torch.manual_seed(2)
    other = build_tokenizer("evatok", preset="debug")
    other.save_pretrained(tmp_path / "other_tok")
    write_random_store(tmp_path / "other_store", other, 8, 4)
    with pytest.raises(ConfigError, match=f"holds a finished GPT for tokenizer '{tok.fingerprint()}'.*other_tok"):
        train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", overrides(
            root, out, f"tokenizer={tmp_path / 'other_tok'}", f"token_store={tmp_path / 'other_store'}")))
    assert (out / "gpt" / "model.safetensors").stat().st_mtime_ns == before
    # ... another config (not only more steps) is refused, naming what changed: resuming would
    # train nothing and keep the old weights under the new config
    with pytest.raises(ConfigError, match=r"finished run of another config \(gpt.class_dropout, trainer.lr changed"):
        train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", overrides(
            root, out, "trainer.lr=0.05", "gpt.class_dropout=0.3")))
    assert (out / "gpt" / "model.safetensors").stat().st_mtime_ns == before
    # ... and a raised max_steps continues the run
    train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml",
                                    overrides(root, out, "trainer.max_steps=4")))
    assert json.loads((out / "done").read_text())["step"] == 4


def test_an_interrupted_run_resumes_only_with_its_config_and_tokenizer(setup, tmp_path):
    """Checkpoints without a done marker (a run stopped after its last checkpoint) were resumed
    whatever the config or tokenizer, and the GPT saved as the new tokenizer's (before 2026-12-07)."""
    import shutil

    root, tok = setup
    out = tmp_path / "run"
    shutil.copytree(root / "tok", tmp_path / "tok")
    shutil.copytree(root / "store", tmp_path / "store")
    base = overrides(tmp_path, out, "trainer.checkpoint_every=1", "trainer.max_steps=2")
    train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", base))
    (out / "done").unlink()
    shutil.rmtree(out / "gpt")
    # another tokenizer (and its tokens) under the same paths: the config is the same
    for name in ("tok", "store"):
        shutil.move(tmp_path / name, tmp_path / f"{name}_a")
    torch.manual_seed(2)
    other = build_tokenizer("evatok", preset="debug")
    other.save_pretrained(tmp_path / "tok")
    write_random_store(tmp_path / "store", other, 8, 4)
    with pytest.raises(ConfigError, match=f"trained on the tokens of tokenizer fingerprint '{tok.fingerprint()}'"):
        train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", base))
    for name in ("tok", "store"):
        shutil.rmtree(tmp_path / name)
        shutil.move(tmp_path / f"{name}_a", tmp_path / name)
    with pytest.raises(ConfigError, match=r"checkpoints in .* another config \(trainer.lr changed"):
        train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", base + ["trainer.lr=0.05"]))
    assert not (out / "gpt").exists()
    train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml", base + [
        "trainer.max_steps=3", "trainer.log_every=2", "trainer.grad_accum=2"]))
    # more steps, another execution setting and another cut of the global batch continue it
    assert json.loads((out / "done").read_text())["step"] == 3
    assert tok.fingerprint() in (out / "gpt" / "config.yaml").read_text()


def test_peak_tflops_zero_measures_the_matmul_peak_and_takes_mfu_against_it(setup, tmp_path, caplog):
    root, _ = setup
    out = tmp_path / "peak"
    with caplog.at_level("INFO", logger="arvid"):
        train_generator.run(load_config(TrainGeneratorConfig, "configs/generator/debug.yaml",
                                        overrides(root, out, "peak_tflops=0", "trainer.max_steps=2")))
    done = json.loads((out / "done").read_text())
    # the run ends with a line giving its steps and last loss (it printed nothing after the start)
    assert f"train-generator: 2 steps, loss {done['losses']['main']:.4f}" in caplog.text
    assert done["peak_measured"] is True and 0 < done["peak_tflops"] < 100  # a CPU's float32 matmul rate
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "mfu" in r]
    assert records
    for r in records:  # MFU is the model's FLOP rate over the measured peak
        assert r["mfu"] == pytest.approx(r["tflops"] / done["peak_tflops"], rel=1e-6)
    with pytest.raises(ValueError, match="peak_tflops >= 0"):
        TrainGeneratorConfig(token_store="s", tokenizer="t", peak_tflops=-1.0)


def test_measure_matmul_peak_counts_2n3_flops_per_product(monkeypatch):
    import arvid.training.profiling as prof

    clock = iter(float(i) for i in range(100))  # every perf_counter call advances one second
    monkeypatch.setattr(prof.time, "perf_counter", lambda: next(clock))
    # each timed run is 2 reads of the clock 1 s apart around 4 products: 0.25 s per product
    assert prof.measure_matmul_peak("cpu", torch.float32, n=64, reps=4) == pytest.approx(2 * 64**3 / 0.25 / 1e12)


def test_train_generator_frames_and_text(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "frames"
    cfg = load_config(TrainGeneratorConfig, None, overrides(root, out, "conditioning=frames", "context_blocks=2"))
    train_generator.run(cfg)
    gpt = GPT.from_pretrained(out / "gpt")
    assert gpt.config.num_classes == 0 and gpt.num_prefix() == 1
    args = parse(["text", "train-spm", "--input", str(root / "classes.txt"), "--out", str(tmp_path / "spm"),
                  "--vocab-size", "40"])
    assert args.func(args) == 0
    out = tmp_path / "text"
    cfg = load_config(TrainGeneratorConfig, None, overrides(
        root, out, "conditioning=text", f"spm_dir={tmp_path / 'spm'}", f"captions={root / 'classes.txt'}"))
    train_generator.run(cfg)
    gpt = GPT.from_pretrained(out / "gpt")
    enc = TextEncoder(tmp_path / "spm")
    assert gpt.config.text_vocab_size == enc.vocab_size and gpt.config.max_text_len == enc.max_len
    from arvid.sampling.videos import training_record

    assert training_record(out / "gpt")["spm_fingerprint"] == enc.fingerprint  # sampling checks the model by it
    ids = enc.encode(["Band Marching", ""])
    assert (ids[1] == enc.pad_id).all() and (ids[0] != enc.pad_id).any()
    assert enc.decode(ids)[0] == "Band Marching"
    assert gpt.forward_dense(Conditioning(text_ids=ids), torch.zeros(2, 2, dtype=torch.long)).shape[1] == enc.max_len + 2
    # a store whose videos have no label: said so, not blamed on the captions file
    from arvid.data.token_store import TokenStore, TokenStoreWriter

    src = TokenStore(root / "store")
    with TokenStoreWriter(tmp_path / "unlabeled", src.fingerprint, src.layout, src.codebook_size) as w:
        w.append(src.get_batch(range(len(src))))  # labels None: -1
    with pytest.raises(ConfigError, match="conditioning 'text' but token store .*unlabeled' has videos without a label"):
        train_generator.run(load_config(TrainGeneratorConfig, None, overrides(
            root, tmp_path / "t2", "conditioning=text", f"spm_dir={tmp_path / 'spm'}",
            f"captions={root / 'classes.txt'}", f"token_store={tmp_path / 'unlabeled'}")))


def test_fingerprint_mismatch_and_config_errors(setup, tmp_path):
    root, _ = setup
    torch.manual_seed(1)
    other = build_tokenizer("evatok", preset="debug")
    other.save_pretrained(tmp_path / "other")
    cfg = load_config(TrainGeneratorConfig, None,
                      overrides(root, tmp_path / "x", f"tokenizer={tmp_path / 'other'}"))
    with pytest.raises(TokenStoreError, match="fingerprint"):
        train_generator.run(cfg)
    with pytest.raises(ConfigError, match="context_blocks"):
        load_config(TrainGeneratorConfig, None, ["conditioning=frames"])
    with pytest.raises(ConfigError, match="spm_dir"):
        load_config(TrainGeneratorConfig, None, ["conditioning=text"])
    with pytest.raises(ConfigError, match="unknown key `gpt_preset`"):
        load_config(TrainGeneratorConfig, None, ["gpt_preset=B"])
    # the layout's largest candidates need more positions than the GPT is given: refused before training
    short = load_config(TrainGeneratorConfig, None, overrides(root, tmp_path / "y", "gpt.max_seq_len=50"))
    with pytest.raises(ConfigError, match=r"gpt.max_seq_len=50 is shorter than .* 133 = 1 prefix slot\(s\) \+ 132"):
        train_generator.run(short)
    assert not (tmp_path / "y" / "checkpoints").exists()


def test_a_batch_the_processes_cannot_split_is_refused_before_the_run_directory_is_written(setup, tmp_path,
                                                                                              monkeypatch):
    """Under 2 processes, trainer.batch_size=1 failed inside the Trainer after config.yaml and run.json
    had been written (walkthrough review, 2026-12-07)."""
    root, _ = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(TrainGeneratorConfig, None, overrides(root, tmp_path / "z", "trainer.batch_size=1"))
    with pytest.raises(ConfigError, match=r"trainer.batch_size=1 must be divisible by .* = 1 \* 2"):
        train_generator.run(cfg)
    assert not (tmp_path / "z" / "config.yaml").exists() and not (tmp_path / "z" / "run.json").exists()


def test_spm_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_spm(tmp_path / "missing.txt", tmp_path / "spm", 20)
    with pytest.raises(FileNotFoundError, match="train-spm"):
        TextEncoder(tmp_path / "nothing")
    # the model folder is replaced as a whole: a folder holding other files (an experiment) is
    # refused and kept (before 2026-12-07 it was emptied), and so is a file
    (tmp_path / "caps.txt").write_text("band marching\nplaying guitar\n" * 10)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files \\(precious.txt\\)"):
        train_spm(tmp_path / "caps.txt", tmp_path / "exp", 20)
    assert (tmp_path / "exp" / "precious.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        train_spm(tmp_path / "caps.txt", tmp_path / "afile", 20)
    train_spm(tmp_path / "caps.txt", tmp_path / "spm", 20)
    train_spm(tmp_path / "caps.txt", tmp_path / "spm", 21)  # its own folder: replaced
    assert sorted(p.name for p in (tmp_path / "spm").iterdir()) == ["spm.model", "spm.vocab", "text.yaml"]


def test_a_blank_caption_line_is_its_labels_empty_text(tmp_path):
    """captions: line i is label i; a blank line gives label i the empty (all-pad) text and leaves
    the later labels on their own lines (it used to be skipped, shifting them by one)."""
    from arvid.stages.train_generator import _text_table

    names = ["apply eye makeup", "", "basketball dunk", "playing guitar"]
    (tmp_path / "caps.txt").write_text("\n".join(names) + "\n\n")  # and a trailing blank line
    (tmp_path / "corpus.txt").write_text("\n".join(n for n in names if n) * 20 + "\n")
    train_spm(tmp_path / "corpus.txt", tmp_path / "spm", 40)
    cfg = TrainGeneratorConfig(token_store="x", tokenizer="y", conditioning="text", spm_dir=str(tmp_path / "spm"),
                               captions=str(tmp_path / "caps.txt"))
    table, _, _, pad = _text_table(cfg)
    enc = TextEncoder(tmp_path / "spm")
    assert table.shape[0] == 4
    assert [enc.decode(table[i:i + 1])[0] for i in range(4)] == names
    assert bool((table[1] == pad).all())


def test_generator_host_metrics_count_real_positions_not_padding():
    """``GeneratorTask.host_metrics`` (read on the host batch, before the device): ``tokens`` are the
    real sequences' positions, prefix slots included, not ``pad_batches`` padding; ``loss_tokens``
    the targets; ``flops`` the model's training FLOPs of the real sequences and ``peak_seconds``
    those over the peak rate (the Trainer turns both into TFLOP/s and MFU over its log window)."""
    from arvid.generator.packing import pack_sequences
    from arvid.stages.train_generator import GeneratorTask

    gpt = GPT.from_preset("debug", vocab_size=40, max_seq_len=64, num_classes=3)
    task = GeneratorTask(gpt, peak_tflops=2.0)
    seqs = [torch.arange(1, 6), torch.arange(1, 10)]  # 5 and 9 tokens
    batch = pack_sequences(seqs, num_prefix=1, class_ids=torch.tensor([0, 2]), pad_to=40)
    assert batch.num_tokens == 40
    m = task.host_metrics(batch)
    flops = gpt.training_flops(torch.tensor([5, 9]))
    assert m == {"tokens": 14.0, "loss_tokens": 14.0, "flops": flops, "peak_seconds": flops / 2e12}
    # nanoGPT's count (attention as the full square) adds 6 * layers * dim * sum L^2: debug 2 x 64
    assert gpt.training_flops(torch.tensor([5, 9]), full_attention=True) - flops == 6.0 * 2 * 64 * (25 + 81)
