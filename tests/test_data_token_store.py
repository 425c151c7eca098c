"""The token store: exact round trips, atomic close, fingerprint checks, shards, worker-safe reads."""

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from arvid.data.token_store import (
    TokenStore,
    TokenStoreError,
    TokenStoreWriter,
    is_token_store,
    merge_shards,
    remove_shards,
    shard_path,
)
from arvid.data.types import BlockLayout, TokenizedVideo

LAYOUT = BlockLayout((2, 2, 2), (4, 8, 16))


def random_tokens(n: int, seed: int, codebook: int = 1000) -> TokenizedVideo:
    g = torch.Generator().manual_seed(seed)
    bl = LAYOUT.random_assignments(n, generator=g)  # [n, 3]
    codes = torch.randint(codebook, (int(bl.sum()),), generator=g)
    return TokenizedVideo(codes, bl)


def write_store(path, batches, fingerprint="fp-a", codebook=1000):
    with TokenStoreWriter(path, fingerprint, LAYOUT, codebook) as w:
        for tok, labels, ids in batches:
            w.append(tok, labels, ids)
    return TokenStore(path)


def test_round_trip_exact_across_reopen(tmp_path):
    batches = [(random_tokens(n, seed=n), torch.arange(n) % 5, [f"vid{k}_{i}" for i in range(n)])
               for k, n in enumerate((3, 1, 6))]
    path = tmp_path / "store"
    write_store(path, batches)
    everything = TokenizedVideo.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    ids = sum((b[2] for b in batches), [])

    store = TokenStore(path)  # a fresh reader: nothing cached from the writer
    assert len(store) == 10 and store.fingerprint == "fp-a"
    assert store.layout == LAYOUT and store.codebook_size == 1000
    for i in range(10):
        item = store[i]
        assert torch.equal(item["codes"], everything.video_codes(i))
        assert item["codes"].dtype == torch.long
        assert torch.equal(item["block_lengths"], everything.block_lengths[i])
        assert item["label"] == int(labels[i]) and item["video_id"] == ids[i]
    assert torch.equal(store.labels, labels)
    np.testing.assert_array_equal(store.lengths, everything.lengths.numpy())
    order = [7, 0, 9, 3, 3]
    assert store.get_batch(order).equal(everything.select(order))
    assert store[-1]["video_id"] == ids[-1]
    with pytest.raises(IndexError):
        store[10]
    # codes are stored as uint16 for a codebook <= 65536: 2 bytes each
    assert (path / "codes.bin").stat().st_size == 2 * everything.codes.numel()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["count"] == 10 and meta["dtype"] == "uint16" and meta["layout"]["candidates"] == [4, 8, 16]


def test_large_codebook_uses_int32_and_int_ids(tmp_path):
    tok = random_tokens(4, seed=1, codebook=100_000)
    tok.codes[0] = 99_999
    store = write_store(tmp_path / "s", [(tok, None, None)], codebook=100_000)
    assert store.meta["dtype"] == "int32"
    assert store.get_batch(range(4)).equal(tok)
    assert store.video_ids == [0, 1, 2, 3] and store.labels.tolist() == [-1] * 4


def test_fingerprint_mismatch_raises(tmp_path):
    store = write_store(tmp_path / "s", [(random_tokens(2, 0), [0, 1], [0, 1])], fingerprint="abc123")
    store.check_fingerprint("abc123")
    with pytest.raises(TokenStoreError, match="abc123.*zzz999"):
        store.check_fingerprint("zzz999")


def test_interrupted_writer_leaves_no_store(tmp_path):
    path = tmp_path / "store"
    with pytest.raises(RuntimeError, match="crash"):
        with TokenStoreWriter(path, "fp", LAYOUT, 1000) as w:
            w.append(random_tokens(3, 0), [0, 1, 2], [0, 1, 2])
            raise RuntimeError("crash mid-way")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too
    # a writer that dies without close (kill -9): still nothing under the final name
    w = TokenStoreWriter(path, "fp", LAYOUT, 1000)
    w.append(random_tokens(3, 0), [0, 1, 2], [0, 1, 2])
    assert not path.exists() and not is_token_store(path)
    with pytest.raises(TokenStoreError, match="does not exist"):
        len(TokenStore(path))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_the_tokenize_out_dir_given_for_its_store_is_named(tmp_path):
    """`arvid tokenize` writes its store to out_dir/tokens; given the out_dir, the reader said the store
    was incomplete and to run tokenize again (which finds it done)."""
    write_store(tmp_path / "run" / "tokens", [(random_tokens(2, 0), [0, 1], [0, 1])])
    with pytest.raises(TokenStoreError, match=r"is not a token store, but it holds one: give '.*run/tokens'"):
        len(TokenStore(tmp_path / "run"))
    (tmp_path / "other").mkdir()
    with pytest.raises(TokenStoreError, match="not a complete token store"):
        len(TokenStore(tmp_path / "other"))


