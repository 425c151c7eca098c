"""The sampling loop on a fake random-logit model: well-formedness, determinism, guidance,
truncation, prefixes, constraints, early stop and cache vs recompute."""

from __future__ import annotations

import pytest
import torch
from test_sampling_fake_model import FakeGPT, make_cond

from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.generator.sequence import SequenceFormat
from arvid.sampling.sampler import (
    Sampler,
    SamplerConfig,
    bucket_len,
    cfg_scales,
    length_bias,
    sample_from_logits,
)

FMT = SequenceFormat(12, BlockLayout((1, 1, 1, 1), (1, 2, 4, 8)))


def fake(seed=0, scale=1.0, **kw) -> FakeGPT:
    return FakeGPT(FMT.vocab_size, num_classes=5, seed=seed, scale=scale, codebook_size=FMT.codebook_size, **kw)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- token choice


def test_sample_from_logits_never_picks_forbidden_and_matches_softmax():
    g = gen(0)
    logits = torch.randn(4, 9, generator=g)
    logits[:, ::2] = float("-inf")
    u = torch.rand(20000, generator=g)
    rows = logits[1:2].expand(20000, -1)
    tok = sample_from_logits(rows, u)
    assert bool((tok % 2 == 1).all())
    freq = torch.bincount(tok, minlength=9).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(logits[1], -1), atol=0.015, rtol=0)
    # Edge uniforms never land on a forbidden token.
    edge = sample_from_logits(logits, torch.tensor([0.0, 1 - 1e-7, 0.5, 0.999999]))
    assert bool((edge % 2 == 1).all())
    # Greedy and temperature.
    assert torch.equal(sample_from_logits(logits, u[:4], temperature=0), logits.argmax(-1))


