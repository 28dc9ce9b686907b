"""One writer per cell: an exclusive ``flock`` on ``<cell>/.lock``, held while a process trains or certifies
the cell.

The kernel drops the lock when its holder dies, however it dies (SIGKILL, a lost node's process being
reaped, a preempted Slurm task), so a lock file whose lock is free is stale by construction: no heartbeat
or timeout to tune. The file also holds who took it (host, pid, Slurm job id, start time), so a second run
can say who is running the cell and ``bench status`` can show it. flock works across processes on one
host and, on Linux, on NFSv4 and Lustre mounts used by clusters (via POSIX byte-range locks).
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a cell's lock."""

    host: str
    pid: int
    started: str
    job: str

    def describe(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.started}"

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        try:
            raw: Any = json.loads(path.read_text())
            return cls(str(raw["host"]), int(raw["pid"]), str(raw["started"]), str(raw.get("job", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _job_id() -> str:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID", "")


class CellBusy(Exception):
    """Another live process holds the cell's lock."""

    def __init__(self, holder: Holder | None):
        super().__init__(holder.describe() if holder else "another process")
        self.holder = holder


class CellLock:
    """``with CellLock(folder) as lock:`` — raises ``CellBusy`` at once if another process holds it.

    ``lock.stale`` is the holder of a previous lock whose process died without releasing it (reported,
    then replaced); a clean release leaves the file empty.
    """

    def __init__(self, folder: Path, name: str = LOCK_FILE):
        """``name``: another lock file of the same folder, for work that may run beside the cell's own
        (one slice of a sharded evaluation)."""
        self.path = folder / name
        self.stale: Holder | None = None
        self._fd: int | None = None

    def __enter__(self) -> CellLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CellBusy(Holder.read(self.path)) from None
        self.stale = Holder.read(self.path)
        me = {"host": platform.node(), "pid": os.getpid(), "job": _job_id(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            # Emptied, never unlinked: unlinking would let a process that opened the old file lock it
            # while another creates and locks a new one. An empty file is a clean release, not stale.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder(folder: Path) -> Holder | None:
    """The live holder of ``folder``'s lock, or ``None`` when nobody holds it (free or stale)."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file, or no such folder: nobody can hold it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return Holder.read(path) or Holder("?", 0, "?", "")
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
