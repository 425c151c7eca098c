"""The sampler on the real GPT (debug preset): cached decoding equals full recompute, guidance
with scale 1 equals conditional sampling, text guidance uses the empty text."""

from __future__ import annotations

import pytest
import torch

from arvid.data.types import BlockLayout
from arvid.generator.conditioning import Conditioning
from arvid.generator.gpt import GPT
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.sampler import Sampler, SamplerConfig

FMT = SequenceFormat(24, BlockLayout((2, 2, 2), (2, 4, 8)))


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT.from_preset("debug", vocab_size=FMT.vocab_size, max_seq_len=FMT.max_length + 1 + kw.get("max_text_len", 0),
                        **kw).eval()
    # The output head is zero-initialised (uniform logits): give it weights so that the logits
    # depend on the input and greedy decoding is not a tie-break.
    torch.nn.init.normal_(m.head.weight, std=0.3, generator=torch.Generator().manual_seed(1))
    return m


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kv_bucket", [0, 7, 256])
@pytest.mark.parametrize("cfg", [SamplerConfig(temperature=0), SamplerConfig(temperature=0, cfg_scale=3.0),
                                 SamplerConfig(cfg_scale=2.0, top_p=0.9)])
def test_cached_decode_equals_recompute(cfg, kv_bucket):
    cfg = SamplerConfig(**{**cfg.__dict__, "kv_bucket": kv_bucket})
    m = gpt(num_classes=4)
    cond = Conditioning(torch.tensor([0, 1, 2, 3, 1]))
    a = Sampler(m, FMT, cfg).generate(cond, generator=gen(5))
    b = Sampler(m, FMT, SamplerConfig(**{**cfg.__dict__, "use_cache": False})).generate(cond, generator=gen(5))
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.sequences, b.sequences)
    for s in a.unpacked():
        assert FMT.is_well_formed(s)
    # The greedy sequences are not degenerate: the model's choices vary across classes.
    assert len({tuple(s.tolist()) for s in a.unpacked()}) > 1


@pytest.mark.parametrize("guided", [False, True])
def test_greedy_tokens_do_not_depend_on_the_kv_bucket(guided):
    # Attending over cache[:kv_len] instead of the whole cache changes no token: buckets 0 (whole
    # cache), 1 (exactly the filled part), 7 (buckets 7, 14, 21 and the cap 27) and 256 (> the cache).
    m = gpt(num_classes=4)
    cond = Conditioning(torch.tensor([0, 1, 2, 3, 1, 2]))
    base = dict(temperature=0, cfg_scale=2.0 if guided else 1.0)
    ref = Sampler(m, FMT, SamplerConfig(**base, use_cache=False)).generate(cond, generator=gen(3))
    for kv_bucket in (0, 1, 7, 256):
        s = Sampler(m, FMT, SamplerConfig(**base, kv_bucket=kv_bucket))
        out = s.generate(cond, generator=gen(3))
        assert torch.equal(out.lengths, ref.lengths) and torch.equal(out.sequences, ref.sequences), kv_bucket
        dec = next(iter(s._decoders.values()))
        assert dec.cache.max_len == 27 and dec.kv_lens() == {0: [27], 1: list(range(2, 28)), 7: [7, 14, 21, 27],
                                                              256: [27]}[kv_bucket]
    assert ref.steps > 14  # the samples are long enough to cross buckets of 7


def test_cached_decode_equals_recompute_with_a_context_prefix():
    m = gpt(num_classes=0)
    from arvid.data.types import TokenizedVideo

    ctx = TokenizedVideo(torch.arange(12) % 24, torch.tensor([[2, 4], [4, 2]]))
    a = Sampler(m, FMT, SamplerConfig(temperature=0)).generate(None, prefix=ctx, generator=gen(0))
    b = Sampler(m, FMT, SamplerConfig(temperature=0, use_cache=False)).generate(None, prefix=ctx, generator=gen(0))
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.tokens.block_lengths[:, :2], ctx.block_lengths)


def test_cfg_scale_one_equals_conditional():
    m = gpt(num_classes=4)
    cond = Conditioning(torch.tensor([0, 3, 2, 2]))
    for seed in range(3):
        plain = Sampler(m, FMT, SamplerConfig()).generate(cond, generator=gen(seed))
        guided = Sampler(m, FMT, SamplerConfig()).generate(cond, generator=gen(seed), guided=True)
        assert torch.equal(plain.sequences, guided.sequences)
    strong = Sampler(m, FMT, SamplerConfig(cfg_scale=5.0)).generate(cond, generator=gen(0))
    plain = Sampler(m, FMT, SamplerConfig()).generate(cond, generator=gen(0))
    assert not (plain.sequences.shape == strong.sequences.shape and torch.equal(plain.sequences, strong.sequences))


def test_text_guidance_uses_the_empty_text():
    m = gpt(text_vocab_size=30, max_text_len=3, text_pad_id=0)
    cond = Conditioning(text_ids=torch.tensor([[5, 6, 0], [7, 0, 0]]))
    s = Sampler(m, FMT, SamplerConfig(temperature=0, cfg_scale=2.0))
    out = s.generate(cond, generator=gen(0))
    # Reference: greedy over u + s (c - u) with u from all-pad text, by full recompute.
    dense = Sampler(m, FMT, SamplerConfig(temperature=0, cfg_scale=2.0, use_cache=False)).generate(cond, generator=gen(0))
    assert torch.equal(out.sequences, dense.sequences)
    null = m.null_conditioning(2)
    assert torch.equal(null.text_ids, torch.zeros(2, 3, dtype=torch.long))
    first = m.forward_dense(cond, torch.zeros(2, 0, dtype=torch.long))[:, -1]
    first_u = m.forward_dense(null, torch.zeros(2, 0, dtype=torch.long))[:, -1]
    want = (first_u + 2.0 * (first - first_u))[:, FMT.codebook_size:].argmax(-1) + FMT.codebook_size
    assert torch.equal(torch.stack([s_[0] for s_ in out.unpacked()]), want)
