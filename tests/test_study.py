"""resnet-study table and resnet-plot on fake run directories (and one tiny real run)."""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest

from resnet_train.cli import plot as plot_cli
from resnet_train.cli import study as study_cli
from resnet_train.config import dump, load_config
from resnet_train.study.runs import load_run, run_labels
from resnet_train.study.table import group_runs, summarize
from tests.helpers import records, tiny

CIFAR = ["data.dataset=cifar10", "data.root=data/cifar10", "data.download=true"]


def fake_run(root, name: str, *overrides: str, epochs=(), steps=(), extra_lines=()) -> str:
    """A run directory: the resolved config of ``overrides`` and the given metric records.

    ``epochs``: (global_step, train_top1, val_top1) per epoch; ``steps``: (global_step,
    train_error, train_loss) per log point.
    """
    d = os.path.join(str(root), name)
    os.makedirs(d)
    with open(os.path.join(d, "config.yaml"), "w") as fh:
        fh.write(dump(load_config(overrides=[*overrides, f"run.dir={d}"])))
    lines = [json.dumps({"kind": "step", "global_step": g, "epoch": 0, "lr": 0.1,
                         "train_loss": loss, "train_error": err, "train_top1": 1 - err, "n": 8})
             for g, err, loss in steps]
    lines += [json.dumps({"kind": "epoch", "epoch": i, "global_step": g, "train_loss": 1.0,
                          "train_top1": tr, "val_loss": 2.0 + i,
                          "val_top1": va}) for i, (g, tr, va) in enumerate(epochs)]
    with open(os.path.join(d, "metrics.jsonl"), "w") as fh:
        fh.write("\n".join([*lines, *extra_lines]) + "\n")
    return d


def seeds_of_resnet110(tmp_path) -> list[str]:
    """Three seeds of one experiment: final val errors 6.43, 6.79, 6.60 %; train 0.1, 0.3, 0.2 %."""
    finals = [(0.999, 0.9357), (0.997, 0.9321), (0.998, 0.9340)]
    return [fake_run(tmp_path, f"s{seed}", *CIFAR, "model.arch=resnet110", f"run.seed={seed}",
                     "run.name=r110", epochs=[(100, 0.5, 0.5), (200, tr, va)])
            for seed, (tr, va) in enumerate(finals)]


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in out.strip().splitlines()]


