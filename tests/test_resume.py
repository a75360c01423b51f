"""Resuming: config changes are never silent, the run directory is protected, the loop is
indexed by the global iteration (saves, logs and validation inside it)."""

from __future__ import annotations

import errno
import glob
import os
import stat
import time

import pytest
import torch

from resnet_train import trainer
from resnet_train.cli import train as train_cli

from .helpers import popen, records, tiny, wait_for


def last(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch run to resume with other settings (copied per test)."""
    run_dir = str(tmp_path_factory.mktemp("base") / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    return run_dir


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.parametrize("change,fragment", [
    ("optim.momentum=0.5", "optim.momentum: 0.9 -> 0.5"),
    ("model.unit=relu_before_add", "model.unit: null -> relu_before_add"),
    ("data.batch_size=16", "data.batch_size: 32 -> 16"),
    ("run.seed=4", "run.seed: 3 -> 4"),
])
def test_a_change_that_alters_the_saved_state_is_refused(one_epoch, tmp_path, capsys, change,
                                                        fragment):
    run_dir = _copy(one_epoch, tmp_path / "run")
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        config_before = fh.read()
    assert train_cli.main(tiny(run_dir, "train.epochs=2", change)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert "checkpoint.allow_changes=[" in err
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        assert fh.read() == config_before  # nothing of the refused run was recorded
    assert last(run_dir)["global_step"] == 8


def test_allowed_optimizer_changes_really_reach_the_optimizer(one_epoch, tmp_path, capsys):
    """Optimizer.load_state_dict restores the saved groups' momentum and weight decay: an
    allowed change must win over them (and be said)."""
    run_dir = _copy(one_epoch, tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=2", "optim.momentum=0.5",
                               "optim.weight_decay=0.001",
                               "checkpoint.allow_changes=[optim.momentum,optim.weight_decay]")
                          ) == 0
    out = capsys.readouterr().out
    (notice,) = [ln for ln in out.splitlines() if ln.startswith("resuming with changed")]
    assert "optim.momentum: 0.9 -> 0.5, optim.weight_decay: 0.0001 -> 0.001" in notice
    groups = last(run_dir)["optimizer"]["param_groups"]
    assert [(g["momentum"], g["weight_decay"]) for g in groups] == [(0.5, 0.001)]
    assert all(g["fused"] for g in groups)  # the device-side skip needs the fused kernel


def test_safe_changes_are_applied_and_listed_in_one_line(one_epoch, tmp_path, capsys):
    run_dir = _copy(one_epoch, tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=2", "run.log_every=2",
                               "data.workers=1")) == 0
    out = capsys.readouterr().out
    (notice,) = [ln for ln in out.splitlines() if ln.startswith("resuming with changed")]
    for change in ("run.log_every: 4 -> 2", "data.workers: 4 -> 1", "train.epochs: 1 -> 2"):
        assert change in notice, notice
    steps = [r["global_step"] for r in records(run_dir, "step")]
    assert steps == [4, 8, 10, 12, 14, 16]  # the new cadence from the resume on


def test_seeding_a_new_run_follows_the_same_rules(one_epoch, tmp_path, capsys):
    seed = f"checkpoint.resume={one_epoch}/checkpoints/last.pt"
    assert train_cli.main(tiny(str(tmp_path / "new"), "train.epochs=2", seed,
                               "run.seed=9")) == 2
    assert "run.seed: 3 -> 9" in capsys.readouterr().err
    assert train_cli.main(tiny(str(tmp_path / "new"), "train.epochs=2", seed)) == 0
    assert last(str(tmp_path / "new"))["global_step"] == 16


def test_per_iteration_curves_are_windowed_means(tmp_path):
    """Every run.log_every steps: a kind "step" line and its own TB tags; with the window
    equal to the epoch its mean is the epoch's mean."""
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=2", "run.log_every=8")) == 0
    steps, epochs = records(run_dir, "step"), records(run_dir, "epoch")
    assert [r["global_step"] for r in steps] == [8, 16] and [r["epoch"] for r in steps] == [0, 1]
    for s, e in zip(steps, epochs, strict=True):
        assert s["train_loss"] == pytest.approx(e["train_loss"], rel=1e-12)
        assert s["train_error"] == pytest.approx(1 - e["train_top1"], rel=1e-12)
        assert s["lr"] == e["lr"] and s["n"] == 256
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    for tag in ("iter/train_loss", "iter/train_error", "iter/lr"):
        assert [e.step for e in acc.Scalars(tag)] == [8, 16], tag
    assert acc.Scalars("iter/train_loss")[1].value == pytest.approx(steps[1]["train_loss"])


def test_mid_epoch_saves_keep_the_loader_running(tmp_path, monkeypatch):
    """checkpoint.every_steps saves inside the loop: one loader pass per epoch, not one per
    save (a restart would throw away workers x prefetch decoded batches)."""
    from resnet_train.data import synthetic
    passes = []
    real = synthetic.SyntheticTrain.batches

    def counted(self, epoch, start=0):
        passes.append((epoch, start))
        return real(self, epoch, start)
    monkeypatch.setattr(synthetic.SyntheticTrain, "batches", counted)
    saves = []
    real_save = trainer.Trainer._save
    monkeypatch.setattr(trainer.Trainer, "_save",
                        lambda self, names: saves.append((self.state.step, names))
                        or real_save(self, names))
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=2", "checkpoint.every_steps=3")) == 0
    assert passes == [(0, 0), (1, 0)]
    assert [s for s, _ in saves] == [3, 6, 8, 9, 12, 15, 16]


# dropout + precise BN: the pending epoch end redoes precise BN; its train-mode forwards
# must not move the global RNG that the dropout masks of later steps come from
@pytest.mark.parametrize("extra", [(), ("model.shortcut_variant=dropout", "train.precise_bn=2")],
                         ids=["plain", "dropout-precise-bn"])
def test_a_signal_during_validation_saves_the_pending_epoch_end(tmp_path, monkeypatch, extra):
    """SIGTERM while validating: last.pt marks the epoch end as pending, exit 3; the resumed
    run validates that epoch first and ends bitwise where an uninterrupted run ends."""
    args = ("train.epochs=2", "run.deterministic=true", *extra)
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert train_cli.main(tiny(whole, *args)) == 0
    real = trainer.Trainer._validate
    fired = []

    def signal_first(self):
        if not fired:
            fired.append(1)
            self.stop.received = "SIGTERM"  # as if it arrived during validation
        return real(self)
    monkeypatch.setattr(trainer.Trainer, "_validate", signal_first)
    assert train_cli.main(tiny(split, *args)) == trainer.PREEMPTED_EXIT
    mid = last(split)
    assert mid["epoch_end_pending"] and mid["global_step"] == 8 and not records(split)
    monkeypatch.setattr(trainer.Trainer, "_validate", real)
    assert train_cli.main(tiny(split, *args)) == 0
    assert [r["epoch"] for r in records(split)] == [0, 1]
    for a, b in zip(records(whole), records(split), strict=True):
        assert a["val_loss"] == b["val_loss"] and a["train_loss"] == b["train_loss"]
    for k, v in last(whole)["model"].items():
        assert torch.equal(v, last(split)["model"][k]), k


def test_a_redone_epoch_end_stopped_before_its_save_leaves_one_record(tmp_path, monkeypatch,
                                                                     capsys):
    """The resumed run redoes the pending epoch end and records it; when its checkpoint
    write then fails (disk full), last.pt still holds the pending epoch end: the next
    resume redoes it again, and the first record of it must not stay."""
    run_dir = str(tmp_path / "run")
    real_validate, real_save = trainer.Trainer._validate, torch.save

    def signal_first(self):
        self.stop.received = "SIGTERM"  # as if it arrived during validation
        return real_validate(self)
    monkeypatch.setattr(trainer.Trainer, "_validate", signal_first)
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == trainer.PREEMPTED_EXIT
    assert "last.pt after epoch 0's last step, before its validation;" in capsys.readouterr().out
    monkeypatch.setattr(trainer.Trainer, "_validate", real_validate)

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_full)
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 4
    assert "last.pt: epoch 0's validation (global step 8)" in capsys.readouterr().out
    assert [r["epoch"] for r in records(run_dir)] == [0]  # recorded before the failed save
    monkeypatch.setattr(torch, "save", real_save)
    assert last(run_dir)["epoch_end_pending"]
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    assert [r["epoch"] for r in records(run_dir)] == [0]
    assert [r["global_step"] for r in records(run_dir, "step")] == [4, 8]


