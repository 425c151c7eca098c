"""Weights load only from safetensors or through restricted unpicklers; nothing downloads.

A source grep over the package, and a crafted pickle (one that would run ``os.system``) handed
to every loader that accepts a user file: each refuses it and the command never runs.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

PKG = Path(__file__).resolve().parents[1] / "arvid"


def _sources() -> list[tuple[Path, list[str]]]:
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 30, "the package source was not found"
    return [(f, f.read_text().splitlines()) for f in files]


def _calls(lines: list[str], pattern: str) -> list[tuple[int, str]]:
    """(line number, the call's text up to its closing parenthesis) for each match outside comments."""
    out = []
    for i, line in enumerate(lines):
        code = line.split("#", 1)[0]
        if re.search(pattern, code):
            text, depth, j = "", 0, i
            # gather the whole call (it may span lines) to see its keyword arguments
            while j < len(lines):
                text += lines[j].split("#", 1)[0] + " "
                depth = text.count("(") - text.count(")")
                if depth <= 0:
                    break
                j += 1
            out.append((i + 1, text))
    return out


def test_no_torch_load_without_weights_only():
    bad = []
    for f, lines in _sources():
        for n, call in _calls(lines, r"\btorch\.load\("):
            if not re.search(r"weights_only\s*=\s*True", call):
                bad.append(f"{f.relative_to(PKG.parent)}:{n}: {call.strip()[:120]}")
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)


def test_no_pickle_load_outside_the_restricted_unpickler():
    bad = []
    for f, lines in _sources():
        for n, call in _calls(lines, r"\b(pickle|cPickle|dill|joblib)\.(load|loads|Unpickler)\b|allow_pickle\s*=\s*True"):
            if f.name == "io.py" and f.parent == PKG and "Unpickler" in call:
                continue  # arvid/io.py: class RestrictedUnpickler(pickle.Unpickler)
            bad.append(f"{f.relative_to(PKG.parent)}:{n}: {call.strip()[:120]}")
    assert not bad, "unrestricted unpickling:\n" + "\n".join(bad)


def test_no_network_downloads_in_the_package():
    pattern = (r"hf_hub_download|snapshot_download|urlretrieve|urlopen|requests\.(get|post)|torch\.hub\.load|"
               r"load_state_dict_from_url|download\s*=\s*True|from_pretrained\(\s*[\"'][\w-]+/")
    bad = [f"{f.relative_to(PKG.parent)}:{n}: {line.strip()[:120]}"
           for f, lines in _sources() for n, line in enumerate(lines, 1)
           if re.search(pattern, line.split("#", 1)[0])]
    assert not bad, "network access at run time:\n" + "\n".join(bad)


def test_the_grep_catches_what_it_should(tmp_path):
    """The greps above are not vacuous: they flag the patterns in a planted file."""
    lines = ["x = torch.load(path,", "    map_location='cpu')", "y = torch.load(p, weights_only=True)",
             "z = pickle.loads(b)"]
    assert [n for n, c in _calls(lines, r"\btorch\.load\(") if "weights_only=True" not in c.replace(" ", "")] == [1]
    assert _calls(lines, r"\bpickle\.(load|loads)\b")[0][0] == 4


# --------------------------------------------------------------------------- crafted pickles


class _Evil:
    """Unpickling this runs ``os.system('touch <marker>')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def evil(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weights": _Evil(marker)}, protocol=2)
    (tmp_path / "evil.pkl").write_bytes(payload)
    torch.save({"state": _Evil(marker)}, tmp_path / "evil.pt")  # a torch zip whose data.pkl calls os.system
    # sanity: the payload really runs code through a plain unpickler
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    return tmp_path, marker


def test_restricted_load_refuses_code(evil):
    from arvid.io import restricted_load

    d, marker = evil
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refusing"):
        restricted_load(d / "evil.pkl")
    with pytest.raises(pickle.UnpicklingError):
        restricted_load((d / "evil.pkl").read_bytes())
    assert not marker.exists()
    # plain numpy/container pickles still load (the i3d/lpips weight files are such)
    import numpy as np

    ok = restricted_load(pickle.dumps({"a": np.arange(3.0), "b": [1, (2, 3)]}))
    assert ok["a"].tolist() == [0.0, 1.0, 2.0] and ok["b"] == [1, (2, 3)]


def test_torch_load_safe_and_checkpoint_loaders_refuse_code(evil):
    from arvid.io import torch_load_safe
    from arvid.training.checkpoint import load_optimizer_states, load_rng_states

    d, marker = evil
    with pytest.raises(pickle.UnpicklingError):
        torch_load_safe(d / "evil.pt")
    # a checkpoint whose optimizer / rng files were replaced by the crafted one
    ckpt = d / "step_00000001"
    ckpt.mkdir()
    for name in ("optimizer.pt", "rng.pt"):
        (ckpt / name).write_bytes((d / "evil.pt").read_bytes())
    with pytest.raises(pickle.UnpicklingError):
        load_optimizer_states(ckpt)
    with pytest.raises(pickle.UnpicklingError):
        load_rng_states(ckpt)
    assert not marker.exists()


def test_safetensors_loaders_refuse_a_pickle(evil):
    """A pickle renamed to model.safetensors is not read as a pickle: a clear error, no code."""
    from arvid.io import ArvidIOError, load_weights
    from arvid.tokenizer.base import build_tokenizer, load_tokenizer

    d, marker = evil
    with pytest.raises(ArvidIOError, match="not a readable safetensors"):
        load_weights(d / "evil.pt")
    tok = build_tokenizer("evatok", preset="debug")
    tok.save_pretrained(d / "tok")
    (d / "tok" / "model.safetensors").write_bytes((d / "evil.pt").read_bytes())
    with pytest.raises(ArvidIOError, match="model.safetensors"):
        load_tokenizer(d / "tok")
    assert not marker.exists()


def test_eval_weight_loaders_refuse_a_crafted_file(evil, tmp_path, monkeypatch):
    from arvid.eval import weights as W

    d, marker = evil
    monkeypatch.setenv("ARVID_CACHE_DIR", str(tmp_path / "cache"))
    for spec in (W.I3D_K400, W.LPIPS_ALEX, W.LPIPS_VGG):
        # the file hash check refuses it before it is ever unpickled
        with pytest.raises(W.WeightsError, match="sha256"):
            W.load_spec(spec, path=d / "evil.pkl")
        # and were the recorded hash the crafted file's, the restricted unpickler still refuses it
        forged = dataclasses.replace(spec, source_sha256=W.sha256_file(d / "evil.pkl"))
        with pytest.raises(pickle.UnpicklingError):
            W.load_spec(forged, path=d / "evil.pkl", use_cache=False)
    # a torch zip in ARVID_WEIGHTS_DIR under the expected name: refused the same way
    wdir = tmp_path / "wdir"
    wdir.mkdir()
    (wdir / W.LPIPS_ALEX.filename).write_bytes((d / "evil.pt").read_bytes())
    monkeypatch.setenv("ARVID_WEIGHTS_DIR", str(wdir))
    with pytest.raises(W.WeightsError, match="sha256"):
        W.load_spec(W.LPIPS_ALEX)
    assert not marker.exists()
    # nothing was converted and cached from a refused file
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
