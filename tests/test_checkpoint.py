"""Never lose a run: atomic writes, exact resume, SIGTERM, kill -9, corrupt-file fallback."""

import glob
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

from resnet_train import checkpoint as ckpt_io
from resnet_train.cli import train as train_cli
from resnet_train.errors import CheckpointError

from .helpers import popen, tiny, wait_for

DET = ["run.deterministic=true", "train.epochs=3", "checkpoint.every_epochs=1",
       "checkpoint.keep_last=0"]


def weights(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, "checkpoints", name), weights_only=True)


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    assert train_cli.main(tiny(run_dir, *DET)) == 0
    return weights(run_dir)


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """resnet-train in this process, as ``cli("train", ...)`` returns it (an uncaught
    traceback would fail the test itself)."""
    capsys.readouterr()
    code = train_cli.main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt_io.atomic_save({"model": {"w": torch.ones(3)}}, path)

    def broken_save(obj, fh):
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ckpt_io.atomic_save({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt_io.load(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_load_refuses_code_and_garbage(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = str(tmp_path / "evil.pt")
    torch.save({"model": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: not a readable checkpoint"):
        ckpt_io.load(evil)
    truncated = str(tmp_path / "trunc.pt")
    ckpt_io.atomic_save({"model": {"w": torch.randn(1000)}}, truncated)
    with open(truncated, "r+b") as fh:
        fh.truncate(os.path.getsize(truncated) // 2)
    with pytest.raises(CheckpointError, match="trunc.pt"):
        ckpt_io.load(truncated)


def test_resume_at_epoch_boundary_is_bitwise_identical(tmp_path, uninterrupted):
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, *DET[:1], "train.epochs=1")) == 0
    assert weights(run_dir)["epoch"] == 1
    assert train_cli.main(tiny(run_dir, *DET)) == 0
    final = weights(run_dir)
    assert final["global_step"] == uninterrupted["global_step"] == 24
    assert_bitwise_equal(final["model"], uninterrupted["model"])
    assert_bitwise_equal(final["optimizer"]["state"][0], uninterrupted["optimizer"]["state"][0])


def test_sigterm_mid_epoch_saves_exits_and_resumes_bitwise(tmp_path, uninterrupted, capsys):
    run_dir = str(tmp_path / "run")
    args = tiny(run_dir, *DET, "run.log_every=1")
    proc = popen("train", *args)
    wait_for(proc, "epoch 1 step 3/8")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)  # (it finishes the current step and saves)
    assert proc.returncode == train_cli_preempted(), err
    assert "received SIGTERM" in out
    mid = weights(run_dir)
    assert mid["epoch"] == 1 and 3 <= mid["step_in_epoch"] < 8
    assert mid["epoch_meter"]["sums"][3] == 32 * mid["step_in_epoch"]  # images seen this epoch
    r = in_process(capsys, *args)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {run_dir}/checkpoints/last.pt: epoch 1 step " in r.stdout
    final = weights(run_dir)
    assert final["global_step"] == 24
    assert_bitwise_equal(final["model"], uninterrupted["model"])


def train_cli_preempted():
    from resnet_train.trainer import PREEMPTED_EXIT
    return PREEMPTED_EXIT


def test_kill_9_at_random_moments_never_loses_a_checkpoint(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    args = tiny(run_dir, "train.epochs=3", "checkpoint.every_steps=2", "checkpoint.every_epochs=1",
                "checkpoint.keep_last=2", "run.log_every=1")
    rng = random.Random(0)
    for _ in range(3):
        proc = popen("train", *args)
        wait_for(proc, "step ")
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.wait()
        files = [p for p in glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))]
        for path in files:  # every completed checkpoint is whole and loadable
            ckpt = ckpt_io.load(path)
            assert ckpt["global_step"] >= 0
        # keep_last + 1: a kill between writing epoch_N.pt and pruning the oldest leaves one
        # extra file, pruned by the next epoch's save; never more (CI hit that window once).
        assert len(glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*.pt"))) <= 3
    r = in_process(capsys, *args)
    assert r.returncode == 0, r.stderr
    final = weights(run_dir)
    assert (final["epoch"], final["global_step"]) == (3, 24)
    kept = glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*.pt"))
    assert sorted(map(os.path.basename, kept)) == ["epoch_002.pt", "epoch_003.pt"]
    assert not glob.glob(os.path.join(run_dir, "checkpoints", ".tmp-*"))


def test_resume_writes_what_a_kill_during_the_epoch_end_save_left_unwritten(tmp_path, capsys):
    """The save at an epoch end writes best.pt (if improved), epoch_NNN.pt, then last.pt.
    Killed after the first, the resumed run starts after that epoch end and would never
    write the others: resume writes them from the file it resumes (under load the kill test
    lost epoch_002.pt so)."""
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    args = tiny(run_dir, "train.epochs=2", "checkpoint.every_epochs=1", "checkpoint.keep_last=0")
    assert train_cli.main(args) == 0
    end = weights(run_dir, "epoch_002.pt")
    names = ckpt_io.epoch_end_names(end, 1)
    assert names[0] == "last.pt" and names[-1] == "epoch_002.pt"
    assert set(names) <= {"last.pt", "best.pt", "epoch_002.pt"}
    first = "best.pt" if "best.pt" in names else "epoch_002.pt"  # the order of the save
    unwritten = sorted(set(names) - {first})
    for name in unwritten:
        os.unlink(os.path.join(ckpts, name))
    shutil.copy(os.path.join(ckpts, "epoch_001.pt"), os.path.join(ckpts, "last.pt"))  # older
    capsys.readouterr()
    # complete: nothing trains, the files are completed; as that save was configured, not
    # as the (safe) change of every_epochs says
    assert train_cli.main([*args, "checkpoint.every_epochs=3"]) == 0
    out = capsys.readouterr().out
    assert (f"note: the epoch-end save at global step 16 was cut short; wrote "
            f"{', '.join(n for n in names if n != first)} from {ckpts}/{first}") in out
    for name in names:
        got = weights(run_dir, name)
        assert (got["global_step"], got["epoch"]) == (16, 2), name
        assert_bitwise_equal(got["model"], end["model"])
        for key, buf in end["optimizer"]["state"].items():  # the momentum goes with it
            assert torch.equal(got["optimizer"]["state"][key]["momentum_buffer"],
                               buf["momentum_buffer"]), (name, key)
    assert weights(run_dir, "epoch_001.pt")["global_step"] == 8
    assert train_cli.main([*args, "train.epochs=3"]) == 0  # trains on as if never killed
    assert sorted(os.listdir(ckpts)) == ["best.pt", "epoch_001.pt", "epoch_002.pt",
                                         "epoch_003.pt", "last.pt"]


def test_a_complete_run_prunes_what_a_kill_left_over(tmp_path):
    run_dir = str(tmp_path / "run")
    args = tiny(run_dir, "train.epochs=2", "checkpoint.every_epochs=1", "checkpoint.keep_last=1")
    assert train_cli.main(args) == 0
    ckpts = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["best.pt", "epoch_002.pt", "last.pt"]
    # As if killed after saving epoch 2 and before pruning epoch 1.
    shutil.copy(os.path.join(ckpts, "epoch_002.pt"), os.path.join(ckpts, "epoch_001.pt"))
    assert train_cli.main(args) == 0  # "is complete": nothing trains, the leftover goes
    assert sorted(os.listdir(ckpts)) == ["best.pt", "epoch_002.pt", "last.pt"]


def test_corrupt_newest_checkpoint_falls_back_under_auto(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=2", "checkpoint.every_epochs=1",
                               "checkpoint.keep_last=0")) == 0
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    with open(last, "r+b") as fh:
        fh.truncate(100)
    os.utime(last)  # newest by mtime
    epoch1 = os.path.join(run_dir, "checkpoints", "epoch_001.pt")
    os.utime(epoch1, (time.time() - 100, time.time() - 100))
    # best.pt and epoch_002.pt are also epoch 2; remove them so the fallback is epoch_001.
    os.unlink(os.path.join(run_dir, "checkpoints", "epoch_002.pt"))
    os.unlink(os.path.join(run_dir, "checkpoints", "best.pt"))
    r = in_process(capsys, *tiny(run_dir, "train.epochs=3"))
    assert r.returncode == 0, r.stderr
    assert "warning: skipping" in r.stdout and "last.pt" in r.stdout
    assert f"resuming from {epoch1}: epoch 1 step 0" in r.stdout
    assert weights(run_dir)["epoch"] == 3


def test_resume_reads_epoch_files_only_down_to_the_newest_loadable(tmp_path, monkeypatch):
    """keep_last 0 keeps every epoch file: finding the resume point must not load them all
    (90 ResNet-50 checkpoints), only last/best and the highest loadable epoch_NNN.pt."""
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=3", "checkpoint.every_epochs=1",
                               "checkpoint.keep_last=0")) == 0
    ckpts = os.path.join(run_dir, "checkpoints")
    loaded, real = [], ckpt_io.load
    monkeypatch.setattr(ckpt_io, "load", lambda p: (loaded.append(os.path.basename(p)),
                                                    real(p))[1])
    path, ckpt = ckpt_io.find_resumable(ckpts)
    assert os.path.basename(path) == "last.pt" and ckpt["global_step"] == 24
    assert sorted(loaded) == ["best.pt", "epoch_003.pt", "last.pt"]
    for name in ("last.pt", "epoch_003.pt"):  # unreadable: the fallback goes one further
        with open(os.path.join(ckpts, name), "r+b") as fh:
            fh.truncate(100)
    os.unlink(os.path.join(ckpts, "best.pt"))
    loaded.clear()
    warnings = []
    path, ckpt = ckpt_io.find_resumable(ckpts, warn=warnings.append)
    assert os.path.basename(path) == "epoch_002.pt" and ckpt["global_step"] == 16
    assert loaded == ["last.pt", "epoch_003.pt", "epoch_002.pt"] and len(warnings) == 2


def test_mismatched_checkpoint_is_a_user_error(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    seed = f"checkpoint.resume={run_dir}/checkpoints/last.pt"
    # the config comparison refuses first, naming the key ...
    r = in_process(capsys, *tiny(str(tmp_path / "other"), "model.width=8", seed))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "model.width: 4 -> 8" in line and "checkpoint.allow_changes=[model.width]" in line
    # ... and when allowed, the weights still cannot fit: the shapes are named
    r = in_process(capsys, *tiny(str(tmp_path / "other"), "model.width=8", seed,
                           "checkpoint.allow_changes=[model.width]"))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "last.pt: checkpoint does not fit the configured model" in line
    assert "conv1.weight (4, 3, 3, 3) vs model (8, 3, 3, 3)" in line
    r = in_process(capsys, *tiny(str(tmp_path / "x"), f"checkpoint.resume={tmp_path}/missing.pt"))
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "missing.pt" in r.stderr


def test_epoch_retention(tmp_path):
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=4", "checkpoint.every_epochs=1",
                               "checkpoint.keep_last=2", "data.train_samples=64")) == 0
    names = sorted(os.path.basename(p) for p in glob.glob(f"{run_dir}/checkpoints/*.pt"))
    assert names == ["best.pt", "epoch_003.pt", "epoch_004.pt", "last.pt"]
    assert weights(run_dir, "epoch_003.pt")["epoch"] == 3


