"""Bad inputs across stages: outputs of another tokenizer (fingerprint mismatch), impossible layouts,
class ids out of range, short or broken context videos, and property tests over the sampler.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _toy_store import write_random_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arvid.config import ConfigError
from arvid.data.token_store import TokenStoreError
from arvid.data.types import BlockLayout, TokenizedVideo
from arvid.tokenizer.base import build_tokenizer

TOK_PARAMS = dict(frames_per_block=[2, 2, 2, 2], candidates=[1, 4, 16], image_size=16)


def _tok(seed: int, **kw):
    torch.manual_seed(seed)
    return build_tokenizer("evatok", {**TOK_PARAMS, **kw}, preset="debug")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    """Tokenizers A and B (same architecture, other weights), C (another codebook size), a token store
    written by A, and a class-conditional GPT trained one step on it (4 classes)."""
    from arvid.stages.train_generator import TrainGeneratorConfig, run
    from arvid.training import TrainerConfig

    root = tmp_path_factory.mktemp("inputs")
    a, b = _tok(0), _tok(1)
    c = _tok(0, quantizer=dict(kind="vq", codebook_size=128, code_dim=8))
    for name, t in (("A", a), ("B", b), ("C", c)):
        t.save_pretrained(root / name)
    write_random_store(root / "store", a, 8, 4)
    run(TrainGeneratorConfig(token_store=str(root / "store"), tokenizer=str(root / "A"), preset="debug",
                             gpt=dict(attn_backend="sdpa"), max_tokens=200, out_dir=str(root / "gen"),
                             trainer=TrainerConfig(max_steps=1, batch_size=1, device="cpu", progress=False,
                                                   checkpoint_every=0)))
    return root


def test_token_store_of_another_tokenizer_is_refused(env, tmp_path):
    from arvid.data.token_store import TokenStore
    from arvid.stages.train_generator import TrainGeneratorConfig, run

    with pytest.raises(TokenStoreError, match="written by tokenizer fingerprint .* but the tokenizer in use"):
        run(TrainGeneratorConfig(token_store=str(env / "store"), tokenizer=str(env / "B"), preset="debug",
                                 out_dir=str(tmp_path / "g")))
    assert not (tmp_path / "g" / "checkpoints").exists()  # refused before any training
    from arvid.tokenizer.base import load_tokenizer

    store = TokenStore(env / "store")
    with pytest.raises(TokenStoreError, match="fingerprint"):
        store.check_fingerprint(load_tokenizer(env / "B").fingerprint())
    store.check_fingerprint(load_tokenizer(env / "A").fingerprint())  # the writer's own passes


def test_tokenize_into_a_store_of_another_tokenizer_is_refused(env, tmp_path):
    """Resuming a tokenize run with a different tokenizer must not mix two tokenizers' codes."""
    from arvid.data.datasets import DataConfig
    from arvid.stages.tokenize import TokenizeConfig, run

    data = DataConfig(source="synthetic", frames=8, size=16, num_videos=4, num_val_videos=2, random_start=False)
    cfg = dict(data=data, fixed_assignment=[4, 4, 4, 4], batch_size=4, save_every=4, device="cpu",
               out_dir=str(tmp_path / "t"))
    import shutil

    shutil.copytree(env / "A", tmp_path / "tok")
    run(TokenizeConfig(tokenizer=str(tmp_path / "tok"), **cfg))
    with pytest.raises(ConfigError, match=r"another config \(tokenizer changed"):  # another tokenizer path
        run(TokenizeConfig(tokenizer=str(env / "B"), **cfg))
    shutil.rmtree(tmp_path / "tok")
    shutil.copytree(env / "B", tmp_path / "tok")  # another tokenizer under the same path
    with pytest.raises(TokenStoreError, match="fingerprint"):
        run(TokenizeConfig(tokenizer=str(tmp_path / "tok"), **cfg))


def test_sample_rejects_class_ids_out_of_range(env, tmp_path):
    from arvid.stages.sample import SampleConfig, run

    for bad in ([4], [-1], [0, 99]):
        with pytest.raises(ConfigError, match=r"class ids .* outside \[0, 4\)"):
            run(SampleConfig(generator=str(env / "gen" / "gpt"), tokenizer=str(env / "A"), classes=bad,
                             out=str(tmp_path / "s"), device="cpu", per_class=1))
    assert not (tmp_path / "s" / "tokens.npz").exists()


