"""A folder of complete snapshots, one of them current: what a reader loads is never half-written.

Each save writes a new version folder beside the current one, then switches a pointer file to
it with one atomic rename, so a reader in any process (a restart, a second API replica, a
``stac-rscbir serve`` after a crash) finds at every instant either the previous complete
version or the new one, never a missing or torn set::

    <folder>/CURRENT            the name of the current version ("v-<hex>\\n")
    <folder>/v-<hex>/...        complete versions: the current one and the one before it
    <folder>/.tmp-<host>-<pid>-<hex>/   a version being written (invisible to readers)
    <folder>/.lock              flock: pointer switches and pruning, one process at a time

Readers take no lock: a reader that was overtaken by two saves (its version pruned while it
read) sees the pointer moved and reads the new current version instead. Temporary folders of
writers that died are removed by the next save on the same host (by process id), and those of
any host once they are older than :data:`STALE_TEMP_SECONDS`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from stac_rscbir.fsutil import atomic_write_text, fsync_dir, fsync_file, host_name, process_alive

POINTER_FILE = "CURRENT"
LOCK_FILE = ".lock"
VERSION_PREFIX = "v-"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 600  # temporaries of another host's save older than this are removed
READ_ATTEMPTS = 100  # a reader retries while saves keep overtaking it, up to this many times

T = TypeVar("T")


class NoSnapshotError(FileNotFoundError):
    """The folder holds no current snapshot (never saved, or invalidated)."""


class SnapshotDir:
    """The snapshots in one folder: :meth:`write` a new one, :meth:`read` the current one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def current(self) -> Path | None:
        """The folder of the current version, or None when there is none (ValueError when the
        pointer file is damaged)."""
        try:
            name = (self.path / POINTER_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not name.startswith(VERSION_PREFIX) or "/" in name or os.sep in name:
            raise ValueError(f"{self.path / POINTER_FILE} names {name!r}, not a version folder")
        return self.path / name

    def read(self, load: Callable[[Path], T]) -> T:
        """``load(folder)`` on the current version; again on the new current version when
        ``load`` failed because a save replaced (and pruned) the one it was reading.

        NoSnapshotError when there is no current version; ``load``'s own error when it fails on
        a version that is still current (a damaged set).
        """
        folder = self.current()
        for _attempt in range(READ_ATTEMPTS):
            if folder is None:
                raise NoSnapshotError(f"{self.path}: no saved version ({POINTER_FILE} missing)")
            try:
                return load(folder)
            except Exception:
                now = self.current()
                if now == folder:
                    raise
                folder = now  # overtaken by saves: read the version that is current now
        raise NoSnapshotError(f"{self.path}: saves kept replacing the version being read")

    def write(self, fill: Callable[[Path], None]) -> Path:
        """A new version: ``fill(folder)`` writes its files into an empty folder that readers
        do not see; the files are fsynced, the folder renamed into place and made current; all
        but the new and the previous version are then removed. Returns the new folder.

        OSError (read-only folder, disk full) leaves the current version as it was.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f"{TEMP_PREFIX}{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        folder = self.path / f"{VERSION_PREFIX}{uuid.uuid4().hex}"
        published = False
        try:
            fill(tmp)
            for f in tmp.iterdir():
                fsync_file(f)
            fsync_dir(tmp)
            with self._locked():
                try:
                    previous = self.current()
                except ValueError:  # a damaged pointer: replaced now
                    previous = None
                os.rename(tmp, folder)
                atomic_write_text(self.path / POINTER_FILE, folder.name + "\n")
                published = True
                fsync_dir(self.path)
                self._prune(keep={folder.name, previous.name if previous else ""})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not published:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def invalidate(self) -> None:
        """Make the folder hold no current version (the next open rebuilds); the files go at
        the next :meth:`write`."""
        if not self.path.is_dir():
            return  # never saved
        with self._locked():
            (self.path / POINTER_FILE).unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive among threads and processes (one open file description each)."""
        with open(self.path / LOCK_FILE, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _prune(self, keep: set[str]) -> None:
        """Remove superseded versions and abandoned temporaries (under the lock)."""
        host = f"{TEMP_PREFIX}{host_name()}-"
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in self.path.iterdir():
            name = entry.name
            if name.startswith(VERSION_PREFIX) and name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
            elif name.startswith(host):  # this host's: abandoned when its writer is gone
                pid = name[len(host) :].split("-", 1)[0]
                if pid.isdigit() and not process_alive(int(pid)):
                    shutil.rmtree(entry, ignore_errors=True)
            elif name.startswith(TEMP_PREFIX):  # another host's: abandoned when old
                try:
                    if entry.stat().st_mtime < cutoff:
                        shutil.rmtree(entry, ignore_errors=True)
                except OSError:
                    pass  # removed meanwhile
