"""scripts/slurm_train.sbatch under a fake SLURM (srun/scontrol stand-ins on one host).

SLURM's warning signal (SIGUSR1 to the batch script) must end in: every worker saved
last.pt, nobody restarted, and the job requeued; the requeued job then resumes and finishes.
"""

import os
import shutil
import signal
import stat
import subprocess

import pytest
import torch

from .helpers import ROOT, tiny

FAKE_SRUN = """#!/bin/bash
# srun stand-in: drop srun's own options, run the task once on this host.
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""

FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo 127.0.0.1 ;;
  "requeue "*) echo "$2" >> "$FAKE_SLURM_LOG" ;;
esac
"""


def _exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_slurm(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.fail("torchrun is not on PATH (pip install torch puts it there)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "srun", FAKE_SRUN)
    _exe(bin_dir / "scontrol", FAKE_SCONTROL)
    log = tmp_path / "requeued.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": ROOT,
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "r20", "SLURM_JOB_NODELIST": "127.0.0.1",
           "SLURM_JOB_NUM_NODES": "1", "GPUS_PER_NODE": "2", "MASTER_PORT": "0",
           "FAKE_SLURM_LOG": str(log)}
    return env, log


def test_sbatch_script_saves_requeues_and_resumes_on_the_warning_signal(tmp_path, fake_slurm):
    env, log = fake_slurm
    run_dir = str(tmp_path / "run")
    # run.device=cpu: the script starts 2 ranks (GPUS_PER_NODE=2), which one GPU cannot host
    args = tiny(run_dir, "train.epochs=2", "run.log_every=1", "checkpoint.signal_check_every=2",
                "run.device=cpu")
    cmd = ["bash", os.path.join(ROOT, "scripts", "slurm_train.sbatch"),
           os.path.join(ROOT, "configs", "quickstart.yaml"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)
    lines = []
    while True:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if "epoch 0 step 3/8" in line:
            break
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 does
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert "received SIGTERM: saved" in out, out[-3000:]
    assert "resuming from" not in out  # torchrun did not restart the workers
    assert log.read_text().split() == ["4242"]  # requeued once
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] in (4, 6)
    # The requeued job: the same script, same job id; it resumes and completes.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=240)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resuming from" in again.stdout
    final = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)
    assert (final["epoch"], final["global_step"]) == (2, 16)
    assert log.read_text().split() == ["4242"]  # a finished job is not requeued
