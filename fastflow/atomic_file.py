"""Atomic file writes: the previous file survives a crash, a full disk or a failed write."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import Iterator

__all__ = ["atomic_file"]


def _host() -> str:
    """This machine's name, as it goes into temporary file names (letters, digits and ``_`` only)."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _remove_orphans(folder: str, name: str) -> None:
    """Remove the temporary files of ``name`` left in ``folder`` by writers that were killed (SIGKILL skips the
    cleanup; a preempted job's run folder grew by a full checkpoint each time): those whose process id (in their
    name, with the host's) no longer runs on this machine; a shared folder's files from other hosts are kept, and
    so is a file another user's live process writes. POSIX only (there ``os.kill(pid, 0)`` only asks)."""
    if os.name != "posix":
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.{re.escape(_host())}-(\d+)-[0-9a-f]{{12}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            found = pattern.fullmatch(entry)  # this host's writers only: another's pids mean nothing here
            if found is None or int(found.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(found.group(1)), 0)
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, entry))
            except (OSError, OverflowError, ValueError):  # alive under another user, or no such pid here
                continue


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a new empty temporary file next to ``path`` (mode 0666 less the umask, like any other output; named
    with this host and process id, so that a later write removes it if the process was killed before cleaning up);
    after the body writes it, flush it to disk and rename it over ``path``, so the previous file survives a
    crash or a full disk. On failure the temporary file is removed and an ``OSError`` names ``path``. A body that
    recreates the file with another mode (safetensors' ``save_file`` makes it 0600) gets the mode put back."""
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{_host()}-{os.getpid()}-{secrets.token_hex(6)}.tmp")
    binary = getattr(os, "O_BINARY", 0)
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_orphans(folder, os.path.basename(target))
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
