"""`arvid data index`: CSV + report of a folder, unreadable files, class balance, train/test overlap."""

import argparse
import csv
import json

import pytest

from arvid.data.datasets import DataConfig, build_dataset
from arvid.data.index import index_folder
from arvid.data.synthetic import SyntheticVideos
from arvid.data.writer import write_video
from arvid.stages import data_cmd


def make_folder(root, layout):
    """``layout``: {relative path: synthetic clip index}; writes tiny mp4s."""
    ds = SyntheticVideos(16, 4, 16, seed=0)
    for rel, i in layout.items():
        write_video(ds.render(i), root / rel)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_index_counts_unreadable_and_balance(tmp_path):
    root = tmp_path / "ucf"
    make_folder(root, {"Jump/a1.mp4": 0, "Jump/a2.mp4": 1, "Jump/a3.mp4": 2, "Jump/a4.mp4": 6, "Jump/a5.mp4": 7,
                       "Run/b1.mp4": 3, "Swim/c1.mp4": 4})
    (root / "Swim" / "broken.mp4").write_bytes(b"not a video at all")
    (root / "Swim" / "notes.txt").write_text("ignored")
    rep = index_folder(root, tmp_path / "list.csv")
    assert rep["num_files"] == 8 and rep["num_videos"] == 7 and rep["num_unreadable"] == 1
    assert rep["unreadable"][0]["path"].endswith("broken.mp4")
    assert rep["class_counts"] == {"Jump": 5, "Run": 1, "Swim": 1}
    assert rep["balance"]["max_over_min"] == 5.0 and rep["balance"]["small_classes"] == ["Run", "Swim"]
    rows = read_rows(tmp_path / "list.csv")
    assert [(r["path"], r["label"], r["class_name"]) for r in rows][:2] == [
        ("ucf/Jump/a1.mp4", "0", "Jump"), ("ucf/Jump/a2.mp4", "0", "Jump")]
    assert not any("broken" in r["path"] for r in rows)
    saved = json.loads((tmp_path / "list.report.json").read_text())
    assert saved["num_unreadable"] == 1 and saved["csv"].endswith("list.csv")
    # the CSV it wrote is a dataset
    ds = build_dataset(DataConfig(source="csv", root=str(tmp_path / "list.csv"), frames=4, size=16), "train")
    assert len(ds) == 7 and ds.class_names == ["Jump", "Run", "Swim"] and ds[5]["label"] == 1


def test_split_files_and_overlap(tmp_path):
    root = tmp_path / "ucf"
    make_folder(root, {"A/v_A_g01.mp4": 0, "A/v_A_g02.mp4": 1, "B/v_B_g01.mp4": 2, "B/v_B_g02.mp4": 3,
                       "B/sub/v_A_g01.mp4": 5})
    (tmp_path / "train.txt").write_text("A/v_A_g01.mp4 1\nB/v_B_g01.mp4 2\nB/sub/v_A_g01.mp4 2\n")
    (tmp_path / "test.txt").write_text("A/v_A_g02.mp4\nB/v_B_g02.mp4\nB/v_B_g99.mp4\n")
    rep = index_folder(root, tmp_path / "l.csv", split_files=(tmp_path / "train.txt", tmp_path / "test.txt"),
                       check_decode=False)
    s = rep["splits"]
    assert s["source"] == "files" and s["counts"] == {"train": 3, "test": 2}
    assert s["num_overlap"] == 0  # v_A_g01 is twice in train, never in test
    assert s["listed_but_missing"]["test"] == ["B/v_B_g99.mp4"]
    rows = read_rows(tmp_path / "l.csv")
    assert {r["path"].split("/", 1)[1]: r["split"] for r in rows}["A/v_A_g02.mp4"] == "test"
    cfg = DataConfig(source="csv", root=str(tmp_path / "l.csv"), frames=4, size=16)
    assert len(build_dataset(cfg, "train")) == 3 and len(build_dataset(cfg, "test")) == 2

    (tmp_path / "test.txt").write_text("A/v_A_g02.mp4\nB/sub/v_A_g01.mp4\n")  # now leaks
    rep = index_folder(root, None, split_files=(tmp_path / "train.txt", tmp_path / "test.txt"), check_decode=False)
    # B/sub/v_A_g01 is listed in both: it takes train; A/v_A_g01 (train) shares a name with nothing in test
    assert rep["splits"]["num_overlap"] == 0
    (tmp_path / "train.txt").write_text("A/v_A_g01.mp4\n")
    rep = index_folder(root, None, split_files=(tmp_path / "train.txt", tmp_path / "test.txt"), check_decode=False)
    assert rep["splits"]["overlap_by_file_name"] == ["v_A_g01.mp4"]


def test_split_folders_kinetics_layout(tmp_path):
    root = tmp_path / "k600"
    make_folder(root, {"train/x/1.mp4": 0, "train/y/2.mp4": 1, "test/y/2.mp4": 2, "test/z/3.mp4": 3})
    rep = index_folder(root, tmp_path / "k.csv", check_decode=False)
    assert rep["num_classes"] == 3 and rep["splits"]["source"] == "folders"
    assert rep["splits"]["overlap_by_file_name"] == ["2.mp4"]
    rows = read_rows(tmp_path / "k.csv")
    assert {(r["class_name"], r["label"], r["split"]) for r in rows} == {
        ("x", "0", "train"), ("y", "1", "train"), ("y", "1", "test"), ("z", "2", "test")}
    # the folder dataset on the same layout gives the same labels per split
    cfg = DataConfig(source="folder", root=str(root), frames=4, size=16)
    test = build_dataset(cfg, "test")
    assert test.labels == [1, 2] and test.class_names == ["x", "y", "z"]
    with pytest.raises(ValueError, match="already has train/test folders"):
        index_folder(root, None, split_files=("a", "b"))


def test_cli_registers_data_commands(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    data_cmd.add_arguments(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "synth", str(tmp_path / "s"), "--num", "12", "--frames", "4", "--size", "16",
                              "--format", "gif"])
    assert args.func(args) == 0
    assert len(list((tmp_path / "s").rglob("*.gif"))) == 12
    args = parser.parse_args(["data", "index", str(tmp_path / "s"), "--out", str(tmp_path / "s.csv"), "--strict"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "12 usable videos in 10 classes" in out
    assert len(read_rows(tmp_path / "s.csv")) == 12
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "x", "--format", "avi"])


def test_classes_without_a_readable_video_keep_their_name_and_place(tmp_path):
    """Rows exist for readable videos only: read back, a class without one was named "1" and a last
    such class vanished (num_classes 3, not 4). The index writes every class beside the CSV."""
    root = tmp_path / "d"
    make_folder(root, {"a/1.mp4": 0, "c/1.mp4": 2})
    for cls in ("b", "d"):
        (root / cls).mkdir()
        (root / cls / "broken.mp4").write_bytes(b"not a video")
    rep = index_folder(root, tmp_path / "list.csv")
    assert (tmp_path / "list.classes.txt").read_text() == "a\nb\nc\nd\n" and rep["classes_file"].endswith(".txt")
    cfg = DataConfig(source="csv", root=str(tmp_path / "list.csv"), frames=4, size=16)
    folder = DataConfig(source="folder", root=str(root), frames=4, size=16)
    from arvid.data.datasets import class_names

    assert class_names(cfg) == class_names(folder) == ["a", "b", "c", "d"]
    assert [build_dataset(cfg, "train")[i]["label"] for i in range(2)] == [0, 2]