def test_sample_with_a_tokenizer_of_another_vocabulary_is_refused(env, tmp_path):
    from arvid.stages.sample import SampleConfig, run

    with pytest.raises(ValueError, match="vocab_size .* does not match the tokenizer"):
        run(SampleConfig(generator=str(env / "gen" / "gpt"), tokenizer=str(env / "C"), classes=[0],
                         out=str(tmp_path / "s"), device="cpu", per_class=1))


def test_sample_with_another_tokenizer_of_the_same_shape_is_refused(env, tmp_path):
    """train-generator records the tokenizer's fingerprint in gpt/config.yaml; another tokenizer of
    the same layout and codebook (B) would decode the GPT's codes into garbage: `arvid sample` and
    the eval stages that load a generator with a tokenizer refuse it, naming both fingerprints and
    both directories. The tokenizer it was trained on (A) passes."""
    from arvid.data.datasets import DataConfig
    from arvid.stages import evaluate
    from arvid.stages.sample import SampleConfig, run
    from arvid.tokenizer.base import load_tokenizer

    gen = env / "gen" / "gpt"
    fa, fb = load_tokenizer(env / "A").fingerprint(), load_tokenizer(env / "B").fingerprint()
    assert fa != fb and f"tokenizer_fingerprint: {fa}" in (gen / "config.yaml").read_text()

    def refused():
        want = ".*".join(re.escape(str(p)) for p in (gen, fa, env / "B", fb))
        return pytest.raises(ConfigError, match=f"(?s){want}")

    with refused():
        run(SampleConfig(generator=str(gen), tokenizer=str(env / "B"), classes=[0],
                         out=str(tmp_path / "s"), device="cpu", per_class=1, grid_format="none"))
    assert not (tmp_path / "s" / "tokens.npz").exists()
    data = DataConfig(source="synthetic", frames=8, size=16, num_videos=2, num_val_videos=2, random_start=False)
    with refused():
        evaluate.evaluate_gen(evaluate.GenEvalConfig(data=data, num_videos=2, generator=str(gen),
                                                     tokenizer=str(env / "B"), device="cpu"))
    with refused():
        evaluate.evaluate_fp(evaluate.FPEvalConfig(data=data, num_videos=2, generator=str(gen),
                                                   tokenizer=str(env / "B"), device="cpu"))
    # the tokenizer it was trained on is accepted
    out = run(SampleConfig(generator=str(gen), tokenizer=str(env / "A"), classes=[0], out=str(tmp_path / "ok"),
                           device="cpu", per_class=1, grid_format="none"))
    assert (out / "done").is_file()


def test_eval_fp_refuses_other_context_blocks_than_the_gpt_was_trained_on(env, tmp_path):
    """A frame-prediction GPT (train-generator conditioning 'frames') continues the number of
    context blocks it was trained with: eval fp with context_frames that fill another number is
    refused before any clip is read, naming both numbers."""
    import shutil

    from arvid.data.datasets import DataConfig
    from arvid.sampling.frame_prediction import context_blocks_for
    from arvid.stages import evaluate
    from arvid.tokenizer.base import load_tokenizer

    gen = tmp_path / "gpt"
    shutil.copytree(env / "gen" / "gpt", gen)
    blocks = context_blocks_for(load_tokenizer(env / "A").layout, 5)
    import yaml

    meta = yaml.safe_load((gen / "config.yaml").read_text())
    meta.update(conditioning="frames", context_blocks=blocks + 1)
    (gen / "config.yaml").write_text(yaml.safe_dump(meta))
    data = DataConfig(source="synthetic", frames=8, size=16, num_videos=2, num_val_videos=2, random_start=False)
    with pytest.raises(ConfigError, match=f"context_frames=5 fill {blocks} block.*context_blocks={blocks + 1}"):
        evaluate.evaluate_fp(evaluate.FPEvalConfig(data=data, num_videos=2, generator=str(gen),
                                                   tokenizer=str(env / "A"), device="cpu", context_frames=5))


