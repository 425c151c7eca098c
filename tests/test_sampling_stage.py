"""`arvid sample` end to end on tiny saved models: outputs, determinism, context and budget modes."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from arvid.generator.gpt import GPT
from arvid.generator.sequence import SequenceFormat
from arvid.stages import sample as stage
from arvid.tokenizer.base import build_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_stage")
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", {"candidates": (4, 8)}, preset="debug").eval()
    tok.save_pretrained(root / "tok")
    fmt = SequenceFormat(tok.codebook_size, tok.layout)
    gpt = GPT.from_preset("debug", vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 1, num_classes=3)
    torch.nn.init.normal_(gpt.head.weight, std=0.3, generator=torch.Generator().manual_seed(2))
    gpt.save_pretrained(root / "gpt")
    return root


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    stage.add_arguments(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def load(out):
    with np.load(out / "tokens.npz") as z:
        return {k: z[k] for k in z}


def test_class_sampling_writes_everything_and_reproduces(dirs):
    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "0,2",
            "--per-class", "3", "--batch-size", "4", "--cfg-scale", "2.0", "--top-k", "100", "--seed", "5"]
    assert cli(base + ["--out", str(dirs / "a")]) == 0
    out = dirs / "a"
    for name in ["config.yaml", "grid.mp4", "grid.gif", "tokens.npz", "sample_stats.json", "done"]:
        assert (out / name).is_file(), name
    assert not (out / "parts").exists()  # the processes' parts are merged into tokens.npz, then removed
    z = load(out)
    assert z["classes"].tolist() == [0, 0, 0, 2, 2, 2]
    tok = load_tokenizer(dirs / "tok")
    fmt = SequenceFormat(tok.codebook_size, tok.layout)
    # Every sequence is well formed and agrees with codes + block lengths.
    seqs = np.split(z["sequences"], np.cumsum(z["lengths"])[:-1])
    for s, bl in zip(seqs, z["block_lengths"]):
        codes, got = fmt.parse_one(torch.from_numpy(s))
        assert got.tolist() == bl.tolist()
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["samples"] == 6 and stats["samples_per_s"] > 0
    # not every video was decoded: the decode time is the grid's per video, scaled (said so); before
    # 2026-12-07 the grid batches' decode time was divided over every sample
    assert stats["seconds_decode_estimated"] is True and stats["seconds_decode"] > 0
    assert abs(stats["tokens_per_video"]["mean"] - float(z["block_lengths"].sum(1).mean())) < 1e-4
    assert stats["sampler"]["cfg_scale"] == 2.0 and stats["execution"] == "eager"
    # Same seed, same tokens; the config file round-trips through --config.
    assert cli(["sample", "--config", str(out / "config.yaml"), "--out", str(dirs / "b")]) == 0
    zb = load(dirs / "b")
    assert np.array_equal(z["sequences"], zb["sequences"])
    # Another seed, other samples.
    assert cli(base[:-1] + ["6", "--out", str(dirs / "c"), "grid_format=none"]) == 0
    zc = load(dirs / "c")
    assert not (z["sequences"].shape == zc["sequences"].shape and np.array_equal(z["sequences"], zc["sequences"]))
    assert not (dirs / "c" / "grid.mp4").exists()


def test_context_and_exact_budget(dirs):
    from arvid.data.writer import write_video

    g = torch.Generator().manual_seed(0)
    write_video(torch.rand(3, 6, 40, 48, generator=g) * 2 - 1, dirs / "ctx.mp4", fps=8)
    out = dirs / "ctx"
    assert cli(["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "1",
                "--per-class", "3", "--batch-size", "2", "--context", str(dirs / "ctx.mp4"), "--context-frames", "3",
                "--budget", "26", "--budget-mode", "exact", "--out", str(out), "context_count=4"]) == 0
    z = load(out)
    bl = z["block_lengths"]
    assert bl[:, :2].tolist() == [[4, 4]] * 3  # the fixed context assignment
    assert int(bl.sum(1).max()) <= 26  # the cap
    # The context codes are those of the context video, identical in every sample.
    codes = np.split(z["codes"], np.cumsum(bl.sum(1))[:-1])
    assert all(np.array_equal(c[:8], codes[0][:8]) for c in codes)
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["budget"]["mode"] == "exact" and stats["budget"]["cap"] == 26


def test_mean_budget_mode_calibrates_beta(dirs):
    out = dirs / "mean"
    assert cli(["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"),
                "--per-class", "8", "--batch-size", "8", "--budget", "22", "--out", str(out),
                "grid_format=none", "calibration_batches=2"]) == 0
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["budget"]["beta"] < 0  # fewer tokens than the free model's ~24
    assert abs(stats["budget"]["calibration_mean"] - 22) / 22 <= 0.05
    assert stats["sampler"]["budget_bias"] == stats["budget"]["beta"]
    assert load(out)["classes"].tolist() == sorted([0, 1, 2] * 8)


def test_bad_inputs_are_named(dirs):
    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--out", str(dirs / "x")]
    from arvid.config import ConfigError

    with pytest.raises(ConfigError, match="outside"):
        cli(base + ["--classes", "0,7"])
    with pytest.raises(ConfigError, match="no text conditioning"):
        cli(base + ["--text", "a cat"])
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        cli(base + ["--context", str(dirs / "missing.mp4")])
    with pytest.raises(ConfigError, match="classes"):
        cli(base + ["--classes", "0,a"])


def test_text_prompts(dirs, tmp_path):
    from arvid.generator.text import TextEncoder, train_spm

    (tmp_path / "captions.txt").write_text("a red ball bounces\na blue square spins\na green circle zooms\n" * 20)
    spm = train_spm(tmp_path / "captions.txt", tmp_path / "spm", vocab_size=40)
    enc = TextEncoder(spm)
    tok = load_tokenizer(dirs / "tok")
    fmt = SequenceFormat(tok.codebook_size, tok.layout)
    gpt = GPT.from_preset("debug", vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 6,
                          text_vocab_size=enc.vocab_size, max_text_len=5, text_pad_id=enc.pad_id)
    gpt.save_pretrained(tmp_path / "gpt")
    out = tmp_path / "out"
    assert cli(["sample", "--generator", str(tmp_path / "gpt"), "--tokenizer", str(dirs / "tok"), "--spm", str(spm),
                "--text", "a red ball bounces", "--text", "a blue square", "--per-class", "2", "--batch-size", "4",
                "--cfg-scale", "2.0", "--out", str(out), "grid_format=none"]) == 0
    z = load(out)
    assert z["prompt_index"].tolist() == [0, 0, 1, 1] and z["classes"].tolist() == [-1] * 4
    assert z["block_lengths"].shape == (4, 4)
    # without --spm: the spm_dir train-generator recorded beside the GPT (not <generator>/spm)
    gpt.save_pretrained(tmp_path / "gpt2", extra={"conditioning": "text", "spm_dir": str(spm)})
    args = ["sample", "--generator", str(tmp_path / "gpt2"), "--tokenizer", str(dirs / "tok"), "--text", "a red ball",
            "--per-class", "2", "--batch-size", "4", "grid_format=none"]
    assert cli(args + ["--out", str(tmp_path / "out2")]) == 0
    assert load(tmp_path / "out2")["prompt_index"].tolist() == [0, 0]
    gpt.save_pretrained(tmp_path / "gpt2", extra={"conditioning": "text", "spm_dir": str(tmp_path / "gone")})
    from arvid.config import ConfigError

    with pytest.raises(ConfigError, match="gone.*does not exist here: set --spm"):
        cli(args + ["--out", str(tmp_path / "out3")])
    import shutil

    shutil.copytree(spm, tmp_path / "gpt2" / "spm")  # a copy beside the GPT is taken instead
    assert cli(args + ["--out", str(tmp_path / "out3")]) == 0
    # the recorded model's fingerprint: another model in the recorded folder (retrained there) is refused
    gpt.save_pretrained(tmp_path / "gpt2", extra={"conditioning": "text", "spm_dir": str(spm),
                                                  "spm_fingerprint": enc.fingerprint})
    assert cli(args + ["--out", str(tmp_path / "out5")]) == 0
    (tmp_path / "other.txt").write_text("zebras gallop over the plain\nfish swim in the sea\n" * 20)
    train_spm(tmp_path / "other.txt", tmp_path / "spm_other", vocab_size=40)
    with pytest.raises(ConfigError, match="is not the one generator .* was trained with"):
        cli(args + ["--spm", str(tmp_path / "spm_other"), "--out", str(tmp_path / "out6")])
    # a SentencePiece model with more pieces than the GPT's text embedding is refused, not an index error
    small = GPT.from_preset("debug", vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 6,
                            text_vocab_size=enc.vocab_size - 5, max_text_len=5, text_pad_id=enc.pad_id)
    small.save_pretrained(tmp_path / "gpt3")
    with pytest.raises(ConfigError, match=f"{enc.vocab_size} pieces.*{enc.vocab_size - 5}"):
        cli(["sample", "--generator", str(tmp_path / "gpt3"), "--tokenizer", str(dirs / "tok"), "--spm", str(spm),
             "--text", "a red ball", "--out", str(tmp_path / "out4")])


def test_frame_prediction_gpt_needs_its_context_blocks(dirs, tmp_path):
    from arvid.config import ConfigError
    from arvid.data.writer import write_video

    gpt = GPT.from_pretrained(dirs / "gpt")
    gpt.save_pretrained(tmp_path / "fp", extra={"conditioning": "frames", "context_blocks": 2})
    write_video(torch.zeros(3, 6, 32, 32), tmp_path / "ctx.mp4", fps=8)
    base = ["sample", "--generator", str(tmp_path / "fp"), "--tokenizer", str(dirs / "tok"), "--classes", "0",
            "--per-class", "2", "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="trained for frame prediction.*give --context"):
        cli(base)
    with pytest.raises(ConfigError, match="context_frames=1 fill 1 block.*context_blocks=2"):
        cli(base + ["--context", str(tmp_path / "ctx.mp4"), "--context-frames", "1"])
    assert cli(base + ["--context", str(tmp_path / "ctx.mp4"), "--context-frames", "3", "context_count=4",
                       "grid_format=none"]) == 0
    assert load(tmp_path / "o")["block_lengths"][:, :2].tolist() == [[4, 4]] * 2


def test_fixed_assignment_and_allowed_counts(dirs):
    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "0,1,2",
            "--per-class", "3", "--batch-size", "4"]
    assert cli(base + ["--out", str(dirs / "free"), "grid_format=none"]) == 0
    free = load(dirs / "free")["block_lengths"]
    assert len({tuple(r) for r in free.tolist()}) > 1  # free counts vary
    assert not ((free[:, 0] == 4).all() and (free[:, 2] == 8).all())  # so the allowed sets below bind
    out = dirs / "fixed"
    assert cli(base + ["--fixed-assignment", "8,4,4,8", "--out", str(out), "grid_format=none"]) == 0
    z = load(out)
    assert z["block_lengths"].tolist() == [[8, 4, 4, 8]] * 9
    assert z["lengths"].tolist() == [24 + 4] * 9  # codes + one length token per block
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["constraints"] == {"fixed_assignment": [8, 4, 4, 8], "allowed_counts": None}
    # one --allowed-counts per block
    out = dirs / "allowed"
    assert cli(base + ["--allowed-counts", "4", "--allowed-counts", "4,8", "--allowed-counts", "8",
                       "--allowed-counts", "4,8", "--out", str(out), "grid_format=none"]) == 0
    bl = load(out)["block_lengths"]
    assert (bl[:, 0] == 4).all() and (bl[:, 2] == 8).all()
    # one set for every block, as a YAML override; the config round-trips
    out = dirs / "allowed8"
    assert cli(base + ["--out", str(out), "grid_format=none", "allowed_counts=[8]"]) == 0
    assert load(out)["block_lengths"].tolist() == [[8, 8, 8, 8]] * 9
    assert cli(["sample", "--config", str(out / "config.yaml"), "--out", str(dirs / "allowed8b")]) == 0
    assert load(dirs / "allowed8b")["block_lengths"].tolist() == [[8, 8, 8, 8]] * 9


def test_fixed_assignment_with_context(dirs):
    from arvid.config import ConfigError
    from arvid.data.writer import write_video

    write_video(torch.rand(3, 6, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1, dirs / "ctx2.mp4", fps=8)
    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "1",
            "--per-class", "3", "--batch-size", "2", "--context", str(dirs / "ctx2.mp4"), "--context-frames", "3"]
    out = dirs / "ctx_fixed"
    assert cli(base + ["--fixed-assignment", "8,4,8,4", "--out", str(out), "grid_format=none"]) == 0  # context encoded at [8, 4]
    z = load(out)
    assert z["block_lengths"].tolist() == [[8, 4, 8, 4]] * 3
    codes = np.split(z["codes"], np.cumsum(z["block_lengths"].sum(1))[:-1])
    assert all(np.array_equal(c[:12], codes[0][:12]) for c in codes)
    with pytest.raises(ConfigError, match=r"encoded with block counts \[4, 4\] \(context_count=4\).*block 0.*"
                                          r"allowed counts of block 0: \[8\]"):
        cli(base + ["--fixed-assignment", "8,4,8,4", "--out", str(dirs / "ctx_bad"), "context_count=4"])


def test_bad_constraints_are_named(dirs, capsys):
    from arvid.cli import main
    from arvid.config import ConfigError

    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--out", str(dirs / "bad")]
    layout = r"has 4 blocks with candidate counts \[4, 8\]"
    with pytest.raises(ConfigError, match=r"fixed_assignment \[8, 4, 4, 16\]: token counts \[16\] are not "
                                          r"candidates.*" + layout):
        cli(base + ["--fixed-assignment", "8,4,4,16"])
    with pytest.raises(ConfigError, match=r"fixed_assignment \[8, 4\] gives 2 counts; the .*" + layout):
        cli(base + ["--fixed-assignment", "8,4"])
    with pytest.raises(ConfigError, match=r"allowed_counts: 5 \(block 0\) is not a candidate count.*" + layout):
        cli(base + ["--allowed-counts", "5"])
    with pytest.raises(ConfigError, match=r"one set of counts per block \(4\), got 2"):
        cli(base + ["--allowed-counts", "4", "--allowed-counts", "8"])
    with pytest.raises(ConfigError, match="no allowed token count for sample 0, block 0"):
        cli(base + ["--fixed-assignment", "4,8,8,8", "allowed_counts=[8]"])
    with pytest.raises(ConfigError, match=r"--fixed-assignment must be comma-separated integers.*'8,a'"):
        cli(base + ["--fixed-assignment", "8,a"])
    with pytest.raises(ConfigError, match=r"fixes every video at 24 tokens: budget=20 has nothing to choose"):
        cli(base + ["--fixed-assignment", "8,4,4,8", "--budget", "20"])
    # through the `arvid` entry point: one line on stderr, exit code 1
    assert main(base + ["--allowed-counts", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("arvid sample: error: allowed_counts: 5 (block 0)")


def test_sample_config_names_malformed_allowed_counts():
    import numpy as np

    from arvid.stages.sample import SampleConfig

    for bad in ([2, [2, 4], 8], [[2], []], [0, 4], [[2], ["x"]]):
        with pytest.raises(ValueError, match="allowed_counts must be positive token counts.*not a mix"):
            SampleConfig(allowed_counts=bad)
    assert SampleConfig(allowed_counts=[np.int64(2), 4]).allowed_counts == [2, 4]


def test_context_counts_come_from_the_given_router(dirs, caplog):
    """`arvid sample --context` had no router: the context was encoded at the tokenizer's default
    counts, not the router-chosen ones its GPT trained on (before 2026-12-07). `--router` now
    chooses them; without router or context_count a warning says so."""
    from arvid.data.writer import write_video
    from arvid.stages.train_router import ROUTER_PRESETS
    from arvid.tokenizer.router import Router, RouterConfig

    tok = load_tokenizer(dirs / "tok")
    lay = tok.layout
    router = Router(RouterConfig(**{**ROUTER_PRESETS["debug"], "frames_per_block": lay.frames_per_block,
                                    "candidates": lay.candidates, "image_size": 32}))
    want = torch.tensor([[8, 4, 4, 8]])  # the router always picks this one
    with torch.no_grad():
        router.head.weight.zero_()
        router.head.bias.fill_(-10.0)
        router.head.bias[int(lay.assignments_to_indices(want)[0])] = 10.0
    router.save_pretrained(dirs / "router")
    write_video(torch.rand(3, 6, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1, dirs / "ctx3.mp4", fps=8)
    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "1",
            "--per-class", "2", "--batch-size", "2", "--context", str(dirs / "ctx3.mp4"), "--context-frames", "3",
            "grid_format=none"]
    assert cli(base + ["--router", str(dirs / "router"), "--out", str(dirs / "routed")]) == 0
    assert load(dirs / "routed")["block_lengths"][:, :2].tolist() == [[8, 4]] * 2
    with caplog.at_level("WARNING", logger="arvid"):
        assert cli(base + ["--out", str(dirs / "unrouted")]) == 0
    assert "encoded at the tokenizer's default counts" in caplog.text
    mid = lay.candidates[len(lay.candidates) // 2]
    assert load(dirs / "unrouted")["block_lengths"][:, :2].tolist() == [[mid, mid]] * 2


def test_saved_videos_are_the_grids_and_time_their_decoding(dirs, monkeypatch):
    """--save-videos decodes every video (timed, not estimated); the grid holds the first max_grid
    videos of the merged run (in one process the grid reuses the videos decoded for saving: each
    video is decoded once; with several processes it is decoded after the merge)."""
    import av

    decoded = []
    real_decode = stage._decode
    monkeypatch.setattr(stage, "_decode", lambda tok, tokens, device: decoded.append(tokens.batch_size)
                        or real_decode(tok, tokens, device))
    out = dirs / "saved"
    assert cli(["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "0,1",
                "--per-class", "3", "--batch-size", "4", "--save-videos", "--out", str(out), "max_grid=4",
                "nrow=4", "grid_format=mp4"]) == 0
    stats = json.loads((out / "sample_stats.json").read_text())
    assert stats["seconds_decode_estimated"] is False and stats["seconds_decode"] > 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"{i:05d}.mp4" for i in range(6)]
    assert sum(decoded) == 6  # every video once: the grid's four were not decoded again

    def frame0(path):
        with av.open(str(path)) as c:
            return next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.int16)

    grid, one = frame0(out / "grid.mp4"), frame0(out / "videos" / "00003.mp4")
    h, w = one.shape[:2]  # tiles: 2 px of border on the top and left of each (make_grid)
    tiles = [grid[2:2 + h, 2 + j * (w + 2):2 + j * (w + 2) + w] for j in range(4)]
    assert grid.shape[1] >= 4 * (w + 2)
    err = [float(np.abs(t - one).mean()) for t in tiles]
    assert err[3] < 6 and min(err[:3]) > err[3]  # the 4th tile is video 3


def test_num_samples_on_a_class_conditional_gpt_is_said_to_be_ignored(dirs, caplog):
    with caplog.at_level("WARNING", logger="arvid"):
        assert cli(["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--num-samples",
                    "3", "--per-class", "1", "--out", str(dirs / "ns"), "grid_format=none"]) == 0
    assert "num_samples=3 is for unconditional GPTs" in caplog.text
    assert load(dirs / "ns")["classes"].tolist() == [0, 1, 2]  # per_class per class, as documented


def test_a_failed_run_leaves_the_previous_runs_record_alone(dirs):
    """A run refused by its checks (here: class ids out of range) wrote its config.yaml beside the
    previous run's samples and done marker (CLI review, 2026-12-07)."""
    from arvid.config import ConfigError

    out = dirs / "keep"
    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--per-class", "1",
            "--out", str(out), "grid_format=none"]
    assert cli(base + ["--classes", "0"]) == 0
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="outside"):
        cli(base + ["--classes", "7"])
    assert (out / "config.yaml").read_text() == saved and (out / "done").is_file()


