"""DataConfig + build_dataset: every source, splits, class names, config errors."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from arvid.config import ConfigError, from_dict
from arvid.data.datasets import DataConfig, build_dataset, class_names, num_classes
from arvid.data.synthetic import CLASS_NAMES
from arvid.stages.data_cmd import synth


def test_synthetic_splits_are_disjoint_and_sized():
    cfg = DataConfig(num_videos=6, num_val_videos=4, frames=4, size=16, seed=2)
    train, val, test = (build_dataset(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (6, 4, 4)
    tv = [train[i]["video"] for i in range(6)]
    for other in (val, test):
        for j in range(4):
            assert all(not torch.equal(other[j]["video"], x) for x in tv)
    assert not torch.equal(val[0]["video"], test[0]["video"])
    assert class_names(cfg) == list(CLASS_NAMES) and num_classes(cfg) == 10
    item = train[0]
    assert set(item) >= {"video", "label", "index"} and item["video"].shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset(cfg, "dev")


def test_default_collate_batches_items():
    ds = build_dataset(DataConfig(num_videos=5, frames=4, size=16))
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["video"].shape == (5, 3, 4, 16, 16)
    assert batch["label"].tolist() == [0, 1, 2, 3, 4] and batch["index"].tolist() == [0, 1, 2, 3, 4]


def test_from_dict_nested_and_errors():
    cfg = from_dict(DataConfig, {"frames": 8, "synthetic": {"max_objects": 2}}, source="data.yaml")
    assert cfg.synthetic.max_objects == 2 and cfg.frames == 8
    with pytest.raises(ConfigError, match="data.yaml.*source"):
        from_dict(DataConfig, {"source": "foldr"}, source="data.yaml")
    with pytest.raises(ConfigError, match="needs `root`"):
        from_dict(DataConfig, {"source": "folder"}, source="data.yaml")
    with pytest.raises(ConfigError, match="did you mean `frames`"):
        from_dict(DataConfig, {"frame": 8})


@pytest.mark.parametrize("field, value, match", [
    ("frame_stride", 0, "frame_stride must be >= 1, got 0"),
    ("fps", 0.0, "fps must be positive or null, got 0.0"),
    ("fps", -2.0, "fps must be positive or null, got -2.0"),
    ("size", 3, "synthetic clips need size >= 4 pixels, got 3"),
])
def test_clip_settings_are_checked_when_the_config_is_read(field, value, match):
    """These were first checked where a dataset is built (ClipConfig, SyntheticVideos): an error that
    named neither the config file nor `data`."""
    with pytest.raises(ConfigError, match=rf"data.yaml: invalid DataConfig at `data`: {match}"):
        from_dict(DataConfig, {field: value}, source="data.yaml", prefix="data.")
    assert from_dict(DataConfig, {"source": "csv", "root": "x.csv", "size": 3}).size == 3  # files may be tiny


def test_folder_and_csv_sources(tmp_path, caplog):
    synth(tmp_path / "train", num=10, frames=4, size=16, seed=0)
    synth(tmp_path / "val", num=10, frames=4, size=16, seed=1)
    folder = DataConfig(source="folder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val"),
                        frames=4, size=16, random_start=False, flip=True)
    assert num_classes(folder) == 10 and class_names(folder)[0] == "00_static"
    train, val = build_dataset(folder, "train"), build_dataset(folder, "val")
    assert train.clip.flip and not val.clip.flip and not val.clip.random_start  # held-out splits repeat
    assert val.paths[0].startswith(str(tmp_path / "val")) and val.labels == train.labels
    assert train[4]["label"] == 4
    clone = pickle.loads(pickle.dumps(train))  # goes to DataLoader workers
    assert torch.equal(clone[4]["video"], train[4]["video"])

    csv_cfg = DataConfig(source="csv", root=str(tmp_path / "train" / "list.csv"), frames=4, size=16)
    ds = build_dataset(csv_cfg, "train")
    assert len(ds) == 10 and ds[2]["label"] == 2 and num_classes(csv_cfg) == 10
    assert class_names(csv_cfg)[1] == "01_linear"  # from the folder names in the paths
    with caplog.at_level("WARNING"):
        same = build_dataset(csv_cfg, "val")  # no held-out split anywhere: said loudly, then the same list
    assert len(same) == 10 and "no held-out val split" in caplog.text

    # an unlabelled held-out split beside a labelled one: the labelled split builds (its class
    # names come from every labelled row), the unlabelled one is refused naming a row
    rows = [line for line in (tmp_path / "train" / "list.csv").read_text().splitlines()[1:]]
    header = (tmp_path / "train" / "list.csv").read_text().splitlines()[0]
    mixed = tmp_path / "train" / "mixed.csv"
    mixed.write_text("\n".join([header + ",split"] + [r + ",train" for r in rows[:8]]
                               + [",".join(r.split(",")[:1] + [""] * (header.count(","))) + ",test" for r in rows[8:]])
                     + "\n")
    mcfg = DataConfig(source="csv", root=str(mixed), frames=4, size=16)
    ds = build_dataset(mcfg, "train")
    assert len(ds) == 8 and ds[2]["label"] == 2 and num_classes(mcfg) == 8
    with pytest.raises(ValueError, match=r"2 row\(s\) of split 'test' have no label"):
        build_dataset(mcfg, "test")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(source="folder", root=str(tmp_path / "nope")))


def test_a_csv_val_root_with_class_name_labels_uses_the_main_lists_numbering(tmp_path):
    """The val list numbered its name labels by its own sorted names, then took the main list's
    names: a class missing from it shifted every label after it (before 2026-12-07)."""
    synth(tmp_path / "v", num=3, frames=4, size=16, seed=0)
    paths = [str(p) for p in sorted((tmp_path / "v").rglob("*.mp4"))]
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in zip(paths, ["cat", "dog", "eel"])))
    (tmp_path / "val.csv").write_text("path,label\n" + f"{paths[2]},eel\n{paths[1]},dog\n")
    cfg = DataConfig(source="csv", root=str(tmp_path / "train.csv"), val_root=str(tmp_path / "val.csv"),
                     frames=4, size=16)
    val = build_dataset(cfg, "val")
    assert val.class_names == ["cat", "dog", "eel"] and len(paths) == 3
    assert [val.class_names[lab] for lab in val.labels] == ["eel", "dog"]
    (tmp_path / "bad.csv").write_text("path,label\n" + f"{paths[0]},fox\n")
    with pytest.raises(ValueError, match=r"label\(s\) \['fox'\] are not classes of the main list"):
        build_dataset(DataConfig(source="csv", root=str(tmp_path / "train.csv"), val_root=str(tmp_path / "bad.csv"),
                                 frames=4, size=16), "val")


def test_a_val_list_without_a_train_list_is_refused_for_training(tmp_path):
    """The train split held every video under root, the val_list's too (before 2026-12-07)."""
    synth(tmp_path / "v", num=4, frames=4, size=16, seed=0)
    first = sorted((tmp_path / "v").rglob("*.mp4"))[0].relative_to(tmp_path / "v")
    (tmp_path / "testlist.txt").write_text(f"{first}\n")
    cfg = DataConfig(source="folder", root=str(tmp_path / "v"), val_list=str(tmp_path / "testlist.txt"),
                     frames=4, size=16)
    assert len(build_dataset(cfg, "val")) == 1
    with pytest.raises(ConfigError, match="data.val_list .* without data.train_list"):
        build_dataset(cfg, "train")
    # held-out videos in their own val_root: the whole root is the train split
    synth(tmp_path / "held", num=2, frames=4, size=16, seed=1)
    (tmp_path / "held_list.txt").write_text(f"{first}\n")
    apart = DataConfig(source="folder", root=str(tmp_path / "v"), val_root=str(tmp_path / "held"),
                       val_list=str(tmp_path / "held_list.txt"), frames=4, size=16)
    assert len(build_dataset(apart, "train")) == 4