def test_router_is_checked_by_layout_not_by_the_proxy_fingerprint(env, tmp_path):
    """A router maps raw clips to assignments of a layout; it holds nothing of the proxy tokenizer
    whose curation labels it learned, and EVATok uses it with the final tokenizer (trained from
    scratch: another fingerprint, the same layout). So a router curated with proxy A is accepted
    with tokenizer B wherever a router meets a tokenizer (tokenize, eval recon; train-tokenizer
    --stage final builds its tokenizer afresh, see test_tokenizer_train.py), and a router of
    another layout is refused there, even one whose counts all happen to be candidates of the
    tokenizer's layout (it would run silently)."""
    from arvid.data.datasets import DataConfig, build_dataset
    from arvid.data.token_store import TokenStore
    from arvid.stages import evaluate
    from arvid.stages.tokenize import TokenizeConfig
    from arvid.stages.tokenize import run as tokenize
    from arvid.tokenizer.base import load_tokenizer
    from arvid.tokenizer.router import Router

    a, b = load_tokenizer(env / "A"), load_tokenizer(env / "B")
    assert a.layout == b.layout and a.fingerprint() != b.fingerprint()
    torch.manual_seed(0)
    router = Router.from_preset("debug", a.layout, image_size=16)
    router.save_pretrained(tmp_path / "router", extra={"proxy_tokenizer_fingerprint": a.fingerprint()})
    other = Router.from_preset("debug", BlockLayout((2, 2, 2, 2), (1, 4)), image_size=16)  # counts all in A's
    other.save_pretrained(tmp_path / "other", extra={"proxy_tokenizer_fingerprint": b.fingerprint()})

    data = DataConfig(source="synthetic", frames=8, size=16, num_videos=2, num_val_videos=2, random_start=False)
    tk = dict(data=data, split="val", tokenizer=str(env / "B"), batch_size=2, device="cpu")
    out = tokenize(TokenizeConfig(router=str(tmp_path / "router"), out_dir=str(tmp_path / "t"), **tk))
    store = TokenStore(out / "tokens")
    store.check_fingerprint(b.fingerprint())  # B's codes, with the router's choices
    x = torch.stack([build_dataset(data, "val")[i]["video"] for i in range(2)])
    assert torch.equal(store.get_batch(range(2)).block_lengths.long(), router.eval().choose(x))
    rc = dict(data=data, split="val", num_videos=2, tokenizer=str(env / "B"), protocol=None, lpips=False,
              batch_size=2, device="cpu")
    res = evaluate.evaluate_recon(evaluate.ReconEvalConfig(router=str(tmp_path / "router"), **rc))
    assert "router" in res["results"]

    with pytest.raises(ConfigError, match="router layout .* differs from the tokenizer's"):
        tokenize(TokenizeConfig(router=str(tmp_path / "other"), out_dir=str(tmp_path / "t2"), **tk))
    with pytest.raises(ConfigError, match=re.escape(f"router {str(tmp_path / 'other')!r} was trained for layout")):
        evaluate.evaluate_recon(evaluate.ReconEvalConfig(router=str(tmp_path / "other"), **rc))