def test_tiny_temperatures_and_nan_logits_never_pick_a_forbidden_token():
    """logits / 1e-39 overflowed to +-inf, the softmax gave NaN and index 0 came out even where
    forbidden (before 2026-12-07); a NaN logit of the model did the same, also under argmax."""
    logits = torch.tensor([[float("-inf"), 2.0, 1.0, 3.0], [float("-inf"), -5.0, float("nan"), 1.0]])
    u = torch.tensor([0.3, 0.9])
    for t in (1e-39, 1e-30, 1e-6):
        assert sample_from_logits(logits, u, temperature=t).tolist() == [3, 3]  # the best allowed token
    assert sample_from_logits(logits, u, temperature=0).tolist() == [3, 3]
    nan_rows = torch.tensor([[float("-inf"), float("nan"), float("nan")]]).expand(64, -1)
    got = sample_from_logits(nan_rows, torch.rand(64, generator=gen(0)))
    assert set(got.tolist()) <= {1, 2}  # all allowed logits NaN: still an allowed token
    assert sample_from_logits(nan_rows[:1], torch.zeros(1), temperature=0).item() in (1, 2)


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1)
    u = torch.rand(4000, generator=gen(1))
    tk = sample_from_logits(logits, u, top_k=2)
    assert set(tk.tolist()) == {0, 1}
    assert abs((tk == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    tp = sample_from_logits(logits, u, top_p=0.85)  # keeps 0.5 + 0.3 + 0.15 (0.8 < 0.85)
    assert set(tp.tolist()) == {0, 1, 2}
    tp = sample_from_logits(logits, u, top_p=0.5)  # the first token alone holds 0.5
    assert set(tp.tolist()) == {0}


def test_length_bias_and_schedules():
    b = length_bias(FMT, -2.0, "log")
    assert torch.all(b[:12] == 0)
    torch.testing.assert_close(b[12:], -2.0 * torch.log(torch.tensor([1.0, 2, 4, 8])))
    torch.testing.assert_close(length_bias(FMT, 1.0, "linear")[12:], torch.tensor([1 / 8, 2 / 8, 4 / 8, 1.0]))
    s = cfg_scales(SamplerConfig(cfg_scale=3.0, cfg_schedule="linear"), FMT, 0, FMT.max_length)
    assert s[0] == 1.0 and abs(float(s[-1]) - 3.0) < 1e-6 and bool((s.diff() > 0).all())
    assert torch.all(cfg_scales(SamplerConfig(cfg_scale=3.0), FMT, 5, 7) == 3.0)


def test_config_validation():
    for bad in [dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(check_every=0),
                dict(cfg_schedule="cosine"), dict(compile="jit")]:
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    for bad in (-1, 2.5, "256", True):
        with pytest.raises(ValueError, match=f"kv_bucket must be an int >= 0 .*got {bad!r}"):
            SamplerConfig(kv_bucket=bad)
    with pytest.raises(ValueError, match=r"decode_attention must be sdpa\|flex, got 'fa'"):
        SamplerConfig(decode_attention="fa")
    assert SamplerConfig().kv_bucket == 64 and SamplerConfig(kv_bucket=0).kv_bucket == 0
    with pytest.raises(ValueError, match="compile_mode must be .*got 'reduce-overhead'"):
        SamplerConfig(compile_mode="reduce-overhead")  # cudagraph trees refuse the mutated cache
    assert SamplerConfig().compile_mode == "default"


def test_config_rejects_a_negative_kv_bucket_by_name():
    from arvid.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="kv_bucket.*-1"):
        from_dict(SamplerConfig, {"kv_bucket": -1})


def test_bucket_len_edges():
    # pos + 1 positions rounded up to a multiple of the bucket, capped at max_len.
    assert bucket_len(0, 4, 19) == 4
    assert bucket_len(3, 4, 19) == 4  # pos + 1 exactly a multiple: no extra bucket
    assert bucket_len(4, 4, 19) == 8  # one past it: the next bucket
    assert bucket_len(5, 4, 19) == 8  # mid-bucket
    assert bucket_len(15, 4, 19) == 16
    assert bucket_len(16, 4, 19) == 19  # 20 capped at max_len
    assert bucket_len(18, 4, 19) == 19  # the last position
    assert bucket_len(18, 19, 19) == 19 and bucket_len(0, 19, 19) == 19
    assert bucket_len(0, 1, 19) == 1 and bucket_len(10, 1, 19) == 11  # bucket 1: exactly the filled part
    assert bucket_len(2051, 256, 2052) == 2052 and bucket_len(2047, 256, 2052) == 2048
    assert bucket_len(0, 0, 19) == 19 and bucket_len(18, 0, 19) == 19  # 0: always the whole cache
    assert bucket_len(3, 256, 19) == 19  # a bucket longer than the cache: the whole cache
    for bad in [(19, 4, 19), (-1, 4, 19), (3, -1, 19)]:
        with pytest.raises(ValueError):
            bucket_len(*bad)


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("cfg", [SamplerConfig(), SamplerConfig(cfg_scale=2.5, top_k=5, temperature=1.3),
                                 SamplerConfig(top_p=0.7, cfg_scale=1.5, cfg_schedule="linear"),
                                 SamplerConfig(temperature=0)])
def test_samples_are_well_formed_over_many_seeds(cfg):
    s = Sampler(fake(scale=0.5), FMT, cfg)
    for seed in range(6):
        out = s.generate(make_cond(torch.arange(5).repeat(4)), generator=gen(seed))
        assert out.lengths.shape == (20,)
        for seq in out.unpacked():
            codes, bl = FMT.parse_one(seq)
            assert codes.numel() == int(bl.sum())
        assert torch.equal(out.tokens.lengths + 4, out.lengths)


def test_seed_reproduces_and_different_seeds_differ():
    s = Sampler(fake(scale=0.5), FMT, SamplerConfig(cfg_scale=2.0))
    cond = make_cond(torch.arange(5).repeat(3))
    a = s.generate(cond, generator=gen(7))
    b = s.generate(cond, generator=gen(7))
    c = s.generate(cond, generator=gen(8))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.lengths, b.lengths)
    assert not (a.sequences.shape == c.sequences.shape and torch.equal(a.sequences, c.sequences))
    # A fresh sampler (fresh buffers) gives the same samples too.
    d = Sampler(fake(scale=0.5), FMT, SamplerConfig(cfg_scale=2.0)).generate(cond, generator=gen(7))
    assert torch.equal(a.sequences, d.sequences)


