"""A token store: a whole dataset's tokens on disk, read by memory map (design.md, Contracts).

Layout of a store directory::

    codes.bin    every video's codes back to back, uint16 (codebook <= 65536) or int32
    index.npz    offsets int64[N + 1], block_lengths int32[N, K], labels int64[N], video_ids [N]
    meta.json    format, tokenizer fingerprint, layout, codebook size, dtype, count, total codes

A writer builds the store in a hidden temporary directory beside the final one and renames it
at :meth:`TokenStoreWriter.close`, so a crash never leaves a half store under the final name.
Sharded writing (one writer per rank, or per chunk of work for finer resume): each shard is a
complete store at :func:`shard_path` ``(dir, i)``; a shard that exists is done and can be
skipped when a run resumes; :func:`merge_shards` concatenates them in shard order into ``dir``.

The reader opens its memory map lazily, once per process, so a :class:`TokenStore` pickles
small and many DataLoader workers can read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from arvid.data.types import BlockLayout, TokenizedVideo, segment_positions
from arvid.io import discard_dir, replace_dir, write_json

FORMAT = "arvid-token-store"
FORMAT_VERSION = 1
CODES_NAME, INDEX_NAME, META_NAME = "codes.bin", "index.npz", "meta.json"
_STORE_FILES = (CODES_NAME, INDEX_NAME, META_NAME)
_MERGE_CHUNK = 4096  # videos copied per step when merging shards


class TokenStoreError(ValueError):
    """A token store is missing, incomplete, or does not match what the caller expects."""


def code_dtype(codebook_size: int) -> np.dtype:
    """uint16 when every code fits (codebook <= 65536), else int32."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def is_token_store(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a complete store (it was closed: all three files exist)."""
    d = Path(directory)
    return all((d / n).is_file() for n in _STORE_FILES)


def shard_path(directory: str | os.PathLike, shard: int) -> Path:
    """Where shard ``shard`` of the store ``directory`` is written: ``<dir>.shards/shard_<shard>``.

    Beside, not inside, the final directory: until :func:`merge_shards` runs there is nothing
    under the final name.
    """
    d = Path(directory)
    return d.parent / f"{d.name}.shards" / f"shard_{int(shard)}"


def _ids_array(ids: list) -> np.ndarray:
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ids):
        return np.asarray(ids, dtype=np.int64)
    return np.asarray([str(x) for x in ids], dtype=np.str_)


