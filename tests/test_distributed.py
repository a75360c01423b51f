"""DDP on CPU (gloo) under torchrun: equivalence with accumulation, exact val counts, resume."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from resnet_train.cli import eval as eval_cli
from resnet_train.cli import train as train_cli
from resnet_train.config import load_config
from resnet_train.data import build_data
from resnet_train.data.sampling import val_shard
from resnet_train.errors import ConfigError

from .helpers import ROOT, TINY, records
from .helpers import tiny as _tiny


def tiny(run_dir, *extra) -> list[str]:
    """On the CPU even where a GPU is visible: two ranks on one GPU are refused, and the
    one-process runs compared with them must run where they do (gloo on the CPU)."""
    return _tiny(run_dir, "run.device=cpu", *extra)

EQUIV = ["run.deterministic=true", "train.iterations=4", "data.batch_size=32",
         "optim.weight_decay=1e-4", "train.eval_every=1", "train.precise_bn=2"]


def torchrun(nproc, module, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", f"resnet_train.cli.{module}", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    # every 2-rank run is also a sample of a clean exit (no abort in the DDP teardown)
    assert "terminate called" not in r.stderr, r.stderr[-2000:]
    return r


def params(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {k: v for k, v in ckpt["model"].items() if "running" not in k
                  and "num_batches" not in k}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ddp") / "run")
    r = torchrun(2, "train", *tiny(run_dir, *EQUIV))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, r


def test_ddp_equals_one_process_with_accumulation(tmp_path, ddp_run):
    run_dir, _ = ddp_run
    single = str(tmp_path / "single")
    assert train_cli.main(tiny(single, *EQUIV, "train.accum_steps=2")) == 0
    ddp_ckpt, ddp = params(os.path.join(run_dir, "checkpoints", "last.pt"))
    one_ckpt, one = params(os.path.join(single, "checkpoints", "last.pt"))
    assert ddp_ckpt["global_step"] == one_ckpt["global_step"] == 4
    assert ddp.keys() == one.keys()
    for k in ddp:
        rel = (ddp[k] - one[k]).norm() / one[k].norm().clamp(min=1e-12)
        assert rel < 1e-5, (k, float(rel))
    # precise BN under DDP: each rank's statistics over its half of the batches, averaged
    # over ranks. The first BN's mean is then the whole batches' mean exactly (equal halves;
    # without the all-reduce it would be rank 0's half). Deeper layers see activations
    # normalised by half-batch statistics in train mode, so they differ by design.
    k = next(k for k in ddp_ckpt["model"] if k.endswith("running_mean"))
    a, b = ddp_ckpt["model"][k], one_ckpt["model"][k]
    assert (a - b).norm() <= 1e-5 * b.norm() + 1e-6, k
    # and the run really moved the weights (the comparison is not trivially true)
    init = torch.load(os.path.join(single, "checkpoints", "last.pt"), weights_only=True)
    assert init["optimizer"]["state"][0]["momentum_buffer"].abs().sum() > 0


def test_only_rank0_writes_and_logs(ddp_run):
    run_dir, r = ddp_run
    assert r.stdout.count("epoch 0: train loss") == 1
    recs = records(run_dir)
    assert len(recs) == 1 and recs[0]["val_n"] == 96


UNEVEN = ("data.val_samples=97", "data.batch_size=30")


@pytest.fixture(scope="module")
def one_process_eval(ddp_run, tmp_path_factory):
    """A copy of the DDP run's best.pt (other tests extend the run) and its resnet-eval
    result in one process, 97 images in batches of 30."""
    where = tmp_path_factory.mktemp("eval1")
    best = str(where / "best.pt")
    shutil.copy(os.path.join(ddp_run[0], "checkpoints", "best.pt"), best)
    assert eval_cli.main(["--checkpoint", best, "--json", str(where / "eval.json"),
                          *UNEVEN]) == 0
    return best, json.loads((where / "eval.json").read_text())


def test_exact_validation_count_with_uneven_shards(one_process_eval, tmp_path):
    """3 ranks, 97 images (33/32/32), batches of 10 a rank. (2 ranks on uneven shards, with
    every protocol and the confusion tables: test_eval.py, test_torchrun_counts_every_image_once)"""
    best, one = one_process_eval
    out = tmp_path / "eval.json"
    r = torchrun(3, "eval", "--checkpoint", best, "--json", out, *UNEVEN)
    assert r.returncode == 0, r.stderr[-3000:]
    dist_result = json.loads(out.read_text())
    assert dist_result["n"] == 97
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("center")]
    assert len(rows) == 1 and rows[0][6] == "97"  # rank 0 alone reports; column N
    assert one["n"] == 97
    assert dist_result["top1"] == pytest.approx(one["top1"])
    assert dist_result["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_val_shards_cover_every_index_once():
    for n in (0, 1, 7, 96, 97, 1000):
        for world in (1, 2, 3, 8):
            idx = [i for r in range(world) for i in val_shard(n, r, world)]
            assert idx == list(range(n))


# A resume under DDP (mid-epoch, from rank 0's last.pt): the signal test below, where
# torchrun restarts the group, and tests/test_slurm.py.


@pytest.mark.parametrize("visible,local,index,torchrun", [
    (1, 3, 0, False), (4, 3, 3, False), (2, 3, None, False), (1, 1, None, True)],
    ids=["one-gpu-per-task", "all-gpus", "too-few", "torchrun-on-one-gpu"])
def test_each_process_takes_the_gpu_it_can_see(monkeypatch, visible, local, index, torchrun):
    """Plain srun with --gpus-per-task=1 shows each task one GPU: device 0, whatever its
    SLURM_LOCALID; with every GPU visible the local rank picks one; fewer GPUs than local
    ranks is one line, not an invalid device ordinal (also two torchrun processes on one
    visible GPU, which NCCL would refuse as a duplicate GPU)."""
    from resnet_train import distributed as dist_utils
    from resnet_train.errors import UserError
    set_to = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    monkeypatch.setattr(dist_utils.dist, "is_initialized", lambda: True)  # no group here
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
              "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # recorded, so what init sets is undone after the test
        monkeypatch.delenv(k)
    if torchrun:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("SLURM_PROCID", str(4 + local))
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", str(local))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    if index is None:
        with pytest.raises(UserError, match=f"local rank {local} has no GPU: this process "
                                            f"sees {visible}"):
            dist_utils.init("cuda")
        return
    info = dist_utils.init("cuda")
    assert (info.rank, info.world, info.local_rank, set_to) == (4 + local, 8, index, [index])


def test_indivisible_global_batch_is_a_config_error():
    """Checked before any loader is built (every rank raises it: exit 2 each)."""
    cfg = load_config(None, TINY + ["data.batch_size=33"])
    with pytest.raises(ConfigError, match="data.batch_size: global batch 33 is not divisible "
                                          "by the world size 2"):
        build_data(cfg, "cpu", 0, 2)
    cfg = load_config(None, TINY + ["data.batch_size=34", "train.accum_steps=2"])
    with pytest.raises(ConfigError, match="train.accum_steps: per-rank batch 17 is not "
                                          "divisible by accum_steps=2"):
        build_data(cfg, "cpu", 1, 2)


def _worker_pid(rank: int, marker: str) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if marker in cmd and "torch.distributed.run" not in cmd and \
                f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _start_torchrun(args, *launcher, env=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         *launcher, "-m", "resnet_train.cli.train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _read_until(proc, text, lines):
    while True:
        line = proc.stdout.readline()
        assert line, "".join(lines) + proc.stderr.read()[-2000:]
        lines.append(line)
        if text in line:
            return


NO_SHARED_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


# (--max-restarts with the shared store disabled, after a kill -9, resumes as after the
# preemption exit of test_a_signal_on_one_rank_stops_every_rank_and_torchrun_restarts_from_
# the_save: that case is left to it, for the suite's time budget)
def test_a_dead_rank_never_hangs_the_others(tmp_path):
    """kill -9 of rank 1 under --max-restarts 1 and torchrun's default shared store (which
    can't re-form a group): torchrun's agent stops rank 0 (it waits in a collective) and
    starts the group again, and the restarted run says what to set instead of hanging.
    (Without restarts the agent stops rank 0 the same way and exits.)"""
    import signal as sig
    run_dir = str(tmp_path / "dies")
    args = tiny(run_dir, "train.epochs=2", "run.log_every=1", "checkpoint.every_steps=2")
    proc = _start_torchrun(args, "--max-restarts=1", "--monitor-interval=0.5")
    lines: list[str] = []
    _read_until(proc, "epoch 0 step 5/8", lines)
    pid = _worker_pid(1, run_dir)
    assert pid is not None
    os.kill(pid, sig.SIGKILL)
    # (a hang would be gloo's 30-minute timeout: torchrun's agent must tear the group down)
    out, err = proc.communicate(timeout=180)
    out = "".join(lines) + out
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)
    assert proc.returncode != 0
    # every_steps=2: the last completed save before the kill is still there and loadable
    assert ckpt["epoch"] == 0 and ckpt["step_in_epoch"] in (4, 6)
    assert "warning: torchrun restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out
    assert "resnet-train: error: not restarting: torchrun restarts need TORCH_DISABLE_SH" \
        in err, err[-3000:]


# SIGTERM to torchrun itself (what scripts/slurm_train.sbatch sends on SLURM's warning):
# the workers save and exit 3, and torchrun does not restart them although allowed; then the
# requeued job resumes to the end: tests/test_slurm.py.


def test_logged_val_metrics_are_those_of_the_saved_checkpoint(ddp_run):
    """Rank 0's BatchNorm statistics are broadcast before validating: what the run logged
    is what resnet-eval of its checkpoint says (every rank scored with the saved weights)."""
    from resnet_train.cli.eval import evaluate_checkpoint
    run_dir, _ = ddp_run
    rec = records(run_dir)[-1]  # (other tests of this module may have extended the run)
    path = os.path.join(run_dir, "checkpoints", "last.pt")
    assert torch.load(path, weights_only=True)["global_step"] == rec["global_step"]
    got = evaluate_checkpoint(path)
    assert got["n"] == rec["val_n"] == 96
    assert got["top1"] == rec["val_top1"] and got["top5"] == rec["val_top5"]
    assert got["loss"] == pytest.approx(rec["val_loss"], rel=1e-6, abs=1e-7)


def _probe(mode, *args, launcher=()):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *launcher, os.path.join(ROOT, "tests", "ddp_probe.py"), mode, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_every_rank_waits_for_rank_0s_checkpoint_write_and_stops_if_it_fails(tmp_path):
    """Rank 0 alone writes (slowly here): no rank goes on before the file is there. Its
    second save fails (disk full): every rank exits 4 with the one line, and the first save
    is intact."""
    run_dir = str(tmp_path / "run")
    # torchrun stops the other workers once it sees a failure: a slow monitor lets both
    # ranks finish on their own, as they do (rank 1 raises the error rank 0 relayed)
    r = _probe("slow_then_full", *tiny(run_dir, "train.iterations=4", "checkpoint.every_steps=2"),
               launcher=("--monitor-interval=5",))
    assert r.returncode != 0
    # searched anywhere in the output: the two ranks share one pipe, and another process's
    # unterminated write can land at the start of a probe line (1 run in 16 measured)
    wrote = [float(t) for t in re.findall(r"probe: rank 0 wrote last\.pt at (\d+\.\d+)",
                                          r.stdout)]
    left = [float(t) for t in re.findall(r"probe: rank 1 left save at (\d+\.\d+)", r.stdout)]
    assert len(wrote) == len(left) == 1, r.stdout  # the save at step 2
    assert left[0] >= wrote[0], (wrote, left)
    assert r.stderr.count("No space left on device; the earlier checkpoints are intact") == 2
    assert sorted(re.findall(r"probe: rank (\d) exits (\d+)", r.stdout)) == [("0", "4"), ("1", "4")]
    assert torch.load(os.path.join(run_dir, "checkpoints", "last.pt"),
                      weights_only=True)["global_step"] == 2


def test_ddp_exit_check_counts_every_unclean_exit(monkeypatch, capsys):
    """scripts/ddp_exit_check.py (twenty runs in a row) counts a non-zero exit and an abort
    at exit ('terminate called ...', which may still exit 0) as failures. A real clean exit
    is asserted by every torchrun() run of this module."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import ddp_exit_check
    finally:
        sys.path.pop(0)
    results = iter([(0, "", ""), (0, "", "terminate called without an active exception"),
                    (1, "", ""), (0, "", "")])  # (exit code, stdout, stderr) of each run
    monkeypatch.setattr(ddp_exit_check, "run_once",
                        lambda run_dir: subprocess.CompletedProcess([], *next(results)))
    monkeypatch.setattr(sys, "argv", ["ddp_exit_check.py", "--runs", "4"])
    assert ddp_exit_check.main() == 1
    out = capsys.readouterr().out
    assert "run 1: exit 0 (abort at exit)" in out and "run 2: exit 1" in out
    assert "2/4 runs exited 0" in out