def test_impossible_layouts_are_config_errors(tmp_path):
    # frames_per_block not a multiple of the temporal patch
    with pytest.raises(ConfigError, match=r"frames_per_block \(3, 3\) must be positive multiples of patch_time=2"):
        build_tokenizer("evatok", dict(TOK_PARAMS, frames_per_block=[3, 3]), preset="debug")
    with pytest.raises(ConfigError, match="image_size 18 must be a multiple of patch_size 4"):
        build_tokenizer("evatok", dict(TOK_PARAMS, image_size=18), preset="debug")
    with pytest.raises(ConfigError, match="strictly ascending"):
        build_tokenizer("evatok", dict(TOK_PARAMS, candidates=[4, 4, 16]), preset="debug")
    with pytest.raises(ConfigError, match="positive"):
        build_tokenizer("evatok", dict(TOK_PARAMS, candidates=[0, 4]), preset="debug")
    with pytest.raises(ConfigError, match="not a candidate|candidates"):
        build_tokenizer("evatok", dict(TOK_PARAMS, default_assignment=[4, 4, 4, 5]), preset="debug")
    with pytest.raises(ConfigError, match="no preset 'XXL'"):
        build_tokenizer("evatok", preset="XXL")
    with pytest.raises(ConfigError, match="did you mean 'evatok'"):
        build_tokenizer("evatk")
    # frames of the data not divisible into the tokenizer's blocks: refused before training
    from arvid.data.datasets import DataConfig
    from arvid.stages.train_tokenizer import TokenizerSpec, TrainTokenizerConfig, run

    cfg = TrainTokenizerConfig(data=DataConfig(source="synthetic", frames=10, size=16, num_videos=4, num_val_videos=2),
                               tokenizer=TokenizerSpec("evatok", "debug", dict(TOK_PARAMS)), out_dir=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="data.frames=10 but the tokenizer's blocks"):
        run(cfg)
    assert not (tmp_path / "t" / "checkpoints").exists()
    # a video of the wrong length handed to encode: a clear error, not a reshape failure in a kernel
    tok = _tok(0)
    with pytest.raises(ValueError, match="video has 5 frames; expected 8"):
        tok.encode(torch.zeros(1, 3, 5, 16, 16))
    with pytest.raises(ValueError, match="expects 3 channels and 16x16 frames"):
        tok.encode(torch.zeros(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match=r"token counts .* not candidates"):
        tok.encode(torch.zeros(1, 3, 8, 16, 16), torch.tensor([[4, 4, 4, 5]]))


def test_sampler_constraints_beyond_the_layout_are_refused(env):
    from arvid.generator import GPT, Conditioning
    from arvid.generator.sequence import SequenceFormat
    from arvid.sampling.sampler import Sampler, SamplerConfig

    gpt = GPT.from_pretrained(env / "gen" / "gpt").eval()
    layout = BlockLayout((2, 2, 2, 2), (1, 4, 16))
    fmt = SequenceFormat(256, layout)
    s = Sampler(gpt, fmt, SamplerConfig())
    cond = Conditioning(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"allowed_counts: 32 \(block 0\) is not a candidate count"):
        s.generate(cond, allowed_counts=[[32], [4], [4], [4]])
    with pytest.raises(ValueError, match="not candidates"):
        s.generate(cond, fixed_assignment=[64, 4, 4, 4])
    with pytest.raises(ValueError, match="budget must be positive"):
        s.generate(cond, budget=0)
    with pytest.raises(ValueError, match="prefix of 5 blocks is longer"):
        s.generate(cond, prefix=TokenizedVideo(torch.zeros(10, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)))
    # a budget below the cheapest sequence (4 blocks x 1 token) still gives well-formed, minimal samples
    out = s.generate(cond, budget=1, generator=torch.Generator().manual_seed(0))
    assert out.tokens.block_lengths.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_short_broken_context_videos(tmp_path):
    """Frame prediction: a context video with fewer frames than the context repeats its last frame
    (documented); an empty / undecodable / missing one is an error naming the file."""
    import av

    from arvid.sampling.frame_prediction import context_blocks_for, pad_frames
    from arvid.stages.sample import read_context

    p = tmp_path / "two.mp4"
    with av.open(str(p), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "0"}
        for v in (50, 200):
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), v, np.uint8), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    ctx = read_context(p, frames=5, size=16)
    assert ctx.shape == (1, 3, 5, 16, 16)
    assert torch.equal(ctx[:, :, 2:], ctx[:, :, 1:2].expand(-1, -1, 3, -1, -1)) and not torch.equal(ctx[:, :, 0], ctx[:, :, 1])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"\x00garbage" * 100)
    for name in ("empty.mp4", "junk.mp4"):
        with pytest.raises(ValueError, match=name):
            read_context(tmp_path / name, frames=5, size=16)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_context(tmp_path / "nope.mp4", frames=5, size=16)
    layout = BlockLayout((2, 2, 2, 2), (1, 4, 16))
    assert context_blocks_for(layout, 5) == 3
    assert context_blocks_for(layout, 6) == 3
    for bad in (0, 7, 8, 9):  # 7 frames would take all 4 blocks: nothing left to generate
        with pytest.raises(ValueError, match=r"context frames must lie in \[1, 6\]"):
            context_blocks_for(layout, bad)
    with pytest.raises(ValueError, match="needs two temporal blocks or more"):
        context_blocks_for(BlockLayout((8,), (4, 16)), 1)  # one block: no frame prediction
    with pytest.raises(ValueError, match="no frames"):
        pad_frames(torch.zeros(1, 3, 0, 16, 16), 8)