def test_cfg_scale_one_equals_conditional_and_guidance_changes_samples():
    m = fake(scale=0.7)
    cond = make_cond(torch.arange(5).repeat(4))
    plain = Sampler(m, FMT, SamplerConfig()).generate(cond, generator=gen(3))
    guided_one = Sampler(m, FMT, SamplerConfig(cfg_scale=1.0)).generate(cond, generator=gen(3), guided=True)
    assert torch.equal(plain.sequences, guided_one.sequences)
    strong = Sampler(m, FMT, SamplerConfig(cfg_scale=4.0)).generate(cond, generator=gen(3))
    assert not torch.equal(plain.sequences, strong.sequences) or not torch.equal(plain.lengths, strong.lengths)


def test_cfg_combination_is_u_plus_s_times_c_minus_u():
    """Greedy guided sampling picks argmax(u + s (c - u)) at every step (checked against a manual loop)."""
    m = fake(scale=1.0)
    s_ = 2.5
    cond = make_cond([0, 3])
    out = Sampler(m, FMT, SamplerConfig(cfg_scale=s_, temperature=0)).generate(cond, generator=gen(0))
    null = make_cond([5, 5])
    from arvid.sampling.constraints import ConstraintState, SequenceConstraint

    c = SequenceConstraint(FMT, 2)
    state = ConstraintState.initial(2)
    toks = torch.zeros(2, 0, dtype=torch.long)
    while not bool(c.done(state).all()):
        lc = m.forward_dense(cond, toks)[:, -1]
        lu = m.forward_dense(null, toks)[:, -1]
        logits = (lu + s_ * (lc - lu)).masked_fill(~c.mask(state), float("-inf"))
        t = logits.argmax(-1)
        t = torch.where(c.done(state), torch.zeros_like(t), t)
        c.advance(state, t)
        toks = torch.cat([toks, t[:, None]], 1)
    ref = [toks[i, :int(state.length[i])] for i in range(2)]
    got = out.unpacked()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("kv_bucket", [0, 7, 256])
def test_cached_equals_dense_recompute_greedy_and_sampled(kv_bucket):
    m = fake(scale=1.0)
    cond = make_cond([1, 2, 4])
    for cfg in [SamplerConfig(temperature=0, kv_bucket=kv_bucket),
                SamplerConfig(cfg_scale=2.0, top_k=6, kv_bucket=kv_bucket)]:
        a = Sampler(m, FMT, cfg).generate(cond, generator=gen(11))
        b = Sampler(m, FMT, SamplerConfig(**{**cfg.__dict__, "use_cache": False})).generate(cond, generator=gen(11))
        assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("kv_bucket", [0, 1, 4, 7, 256])
def test_steps_attend_over_the_bucket_of_their_position(kv_bucket):
    # The host-side kv_len of every step is the bucket of the position the device feeds: the
    # positions run n + p0, n + p0 + 1, ... (no gap, no repeat), each strictly below its kv_len.
    m = fake(scale=0.5)
    ctx = TokenizedVideo(torch.tensor([3, 1, 2, 5, 5, 6, 7, 8, 9, 10, 11, 0, 1]), torch.tensor([[1, 2], [2, 8]]))
    max_len = 1 + FMT.max_length - 1  # one class slot; the last token is never fed
    for kw, p0 in [(dict(), 0), (dict(prefix=ctx), 5)]:  # p0: the shorter prefix row, 2 length tokens + 3 codes
        m.kv_lens.clear()
        out = Sampler(m, FMT, SamplerConfig(cfg_scale=1.5, kv_bucket=kv_bucket)).generate(
            make_cond([0, 4]), generator=gen(0), **kw)
        pos = [p for p, _ in m.kv_lens]
        assert pos == list(range(1 + p0, 1 + p0 + out.steps - 1))
        assert [k for _, k in m.kv_lens] == [bucket_len(p, kv_bucket, max_len) for p in pos]
        assert all(p < k <= max_len for p, k in m.kv_lens)
    if kv_bucket == 4:
        assert {k for _, k in m.kv_lens} >= {8, 12}


def test_loop_stops_when_all_finish():
    m = fake(scale=0.5)
    # Every block at the smallest count: 8 tokens of a possible 64.
    out = Sampler(m, FMT, SamplerConfig(check_every=4)).generate(
        make_cond([0, 1]), generator=gen(0), allowed_counts=[1])
    assert out.lengths.tolist() == [8, 8]
    assert out.steps <= 8 + 4
    m.decode_calls = 0
    Sampler(m, FMT, SamplerConfig(check_every=4)).generate(make_cond([0, 1]), generator=gen(0), allowed_counts=[1])
    assert m.decode_calls == out.steps - 1  # the prefill predicts the first token


