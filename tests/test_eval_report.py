"""report.md rendering: the numbers of metrics.json land in the right table rows."""

from __future__ import annotations

import pytest

from arvid.stages.report import render_report


def _metrics() -> dict:
    fvd = {"metric": "FVD", "protocol": {"name": "synthetic"}}
    return {
        "experiment": "t", "date": "2026-11-23", "device": "cpu", "num_real_videos": 16, "split": "val",
        "layout": {"frames_per_block": [4, 4], "candidates": [4, 8]},
        "fixed_baseline": {"tokens": 16, "per_block": 8},
        "reconstruction": {"results": {
            "router": {"tokens_per_video": 12.0, "psnr": 20.5, "ssim": 0.61, "lpips": 0.25, "rfvd": 300.0,
                       "fvd_record": fvd},
            "uniform-8": {"tokens_per_video": 16.0, "psnr": 21.0, "ssim": 0.63, "lpips": 0.24, "rfvd": float("nan")},
        }},
        "generation": {"gfvd": 512.31, "num_samples": 16, "tokens_per_video": 13.5, "samples_per_s": 9.0,
                       "cfg_scale": 2.0, "fvd_record": fvd},
        "generation_fixed": {"gfvd": 640.04, "num_samples": 16, "tokens_per_video": 32.0, "samples_per_s": 7.5,
                             "cfg_scale": 2.0, "fvd_record": fvd},
        "router": {"num_videos": 10, "w_q": 1.2, "w_l": 0.8, "quality": "lpips", "reward_percentile": 0.97,
                   "mean_tokens_router": 12.0, "mean_tokens_label": 12.5, "reward_percentile_random": 0.6,
                   "top1": 0.5, "top5": 0.9, "uniform": {"8": {"percentile": 0.7, "tokens": 16},
                                                         "4": {"percentile": 0.4, "tokens": 8}}},
        "curve": {"num_videos": 8, "split": "train", "quality": "lpips",
                  "points": [{"method": "uniform", "param": 4, "tokens": 8.0, "distortion": 0.3, "psnr": 19.0},
                             {"method": "router", "param": 0.0, "tokens": 11.0, "distortion": 0.2, "psnr": 20.0}],
                  "tokens_saved": [{"method": "router", "param": 0.0, "tokens_saved_at_equal_distortion": 0.25}]},
        "tokenize": {"num_videos": 32, "mean_tokens": 12.0, "std_tokens": 2.0, "min_tokens": 8, "max_tokens": 16,
                     "assignment_source": "router r", "top_assignments": [{"assignment": [4, 8], "count": 20}]},
    }


def test_report_rows_carry_the_metrics():
    md = render_report(_metrics())
    lines = md.splitlines()
    assert "| router | 12.0 | 20.50 | 0.610 | 0.2500 | 300.0 |" in lines
    assert "| uniform-8 | 16.0 | 21.00 | 0.630 | 0.2400 | - |" in lines  # NaN rFVD shows as "-"
    assert "The router uses 12.0 tokens per video against 16 for the fixed-length baseline (8 per block): 25.0% fewer." in md
    assert "**512.3**" in md
    assert "fixed-length branch (stages fixed, fixed_tokenize, fixed_generator; same budget): gFVD **640.0** at 32.0 tokens per video, 7.50 samples/s" in md
    assert "| router | 0.970 | 12.0 |" in lines and "| random | 0.600 | - |" in lines
    # uniform rows in candidate order, not string order
    assert lines.index("| uniform 4 per block | 0.400 | 8 |") < lines.index("| uniform 8 per block | 0.700 | 16 |")
    assert "| router | 0 | 11.0 | 0.2000 | 20.00 | 25.0% |" in lines
    assert "| uniform | 4 | 8.0 | 0.3000 | 19.00 | - |" in lines
    assert "32 videos, 12.0 +- 2.0 tokens per video (min 8, max 16)" in md and "(4, 8) x20" in md


