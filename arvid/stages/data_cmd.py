"""`arvid data synth` and `arvid data index`: write the synthetic set as video files; index a folder.

    arvid data synth outputs/synth --format mp4 --num 1000 --frames 16 --size 64
    arvid data index /data/UCF-101 --out ucf.csv --split-files trainlist01.txt testlist01.txt
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os

from arvid.config import changed_keys, int_at_least, to_dict
from arvid.data.index import format_summary, index_folder
from arvid.data.synthetic import SyntheticConfig, SyntheticVideos
from arvid.data.writer import write_video
from arvid.io import atomic_write, check_writable, read_json, write_json

log = logging.getLogger(__name__)


def class_folder(label: int, name: str) -> str:
    """The folder of a synthetic class: its label, zero-padded, then its name (``03_circular``)."""
    return f"{label:02d}_{name}"


def synth(out: str | os.PathLike, fmt: str = "mp4", num: int = 1000, seed: int = 0, frames: int = 16,
          size: int = 64, fps: int = 8, config: SyntheticConfig | None = None) -> dict:
    """Write ``num`` synthetic clips as ``out/<NN_class>/<index>.<fmt>`` plus ``out/list.csv`` (path,label).

    Resumable: a clip file that exists is complete (files are written atomically) and is kept,
    when ``out/synth.json`` says it was made with the same settings (another ``num`` is fine);
    other settings are a ValueError naming them.
    Returns ``dict(out, csv, num, written, classes)``.
    """
    if fmt not in ("mp4", "gif"):
        raise ValueError(f"--format must be mp4 or gif, got {fmt!r}")
    for name, value in (("--num", num), ("--frames", frames), ("--size", size), ("--fps", fps)):
        if value < 1:  # checked before synth.json records the settings
            raise ValueError(f"{name} must be >= 1, got {value}")
    ds = SyntheticVideos(num, frames=frames, size=size, seed=seed, config=config)  # its own checks first
    out = check_writable(out)
    # the clips' settings: a rerun keeps existing clips only when they were made with the same ones
    # (before 2026-12-07 any existing file was kept, and list.csv described the new settings)
    settings = {"format": fmt, "seed": seed, "frames": frames, "size": size, "fps": fps,
                "synthetic": to_dict(config or SyntheticConfig())}
    record = out / "synth.json"
    if record.is_file():
        changed = changed_keys(read_json(record), settings)
        if changed:
            raise ValueError(f"{str(out)!r} holds synthetic clips made with other settings ({', '.join(changed)} "
                             "changed): give another directory, or delete that one")
    elif any(out.glob(f"*/*.{fmt}")):
        log.warning("synth: %s holds clips but no synth.json (an older version): they are kept as they are, "
                    "whatever settings made them", out)
    write_json(record, settings)
    rows = []
    written = 0
    for i in range(num):
        label = ds.label_of(i)
        # "03_circular": sorted folder names give the synthetic label order, so a folder
        # dataset over `out` and the CSV agree on labels
        rel = f"{class_folder(label, ds.class_names[label])}/{i:06d}.{fmt}"
        path = out / rel
        if not path.is_file():
            write_video(ds.render(i), path, fps=fps)
            written += 1
        rows.append((rel, label))
        if (i + 1) % 500 == 0:
            log.info("synth: %d / %d clips", i + 1, num)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"])
    w.writerows(rows)
    with atomic_write(out / "list.csv", "w") as f:
        f.write(buf.getvalue())
    return {"out": str(out), "csv": str(out / "list.csv"), "num": num, "written": written,
            "classes": list(ds.class_names)}


def index(root: str | os.PathLike, out_csv: str | os.PathLike, split_files: tuple[str, str] | None = None,
          report: str | os.PathLike | None = None, check_decode: bool = True, workers: int = 1,
          keep_unreadable: bool = False) -> dict:
    """Index and validate ``root`` into ``out_csv`` and a JSON report; prints a summary. Returns the report."""
    rep = index_folder(root, out_csv, split_files=split_files, report_path=report, check_decode=check_decode,
                       keep_unreadable=keep_unreadable, workers=workers)
    print(format_summary(rep))
    return rep


def _run_synth(args: argparse.Namespace) -> int:
    res = synth(args.out, fmt=args.format, num=args.num, seed=args.seed, frames=args.frames, size=args.size,
                fps=args.fps)
    # labels cycle from clip 0: fewer clips than classes hold only the first classes (before, all 10 were named)
    print(f"wrote {res['written']} new clips ({res['num']} in all, {min(res['num'], len(res['classes']))} classes) "
          f"under {res['out']}; list: {res['csv']}")
    return 0


def _run_index(args: argparse.Namespace) -> int:
    rep = index(args.root, args.out, split_files=tuple(args.split_files) if args.split_files else None,
                report=args.report, check_decode=not args.no_decode_check, workers=args.workers,
                keep_unreadable=args.keep_unreadable)
    return 1 if args.strict and (rep["num_unreadable"] or (rep["splits"] or {}).get("num_overlap")) else 0


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register ``data synth`` and ``data index`` under a ``data`` command group."""
    data = subparsers.add_parser("data", help="datasets: write the synthetic set to files, index a video folder")
    data.set_defaults(func=lambda args, _p=data: _p.print_help() or 2)
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    p = sub.add_parser("synth", help="write the built-in synthetic clips as video files + list.csv")
    p.add_argument("out", help="output folder (gets <NN_class_name>/*.mp4 and list.csv)")
    p.add_argument("--format", choices=("mp4", "gif"), default="mp4", help="file format (default mp4)")
    p.add_argument("--num", type=int_at_least(1), default=1000, help="number of clips (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="synthetic seed (default 0)")
    p.add_argument("--frames", type=int_at_least(1), default=16, help="frames per clip (default 16)")
    p.add_argument("--size", type=int_at_least(4), default=64, help="height = width in pixels, at least 4 (default 64)")
    p.add_argument("--fps", type=int_at_least(1), default=8, help="frame rate written into the files (default 8)")
    p.set_defaults(func=_run_synth)

    p = sub.add_parser("index", help="build and validate a path,label CSV of a UCF-101 / Kinetics style folder")
    p.add_argument("root", help="folder with <class>/*.mp4 (or train/<class>/..., test/<class>/...)")
    p.add_argument("--out", required=True, help="CSV to write (path,label,class_name[,split])")
    p.add_argument("--split-files", nargs=2, metavar=("TRAINLIST", "TESTLIST"),
                   help="UCF-101 style split lists (paths relative to ROOT)")
    p.add_argument("--report", help="JSON report path (default: beside the CSV, .report.json)")
    p.add_argument("--workers", type=int_at_least(0), default=1,
                   help="processes for the decode check (default 1; 0 or 1: in this process)")
    p.add_argument("--no-decode-check", action="store_true", help="do not open every file")
    p.add_argument("--keep-unreadable", action="store_true", help="keep unreadable files in the CSV")
    p.add_argument("--strict", action="store_true", help="exit 1 on unreadable files or train/test overlap")
    p.set_defaults(func=_run_index)


__all__ = ["synth", "index", "add_arguments", "class_folder"]