def test_a_complete_run_started_again_removes_a_killed_saves_temp_file(one_epoch, tmp_path,
                                                                       capsys):
    """A kill while the last save wrote last.pt leaves its temp file and a complete run
    (epoch_NNN.pt or best.pt already at the end): starting it again removes the file."""
    run_dir = _copy(one_epoch, tmp_path / "run")
    stray = os.path.join(run_dir, "checkpoints", ".tmp-killed.pt")
    with open(stray, "wb") as fh:
        fh.write(b"half a checkpoint")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    assert "is complete (1 epochs, global step 8)" in capsys.readouterr().out
    assert not os.path.exists(stray)


def test_a_second_process_on_the_run_dir_is_refused(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    first = popen("train", *tiny(run_dir, "train.epochs=50", "data.train_samples=1024"))
    try:
        for line in first.stdout:
            if "epoch 0 step" in line:
                break
        assert train_cli.main(tiny(run_dir, "train.epochs=50")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"is in use by pid {first.pid} on host" in err, err
    finally:
        first.kill()
        first.wait()
    # a lock whose holder died is taken over with a notice
    assert train_cli.main(tiny(run_dir, "train.epochs=1", "checkpoint.allow_changes=all")) == 0
    out = capsys.readouterr().out
    assert f"taking over {run_dir} from pid {first.pid}" in out, out


def test_a_failed_checkpoint_write_is_one_line_exit_4_and_keeps_last_pt(tmp_path, capsys,
                                                                      monkeypatch):
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    good = last(run_dir)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_full)
    assert train_cli.main(tiny(run_dir, "train.epochs=2")) == 4
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "cannot write checkpoint " in err and "[Errno 28] No space left on device" in err
    monkeypatch.setattr(torch, "save", real_save)
    assert last(run_dir)["global_step"] == good["global_step"] == 8
    best = torch.load(os.path.join(run_dir, "checkpoints", "best.pt"), weights_only=True)
    assert best["global_step"] == 8
    assert not glob.glob(os.path.join(run_dir, "checkpoints", ".tmp-*"))


def test_checkpoints_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_dir = str(tmp_path / "run")
        assert train_cli.main(tiny(run_dir, "train.epochs=1")) == 0
    finally:
        os.umask(old)
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_world_size_change_is_reported(one_epoch, tmp_path, capsys):
    run_dir = _copy(one_epoch, tmp_path / "run")
    ckpt = last(run_dir)
    ckpt["world_size"] = 2
    torch.save(ckpt, os.path.join(run_dir, "checkpoints", "last.pt"))
    time.sleep(0.01)
    assert train_cli.main(tiny(run_dir, "train.epochs=2")) == 0
    assert "resuming a run of 2 process(es) with 1" in capsys.readouterr().out


def _tb_steps(run_dir: str, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()  # (it applies purge_step: the events a resumed run repeated are hidden)
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_events_are_on_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """SummaryWriter's thread writes queued events a moment later (flush() waits for them):
    a kill in between would lose them for good, as the resumed run starts after them."""
    from resnet_train import logging as run_logging
    order = []
    real_flush, real_write = run_logging.RunLogger.flush, trainer.Trainer._write
    monkeypatch.setattr(run_logging.RunLogger, "flush",
                        lambda self: (order.append("flush"), real_flush(self))[1])
    monkeypatch.setattr(trainer.Trainer, "_write",
                        lambda self, names: (order.append(names), real_write(self, names))[1])
    run_dir = str(tmp_path / "run")
    assert train_cli.main(tiny(run_dir, "train.epochs=2", "checkpoint.every_steps=4")) == 0
    saves = [i for i, o in enumerate(order) if o != "flush"]
    assert len(saves) == 4  # steps 4, 8 (epoch end), 12, 16 (epoch end)
    assert all(order[i - 1] == "flush" for i in saves), order
    assert _tb_steps(run_dir, "val/top1") == [8, 16]


def test_a_kill_before_the_first_checkpoint_leaves_no_duplicate_records(tmp_path):
    """The next start is a fresh one: what the killed run logged goes, not twice."""
    run_dir = str(tmp_path / "run")
    args = tiny(run_dir, "train.epochs=1", "run.log_every=1", "checkpoint.every_steps=0")
    proc = popen("train", *args)
    wait_for(proc, "epoch 0 step 3/8")
    proc.kill()
    proc.wait()
    assert not glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    assert [r["global_step"] for r in records(run_dir, "step")][:3] == [1, 2, 3]
    # TensorBoard orders event files by name, which starts with the creation second: the
    # killed run's file must sort first, as it does unless restarted in the same second
    time.sleep(1.05 - time.time() % 1)
    assert train_cli.main(args) == 0
    assert [r["global_step"] for r in records(run_dir, "step")] == list(range(1, 9))
    assert _tb_steps(run_dir, "iter/train_loss") == list(range(1, 9))


def test_plateau_judges_an_epoch_cut_short_at_its_real_end_when_the_run_is_extended(tmp_path):
    """train.iterations=12 ends epoch 1 of 8 steps at step 12 and validates it; extended to
    24 iterations, the run must decide the plateau rule on epoch 1's real end (step 16), as
    an uninterrupted 24-iteration run does (it decided on the partial epoch, and ignored the
    real end: other lrs for steps 17-24)."""
    plateau = ("run.deterministic=true", "schedule.name=plateau", "schedule.patience=0",
               "schedule.threshold=0.035", "run.log_every=1")
    split, whole = str(tmp_path / "split"), str(tmp_path / "whole")
    assert train_cli.main(tiny(split, *plateau, "train.iterations=12")) == 0
    assert train_cli.main(tiny(split, *plateau, "train.iterations=24")) == 0
    assert train_cli.main(tiny(whole, *plateau, "train.iterations=24")) == 0
    lrs = [[r["lr"] for r in records(d, "step")] for d in (split, whole)]
    assert len(lrs[0]) == len(lrs[1]) == 24
    assert lrs[0] == lrs[1]
    assert len(set(lrs[1])) > 1  # the rule did decay in this setting: the test can tell
