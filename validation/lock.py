"""One writer per results file: :class:`WriterLock` (``<out>.lock``).

``validation.store.ResultStore.open`` holds it while a store is open; a second process opening
the same file is refused (``StoreLocked``) with the first one's host and pid. The lock dies with
its process however it ends (``kill -9`` too), so a lock file left behind is taken over by the
next run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from validation.errors import StoreLocked


def lock_path(path: str | os.PathLike) -> Path:
    """The writer lock that belongs to results file ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")



def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot; Linux), None if unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _running(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this host runs and is the one that started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class WriterLock:
    """The exclusive right to write one results file: ``<out>.lock``.

    The file is locked with ``flock`` while the store is open and holds the writer's host, pid,
    process start time and the time it took the lock (for the message another writer gets). The
    kernel drops an ``flock`` when its process ends, however it ends, so a lock file left by a
    ``kill -9`` is stale by construction and the next writer takes it over. On a filesystem
    without locks (some network filesystems) the record decides instead: a lock of a process of
    this host that no longer runs (pid gone, or reused by a process that started later) is stale;
    a live one, or one from another host, is refused."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.data_path = Path(path)
        self.path = lock_path(path)
        self._fd: int | None = None
        self.took_over: dict | None = None  #: the record of a dead writer's lock this one replaced

    @staticmethod
    def _record() -> dict:
        pid = os.getpid()
        return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    @staticmethod
    def _parse(text: str) -> dict:
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _refuse(self, rec: dict) -> StoreLocked:
        who = (f"process {rec.get('pid', '?')} on host {rec.get('host', '?')} (since {rec.get('since', '?')})"
               if rec else "another process")
        return StoreLocked(
            f"{self.data_path} is being written by {who}: two writers would corrupt it. Wait for that run "
            f"to finish (re-running it resumes), or pass another output path. If no such process exists "
            f"(e.g. it ran on a machine that was lost), delete {self.path}."
        )

    def acquire(self) -> "WriterLock":
        """Take the lock or raise ``StoreLocked``; returns self."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rec = self._parse(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise self._refuse(rec) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                self._by_record(fd)  # no locks on this filesystem
                return self
            # the holder before us may have released (deleted) the file after we opened it
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._own(fd)
                return self
            os.close(fd)
        raise StoreLocked(f"could not take {self.path}: it keeps being replaced by other writers")

    def _own(self, fd: int) -> None:
        old = self._parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        self.took_over = old or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._record()).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _by_record(self, fd: int) -> None:
        rec = self._parse(os.pread(fd, 4096, 0).decode(errors="replace"))
        if rec and (rec.get("host") != socket.gethostname() or rec.get("pid") == os.getpid()
                    or _running(int(rec.get("pid", -1)), rec.get("start"))):
            os.close(fd)
            raise self._refuse(rec)
        self._own(fd)

    def release(self) -> None:
        """Delete the lock file and drop the lock (no-op if not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # a store dropped without close()
        try:
            self.release()
        except (OSError, TypeError, AttributeError):  # at interpreter exit ``os`` may already be torn down
            pass
