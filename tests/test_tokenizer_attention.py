"""Packed block-causal attention: the backends agree, and the mask is the packed rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arvid.tokenizer.attention import Segments, flex_block_mask, packed_attention, packed_mask


def _qkv(nq: int, nk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, nq, 8, generator=g), torch.randn(2, nk, 8, generator=g), torch.randn(2, nk, 8, generator=g))


def test_segments_and_mask():
    seg = Segments.from_block_lengths(torch.tensor([[2, 1], [1, 3]]))
    assert seg.vid.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert seg.blk.tolist() == [0, 0, 1, 0, 1, 1, 1]
    assert seg.counts == [3, 4]
    m = packed_mask(seg, seg)
    assert m[2].tolist() == [True, True, True, False, False, False, False]  # block 1 of video 0
    assert m[0].tolist() == [True, True, False, False, False, False, False]  # block 0 of video 0
    assert m[4].tolist() == [False, False, False, True, True, True, True]


def test_backends_agree_with_per_video_reference():
    qs = Segments.from_block_lengths(torch.tensor([[2, 3, 1], [4, 1, 2], [1, 1, 1]]))
    ks = Segments.uniform(3, torch.tensor([0, 0, 1, 1, 2, 2]))
    q, k, v = _qkv(qs.total, ks.total)
    loop = packed_attention(q, k, v, qs, ks, backend="loop")
    dense = packed_attention(q, k, v, qs, ks, backend="dense")
    torch.testing.assert_close(loop, dense, atol=1e-5, rtol=1e-5)
    # reference: plain softmax attention for each query row over its allowed keys
    allowed = packed_mask(qs, ks)
    scores = torch.einsum("hqd,hkd->hqk", q, k) / 8**0.5
    ref = torch.einsum("hqk,hkd->hqd", F.softmax(scores.masked_fill(~allowed, float("-inf")), -1), v)
    torch.testing.assert_close(loop, ref, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_the_packed_rule():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    qs = Segments.from_block_lengths(torch.tensor([[2, 3, 1], [4, 1, 2]]))
    ks = Segments.from_block_lengths(torch.tensor([[3, 2, 2], [1, 2, 1]]))
    q, k, v = _qkv(qs.total, ks.total, seed=1)
    try:  # probe eager flex itself (no arvid code): only its absence on this CPU build is a skip
        flex_attention(q[None], k[None], v[None])
    except Exception as e:
        pytest.skip(f"FlexAttention unavailable on CPU here: {e}")
    # outside the try: a mask that fails to build, or that flex fails on, is a failure, not a skip
    out = flex_attention(q[None], k[None], v[None], block_mask=flex_block_mask(qs, ks))[0]
    torch.testing.assert_close(out, packed_attention(q, k, v, qs, ks, backend="loop"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tile", [8, 16, 128])
@pytest.mark.parametrize("seed", range(4))
def test_block_tiles_are_exact_against_the_element_mask(tile, seed):
    # FlexAttention skips tiles that are in neither list and computes "full" tiles without the
    # mask, so both must be exact. (Eager flex on CPU ignores the sparsity, so an output
    # comparison could not catch a wrong tile list: this checks the lists themselves.)
    from arvid.tokenizer.attention import block_tiles

    g = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 7, (1,), generator=g))
    qs = Segments.from_block_lengths(torch.randint(0, 4, (B, 4), generator=g) * 8 + 1)
    ks = Segments.uniform(B, torch.arange(4).repeat_interleave(int(torch.randint(3, 40, (1,), generator=g))))
    for a, b in ((qs, ks), (ks, qs), (qs, qs), (ks, ks)):
        partial, full = block_tiles(a, b, tile)
        allowed = packed_mask(a, b)
        assert not bool((partial & full).any())
        for i in range(partial.shape[0]):
            for j in range(partial.shape[1]):
                sub = allowed[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                if full[i, j]:
                    assert sub.shape == (tile, tile) and bool(sub.all()), (i, j)
                elif not partial[i, j]:
                    assert not bool(sub.any()), (i, j)
                elif a.vid[i * tile:(i + 1) * tile].unique().numel() == 1 and \
                        b.vid[j * tile:(j + 1) * tile].unique().numel() == 1:
                    # one video on both sides: partial exactly when mixed
                    assert bool(sub.any()) and not (sub.shape == (tile, tile) and bool(sub.all())), (i, j)


def test_flex_block_mask_tiles_match_create_block_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import create_block_mask

    qs = Segments.from_block_lengths(torch.tensor([[64, 32, 128, 16], [16, 16, 256, 32], [128, 128, 128, 128]]))
    ks = Segments.uniform(3, torch.arange(4).repeat_interleave(64))
    for a, b in ((qs, qs), (qs, ks), (ks, qs)):
        ours = flex_block_mask(a, b)

        def rule(bb, h, qi, ki, a=a, b=b):
            return (a.vid[qi] == b.vid[ki]) & (b.blk[ki] <= a.blk[qi])

        ref = create_block_mask(rule, B=None, H=None, Q_LEN=a.total, KV_LEN=b.total, device="cpu")
        # the same tiles computed (our boundary tiles may be kept as partial where the reference
        # finds them empty, never the other way round), the same tiles computed unmasked
        got, want = ours.to_dense().bool(), ref.to_dense().bool()
        assert bool((want <= got).all()) and int(got.sum()) - int(want.sum()) <= 2 * (3 + got.shape[-2])
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_flex_with_tile_masks_matches_the_reference():
    # Compiled FlexAttention (inductor's CPU kernel here, Triton on a GPU) is what reads the tile
    # lists: it skips absent tiles and runs "full" ones unmasked. Eager flex ignores them.
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from arvid.tokenizer.attention import _kv_lists, block_tiles

    torch.manual_seed(0)
    qs = Segments.from_block_lengths(torch.tensor([[128, 128, 128, 128], [16, 64, 64, 16], [32, 32, 16, 64],
                                                   [48, 16, 16, 16], [64, 64, 48, 16]]))
    ks = Segments.uniform(5, torch.arange(4).repeat_interleave(64))
    q, k, v = (torch.randn(2, n, 16) for n in (qs.total, ks.total, ks.total))
    ref = packed_attention(q, k, v, qs, ks, backend="loop")
    fn = torch.compile(flex_attention, dynamic=False)
    mask = flex_block_mask(qs, ks)  # outside the try: a failure to build the mask is a failure
    try:
        out = fn(q[None], k[None], v[None], block_mask=mask)[0]
    except Exception as e:
        if "Compiler" not in type(e).__name__ and "compiler" not in str(e).lower():
            raise
        pytest.skip(f"no C++ toolchain for inductor here: {type(e).__name__}: {e}")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    partial, full = block_tiles(qs, ks)
    assert int(full.sum()) >= 1  # the case exercises unmasked tiles
    # the kernel does use the lists: dropping the full tiles changes the result
    n, i = _kv_lists(partial)
    z, zi = _kv_lists(torch.zeros_like(full))
    bad = BlockMask.from_kv_blocks(n, i, z, zi, BLOCK_SIZE=128, mask_mod=flex_block_mask(qs, ks).mask_mod,
                                   seq_lengths=(qs.total, ks.total))
    assert (fn(q[None], k[None], v[None], block_mask=bad)[0] - ref).abs().max() > 1e-2


@pytest.mark.gpu
def test_evatok_flex_matches_loop_on_cuda():
    from arvid.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug").cuda().eval()
    video = torch.rand(3, 3, 8, 32, 32, device="cuda") * 2 - 1
    a = torch.tensor([[4, 8, 16, 32], [32, 4, 8, 16], [8, 8, 8, 8]])
    tok.config.attention = "flex"
    r1, q1 = tok(video, a)
    tok.config.attention = "loop"
    r2, q2 = tok(video, a)
    assert (q1.indices == q2.indices).float().mean() > 0.99
    torch.testing.assert_close(r1, r2, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["loop", "flex"])
def test_evatok_training_step_barely_syncs_with_the_host(backend):
    """Each host sync drains the GPU's queue, which then idles while the host launches the next
    kernels. EVATok's per-(block, count) index paths synced twice per group (a boolean mask's
    nonzero, blocking copies of index tensors: 30-40 syncs for 8 clips of mixed assignments); they
    now slice contiguous patch ranges and copy their indices once, non-blocking; the task keeps the
    assignment on the host and its metrics on the device, and the VQ counts codes without
    bincount. What may remain: the quantizer's restart-interval check. Counted over the Trainer's
    task step (L1 + LPIPS-free losses, VQ with its codebook update), forward and backward."""
    import warnings

    from arvid.tokenizer import build_tokenizer
    from arvid.tokenizer.losses import LossConfig, RandomAssignments, TokenizerTask

    torch.manual_seed(0)
    tok = build_tokenizer("evatok", preset="debug").cuda().train()
    tok.config.attention = backend
    task = TokenizerTask(tok, LossConfig(lpips_weight=0.0), RandomAssignments(tok.layout)).cuda()
    video = torch.rand(8, 3, 8, 32, 32, device="cuda") * 2 - 1
    g = torch.Generator().manual_seed(0)

    def step(i):
        out = task.training_step({"video": video, "label": torch.zeros(8, dtype=torch.long)}, i, g)
        out.losses["main"].backward()

    step(0)  # warm-up: compilation (flex) syncs as it likes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(1)
            n_step = len(caught)
            torch.zeros(1, device="cuda").item()  # a positive control: one sync the count must see
    finally:
        torch.cuda.set_sync_debug_mode("default")
    control = [w for w in caught[n_step:] if "synchroniz" in str(w.message)]
    assert len(control) == 1, "the sync-debug warnings were not captured: the count below would read 0"
    syncs = [w for w in caught[:n_step] if "synchroniz" in str(w.message)]
    assert len(syncs) <= 3, [str(w.message)[:120] + f" ({w.filename}:{w.lineno})" for w in syncs[:8]]


def test_compiled_flex_runs_under_a_raised_recompile_limit(monkeypatch):
    """Past dynamo's default 8 recompiles flex_attention would run unfused for the rest of the
    process (seen in curation on the H100 and H200): each call of the compiled function runs with
    the limit raised to FLEX_RECOMPILE_LIMIT (a higher one is kept), and the process's own limit is
    back afterwards."""
    import torch._dynamo

    from arvid.tokenizer import attention

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    seen = []

    def fake_flex(q, k, v, block_mask=None):
        seen.append(getattr(cfg, name))
        return torch.zeros_like(q)

    monkeypatch.setattr(attention, "_compiled_flex", lambda: fake_flex)
    seg = Segments.from_block_lengths(torch.tensor([[2, 3], [1, 4]]))
    q = torch.randn(2, seg.total, 8)
    for limit in (8, 500):
        with cfg.patch(**{name: limit}):
            attention.packed_attention(q, q, q, seg, seg, backend="flex")
            assert getattr(cfg, name) == limit
    assert seen == [attention.FLEX_RECOMPILE_LIMIT, 500] and attention.FLEX_RECOMPILE_LIMIT == 64


def test_flex_recompiles_are_bounded_over_varied_batches(monkeypatch):
    """Curation feeds FlexAttention packed batches of every size and assignment mix. Dynamo's guards
    (with dynamic shapes) must settle on a few graphs, one per relation of the query and key
    lengths (self-attention Nq = Nk, cross-attention Nq < Nk and Nq > Nk) and a few size
    specialisations (a single-tile mask), not one per batch: past the recompile limit FlexAttention
    runs unfused. Counted with dynamo's eager backend, which guards as inductor does and needs no
    compiler on the CPU. Inference alone makes 6 graphs here (torch 2.13); the H100 and H200 logs
    show dynamo's default limit of 8 reached at curation's start, in the pipeline process that had
    just trained the proxy tokenizer, hence FLEX_RECOMPILE_LIMIT. One graph per batch would make 21."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from arvid.tokenizer import attention
    from arvid.tokenizer.base import build_tokenizer

    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=True, backend="eager")
    monkeypatch.setattr(attention, "_compiled_flex", lambda: compiled)
    m = build_tokenizer("evatok", {"attention": "flex", "image_size": 64, "patch_size": 8,
                                   "frames_per_block": [4, 4, 4, 4], "candidates": [16, 32, 64, 128]},
                        preset="debug").eval()
    cands = torch.tensor([16, 32, 64, 128])
    g = torch.Generator().manual_seed(0)
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for b in (4, 3, 8, 1, 5, 2, 7):
            video = torch.rand(b, 3, 16, 64, 64, generator=g) * 2 - 1
            assignment = cands[torch.randint(0, 4, (b, 4), generator=g)]
            m.decode(m.encode(video, assignment))
    graphs = counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert 3 <= graphs <= 8, graphs
