"""Training checkpoints: atomic writes, weights-only reads, RNG state that survives both."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .faults import fault_point

LAST = "last.pth"
BEST = "best.pth"
#: Name prefix of the temporary files of :func:`save_atomic`.
TMP_PREFIX = ".tmp-"
_saves = 0  # checkpoint writes of this process, for the ``save:N`` fault hook


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission); the previous one is intact."""


class CheckpointReadError(ValueError):
    """A checkpoint file is damaged, or unsafe: it would execute code when unpickled."""


def save_atomic(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one.

    The data go to a temporary file in the same directory, are flushed and fsynced,
    and the temporary file is renamed over ``path`` (atomic on POSIX). A crash or a
    full disk leaves the previous checkpoint intact.
    """
    global _saves
    _saves += 1
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(handle, "wb") as tmp:
            recorder = _WriteErrorRecorder(tmp)
            try:
                torch.save(obj, recorder)
            except RuntimeError as error:
                # torch's zip writer turns a failed write (full disk, size limit) into a RuntimeError
                # with an opaque message; the OSError it came from says what happened.
                if recorder.error is not None:
                    raise recorder.error from error
                raise
            tmp.flush()
            os.fsync(tmp.fileno())
        fault_point("save", _saves)
        os.replace(tmp_name, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except BaseException as error:
        if tmp_name is not None:
            with contextlib.suppress(OSError):  # the directory may have become unwritable too
                os.unlink(tmp_name)
        if isinstance(error, OSError):
            raise CheckpointWriteError(
                f"cannot write checkpoint {str(path)!r} ({error.strerror or error}); a previous checkpoint "
                "there is intact: free disk space or fix the permissions of the output directory, then re-run "
                "the same command to resume from it",
            ) from error
        raise


class _WriteErrorRecorder:
    """A binary file wrapper for ``torch.save`` that remembers the OSError of a failed write."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        """Write ``data``; an OSError is recorded and raised."""
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        """Flush the underlying file."""
        self.file.flush()


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that a killed :func:`save_atomic` left in ``directory``; return them.

    Call it only when no other process writes checkpoints into ``directory``.
    """
    stale = sorted(Path(directory).glob(f"{TMP_PREFIX}*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises many types; all mean "unsafe or broken file"
        raise CheckpointReadError(
            f"{str(path)!r} cannot be read as a weights-only checkpoint ({error.__class__.__name__}: {error}); "
            "it is damaged or would need to execute code to load, so it was not loaded; use a checkpoint "
            "written by this code (tensors and plain values only)"
        ) from error


def rng_state() -> dict[str, Any]:
    """Every RNG this process uses, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]
