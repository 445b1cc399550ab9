"""One trainer per workdir: a lock held for the whole training run.

    with workdir_lock.hold(workdir):      # raises WorkdirLockedError naming the holder
        ...train...

Two trainers on one workdir would interleave checkpoints, metrics lines and best
checkpoints. The trainer takes `<workdir>/lock` before it writes anything there:

- on a local (or NFS) disk, an exclusive `fcntl.flock` on the file, which holds the
  holder's host, pid and start time. The kernel releases it when the process ends,
  however it ends (kill -9 included), so a local lock is never stale.
- on a bucket (a path with `://`, e.g. gs://), which has no locks, a lease: the file
  holds host, pid, start time and the time it was last renewed; the holder renews it
  every `LEASE_SECONDS / 4` from a background thread and deletes it at the end. A
  lease not renewed for `LEASE_SECONDS` is stale (its holder died without deleting
  it) and is taken over with a warning. Taking a lease writes it and reads it back
  after `SETTLE_SECONDS`: of two trainers starting together the later write wins and
  the other stops. Best effort: object stores offer no compare-and-set through epath.

The error names the holder and how to end it, and, for a lease, when it goes stale
and how to break it by hand (delete the file). In a multi-process job process 0
takes the lock and every process learns the outcome (`parallel.host0_decides`).
Eval, predict and export read a workdir and take no lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

from etils import epath

log = logging.getLogger(__name__)

LOCK_FILE = "lock"
LEASE_SECONDS = 300.0
SETTLE_SECONDS = 2.0


class WorkdirLockedError(RuntimeError):
    """The workdir is held by another trainer; str() names it and what to do."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _holder_text(holder: dict | None) -> str:
    if not holder:
        return "another process (its record is unreadable)"
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
            f"{holder.get('started', '?')}")


def _read(path: epath.Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_remote(workdir: str | os.PathLike) -> bool:
    return "://" in os.fspath(workdir)


class FileLock:
    """An flock on <workdir>/lock (local and NFS disks)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = epath.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            holder = _read(self.path)
            where = (f" (on this host: kill -TERM {holder['pid']} stops it with a checkpoint)"
                     if holder and holder.get("host") == socket.gethostname() else "")
            raise WorkdirLockedError(
                f"workdir {self.path.parent} is in use by a flaxpals trainer: "
                f"{_holder_text(holder)}{where}. Wait for it to end, or train into another "
                f"--workdir (its lock, {self.path}, is released when that process ends)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_me()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            # The file stays: removing a locked file lets a third process lock a new one
            # while a second still waits on the old.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LeaseLock:
    """A lease file <workdir>/lock on storage without locks (gs://); module docstring."""

    def __init__(self, workdir: str | os.PathLike, lease_seconds: float = LEASE_SECONDS,
                 settle_seconds: float = SETTLE_SECONDS):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.lease_seconds = lease_seconds
        self.settle_seconds = settle_seconds
        self._record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _refuse(self, holder: dict | None) -> WorkdirLockedError:
        age = time.time() - float((holder or {}).get("renewed", 0))
        left = max(self.lease_seconds - age, 0)
        return WorkdirLockedError(
            f"workdir {self.path.parent} is in use by a flaxpals trainer: "
            f"{_holder_text(holder)} (its lease {self.path} was renewed {age:.0f} s ago). "
            f"Wait for it to end, or train into another --workdir; if that process is gone, "
            f"its lease goes stale in {left:.0f} s, or delete {self.path} to break it now")

    def acquire(self) -> None:
        holder = _read(self.path) if self.path.exists() else None
        if holder is not None:
            age = time.time() - float(holder.get("renewed", 0))
            if age < self.lease_seconds:
                raise self._refuse(holder)
            log.warning("taking over the stale lease %s of %s (not renewed for %.0f s)",
                        self.path, _holder_text(holder), age)
        record = {**_me(), "token": f"{socket.gethostname()}-{os.getpid()}-{time.time()}"}
        self._write(record)
        time.sleep(self.settle_seconds)  # a trainer starting at the same time writes too
        now = _read(self.path)
        if not now or now.get("token") != record["token"]:
            raise self._refuse(now)
        self._record = record
        self._thread = threading.Thread(target=self._renew, name="flaxpals-lease",
                                        daemon=True)
        self._thread.start()

    def _write(self, record: dict) -> None:
        self.path.write_text(json.dumps({**record, "renewed": time.time(),
                                         "lease_seconds": self.lease_seconds}) + "\n")

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                self._write(self._record)
            except Exception as e:  # noqa: BLE001 - a storage hiccup: try again next time.
                log.warning("could not renew the lease %s: %s", self.path, e)

    def release(self) -> None:
        if self._record is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = _read(self.path)
        if now and now.get("token") == self._record["token"]:
            self.path.unlink()
        self._record = None


def lock_for(workdir: str | os.PathLike) -> FileLock | LeaseLock:
    return LeaseLock(workdir) if is_remote(workdir) else FileLock(workdir)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds the workdir's lock for the block (creating the workdir); raises
    WorkdirLockedError, on every process of a job, when another trainer holds it."""
    import jax

    from flaxpals.train import parallel

    lock, error = None, None
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        lock = lock_for(workdir)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            lock, error = None, e
    if not parallel.host0_decides(error is None):
        raise error or WorkdirLockedError(
            f"workdir {os.fspath(workdir)} is in use by another flaxpals trainer (process 0 "
            "of this job could not lock it; its log names the holder)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
