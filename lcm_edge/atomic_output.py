"""Outputs that appear whole or not at all, and the leftovers of writers that were killed.

A writer (the exporter's bundle folder, a saved clip) works in a hidden sibling of its target,
`.NAME.partial-TOKEN[SUFFIX]`, in the same folder so that the final `os.replace` is atomic, and holds an
exclusive lock on `.NAME.partial-TOKEN.lock` while it works. A process that dies, even by SIGKILL, loses its
lock, so the next writer to the same target tells a dead writer's leftovers from a live writer's work and
removes only the leftovers (`recover`). Replacing a folder moves the previous one aside as `.NAME.old-TOKEN`
first; if the writer dies before the new folder is in place, `recover` puts the previous one back.

Where fcntl is missing (Windows) no lock can be tested, so `recover` removes nothing there: leftovers stay
hidden under their temporary names, never under the target's.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_TOKEN_HEX = 12
_NAME = re.compile(rf"^\.(?P<target>.+)\.(?P<kind>partial|old)-(?P<token>[0-9a-f]{{{_TOKEN_HEX}}})(?P<rest>.*)$")
LOCK_SUFFIX = ".lock"
_CLAIM_TRIES = 8


def is_partial_name(name: str) -> bool:
    """True for the name of a writer's temporary sibling (never a finished output)."""
    match = _NAME.match(name)
    return match is not None and match["kind"] == "partial"


def _lock_path(target: Path, token: str) -> Path:
    return target.parent / f".{target.name}.partial-{token}{LOCK_SUFFIX}"


def _lock(fd: int) -> bool:
    """Take the exclusive lock without waiting; False when another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _still_at(fd: int, path: Path) -> bool:
    # A cleaner may have unlinked the lock file between our open and our flock.
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Partial:
    """A claimed temporary sibling of `target` (`path`, not created: the writer makes a file or folder there).

    `publish()` moves it onto the target; `close()` removes whatever is left and releases the claim.
    """

    def __init__(self, target: str | os.PathLike, suffix: str = ""):
        self.target = Path(target)
        for _ in range(_CLAIM_TRIES):
            token = uuid.uuid4().hex[:_TOKEN_HEX]
            lock = _lock_path(self.target, token)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            if fcntl is None or (_lock(fd) and _still_at(fd, lock)):
                break
            os.close(fd)
        else:
            raise OSError(errno.EAGAIN, f"could not claim a temporary name beside {self.target}")
        self._fd: int | None = fd
        self.token = token
        self.lock = lock
        self.path = self.target.parent / f".{self.target.name}.partial-{token}{suffix}"
        self.old = self.target.parent / f".{self.target.name}.old-{token}"

    def publish(self) -> Path:
        """Put `path` in the target's place. A folder already there is replaced only once the new one is in."""
        if self.path.is_dir() and self.target.exists():
            os.replace(self.target, self.old)
            try:
                os.replace(self.path, self.target)
            except OSError:
                os.replace(self.old, self.target)
                raise
            shutil.rmtree(self.old)
        else:
            os.replace(self.path, self.target)
        return self.target

    def close(self) -> None:
        if self._fd is None:
            return
        for path in (self.path, self.old):
            if path.exists() or path.is_symlink():
                _remove(path)
        self.lock.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "Partial":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def recover(target: str | os.PathLike) -> list[Path]:
    """Clean up after writers to `target` that died: remove their temporary siblings, and put back a previous
    folder that a dead writer had moved aside (when nothing took its place). Returns the paths handled.

    Only names of the form `.NAME.partial-TOKEN...` / `.NAME.old-TOKEN` for this target are looked at, and only
    those whose writer's lock can be taken (the writer is gone): a live writer's files are never touched."""
    target = Path(target)
    if fcntl is None or not target.parent.is_dir():
        return []
    tokens: dict[str, list[tuple[str, Path]]] = {}
    for entry in target.parent.iterdir():
        match = _NAME.match(entry.name)
        if match is None or match["target"] != target.name:
            continue
        if match["rest"] == LOCK_SUFFIX and match["kind"] == "partial":
            tokens.setdefault(match["token"], [])
        else:
            tokens.setdefault(match["token"], []).append((match["kind"], entry))
    handled = []
    for token, entries in sorted(tokens.items()):
        lock = _lock_path(target, token)
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            # Every writer creates its lock before its files and removes it after them: files without a lock
            # belong to nobody.
            fd = None
        try:
            if fd is not None and not (_lock(fd) and _still_at(fd, lock)):
                continue  # a live writer
            for kind, entry in sorted(entries, key=lambda e: e[0] != "old"):
                if kind == "old" and entry.is_dir() and not target.exists():
                    os.replace(entry, target)
                else:
                    _remove(entry)
                handled.append(entry)
            lock.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    return handled