class TokenStoreWriter:
    """Append tokenized videos; :meth:`close` makes the store appear under ``directory`` at once.

    ``TokenStoreWriter(dir, fingerprint, layout, codebook_size)``; use as a context manager
    (an exception inside discards everything) or call :meth:`close` / :meth:`abort`. The
    constructor does no I/O; the temporary directory is made at the first :meth:`append`.
    ``overwrite``: replace an existing store at ``directory`` on close (else an error).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str, layout: BlockLayout, codebook_size: int,
                 overwrite: bool = False) -> None:
        self.directory = Path(directory)
        self.fingerprint = str(fingerprint)
        self.layout = layout
        self.codebook_size = int(codebook_size)
        self.dtype = code_dtype(self.codebook_size)
        self.overwrite = overwrite
        self._tmp: Path | None = None
        self._codes_file = None
        self._lengths: list[np.ndarray] = []  # [b, K] per append
        self._labels: list[int] = []
        self._ids: list = []
        self._total = 0
        self._closed = False

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self._labels)

    def _open(self) -> None:
        if self._closed:
            raise TokenStoreError(f"token store writer for {str(self.directory)!r} is already closed")
        if self._tmp is None:
            if is_token_store(self.directory) and not self.overwrite:
                raise TokenStoreError(f"a token store already exists at {str(self.directory)!r}; "
                                      "remove it or pass overwrite=True")
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(dir=self.directory.parent, prefix=f".{self.directory.name}.",
                                              suffix=".tmp"))
            self._codes_file = open(self._tmp / CODES_NAME, "wb")

    def append(self, tokens: TokenizedVideo, labels: Sequence[int] | torch.Tensor | None = None,
               video_ids: Sequence[int | str] | torch.Tensor | None = None) -> None:
        """Add a batch: ``tokens`` (B videos), ``labels[B]`` (None: -1), ``video_ids[B]`` (None: running count)."""
        b = tokens.batch_size
        bl = tokens.block_lengths.detach().cpu().long()
        if bl.shape[1] != self.layout.num_blocks:
            raise TokenStoreError(f"tokens have {bl.shape[1]} blocks per video but the store's layout has "
                                  f"{self.layout.num_blocks}")
        if b:
            self.layout.candidate_positions(bl)  # raises on a count that is not a candidate
        codes = tokens.codes.detach().cpu()
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TokenStoreError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise TokenStoreError(f"codes must be in [0, {self.codebook_size}), got range "
                                  f"[{int(codes.min())}, {int(codes.max())}]")
        if labels is None:
            labels_l = [-1] * b
        else:
            labels_l = [int(x) for x in (labels.reshape(-1).tolist() if isinstance(labels, torch.Tensor) else labels)]
        if video_ids is None:
            ids_l: list = list(range(len(self._labels), len(self._labels) + b))
        elif isinstance(video_ids, torch.Tensor):
            ids_l = [int(x) for x in video_ids.reshape(-1).tolist()]
        else:
            ids_l = list(video_ids)
        if len(labels_l) != b or len(ids_l) != b:
            raise TokenStoreError(f"append got {b} videos but {len(labels_l)} labels and {len(ids_l)} video ids")
        self._open()
        self._codes_file.write(codes.numpy().astype(self.dtype, copy=False).tobytes())
        self._lengths.append(bl.numpy().astype(np.int32))
        self._labels.extend(labels_l)
        self._ids.extend(ids_l)
        self._total += codes.numel()

    def close(self) -> Path:
        """Finish the store: write the index and meta, fsync, rename into place. Returns the directory."""
        if self._closed:
            return self.directory
        self._open()  # an empty store is still a store
        try:
            self._codes_file.flush()
            os.fsync(self._codes_file.fileno())
            self._codes_file.close()
            K = self.layout.num_blocks
            lengths = np.concatenate(self._lengths) if self._lengths else np.zeros((0, K), np.int32)
            offsets = np.zeros(len(lengths) + 1, np.int64)
            np.cumsum(lengths.sum(1), out=offsets[1:])
            with open(self._tmp / INDEX_NAME, "wb") as f:
                np.savez(f, offsets=offsets, block_lengths=lengths, labels=np.asarray(self._labels, np.int64),
                         video_ids=_ids_array(self._ids))
                f.flush()
                os.fsync(f.fileno())
            write_json(self._tmp / META_NAME, {
                "format": FORMAT, "version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                "layout": self.layout.to_dict(), "codebook_size": self.codebook_size, "dtype": self.dtype.name,
                "count": int(len(lengths)), "total_codes": int(self._total),
            })
            replace_dir(self._tmp, self.directory)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.directory

    def abort(self) -> None:
        """Discard everything written; nothing appears under the final name."""
        if self._codes_file is not None and not self._codes_file.closed:
            self._codes_file.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None
        self._closed = True


class TokenStore:
    """Read a token store. ``store[i]`` -> ``dict(codes=LongTensor[L], block_lengths=LongTensor[K],
    label=int, video_id=int|str)``; :meth:`get_batch` -> :class:`TokenizedVideo`.

    Index and meta load at first use; the codes memory map opens once per process (it is not
    pickled), so the store can go to DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self._meta: dict | None = None
        self._index: dict[str, np.ndarray] | None = None
        self._codes: np.ndarray | None = None
        self._codes_pid: int | None = None

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        if self._meta is not None:
            return
        d = self.directory
        if not d.is_dir():
            raise TokenStoreError(f"token store {str(d)!r} does not exist")
        missing = [n for n in _STORE_FILES if not (d / n).is_file()]
        if missing and is_token_store(d / "tokens"):  # the `arvid tokenize` out_dir, not its store
            raise TokenStoreError(f"{str(d)!r} is not a token store, but it holds one: give {str(d / 'tokens')!r} "
                                  "(`arvid tokenize` writes its store to out_dir/tokens)")
        if missing:
            raise TokenStoreError(f"{str(d)!r} is not a complete token store: missing {missing} "
                                  "(an interrupted tokenize run? run it again)")
        try:
            with open(d / META_NAME, encoding="utf-8") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenStoreError(f"{str(d / META_NAME)!r} is not valid JSON (a damaged token store?): {e}") from None
        if not isinstance(meta, dict):
            raise TokenStoreError(f"{str(d / META_NAME)!r} is not a token store's metadata (a JSON object expected)")
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise TokenStoreError(f"{str(d / META_NAME)!r} is not an {FORMAT} v{FORMAT_VERSION} "
                                  f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
        keys = ("offsets", "block_lengths", "labels", "video_ids")
        try:
            with np.load(d / INDEX_NAME, allow_pickle=False) as z:
                index = {k: z[k] for k in keys}
        except (ValueError, OSError, KeyError, EOFError) as e:  # not an npz, pickled data, a missing array
            raise TokenStoreError(f"{str(d / INDEX_NAME)!r} is not a readable token store index (arrays "
                                  f"{', '.join(keys)} expected; a damaged store?): {e}") from None
        try:
            count = int(meta["count"])
            expect = int(meta["total_codes"]) * np.dtype(meta["dtype"]).itemsize
        except (KeyError, TypeError, ValueError) as e:
            raise TokenStoreError(f"{str(d / META_NAME)!r} lacks a valid count, total_codes or dtype ({e!r}): "
                                  "a damaged token store?") from None
        rows = [len(index["offsets"]) - 1, *(len(index[k]) for k in keys[1:])]
        if any(r != count for r in rows):
            raise TokenStoreError(f"{str(d / META_NAME)!r} says {count} videos but {str(d / INDEX_NAME)!r} holds "
                                  f"{rows[0]} (offsets), {rows[1]} (block_lengths), {rows[2]} (labels), "
                                  f"{rows[3]} (video_ids): the store is corrupt")
        size = (d / CODES_NAME).stat().st_size
        if size != expect or int(index["offsets"][-1]) != int(meta["total_codes"]):
            raise TokenStoreError(f"{str(d / CODES_NAME)!r} has {size} bytes but the index expects {expect}: "
                                  "the store is corrupt")
        self._index, self._meta = index, meta

    def _codes_array(self) -> np.ndarray:
        self._load()
        if self._codes is None or self._codes_pid != os.getpid():
            total = int(self._meta["total_codes"])
            dtype = np.dtype(self._meta["dtype"])
            self._codes = (np.memmap(self.directory / CODES_NAME, dtype=dtype, mode="r", shape=(total,))
                           if total else np.zeros(0, dtype))
            self._codes_pid = os.getpid()
        return self._codes

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_codes"] = None  # each process maps the file itself
        state["_codes_pid"] = None
        return state

    # ------------------------------------------------------------------ metadata
    @property
    def meta(self) -> dict:
        self._load()
        return dict(self._meta)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def layout(self) -> BlockLayout:
        lay = self.meta["layout"]
        return BlockLayout(tuple(lay["frames_per_block"]), tuple(lay["candidates"]))

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    def __len__(self) -> int:
        self._load()
        return int(self._meta["count"])

    @property
    def labels(self) -> torch.Tensor:
        """``LongTensor[N]`` (-1 where none was given)."""
        self._load()
        return torch.from_numpy(self._index["labels"].astype(np.int64))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per video, ``int64[N]`` (for packing samplers)."""
        self._load()
        return np.diff(self._index["offsets"])

    @property
    def block_lengths(self) -> torch.Tensor:
        """``LongTensor[N, K]``."""
        self._load()
        return torch.from_numpy(self._index["block_lengths"].astype(np.int64))

    @property
    def video_ids(self) -> list:
        self._load()
        return self._index["video_ids"].tolist()

    def check_fingerprint(self, expected: str) -> None:
        """Raise :class:`TokenStoreError` unless the store was written by the tokenizer ``expected``."""
        if self.fingerprint != expected:
            raise TokenStoreError(
                f"token store {str(self.directory)!r} was written by tokenizer fingerprint "
                f"{self.fingerprint[:16]}..., but the tokenizer in use has {str(expected)[:16]}...: its codes "
                "would decode to garbage. Re-run `arvid tokenize` with this tokenizer, or use the one that wrote it.")

    # ------------------------------------------------------------------ access
    def __getitem__(self, i: int) -> dict:
        i = int(self._check_indices([i])[0])
        codes = self._codes_array()
        off = self._index["offsets"]
        c = torch.from_numpy(np.asarray(codes[int(off[i]):int(off[i + 1])]).astype(np.int64))
        vid = self._index["video_ids"][i].item()
        return {"codes": c, "block_lengths": torch.from_numpy(self._index["block_lengths"][i].astype(np.int64)),
                "label": int(self._index["labels"][i]), "video_id": vid}

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> TokenizedVideo:
        """The videos ``indices`` packed in that order: ``TokenizedVideo(codes[sum L], block_lengths[B, K])``."""
        idx = self._check_indices(indices)
        codes = self._codes_array()
        off = self._index["offsets"]
        # one gather over the codes (no per-video slices): every wanted position at once
        starts, counts = off[idx].astype(np.int64), (off[idx + 1] - off[idx]).astype(np.int64)
        flat = np.asarray(codes[np.repeat(starts, counts) + segment_positions(counts)]).astype(np.int64)
        bl = self._index["block_lengths"][idx].astype(np.int64).reshape(len(idx), self.layout.num_blocks)
        return TokenizedVideo(torch.from_numpy(flat), torch.from_numpy(bl))

    def labels_of(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``LongTensor[len(indices)]`` labels of the videos ``indices`` (-1 where none was given)."""
        idx = self._check_indices(indices)  # loads the index first
        return torch.from_numpy(self._index["labels"][idx].astype(np.int64))

    def _check_indices(self, indices: Sequence[int] | torch.Tensor) -> np.ndarray:
        """``int64[n]`` of ``indices`` with negative ones wrapped; IndexError naming the first bad one."""
        n = len(self)
        idx = np.asarray(torch.as_tensor(indices, dtype=torch.long).reshape(-1)).copy()
        idx[idx < 0] += n
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            raise IndexError(f"token store index {int(idx[np.argmax(bad)])} out of range [0, {n})")
        return idx


def merge_shards(directory: str | os.PathLike, num_shards: int | None = None, remove: bool = True,
                 overwrite: bool = False) -> TokenStore:
    """Concatenate shards ``shard_path(directory, 0..num_shards-1)`` into one store at ``directory``.

    ``num_shards`` None: every ``shard_*`` present. All shards must exist and agree on
    fingerprint, layout and codebook size (a clear error otherwise). ``remove``: delete the
    shards after the merged store is in place.
    """
    directory = Path(directory)
    shard_root = shard_path(directory, 0).parent
    if num_shards is None:
        found = sorted(int(p.name.split("_", 1)[1]) for p in shard_root.glob("shard_*")
                       if p.name.split("_", 1)[1].isdigit()) if shard_root.is_dir() else []
        if not found:
            raise TokenStoreError(f"no shards to merge under {str(shard_root)!r}")
        num_shards = max(found) + 1
    shards = [shard_path(directory, i) for i in range(num_shards)]
    missing = [str(p) for p in shards if not is_token_store(p)]
    if missing:
        raise TokenStoreError(f"cannot merge into {str(directory)!r}: {len(missing)} shard(s) missing or "
                              f"incomplete: {missing[:8]}")
    stores = [TokenStore(p) for p in shards]
    first = stores[0]
    for s in stores[1:]:
        for what in ("fingerprint", "codebook_size"):
            if getattr(s, what) != getattr(first, what):
                raise TokenStoreError(f"shard {str(s.directory)!r} has {what} {getattr(s, what)!r}, "
                                      f"but {str(first.directory)!r} has {getattr(first, what)!r}")
        if s.layout != first.layout:
            raise TokenStoreError(f"shard {str(s.directory)!r} has layout {s.layout}, but "
                                  f"{str(first.directory)!r} has {first.layout}")
    with TokenStoreWriter(directory, first.fingerprint, first.layout, first.codebook_size,
                          overwrite=overwrite) as w:
        for s in stores:
            labels, ids = s.labels, s.video_ids
            for lo in range(0, len(s), _MERGE_CHUNK):  # bounded memory for large shards
                hi = min(len(s), lo + _MERGE_CHUNK)
                w.append(s.get_batch(range(lo, hi)), labels[lo:hi], ids[lo:hi])
    if remove:
        remove_shards(directory)
    return TokenStore(directory)


def remove_shards(directory: str | os.PathLike) -> None:
    """Delete the shards of the store ``directory`` (``<dir>.shards``), if any.

    The shard folder is first renamed to a hidden ``.<dir>.shards.old-<pid>`` (one atomic step),
    then deleted: a process killed mid-delete leaves a hidden temporary, never a visible
    ``shard_<i>`` that lost some of its files; the next call deletes such leftovers too.
    """
    shard_root = shard_path(directory, 0).parent
    if shard_root.exists():
        discard_dir(shard_root)
    for old in shard_root.parent.glob(f".{shard_root.name}.old-*"):  # killed runs' debris
        shutil.rmtree(old, ignore_errors=True)