def test_a_rerun_continues_the_run_whatever_resume_says(tmp_path, capsys):
    """'Run the same command to resume' holds for resume=<path> (the path seeds a new run
    only); resume=none refuses to overwrite a run's checkpoints."""
    seed_run, run_dir = str(tmp_path / "seed"), str(tmp_path / "run")
    assert train_cli.main(tiny(seed_run, "train.epochs=1")) == 0
    seed = f"checkpoint.resume={seed_run}/checkpoints/last.pt"
    assert train_cli.main(tiny(run_dir, seed, "train.epochs=2")) == 0
    out = capsys.readouterr().out
    assert f"resuming from {seed_run}/checkpoints/last.pt: epoch 1" in out
    # the same command again after raising the length: continues from the run's own last.pt
    assert train_cli.main(tiny(run_dir, seed, "train.epochs=3")) == 0
    out = capsys.readouterr().out
    assert "has its own checkpoint" in out and f"resuming from {run_dir}" in out
    assert weights(run_dir)["epoch"] == 3
    before = weights(run_dir)
    r = in_process(capsys, *tiny(run_dir, "checkpoint.resume=none", "train.epochs=4"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "checkpoint.resume: none" in r.stderr and run_dir in r.stderr
    assert_bitwise_equal(weights(run_dir)["model"], before["model"])
    assert weights(run_dir)["saved_at"] == before["saved_at"]


def test_optimizer_mismatch_is_exit_2_and_keeps_the_run_config(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        config_before = fh.read()
    # one parameter group becomes two: refused as a change, and when allowed, the saved
    # optimizer state cannot fit
    r = in_process(capsys, *tiny(run_dir, "train.epochs=2", "optim.no_decay_bn_bias=true"))
    assert r.returncode == 2 and "optim.no_decay_bn_bias: false -> true" in r.stderr
    r = in_process(capsys, *tiny(run_dir, "train.epochs=2", "optim.no_decay_bn_bias=true",
                           "checkpoint.allow_changes=[optim]"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "last.pt: its optimizer state does not fit this run" in line
    r = in_process(capsys, *tiny(run_dir, "train.epochs=2", "model.width=8",
                           "checkpoint.allow_changes=all"))
    assert r.returncode == 2 and "does not fit the configured model" in r.stderr
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        assert fh.read() == config_before  # a refused command changes nothing


def test_weights_only_file_is_not_a_training_checkpoint(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    bare = str(tmp_path / "bare.pt")
    torch.save({"model": weights(run_dir)["model"]}, bare)
    r = in_process(capsys, *tiny(str(tmp_path / "new"), f"checkpoint.resume={bare}"))
    assert r.returncode == 2 and "bare.pt: not a resnet-train training checkpoint" in r.stderr


def test_last_pt_is_written_after_best_and_epoch_files(tmp_path, monkeypatch):
    order = []
    real = ckpt_io.atomic_save

    def record(state, path):
        order.append(os.path.basename(path))
        return real(state, path)
    monkeypatch.setattr(ckpt_io, "atomic_save", record)
    assert train_cli.main(tiny(str(tmp_path / "r"), "train.epochs=1",
                               "checkpoint.every_epochs=1")) == 0
    assert order[-1] == "last.pt" and set(order) == {"best.pt", "epoch_001.pt", "last.pt"}


def test_each_rank_restores_the_cuda_rng_of_its_own_device(monkeypatch):
    """Under DDP on CUDA rank r draws (dropout) on device r. The checkpoint is rank 0's: its
    device 0 state is the advanced one, its copy of device 1 was never drawn from. Rank 1
    must get the advanced state on its device, as every rank draws alike."""
    advanced, untouched = (torch.tensor([v], dtype=torch.uint8) for v in (1, 2))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [advanced, untouched])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": advanced)
    saved = ckpt_io.rng_state()  # on rank 0, whose current device is 0
    assert saved["cuda_current"] is advanced
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # on rank 1
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: restored.__setitem__(d, s))
    ckpt_io.set_rng_state(saved)
    assert restored[1] is advanced
    restored.clear()
    ckpt_io.set_rng_state({**saved, "cuda_current": None})  # an older checkpoint: as before
    assert restored == {0: advanced, 1: untouched}
