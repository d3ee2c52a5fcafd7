"""Atomic file writes: the previous file survives a crash, a full disk or a failed write."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

__all__ = ["atomic_file"]


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a new empty temporary file next to ``path`` (mode 0666 less the umask, like any other output);
    after the body writes it, flush it to disk and rename it over ``path``, so the previous file survives a
    crash or a full disk. On failure the temporary file is removed and an ``OSError`` names ``path``. A body that
    recreates the file with another mode (safetensors' ``save_file`` makes it 0600) gets the mode put back."""
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    binary = getattr(os, "O_BINARY", 0)
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | binary, 0o666))
        try:
            mode = os.stat(tmp).st_mode & 0o777
            yield tmp
            if os.stat(tmp).st_mode & 0o777 != mode:
                os.chmod(tmp, mode)
            fd = os.open(tmp, os.O_RDWR | binary)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        if err.errno is None:
            raise OSError(f"cannot write {os.fspath(path)!r}: {err}") from err
        raise OSError(err.errno, f"cannot write {os.fspath(path)!r}: {err.strerror or err}") from err
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
