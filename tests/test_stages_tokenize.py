"""`arvid tokenize` (arvid.stages.tokenize): what goes into the token store."""

from pathlib import Path

import pytest
import torch

from arvid.config import ConfigError, load_config
from arvid.data.datasets import DataConfig
from arvid.data.token_store import TokenStore
from arvid.stages.data_cmd import synth
from arvid.stages.tokenize import TokenizeConfig, run
from arvid.tokenizer.base import build_tokenizer


def test_an_unreadable_video_is_left_out_not_stored_as_its_neighbour(tmp_path, caplog):
    """A file dataset returns the next readable video for an unreadable one (on_bad_video: skip).
    tokenize stored it under the unreadable file's id and position: the neighbour twice, the
    second time with the bad file's name."""
    synth(tmp_path / "vids", fmt="mp4", num=4, seed=4, frames=8, size=16)
    paths = sorted((tmp_path / "vids").rglob("*.mp4"))
    paths[1].write_bytes(b"")
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", dict(frames_per_block=[2, 2, 2, 2], candidates=[1, 4, 16], image_size=16),
                          preset="debug")
    tok.save_pretrained(tmp_path / "tok")
    data = DataConfig(source="folder", root=str(tmp_path / "vids"), frames=8, size=16, random_start=False)
    cfg = dict(data=data, tokenizer=str(tmp_path / "tok"), fixed_assignment=[1, 4, 16, 1], batch_size=2,
               device="cpu")
    with caplog.at_level("WARNING", logger="arvid"):
        run(TokenizeConfig(out_dir=str(tmp_path / "out"), **cfg))
    assert "tokenize: 1 unreadable video(s) left out of the store" in caplog.text  # RELIABILITY's count
    store = TokenStore(tmp_path / "out" / "tokens")
    assert [Path(v).name for v in store.video_ids] == [paths[i].name for i in (0, 2, 3)]
    assert store.labels.tolist() == [0, 2, 3]
    # each stored video's codes are its own: those of a run over the readable files alone
    paths[1].unlink()
    run(TokenizeConfig(out_dir=str(tmp_path / "ref"), **cfg))
    ref = TokenStore(tmp_path / "ref" / "tokens")
    assert ref.video_ids == store.video_ids
    assert ref.get_batch(range(3)).equal(store.get_batch(range(3)))


def test_negative_workers_are_refused_naming_the_file_and_field(tmp_path):
    """num_workers: -1 reached the DataLoader, whose error names neither the config file nor the field."""
    p = tmp_path / "tok.yaml"
    p.write_text("num_workers: -1\n")
    with pytest.raises(ConfigError, match=r"tok.yaml: invalid TokenizeConfig: num_workers must be >= 0, got -1"):
        load_config(TokenizeConfig, p)


def test_the_router_chooses_in_fp32_under_bf16_inference(tmp_path):
    """Found in a chain review: tokenize ran the router inside the tokenizer's inference autocast
    (bf16 with precision bf16, and on CUDA with auto), train-router's evaluation and eval recon in
    fp32: near-tied clips were stored under another assignment than the one the router's metrics
    and the report's reconstruction counted (3 of 64 clips here)."""
    from arvid.data.datasets import build_dataset
    from arvid.tokenizer.router import Router

    torch.manual_seed(0)
    tok = build_tokenizer("evatok", dict(frames_per_block=[2, 2, 2, 2], candidates=[1, 4, 16], image_size=16,
                                         quantizer=dict(kind="fsq", levels=(8, 5, 5, 5))), preset="debug")
    tok.save_pretrained(tmp_path / "tok")
    router = Router.from_preset("debug", tok.layout, 16).eval()
    torch.nn.init.normal_(router.head.weight, std=0.02)  # a trained router's head is not zero
    router.save_pretrained(tmp_path / "router")
    data = DataConfig(source="synthetic", frames=8, size=16, num_videos=64, random_start=False)
    run(TokenizeConfig(data=data, tokenizer=str(tmp_path / "tok"), router=str(tmp_path / "router"),
                       precision="bf16", batch_size=16, device="cpu", out_dir=str(tmp_path / "out")))
    ds = build_dataset(data, "train")
    x = torch.stack([ds[i]["video"] for i in range(64)])
    fp32 = router.choose(x)
    assert TokenStore(tmp_path / "out" / "tokens").block_lengths.tolist() == fp32.tolist()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the final tokenizer's bf16 training step
        assert router.choose(x).tolist() == fp32.tolist()