def test_report_without_optional_sections():
    m = _metrics()
    for k in ("generation", "generation_fixed", "router", "curve", "tokenize"):
        m.pop(k)
    md = render_report(m)
    assert "## Reconstruction" in md and "## Router" not in md and "## Class-to-video" not in md


def test_the_mp4_twin_of_a_grid_is_skipped_without_pyav(tmp_path, monkeypatch, caplog):
    """The report's frame-prediction mp4 needs PyAV; without it (the lent GPU machine has none) the
    report warns and goes on with the GIF instead of dying at its end (the H200 run of 2026-12-04)."""
    import sys

    import torch

    from arvid.stages.report import _write_mp4_grid

    videos = torch.zeros(2, 3, 4, 16, 16)
    try:
        import av  # noqa: F401
    except ImportError:  # a machine without PyAV: only the half below applies
        pass
    else:
        _write_mp4_grid(videos, tmp_path / "with.mp4", nrow=2, fps=4)
        assert (tmp_path / "with.mp4").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with caplog.at_level("WARNING", logger="arvid.evaluate"):
        _write_mp4_grid(videos, tmp_path / "without.mp4", nrow=2, fps=4)
    assert not (tmp_path / "without.mp4").exists()
    assert "PyAV is not installed" in caplog.text and "without.mp4" in caplog.text


def test_writing_an_mp4_without_pyav_names_the_file_and_the_fix(tmp_path, monkeypatch):
    import sys

    import numpy as np
    import pytest

    from arvid.data.writer import write_video

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(RuntimeError, match=r"x\.mp4.*pip install av"):
        write_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.mp4", fps=4)
    assert not (tmp_path / "x.mp4").exists()


def test_a_media_file_that_fails_is_recorded_not_fatal(tmp_path, caplog):
    """A picture the report cannot write (a full disk, a codec) must not cost the metrics computed
    before it: the error is logged and listed in metrics.json and report.md."""
    from arvid.stages.report import _media

    errors: list[str] = []

    def fail():
        raise OSError(28, "No space left on device")

    with caplog.at_level("ERROR", logger="arvid.evaluate"):
        _media(errors, tmp_path / "samples_by_class.gif", fail)
    _media(errors, tmp_path / "ok.txt", lambda: (tmp_path / "ok.txt").write_text("x"))
    assert errors == ["samples_by_class.gif: OSError: [Errno 28] No space left on device"]
    assert "samples_by_class.gif not written" in caplog.text
    md = render_report({**_metrics(), "media_errors": errors})
    assert "## Files not written" in md and "- samples_by_class.gif: OSError" in md


def test_frame_prediction_context_and_the_reason_it_is_skipped():
    """The report's default context is the first two blocks' frames (the first block's of a
    two-block layout); a one-block tokenizer leaves no block to condition on and a context
    reaching into the last block is refused: the report shows the reason instead of failing."""
    import pytest

    from arvid.data.types import BlockLayout
    from arvid.stages.report import fp_context_frames

    four = BlockLayout((4, 4, 4, 4), (8, 16))
    assert fp_context_frames(four) == 8 and fp_context_frames(four, 12) == 12
    assert fp_context_frames(BlockLayout((4, 4), (8, 16))) == 4
    # a frame-prediction GPT's own context: the frames of the context_blocks it was trained with
    assert fp_context_frames(four, 0, {"conditioning": "frames", "context_blocks": 3}) == 12
    assert fp_context_frames(four, 0, {"conditioning": "frames", "context_blocks": 1}) == 4
    assert fp_context_frames(four, 0, {"conditioning": "class", "context_blocks": 0}) == 8
    # a given context_frames that fills other blocks than the GPT was trained with: the report
    # checks it with the other frame-prediction reasons (a ValueError: skipped, not a late crash)
    from arvid.sampling.frame_prediction import check_context_blocks

    record = {"conditioning": "frames", "context_blocks": 1}
    with pytest.raises(ValueError, match="context_frames=8 fill 2 block.*context_blocks=1"):
        check_context_blocks(record, four, fp_context_frames(four, 8, record), "gen")
    with pytest.raises(ValueError, match=r"must lie in \[1, 12\]"):
        fp_context_frames(four, 13)
    with pytest.raises(ValueError, match="needs two temporal blocks or more") as e:
        fp_context_frames(BlockLayout((16,), (32, 64)))
    m = _metrics()
    m.pop("frame_prediction", None)
    m["frame_prediction_skipped"] = str(e.value)
    md = render_report(m)
    assert "## Frame prediction" in md and "Skipped: frame prediction needs two temporal blocks" in md


