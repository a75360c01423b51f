"""The run directory: which process owns it (a lock), and the mode of the files written in it.

One process owns a run directory at a time: rank 0 of the run takes ``RunLock(run_dir)``
before it reads or writes anything there, and holds it until the run ends. The lock is an
exclusive ``flock`` on ``<run_dir>/.lock``; the file also records the holder (host, pid,
start time, command line) so that a refused second run can say who is in the way. The kernel
drops a flock when the holding process dies, so a lock left by a killed run is simply free
and the next run takes it over (with a note). The file itself is never deleted: deleting it
would let two processes lock two different inodes under the same name.

Forked children (DataLoader workers with the ``fork`` start method) share the parent's open
file description, and a flock lives as long as any descriptor of it is open: a killed
trainer whose workers linger for a few seconds would keep its run locked. So a child forked
by ``os.fork`` (all of multiprocessing's ``fork`` processes) closes its copy of the
descriptor at once: the lock is held by the owning process only. Children that exec (spawn,
forkserver, subprocess) never get it: the descriptor is opened close-on-exec.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable

from .errors import EnvironmentFailure, RunDirInUse, describe_os_error

LOCK_NAME = ".lock"

# flock errors meaning "this filesystem can't lock" (some NFS setups, Lustre without -o flock)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
# A holder records itself just after it takes the lock; a reader that sees an empty or stale
# record retries this long before it reports what it saw.
_SETTLE_S = 1.0
_PROC_STATUS = "/proc/self/status"

# Descriptors of the locks this process holds, closed in forked children (see the module doc).
# Process-wide by nature: it mirrors what the kernel attaches to this process.
_held_fds: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)  # close, never LOCK_UN: that would release the parent's lock too
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by setting it, process-wide: a file another thread creates in
    # between gets the temporary mask, so make that the strictest one (never more open).
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class RunLock:
    """Exclusive ownership of a run directory; ``with RunLock(run_dir, notify=say): ...``.

    ``acquire`` raises RunDirInUse (exit 2) naming the holder if another live process holds
    the lock, takes over a lock whose holder died (one ``note:`` through ``notify``), and on a
    filesystem without flock warns once through ``notify`` and goes on unlocked
    (``locked`` stays False). Take it on rank 0 only.
    """

    def __init__(self, run_dir: str, notify: Callable[[str], None] = print):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.notify = notify
        self.locked = False
        self._fd: int | None = None
        self._pid: int | None = None  # the process that holds it (forked children don't)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirInUse; returns self."""
        if self._pid == os.getpid():
            raise RuntimeError(f"RunLock({self.run_dir!r}) is already acquired")
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise EnvironmentFailure(f"cannot lock run directory {self.run_dir}: "
                                     f"{describe_os_error(e)}") from None
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if not self.locked:  # no flock here: warned, go on unlocked
            os.close(fd)
            self._pid = os.getpid()
            return self
        self._fd, self._pid = fd, os.getpid()
        _held_fds.add(fd)
        previous = _parse(_read(fd))
        if previous is not None and not _is_self(previous):
            self.notify(f"note: taking over {self.run_dir} from {_who(previous)} "
                        f"({'no longer running' if _dead(previous) else 'its lock was released'})")
        _write(fd, _record())
        return self

    def release(self) -> None:
        """Release the lock (the file stays, emptied: a clean end); a no-op if not held."""
        fd, owner = self._fd, self._pid
        self._fd = self._pid = None
        self.locked = False
        if fd is None or owner != os.getpid():
            return
        _held_fds.discard(fd)
        try:
            os.ftruncate(fd, 0)  # an empty record: the next holder has nothing to report
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _lock(self, fd: int) -> None:
        deadline = time.monotonic() + _SETTLE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.locked = True
                return
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise EnvironmentFailure(f"cannot lock run directory {self.run_dir}: "
                                             f"{describe_os_error(e)}") from None
                self.notify(f"warning: cannot lock {self.run_dir} ({describe_os_error(e)}: the "
                            f"filesystem does not support flock); continuing without the lock: "
                            f"make sure no other process uses this run directory")
                return
            holder = _parse(_read(fd))
            settled = holder is not None and not _dead(holder)
            if settled or time.monotonic() >= deadline:
                raise RunDirInUse(self._in_use(holder))
            time.sleep(0.05)  # the holder may be writing its record, or the record is stale

    def _in_use(self, holder: dict | None) -> str:
        advice = "wait for it, stop it, or choose another run.dir"
        if holder is None:
            return (f"run directory {self.run_dir} is in use by another process (its lock "
                    f"{self.path} is held; find it with: fuser -v {self.path}); {advice}")
        since = f" (since {holder['started']})" if holder.get("started") else ""
        if _dead(holder):
            return (f"run directory {self.run_dir} is in use: {_who(holder)}{since} is no "
                    f"longer running but a process it started still holds the lock {self.path} "
                    f"(find it with: fuser -v {self.path}); stop it or choose another run.dir")
        return f"run directory {self.run_dir} is in use by {_who(holder)}{since}; {advice}"


def _record() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
            "start_time": now, "command": shlex.join([sys.executable] + sys.argv)}


def _read(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 16, 0)
    except OSError:
        return b""


def _write(fd: int, record: dict) -> None:
    data = (json.dumps(record) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # the lock is what counts; the record only makes messages more helpful


def _parse(data: bytes) -> dict | None:
    """The holder record, or None for an empty (cleanly released) or unreadable file."""
    try:
        record = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    record["host"] = str(record.get("host", "?"))
    return record


def _who(record: dict) -> str:
    return f"pid {record['pid']} on host {record['host']}"


def _is_self(record: dict) -> bool:
    return record["host"] == socket.gethostname() and record["pid"] == os.getpid()


def _dead(record: dict) -> bool:
    """True only when the holder is known to be gone: same host, no such (non-zombie) pid."""
    pid = record["pid"]
    if record["host"] != socket.gethostname() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
    except (OSError, IndexError):
        return False


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temp file next to ``path``, then rename it over ``path``: a
    failure (a failed export check, a kill) leaves the old file (or none). OS failures are
    exit 4."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path),
                                   dir=directory)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # what open() would give, not mkstemp's 0o600
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise EnvironmentFailure(f"cannot write {path}: {describe_os_error(e)}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
