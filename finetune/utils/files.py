"""Files that are never half-written: atomic writes and copies, and torch files loaded with ``weights_only=True``."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from finetune.errors import FinetuneError, describe


def _umask() -> int:
    """The process umask, read without changing it (Linux reports it in /proc); else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, fsync, then ``os.replace``.

    A process killed at any moment leaves either the old file or the new one, never half of one. A failed write
    (a full disk) raises ``OSError`` naming ``path``, however the writer reported it: ``torch.save`` turns the
    ``OSError`` into a ``RuntimeError`` ("unexpected pos ...").
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _failed_write(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; run files are ordinary files
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(exc)
        if cause is None:
            raise
        raise _failed_write(cause, path) from exc


def _os_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The ``OSError`` behind ``exc`` (itself, or what it was raised from or while handling), if any."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _failed_write(exc: OSError, path: Path) -> OSError:
    """``exc`` as an ``OSError`` about ``path``; a full disk says how much room is left on it."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            reason += f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there)"
        except OSError:
            pass
    return OSError(exc.errno, reason, str(path))


@contextmanager
def writing(what: str, fix: str):
    """An ``OSError`` inside (an unwritable folder, a full disk) as a FinetuneError: ``Cannot write {what}``, the
    file and the reason, then ``fix``."""
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise FinetuneError(f"Cannot write {what}{where}: {exc.strerror or describe(exc)}. {fix}") from None


def atomic_copy(source: Path, path: Path) -> None:
    """Make ``path`` a copy of ``source``, atomically: a hard link where the file system has them (no bytes
    written; ``source`` is only ever replaced, never changed in place, so the two stay independent), else an
    :func:`atomic_write` of its bytes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        with open(source, "rb") as f:
            atomic_write(path, lambda out: shutil.copyfileobj(f, out))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


UNSAFE_MARK = "GLOBAL"  # torch.load(weights_only=True) names the blocked global a code-running pickle imports


def unsafe_file_error(path: Path, what: str, exc: Exception) -> FinetuneError:
    reason = next((line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
    # what the file imports, without torch's advice to allowlist it: the point is not to trust this file
    reason = reason.strip().removeprefix("WeightsUnpickler error:").split(" Please use", 1)[0].strip()
    return FinetuneError(f"Refused to load {what} {path}: it holds objects other than tensors and plain data, "
                         f"which could run code when loaded. Only plain state dicts are accepted. {reason}".strip())


def safe_load(path: Path, what: str) -> Any:
    """``torch.load`` with ``weights_only=True``: a file that would run code when unpickled is refused.

    ``what`` names the file in messages ("weights file", "checkpoint").
    """
    import torch  # here, not at the top: commands that only read run files (finetune runs) need no torch

    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"{what.capitalize()} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if UNSAFE_MARK in str(exc):
            raise unsafe_file_error(path, what, exc) from None
        raise FinetuneError(f"Could not read {what} {path}: it is corrupt or not a file saved with torch.save "
                            f"({str(exc).splitlines()[0]}).") from None
    except Exception as exc:
        raise FinetuneError(f"Could not read {what} {path}: {type(exc).__name__}: {exc}\n"
                            "Is it a file saved with torch.save? It may be corrupt or truncated.") from None