def test_budget_calibration_rows_span_the_whole_run():
    """The mean-budget calibration conditions on rows spread over the run, not its first rows (a
    run lists classes in order: its first two batches were often one class)."""
    from arvid.stages.sample import SampleConfig, _calibration_cond, _Plan

    classes = torch.arange(4).repeat_interleave(16)  # 4 classes x 16 videos, in order
    plan = _Plan(classes=classes, prompt_index=classes.clone())
    cond, n = _calibration_cond(plan, SampleConfig(batch_size=8, calibration_batches=2))
    assert n == 16 and cond.class_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    cond, n = _calibration_cond(plan, SampleConfig(batch_size=64, calibration_batches=2))  # all rows
    assert n == 64 and torch.equal(cond.class_ids, classes)
    one = _Plan(classes=torch.tensor([5]), prompt_index=torch.tensor([0]))
    cond, n = _calibration_cond(one, SampleConfig(batch_size=8))
    assert n == 1 and cond.class_ids.tolist() == [5]


def test_out_may_not_be_an_input_and_a_rerun_leaves_no_older_outputs(dirs, tmp_path):
    """Found in a bad-input review (2026-12-07): `--out` at the generator's directory replaced the
    GPT's config.yaml with the run's (the model no longer loaded), and a second run into the same
    `out` left the first run's videos beside its own tokens."""
    import shutil

    from arvid.config import ConfigError

    gcopy = tmp_path / "gcopy"
    shutil.copytree(dirs / "gpt", gcopy)
    before = (gcopy / "config.yaml").read_text()
    base = ["sample", "--tokenizer", str(dirs / "tok"), "--classes", "0", "--per-class", "1", "grid_format=none"]
    for out in (gcopy, tmp_path):  # the model's directory, or one holding it
        with pytest.raises(ConfigError, match="config.yaml would replace the model's"):
            cli(base + ["--generator", str(gcopy), "--out", str(out)])
    assert (gcopy / "config.yaml").read_text() == before
    GPT.from_pretrained(gcopy)  # still loads
    with pytest.raises(ConfigError, match="tokenizer directory"):
        cli(base + ["--generator", str(dirs / "gpt"), "--out", str(dirs / "tok")])

    out = tmp_path / "again"
    assert cli(base + ["--generator", str(dirs / "gpt"), "--per-class", "2", "--save-videos", "--out", str(out)]) == 0
    assert len(list((out / "videos").iterdir())) == 2
    assert cli(base + ["--generator", str(dirs / "gpt"), "--out", str(out)]) == 0
    assert not (out / "videos").exists() and (out / "done").is_file()
    assert load(out)["classes"].tolist() == [0]


