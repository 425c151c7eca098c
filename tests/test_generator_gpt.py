"""GPT: packed vs dense vs KV cache, isolation of packed sequences, save/load, config, CFG dropout."""

from __future__ import annotations

import pytest
import torch

from arvid.config import ConfigError
from arvid.generator import GPT, Conditioning, GPTConfig, pack_sequences
from arvid.generator.conditioning import drop_classes, drop_text
from arvid.generator.packing import IGNORE

V = 41


def make(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, max_seq_len=64, num_classes=5)
    cfg.update(kw)
    m = GPT.from_preset("debug", **cfg)
    # the zero-init head would make every logit equal: give it weights so comparisons mean something
    torch.nn.init.normal_(m.head.weight, std=0.3)
    return m.eval()


def cond_for(m, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = m.config
    return Conditioning(
        torch.randint(0, c.num_classes + 1, (b,), generator=g) if c.num_classes else None,
        torch.randint(0, c.text_vocab_size, (b, c.max_text_len), generator=g) if c.max_text_len else None,
    )


KINDS = {
    "class": dict(num_classes=5),
    "text": dict(num_classes=0, text_vocab_size=30, max_text_len=3),
    "class+text": dict(num_classes=5, text_vocab_size=30, max_text_len=2),
    "none": dict(num_classes=0),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_packed_forward_equals_dense(kind):
    m = make(**KINDS[kind])
    lens = [9, 1, 14, 5]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, V, (L,), generator=g) for L in lens]
    cond = cond_for(m, len(lens))
    n = m.num_prefix(cond)
    assert n == {"class": 1, "text": 3, "class+text": 3, "none": 1}[kind]
    batch = pack_sequences(seqs, n, cond.class_ids, cond.text_ids)
    with torch.no_grad():
        packed = m(batch)
        assert packed.shape == (sum(lens) + len(lens) * (n - 1), V)
        for i, s in enumerate(seqs):
            one = Conditioning(None if cond.class_ids is None else cond.class_ids[i:i + 1],
                               None if cond.text_ids is None else cond.text_ids[i:i + 1])
            dense = m.forward_dense(one, s[None])  # [1, n + L, V]
            a = int(batch.cu_seqlens[i])
            # packed input drops the last token: its n + L - 1 positions equal dense's first n + L - 1
            torch.testing.assert_close(packed[a:a + n + len(s) - 1], dense[0, :-1], atol=1e-5, rtol=1e-5)


def test_changed_sequence_leaves_neighbours_unchanged():
    m = make()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, V, (L,), generator=g) for L in (8, 11, 6)]
    cls = torch.tensor([1, 2, 3])
    out = m(pack_sequences(seqs, 1, cls))
    seqs2 = [seqs[0], torch.randint(0, V, (11,), generator=g), seqs[2]]
    out2 = m(pack_sequences(seqs2, 1, torch.tensor([1, 4, 3])))
    assert torch.equal(out[:8], out2[:8]) and torch.equal(out[19:], out2[19:])
    assert not torch.allclose(out[8:19], out2[8:19])


@pytest.mark.parametrize("kind", ["class", "text", "none"])
@pytest.mark.parametrize("n_prefix_tokens", [0, 3])
def test_kv_cache_decode_matches_dense_and_packed(kind, n_prefix_tokens):
    m = make(**KINDS[kind])
    b, L = 3, 12
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (b, L), generator=g)
    cond = cond_for(m, b, seed=4)
    n = m.num_prefix(cond)
    with torch.no_grad():
        dense = m.forward_dense(cond, tokens)  # [B, n + L, V]
        cache = m.allocate_cache(b, n + L + 2, "cpu", torch.float32)
        prefix = tokens[:, :n_prefix_tokens] if n_prefix_tokens else None
        logits = m.prefill(cache, cond, prefix)
        torch.testing.assert_close(logits, dense[:, n - 1 + n_prefix_tokens], atol=1e-5, rtol=1e-5)
        for t in range(n_prefix_tokens, L):
            logits = m.decode_step(cache, tokens[:, t], torch.tensor(n + t))
            torch.testing.assert_close(logits, dense[:, n + t], atol=1e-5, rtol=1e-5)
        packed = m(pack_sequences(list(tokens), n, cond.class_ids, cond.text_ids))  # [B*(n+L-1), V]
        torch.testing.assert_close(packed.reshape(b, n + L - 1, V), dense[:, :-1], atol=1e-5, rtol=1e-5)
    # reset zeroes in place and keeps the buffers (what a captured CUDA graph points at)
    ptrs = [t.data_ptr() for t in cache.tensors()]
    cache.reset()
    assert [t.data_ptr() for t in cache.tensors()] == ptrs and not any(t.any() for t in cache.tensors())