# --------------------------------------------------------------------------- property tests


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), B=st.integers(1, 4), V=st.integers(1, 40),
       temperature=st.sampled_from([0.0, 1e-39, 1e-4, 0.3, 1.0, 7.0]), top_k=st.integers(0, 50),
       top_p=st.floats(1e-3, 1.0), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
def test_sample_from_logits_never_picks_a_forbidden_token(data, B, V, temperature, top_k, top_p, scale):
    from arvid.sampling.sampler import sample_from_logits

    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale
    forbid = torch.rand(B, V, generator=g) < data.draw(st.floats(0.0, 0.95))
    forbid[torch.arange(B), torch.randint(V, (B,), generator=g)] = False  # at least one allowed token per row
    if data.draw(st.booleans()):  # NaN logits (a model overflow) among the allowed tokens
        logits = logits.masked_fill(torch.rand(B, V, generator=g) < 0.3, float("nan"))
    logits = logits.masked_fill(forbid, float("-inf"))
    u = data.draw(st.sampled_from([torch.rand(B, generator=g), torch.zeros(B), torch.full((B,), 1 - 1e-7)]))
    idx = sample_from_logits(logits, u, temperature=temperature, top_k=top_k, top_p=top_p)
    assert idx.shape == (B,) and idx.dtype == torch.long
    assert ((idx >= 0) & (idx < V)).all()
    assert not forbid.gather(1, idx[:, None]).any(), "a forbidden (-inf) token was drawn"
    if 0 < top_k < V:
        # within the top k (ties at the k-th value included; NaN ranks below every number)
        ranked = torch.nan_to_num(logits, nan=-1e30, posinf=1e30, neginf=float("-inf"))
        kth = ranked.topk(top_k, -1).values[:, -1]
        assert (ranked.gather(1, idx[:, None]).squeeze(1) >= kth).all()
    if temperature == 0 and not logits.isnan().any():
        assert torch.equal(idx, logits.argmax(-1))


@pytest.fixture(scope="module")
def gpt_and_fmt(env):
    from arvid.generator import GPT
    from arvid.generator.sequence import SequenceFormat

    gpt = GPT.from_pretrained(env / "gen" / "gpt").eval()
    torch.manual_seed(0)
    with torch.no_grad():  # the trained head is almost zero after one step: make the logits varied
        gpt.head.weight.normal_(0, 0.5)
    return gpt, SequenceFormat(256, BlockLayout((2, 2, 2, 2), (1, 4, 16)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]), top_k=st.integers(0, 300), top_p=st.floats(0.01, 1.0),
       cfg_scale=st.sampled_from([0.0, 1.0, 2.5]), beta=st.floats(-5, 5), seed=st.integers(0, 1000),
       classes=st.lists(st.integers(0, 3), min_size=1, max_size=3), budget=st.one_of(st.none(), st.integers(1, 70)),
       use_cache=st.booleans())
def test_sampler_always_returns_well_formed_sequences(gpt_and_fmt, temperature, top_k, top_p, cfg_scale, beta, seed,
                                                      classes, budget, use_cache):
    from arvid.generator import Conditioning
    from arvid.sampling.sampler import Sampler, SamplerConfig

    gpt, fmt = gpt_and_fmt
    cfg = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, budget_bias=beta,
                        use_cache=use_cache)
    out = Sampler(gpt, fmt, cfg).generate(Conditioning(torch.tensor(classes)), budget=budget,
                                         generator=torch.Generator().manual_seed(seed))
    B = len(classes)
    assert out.lengths.shape == (B,) and int(out.lengths.sum()) == out.sequences.numel()
    for s in out.unpacked():
        assert fmt.is_well_formed(s), s.tolist()
    bl = out.tokens.block_lengths
    assert bl.shape == (B, 4) and set(bl.unique().tolist()) <= {1, 4, 16}
    assert int(bl.sum()) == out.tokens.codes.numel()
    assert ((out.tokens.codes >= 0) & (out.tokens.codes < 256)).all()
    if budget is not None:
        assert (bl.sum(1) <= max(budget, 4)).all()