def test_seeds_are_repeats_best_mean_std(tmp_path, capsys):
    dirs = seeds_of_resnet110(tmp_path)
    dirs.append(fake_run(tmp_path, "r20", *CIFAR, "model.arch=resnet20",
                         epochs=[(100, 0.9, 0.9125)]))
    assert study_cli.main(["table", *dirs]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0] == ["experiment", "runs", "iterations", "train error (%)", "val error (%)",
                       "paper test error (%)"]
    errs = [6.43, 6.79, 6.60]
    mean = sum(errs) / 3                                          # 6.6067
    std = math.sqrt(sum((e - mean) ** 2 for e in errs) / 2)       # sample std: 0.1801
    assert f"{mean:.2f} +- {std:.2f}" == "6.61 +- 0.18"
    # train errors 0.1, 0.3, 0.2 %: best 0.1, mean 0.2, sample std 0.1
    assert rows[2] == ["resnet110", "3", "200", "0.10 (0.20 +- 0.10)", "6.43 (6.61 +- 0.18)",
                       "6.43 (6.61 +- 0.16)"]
    # One run: just the numbers; DRL Table 6's single number for ResNet-20.
    assert rows[3] == ["resnet20", "1", "100", "10.00", "8.75", "8.75"]
    # IM's form: the median leads (6.60 of 6.43, 6.60, 6.79; train 0.2 of 0.1, 0.2, 0.3)
    assert study_cli.main(["table", *dirs, "--form", "median"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0][3:5] == ["train error (%, median)", "val error (%, median)"]
    assert rows[2][3:] == ["0.20 (0.20 +- 0.10)", "6.60 (6.61 +- 0.18)", "6.43 (6.61 +- 0.16)"]
    assert rows[3][3:] == ["10.00", "8.75", "8.75"]


def test_grouping_by_arch_and_differing_unit(tmp_path):
    dirs = [fake_run(tmp_path, f"{u}{s}", "model.arch=resnet110", f"model.unit={u}",
                     f"run.seed={s}", epochs=[(10, 0.5, 0.5)])
            for u in ("original", "full_preact") for s in (0, 1)]
    dirs.append(fake_run(tmp_path, "plain", "model.arch=plain20", epochs=[(10, 0.5, 0.5)]))
    runs = [load_run(d) for d in dirs]
    groups = group_runs(runs)
    assert [(g.label, len(g.runs)) for g in groups] == [
        ("resnet110 unit=original", 2), ("resnet110 unit=full_preact", 2),
        ("plain20 unit=null", 1)]
    assert [r.get("run.seed") for r in groups[0].runs] == [0, 1]
    assert [g.label for g in group_runs(runs, ["model.arch"])] == ["resnet110", "plain20"]
    # Plot labels tell every run apart: the differing settings, seed included.
    assert run_labels(runs)[:2] == ["resnet110 unit=original seed=0",
                                    "resnet110 unit=original seed=1"]
    # Not the paper's network (a synthetic dataset): no paper numbers.
    assert all(r["paper_test_error_pct"] is None for r in summarize(runs))


def test_json_and_md_hold_the_raw_numbers(tmp_path, capsys):
    dirs = seeds_of_resnet110(tmp_path)
    out_json, out_md = tmp_path / "t.json", tmp_path / "t.md"
    assert study_cli.main(["table", *dirs, "--json", str(out_json), "--md", str(out_md)]) == 0
    assert out_md.read_text() == capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["error_unit"] == "fraction"
    (g,) = data["groups"]
    assert g["label"] == "resnet110" and g["n_runs"] == 3 and g["seeds"] == [0, 1, 2]
    assert g["runs"] == dirs and g["iterations"] == [200, 200, 200]
    vals = [1 - 0.9357, 1 - 0.9321, 1 - 0.9340]
    assert g["val_error"]["values"] == vals
    assert g["val_error"]["best"] == min(vals)
    assert g["val_error"]["mean"] == pytest.approx(sum(vals) / 3, abs=1e-15)
    m = sum(vals) / 3
    assert g["val_error"]["std"] == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in vals) / 2))
    assert g["train_error"]["values"] == [1 - 0.999, 1 - 0.997, 1 - 0.998]
    assert g["paper_test_error_pct"] == {"best": 6.43, "mean": 6.61, "std": 0.16}


def test_the_paper_column_is_only_for_table_6s_networks(tmp_path):
    """IM Table 1's 1x1-conv shortcut ResNet-110 is another network (12.22% there): DRL's
    ResNet-110 number is not its paper number; nor of a fine-tuned or zero-init run."""
    from resnet_train.study.table import paper_error
    epochs = [(100, 0.5, 0.5)]
    plain = load_run(fake_run(tmp_path, "r", *CIFAR, "model.arch=resnet110", epochs=epochs))
    assert paper_error(plain) == (6.43, 6.61, 0.16)
    for i, extra in enumerate(["model.shortcut_variant=conv", "model.zero_init_residual=true",
                               "model.shortcut_variant=scale_both", "model.freeze=[conv1]"]):
        run = load_run(fake_run(tmp_path, f"v{i}", *CIFAR, "model.arch=resnet110", extra,
                                epochs=epochs))
        assert paper_error(run) is None, extra


def test_a_short_last_epoch_is_plotted_where_its_steps_end(tmp_path):
    from resnet_train.study.plot import run_series
    d = fake_run(tmp_path, "r", epochs=[(10, 0.5, 0.6), (20, 0.6, 0.7), (24, 0.7, 0.8)],
                 steps=[(5, 0.4, 1.0), (24, 0.3, 0.9)])
    train, val = run_series(load_run(d), "r")
    assert (train.kind, val.kind) == ("train", "val")
    assert val.x("epoch") == [1.0, 2.0, 2.4] and val.x("iter") == [10, 20, 24]
    assert train.x("epoch") == [0.5, 2.4]


def test_torn_lines_skipped_and_val_from_last_validated_epoch(tmp_path):
    d = fake_run(tmp_path, "r", epochs=[(10, 0.5, 0.75), (20, 0.6, None)],
                 steps=[(5, 0.4, 1.5)], extra_lines=['{"kind": "step", "global_st', "[1]"])
    run = load_run(d)
    assert [r["global_step"] for r in run.steps] == [5]
    assert [r["epoch"] for r in run.epochs] == [0, 1]
    (row,) = summarize([run])
    assert row["train_error"]["values"] == [pytest.approx(0.4)]
    assert row["val_error"]["values"] == [0.25]
    assert row["iterations"] == [20]