def test_a_signal_on_one_rank_stops_every_rank_and_torchrun_restarts_from_the_save(tmp_path):
    """SLURM's warning signal to rank 1 only: the ranks agree on it at a signal_check_every
    boundary, save last.pt and exit 3. Exit 3 is a failure to torchrun: with --max-restarts it
    starts the group again, which resumes from that save and finishes. (A signal to torchrun
    itself is not restarted: see above.)"""
    import signal as sig
    run_dir = str(tmp_path / "restart")
    args = tiny(run_dir, "train.epochs=2", "run.log_every=1", "checkpoint.signal_check_every=2")
    proc = _start_torchrun(args, "--max-restarts=1", "--monitor-interval=0.5",
                           env=NO_SHARED_STORE)
    lines: list[str] = []
    _read_until(proc, "epoch 0 step 2/8", lines)
    pid = _worker_pid(1, run_dir)
    assert pid is not None
    os.kill(pid, sig.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    out = "".join(lines) + out
    assert "received a stop signal on another rank" in out, out[-2000:] + err[-2000:]
    assert "run the same command to resume (exit code 3)" in out
    resumed = re.findall(r"resuming from \S+/last\.pt: epoch 0 step (\d+)", out)
    assert len(resumed) == 1, out[-2000:]
    # saved where the ranks agreed: a signal_check_every boundary after the signal
    assert 2 <= int(resumed[0]) < 8 and int(resumed[0]) % 2 == 0
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert torch.load(os.path.join(run_dir, "checkpoints", "last.pt"),
                      weights_only=True)["global_step"] == 16


def test_a_resume_at_another_world_size_names_the_batchnorm_batch_it_changes():
    """The global batch and order are the same at any world size; BatchNorm's batch is not
    (DRL's CIFAR runs: 64 on each of two GPUs), and the note says how to keep it."""
    from resnet_train.trainer import world_change_note
    assert world_change_note(2, 2, 128, 1, 1).endswith("data order are unchanged")
    two_to_one = world_change_note(2, 1, 128, 1, 1)
    assert "BatchNorm's batch (images per process and micro-batch) is not: 64 -> 128" in two_to_one
    assert two_to_one.endswith("train.accum_steps=2 with checkpoint.allow_changes="
                               "[train.accum_steps] keeps it")
    # ... and once followed (accum 1 -> 2 on one process) there is nothing more to say
    assert world_change_note(2, 1, 128, 1, 2).endswith("data order are unchanged")
    assert world_change_note(1, 2, 128, 2, 1).endswith("data order are unchanged")
    assert world_change_note(1, 2, 128, 1, 1).endswith("128 -> 64")  # (no accumulation of 1/2)
    assert world_change_note(4, 8, 256, 2, 2).endswith(
        "32 -> 16; train.accum_steps=1 with checkpoint.allow_changes=[train.accum_steps] "
        "keeps it")


def test_ranks_that_see_different_copies_of_the_dataset_all_refuse(tmp_path):
    """Node-local copies of a folder dataset: a rank whose copy lacks a file would read other
    images under the same sample numbers. Every rank compares the splits' hashes and exits
    2 with the line (no rank trains, none hangs)."""
    import numpy as np
    from PIL import Image
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.jpg")
    other = tmp_path / "data_other"
    shutil.copytree(root, other)
    os.remove(other / "train" / "b" / "3.jpg")
    run_dir = str(tmp_path / "run")
    # a slow monitor: torchrun would stop the other rank once it sees one exit
    r = _probe("other_copy_on_rank1", *tiny(
        run_dir, "data.dataset=folder", f"data.root={root}", "data.workers=0",
        "data.batch_size=6", "data.train.scale=[32,36]", "data.train.crop=28",
        "data.val.resize=32", "data.val.crop=28", "train.epochs=1"),
        launcher=("--monitor-interval=5",))
    assert sorted(re.findall(r"probe: rank (\d) exits (\d+)", r.stdout)) == [("0", "2"), ("1", "2")]
    assert r.stderr.count("the folder splits differ between processes") == 2, r.stderr[-2000:]
    assert "(rank 0: 12 training images" in r.stderr and "(rank 1: 11 training images" in r.stderr
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt"))