def test_fixed_prefix_is_kept_and_the_rest_generated():
    m = fake(scale=0.5)
    # Context: first two blocks given, with different lengths per sample (prefill + forced).
    ctx = TokenizedVideo(torch.tensor([3, 1, 2, 5, 5, 6, 7, 8, 9, 10, 11, 0, 1]),
                         torch.tensor([[1, 2], [2, 8]]))
    s = Sampler(m, FMT, SamplerConfig(cfg_scale=1.5))
    for seed in range(5):
        out = s.generate(make_cond([0, 4]), prefix=ctx, generator=gen(seed))
        for i, seq in enumerate(out.unpacked()):
            codes, bl = FMT.parse_one(seq)
            assert bl[:2].tolist() == ctx.block_lengths[i].tolist()
            n = int(ctx.block_lengths[i].sum())
            assert torch.equal(codes[:n], ctx.video_codes(i))
    # The cached path with a prefill prefix equals the dense recompute.
    dense = Sampler(m, FMT, SamplerConfig(cfg_scale=1.5, use_cache=False)).generate(
        make_cond([0, 4]), prefix=ctx, generator=gen(4))
    assert torch.equal(out.sequences, dense.sequences)


def test_allowed_set_and_fixed_assignment_are_honoured():
    m = fake(scale=0.5)
    s = Sampler(m, FMT, SamplerConfig(cfg_scale=2.0))
    out = s.generate(make_cond(torch.arange(5).repeat(4)), generator=gen(1), allowed_counts=[[2, 8], [1], [4, 8], [8]])
    bl = out.tokens.block_lengths
    assert set(bl[:, 0].tolist()) <= {2, 8} and bool((bl[:, 1] == 1).all())
    assert set(bl[:, 2].tolist()) <= {4, 8} and bool((bl[:, 3] == 8).all())
    fixed = torch.tensor([[8, 4, 2, 1], [1, 1, 8, 8]])
    out = s.generate(make_cond([0, 1]), generator=gen(2), fixed_assignment=fixed)
    assert torch.equal(out.tokens.block_lengths, fixed)


def test_exact_budget_in_the_loop():
    m = fake(scale=0.5, len_offset=3.0)  # the model loves length tokens of ... any count; bias up
    s = Sampler(m, FMT, SamplerConfig(budget_bias=3.0))  # pushes towards big blocks
    cond = make_cond(torch.arange(5).repeat(6))
    free = s.generate(cond, generator=gen(0))
    capped = s.generate(cond, generator=gen(0), budget=torch.arange(30) % 10 + 6)
    assert float(free.tokens.lengths.float().mean()) > 15
    assert bool((capped.tokens.lengths <= torch.arange(30) % 10 + 6).all())


def test_errors_are_clear():
    m = fake()
    s = Sampler(m, FMT, SamplerConfig())
    with pytest.raises(ValueError, match="batch size is unknown"):
        s.generate(None)
    from arvid.sampling.sampler import conditioning_class

    with pytest.raises(ValueError, match="guidance needs a conditioning"):
        Sampler(m, FMT, SamplerConfig(cfg_scale=2.0)).generate(conditioning_class()(), batch_size=2)
    with pytest.raises(ValueError, match="prefix of sample 0 .* position 2"):
        s.generate(make_cond([0]), prefix=torch.tensor([[FMT.len_token(2), 1, FMT.len_token(1)]]))
    with pytest.raises(ValueError, match=r"prefix_lengths must be \[B=2\] values in \[0, 3\], got \[-1, 3\]"):
        s.generate(make_cond([0, 1]), prefix=torch.tensor([[FMT.len_token(2), 1, 2]] * 2),
                   prefix_lengths=torch.tensor([-1, 3]))


