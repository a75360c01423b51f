"""End to end: train -> stop -> resume -> eval on the tiny synthetic run, in-process."""

import json
import os

import pytest
import torch

from resnet_train.cli import eval as eval_cli
from resnet_train.cli import train as train_cli

from .helpers import records, tiny


def read_metrics(run_dir):
    return records(run_dir, "epoch")


def read_tb(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    # Sorted by step: event files load in file-name order, and in one test process the
    # writers' counter can make a resumed run's file sort first (".../10" < ".../9").
    return {tag: sorted((e.step, e.value) for e in acc.Scalars(tag))
            for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch, then the same command with train.epochs=3 resumes and finishes.
    Deterministic: on a GPU, cuDNN's autotuned convolutions (cudnn.benchmark) would score
    the validation differently from resnet-eval's (within float rounding)."""
    run_dir = str(tmp_path_factory.mktemp("e2e") / "run")
    det = "run.deterministic=true"
    assert train_cli.main(tiny(run_dir, "train.epochs=1", det)) == 0
    first = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)
    assert train_cli.main(tiny(run_dir, "train.epochs=3", det)) == 0
    return run_dir, first


def test_metrics_jsonl(trained):
    run_dir, _ = trained
    recs = read_metrics(run_dir)
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    for r in recs:
        for key in ("lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                    "images_per_sec", "epoch_seconds", "data_wait_frac", "step_seconds"):
            assert isinstance(r[key], float), key
        for key in ("train_top1", "val_top1", "val_top5", "data_wait_frac"):
            assert 0.0 <= r[key] <= 1.0
        assert r["val_n"] == 96
        assert r["images_per_sec"] > 0 and r["epoch_seconds"] > 0
        assert r["val_top5"] >= r["val_top1"]
    # milestones=[2]: lr 0.05 for epochs 0-1, then 0.005
    assert [r["lr"] for r in recs] == pytest.approx([0.05, 0.05, 0.005])
    assert [r["global_step"] for r in recs] == [8, 16, 24]
    # it learns: the loss goes down from the first epoch
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]


def test_tensorboard_scalars_read_back(trained):
    run_dir, _ = trained
    tb = read_tb(run_dir)
    for tag in ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr",
                "perf/images_per_sec"):
        assert [s for s, _ in tb[tag]] == [8, 16, 24], tag
    recs = read_metrics(run_dir)
    assert [v for _, v in tb["val/top1"]] == pytest.approx([r["val_top1"] for r in recs])
    assert [v for _, v in tb["lr"]] == pytest.approx([0.05, 0.05, 0.005])


def test_checkpoint_contents(trained):
    run_dir, first = trained
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (3, 0, 24)
    assert (first["epoch"], first["global_step"]) == (1, 8)
    assert ckpt["config"]["train"]["epochs"] == 3
    assert ckpt["config"]["model"]["width"] == 4
    assert ckpt["versions"]["torch"] == torch.__version__
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert "conv1.weight" in ckpt["model"]
    assert ckpt["optimizer"]["state"], "momentum buffers are saved"
    assert set(ckpt["rng"]) >= {"python", "torch"}
    # The weights changed between the first and the last checkpoint.
    assert not torch.equal(ckpt["model"]["conv1.weight"], first["model"]["conv1.weight"])
    recs = read_metrics(run_dir)
    best = max(recs, key=lambda r: r["val_top1"])
    best_ckpt = torch.load(os.path.join(run_dir, "checkpoints", "best.pt"), weights_only=True)
    assert best_ckpt["best_top1"] == pytest.approx(best["val_top1"])
    assert best_ckpt["best_epoch"] == best["epoch"]


def test_eval_reproduces_best_validation(trained, tmp_path, capsys):
    run_dir, _ = trained
    out = tmp_path / "eval.json"
    best_path = os.path.join(run_dir, "checkpoints", "best.pt")
    assert eval_cli.main(["--checkpoint", best_path, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    best = max(read_metrics(run_dir), key=lambda r: r["val_top1"])
    assert result["n"] == 96
    assert result["top1"] == pytest.approx(best["val_top1"])
    assert result["top5"] == pytest.approx(best["val_top5"])
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    printed = capsys.readouterr().out
    row = next(line.split() for line in printed.splitlines() if line.startswith("center"))
    assert row[3] == f"{100 * result['top1']:.2f}" and row[6] == "96"  # top-1 acc %, N
    # an override: fewer validation images
    assert eval_cli.main(["--checkpoint", best_path, "--json", str(out),
                          "data.val_samples=32"]) == 0
    assert json.loads(out.read_text())["n"] == 32


def test_finished_run_is_not_trained_again(trained, capsys):
    run_dir, _ = trained
    before = os.path.getmtime(os.path.join(run_dir, "checkpoints", "last.pt"))
    assert train_cli.main(tiny(run_dir, "train.epochs=3")) == 0
    assert "is complete" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(run_dir, "checkpoints", "last.pt")) == before
    assert len(read_metrics(run_dir)) == 3


def test_resolved_config_written(trained):
    run_dir, _ = trained
    from resnet_train.config import load_config
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    assert cfg.train.epochs == 3 and cfg.run.dir == run_dir


def test_eval_errors_exit_2(tmp_path, trained, capsys):
    run_dir, _ = trained
    assert eval_cli.main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert eval_cli.main(["--checkpoint", str(garbage)]) == 2
    assert "garbage.pt" in capsys.readouterr().err
    best_path = os.path.join(run_dir, "checkpoints", "best.pt")
    assert eval_cli.main(["--checkpoint", best_path, "model.width=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "does not fit" in err and "conv1.weight" in err and "shape mismatch" in err
