"""RELIABILITY.md claims that no other test showed (review of the document against the code).

Each test names the row it covers. The tests marked ``xfail(strict=True)`` reproduce a claim
the code does not keep as written (the document's wording, not the code, is what they flag):
they fail the suite once the behaviour matches the sentence, so the mark is then removed.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

# --------------------------------------------------------------------------- faults


def test_an_infinite_loss_stops_like_a_nan_one_naming_the_step_and_the_loss(tmp_path):
    """Row "NaN / inf loss": only NaN was tested; inf stops the run the same way."""
    from _training_toy import ToyTask, toy_data

    from arvid.training import (
        NonFiniteLossError,
        Trainer,
        TrainerConfig,
        latest_checkpoint,
        load_checkpoint_weights,
    )

    class InfTask(ToyTask):
        def training_step(self, batch, step, generator):
            out = super().training_step(batch, step, generator)
            if step == 7:
                out.losses["main"] = out.losses["main"] * float("inf")
            return out

    cfg = TrainerConfig(max_steps=10, batch_size=8, lr=3e-2, checkpoint_every=5, log_every=1, device="cpu",
                        progress=False)
    task = InfTask()
    with pytest.raises(NonFiniteLossError, match=r"step 7: losses\['main'\] = inf") as info:
        Trainer(cfg, task, toy_data(), tmp_path).fit()
    assert info.value.step == 7 and info.value.checkpoint.name == "step_00000005"
    assert all(torch.isfinite(p).all() for p in task.parameters())
    loaded = load_checkpoint_weights(latest_checkpoint(tmp_path), ToyTask(seed=5))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


# --------------------------------------------------------------------------- unwritable outputs


def test_the_stages_not_in_the_io_test_also_refuse_an_unwritable_out_dir(tmp_path):
    """Row "output directory under a regular file": `every stage` was shown for five stages;
    train-router, eval curve / recon / gen / fp / budget and report check it first too (their
    inputs do not exist: the check comes before any of them is read)."""
    from arvid.io import ArvidIOError
    from arvid.stages import eval_curve, evaluate, report, train_router

    (tmp_path / "a_file").write_text("x")
    blocked = str(tmp_path / "a_file" / "sub")
    none = str(tmp_path / "none")
    runs = {
        "train-router": (train_router.run, train_router.TrainRouterConfig(curation=none, out_dir=blocked)),
        "eval curve": (eval_curve.run, eval_curve.EvalCurveConfig(tokenizer=none, out_dir=blocked)),
        "eval recon": (evaluate.run_recon, evaluate.ReconEvalConfig(tokenizer=none, out_dir=blocked)),
        "eval gen": (evaluate.run_gen, evaluate.GenEvalConfig(generator=none, tokenizer=none, out_dir=blocked)),
        "eval fp": (evaluate.run_fp, evaluate.FPEvalConfig(generator=none, tokenizer=none, out_dir=blocked)),
        "eval budget": (evaluate.run_budget, evaluate.BudgetEvalConfig(generator=none, tokenizer=none, budgets=[200],
                                                                       out_dir=blocked)),
        "report": (report.run_report, report.ReportConfig(experiment_dir=none, out_dir=blocked)),
    }
    for name, (run, cfg) in runs.items():
        with pytest.raises(ArvidIOError) as e:
            run(cfg)
        assert "a_file/sub' is not writable:" in str(e.value) and "a_file' is a file, not a folder" in str(e.value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# --------------------------------------------------------------------------- bad videos


def _write(path: Path, frames: list[np.ndarray], codec: str = "libx264", pix_fmt: str = "yuv420p") -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        if codec == "libx264":
            s.options = {"crf": "0"}
        for fr in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_a_truncated_stream_gives_the_frames_before_the_cut_then_repeats_the_last(tmp_path):
    """Row "truncated file": the reliability test cuts an mp4, whose index is at its end, so only
    the BadVideoError branch ran. A streamable container (MPEG-TS) cut at 70 % decodes its first
    frames and pads with the last one."""
    from arvid.data.files import decode_clip

    good = _write(tmp_path / "good.ts", [np.full((16, 16, 3), 40 + 20 * i, np.uint8) for i in range(8)])
    data = good.read_bytes()
    (tmp_path / "cut.ts").write_bytes(data[: int(len(data) * 0.7)])
    info: dict = {}
    clip = decode_clip(tmp_path / "cut.ts", frames=8, size=16, info=info)
    means = np.rint((clip.reshape(8, -1).mean(1) - 40) / 20).astype(int).tolist()
    kept = 8 - info["padded"]
    assert 1 <= kept < 8, info
    assert means[:kept] == list(range(kept)), means  # the frames before the cut, in order
    assert (clip[kept:] == clip[kept - 1]).all()  # then the last one repeats


def test_an_odd_sized_video_is_resized_on_its_short_side_and_center_cropped(tmp_path):
    """Row "odd-sized (23 x 37)": the test used flat frames, which any crop passes. A one-pixel
    stripe at the middle column lands at the middle of the crop; bright 6-pixel borders are cut away."""
    from arvid.data.files import decode_clip

    stripe = np.zeros((23, 37, 3), np.uint8)
    stripe[:, 18] = 255
    clip = decode_clip(_write(tmp_path / "s.mkv", [stripe] * 3, "ffv1", "yuv444p"), frames=3, size=16)
    cols = clip[0, :, :, 0].astype(float).mean(0)
    assert clip.shape == (3, 16, 16, 3) and set(np.argsort(cols)[-2:]) == {7, 8}, cols.round()
    borders = np.zeros((23, 37, 3), np.uint8)
    borders[:, :6] = borders[:, -6:] = 255  # 6 * 16/23 < 5 columns after the resize: all outside the crop
    clip = decode_clip(_write(tmp_path / "b.mkv", [borders] * 3, "ffv1", "yuv444p"), frames=3, size=16)
    assert clip.max() <= 8, clip[0, :, :, 0].mean(0).round()


def _vfr_file(tmp_path: Path) -> Path:
    import av

    path = tmp_path / "vfr.mp4"
    pts = [0, 100, 150, 500, 550, 600, 1000]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "0"}
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(pts):
            vf = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 10 + 30 * i, np.uint8), format="rgb24")
            vf.pts, vf.time_base = t, Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_variable_frame_rate_frame_k_is_the_last_shown_within_half_an_interval_of_k_over_fps(tmp_path):
    """Row "variable frame rate": RELIABILITY.md said "at or before k / fps"; decode_clip allows half
    a frame interval of the stream's average rate after it (0.5 / (70/11 fps) = 79 ms here), so that
    timestamps jittering around a constant rate map one to one. The row says so since 2026-12-08."""
    from arvid.data.files import decode_clip

    clip = decode_clip(_vfr_file(tmp_path), frames=11, size=16, fps=10)
    got = np.rint((clip.reshape(11, -1).mean(1) - 10) / 30).astype(int).tolist()
    pts = [0, 100, 150, 500, 550, 600, 1000]  # ms; 7 frames over 1.1 s: an average rate of 70/11
    tol = 0.5 / (7 / 1.1) * 1000
    want = [max(i for i, t in enumerate(pts) if t <= 100 * k + tol) for k in range(11)]
    assert got == want == [0, 2, 2, 2, 2, 4, 5, 5, 5, 5, 6]


# --------------------------------------------------------------------------- bad configs


def test_the_cli_prints_broken_yaml_in_one_line(tmp_path):
    """Row "broken YAML": exit 1 and no traceback, but PyYAML's problem marks made the message 4
    lines until 2026-12-08 (the CLI now joins a message's lines)."""
    from arvid.cli import main

    p = tmp_path / "broken.yaml"
    p.write_text("trainer: {max_steps: [1, 2\n")
    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["train-generator", str(p)]) == 1
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert "Traceback" not in err.getvalue() and "broken.yaml" in lines[0]
    assert len(lines) == 1, lines