def two_plot_runs(tmp_path) -> list[str]:
    a = fake_run(tmp_path, "a", "run.name=plain20", "model.arch=plain20",
                 steps=[(2, 0.9, 2.3), (4, 0.7, 2.0), (6, 0.6, 1.9), (8, 0.5, 1.7)],
                 epochs=[(4, 0.2, 0.25), (8, 0.4, 0.375)])
    b = fake_run(tmp_path, "b", "run.name=resnet20", epochs=[(4, 0.3, 0.5), (8, 0.5, 0.625)])
    return [a, b]


def test_plot_png_and_csv_rows(tmp_path, capsys):
    from PIL import Image
    a, b = two_plot_runs(tmp_path)
    png, out_csv = tmp_path / "c.png", tmp_path / "c.csv"
    assert plot_cli.main([a, b, "--out", str(png), "--csv", str(out_csv)]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 500)
        im.verify()
    assert png.stat().st_size > 10_000
    with open(out_csv, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["label", "run", "series", "global_step", "epoch", "error"]
    # run a: thin train curve from its step lines; 4 steps per epoch
    want = [["plain20", a, "train", "2", "0.5", "0.9"], ["plain20", a, "train", "4", "1.0", "0.7"],
            ["plain20", a, "train", "6", "1.5", "0.6"], ["plain20", a, "train", "8", "2.0", "0.5"],
            ["plain20", a, "val", "4", "1.0", "0.75"], ["plain20", a, "val", "8", "2.0", "0.625"],
            # run b has no step lines: its train curve falls back to the epoch records
            ["resnet20", b, "train", "4", "1.0", "0.7"],
            ["resnet20", b, "train", "8", "2.0", "0.5"],
            ["resnet20", b, "val", "4", "1.0", "0.5"], ["resnet20", b, "val", "8", "2.0", "0.375"]]
    assert rows[1:] == want


def test_plot_loss_by_epoch_as_svg(tmp_path):
    a, _ = two_plot_runs(tmp_path)
    svg, out_csv = tmp_path / "c.svg", tmp_path / "c.csv"
    assert plot_cli.main([a, "--out", str(svg), "--x", "epoch", "--y", "loss",
                          "--csv", str(out_csv)]) == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    with open(out_csv, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][-1] == "loss"
    assert [r[-1] for r in rows[1:]] == ["2.3", "2.0", "1.9", "1.7", "2.0", "3.0"]


def test_missing_matplotlib_still_writes_csv(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    a, _ = two_plot_runs(tmp_path)
    png, out_csv = tmp_path / "c.png", tmp_path / "c.csv"
    assert plot_cli.main([a, "--out", str(png), "--csv", str(out_csv)]) == 2
    assert capsys.readouterr().err == (
        'resnet-plot: matplotlib is not installed; pip install "resnet-train[plot]" '
        "(the CSV was still written)\n")
    assert not png.exists()
    assert len(out_csv.read_text().splitlines()) == 1 + 6


@pytest.mark.parametrize("tool", ["study", "plot"])
def test_missing_run_dir_is_exit_2_one_line(tmp_path, capsys, tool):
    missing = str(tmp_path / "nope")
    if tool == "study":
        code = study_cli.main(["table", missing])
    else:
        code = plot_cli.main([missing, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"resnet-{tool}: error: run directory not found: {missing}\n"


def test_bad_run_dirs_are_exit_2_naming_the_file(tmp_path, capsys):
    d = fake_run(tmp_path, "r", epochs=[(10, 0.5, 0.5)])
    with open(os.path.join(d, "config.yaml"), "w") as fh:
        fh.write("model: [unclosed\n")
    assert study_cli.main(["table", d]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and os.path.join(d, "config.yaml") in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert study_cli.main(["table", str(empty)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    good = fake_run(tmp_path, "g", epochs=[(10, 0.5, 0.5)])
    assert study_cli.main(["table", good, "--group-by", "model.nope"]) == 2
    assert "model.nope" in capsys.readouterr().err
    assert plot_cli.main([good, "--out", str(tmp_path / "x.jpg")]) == 2
    assert ".png or .svg" in capsys.readouterr().err


def test_end_to_end_tiny_run(tmp_path, capsys):
    from resnet_train.cli.train import main as train
    run_dir = str(tmp_path / "run")
    assert train(tiny(run_dir)) == 0
    steps, epochs = records(run_dir, "step"), records(run_dir, "epoch")
    png, out_csv = tmp_path / "p.png", tmp_path / "p.csv"
    assert plot_cli.main([run_dir, "--out", str(png), "--csv", str(out_csv)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_rows = [r for r in rows if r["series"] == "train"]
    assert [(int(r["global_step"]), float(r["error"])) for r in train_rows] == [
        (s["global_step"], s["train_error"]) for s in steps]
    val_rows = [r for r in rows if r["series"] == "val"]
    assert [float(r["error"]) for r in val_rows] == [1 - e["val_top1"] for e in epochs]
    capsys.readouterr()
    assert study_cli.main(["table", run_dir]) == 0
    row = table_rows(capsys.readouterr().out)[2]
    final = epochs[-1]
    assert row == ["resnet20", "1", str(final["global_step"]),
                   f"{(1 - final['train_top1']) * 100:.2f}", f"{(1 - final['val_top1']) * 100:.2f}"]


DEGRADATION_TINY = ["--config", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "quickstart.yaml"),
    "model.width=2", "data.image_size=16", "data.train_samples=64", "data.val_samples=32",
    "data.batch_size=16", "train.iterations=8", "train.epochs=2", "run.log_every=2",
    "train.amp=none", "train.channels_last=false", "run.progress=lines",
    "schedule.name=constant", "train.precise_bn=2"]


def test_degradation_study_end_to_end(tmp_path, capsys, monkeypatch):
    """Two families x two depths on the synthetic data: four runs, the figure (PNG, SVG),
    its points (CSV, equal to the runs' logged metrics) and the table; a rerun resumes
    nothing (all complete) and rewrites the same outputs."""
    out = tmp_path / "study"
    args = ["degradation", "--out", str(out), "--depths", "8,14", *DEGRADATION_TINY]
    assert study_cli.main(args) == 0
    names = sorted(os.listdir(out))
    assert names == ["degradation.csv", "degradation.png", "degradation.svg", "plain14_s0",
                     "plain8_s0", "resnet14_s0", "resnet8_s0", "table.json", "table.md"]
    assert (out / "degradation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "degradation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for arch in ("plain8", "plain14", "resnet8", "resnet14"):
        run = str(out / f"{arch}_s0")
        assert load_config(None, [], base=load_run(run).config).train.precise_bn == 2
        label = arch.replace("plain", "plain-").replace("resnet", "resnet-")
        mine = [r for r in rows if r["label"] == label]
        assert [(int(r["global_step"]), float(r["error"])) for r in mine
                if r["series"] == "train"] == [
            (s["global_step"], s["train_error"]) for s in records(run, "step")]
        assert [float(r["error"]) for r in mine if r["series"] == "val"] == [
            1 - e["val_top1"] for e in records(run, "epoch")]
    table = json.loads((out / "table.json").read_text())["groups"]
    assert [g["label"] for g in table] == ["plain8", "plain14", "resnet8", "resnet14"]
    before = {a: len(records(str(out / f"{a}_s0"), "epoch")) for a in ("plain8", "resnet14")}
    capsys.readouterr()
    assert study_cli.main(args) == 0  # complete runs: nothing trained again
    assert before == {a: len(records(str(out / f"{a}_s0"), "epoch")) for a in before}
    # without matplotlib: one line, and the CSV and table still written
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    os.remove(out / "degradation.csv")
    capsys.readouterr()
    assert study_cli.main(args + ["--report-only"]) == 0
    assert 'matplotlib is not installed; pip install "resnet-train[plot]" (the CSV and the ' \
           'table are still written)' in capsys.readouterr().out
    assert (out / "degradation.csv").exists()


def test_degradation_study_bad_arguments_are_one_line_exit_2(tmp_path, capsys):
    for bad in (["--depths", "8,x"], ["--families", "plain,vgg"], ["--seeds", "0"]):
        assert study_cli.main(["degradation", "--out", str(tmp_path / "s"), *bad,
                               *DEGRADATION_TINY]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad[0] in err[0], err