def test_an_exact_cap_below_the_smallest_video_is_refused(dirs):
    """`--budget N --budget-mode exact` is a cap per video: below the fewest codes the constraints
    allow, the sampler must exceed it to keep sequences well formed; the run is refused up front
    (it wrote videos of 128 tokens under a cap of 20, exit 0, before 2026-12-07)."""
    from arvid.config import ConfigError

    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "0",
            "--per-class", "1", "--budget-mode", "exact", "--out", str(dirs / "cap"), "grid_format=none"]
    tok = load_tokenizer(dirs / "tok")
    smallest = tok.layout.num_blocks * min(tok.layout.candidates)
    with pytest.raises(ConfigError, match=f"below the fewest tokens a video can have here: {smallest}"):
        cli(base + ["--budget", str(smallest - 1)])
    with pytest.raises(ConfigError, match=f": {tok.layout.num_blocks * max(tok.layout.candidates)} "):
        cli(base + ["--budget", str(smallest + 1), "--allowed-counts", str(max(tok.layout.candidates))])
    assert cli(base + ["--budget", str(smallest)]) == 0
    assert int(load(dirs / "cap")["block_lengths"].sum(1).max()) <= smallest


def test_frame_prediction_flags_without_a_context_and_a_short_context_are_said(dirs, caplog, tmp_path):
    from arvid.data.writer import write_video

    base = ["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "0",
            "--per-class", "1", "grid_format=none"]
    with caplog.at_level("WARNING", logger="arvid"):
        assert cli(base + ["--context-frames", "3", "--out", str(tmp_path / "a")]) == 0
    assert "--context-frames: only for frame prediction" in caplog.text
    caplog.clear()
    write_video(torch.rand(3, 2, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1, tmp_path / "short.mp4",
                fps=8)
    with caplog.at_level("WARNING", logger="arvid"):
        stage.read_context(tmp_path / "short.mp4", 3, 32)
    assert "has 2 frames, fewer than the 3 asked for" in caplog.text


def test_grid_and_context_settings_are_checked_with_the_config():
    """max_grid -1 sampled every video, then failed in the merge with 'torch.cat(): expected a
    non-empty list of Tensors'; nrow 0 and fps 0 failed after sampling too (review 2026-12-08)."""
    from arvid.stages.sample import SampleConfig

    for field, bad in (("max_grid", -1), ("nrow", 0), ("fps", 0), ("context_frames", 0), ("context_count", -4),
                       ("calibration_batches", 0)):
        with pytest.raises(ValueError, match=rf"{field} must be .*got {bad}"):
            SampleConfig(**{field: bad})
    assert SampleConfig(max_grid=0, context_count=0).max_grid == 0


def test_checks_that_need_the_models_fail_before_the_previous_outputs_go(dirs, tmp_path):
    """Guidance on an unconditional GPT and a mean budget no video count can reach were found only
    while sampling (after ~8 calibration runs for the budget), once the previous run's tokens and
    done marker were deleted; a context_count that is no candidate was named without its field
    (review 2026-12-08)."""
    from arvid.config import ConfigError
    from arvid.data.writer import write_video

    tok = load_tokenizer(dirs / "tok")
    fmt = SequenceFormat(tok.codebook_size, tok.layout)
    GPT.from_preset("debug", vocab_size=fmt.vocab_size, max_seq_len=fmt.max_length + 1).save_pretrained(tmp_path / "u")
    out = tmp_path / "out"
    uncond = ["sample", "--generator", str(tmp_path / "u"), "--tokenizer", str(dirs / "tok"), "--num-samples", "2",
              "--batch-size", "2", "--out", str(out), "grid_format=none"]
    assert cli(uncond) == 0
    before = load(out)["sequences"]
    with pytest.raises(ConfigError, match=r"cfg_scale=2 .*unconditional.*set --cfg-scale 1"):
        cli(uncond + ["--cfg-scale", "2"])
    assert (out / "done").is_file() and np.array_equal(load(out)["sequences"], before)
    assert cli(uncond + ["--cfg-scale", "1"]) == 0  # scale 1 is no guidance

    K, lo, hi = tok.layout.num_blocks, min(tok.layout.candidates), max(tok.layout.candidates)
    for target, allowed in ((K * lo - 1, []), (K * hi + 1, []), (K * lo + 1, ["--allowed-counts", str(hi)])):
        with pytest.raises(ConfigError, match=rf"budget {target} \(budget_mode mean.*between"):
            cli(uncond + ["--budget", str(target)] + allowed)
        assert (out / "done").is_file() and np.array_equal(load(out)["sequences"], before)

    write_video(torch.rand(3, 6, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1, tmp_path / "c.mp4", fps=8)
    with pytest.raises(ConfigError, match=rf"context_count=5 is not a token count of the tokenizer.*{lo}, {hi}"):
        cli(uncond[:-1] + ["--context", str(tmp_path / "c.mp4"), "--context-frames", "3", "grid_format=none",
                           "context_count=5"])


def test_no_progress_bar_when_stderr_is_not_a_terminal(dirs, tmp_path, capsys):
    """The sample stage's bar wrote tqdm's '\\r' lines into log files (its bar was not gated on a
    terminal, as the trainer's and the evaluations' are): a fresh-user walkthrough, 2026-12-08."""
    assert cli(["sample", "--generator", str(dirs / "gpt"), "--tokenizer", str(dirs / "tok"), "--classes", "0",
                "--per-class", "2", "--out", str(tmp_path / "o"), "grid_format=none"]) == 0
    err = capsys.readouterr().err
    assert "sample[0]" not in err and "\r" not in err