def test_frame_prediction_context_gets_the_routers_counts(env, tmp_path):
    """Frame prediction encodes each clip's context with the router's counts (the counts the
    generator's training clips had), not the tokenizer's default assignment; a router of another
    layout is refused by name."""
    from arvid.sampling.frame_prediction import encode_context, pad_frames
    from arvid.stages import evaluate
    from arvid.tokenizer.base import load_tokenizer
    from arvid.tokenizer.router import Router

    tok = load_tokenizer(env / "A").eval()
    torch.manual_seed(3)
    router = Router.from_preset("debug", tok.layout, image_size=16)
    router.save_pretrained(tmp_path / "router")
    ctx = torch.rand(6, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    default = encode_context(tok, ctx, 2).block_lengths
    assert torch.equal(default, tok.default_assignment(6, 2))
    evaluate._attach_router(tok, str(tmp_path / "router"), torch.device("cpu"))
    chosen = encode_context(tok, ctx, 2).block_lengths
    want = Router.from_pretrained(tmp_path / "router").eval().choose(pad_frames(ctx, tok.layout.num_frames))[:, :2]
    assert torch.equal(chosen, want)
    assert not torch.equal(chosen, default)
    other = Router.from_preset("debug", BlockLayout((2, 2, 2, 2), (1, 4)), image_size=16)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="router .*other.* was trained for layout"):
        evaluate._attach_router(load_tokenizer(env / "A"), str(tmp_path / "other"), torch.device("cpu"))


def test_bad_devices_empty_class_lists_self_including_configs_and_non_torchscript_files(tmp_path):
    """Each gave a traceback from deep inside a stage (CLI review, 2026-12-07); now a one-line error
    naming the value."""
    from arvid.config import load_config
    from arvid.eval.i3d import TorchScriptI3D
    from arvid.eval.weights import WeightsError
    from arvid.stages.sample import SampleConfig
    from arvid.training.device import parse_device

    with pytest.raises(ConfigError, match="device 'bogus' is not a device"):
        parse_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda': this torch has no CUDA"):
            parse_device("cuda")
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="classes is an empty list"):
        SampleConfig(classes=[])
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself through `_base_`"):
        load_config(SampleConfig, tmp_path / "a.yaml")
    (tmp_path / "bad.pt").write_bytes(b"not an archive")
    with pytest.raises(WeightsError, match="is not a TorchScript archive"):
        TorchScriptI3D(str(tmp_path / "bad.pt")).load()


def test_zero_sizes_and_counts_are_refused_before_anything_is_written(tmp_path):
    """--fps 0 wrote synth.json before failing (a corrected rerun was then refused); num_videos=0
    wrote an empty token store; a set against itself had an FVD of -3.6e-4 (CLI review, 2026-12-07)."""
    from arvid.eval.fvd import frechet_distance
    from arvid.stages.data_cmd import synth
    from arvid.stages.tokenize import TokenizeConfig

    with pytest.raises(ValueError, match="--fps must be >= 1, got 0"):
        synth(tmp_path / "s", num=2, frames=4, size=16, fps=0)
    assert not (tmp_path / "s" / "synth.json").exists()
    with pytest.raises(ValueError, match="size must be >= 4"):  # the dataset's own check, before the folder is made
        synth(tmp_path / "s3", num=2, frames=4, size=3)
    assert not (tmp_path / "s3").exists()
    assert synth(tmp_path / "s", num=2, frames=4, size=16, fps=8)["written"] == 2
    with pytest.raises(ValueError, match="num_videos must be >= 1"):
        TokenizeConfig(num_videos=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g, dtype=torch.float64)
    mu, s = x.mean(0), torch.cov(x.T)
    assert frechet_distance(mu, s, mu, s) >= 0.0