def test_batches_with_other_context_lengths_share_one_decoder():
    """Frame prediction at per-batch context counts: each batch's shortest prefix (p0) differs,
    yet one decoder (one KV cache, one set of graphs on a GPU) serves them all, with the samples
    of a fresh decoder per batch; other shapes are kept up to MAX_DECODERS (least recently used
    out); a prepared batch whose decoder was loaded again since is refused."""
    from arvid.sampling.sampler import MAX_DECODERS

    m = fake(scale=0.5)
    s = Sampler(m, FMT, SamplerConfig(cfg_scale=1.5))
    g = torch.Generator().manual_seed(0)
    p0s = set()
    for j in range(6):
        bl = torch.tensor(FMT.layout.candidates)[torch.randint(0, 4, (3, 2), generator=g)]
        ctx = TokenizedVideo(torch.randint(0, FMT.codebook_size, (int(bl.sum()),), generator=g), bl)
        out = s.generate(make_cond([0, 1, 2]), prefix=ctx, generator=gen(j))
        p0s.add(int((bl.sum(1) + 2).min()))
        alone = Sampler(m, FMT, SamplerConfig(cfg_scale=1.5)).generate(make_cond([0, 1, 2]), prefix=ctx,
                                                                         generator=gen(j))
        assert torch.equal(out.sequences, alone.sequences) and torch.equal(out.lengths, alone.lengths)
    assert len(p0s) > 1 and len(s._decoders) == 1  # the context lengths did vary
    first = next(iter(s._decoders))
    for b in (1, 2, 4):  # other batch sizes are other shapes
        s.generate(make_cond(list(range(b))), generator=gen(0))
        assert len(s._decoders) <= MAX_DECODERS
    assert first not in s._decoders
    a = s.prepare(make_cond([0, 1]), generator=gen(1))
    s.prepare(make_cond([2, 3]), generator=gen(2))  # the same shape: loads the same decoder
    with pytest.raises(RuntimeError, match="run each prepared batch before preparing the next"):
        s.run(a)
    # a prepared batch runs once: its decoder state is spent (a second run continued from the
    # first's last step: an index error, or the first's samples again)
    b = s.prepare(make_cond([0, 1]), generator=gen(3))
    first = s.run(b)
    with pytest.raises(RuntimeError, match="was run already"):
        s.run(b)
    again = s.run(s.prepare(make_cond([0, 1]), generator=gen(3)))
    assert torch.equal(again.sequences, first.sequences)


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs"])
def test_compile_mode_reaches_the_capture(monkeypatch, mode):
    """``compile_mode`` is handed to the decode step's capture (where ``torch.compile`` gets it):
    the capture itself needs CUDA, so it is replaced by a recorder here."""
    import arvid.sampling.compiled as compiled

    seen = []

    def capture(dec, compile_step=False, warmup=3, compile_mode="default", compile_sampling=False,
                attention="sdpa"):
        seen.append((compile_step, compile_mode, compile_sampling, attention))
        dec.graphs = {0: None}
        return dec.graphs

    monkeypatch.setattr(compiled, "capture_decoder", capture)
    monkeypatch.setattr(Sampler, "execution", lambda self, device: "compile")
    s = Sampler(fake(), FMT, SamplerConfig(compile="compile", compile_mode=mode))
    s.prepare(make_cond([0, 3]), generator=gen(0))
    s2 = Sampler(fake(), FMT, SamplerConfig(compile="compile", compile_mode=mode, compile_sampling=False,
                                            decode_attention="flex"))
    s2.prepare(make_cond([0, 3]), generator=gen(0))
    assert seen == [(True, mode, True, "sdpa"), (True, mode, False, "flex")]


@pytest.mark.parametrize("cfg", [dict(cfg_scale=2.0, top_k=5, top_p=0.9), dict(cfg_scale=1.0, temperature=0.0)])
def test_compiled_sampling_part_draws_the_same_tokens(cfg):
    """The sampling part compiled by inductor (the CPU's here) draws exactly the eager tokens, and
    the decoder's buffers are as loaded after the trial call that compiles it."""
    from arvid.sampling.compiled import compile_choose

    cond = make_cond([0, 3, 1])
    ref = Sampler(fake(seed=2), FMT, SamplerConfig(**cfg)).generate(cond, generator=gen(5))
    s = Sampler(fake(seed=2), FMT, SamplerConfig(**cfg))
    prep = s.prepare(cond, generator=gen(5))
    before = [t.clone() for t in prep.decoder.snapshot()]
    assert compile_choose(prep.decoder) is True and prep.decoder.choose_fn is not prep.decoder.choose
    assert all(torch.equal(a, b) for a, b in zip(prep.decoder.snapshot(), before))
    out = s.run(prep)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.lengths, ref.lengths)