def test_a_yaml_key_given_twice_names_the_key_and_both_lines(tmp_path):
    """Row "a YAML key given twice": the test matched the key only; the message gives both lines."""
    from arvid.config import ConfigError, read_yaml

    (tmp_path / "twice.yaml").write_text("trainer:\n  lr: 1.0\n  seed: 3\n  lr: 2.0\n")
    with pytest.raises(ConfigError, match=r"(?s)twice\.yaml.*key 'lr' is given twice \(first at line 2\).*line 4"):
        read_yaml(tmp_path / "twice.yaml")


@pytest.mark.parametrize("theta", [1.0, 0.5, float("inf"), float("nan")])
def test_a_rope_theta_of_one_or_less_is_refused(theta):
    """Row "degenerate GPT shapes": `rope_theta <= 1` was tested at 0 only."""
    from arvid.generator.gpt import GPTConfig

    with pytest.raises(ValueError, match="rope_theta"):
        GPTConfig(vocab_size=32, max_seq_len=16, rope_theta=theta)
    GPTConfig(vocab_size=32, max_seq_len=16, rope_theta=1.5)


def test_i3d_refuses_fewer_than_nine_frames():
    """Row "I3D fed fewer than 9 frames": it named a source file, no test. Through the FVD feature
    extractor too (it resizes to 224 first, then calls the network)."""
    from arvid.eval.i3d import I3D, I3DFeatures

    net = I3D()
    with pytest.raises(ValueError, match=r"at least 9 frames \(the FVD protocols use 16\), got 8"):
        net(torch.zeros(1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="at least 9 frames"):
        I3DFeatures(net)(torch.zeros(1, 8, 16, 16, 3, dtype=torch.uint8))


def test_bad_counts_are_refused_before_the_pipeline_touches_an_older_report(tmp_path):
    """Row "counts a stage can only fail on later": '(and before the pipeline moves an older
    report aside)' was not shown."""
    from arvid.config import ConfigError
    from arvid.pipeline import run_pipeline

    out = tmp_path / "exp"
    (out / "report").mkdir(parents=True)
    (out / "report" / "report.md").write_text("older")
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "experiments" / "demo.yaml")
    with pytest.raises(ConfigError, match=r"`report`: num_videos must be >= 2"):
        run_pipeline(cfg, [f"out_dir={out}", "report.num_videos=1"])
    assert sorted(p.name for p in out.iterdir()) == ["report"]
    assert (out / "report" / "report.md").read_text() == "older"