def test_cache_rows_are_independent_and_mask_unwritten_positions():
    m = make()
    cond = Conditioning(torch.tensor([0, 1]))
    tokens = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = m.allocate_cache(2, 10)
        cache.fill_(100.0)  # garbage beyond the written positions must not leak into attention
        m.prefill(cache, cond, tokens[:, :2])
        out = m.decode_step(cache, tokens[:, 2], torch.tensor(3))
        ref = m.forward_dense(cond, tokens[:, :3])[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_decode_step_over_a_kv_len_prefix_equals_the_whole_cache(kind):
    # kv_len attends over cache[:kv_len] only: the same logits as the whole cache (and the dense
    # recompute), at pos = kv_len - 1, mid-bucket, at the max_len cap.
    m = make(**KINDS[kind])
    b, L = 2, 13
    tokens = torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(5))
    cond = cond_for(m, b, seed=6)
    n = m.num_prefix(cond)
    max_len = n + L  # the last token is fed at the last cache position
    with torch.no_grad():
        dense = m.forward_dense(cond, tokens)  # [B, n + L, V]
        cache = m.allocate_cache(b, max_len)
        cache.fill_(100.0)  # garbage beyond the written positions must stay out of every kv_len
        m.prefill(cache, cond, tokens[:, :2])
        checked = set()
        for t in range(2, L):
            pos = n + t
            # Writing k/v at pos again writes the same values: every call sees the same cache.
            whole = m.decode_step(cache, tokens[:, t], torch.tensor(pos))
            torch.testing.assert_close(whole, dense[:, pos], atol=1e-5, rtol=1e-5)
            for kv_len in sorted({pos + 1, min(max_len, -(-(pos + 1) // 4) * 4), min(max_len, pos + 3), max_len}):
                got = m.decode_step(cache, tokens[:, t], torch.tensor(pos), kv_len)
                torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5, msg=f"pos {pos} kv_len {kv_len}")
                checked.add((kv_len - 1 - pos, kv_len == max_len))
        # pos = kv_len - 1, pos in the middle of a bucket (kv_len - pos - 1 = 1, 2), and the cap.
        assert {(0, False), (1, False), (2, False), (0, True)} <= checked
        # The slice is what is attended: garbage inside kv_len but after pos is masked, before pos
        # it is not (a wrong mask or slice would leave these equal).
        for k in cache.k:
            k[:, :, n + 2].fill_(100.0)
        bad = m.decode_step(cache, tokens[:, 3], torch.tensor(n + 3), n + 4)
        assert not torch.allclose(bad, dense[:, n + 3], atol=1e-3)
        for bad_len in (0, max_len + 1):
            with pytest.raises(ValueError, match="kv_len"):
                m.decode_step(cache, tokens[:, 3], torch.tensor(n + 3), bad_len)


def test_loss_targets_exclude_prefix_and_masked_tokens():
    m = make(num_classes=0, text_vocab_size=30, max_text_len=3)
    seq = torch.arange(1, 8)
    mask = torch.tensor([False, False, False, True, True, True, True])  # first 3 tokens are context
    batch = pack_sequences([seq, seq[:2]], 3, text_ids=torch.zeros(2, 3, dtype=torch.long),
                           loss_masks=[mask, torch.ones(2, dtype=torch.bool)], pad_to=20)
    logits = m(batch)
    assert logits.shape == (20, V)
    t = batch.targets
    # seq 0: slots [c, c, c, s1..s6] -> targets [-, -, s1?, ...] with s1..s3 masked as context
    assert t[:9].tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 4, 5, 6, 7]
    assert t[9:13].tolist() == [IGNORE, IGNORE, 1, 2]
    assert (t[13:] == IGNORE).all() and batch.num_seqs == 2 and batch.cu_seqlens.tolist() == [0, 9, 13, 20]
    # the model's loss reads only those positions: changing a logit elsewhere changes nothing
    loss = torch.nn.functional.cross_entropy(logits, t, ignore_index=IGNORE)
    keep = t != IGNORE
    manual = -logits[keep].log_softmax(-1).gather(1, t[keep, None]).mean()
    torch.testing.assert_close(loss, manual)


def test_save_load_round_trip_exact(tmp_path):
    m = make(**KINDS["class+text"])
    m.save_pretrained(tmp_path / "gpt")
    m2 = GPT.from_pretrained(tmp_path / "gpt").eval()
    assert m2.config == m.config and m2.fingerprint() == m.fingerprint()
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    cond = cond_for(m, 2)
    tokens = torch.randint(0, V, (2, 5))
    assert torch.equal(m.forward_dense(cond, tokens), m2.forward_dense(cond, tokens))
    # a different model gives a different fingerprint
    assert make(seed=1, **KINDS["class+text"]).fingerprint() != m.fingerprint()


def test_class_dropout_rate_is_as_configured():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (200_000,), generator=g)
    for p in (0.1, 0.3):
        out = drop_classes(ids, p, null_id=10, generator=torch.Generator().manual_seed(1))
        rate = (out == 10).float().mean().item()
        assert abs(rate - p) < 0.005, (p, rate)  # ~7 standard errors
        assert torch.equal(out[out != 10], ids[out != 10])
    assert torch.equal(drop_classes(ids, 0.0, 10), ids)
    text = torch.randint(1, 30, (50_000, 4), generator=g)
    dropped = drop_text(text, 0.1, pad_id=0, generator=torch.Generator().manual_seed(2))
    rows = (dropped == 0).all(1)
    assert abs(rows.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~rows], text[~rows])
    # through the model, with the configured rate, reproducible per generator seed
    m = make(num_classes=7, class_dropout=0.25)
    c = Conditioning(torch.randint(0, 7, (40_000,), generator=g))
    d1 = m.drop_condition(c, torch.Generator().manual_seed(5))
    d2 = m.drop_condition(c, torch.Generator().manual_seed(5))
    assert torch.equal(d1.class_ids, d2.class_ids)
    assert abs((d1.class_ids == 7).float().mean().item() - 0.25) < 0.01
    # class and text together: one draw per row drops both (the null row guidance samples with)
    m = make(num_classes=7, class_dropout=0.1, text_vocab_size=30, max_text_len=4, text_pad_id=0)
    both = Conditioning(torch.randint(0, 7, (40_000,), generator=g), torch.randint(1, 30, (40_000, 4), generator=g))
    d = m.drop_condition(both, torch.Generator().manual_seed(6))
    cls_null, text_null = d.class_ids == 7, (d.text_ids == 0).all(1)
    assert torch.equal(cls_null, text_null)
    assert abs(cls_null.float().mean().item() - 0.1) < 0.01