def test_damaged_files_are_named_not_tracebacks(env, tmp_path):
    """Found in a bad-input review (2026-12-07): each of these gave a raw traceback or a message that
    named no file. A damaged model config, token store, checkpoint file or config include is now an
    error naming the file and what was expected."""
    import json
    import shutil

    from arvid.data.token_store import TokenStore
    from arvid.generator.gpt import GPT
    from arvid.io import torch_load_safe
    from arvid.tokenizer.base import load_tokenizer

    # a model directory whose config.yaml is not YAML
    for name, loader in (("A", load_tokenizer), ("gen/gpt", GPT.from_pretrained)):
        d = tmp_path / name.replace("/", "_")
        shutil.copytree(env / name, d)
        (d / "config.yaml").write_text("kind: {{{\n")
        with pytest.raises(ConfigError, match=re.escape(str(d / "config.yaml")) + ".*not valid YAML"):
            loader(d)
        (d / "config.yaml").write_bytes(b"\xf0\x28\x8c\x28")
        with pytest.raises(ConfigError, match="not UTF-8"):
            loader(d)
    # a token store: damaged meta.json, damaged index, a count that disagrees with the index
    for damage, said in ((lambda d: (d / "meta.json").write_text("{bad"), "meta.json.*not valid JSON"),
                         (lambda d: (d / "index.npz").write_bytes(b"garbage"), "index.npz.*not a readable token store index"),
                         (lambda d: (d / "meta.json").write_text(json.dumps(
                             {**json.loads((d / "meta.json").read_text()), "count": 5000})), "says 5000 videos but")):
        d = tmp_path / "store"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(env / "store", d)
        damage(d)
        with pytest.raises(TokenStoreError, match=said):
            len(TokenStore(d))
    # a truncated torch file (a checkpoint's optimizer.pt)
    torch.save({"a": torch.ones(3)}, tmp_path / "opt.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "opt.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.pt' \(100 bytes\) is not a readable torch file"):
        torch_load_safe(tmp_path / "cut.pt")
    # configs: a missing _base_ names the including file; a key given twice is refused
    from arvid.config import read_yaml

    (tmp_path / "top.yaml").write_text("_base_: nonexist.yaml\na: 1\n")
    with pytest.raises(ConfigError, match=r"top\.yaml'.*its `_base_` file .*nonexist\.yaml' does not exist"):
        read_yaml(tmp_path / "top.yaml")
    (tmp_path / "twice.yaml").write_text("trainer: {lr: 1.0}\nseed: 1\ntrainer: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match="key 'trainer' is given twice"):
        read_yaml(tmp_path / "twice.yaml")


@pytest.mark.parametrize("field,value,said", [("n_heads", 0, "n_heads must be >= 1"), ("n_heads", -4, "n_heads must be >= 1"),
                                              ("dim", -4, "dim must be >= 1"), ("n_layers", 0, "n_layers must be >= 1"),
                                              ("mlp_ratio", 0.0, "SwiGLU needs a hidden size"),
                                              ("rope_theta", 0.0, "rope_theta"), ("n_kv_heads", 0, "n_kv_heads")])
def test_degenerate_gpt_shapes_are_refused(field, value, said):
    """n_heads 0 divided by zero, a negative one failed inside a layer, n_layers 0 and mlp_ratio 0
    trained a model without blocks or a feed-forward, rope_theta 0 gave a NaN loss at step 0."""
    from arvid.generator.gpt import GPTConfig

    with pytest.raises(ValueError, match=said):
        GPTConfig(vocab_size=32, max_seq_len=16, **{field: value})


def test_train_spm_names_its_input_when_sentencepiece_refuses(tmp_path):
    pytest.importorskip("sentencepiece")
    from arvid.generator.text import train_spm

    caps = tmp_path / "caps.txt"
    caps.write_text("Apply Eye Makeup\nBand Marching\nzebra quick fox jumps\n")
    with pytest.raises(ValueError, match=r"could not train on .*caps\.txt' with vocab_size 8.*smaller than required_chars"):
        train_spm(caps, tmp_path / "spm", vocab_size=8)
    assert not (tmp_path / "spm").exists()
    (tmp_path / "bin.txt").write_bytes(b"\xf0\x28\x8c\x28 not text\n")
    with pytest.raises(ValueError, match=r"bin\.txt' is not UTF-8 text"):
        train_spm(tmp_path / "bin.txt", tmp_path / "spm", vocab_size=64)


def test_stage_counts_and_weights_are_refused_when_the_config_is_made():
    """Found in a bad-input review (2026-12-07): eval gen with 1 clip failed after sampling (FVD needs
    2 a side; in the pipeline, after moving the older report aside), workers=-1 gave torch's message,
    train-router eval_batch_size=0 failed after training, negative curation weights were accepted."""
    from arvid.stages.curate import CurateConfig
    from arvid.stages.evaluate import FPEvalConfig, GenEvalConfig, ReconEvalConfig
    from arvid.stages.report import ReportConfig
    from arvid.stages.train_router import TrainRouterConfig

    cases = [(GenEvalConfig, dict(num_videos=1), "an FVD needs at least 2 clips"),
             (ReportConfig, dict(num_videos=1), "an FVD needs at least 2 clips"),
             (ReconEvalConfig, dict(num_videos=0, protocol=None), "num_videos must be >= 1"),
             (GenEvalConfig, dict(workers=-1), "workers .* must be >= 0"),
             (FPEvalConfig, dict(batch_size=0), "batch_size must be >= 1"),
             (CurateConfig, dict(w_q=-1.0), "w_q and w_l must be >= 0"),
             (CurateConfig, dict(w_q=0.0, w_l=0.0), "not both 0"),
             (TrainRouterConfig, dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
             (TrainRouterConfig, dict(w_l=-0.5), "w_l must be >= 0"),
             (ReconEvalConfig, dict(uniform=[4], fvd_uniform=[8]), r"fvd_uniform \[8\] are not among")]
    for cls, kw, said in cases:
        with pytest.raises(ValueError, match=said):
            cls(**kw)
    ReportConfig(num_videos=1, fvd=False)  # no FVD: one clip is enough
    ReconEvalConfig(num_videos=1, protocol=None)


def test_a_file_or_folder_in_the_wrong_place_is_named_as_such(env, tmp_path):
    """Found in a bad-input review (2026-12-07): a file where a folder is expected said "not writable:
    File exists", a folder where a file is expected said "does not exist", a GPT's directory given
    as the tokenizer said "unknown tokenizer 'gpt'"."""
    from arvid.generator.text import train_spm
    from arvid.io import ArvidIOError, check_writable
    from arvid.stages.eval_fvd import open_videos
    from arvid.stages.sample import read_context
    from arvid.tokenizer.base import load_tokenizer

    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ArvidIOError, match=r"afile' is a file, not a folder"):
            check_writable(out)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        train_spm(tmp_path, tmp_path / "spm", vocab_size=64)
    with pytest.raises(IsADirectoryError, match="is a folder: give one video file"):
        read_context(tmp_path, 8, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_videos(str(tmp_path / "nonexist"), None, 0)
    with pytest.raises(ConfigError, match="holds a gpt, not a tokenizer"):
        load_tokenizer(env / "gen" / "gpt")


def test_eval_gen_refuses_real_clips_of_another_shape_than_the_samples(env):
    """Found in a bad-input review (2026-12-07): 64 px real clips against 32 px samples gave a gFVD
    recorded as conforming to its protocol."""
    from arvid.data.datasets import DataConfig
    from arvid.stages import evaluate

    for data, said in ((DataConfig(source="synthetic", frames=8, size=32, num_videos=2, num_val_videos=2),
                        r"data.size 32 \(the tokenizer's frames are 16x16\)"),
                       (DataConfig(source="synthetic", frames=4, size=16, num_videos=2, num_val_videos=2),
                        r"data.frames 4 \(the tokenizer's videos have 8\)")):
        with pytest.raises(ConfigError, match=said):
            evaluate.evaluate_gen(evaluate.GenEvalConfig(data=data, num_videos=2, generator=str(env / "gen" / "gpt"),
                                                         tokenizer=str(env / "A"), device="cpu"))
