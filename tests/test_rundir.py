"""Run-directory lock, failed checkpoint writes (exit 4) and checkpoint file modes."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from resnet_train import checkpoint as ckpt_io
from resnet_train import rundir
from resnet_train.cli import run_main
from resnet_train.errors import (CheckpointWriteError, ConfigError, EnvironmentFailure,
                                 RunDirInUse, UserError)
from resnet_train.rundir import RunLock, current_umask

HOLDER = textwrap.dedent("""
    import sys, time
    from resnet_train.rundir import RunLock
    lock = RunLock(sys.argv[1], notify=lambda m: None).acquire()
    if len(sys.argv) > 2:  # a forked child, like a DataLoader worker, that outlives us
        import multiprocessing
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        print(child.pid, flush=True)
    print("locked", flush=True)
    time.sleep(60)
""")


def start_holder(run_dir: str, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir, *extra],
                            stdout=subprocess.PIPE, text=True)
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, f"holder exited with {proc.wait()}"
        lines.append(line.strip())
        if line.strip() == "locked":
            return proc, lines


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    run_dir = str(tmp_path / "runs" / "x")  # created by the lock
    proc, _ = start_holder(run_dir)
    try:
        with pytest.raises(RunDirInUse) as info:
            RunLock(run_dir).acquire()
    finally:
        kill(proc)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"run directory {run_dir} is in use by pid {proc.pid} "
                          f"on host {socket.gethostname()} (since ")
    assert msg.endswith("; wait for it, stop it, or choose another run.dir")
    assert isinstance(info.value, UserError) and info.value.exit_code == 2


def test_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path):
    run_dir = str(tmp_path / "run")
    proc, _ = start_holder(run_dir)
    kill(proc)  # SIGKILL: no release, the record still names it
    notes = []
    with RunLock(run_dir, notify=notes.append) as lock:
        assert lock.locked
        assert notes == [f"note: taking over {run_dir} from pid {proc.pid} on host "
                         f"{socket.gethostname()} (no longer running)"]
        with open(os.path.join(run_dir, ".lock")) as fh:
            assert f'"pid": {os.getpid()}' in fh.read()  # the record now names us


def test_forked_children_do_not_keep_the_lock(tmp_path):
    run_dir = str(tmp_path / "run")
    proc, lines = start_holder(run_dir, "fork")
    child = int(lines[0])
    try:
        kill(proc)  # the trainer dies; its forked "worker" lives on
        os.kill(child, 0)
        notes = []
        with RunLock(run_dir, notify=notes.append) as lock:
            assert lock.locked
        assert notes and f"from pid {proc.pid} " in notes[0]
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_release_then_reacquire_in_the_same_process(tmp_path):
    run_dir = str(tmp_path / "run")
    notes = []
    lock = RunLock(run_dir, notify=notes.append)
    lock.acquire()
    with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()} "):
        RunLock(run_dir).acquire()  # a second open file description conflicts, even here
    lock.release()
    assert not lock.locked
    assert os.path.exists(os.path.join(run_dir, ".lock"))  # kept: no delete/open race
    lock.acquire()  # the same object again
    assert lock.locked
    lock.release()
    lock.release()  # idempotent
    with RunLock(run_dir, notify=notes.append):
        pass
    assert notes == []  # clean releases: nothing to take over


def test_filesystem_without_flock_warns_once_and_goes_on(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    notes = []
    with RunLock(str(tmp_path / "run"), notify=notes.append) as lock:
        assert not lock.locked
    assert len(notes) == 1
    assert notes[0].startswith(f"warning: cannot lock {tmp_path / 'run'} "
                               f"([Errno {errno.ENOLCK}] ")
    assert "continuing without the lock" in notes[0]


# -- failed checkpoint writes ------------------------------------------------------------------

def saved_then_failing(tmp_path, monkeypatch, where: str):
    """Save ones to last.pt, then fail saving zeros over it at ``where``; the raised error."""
    path = str(tmp_path / "last.pt")
    ckpt_io.atomic_save({"model": {"w": torch.ones(3)}}, path)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "write":  # the real torch.save, into a file whose write fails part-way
        real_save = torch.save

        class FullDisk:
            def __init__(self, fh):
                self.fh, self.written = fh, 0

            def write(self, data):
                if self.written + len(data) > 64:
                    raise full
                self.written += len(data)
                return self.fh.write(data)

            def flush(self):
                self.fh.flush()

        monkeypatch.setattr(torch, "save", lambda obj, fh: real_save(obj, FullDisk(fh)))
    else:
        def fail(*args):
            raise full
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(CheckpointWriteError) as info:
        ckpt_io.atomic_save({"model": {"w": torch.zeros(1000)}}, path)
    monkeypatch.undo()
    return path, info.value


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, where):
    path, err = saved_then_failing(tmp_path, monkeypatch, where)
    assert str(err) == (f"cannot write checkpoint {path}: [Errno 28] No space left on device; "
                        f"the earlier checkpoints are intact")
    assert err.exit_code == 4 and err.errno == errno.ENOSPC
    assert isinstance(err, EnvironmentFailure) and isinstance(err, OSError)
    old = torch.load(path, weights_only=True)
    assert torch.equal(old["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no .tmp-* left


def test_a_bug_in_torch_save_is_not_an_environment_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt_io.atomic_save({"model": {"w": torch.ones(3)}}, path)

    def buggy(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("some internal torch error")

    monkeypatch.setattr(torch, "save", buggy)
    with pytest.raises(RuntimeError, match="some internal torch error") as info:
        ckpt_io.atomic_save({"model": {"w": torch.zeros(3)}}, path)
    assert not isinstance(info.value, EnvironmentFailure)  # exit 1 with a traceback
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_read_only_directory(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt_io.atomic_save({"model": {"w": torch.ones(3)}}, path)
    if os.geteuid() == 0:  # root ignores the mode bits: simulate what a user would get
        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        monkeypatch.setattr(tempfile, "mkstemp", denied)
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(CheckpointWriteError) as info:
            ckpt_io.atomic_save({"model": {"w": torch.zeros(3)}}, path)
    finally:
        os.chmod(tmp_path, 0o700)
    assert str(info.value) == (f"cannot write checkpoint {path}: [Errno 13] Permission denied; "
                               f"the earlier checkpoints are intact")
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("error, code", [
    (CheckpointWriteError("cannot write checkpoint runs/x/checkpoints/last.pt: [Errno 28] No "
                          "space left on device; the earlier checkpoints are intact"), 4),
    (RunDirInUse("run directory runs/x is in use by pid 7 on host h"), 2),
    (ConfigError("optim.lr: expected a float"), 2),
])
def test_run_main_maps_errors_to_one_line_and_exit_code(capsys, error, code):
    def body():
        raise error

    assert run_main("resnet-train", body) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"resnet-train: error: {error}\n"
    assert "Traceback" not in err


def test_run_main_leaves_bugs_alone():
    def body():
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        run_main("resnet-train", body)


# -- file modes --------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_mode_follows_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        assert current_umask() == mask
        path = str(tmp_path / "last.pt")
        ckpt_io.atomic_save({"model": {"w": torch.ones(3)}}, path)
        ckpt_io.atomic_save({"model": {"w": torch.ones(3)}}, path)  # replacing keeps it too
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == mode


def test_umask_without_proc(monkeypatch):
    monkeypatch.setattr(rundir, "_PROC_STATUS", "/nonexistent/status")
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # read back, not changed
    finally:
        os.umask(old)