def test_presets_sizes_and_init():
    sizes = {}
    for name in ("B", "L", "XL"):
        with torch.device("meta"):
            sizes[name] = GPT.from_preset(name, vocab_size=8197, max_seq_len=2100, num_classes=101).num_params()
    assert 90e6 < sizes["B"] < 110e6 and 310e6 < sizes["L"] < 345e6 and 600e6 < sizes["XL"] < 660e6
    assert set(GPT.presets()) == {"debug", "B", "L", "XL"}
    m = GPT.from_preset("debug", vocab_size=V, max_seq_len=32, num_classes=3)
    assert not m.head.weight.any()  # zero-init head: first loss is log(V)
    assert not any(n.endswith("bias") for n, _ in m.named_parameters())
    batch = pack_sequences([torch.arange(5)], 1, torch.tensor([0]))
    loss = torch.nn.functional.cross_entropy(m(batch), batch.targets, ignore_index=IGNORE)
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 1e-5


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        GPTConfig(vocab_size=V, max_seq_len=10, dim=30, n_heads=4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        GPTConfig(vocab_size=V, max_seq_len=10, dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="attn_backend"):
        GPTConfig(vocab_size=V, max_seq_len=10, attn_backend="fast")
    with pytest.raises(ValueError, match="text_vocab_size"):
        GPTConfig(vocab_size=V, max_seq_len=10, text_vocab_size=5)
    from arvid.config import from_dict
    with pytest.raises(ConfigError, match="vocab_size"):
        from_dict(GPTConfig, {"max_seq_len": 5})
    m = make()
    with pytest.raises(ValueError, match="class_ids"):
        m.forward_dense(Conditioning(), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\]"):
        m.forward_dense(Conditioning(torch.tensor([6])), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        m.allocate_cache(1, 65)
    with pytest.raises(ValueError, match="prefix slots"):
        m(pack_sequences([torch.arange(3)], 2, torch.tensor([0])))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backends_and_cuda_graph_decode():
    from arvid.generator.attention import available_backends

    m = make(**KINDS["class"]).cuda()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (L,), generator=g) for L in (40, 3, 57)]
    batch = pack_sequences(seqs, 1, torch.tensor([0, 1, 2])).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        m.set_attn_backend("sdpa")
        ref = m(batch).float()
        for name in available_backends("cuda", torch.bfloat16):
            m.set_attn_backend(name)
            torch.testing.assert_close(m(batch).float(), ref, atol=5e-2, rtol=5e-2, msg=name)
    # decode_step captured in a CUDA graph gives the eager logits
    cond = Conditioning(torch.tensor([1, 2], device="cuda"))
    tokens = torch.randint(0, V, (2, 8), generator=g).cuda()
    with torch.no_grad():
        cache = m.allocate_cache(2, 16)
        m.prefill(cache, cond, tokens[:, :2])
        eager = [m.decode_step(cache, tokens[:, t], torch.tensor(1 + t, device="cuda")) for t in range(2, 8)]
        cache.reset()
        m.prefill(cache, cond, tokens[:, :2])
        tok_buf = tokens[:, 2].clone()
        pos_buf = torch.tensor(3, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph (allocations, kernel selection)
            m.decode_step(cache, tok_buf, pos_buf)
        torch.cuda.current_stream().wait_stream(s)
        cache.reset()
        m.prefill(cache, cond, tokens[:, :2])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_buf = m.decode_step(cache, tok_buf, pos_buf)
        cache.reset()
        m.prefill(cache, cond, tokens[:, :2])
        for i, t in enumerate(range(2, 8)):
            tok_buf.copy_(tokens[:, t])
            pos_buf.fill_(1 + t)
            graph.replay()
            torch.testing.assert_close(out_buf, eager[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_joint_rope_gives_the_same_bits(qk_norm):
    """The decode step rotates q and k in one pass (``joint_rope``): exactly the values of rotating
    them one by one, which prefill and training do."""
    from arvid.generator.gpt import rope_tables

    m = make(qk_norm=qk_norm)
    attn = m.blocks[0].attn
    x = torch.randn(3, 5, m.config.dim)
    rope = rope_tables(torch.arange(7, 12), m.config.head_dim, m.config.rope_theta)
    with torch.no_grad():
        sep = attn.qkv(x, rope)
        joint = attn.qkv(x, rope, joint_rope=True)
    for a, b in zip(sep, joint):
        assert a.shape == b.shape
        assert torch.equal(a, b)
    # which path ran: without qk_norm q and k are views of the one rotated tensor (the joint pass);
    # with it, each is normed by its own gain first, so the two are rotated one by one
    q, k = joint[0], joint[1]
    assert (q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()) == (not qk_norm)


def test_decode_step_kernel_count_per_layer():
    """Launch overhead dominates a decode step at small batch: the step's compute ops (aten ops that
    are not views, as dispatched on CPU) must not grow per layer. The rotary tables and the length
    mask are built once per step and the rotation takes 6 ops; before, a layer dispatched 58."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"view", "_unsafe_view", "t", "select", "slice", "permute", "unsqueeze", "split", "split_with_sizes",
             "expand", "reshape", "unflatten", "transpose", "alias", "detach", "squeeze", "chunk"}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in views:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    per_layer = []
    for layers in (2, 6):
        torch.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=V, max_seq_len=64, num_classes=5, dim=64, n_layers=layers, n_heads=4,
                          n_kv_heads=2)).eval()
        cache = m.allocate_cache(2, 32)
        with torch.no_grad():
            m.prefill(cache, cond_for(m, 2))
            Count.n = 0
            with Count():
                m.decode_step(cache, torch.tensor([1, 2]), torch.tensor(m.config.num_prefix), 16)
        per_layer.append(Count.n)
    growth = (per_layer[1] - per_layer[0]) / 4  # ops added by each extra layer
    assert growth <= 27, f"{growth} compute ops per layer per decode step (58 before the shared tables)"


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_compiled_decode_step_does_not_copy_the_cache(attention):
    """torch.compile must write k/v into the cache in place. When the layers' caches were views of one
    ``[n_layers, ...]`` tensor, the functionalised step copied each layer's slice into a new buffer (of
    the layer cache's shape, in inductor's code) and the whole cache back, and the compiled step's
    time grew with the cache's length (0.50 ms at 512 positions, 12.3 ms at 32,768, debug GPT on the
    CPU, benchmarks/bench_compiled_decode.py). Both decode attentions (``flex``: FlexAttention with
    the length mask as a score modification) give the eager sdpa step's logits, compiled as the
    sampler compiles them (``compile_decode_step``)."""
    from torch._dynamo import reset as dynamo_reset
    from torch._inductor.utils import run_and_get_code

    from arvid.sampling.compiled import compile_decode_step

    m = make()
    max_len = 61  # a size no other buffer of the step has
    cond = cond_for(m, 2)
    tokens = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache, ref = m.allocate_cache(2, max_len), m.allocate_cache(2, max_len)
        m.prefill(cache, cond, tokens[:, :2])
        m.prefill(ref, cond, tokens[:, :2])
        buffers = [t.data_ptr() for t in cache.tensors()]
        n = m.num_prefix(cond)
        dynamo_reset()  # a fresh shape history: the first call compiles a static graph
        step = compile_decode_step(m, attention)
        got, codes = run_and_get_code(step, cache, tokens[:, 2], torch.tensor(n + 2), 16)
        want = m.decode_step(ref, tokens[:, 2], torch.tensor(n + 2), 16)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the new k/v landed in the caller's buffers, identical to the eager step's
        assert [t.data_ptr() for t in cache.tensors()] == buffers
        for a, b in zip(cache.tensors(), ref.tensors()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    import re

    code = "\n".join(codes)
    # a buffer whose shape has the cache's length among its sizes: empty_strided_cpu((2, 2, 61, 16), ...)
    allocs = [line for line in code.splitlines() for shape in re.findall(r"empty_strided\w*\(\(([^)]*)\)", line)
              if str(max_len) in [x.strip() for x in shape.split(",")]]
    assert not allocs, "the compiled step allocates cache-sized buffers:\n" + "\n".join(allocs[:4])


def test_flex_decode_attention_equals_sdpa_with_grouped_heads_and_rejects_unknown_names():
    """The FlexAttention decode path (eager here) masks the positions after ``pos`` as the sdpa
    length mask does, for grouped kv heads too; an unknown attention name is refused."""
    m = make(n_kv_heads=1)
    cond = cond_for(m, 3)
    tokens = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = m.allocate_cache(3, 40)
        m.prefill(cache, cond, tokens[:, :6])
        n = m.num_prefix(cond)
        for kv_len in (n + 7, 32, None):
            want = m.decode_step(cache, tokens[:, 6], torch.tensor(n + 6), kv_len)
            got = m.decode_step(cache, tokens[:, 6], torch.tensor(n + 6), kv_len, attention="flex")
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="decode attention must be 'sdpa' or 'flex', got 'fa'"):
            m.decode_step(cache, tokens[:, 6], torch.tensor(n + 6), attention="fa")


def test_cast_for_inference_keeps_norm_gains_float32_and_samples():
    from arvid.generator.gpt import RMSNorm
    from arvid.sampling.sampler import _model_device_dtype

    m = make()
    ref = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert m.cast_for_inference_(torch.bfloat16) is m
    for n, p in m.named_parameters():
        owner = m.get_submodule(n.rsplit(".", 1)[0]) if "." in n else m
        want = torch.float32 if isinstance(owner, RMSNorm) else torch.bfloat16
        assert p.dtype == want, n
        assert torch.equal(p.float(), ref[n].to(want).float()), n  # gains kept exactly, the rest rounded once
    assert _model_device_dtype(m) == (torch.device("cpu"), torch.bfloat16)
    cache = m.allocate_cache(2, 16)
    assert cache.dtype == torch.bfloat16
    with torch.no_grad():
        m.prefill(cache, cond_for(m, 2))
        logits = m.decode_step(cache, torch.tensor([1, 2]), torch.tensor(m.config.num_prefix), 16)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_bf16_residual_stream_matches_float32_within_bf16_rounding():
    """residual_dtype=compute keeps the packed forward's residual stream in the autocast dtype: the
    hidden states are bf16 between blocks, the logits and gradients stay within bf16 rounding of
    the float32 stream, and without autocast it is the float32 model bit for bit."""
    with pytest.raises(ValueError, match="residual_dtype"):
        GPTConfig(vocab_size=V, max_seq_len=10, residual_dtype="bf16")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (9, 5, 12)]
    batch = pack_sequences(seqs, 1, torch.tensor([0, 3, 1]))
    ref, half = make(attn_backend="sdpa"), make(attn_backend="sdpa", residual_dtype="compute")
    assert torch.equal(ref(batch), half(batch))  # no autocast: the stream is float32 either way
    seen = []  # the residual stream entering the second block
    for m in (ref, half):
        m.blocks[1].attn_norm.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].dtype))
    outs = []
    for m in (ref, half):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(batch)
        logits.float().square().mean().backward()
        outs.append((logits.float(), m.blocks[0].attn.wqkv.weight.grad.clone()))
    assert seen == [torch.float32, torch.bfloat16]
    (l32, g32), (l16, g16) = outs
    assert not torch.equal(l32, l16)  # the stream did change
    assert (l16 - l32).abs().max() < 0.05 * l32.abs().max()
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99


def test_gpt_through_the_cudnn_varlen_ops_eager_and_compiled(monkeypatch):
    """The GPT with attn_backend=cudnn_varlen, its cuDNN kernels replaced by dense CPU stand-ins
    (tests/_cudnn_standin.py), gives the sdpa model's logits and gradients, eagerly and under
    torch.compile (through the custom ops' fakes): the backend's plumbing
    inside the model. cuDNN itself runs on a GPU only (the GPU tests iterate every backend)."""
    import importlib.util
    from pathlib import Path

    from arvid.generator import attention as A

    spec = importlib.util.spec_from_file_location("_cudnn_standin", Path(__file__).parent / "_cudnn_standin.py")
    standin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standin)
    real = A.backend_unavailable_reason
    monkeypatch.setattr(A, "backend_unavailable_reason",
                        lambda name, d, t: None if name == "cudnn_varlen" else real(name, d, t))
    lib = standin.register()
    A._CUDNN_LSE_HEADS_FIRST.clear()
    try:
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, V, (n,), generator=g) for n in (9, 5, 12)]
        batch = pack_sequences(seqs, 1, torch.tensor([0, 3, 1]))
        results = []
        for backend, compile_ in (("sdpa", False), ("cudnn_varlen", False), ("cudnn_varlen", True)):
            m = make(attn_backend=backend)
            run = torch.compile(m) if compile_ else m  # as the Trainer compiles it
            logits = run(batch)
            logits.float().square().mean().backward()
            results.append((logits.detach(), m.blocks[0].attn.wqkv.weight.grad.clone()))
        (l0, g0), *rest = results
        for logits, grad in rest:
            torch.testing.assert_close(logits, l0, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(grad, g0, atol=1e-6, rtol=1e-4)
        assert sum(c[0] == "fwd" for c in standin.CALLS) == 2 * 2  # 2 layers, eager and compiled
    finally:
        lib._destroy()
        A._CUDNN_LSE_HEADS_FIRST.clear()


def test_vocab_head_pads_its_matmul_and_gives_the_plain_linear_values():
    """The output head's matmul runs over the vocabulary padded to a multiple of 64 for inputs of
    many rows (aligned rows for cuBLAS), plain for a few rows (decode); the logits and gradients
    are the plain ``nn.Linear``'s either way, over the real vocabulary only."""
    from arvid.generator.gpt import VocabHead

    torch.manual_seed(0)
    head = VocabHead(32, 197)
    plain = torch.nn.Linear(32, 197, bias=False)
    plain.weight.data.copy_(head.weight.data)
    for rows in (3, 2048):
        x = torch.randn(rows, 32, requires_grad=True)
        out = head(x)
        assert out.shape == (rows, 197)
        assert (out.stride(0) == 256) == (rows >= VocabHead.MIN_ROWS)  # padded rows: 197 -> 256
        ref = plain(x)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        g = torch.randn(rows, 197)
        gx, gw = torch.autograd.grad((out * g).sum(), (x, head.weight))
        rx, rw = torch.autograd.grad((ref * g).sum(), (x, plain.weight))
        torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-5)
    x3 = torch.randn(2, 600, 32)  # [B, T, dim]: 1,200 rows, padded
    out3 = head(x3)
    assert out3.shape == (2, 600, 197) and out3.stride(1) == 256
    torch.testing.assert_close(out3, plain(x3), atol=1e-6, rtol=1e-6)
    assert VocabHead(32, 256)(torch.randn(2048, 32)).is_contiguous()  # already aligned: no padding


def test_saved_rope_tables_are_the_tables_and_trace():
    """The training forward's opaque table op (kept for the backward rather than recomputed in it)
    gives rope_tables' values, and its fake traces under AOT autograd."""
    from arvid.generator.gpt import rope_tables, rope_tables_saved

    pos = torch.tensor([0, 1, 2, 0, 1, 5, 9], dtype=torch.int32)
    c, s = rope_tables_saved(pos, 16, 10000.0)
    c2, s2 = rope_tables(pos, 16, 10000.0)
    assert c.shape == (7, 1, 16) and c.dtype == torch.float32
    assert torch.equal(c, c2) and torch.equal(s, s2)
    torch.library.opcheck(torch.ops.arvid.rope_tables.default, (pos, 16, 10000.0))


def test_packed_forward_checks_the_backend_once_not_in_every_layer(monkeypatch):
    """GPT.forward resolves its attention backend once (GPT._backend) and the layers call the
    kernels without checking availability again: under torch.compile those checks were traced in
    every layer, and cudnn_fe's package lookup broke the compiled graph at every attention (H100,
    2026-12-07: two eager gradient additions per layer in the profile). The graph breaks of a
    compiled forward do not grow with the layer count."""
    from arvid.generator import attention as A
    from arvid.generator.packing import pack_sequences

    seqs = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (30, 50, 17)]
    batch = pack_sequences(seqs, 1, torch.tensor([0, 1, 2]), pad_to=128, max_seqlen=150)
    breaks = []
    for layers in (2, 4):
        torch.manual_seed(0)
        m = GPT.from_preset("debug", vocab_size=300, max_seq_len=200, num_classes=5, n_layers=layers,
                            attn_backend="sdpa")
        expected = m(batch)  # resolves the backend once
        with monkeypatch.context() as mp:
            mp.setattr(A, "resolve_backend", lambda *a, **k: (_ for _ in ()).throw(AssertionError("checked again")))
            torch.testing.assert_close(m(batch), expected)
            torch._dynamo.reset()
            breaks.append(torch._dynamo.explain(m)(batch).graph_break_count)
    torch._dynamo.reset()
    assert breaks[0] == breaks[1], breaks
    with pytest.raises(ValueError, match="concrete attention backend"):
        A.varlen_causal_attention(torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2, 8),
                                  torch.tensor([0, 4], dtype=torch.int32), 4, "auto", resolved=True)