def test_sample_out_may_not_be_the_router_or_spm_directory(tmp_path):
    """Row "`sample --out` at (or above) the ... router's or spm's directory": the test showed the
    generator and tokenizer only."""
    from arvid.config import ConfigError
    from arvid.stages.sample import SampleConfig, run

    for field in ("router", "spm"):
        d = tmp_path / "models" / field
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("kind: x\n")
        for out in (d, d.parent):  # the directory, or one holding it
            with pytest.raises(ConfigError, match=rf"is the {field} directory .*config.yaml would replace the model's"):
                run(SampleConfig(generator=str(tmp_path / "in" / "gpt"), tokenizer=str(tmp_path / "in" / "tok"),
                                 out=str(out), device="cpu", **{field: str(d)}))
        assert (d / "config.yaml").read_text() == "kind: x\n"


# --------------------------------------------------------------------------- security


def test_the_piergiaj_i3d_loader_refuses_a_crafted_pickle(tmp_path):
    """Row "a crafted pickle": the I3D loader for user `.pt` files (I3D.from_file -> from_piergiaj)
    was not handed one."""
    from arvid.eval.i3d import I3D
    from arvid.eval.weights import WeightsError

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"logits.conv3d.bias": Evil()}}, tmp_path / "i3d.pt")
    with pytest.raises(WeightsError, match=r"i3d\.pt' could not be read by torch\.load\(weights_only=True\)"):
        I3D.from_file(tmp_path / "i3d.pt")
    assert not marker.exists()