def test_existing_store_needs_overwrite(tmp_path):
    path = tmp_path / "s"
    write_store(path, [(random_tokens(2, 0), [0, 0], [0, 1])])
    with pytest.raises(TokenStoreError, match="already exists"):
        write_store(path, [(random_tokens(3, 1), [1, 1, 1], [0, 1, 2])])
    assert len(TokenStore(path)) == 2  # untouched
    with TokenStoreWriter(path, "fp-b", LAYOUT, 1000, overwrite=True) as w:
        w.append(random_tokens(3, 1), [1, 1, 1], [0, 1, 2])
    assert len(TokenStore(path)) == 3 and TokenStore(path).fingerprint == "fp-b"


def test_append_validates(tmp_path):
    w = TokenStoreWriter(tmp_path / "s", "fp", LAYOUT, 1000)
    tok = random_tokens(2, 0)
    with pytest.raises(TokenStoreError, match=r"codes must be in \[0, 1000\)"):
        w.append(TokenizedVideo(tok.codes + 1000, tok.block_lengths), [0, 0], [0, 1])
    with pytest.raises(ValueError, match="not candidates"):
        w.append(TokenizedVideo(torch.zeros(15, dtype=torch.long), torch.tensor([[5, 5, 5]])), [0], [0])
    with pytest.raises(TokenStoreError, match="blocks"):
        w.append(TokenizedVideo(torch.zeros(8, dtype=torch.long), torch.tensor([[4, 4]])), [0], [0])
    with pytest.raises(TokenStoreError, match="labels"):
        w.append(tok, [0], [0, 1])
    w.abort()


def test_corrupt_codes_file_is_detected(tmp_path):
    path = tmp_path / "s"
    write_store(path, [(random_tokens(3, 0), [0, 0, 0], [0, 1, 2])])
    with open(path / "codes.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(TokenStoreError, match="corrupt"):
        len(TokenStore(path))


def test_shards_merge_in_order(tmp_path):
    final = tmp_path / "tokens"
    parts = [random_tokens(n, seed=10 + n) for n in (2, 3, 1)]
    for r, tok in enumerate(parts):
        ids = [f"r{r}_{i}" for i in range(tok.batch_size)]
        with TokenStoreWriter(shard_path(final, r), "fp", LAYOUT, 1000) as w:
            w.append(tok, [r] * tok.batch_size, ids)
    assert not final.exists()  # shards live beside the final store
    with pytest.raises(TokenStoreError, match="missing"):
        merge_shards(final, num_shards=4)
    store = merge_shards(final)
    assert len(store) == 6 and store.get_batch(range(6)).equal(TokenizedVideo.cat(parts))
    assert store.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert store[2]["video_id"] == "r1_0"
    assert not shard_path(final, 0).parent.exists()


def test_shard_removal_never_leaves_a_visible_partial_shard(tmp_path, monkeypatch):
    """A kill mid-delete (here: rmtree stops after the first file) leaves only hidden debris."""
    import shutil

    import arvid.io

    final = tmp_path / "tokens"
    for r in range(3):
        with TokenStoreWriter(shard_path(final, r), "fp", LAYOUT, 1000) as w:
            w.append(random_tokens(2, r), [r, r], [2 * r, 2 * r + 1])
    merge_shards(final, remove=False)
    deleted = []

    def killed_rmtree(path, ignore_errors=False):
        victim = next(p for p in sorted(Path(path).rglob("*")) if p.is_file())
        victim.unlink()
        deleted.append(Path(path))
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(arvid.io, "shutil", SimpleNamespace(rmtree=killed_rmtree))  # discard_dir's delete
    with pytest.raises(KeyboardInterrupt):
        remove_shards(final)
    assert [p.name for p in deleted] == [f".tokens.shards.old-{os.getpid()}"]
    visible = [p for p in tmp_path.rglob("*") if not any(q.startswith(".") for q in p.relative_to(tmp_path).parts)]
    assert sorted(p.name for p in visible) == ["codes.bin", "index.npz", "meta.json", "tokens"]
    monkeypatch.setattr(arvid.io, "shutil", shutil)
    remove_shards(final)  # the killed run's hidden leftover goes too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]
    assert len(TokenStore(final)) == 6


def test_shards_with_different_fingerprints_refuse_to_merge(tmp_path):
    final = tmp_path / "tokens"
    for r, fp in enumerate(("fp-a", "fp-b")):
        with TokenStoreWriter(shard_path(final, r), fp, LAYOUT, 1000) as w:
            w.append(random_tokens(1, r), [0], [r])
    with pytest.raises(TokenStoreError, match="fingerprint"):
        merge_shards(final)
    assert not final.exists()


def test_picklable_and_readable_from_workers(tmp_path):
    tok = random_tokens(12, 3)
    store = write_store(tmp_path / "s", [(tok, list(range(12)), list(range(12)))])
    store[0]  # opens the memory map in this process
    clone = pickle.loads(pickle.dumps(store))
    assert clone._codes is None and torch.equal(clone[5]["codes"], tok.video_codes(5))

    loader = DataLoader(store, batch_size=None, num_workers=2)
    got = {item["video_id"]: item["codes"] for item in loader}
    assert len(got) == 12
    for i in range(12):
        assert torch.equal(got[i], tok.video_codes(i))
