"""arvid.sampling.compiled.capture_decoder's logic on the CPU: torch.cuda's stream and graph calls
are replaced by stand-ins (a "captured" step is recorded, not run; a replay runs it eagerly with
the kv_len it was captured for), so the warm-ups, the buffer restores, the one graph per KV
bucket and the run loop's choice of graph are checked against eager sampling without a GPU."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

import arvid.sampling.compiled as compiled
from arvid.data.types import BlockLayout
from arvid.generator.conditioning import Conditioning
from arvid.generator.gpt import GPT
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.sampler import Sampler, SamplerConfig

FMT = SequenceFormat(12, BlockLayout((1, 1, 1, 1), (1, 2, 4, 8)))


class _Graph:
    capturing: _Graph | None = None

    def __init__(self) -> None:
        self.captured: list[tuple] = []

    def replay(self) -> None:
        dec, kv_len = self.captured[-1]
        dec.step(kv_len)


class _OnCuda:
    """The decoder as capture_decoder sees it: on a "cuda" device; a step inside a capture is
    recorded, not run; outside one it runs (and is counted)."""

    def __init__(self, dec) -> None:
        self.dec, self.device, self.warmups = dec, types.SimpleNamespace(type="cuda"), []

    def __getattr__(self, name):
        return getattr(self.dec, name)

    def __setattr__(self, name, value):
        if name in ("dec", "device", "warmups"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.dec, name, value)

    def step(self, kv_len=None) -> None:
        if _Graph.capturing is not None:
            _Graph.capturing.captured.append((self.dec, kv_len))
            return
        self.warmups.append((int(self.dec.i), kv_len))
        self.dec.step(kv_len)


@pytest.fixture
def fake_cuda(monkeypatch):
    class Stream:
        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def graph(g, pool=None):
        _Graph.capturing = g
        try:
            yield
        finally:
            _Graph.capturing = None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)


def _prefix(codes_in_last: int) -> torch.Tensor:
    """Two rows of four 8-code blocks, the last holding ``codes_in_last`` codes."""
    toks = []
    for j in range(4):
        toks.append(FMT.len_token_base + FMT.layout.candidates.index(8))
        toks += [1] * (8 if j < 3 else codes_in_last)
    return torch.tensor([toks, toks])


@pytest.mark.parametrize("codes_in_last", [0, 5, 6, 7])
def test_captured_steps_sample_the_eager_tokens_whatever_the_prefix(fake_cuda, codes_in_last):
    """A decoder captured for its first batch: one graph per KV bucket, its buffers as loaded
    after the capture, and the graphs' samples the eager ones. A prefix that leaves two or one
    tokens to generate (p0 = max_length - 2, - 1) made the third warm-up step feed a position past
    the cache (index_copy_ out of bounds: a device-side assert on a GPU)."""
    torch.manual_seed(0)
    m = GPT.from_preset("debug", vocab_size=FMT.vocab_size, max_seq_len=FMT.max_length + 1, num_classes=5).eval()
    torch.nn.init.normal_(m.head.weight, std=0.3)
    cond = Conditioning(torch.tensor([0, 3]))
    prefix = _prefix(codes_in_last)
    cfg = SamplerConfig(kv_bucket=4, cfg_scale=2.0)
    ref = Sampler(m, FMT, cfg).generate(cond, prefix=prefix, generator=torch.Generator().manual_seed(1))
    s = Sampler(m, FMT, cfg)
    prep = s.prepare(cond, prefix=prefix, generator=torch.Generator().manual_seed(1))
    dec = prep.decoder
    assert dec.p0 == 3 * 9 + 1 + codes_in_last and dec.cache.max_len == 1 + FMT.max_length - 1
    before = [t.clone() for t in dec.snapshot()]
    view = _OnCuda(dec)
    graphs = compiled.capture_decoder(view, warmup=3)
    assert sorted(graphs) == dec.kv_lens() == [4 * k for k in range(1, 10)]
    assert all(g.captured == [(dec, k)] for k, g in graphs.items())  # each graph captured its own bucket
    # every warm-up step ran from the loaded buffers (i = 0: the position the batch was loaded at)
    assert view.warmups == [(0, k) for k in dec.kv_lens() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(dec.snapshot(), before))
    assert dec.graphs is graphs
    out = s.run(prep)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.lengths, ref.lengths)