def test_sampling_part_stays_eager_when_compilation_fails(monkeypatch, caplog):
    import arvid.sampling.compiled as compiled

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("NYI TritonSplitDimKernel reductions")
        return call

    monkeypatch.setattr(compiled.torch, "compile", broken)
    s = Sampler(fake(), FMT, SamplerConfig(cfg_scale=2.0))
    prep = s.prepare(make_cond([0, 3]), generator=gen(0))
    before = [t.clone() for t in prep.decoder.snapshot()]
    with caplog.at_level("WARNING", logger="arvid.sampling.compiled"):
        assert compiled.compile_choose(prep.decoder) is False
    assert prep.decoder.choose_fn == prep.decoder.choose
    assert "stays eager" in caplog.text and "TritonSplitDimKernel" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(prep.decoder.snapshot(), before))
    assert s.run(prep).sequences.numel() > 0


def test_the_blocked_prefix_sum_is_the_cumulative_sum_and_draws_the_same_tokens():
    """sample_from_logits builds its CDF with prefix_sum (chunked: inductor cannot compile a
    cumulative sum over the whole vocabulary on the GPU); the CDF and the draws equal a plain
    cumsum's up to float rounding."""
    from arvid.sampling.sampler import prefix_sum, sample_from_logits

    g = torch.Generator().manual_seed(0)
    blocked = torch.compile(prefix_sum, dynamic=False)  # the chunked sums run only under torch.compile
    for V in (1, 7, 128, 129, 8197):
        p = torch.softmax(torch.randn(16, V, generator=g) * 3, -1)
        assert torch.equal(prefix_sum(p), p.cumsum(-1))
        assert torch.allclose(blocked(p), p.cumsum(-1), rtol=0, atol=2e-6), V
    logits = torch.randn(4096, 8197, generator=g) * 2
    u = torch.rand(4096, generator=g)
    cdf = torch.softmax(logits, -1).cumsum(-1)
    want = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=8196)
    got = torch.compile(sample_from_logits, dynamic=False)(logits, u)
    assert (got == want).float().mean() > 0.999  # differ only where u falls within rounding of a boundary


def test_compiled_decode_step_compiles_three_times_for_any_number_of_buckets():
    """The model's compiled decode step (what capture_decoder captures under compile=compile)
    leaves ``kv_len`` to automatic dynamic shapes: 9 bucket lengths (buckets of 16 over a
    132-position cache) cost at most three compilations (a static first one, one for any length
    below the whole cache, the whole cache), not nine, and every length gives the eager logits.
    The batch stays static: decoders of 3 and then 4 rows each compile their own graphs (a
    symbolic batch would have let the third reuse the second's)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from arvid.generator.conditioning import Conditioning
    from arvid.generator.gpt import GPT
    from arvid.sampling.compiled import compile_decode_step
    from arvid.sampling.sampler import bucket_len

    torch._dynamo.reset()  # no shape history of earlier compilations of decode_step
    torch.manual_seed(0)
    m = GPT.from_preset("debug", vocab_size=80, max_seq_len=140, num_classes=3).eval()
    torch.nn.init.normal_(m.head.weight, std=0.3)
    max_len = 132
    lens = sorted({bucket_len(p, 16, max_len) for p in range(1, max_len)} | {max_len})
    assert len(lens) == 9

    def graphs_for(rows: int, kv_lens: list[int]) -> int:
        with torch.no_grad():
            cache = m.allocate_cache(rows, max_len)
            m.prefill(cache, Conditioning(torch.arange(rows) % 3), torch.randint(0, 64, (rows, 10)))
            step = compile_decode_step(m)
            before = counters["stats"]["unique_graphs"]
            toks = torch.arange(rows) + 5
            for kv_len in kv_lens:
                pos = torch.tensor(min(10, kv_len - 1))
                got = step(cache, toks, pos, kv_len)
                want = m.decode_step(cache, toks, pos, kv_len)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            return counters["stats"]["unique_graphs"] - before

    assert 1 <= graphs_for(2, lens) <= 3
    assert graphs_for(3, lens[:3]) >= 1
    assert graphs_for(4, lens[:3]) >= 1  # the batch is static: 4 rows do not reuse the 3-row graph
