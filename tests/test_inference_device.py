"""Pretrained models land on the device asked for, and tokenizer inference runs in the precision asked for.

A model built on the CPU and loaded with ``map_location="cuda"`` once stayed on the CPU (load_state_dict
copies into the parameters where they are), so curation, tokenizing and sampling on a GPU host ran
on its CPU: 0.6 videos/s of curation on the H100 (2026-11-23). The GPU tests check the fix.
"""

from __future__ import annotations

import pytest
import torch

from arvid.data.types import BlockLayout
from arvid.generator.gpt import GPT
from arvid.tokenizer import build_tokenizer
from arvid.tokenizer.reward import Distortion, ProxyScorer
from arvid.tokenizer.router import Router
from arvid.training.device import inference_autocast

LAYOUT = BlockLayout((4, 4), (4, 8))


def test_inference_autocast_names_the_precision():
    with inference_autocast("auto", "cpu"):  # fp32 on the CPU
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with inference_autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        inference_autocast("fp16", "cpu")


def _models(tmp_path):
    torch.manual_seed(0)
    tok = build_tokenizer("evatok", {"frames_per_block": [4, 4], "candidates": [4, 8], "image_size": 32},
                          preset="debug")
    router = Router.from_preset("debug", LAYOUT, image_size=32)
    gpt = GPT.from_preset("debug", vocab_size=80, max_seq_len=64, num_classes=3)
    for name, m in (("tok", tok), ("router", router), ("gpt", gpt)):
        m.save_pretrained(tmp_path / name)
    return tok, router, gpt


def test_from_pretrained_on_the_cpu_loads_the_same_weights(tmp_path):
    tok, router, gpt = _models(tmp_path)
    from arvid.tokenizer.base import load_tokenizer

    for m, again in ((tok, load_tokenizer(tmp_path / "tok")), (router, Router.from_pretrained(tmp_path / "router")),
                     (gpt, GPT.from_pretrained(tmp_path / "gpt"))):
        assert m.fingerprint() == again.fingerprint()
        assert {p.device.type for p in again.parameters()} == {"cpu"}


@pytest.mark.gpu
def test_from_pretrained_lands_on_cuda_and_scorer_runs_there(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from arvid.tokenizer.base import load_tokenizer

    tok, router, gpt = _models(tmp_path)
    loaded = (load_tokenizer(tmp_path / "tok", map_location="cuda"),
              Router.from_pretrained(tmp_path / "router", map_location="cuda"),
              GPT.from_pretrained(tmp_path / "gpt", map_location="cuda"))
    for m in loaded:
        assert {p.device.type for p in m.parameters()} == {"cuda"}, type(m).__name__
        assert {b.device.type for b in m.buffers()} <= {"cuda"}, type(m).__name__
    cuda_tok = loaded[0].eval()
    x = torch.rand(3, 3, 8, 32, 32) * 2 - 1
    rows, a = torch.arange(3), torch.tensor([[4, 8], [8, 8], [4, 4]])
    ref = ProxyScorer(tok.eval(), Distortion("mse"), precision="fp32").score(x, rows, a)
    fp32 = ProxyScorer(cuda_tok, Distortion("mse", device="cuda"), precision="fp32")
    assert fp32.device.type == "cuda"
    assert torch.allclose(fp32.score(x, rows, a), ref, rtol=1e-2, atol=1e-4)
    bf16 = ProxyScorer(cuda_tok, Distortion("mse", device="cuda"))  # auto: bf16 autocast on CUDA
    assert torch.allclose(bf16.score(x, rows, a), ref, rtol=0.1, atol=1e-3)


def test_backend_flags_are_restored():
    from arvid.training.device import backend_flags, restore_backend_flags

    before = backend_flags()
    try:
        torch.backends.cuda.matmul.allow_tf32 = not before[0]
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.benchmark = not before[3]
        assert backend_flags() != before
    finally:
        restore_backend_flags(before)
    assert backend_flags() == before


def test_every_stage_resolves_auto_the_same_way(monkeypatch):
    """One rule for ``device: auto`` in every stage: this process's GPU (LOCAL_RANK modulo the GPUs
    seen), else the CPU; other names go through parse_device."""
    import importlib

    from arvid.training import device as D

    for name in ("sample", "curate", "tokenize", "eval_curve", "train_router", "evaluate", "report"):
        assert importlib.import_module(f"arvid.stages.{name}").resolve_device is D.resolve_device, name
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(D.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert D.resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    for var in D.LOCAL_RANK_VARS[1:]:
        monkeypatch.delenv(var, raising=False)
    assert D.resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")  # mpirun
    assert D.resolve_device("auto") == torch.device("cuda", 1)
    assert D.resolve_device("cpu") == torch.device("cpu")
