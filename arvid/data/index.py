"""Index and validate a folder of videos (UCF-101 / Kinetics layouts) into a ``path,label`` CSV.

The report says what would otherwise surface hours into training: files that do not decode,
classes with few videos, and train/test leakage (the same file name in both splits).

    report = index_folder("/data/UCF-101", "ucf.csv", split_files=("trainlist01.txt", "testlist01.txt"))
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from arvid.data.files import (
    VIDEO_EXTENSIONS,
    BadVideoError,
    folder_class_names,
    has_split_folders,
    read_split_list,
    video_info,
    videos_under,
)
from arvid.io import atomic_write, write_json

log = logging.getLogger(__name__)


def _check(path: str) -> str | None:
    """None when ``path`` opens and its first frame decodes, else the reason."""
    try:
        video_info(path)
        return None
    except BadVideoError as e:
        return str(e)


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when it is below it (portable CSVs), else absolute."""
    try:
        return os.path.relpath(path, base).replace(os.sep, "/")
    except ValueError:  # another drive on Windows
        return str(path)


def index_folder(root: str | os.PathLike, out_csv: str | os.PathLike | None = None,
                 split_files: tuple[str | os.PathLike, str | os.PathLike] | None = None,
                 report_path: str | os.PathLike | None = None, check_decode: bool = True,
                 keep_unreadable: bool = False, workers: int = 1) -> dict:
    """List ``root/<class>/*`` (or ``root/train|val|test/<class>/*``), check it, write a CSV and a report.

    ``split_files``: UCF-101 style (train list, test list) of paths relative to ``root``; they
    fill the CSV's ``split`` column. With ``root/train`` and ``root/test`` (or ``val``) folders,
    the split is the folder. ``check_decode``: open every file and decode its first frame
    (``workers`` processes); unreadable files are listed in the report and left out of the CSV
    unless ``keep_unreadable``. The CSV (``path,label,class_name[,split]``) has paths relative
    to its own folder. The JSON report goes to ``report_path`` (default: beside the CSV, with
    ``.report.json``). Returns the report.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {str(root)!r} does not exist")
    classes = folder_class_names(root)
    if not classes:
        raise FileNotFoundError(f"{str(root)!r} has no class folders; expected {root}/<class_name>/*.mp4")
    label_of = {c: i for i, c in enumerate(classes)}

    # (path, class, split) for every video file
    entries: list[tuple[Path, str, str]] = []
    split_source = None
    if has_split_folders(root):
        split_source = "folders"
        for split in ("train", "val", "test"):
            for c in (folder_class_names(root / split) if (root / split).is_dir() else []):
                entries += [(p, c, split) for p in videos_under(root / split / c)]
    else:
        for c in classes:
            entries += [(p, c, "") for p in videos_under(root / c)]
    listed_missing: dict[str, list[str]] = {}
    if split_files is not None:
        if split_source == "folders":
            raise ValueError(f"{str(root)!r} already has train/test folders; do not also give split files")
        split_source = "files"
        train_list, test_list = (set(read_split_list(p)) for p in split_files)
        rel = {p: p.relative_to(root).as_posix() for p, _, _ in entries}
        entries = [(p, c, "train" if rel[p] in train_list else "test" if rel[p] in test_list else "")
                   for p, c, _ in entries]
        on_disk = set(rel.values())
        listed_missing = {"train": sorted(train_list - on_disk), "test": sorted(test_list - on_disk)}
    if not entries:
        raise FileNotFoundError(f"no videos under {str(root)!r} (extensions: {VIDEO_EXTENSIONS})")

    unreadable: list[dict] = []
    if check_decode:
        paths = [str(p) for p, _, _ in entries]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                reasons = list(pool.map(_check, paths, chunksize=16))
        else:
            reasons = [_check(p) for p in paths]
        unreadable = [{"path": p, "error": r} for p, r in zip(paths, reasons) if r is not None]
    bad = {u["path"] for u in unreadable}

    counts = Counter(c for p, c, _ in entries if str(p) not in bad)
    per_class = {c: int(counts.get(c, 0)) for c in classes}
    nonzero = [n for n in per_class.values() if n > 0]
    mean = sum(per_class.values()) / len(classes)
    balance = {
        "min": min(per_class.values()), "max": max(per_class.values()), "mean": round(mean, 3),
        "max_over_min": round(max(nonzero) / min(nonzero), 3) if nonzero else None,
        "empty_classes": [c for c, n in per_class.items() if n == 0],
        "small_classes": [c for c, n in per_class.items() if 0 < n < 0.5 * mean],
    }

    splits = None
    if split_source is not None:
        names = {s: {p.name for p, _, sp in entries if sp == s} for s in ("train", "val", "test")}
        held_out = names["test"] | names["val"]
        overlap = sorted(names["train"] & held_out)
        splits = {
            "source": split_source,
            "counts": dict(Counter(sp or "unassigned" for _, _, sp in entries)),
            "overlap_by_file_name": overlap[:100],
            "num_overlap": len(overlap),
            "listed_but_missing": {k: v[:100] for k, v in listed_missing.items()},
            "num_listed_but_missing": {k: len(v) for k, v in listed_missing.items()},
        }

    rows = [(p, c, sp) for p, c, sp in entries if keep_unreadable or str(p) not in bad]
    report = {
        "root": str(root), "num_files": len(entries), "num_videos": len(rows), "num_classes": len(classes),
        "num_unreadable": len(unreadable), "unreadable": unreadable, "checked_decode": check_decode,
        "class_counts": per_class, "balance": balance, "splits": splits,
        "csv": str(out_csv) if out_csv is not None else None,
    }
    if out_csv is not None:
        out_csv = Path(out_csv)
        base = out_csv.resolve().parent
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "label", "class_name"] + (["split"] if split_source else []))
        for p, c, sp in rows:
            w.writerow([_relative(p.resolve(), base), label_of[c], c] + ([sp] if split_source else []))
        with atomic_write(out_csv, "w") as f:
            f.write(buf.getvalue())
        # every class, in label order, also those left without a readable video (the rows alone
        # would lose their names, and a last such class altogether)
        with atomic_write(classes_path(out_csv), "w") as f:
            f.write("".join(f"{c}\n" for c in classes))
        report["classes_file"] = str(classes_path(out_csv))
        report_path = report_path or out_csv.with_suffix(".report.json")
    if report_path is not None:
        report["report"] = str(report_path)
        write_json(report_path, report)
    return report


def classes_path(csv_path: str | os.PathLike) -> Path:
    """The class list written beside an index CSV: ``<name>.classes.txt``, one name per line in label order."""
    p = Path(csv_path)
    return p.with_name(p.stem + ".classes.txt")


def format_summary(report: dict) -> str:
    """A few human lines about an :func:`index_folder` report."""
    b = report["balance"]
    lines = [
        f"{report['root']}: {report['num_videos']} usable videos in {report['num_classes']} classes "
        f"({report['num_files']} files, {report['num_unreadable']} unreadable"
        f"{'' if report['checked_decode'] else ', decoding not checked'})",
        f"per class: min {b['min']}, mean {b['mean']}, max {b['max']}"
        + (f", max/min {b['max_over_min']}" if b["max_over_min"] is not None else ""),
    ]
    if b["empty_classes"]:
        lines.append(f"empty classes ({len(b['empty_classes'])}): {', '.join(b['empty_classes'][:10])}")
    if b["small_classes"]:
        lines.append(f"classes under half the mean ({len(b['small_classes'])}): {', '.join(b['small_classes'][:10])}")
    for u in report["unreadable"][:5]:
        lines.append(f"unreadable: {u['error']}")
    s = report["splits"]
    if s:
        lines.append(f"splits ({s['source']}): " + ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items())))
        if s["num_overlap"]:
            lines.append(f"WARNING: {s['num_overlap']} file names are in both train and test, e.g. "
                         f"{', '.join(s['overlap_by_file_name'][:5])}")
        else:
            lines.append("train/test overlap by file name: none")
        for k, n in s["num_listed_but_missing"].items():
            if n:
                lines.append(f"{n} files in the {k} list are not on disk, e.g. {s['listed_but_missing'][k][0]}")
    if report.get("csv"):
        lines.append(f"wrote {report['csv']}" + (f" and {report['report']}" if report.get("report") else ""))
    return "\n".join(lines)
