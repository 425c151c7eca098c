"""`arvid tokenize CONFIG [key=value ...]`: encode a dataset once into a token store.

Each video's assignment comes from, in order of precedence: ``fixed_assignment`` (one count per
block for every video), ``assignments`` (a ``.npy`` of assignment indices per dataset index,
e.g. ``labels.npy`` of `arvid curate`), ``router`` (a trained router directory), or else the
tokenizer's own choice (its attached router or default assignment).

Sharded and resumable: the split is cut into chunks of ``save_every`` videos; chunk c is
written by process ``c % world`` as a complete token-store shard (atomic, see
:mod:`arvid.data.token_store`), so a rerun skips finished chunks (of the same config, checked
against ``config.yaml``, and tokenizer fingerprint; another config is refused); the main process merges them
in order into ``out_dir/tokens``. Writes ``tokenize_stats.json`` (mean tokens per video, the
histogram of assignments), ``config.yaml`` and ``done``. A file that cannot be decoded
(``data.on_bad_video: skip``) is left out of the store, logged with a count.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from arvid.config import ConfigError, check_same_config, doc, load_config, nested, save_config
from arvid.data.datasets import DataConfig, build_dataset, requested
from arvid.data.token_store import (
    TokenStore,
    TokenStoreWriter,
    is_token_store,
    merge_shards,
    remove_shards,
    shard_path,
)
from arvid.io import check_writable, write_json
from arvid.stages.curate import process_info
from arvid.tokenizer.base import load_tokenizer
from arvid.training.device import inference_autocast, resolve_device

log = logging.getLogger("arvid.tokenize")


@dataclass
class TokenizeConfig:
    """Encode a dataset split into a token store with chosen assignments."""

    data: DataConfig = nested(DataConfig, "the videos (fixed clip starts recommended: random_start: false)")
    split: Literal["train", "val", "test"] = doc("train", "dataset split")
    num_videos: int | None = doc(None, "only the first N videos (null: all)")
    tokenizer: str = doc("", "tokenizer directory (the final tokenizer)")
    router: str | None = doc(None, "router directory: its choice per video")
    router_budget_bias: float = doc(0.0, "router budget bias (> 0: fewer tokens)")
    assignments: str | None = doc(None, ".npy of assignment indices per dataset index (e.g. curate's labels.npy)")
    fixed_assignment: list[int] | None = doc(None, "one token count per block for every video")
    batch_size: int = doc(32, "videos per encode")
    # not execution-only: chunk c holds videos [c * save_every, (c + 1) * save_every), so a resumed run
    # must keep it (the pipeline resumes an interrupted stage only under the same fingerprint)
    save_every: int = doc(1024, "videos per shard (the resume granularity)")
    num_workers: int = doc(0, "DataLoader workers", execution=True)
    device: str = doc("auto", "auto (accelerator, else cpu), cpu, cuda ...")
    precision: Literal["auto", "fp32", "bf16"] = doc("auto", "tokenizer inference: auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    out_dir: str = doc("outputs/tokens", "output directory; the store is out_dir/tokens")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.save_every < 1:
            raise ValueError("batch_size and save_every must be >= 1")
        if self.num_videos is not None and self.num_videos < 1:
            raise ValueError(f"num_videos must be >= 1 or null (all), got {self.num_videos}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if sum(x is not None for x in (self.router, self.assignments, self.fixed_assignment)) > 1:
            raise ValueError("give at most one of router, assignments, fixed_assignment")


def _video_id(dataset, index: int):
    fn = getattr(dataset, "video_id", None)
    return fn(index) if callable(fn) else int(index)


class _Chooser:
    """The assignment of a batch of videos, from the configured source."""

    def __init__(self, cfg: TokenizeConfig, layout, n_total: int, device: torch.device):
        self.layout = layout
        self.fixed = self.table = self.router = None
        self.bias = cfg.router_budget_bias
        if cfg.fixed_assignment is not None:
            self.fixed = layout.validate(torch.tensor(cfg.fixed_assignment))
            self.source = f"fixed {list(cfg.fixed_assignment)}"
        elif cfg.assignments is not None:
            path = Path(cfg.assignments)
            if not path.is_file():
                raise FileNotFoundError(f"assignments file {str(path)!r} does not exist")
            table = np.load(path, allow_pickle=False).astype(np.int64).reshape(-1)
            if table.size < n_total:
                raise ConfigError(f"{str(path)!r} has {table.size} assignments but the split has {n_total} videos")
            bad = np.flatnonzero((table[:n_total] < 0) | (table[:n_total] >= layout.num_assignments))
            if bad.size:
                raise ConfigError(f"{str(path)!r}: videos {bad[:8].tolist()} have no valid assignment index "
                                  f"(need 0..{layout.num_assignments - 1}; -1 means not curated)")
            self.table = torch.from_numpy(table)
            self.source = f"assignments {str(path)}"
        elif cfg.router is not None:
            from arvid.tokenizer.router import Router

            self.router = Router.from_pretrained(cfg.router, map_location=str(device)).eval()
            if self.router.layout != layout:
                raise ConfigError(f"router layout {self.router.layout} differs from the tokenizer's {layout}")
            self.source = f"router {cfg.router}"
        else:
            self.source = "tokenizer default"

    def __call__(self, indices: torch.Tensor, video: torch.Tensor) -> torch.Tensor | None:
        if self.fixed is not None:
            return self.fixed.expand(video.shape[0], -1).to(video.device)
        if self.table is not None:
            return self.layout.indices_to_assignments(self.table[indices]).to(video.device)
        if self.router is not None:
            return self.router.choose(video, self.bias)
        return None


def run(cfg: TokenizeConfig) -> Path:
    """Tokenize ``cfg.split`` into ``out_dir/tokens``; returns ``out_dir``."""
    if not cfg.tokenizer:
        raise ConfigError("tokenize: `tokenizer` (a tokenizer directory) is required")
    out = check_writable(cfg.out_dir)
    dist = process_info()
    device = resolve_device(cfg.device)
    store_dir = out / "tokens"
    if is_token_store(store_dir) or shard_path(store_dir, 0).parent.exists():
        # tokens of another config (assignment source, N, data, tokenizer path) are not continued
        # nor taken for finished (before 2026-12-07 a rerun reused any shard that existed)
        check_same_config(TokenizeConfig, cfg, out / "config.yaml", f"tokenize: the tokens in {str(out)!r}",
                          allowed=("batch_size", "device"))  # the same codes in other batches, elsewhere
    if dist.rank == 0:
        save_config(cfg, out / "config.yaml")
    tok = load_tokenizer(cfg.tokenizer, map_location=str(device)).eval()
    layout, fp = tok.layout, tok.fingerprint()
    dataset = build_dataset(cfg.data, cfg.split)
    n = len(dataset) if cfg.num_videos is None else min(cfg.num_videos, len(dataset))
    choose = _Chooser(cfg, layout, n, device)
    num_chunks = max(1, -(-n // cfg.save_every))

    skipped = 0  # unreadable videos left out by this process (this run's chunks)
    if not is_token_store(store_dir):
        for c in range(dist.rank, num_chunks, dist.world):
            shard = shard_path(store_dir, c)
            if is_token_store(shard) and TokenStore(shard).fingerprint == fp:
                continue  # finished by an earlier run (of this config: checked above; of this tokenizer)
            idx = list(range(c * cfg.save_every, min(n, (c + 1) * cfg.save_every)))
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=cfg.batch_size,
                                                 shuffle=False, num_workers=cfg.num_workers)
            with TokenStoreWriter(shard, fp, layout, tok.codebook_size, overwrite=True) as w:
                pos = 0
                for item in loader:
                    ids = torch.tensor(idx[pos:pos + item["video"].shape[0]], dtype=torch.long)
                    pos += ids.numel()
                    keep = requested(item, ids)  # an unreadable file's stand-in is left out
                    skipped += int((~keep).sum())
                    if not bool(keep.any()):
                        continue
                    v, ids, labels = item["video"][keep].to(device), ids[keep], torch.as_tensor(item["label"])[keep]
                    with torch.no_grad(), inference_autocast(cfg.precision, device):
                        tokens = tok.encode(v, choose(ids, v))
                    w.append(tokens.to("cpu"), labels, [_video_id(dataset, int(i)) for i in ids])
            log.info("tokenize: chunk %d/%d written (%d videos)", c + 1, num_chunks, len(w))
        if skipped:
            log.warning("tokenize: %d unreadable video(s) left out of the store (on_bad_video: skip)", skipped)
        dist.wait()
        if dist.rank == 0:
            merge_shards(store_dir, num_shards=num_chunks, remove=True)
        dist.wait()
    elif dist.rank == 0:
        remove_shards(store_dir)  # an earlier run was stopped after its merge, before the shards were gone

    if dist.rank == 0:
        store = TokenStore(store_dir)
        store.check_fingerprint(fp)
        bl = store.block_lengths.long()  # [N, K]
        lengths = bl.sum(1).double()
        idx = layout.assignments_to_indices(bl) if len(store) else torch.zeros(0, dtype=torch.long)
        hist = torch.bincount(idx, minlength=layout.num_assignments)
        per_block = {str(c): (bl == c).sum(0).tolist() for c in layout.candidates}
        write_json(out / "tokenize_stats.json", {
            "num_videos": len(store),
            "mean_tokens": float(lengths.mean()) if len(store) else 0.0,
            "std_tokens": float(lengths.std()) if len(store) > 1 else 0.0,
            "min_tokens": int(lengths.min()) if len(store) else 0,
            "max_tokens": int(lengths.max()) if len(store) else 0,
            "assignment_source": choose.source,
            "assignment_histogram": hist.tolist(),
            "top_assignments": [{"assignment": layout.indices_to_assignments(torch.tensor([int(i)]))[0].tolist(),
                                 "count": int(hist[i])} for i in hist.argsort(descending=True)[:10] if hist[i] > 0],
            "per_block_count_histogram": per_block,
            "layout": layout.to_dict(),
            "tokenizer": cfg.tokenizer,
            "tokenizer_fingerprint": fp,
            "store": str(store_dir),
        })
        write_json(out / "done", {"stage": "tokenize", "videos": len(store)})
    dist.wait()
    return out


def _main(args: argparse.Namespace) -> int:
    run(load_config(TokenizeConfig, args.config, args.overrides))
    return 0


def add_arguments(subparsers) -> None:
    """Register ``arvid tokenize CONFIG [overrides]``."""
    p = subparsers.add_parser("tokenize", help="encode a dataset into a token store (router or fixed assignments)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config (TokenizeConfig)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. router=outputs/router/router")
    p.set_defaults(func=_main)