def test_a_copied_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The report copies the sample stage's grid and the curve with ``_copy``: a copy that fails half
    way (a full disk) left a truncated file under the final name (``shutil.copyfile`` writes in place);
    now the older file stays as it was and no temporary file is left behind."""
    import shutil

    from arvid.stages import report

    src, dst = tmp_path / "src" / "grid.gif", tmp_path / "out" / "grid.gif"
    src.parent.mkdir()
    dst.parent.mkdir()
    src.write_bytes(b"N" * 100_000)
    dst.write_bytes(b"old")

    def half_then_fail(fsrc, fdst, length=0):
        fdst.write(fsrc.read(1000))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", half_then_fail)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # shutil.copyfile's in-place fallback path
    with pytest.raises(OSError, match="No space left"):
        report._copy(src, dst)
    assert dst.read_bytes() == b"old" and sorted(p.name for p in dst.parent.iterdir()) == ["grid.gif"]
    monkeypatch.undo()
    report._copy(src, dst)
    assert dst.read_bytes() == b"N" * 100_000


def test_every_quality_number_says_over_how_many_clips():
    """The fixed-length branch's gFVD had no N, and the frame-prediction tokens per video none either,
    though without FVD-FP they cover only the batches of the clips shown (evaluate_fp's only_kept:
    16 of 64 held-out clips), not the held-out clips the report's first line counts."""
    m = _metrics()
    m["num_real_videos"] = 64
    m["frame_prediction"] = {"context_frames": 8, "tokens_per_video": 30.25, "num_videos": 16, "example_only": True}
    md = render_report(m)
    assert "gFVD **640.0** at 32.0 tokens per video, 7.50 samples/s; N = 16, the same labels and seeds" in md
    assert ("Tokens per video 30.2 over 16 clips (the batches of the clips shown: an example, not all held-out "
            "clips).") in md
    m["frame_prediction"]["num_videos"] = 64  # the shown clips' batches held every clip: no example note
    assert "Tokens per video 30.2 over 64 clips.\n" in render_report(m)
    m["frame_prediction"] = {"context_frames": 8, "tokens_per_video": 30.25, "num_videos": 64, "fvd_fp": 812.34}
    assert "Tokens per video 30.2 over 64 clips; FVD-FP 812.3 over the same clips." in render_report(m)


def test_the_sample_grid_is_named_only_as_copied(tmp_path):
    """report.md named `grid.gif` whether or not it was copied beside it (sample grid_format mp4 or
    none, a standalone report without a sample stage); metrics.json now lists what was copied."""
    from arvid.stages.report import _media

    m = _metrics()
    m["copied"] = ["grid.mp4", "curve.png"]
    assert "samples sorted by class: `samples_by_class.gif`; the sample stage's grid: `grid.mp4`\n" in render_report(m)
    m["copied"] = ["curve.png"]
    md = render_report(m)
    assert "samples sorted by class: `samples_by_class.gif`\n" in md and "grid." not in md
    m.pop("copied")  # a metrics.json from before "copied": as it was rendered then
    assert "the sample stage's grid: `grid.gif`" in render_report(m)
    errors: list[str] = []
    assert _media(errors, tmp_path / "a.gif", lambda: None) is True and errors == []

    def fail():
        raise OSError("disk full")

    assert _media(errors, tmp_path / "b.gif", fail) is False and errors == ["b.gif: OSError: disk full"]
